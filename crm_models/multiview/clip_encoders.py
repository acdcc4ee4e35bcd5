"""open_clip ViT-H-14 conditioning encoders of CRM, on top of transformers' CLIP towers.

CRM conditions both diffusion stages on

- **text**: open_clip's text tower run through all blocks but the last ("penultimate"), then
  ``ln_final``; no pooling, no projection -> (B, 77, 1024);
- **image**: open_clip's vision tower (conv1 patches, class token, positional embedding, ``ln_pre``,
  blocks) and the hidden state after the second-to-last block, with no ``ln_post`` and no ``proj``
  -> (B, 257, 1280).

Both are exactly transformers ``CLIPTextModel`` / ``CLIPVisionModel`` once the open_clip weights are
renamed (the fused ``in_proj`` is split into q/k/v) and the layer count is chosen: the text model is
built with ``layers - 1`` blocks (its ``final_layer_norm`` is ``ln_final``), the vision model with
``layers - 1`` blocks (its ``last_hidden_state`` is not layer-normed). ViT-H-14 uses the exact
(erf) GELU, LayerNorm eps 1e-5 and a causal text mask, which these configs set explicitly.

No file I/O here: callers read state dicts (see ``pipeline.weights.checkpoints``) and pass them in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "CLIPWeightsError",
    "OpenCLIPConfig",
    "OpenCLIPImageEncoder",
    "OpenCLIPTextEncoder",
    "clip_image_preprocess",
    "convert_open_clip_state_dict",
    "merge_open_clip_sources",
    "open_clip_key_from_transformers",
    "open_clip_keys_from_transformers",
    "strip_open_clip_prefix",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_LAYER_CHOICES = ("penultimate", "last")


class CLIPWeightsError(KeyError):
    """open_clip weights are incomplete, have unknown keys, or do not fit the configured towers."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass
