"""Reading, strictly loading and converting checkpoint files.

Only safe formats are read: `.safetensors`, or `.pth`/`.ckpt` through
``torch.load(weights_only=True)`` (no arbitrary pickle execution). Every loader reports problems
with the file's path and, for key mismatches, the offending keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.outputs.atomic import atomic_file


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model."""


class CheckpointKeyError(CheckpointError):
    """Missing or unexpected keys (or shape mismatches) when loading a state dict strictly."""

    def __init__(
        self,
        what: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = [f"state dict does not match {what}:"]
        for label, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... (+{len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"  {len(keys)} {label}: {shown}")
        super().__init__("\n".join(parts))


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict or the common {'state_dict': ...} / {'model': ...} wrappers."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path}: no tensors found (expected a state dict)")


def load_state_dict_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a state dict from `.safetensors` or (safely) from `.pth`/`.ckpt`/`.bin`.

    Raises `CheckpointError` naming the file for a missing, empty, truncated or corrupt file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device=str(map_location))
        except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
            raise CheckpointError(f"cannot read safetensors file {path} ({size} bytes): {exc}") from exc
    try:
        obj = torch.load(str(path), map_location=map_location, weights_only=True, mmap=False)
    except Exception as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes; truncated or not a weights-only "
            f"PyTorch file): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    return _unwrap(obj, path)


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple], given: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise `CheckpointKeyError` unless `given` has exactly the keys and shapes of `expected`."""
    exp_keys, got_keys = set(expected), set(given)
    mismatched = [
        f"{k} (expected {tuple(expected[k])}, got {tuple(given[k].shape)})"
        for k in exp_keys & got_keys
        if tuple(expected[k]) != tuple(given[k].shape)
    ]
    if exp_keys != got_keys or mismatched:
        raise CheckpointKeyError(what, exp_keys - got_keys, got_keys - exp_keys, mismatched)


def load_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "") -> None:
    """`module.load_state_dict(state_dict, strict=True)` with a readable, complete key report."""
    what = what or type(module).__name__
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, what)
    module.load_state_dict(dict(state_dict), strict=True)


def save_safetensors_atomic(state_dict: Mapping[str, torch.Tensor], dst: str | os.PathLike, metadata=None):
    """Write `state_dict` as `.safetensors` via a temp file + rename (never a partial file)."""

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_file(dst) as tmp:
        save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    return Path(dst)


def convert_to_safetensors(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    check: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    """Convert a checkpoint (``.pth`` read weights-only, or ``.safetensors``) to ``.safetensors``.

    The one conversion path (the resolver's convert-once cache and ``python -m pipeline.weights.convert``
    both use it): read, optionally `transform` the state dict and `check` it (raise to refuse), write
    atomically to `dst` (default: `src` with a ``.safetensors`` suffix) with ``converted_from`` plus
    `metadata` in the header.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"destination {dst} is the source file")
    sd = load_state_dict_file(src)
    if transform is not None:
        sd = transform(sd)
    if check is not None:
        check(sd)
    # safetensors refuses tensors that share storage; official checkpoints may contain views.
    sd = {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}
    return save_safetensors_atomic(sd, dst, metadata={"converted_from": src.name, **(metadata or {})})
