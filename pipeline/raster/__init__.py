"""Triangle rasterization with one interface and two backends (PyTorch, nvdiffrast).

>>> from pipeline.raster import get_rasterizer
>>> r = get_rasterizer("torch")
>>> out = r.rasterize(clip_pos, faces, (256, 256))      # RasterOutput: triangle_id, bary, depth
>>> img = r.interpolate(colors, out, faces)             # (B, H, W, C), differentiable w.r.t. colors
"""

from __future__ import annotations

import torch

from .base import Rasterizer, RasterOutput, interpolate_attributes
from .cameras import look_at, orthographic, perspective, perspective_from_opencv, to_clip
from .nvdiffrast_backend import NvdiffrastRasterizer, nvdiffrast_available
from .torch_backend import TorchRasterizer

BACKENDS = ("auto", "torch", "nvdiffrast")


def get_rasterizer(backend: str = "auto", device=None) -> Rasterizer:
    """Return a rasterizer.

    Args:
        backend: ``"auto"`` (nvdiffrast when it imports and CUDA is available, else torch), ``"torch"`` or
            ``"nvdiffrast"``.
        device: torch device; default ``cuda`` for nvdiffrast, else ``cuda`` when available for auto, ``cpu``
            otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown rasterizer backend {backend!r}; expected one of {BACKENDS}")
    dev = torch.device(device) if device is not None else None
    if backend == "auto":
        if (dev is None or dev.type == "cuda") and nvdiffrast_available():
            return NvdiffrastRasterizer(dev)
        if dev is None:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return TorchRasterizer(dev)
    if backend == "nvdiffrast":
        if not nvdiffrast_available():
            raise RuntimeError(
                "nvdiffrast backend requested but nvdiffrast.torch does not import or CUDA is unavailable "
                "(install the 'nvdiffrast' extra on a CUDA machine)"
            )
        return NvdiffrastRasterizer(dev)
    return TorchRasterizer(dev)


__all__ = [
    "BACKENDS",
    "NvdiffrastRasterizer",
    "RasterOutput",
    "Rasterizer",
    "TorchRasterizer",
    "get_rasterizer",
    "interpolate_attributes",
    "look_at",
    "nvdiffrast_available",
    "orthographic",
    "perspective",
    "perspective_from_opencv",
    "to_clip",
]