class OpenCLIPConfig:
    """Sizes of the open_clip towers (defaults: ViT-H-14, as used by CRM).

    Fields:
        embed_dim: joint embedding width (only the unused projections have it).
        image_size, patch_size: vision input (224, 14 -> 16x16 patches + class token = 257 tokens).
        vision_width, vision_layers, vision_head_width, vision_mlp_ratio: vision transformer sizes
            (heads = width / head_width).
        context_length, vocab_size, text_width, text_heads, text_layers, text_mlp_ratio: text sizes.
        hidden_act: "gelu" (exact erf GELU, ViT-H-14) or "quick_gelu" (OpenAI-trained models).
        layer_norm_eps: every LayerNorm (open_clip uses torch's default 1e-5).
        text_layer: "penultimate" (CRM: all but the last block, then ln_final) or "last".
        image_layer: "penultimate" (CRM: output of block L-1, no ln_post) or "last".
        attn_implementation: transformers attention backend ("sdpa" or "eager").
    """

    embed_dim: int = 1024
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1280
    vision_layers: int = 32
    vision_head_width: int = 80
    vision_mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 1024
    text_heads: int = 16
    text_layers: int = 24
    text_mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    text_layer: str = "penultimate"
    image_layer: str = "penultimate"
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        for name in ("text_layer", "image_layer"):
            if getattr(self, name) not in _LAYER_CHOICES:
                raise ValueError(f"{name} must be one of {_LAYER_CHOICES}, got {getattr(self, name)!r}")
        if self.vision_width % self.vision_head_width:
            raise ValueError(
                f"vision_width {self.vision_width} not divisible by head width {self.vision_head_width}"
            )
        if self.text_width % self.text_heads:
            raise ValueError(f"text_width {self.text_width} not divisible by text_heads {self.text_heads}")
        if self.hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(f"hidden_act must be 'gelu' or 'quick_gelu', got {self.hidden_act!r}")

    @property
    def text_layers_used(self) -> int:
        return self.text_layers - (1 if self.text_layer == "penultimate" else 0)

    @property
    def vision_layers_used(self) -> int:
        return self.vision_layers - (1 if self.image_layer == "penultimate" else 0)

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_fixture_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> OpenCLIPConfig:
        """Build from an open_clip model config.

        Accepts ``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"?}`` (open_clip's JSON model
        config) or a fixture ``config_json`` holding it under ``"open_clip_model_cfg"`` (the
        ``"FrozenOpenCLIPEmbedder"`` entry's ``layer`` then sets ``text_layer``).
        """
        cfg = dict(cfg)
        layer = None
        if "open_clip_model_cfg" in cfg:
            layer = (cfg.get("FrozenOpenCLIPEmbedder") or {}).get("layer")
            cfg = dict(cfg["open_clip_model_cfg"])
        if "vision_cfg" not in cfg or "text_cfg" not in cfg:
            raise ValueError("open_clip config needs 'vision_cfg' and 'text_cfg' entries")
        v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        if not isinstance(v.get("layers"), int):
            raise ValueError(f"only ViT vision towers are supported (vision_cfg.layers={v.get('layers')!r})")
        for key in (
            "attentional_pool",
            "global_average_pool",
            "input_patchnorm",
            "no_ln_pre",
            "final_ln_after_pool",
        ):
            if v.get(key):
                raise ValueError(f"unsupported open_clip vision option {key}={v[key]!r}")
        if t.get("hf_model_name") or t.get("proj_bias") or t.get("no_causal_mask"):
            raise ValueError("only open_clip's own causal text transformer is supported")
        kwargs: dict[str, Any] = dict(
            embed_dim=int(cfg.get("embed_dim", 1024)),
            image_size=int(v.get("image_size", 224)),
            patch_size=int(v.get("patch_size", 16)),
            vision_width=int(v.get("width", 768)),
            vision_layers=int(v["layers"]),
            vision_head_width=int(v.get("head_width", 64)),
            vision_mlp_ratio=float(v.get("mlp_ratio", 4.0)),
            context_length=int(t.get("context_length", 77)),
            vocab_size=int(t.get("vocab_size", 49408)),
            text_width=int(t.get("width", 512)),
            text_heads=int(t.get("heads", 8)),
            text_layers=int(t.get("layers", 12)),
            text_mlp_ratio=float(t.get("mlp_ratio", 4.0)),
            hidden_act="quick_gelu" if cfg.get("quick_gelu") else "gelu",
        )
        if layer is not None:
            kwargs["text_layer"] = str(layer)
        kwargs.update(overrides)
        return cls(**kwargs)

    def text_hf_config(self):
        from transformers import CLIPTextConfig

        hf = CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_width,
            intermediate_size=int(self.text_width * self.text_mlp_ratio),
            projection_dim=self.embed_dim,
            num_hidden_layers=self.text_layers_used,
            num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            attention_dropout=0.0,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=0,
        )
        hf._attn_implementation = self.attn_implementation
        return hf

    def vision_hf_config(self):
        from transformers import CLIPVisionConfig

        hf = CLIPVisionConfig(
            hidden_size=self.vision_width,
            intermediate_size=int(self.vision_width * self.vision_mlp_ratio),
            projection_dim=self.embed_dim,
            num_hidden_layers=self.vision_layers_used,
            num_attention_heads=self.vision_width // self.vision_head_width,
            num_channels=3,
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
            attention_dropout=0.0,
        )
        hf._attn_implementation = self.attn_implementation
        return hf


