"""nvdiffrast backend (CUDA), returning the same :class:`RasterOutput` as the PyTorch backend.

nvdiffrast is not on PyPI under its own name; ``pip install "crm-batch[nvdiffrast]"`` installs
``diffrp-nvdiffrast``, which provides ``nvdiffrast.torch`` as source JIT-compiled (nvcc + ninja) the first
time a context is created on a CUDA machine. Import is guarded: :func:`nvdiffrast_available` tells whether it
can be used.
"""

from __future__ import annotations

import sys

import torch

from .base import Rasterizer, RasterOutput, prepare_inputs


def _import_dr():
    import nvdiffrast.torch as dr  # noqa: PLC0415 - optional dependency

    return dr


def _ensure_plugin() -> None:
    """Build/load nvdiffrast's CUDA plugin, registering it in ``sys.modules``.

    nvdiffrast loads its JIT-compiled plugin with ``importlib.import_module`` after
    ``torch.utils.cpp_extension`` built or located it; recent torch versions no longer register such a
    module in ``sys.modules``, so that import fails with ``ModuleNotFoundError``. Register it and retry.
    """
    import nvdiffrast.torch.ops as ops  # noqa: PLC0415

    try:
        ops._get_plugin(gl=False)
    except ModuleNotFoundError as exc:
        import torch.utils.cpp_extension as ext  # noqa: PLC0415

        name = exc.name or ""
        if not name.startswith("nvdiffrast_plugin"):
            raise
        sys.modules[name] = ext._import_module_from_library(name, ext._get_build_directory(name, False), True)
        ops._get_plugin(gl=False)


def nvdiffrast_available() -> bool:
    """True when ``nvdiffrast.torch`` imports and CUDA is available."""
    if not torch.cuda.is_available():
        return False
    try:
        _import_dr()
    except Exception:  # ImportError, or a broken build raising at import
        return False
    return True


class NvdiffrastRasterizer(Rasterizer):
    """Rasterizer on top of ``nvdiffrast.torch.RasterizeCudaContext`` (no OpenGL needed)."""

    name = "nvdiffrast"

    def __init__(self, device=None) -> None:
        device = torch.device(device) if device is not None else torch.device("cuda")
        if device.type != "cuda":
            raise ValueError(f"the nvdiffrast backend needs a CUDA device, got {device}")
        super().__init__(device)
        self._dr = _import_dr()
        _ensure_plugin()
        self._ctx = self._dr.RasterizeCudaContext(device=self.device)

    @torch.no_grad()
    def rasterize(self, clip_pos, faces, resolution: tuple[int, int]) -> RasterOutput:
        clip, f, h, w = prepare_inputs(clip_pos, faces, resolution, self.device)
        b = clip.shape[0]
        if f.shape[0] == 0:
            return RasterOutput(
                torch.full((b, h, w), -1, dtype=torch.int64, device=self.device),
                torch.zeros((b, h, w, 3), device=self.device),
                torch.zeros((b, h, w), device=self.device),
            )
        rast, _ = self._dr.rasterize(self._ctx, clip, f.int().contiguous(), resolution=(h, w))
        u, v, z, t = rast.unbind(-1)
        tid = t.round().long() - 1
        valid = tid >= 0
        bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * valid[..., None]
        return RasterOutput(tid, bary.float(), torch.where(valid, z, torch.zeros_like(z)))
