"""CLIP image-image similarity: ``100 * cos(E(pred), E(gt))`` with a transformers ``CLIPModel``.

Weights come from a local directory, the Hugging Face cache, or a download into that cache (files
``config.json`` and ``model.safetensors`` of the hub repo; not with ``allow_download=False`` or
``HF_HUB_OFFLINE=1``; an unreachable hub is detected with one bounded request, as for the CRM weights).
Default model: ``openai/clip-vit-large-patch14`` (ViT-L/14).

Preprocessing is done in torch (no image-processor dependency): bicubic resize of the shorter side to
the model's image size (antialiased), centre crop, normalisation with the CLIP mean / std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CLIP",
    "CLIP_MEAN",
    "CLIP_STD",
    "load_clip",
    "clip_preprocess",
    "clip_embed",
    "clip_similarity",
]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_WEIGHTS_HELP = (
    "Pass --clip-model with a local directory holding a transformers CLIPModel (config.json + "
    "model.safetensors), or fetch the model into the Hugging Face cache on a machine with network "
    f"access: `hf download {DEFAULT_CLIP} config.json model.safetensors` (then copy the cache, "
    "~/.cache/huggingface/hub, or set HF_HOME)."
)


def load_clip(name_or_path: str = DEFAULT_CLIP, *, allow_download: bool = True):
    """Load a transformers ``CLIPModel``: a local directory, the Hugging Face cache, else a download.

    Raises:
        FileNotFoundError: the model cannot be had; the message says why and how to get it.
    """
    from transformers import CLIPModel

    from pipeline.weights.hub import HubAccess

    try:
        return CLIPModel.from_pretrained(name_or_path, local_files_only=True).eval()
    except (OSError, ValueError) as exc:
        local_error = exc
    hub = HubAccess(allow_download)
    if not hub.can_download():
        raise FileNotFoundError(
            f"CLIP model {name_or_path!r} is not available locally ({local_error}) and was not downloaded "
            f"({hub.blocked}). {CLIP_WEIGHTS_HELP}"
        ) from local_error
    try:
        return CLIPModel.from_pretrained(name_or_path).eval()
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(
            f"CLIP model {name_or_path!r}: download failed ({exc}). {CLIP_WEIGHTS_HELP}"
        ) from exc


def clip_preprocess(images, size: int) -> torch.Tensor:
    """``(B, H, W, 3)`` in [0, 1] -> ``(B, 3, size, size)`` normalised CLIP input."""
    x = torch.as_tensor(images, dtype=torch.float32).permute(0, 3, 1, 2)
    h, w = x.shape[-2:]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_embed(model, images, batch: int = 8) -> torch.Tensor:
    """Unit-norm image embeddings: ``(B, H, W, 3)`` in [0, 1] -> ``(B, D)``.

    Uses ``vision_model`` + ``visual_projection`` directly (the pooled CLS token projected), which is
    what ``CLIPModel.get_image_features`` computes.
    """
    size = int(model.config.vision_config.image_size)
    x = clip_preprocess(images, size)
    outs = []
    with torch.no_grad():
        for s in range(0, len(x), batch):
            vo = model.vision_model(pixel_values=x[s : s + batch])
            outs.append(model.visual_projection(vo.pooler_output))
    e = torch.cat(outs)
    return e / e.norm(dim=-1, keepdim=True)


def clip_similarity(model, pred, gt) -> torch.Tensor:
    """``100 * cosine`` of CLIP image embeddings per image pair: ``(B, H, W, 3)`` x 2 -> ``(B,)``."""
    ep = clip_embed(model, pred)
    eg = clip_embed(model, gt)
    return 100.0 * (ep * eg).sum(-1)
