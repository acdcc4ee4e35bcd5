"""Strict loading of official multi-view diffusion checkpoints into `MultiViewDiffusionModel`.

`load_multiview_weights(model, checkpoint, clip_path=None)`:

1. reads the CRM file (`pixel-diffusion.pth` / `ccm-diffusion.pth`, or their `.safetensors`), or
   takes an in-memory state dict;
2. maps every official key (`crm_models.multiview.key_mapping`); any key that fits nothing, any
   missing UNet / VAE tensor and any shape mismatch raises `CheckpointKeyError` listing the keys;
3. schedule buffers present in the file replace the computed ones (as the official loader does);
   their largest deviation from the computed schedule is reported;
4. CLIP (when the model has the towers): taken from the file's `clip_model.*` keys when complete,
   otherwise from the open_clip ViT-H-14 weights (`clip_path`, or the Hugging Face cache:
   laion/CLIP-ViT-H-14-laion2B-s32B-b79K, `open_clip_pytorch_model.bin` or
   `open_clip_model.safetensors`). If neither is there, `CheckpointError` says where it looked.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crm_models.multiview import MultiViewDiffusionModel
from crm_models.multiview.clip_encoders import CLIPWeightsError, merge_open_clip_sources
from crm_models.multiview.schedule import SCHEDULE_BUFFER_NAMES
from pipeline.weights.checkpoints import CheckpointError, CheckpointKeyError, load_state_dict_file
from pipeline.weights.hub import hub_cache_dir

CLIP_REPO_DIR = "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_FILE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass
class MultiViewLoadReport:
    """What `load_multiview_weights` loaded and from where."""

    checkpoint: str
    """Path of the CRM file (or "<state dict>")."""
    clip_source: dict[str, str] = field(default_factory=dict)
    """Per CLIP tower ("text", "vision"): "checkpoint", or the open_clip file path; empty without CLIP."""
    schedule_from_checkpoint: bool = False
    """Whether the schedule buffers came from the file."""
    schedule_max_abs_diff: float = 0.0
    """Largest |checkpoint - computed| over the schedule buffers (0 when not in the file)."""
    unused_keys: list[str] = field(default_factory=list)
    """Official keys deliberately not loaded (CLIP parts CRM never runs)."""


def find_open_clip_weights() -> tuple[Path | None, list[str]]:
    """The open_clip ViT-H-14 file in the Hugging Face cache -> (path or None, places searched)."""
    snapshots = hub_cache_dir() / CLIP_REPO_DIR / "snapshots"
    searched = [str(snapshots / "*" / name) for name in CLIP_FILE_NAMES]
    if snapshots.is_dir():
        for name in CLIP_FILE_NAMES:
            hits = sorted(snapshots.glob(f"*/{name}"))
            if hits:
                return hits[0], searched
    return None, searched


def load_multiview_weights(
    model: MultiViewDiffusionModel,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    clip_path: str | os.PathLike | None = None,
    what: str | None = None,
) -> MultiViewLoadReport:
    """Load an official checkpoint strictly into `model` (see module docstring). Returns a report."""
    what = what or f"multi-view stage {model.stage}"
    if isinstance(checkpoint, Mapping):
        sd, label = dict(checkpoint), "<state dict>"
    else:
        sd, label = load_state_dict_file(checkpoint), str(checkpoint)
    conv = model.convert_official_state_dict(sd)
    if conv.unmapped:
        raise CheckpointKeyError(f"{what} ({label})", unexpected=conv.unmapped)
    own = model.state_dict()
    report = MultiViewLoadReport(checkpoint=label, unused_keys=list(conv.unused))
    full = dict(conv.mapped)

    # schedule: file values win (official strict=False load); otherwise keep the computed ones
    present = [k for k in SCHEDULE_BUFFER_NAMES if k in full]
    if present:
        if len(present) != len(SCHEDULE_BUFFER_NAMES):
            missing = sorted(set(SCHEDULE_BUFFER_NAMES) - set(present))
            raise CheckpointKeyError(f"{what} ({label}) schedule buffers", missing=missing)
        report.schedule_from_checkpoint = True
        report.schedule_max_abs_diff = max(
            float((full[k].float().cpu() - own[k].float().cpu()).abs().max()) for k in present
        )
    else:
        full.update({k: own[k] for k in SCHEDULE_BUFFER_NAMES})

    clip_keys = [k for k in own if k.startswith(("text_encoder.", "image_encoder."))]
    if model.has_clip and all(k in full for k in clip_keys):
        # the file's clip_model.* keys (already mapped above) cover both towers: the open_clip file
        # is neither needed nor read
        report.clip_source = {"text": "checkpoint", "vision": "checkpoint"}
    elif model.has_clip:
        source_path = Path(clip_path) if clip_path is not None else None
        if source_path is None:
            source_path, searched = find_open_clip_weights()
            if source_path is None:
                raise CheckpointError(
                    f"{what} ({label}): the checkpoint has no complete CLIP weights (clip_model.*) and the "
                    "open_clip ViT-H-14 file was not found. Download laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                    "(open_clip_pytorch_model.bin, ~3.9 GB) into the Hugging Face cache or pass its path "
                    f"(clip_path). Searched: {', '.join(searched)}"
                )
        try:  # per tower: the checkpoint's keys when that tower is complete, else open_clip
            text_sd, vision_sd, sources = merge_open_clip_sources(
                sd, load_state_dict_file(source_path), model.clip_config
            )
        except CLIPWeightsError as exc:
            raise CheckpointError(f"{what} ({label}): {exc}") from exc
        for k in [k for k in full if k.startswith(("text_encoder.", "image_encoder."))]:
            del full[k]
        for prefix, tower_sd in (("text_encoder.model.", text_sd), ("image_encoder.model.", vision_sd)):
            wrap = _wrapper(own, prefix)
            full.update({prefix + wrap + k: v for k, v in tower_sd.items()})
        report.clip_source = {t: (s if s == "checkpoint" else str(source_path)) for t, s in sources.items()}

    missing = sorted(set(own) - set(full))
    unexpected = sorted(set(full) - set(own))
    mismatched = [
        f"{k} (expected {tuple(own[k].shape)}, got {tuple(full[k].shape)})"
        for k in set(own) & set(full)
        if tuple(own[k].shape) != tuple(full[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(f"{what} ({label})", missing, unexpected, mismatched)
    model.load_state_dict(full, strict=True)
    return report


def _wrapper(own: Mapping[str, torch.Tensor], prefix: str) -> str:
    for wrap in ("text_model.", "vision_model."):
        if any(k.startswith(prefix + wrap) for k in own):
            return wrap
    return ""
