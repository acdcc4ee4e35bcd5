"""Strict loading of official multi-view diffusion checkpoints into `MultiViewDiffusionModel`.

`load_multiview_weights(model, checkpoint, clip_path=None)`:

1. opens the CRM file (`pixel-diffusion.pth` / `ccm-diffusion.pth`, or their `.safetensors`)
   memory-mapped, or takes an in-memory state dict;
2. maps every official key (`crm_models.multiview.key_mapping`) on shape-only mirrors of the file's
   tensors; any key that fits nothing, any missing UNet / VAE tensor and any shape mismatch raises
   `CheckpointKeyError` listing the keys;
3. schedule buffers present in the file replace the computed ones (as the official loader does);
   their largest deviation from the computed schedule is reported;
4. CLIP (when the model has the towers): taken from the file's `clip_model.*` keys when complete,
   otherwise from the open_clip ViT-H-14 weights (`clip_path`, or the Hugging Face cache:
   laion/CLIP-ViT-H-14-laion2B-s32B-b79K, `open_clip_pytorch_model.bin` or
   `open_clip_model.safetensors`). If neither is there, `CheckpointError` says where it looked.
   Only the tensors the towers use are read;
5. with `share_from` (the other stage, already loaded), a component (VAE, CLIP text tower, CLIP
   image tower) whose weights would load identical to that stage's is not loaded again: both
   stages hold the same module. Identity is checked tensor by tensor, so outputs never change;
6. every tensor is read once and becomes the model's parameter (`pipeline.weights.loading`): on
   the CPU at the stored dtype a view of the file's memory mapping, otherwise a copy in the model's
   dtype on `device`. Loading holds no second copy of any tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from crm_models.multiview import MultiViewDiffusionModel
from crm_models.multiview.clip_encoders import CLIPWeightsError, merge_open_clip_sources
from crm_models.multiview.schedule import SCHEDULE_BUFFER_NAMES, schedule_buffers
from pipeline.weights.errors import CheckpointError, CheckpointKeyError
from pipeline.weights.hub import hub_cache_dir
from pipeline.weights.loading import (
    TensorRef,
    TensorSources,
    assign_state_dict,
    materialize,
    target_device,
)
from pipeline.weights.tensor_files import TensorFile

CLIP_REPO_DIR = "models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_FILE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
#: Components two stages can hold once when their weights are identical, with the config that must match.
SHAREABLE = {"vae": "vae_config", "text_encoder": "clip_config", "image_encoder": "clip_config"}


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
    shared: list[str] = field(default_factory=list)
    """Components taken from `share_from` instead of being loaded ("vae", "text_encoder", "image_encoder")."""


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
    clip_path: str | os.PathLike | TensorFile | None = None,
    what: str | None = None,
    *,
    device: str | torch.device | None = None,
    share_from: MultiViewDiffusionModel | None = None,
) -> MultiViewLoadReport:
    """Load an official checkpoint strictly into `model` (see module docstring). Returns a report.

    Args:
        model: built normally or with `pipeline.weights.loading.parameters_on_meta`; each tensor
            takes the dtype of the model's tensor (cast the meta model first to load in half
            precision) and its device, or `device` (default CPU) for tensors still on ``meta``.
        checkpoint: a file path, a `TensorFile`, or an in-memory state dict (its tensors are copied).
        clip_path: the open_clip file (path or an open `TensorFile`, which two stages can share).
        what: label used in error messages (default "multi-view stage N").
        device: where tensors on ``meta`` are loaded.
        share_from: another loaded stage whose identical components this model takes over.
    """
    what = what or f"multi-view stage {model.stage}"
    if isinstance(checkpoint, Mapping) and not isinstance(checkpoint, TensorFile):
        source, label = checkpoint, "<state dict>"
    else:
        source = checkpoint if isinstance(checkpoint, TensorFile) else TensorFile(checkpoint)
        label = str(source.path)
    sources = TensorSources()
    mirrors = sources.mirror(source)
    conv = model.convert_official_state_dict(mirrors)
    if conv.unmapped:
        raise CheckpointKeyError(f"{what} ({label})", unexpected=conv.unmapped)
    own = model.state_dict()
    report = MultiViewLoadReport(checkpoint=label, unused_keys=list(conv.unused))
    full = dict(conv.mapped)  # our key -> mirror (or view of one)

    # schedule: file values win (official strict=False load); otherwise keep the computed ones
    computed = schedule_buffers(model.config.schedule)
    present = [k for k in SCHEDULE_BUFFER_NAMES if k in full]
    if present:
        if len(present) != len(SCHEDULE_BUFFER_NAMES):
            missing = sorted(set(SCHEDULE_BUFFER_NAMES) - set(present))
            raise CheckpointKeyError(f"{what} ({label}) schedule buffers", missing=missing)
        report.schedule_from_checkpoint = True
        report.schedule_max_abs_diff = max(
            float((sources.ref(full[k]).load().double() - computed[k].double()).abs().max()) for k in present
        )
    fixed = {} if present else {k: computed[k] for k in SCHEDULE_BUFFER_NAMES}

    clip_keys = [k for k in own if k.startswith(("text_encoder.", "image_encoder."))]
    if model.has_clip and all(k in full for k in clip_keys):
        # the file's clip_model.* keys (already mapped above) cover both towers: the open_clip file
        # is neither needed nor read
        report.clip_source = {"text": "checkpoint", "vision": "checkpoint"}
    elif model.has_clip:
        clip_file = _open_clip_file(clip_path, f"{what} ({label})")
        try:  # per tower: the checkpoint's keys when that tower is complete, else open_clip
            text_sd, vision_sd, chosen = merge_open_clip_sources(
                mirrors, sources.mirror(clip_file), model.clip_config
            )
        except CLIPWeightsError as exc:
            raise CheckpointError(f"{what} ({label}): {exc}") from exc
        for k in [k for k in full if k.startswith(("text_encoder.", "image_encoder."))]:
            del full[k]
        for prefix, tower_sd in (("text_encoder.model.", text_sd), ("image_encoder.model.", vision_sd)):
            wrap = _wrapper(own, prefix)
            full.update({prefix + wrap + k: v for k, v in tower_sd.items()})
        report.clip_source = {t: (s if s == "checkpoint" else str(clip_file.path)) for t, s in chosen.items()}

    given = {**full, **fixed}
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    mismatched = [
        f"{k} (expected {tuple(own[k].shape)}, got {tuple(given[k].shape)})"
        for k in set(own) & set(given)
        if tuple(own[k].shape) != tuple(given[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(f"{what} ({label})", missing, unexpected, mismatched)

    refs = {k: sources.ref(v) for k, v in full.items()}
    if share_from is not None:
        for component in _identical_components(model, share_from, refs, own, device):
            setattr(model, component, getattr(share_from, component))
            for k in [k for k in refs if k.startswith(component + ".")]:
                del refs[k]
            report.shared.append(component)
    tensors = materialize(refs, own, device)
    for k, v in fixed.items():
        tensors[k] = v.to(device=target_device(own[k], device), dtype=own[k].dtype)
    assign_state_dict(model, tensors, f"{what} ({label})", preloaded=tuple(report.shared))
    return report


def _open_clip_file(clip_path, context: str) -> TensorFile:
    if isinstance(clip_path, TensorFile):
        return clip_path
    path = Path(clip_path) if clip_path is not None else None
    if path is None:
        path, searched = find_open_clip_weights()
        if path is None:
            raise CheckpointError(
                f"{context}: the checkpoint has no complete CLIP weights (clip_model.*) and the "
                "open_clip ViT-H-14 file was not found. Download laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
                "(open_clip_pytorch_model.bin, ~3.9 GB) into the Hugging Face cache or pass its path "
                f"(clip_path). Searched: {', '.join(searched)}"
            )
    return TensorFile(path)


def _identical_components(
    model: MultiViewDiffusionModel,
    donor: MultiViewDiffusionModel,
    refs: Mapping[str, TensorRef],
    own: Mapping[str, torch.Tensor],
    device: str | torch.device | None,
) -> list[str]:
    """Components of `model` whose loaded tensors would equal `donor`'s, tensor for tensor."""
    out = []
    for component, config_attr in SHAREABLE.items():
        mine, theirs = getattr(model, component, None), getattr(donor, component, None)
        if mine is None or theirs is None or type(mine) is not type(theirs):
            continue
        if getattr(model, config_attr) != getattr(donor, config_attr):
            continue
        prefix = component + "."
        donor_sd = {prefix + k: v for k, v in theirs.state_dict().items()}
        keys = [k for k in own if k.startswith(prefix)]
        if set(keys) != set(donor_sd) or not all(k in refs for k in keys):
            continue
        if all(_same_tensor(refs[k], own[k], donor_sd[k], device) for k in keys):
            out.append(component)
    return out


def _same_tensor(ref: TensorRef, target: torch.Tensor, theirs: torch.Tensor, device) -> bool:
    """Whether `ref`, loaded like `target` (dtype; device), equals `theirs` exactly."""
    dev = target_device(target, device)
    if theirs.dtype != target.dtype or theirs.device != dev or theirs.shape != target.shape:
        return False
    src = ref.load()
    if src.dtype == theirs.dtype and src.device == theirs.device and src.data_ptr() == theirs.data_ptr():
        return src.stride() == theirs.stride()
    t = src.to(device=theirs.device, dtype=theirs.dtype)
    same = bool(torch.equal(t, theirs))
    if isinstance(ref.source, TensorFile):
        ref.source.release(src)
    return same


def _wrapper(own: Mapping[str, torch.Tensor], prefix: str) -> str:
    for wrap in ("text_model.", "vision_model."):
        if any(k.startswith(prefix + wrap) for k in own):
            return wrap
    return ""
