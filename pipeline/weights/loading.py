"""Loading checkpoints into models without a second copy of any tensor.

The pattern every loader here follows:

1. build the model with `parameters_on_meta()`: parameters live on the ``meta`` device (no memory,
   no random initialisation), buffers are real (they are small and some are not in checkpoints);
2. map the checkpoint's keys onto the model on shape-only ``meta`` mirrors of the file's tensors
   (`TensorSources.mirror`): the key-mapping code runs unchanged, and every mapped tensor is a
   mirror or a view of one (q/k/v splits, reshapes), which `TensorSources.ref` traces back to
   the file, key and view it came from;
3. `materialize`: each tensor is read from the file once, cast to the dtype and moved to the device
   the model wants; on the CPU at the stored dtype it stays a view of the file's memory mapping
   (no copy at all), otherwise the file pages are released once copied;
4. `assign_state_dict`: the tensors become the model's parameters (``load_state_dict(...,
   assign=True)``) after a strict key and shape check that lists every problem.

Peak memory while loading is the loaded model plus one tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.weights.checkpoints import CheckpointKeyError, check_state_dict
from pipeline.weights.tensor_files import TensorFile

__all__ = [
    "TensorRef",
    "TensorSources",
    "assign_state_dict",
    "build_on_meta",
    "materialize",
    "parameters_on_meta",
    "target_device",
]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside this block get their parameters on the ``meta`` device.

    Parameters are moved to ``meta`` as they are registered, before the module initialises them,
    so random initialisation costs nothing; buffers stay where they are built (real values, e.g.
    position ids and schedules that checkpoints may not contain). Not thread-safe: it patches
    ``nn.Module.register_parameter`` for the duration of the block.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = param.__class__(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_on_meta(factory, *args, **kwargs):
    """``factory(*args, **kwargs)`` inside `parameters_on_meta`."""
    with parameters_on_meta():
        return factory(*args, **kwargs)


@dataclass(frozen=True)
class TensorRef:
    """Where one model tensor comes from: `key` of `source`, whole or as a view.

    Attributes:
        source: a `TensorFile` or an in-memory mapping key -> tensor.
        key: the source key.
        view: None for the whole tensor, else (shape, stride, storage offset) relative to the
            contiguous source tensor.
    """

    source: Mapping[str, torch.Tensor]
    key: str
    view: tuple[tuple[int, ...], tuple[int, ...], int] | None = None

    def load(self) -> torch.Tensor:
        """The tensor (a view of the file's mapping for a `TensorFile`; nothing is copied unless the
        stored tensor is not contiguous and a view must be taken of it)."""
        t = self.source[self.key]
        if self.view is None:
            return t
        if not t.is_contiguous():
            t = t.contiguous()
        shape, stride, offset = self.view
        return t.as_strided(shape, stride, t.storage_offset() + offset)

    @property
    def label(self) -> str:
        path = getattr(self.source, "path", None)
        return f"{path.name if path is not None else '<state dict>'}:{self.key}"


class TensorSources:
    """Shape-only mirrors of checkpoint tensors, and the way back from a mapped mirror to its source."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Mapping[str, torch.Tensor], str]] = {}
        self._alive: list[dict[str, torch.Tensor]] = []

    def mirror(self, source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """key -> ``meta`` tensor of the same shape and dtype, for every tensor of `source`.

        Run key-mapping code on the result; `ref` then finds the source of any tensor it returns.
        """
        if isinstance(source, TensorFile):
            mirrors = source.meta()
        else:
            mirrors = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in source.items()}
        for k, m in mirrors.items():
            self._by_id[id(m)] = (source, k)
        self._alive.append(mirrors)  # ids are only unique while the mirrors live
        return mirrors

    def ref(self, mirror: torch.Tensor) -> TensorRef:
        """The `TensorRef` of a mirror returned by `mirror` or of a view of one."""
        base = mirror._base if mirror._base is not None else mirror
        hit = self._by_id.get(id(base))
        if hit is None:
            raise RuntimeError("a mapped tensor is neither a checkpoint tensor nor a view of one")
        source, key = hit
        if mirror is base:
            return TensorRef(source, key)
        return TensorRef(source, key, (tuple(mirror.shape), tuple(mirror.stride()), mirror.storage_offset()))


def target_device(target: torch.Tensor, device: str | torch.device | None = None) -> torch.device:
    """Where a tensor for `target` goes: its own device, or `device` (default CPU) if it is on ``meta``."""
    if target.is_meta:
        return torch.device(device) if device is not None else torch.device("cpu")
    return target.device


def materialize(
    refs: Mapping[str, TensorRef],
    targets: Mapping[str, torch.Tensor],
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Read every referenced tensor once, in the dtype of `targets[key]`, on its device.

    Args:
        refs: model key -> where its tensor comes from.
        targets: model key -> the model's current tensor (``meta`` or real); gives the dtype, and the
            device unless it is ``meta``.
        device: device for keys whose target is on ``meta`` (default: CPU).
    Returns:
        model key -> tensor. Tensors of a `TensorFile` on the CPU at the stored dtype are views of
        its memory mapping (no copy); for the others the file pages are released once copied
        (`TensorFile.release`). Tensors of an in-memory mapping are always copied, so that the model
        never aliases the caller's tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for key, ref in refs.items():
        target = targets[key]
        src = ref.load()
        t = src.to(device=target_device(target, device), dtype=target.dtype)
        from_file = isinstance(ref.source, TensorFile)
        if t.data_ptr() != src.data_ptr():
            if from_file:
                ref.source.release(src)
        elif not from_file:
            t = t.clone()
        out[key] = t
    return out


def assign_state_dict(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str, preloaded: tuple[str, ...] = ()
) -> None:
    """Make `tensors` the model's parameters and buffers (no copy), after a strict check.

    Args:
        preloaded: submodule names whose tensors are already in place (taken over from another
            model) and are not in `tensors`.
    Raises:
        CheckpointKeyError listing missing, unexpected and mis-shaped keys, or naming any parameter
        or buffer that would stay on ``meta``.
    """
    prefixes = tuple(p + "." for p in preloaded)
    every = model.state_dict()
    own = {k: v for k, v in every.items() if not (prefixes and k.startswith(prefixes))}
    check_state_dict({k: v.shape for k, v in own.items()}, tensors, what)
    result = model.load_state_dict(dict(tensors), strict=False, assign=True)
    stray = set(result.missing_keys) - (set(every) - set(own))
    if stray or result.unexpected_keys:
        raise CheckpointKeyError(what, stray, result.unexpected_keys)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointKeyError(what, missing=left)