def _load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """Strictly load converted weights, adapting to transformers' key layout (with or without the
    ``text_model.``/``vision_model.`` wrapper of older transformers releases)."""
    own = model.state_dict()
    keys = set(own)
    wrapped = {}
    for k, v in sd.items():
        if k in keys:
            wrapped[k] = v
            continue
        for prefix in ("text_model.", "vision_model."):
            if prefix + k in keys:
                wrapped[prefix + k] = v
                break
        else:
            wrapped[k] = v
    missing = sorted(keys - set(wrapped))
    unexpected = sorted(set(wrapped) - keys)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(wrapped[k].shape)} vs model {tuple(own[k].shape)}"
        for k in keys & set(wrapped)
        if tuple(wrapped[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = [f"open_clip weights do not fit the {what}:"]
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                parts.append(
                    f"  {len(items)} {label}: " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else "")
                )
        raise CLIPWeightsError("\n".join(parts))
    model.load_state_dict(wrapped, strict=True, assign=assign)


class OpenCLIPTextEncoder(nn.Module):
    """Token ids (B, context_length) int64 -> text features (B, context_length, text_width).

    ViT-H-14: (B, 77) -> (B, 77, 1024), the output of block 23 of 24 followed by ``ln_final``.
    """

    def __init__(self, cfg: OpenCLIPConfig | None = None):
        super().__init__()
        from transformers import CLIPTextModel

        self.cfg = cfg or OpenCLIPConfig()
        self.model = CLIPTextModel(self.cfg.text_hf_config())
        self.model.eval()

    def load_converted_state_dict(self, text_sd: Mapping[str, torch.Tensor], assign: bool = False) -> None:
        """Load the ``text_sd`` returned by `convert_open_clip_state_dict` (strict; clear errors)."""
        _load_into(self.model, text_sd, "CLIP text encoder", assign=assign)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if token_ids.ndim != 2 or token_ids.shape[1] != self.cfg.context_length:
            raise ValueError(
                f"token_ids must be (B, {self.cfg.context_length}), got {tuple(token_ids.shape)}"
            )
        if token_ids.dtype.is_floating_point:
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        device = next(self.model.parameters()).device
        return self.model(input_ids=token_ids.to(device=device, dtype=torch.long)).last_hidden_state


class OpenCLIPImageEncoder(nn.Module):
    """Normalised pixels (B, 3, image_size, image_size) -> local tokens (B, num_image_tokens, vision_width).

    ViT-H-14: (B, 3, 224, 224) -> (B, 257, 1280), the hidden state after block 31 of 32 (no
    ``ln_post``, no ``proj``). Pixels come from `clip_image_preprocess`.
    """

    def __init__(self, cfg: OpenCLIPConfig | None = None):
        super().__init__()
        from transformers import CLIPVisionModel

        self.cfg = cfg or OpenCLIPConfig()
        self.model = CLIPVisionModel(self.cfg.vision_hf_config())
        self.model.eval()

    def load_converted_state_dict(self, vision_sd: Mapping[str, torch.Tensor], assign: bool = False) -> None:
        """Load the ``vision_sd`` returned by `convert_open_clip_state_dict` (strict; clear errors)."""
        _load_into(self.model, vision_sd, "CLIP image encoder", assign=assign)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise ValueError(f"pixels must be (B, 3, {s}, {s}), got {tuple(pixels.shape)}")
        param = next(self.model.parameters())
        return self.model(pixel_values=pixels.to(device=param.device, dtype=param.dtype)).last_hidden_state


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def _resize_shortest_then_crop(img, size: int):
    """Bicubic resize of the shortest side to ``size`` (the long side scaled with int() truncation),
    then a centre crop with round-half-even offsets, as torchvision's Resize/CenterCrop on PIL."""
    from PIL import Image

    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def clip_image_preprocess(
    images,
    image_size: int = 224,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """open_clip's validation transform.

    Args:
        images: uint8 array/tensor (B, H, W, 3) or (H, W, 3), a PIL image, or a list of PIL images.
            RGBA/other PIL modes are converted to RGB after the crop (alpha is dropped, as in
            open_clip; PIL resizes RGBA with premultiplied alpha, so flatten transparent images
            onto a background first, as the pipeline's preprocessing does).
    Returns:
        float32 (B, 3, image_size, image_size): bicubic resize of the shortest side, centre crop,
        RGB, [0, 1], normalised with the OpenAI mean/std.
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        pil_list = [images]
    elif isinstance(images, (list, tuple)) and all(isinstance(im, Image.Image) for im in images):
        pil_list = list(images)
    else:
        arr = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {arr.dtype} {arr.shape}")
        pil_list = [Image.fromarray(a) for a in arr]
    if not pil_list:
        raise ValueError("no images given")
    out = []
    for im in pil_list:
        if min(im.size) < 1:
            raise ValueError(f"image has an empty side: {im.size}")
        crop = _resize_shortest_then_crop(im, image_size).convert("RGB")
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()))
    x = torch.stack(out).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------------------------------------
# Weight conversion (open_clip names -> transformers names)
# ---------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "ln_1.weight": ["layer_norm1.weight"],
    "ln_1.bias": ["layer_norm1.bias"],
    "ln_2.weight": ["layer_norm2.weight"],
    "ln_2.bias": ["layer_norm2.bias"],
    "attn.out_proj.weight": ["self_attn.out_proj.weight"],
    "attn.out_proj.bias": ["self_attn.out_proj.bias"],
    "mlp.c_fc.weight": ["mlp.fc1.weight"],
    "mlp.c_fc.bias": ["mlp.fc1.bias"],
    "mlp.c_proj.weight": ["mlp.fc2.weight"],
    "mlp.c_proj.bias": ["mlp.fc2.bias"],
    # the fused projection splits row-wise into q, k, v (in that order)
    "attn.in_proj_weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
    "attn.in_proj_bias": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
}
_TEXT_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_VISION_TOP = {
    "visual.conv1.weight": "embeddings.patch_embedding.weight",
    "visual.class_embedding": "embeddings.class_embedding",
    "visual.positional_embedding": "embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "pre_layrnorm.weight",
    "visual.ln_pre.bias": "pre_layrnorm.bias",
    "visual.ln_post.weight": "post_layernorm.weight",
    "visual.ln_post.bias": "post_layernorm.bias",
}
# Known open_clip keys that CRM's conditioning never uses.
_ALWAYS_UNUSED = {"text_projection", "logit_scale", "visual.proj", "attn_mask"}


def strip_open_clip_prefix(key: str) -> str:
    """'clip_model.model.visual.x' / 'model.visual.x' / 'visual.x' -> 'visual.x'."""
    for prefix in ("clip_model.", "model.", "module."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def convert_open_clip_state_dict(
    sd: Mapping[str, torch.Tensor],
    cfg: OpenCLIPConfig | None = None,
    strict: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """open_clip state dict -> (text_sd, vision_sd, unused_keys).

    Args:
        sd: open_clip weights, as in ``open_clip_pytorch_model.bin`` (``visual.conv1.weight``, ...)
            or as in a CRM checkpoint (``clip_model.model.`` prefix, stripped here if present).
        cfg: tower sizes; selects which blocks are used (the last block of each tower is unused
            with the "penultimate" layer choice). Default: ViT-H-14.
        strict: raise `CLIPWeightsError` for unknown keys (otherwise they go to ``unused_keys``).
    Returns:
        text_sd, vision_sd: weights keyed like transformers ``CLIPTextModel`` / ``CLIPVisionModel``
        (without the ``text_model.``/``vision_model.`` wrapper). ``in_proj`` is split into q/k/v.
        unused_keys: original keys that were not needed (projections, logit_scale, skipped blocks).
    """
    text_sd, vision_sd, unused, unknown = _convert_open_clip(sd, cfg or OpenCLIPConfig())
    if unknown and strict:
        raise CLIPWeightsError(
            f"{len(unknown)} open_clip keys are not recognised (wrong model or config?): "
            + ", ".join(sorted(unknown)[:12])
            + (" ..." if len(unknown) > 12 else "")
        )
    return text_sd, vision_sd, sorted(unused + unknown)


def _convert_open_clip(
    sd: Mapping[str, torch.Tensor], cfg: OpenCLIPConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str], list[str]]:
    """`convert_open_clip_state_dict` without the error: (text_sd, vision_sd, unused, unknown),
    where ``unused`` are known keys CRM never runs and ``unknown`` keys fit nothing (original keys)."""
    text_sd: dict[str, torch.Tensor] = {}
    vision_sd: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    unknown: list[str] = []
    for orig_key, value in sd.items():
        key = strip_open_clip_prefix(orig_key)
        if key in _ALWAYS_UNUSED:
            unused.append(orig_key)
            continue
        if key in _TEXT_TOP:
            text_sd[_TEXT_TOP[key]] = value
            continue
        if key in _VISION_TOP:
            vision_sd[_VISION_TOP[key]] = value
            continue
        m = _BLOCK_RE.match(key)
        if m is None or m.group(3) not in _BLOCK_RENAMES:
            unknown.append(orig_key)
            continue
        is_vision = m.group(1) is not None
        idx = int(m.group(2))
        used = cfg.vision_layers_used if is_vision else cfg.text_layers_used
        total = cfg.vision_layers if is_vision else cfg.text_layers
        if idx >= total:
            unknown.append(orig_key)
            continue
        if idx >= used:
            unused.append(orig_key)
            continue
        target = vision_sd if is_vision else text_sd
        names = _BLOCK_RENAMES[m.group(3)]
        if len(names) == 3 and value.shape[0] % 3:
            raise CLIPWeightsError(
                f"{orig_key}: fused q/k/v of shape {tuple(value.shape)} is not divisible by 3"
            )
        parts = value.chunk(3, dim=0) if len(names) == 3 else (value,)
        for name, part in zip(names, parts):
            target[f"encoder.layers.{idx}.{name}"] = part
    return text_sd, vision_sd, unused, unknown


def open_clip_key_from_transformers(tower: str, hf_key: str) -> str:
    """Inverse key mapping: a transformers key of the text or vision tower -> the open_clip key
    (without prefix). q/k/v projections all map to the fused ``attn.in_proj_*`` key."""
    if tower not in ("text", "vision"):
        raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
    hf_key = _strip_hf_wrapper(hf_key)
    top = _TEXT_TOP if tower == "text" else _VISION_TOP
    for oc_key, hf_name in top.items():
        if hf_name == hf_key:
            return oc_key
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", hf_key)
    if m:
        for oc_suffix, hf_names in _BLOCK_RENAMES.items():
            if m.group(2) in hf_names:
                base = "visual.transformer" if tower == "vision" else "transformer"
                return f"{base}.resblocks.{m.group(1)}.{oc_suffix}"
    raise CLIPWeightsError(f"no open_clip key for transformers {tower} key {hf_key!r}")


def open_clip_keys_from_transformers(
    text_keys: Iterable[str], vision_keys: Iterable[str]
) -> dict[str, list[str]]:
    """{open_clip key: [transformers keys that come from it]} for both towers (manifest checks)."""
    out: dict[str, list[str]] = {}
    for tower, keys in (("text", text_keys), ("vision", vision_keys)):
        for k in keys:
            out.setdefault(open_clip_key_from_transformers(tower, k), []).append(k)
    return out


def merge_open_clip_sources(
    checkpoint_sd: Mapping[str, torch.Tensor] | None,
    open_clip_sd: Mapping[str, torch.Tensor] | None,
    cfg: OpenCLIPConfig | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Pick each tower's weights from the CRM checkpoint if it has them all, else from open_clip.

    The official code builds CLIP from open_clip ``laion2b_s32b_b79k`` and then lets any
    ``clip_model.*`` keys of the CRM checkpoint override it. This does the same per tower.

    Args:
        checkpoint_sd: the CRM checkpoint (any keys; only ``clip_model.*`` are looked at) or None.
        open_clip_sd: an open_clip state dict (``open_clip_pytorch_model.bin``) or None.
    Returns:
        (text_sd, vision_sd, sources) with ``sources = {"text": "checkpoint"|"open_clip", "vision": ...}``.
    Raises:
        CLIPWeightsError naming the tower and the missing keys when neither source is complete.
    """
    cfg = cfg or OpenCLIPConfig()
    from transformers import CLIPTextModel, CLIPVisionModel

    with torch.device("meta"):
        need_text = {_strip_hf_wrapper(k) for k in CLIPTextModel(cfg.text_hf_config()).state_dict()}
        need_vision = {_strip_hf_wrapper(k) for k in CLIPVisionModel(cfg.vision_hf_config()).state_dict()}

    candidates = []
    if checkpoint_sd is not None:
        ckpt_clip = {k: v for k, v in checkpoint_sd.items() if k.startswith("clip_model.")}
        if ckpt_clip:
            candidates.append(("checkpoint", convert_open_clip_state_dict(ckpt_clip, cfg, strict=False)))
    if open_clip_sd is not None:
        candidates.append(("open_clip", convert_open_clip_state_dict(open_clip_sd, cfg, strict=False)))
    if not candidates:
        raise CLIPWeightsError(
            "no CLIP weights: the CRM checkpoint has no 'clip_model.*' keys and no open_clip state dict "
            "(ViT-H-14 laion2b_s32b_b79k, open_clip_pytorch_model.bin) was given"
        )
    chosen: dict[str, tuple[str, dict]] = {}
    for tower, need, index in (("text", need_text, 0), ("vision", need_vision, 1)):
        report = []
        for name, converted in candidates:
            have = set(converted[index])
            if need <= have:
                chosen[tower] = (name, {k: converted[index][k] for k in need})
                break
            missing = sorted(need - have)
            report.append(f"{name}: {len(missing)} missing, e.g. {missing[:4]}")
        else:
            raise CLIPWeightsError(
                f"no complete CLIP {tower} tower in the given weights ({'; '.join(report)})"
            )
    sources = {tower: chosen[tower][0] for tower in ("text", "vision")}
    return chosen["text"][1], chosen["vision"][1], sources


def _strip_hf_wrapper(key: str) -> str:
    """'text_model.x' / 'vision_model.x' (transformers' tower wrapper) -> 'x'."""
    for prefix in ("text_model.", "vision_model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key
