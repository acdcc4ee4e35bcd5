"""Reading, strictly loading and converting checkpoint files.

Only safe formats are read: `.safetensors`, or `.pth`/`.ckpt`/`.bin` through
``torch.load(weights_only=True)`` (no arbitrary pickle execution), both memory-mapped
(`pipeline.weights.tensor_files.TensorFile`). Every loader reports problems with the file's path
and, for key mismatches, the offending keys.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.weights.errors import CheckpointError, CheckpointKeyError
from pipeline.weights.tensor_files import TensorFile, write_safetensors

__all__ = [
    "CheckpointError",
    "CheckpointKeyError",
    "check_state_dict",
    "convert_to_safetensors",
    "load_state_dict_file",
    "load_strict",
]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or (safely) from `.pth`/`.ckpt`/`.bin`, on the CPU.

    The tensors are views of the file's private memory mapping (pages are read when touched; writes
    never reach the file). Raises `CheckpointError` naming the file for a missing, empty,
    truncated or corrupt file.
    """
    f = TensorFile(path)
    return {k: f[k] for k in f}


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
    """`module.load_state_dict(state_dict, strict=True)` (copying into the module's tensors) with a
    readable, complete key report."""
    what = what or type(module).__name__
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, what)
    module.load_state_dict(dict(state_dict), strict=True)


def convert_to_safetensors(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    *,
    metadata: Mapping[str, Any] | None = None,
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    check: Callable[[dict[str, torch.Tensor]], None] | None = None,
    final_metadata: Callable[[], Mapping[str, Any]] | None = None,
) -> Path:
    """Convert a checkpoint (``.pth`` read weights-only, or ``.safetensors``) to ``.safetensors``.

    The one conversion path (the resolver's convert-once cache and ``python -m pipeline.weights.convert``
    both use it): open `src` memory-mapped, optionally `transform` the state dict (key renames; the
    tensors are not read) and `check` it (raise to refuse; shapes only), then write `dst` (default:
    `src` with a ``.safetensors`` suffix) one tensor at a time, atomically, with ``converted_from``
    plus `metadata` in the header. Peak memory is about one tensor. `final_metadata` (see
    `write_safetensors`) fills placeholders in `metadata` once the data is written.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"destination {dst} is the source file")
    f = TensorFile(src)
    sd = {k: f[k] for k in f}
    if transform is not None:
        sd = transform(sd)
    if check is not None:
        check(sd)
    return write_safetensors(
        sd,
        dst,
        {"converted_from": src.name, **(metadata or {})},
        release=f.release,
        final_metadata=final_metadata,
    )
