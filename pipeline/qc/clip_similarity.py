"""CLIP image similarity between the input and renders of the mesh (``100 x cosine``), when CLIP resolves.

The model is a transformers ``CLIPModel`` (safetensors only, never a pickle): a local folder, or a Hugging
Face repo resolved like the CRM weights (``pipeline.weights.hub``: the hub cache, then a download unless
offline). It is loaded once per process and device; a model that cannot be had is remembered with its
reason too, so a run without it asks the hub once, not once per object.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel

from pipeline.weights.errors import WeightsError
from pipeline.weights.hub import hub_file

__all__ = [
    "QCModelUnavailable",
    "clip_embeddings",
    "clip_image_similarity",
    "clip_pixels",
    "get_qc_clip",
    "load_qc_clip",
]

log = logging.getLogger(__name__)

_FILES = ("config.json", "model.safetensors")
# CLIP's (OpenAI) pixel normalisation.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)
_CACHE: dict[tuple[str, bool, str], tuple[object | None, str | None]] = {}
_LOCK = threading.Lock()


class QCModelUnavailable(RuntimeError):
    """The CLIP model of the quality checks cannot be had (the message says why and how to get it)."""


def load_qc_clip(name_or_path: str, *, allow_download: bool = True, device="cpu"):
    """A transformers ``CLIPModel`` in eval mode on `device`.

    Args:
        name_or_path: a local folder (``config.json`` + ``model.safetensors``) or a Hugging Face repo id.
        allow_download: fetch a repo's two files into the hub cache when they are not there.
        device: torch device.

    Raises:
        QCModelUnavailable: not a usable local folder and not in the cache nor downloadable.
    """
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        try:
            paths = [
                hub_file(str(name_or_path), f, allow_download=allow_download, what="QC CLIP") for f in _FILES
            ]
        except WeightsError as exc:
            raise QCModelUnavailable(str(exc).splitlines()[0]) from exc
        folder = paths[0].parent
    try:
        model = CLIPModel.from_pretrained(str(folder), use_safetensors=True, local_files_only=True)
    except (OSError, ValueError) as exc:
        why = f"CLIP model {name_or_path!r} cannot be loaded from {folder}: {exc}"
        raise QCModelUnavailable(why) from exc
    return model.float().eval().to(device)


def get_qc_clip(name_or_path: str, *, allow_download: bool = True, device="cpu"):
    """:func:`load_qc_clip`, once per process: ``(model, None)`` or ``(None, reason it is unavailable)``."""
    key = (str(name_or_path), bool(allow_download), str(torch.device(device)))
    with _LOCK:
        if key not in _CACHE:
            try:
                _CACHE[key] = (load_qc_clip(key[0], allow_download=key[1], device=device), None)
            except QCModelUnavailable as exc:
                log.warning("quality checks run without CLIP similarity: %s", exc)
                _CACHE[key] = (None, str(exc))
        return _CACHE[key]


def clip_pixels(images, size: int) -> torch.Tensor:
    """B uint8 RGB images (H, W, 3) -> (B, 3, size, size) float32 CLIP input: bicubic resize of the
    shorter side to `size`, centre crop, [0, 1], CLIP mean / std."""
    out = []
    for im in images:
        pil = Image.fromarray(np.ascontiguousarray(im, dtype=np.uint8)).convert("RGB")
        w, h = pil.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        pil = pil.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        out.append(np.asarray(pil.crop((left, top, left + size, top + size)), dtype=np.float32))
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255.0
    return (x - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)


def clip_embeddings(model, images: np.ndarray) -> torch.Tensor:
    """Unit-norm CLIP image embeddings (the projected pooled class token).

    Args:
        model: transformers ``CLIPModel``.
        images: B uint8 RGB images (H, W, 3) (any sizes: each is resized and centre-cropped).

    Returns:
        (B, D) float32 on the model's device.
    """
    size = int(model.config.vision_config.image_size)
    dev = next(model.parameters()).device
    pixels = clip_pixels(images, size).to(dev)
    with torch.inference_mode():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        emb = model.visual_projection(pooled).float()
    return emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def clip_image_similarity(model, reference: np.ndarray, images: np.ndarray) -> torch.Tensor:
    """``100 x cosine`` between one reference image and each of B images.

    Args:
        model: transformers ``CLIPModel``.
        reference: (H, W, 3) uint8 RGB (the input).
        images: (B, H', W', 3) uint8 RGB (the renders).

    Returns:
        (B,) float32 similarities in [-100, 100] (100 for an identical image).
    """
    emb = clip_embeddings(model, [np.asarray(reference), *np.asarray(images)])
    return (100.0 * emb[1:] @ emb[0]).cpu()
