"""Image metrics for novel-view evaluation: compositing, PSNR, SSIM (scikit-image compatible).

Images are float tensors in [0, 1], batched ``(B, H, W, 3)`` (channels last, as read from PNG).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["load_rgba", "composite_white", "load_views", "psnr", "ssim", "gaussian_window"]


def load_rgba(path: str | Path) -> np.ndarray:
    """PNG -> ``(H, W, 4)`` float32 in [0, 1] (opaque alpha added for RGB files)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0


def composite_white(rgba: np.ndarray | torch.Tensor):
    """``(..., 4)`` RGBA -> ``(..., 3)`` RGB over white: ``rgb * a + (1 - a)``."""
    rgb, a = rgba[..., :3], rgba[..., 3:4]
    return rgb * a + (1 - a)


def load_views(folder: str | Path, count: int = 16) -> np.ndarray:
    """``folder/000.png .. folder/{count-1:03d}.png`` composited on white -> ``(count, H, W, 3)`` float32.

    Raises:
        FileNotFoundError: a view is missing (the message names it).
    """
    folder = Path(folder)
    out = []
    for i in range(count):
        p = folder / f"{i:03d}.png"
        if not p.is_file():
            raise FileNotFoundError(f"missing render {p}")
        out.append(composite_white(load_rgba(p)))
    return np.stack(out)


def _bhwc(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float64)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4:
        raise ValueError(f"expected images (B, H, W, C) or (H, W, C), got shape {tuple(t.shape)}")
    return t


def psnr(pred, gt, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image.

    Args:
        pred, gt: ``(B, H, W, C)`` (or ``(H, W, C)``) in [0, data_range].

    Returns:
        ``(B,)`` float64 dB (inf for identical images).
    """
    p, g = _bhwc(pred), _bhwc(gt)
    mse = ((p - g) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse)


def gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> torch.Tensor:
    """1-D normalised Gaussian of radius ``int(truncate * sigma + 0.5)`` (scipy's gaussian_filter kernel)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(pred, gt, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03):
    """Structural similarity, matching ``skimage.metrics.structural_similarity(..., channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)``.

    Gaussian window 11 x 11 (sigma 1.5, truncated at 3.5 sigma); local statistics are taken only where
    the whole window fits (scikit-image filters the padded image and then crops ``(win - 1) / 2``
    pixels, which is the same). Mean over the valid SSIM map and the channels. torchmetrics >= 1.4.3
    averages over the padded border as well and reports slightly different (higher) values.

    Args:
        pred, gt: ``(B, H, W, C)`` (or ``(H, W, C)``), ``H, W >= 11``.

    Returns:
        ``(B,)`` float64.
    """
    p, g = _bhwc(pred), _bhwc(gt)
    b, h, w, c = p.shape
    win = gaussian_window(sigma)
    k = win.numel()
    if h < k or w < k:
        raise ValueError(f"images must be at least {k}x{k} for SSIM, got {h}x{w}")
    kv = win.view(1, 1, k, 1).repeat(c, 1, 1, 1)
    kh = win.view(1, 1, 1, k).repeat(c, 1, 1, 1)

    def filt(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, "valid" region only
        return F.conv2d(F.conv2d(x.permute(0, 3, 1, 2), kv, groups=c), kh, groups=c)

    mx, my = filt(p), filt(g)
    sxx = filt(p * p) - mx * mx
    syy = filt(g * g) - my * my
    sxy = filt(p * g) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)
