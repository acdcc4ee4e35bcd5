"""The preprocessed input as the quality checks see it: a small RGBA image in the front view's framing.

The preprocessing (``pipeline.inputs.preprocess``) hands the models a square RGB image: the object
composited over a flat background colour (grey 127). Its mask is recovered here as every pixel that
differs from that colour, at full resolution, then both colours and mask are box-filtered down to the
carried size (alpha = covered fraction of each output pixel). On the 12 bundled samples this mask agrees
with the images' own alpha (>= 0.5) with an IoU of at least 0.998; it misses only object pixels of exactly
the background colour, which real photographs and renders rarely have. An input without transparency
(an opaque photograph, ``background="none"``) comes out all foreground, which the checks detect
(``QCConfig.min_background_fraction``).

The pipeline produces this image once per object (``GeneratedObject.input_rgba``), so it travels with
the generated object to wherever ``finalize`` runs.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["QC_INPUT_SIZE", "qc_input_image", "split_input"]

#: Side of the carried input image (pixels); the checks resample it to ``QCConfig.resolution``.
QC_INPUT_SIZE = 256


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) float32 -> (size, size, C) float32: box filter when shrinking, bilinear when growing
    (one channel at a time: PIL's float mode)."""
    h, w = arr.shape[:2]
    if (h, w) == (size, size):
        return arr
    method = Image.Resampling.BOX if min(h, w) >= size else Image.Resampling.BILINEAR
    chans = [Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F") for c in range(arr.shape[2])]
    return np.stack([np.asarray(ch.resize((size, size), method)) for ch in chans], axis=-1)


def qc_input_image(
    preprocessed, size: int = QC_INPUT_SIZE, background: tuple[int, int, int] = (127, 127, 127)
) -> np.ndarray:
    """Preprocessed input -> the RGBA image the checks compare renders with.

    Args:
        preprocessed: the square RGB image the models received (PIL image or (H, W, 3) uint8), the
            object over the flat `background` colour (a non-square image is centred on a square of
            that colour first, as the preprocessing does).
        size: output side S.
        background: the preprocessing's background colour (RGB 0..255).

    Returns:
        (S, S, 4) uint8: box-filtered colours and the covered fraction of each pixel as alpha.
    """
    rgb = np.asarray(preprocessed.convert("RGB") if isinstance(preprocessed, Image.Image) else preprocessed)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    if h != w:
        side = max(h, w)
        square = np.empty((side, side, 3), np.uint8)
        square[:] = np.asarray(background, dtype=np.uint8)
        top, left = (side - h) // 2, (side - w) // 2
        square[top : top + h, left : left + w] = rgb
        rgb = square
    mask = (rgb != np.asarray(background, dtype=np.uint8)).any(axis=-1)
    # uint8 resampling in PIL (RGB and mask apart: PIL would premultiply an RGBA image by its alpha)
    side, size = rgb.shape[0], int(size)
    method = Image.Resampling.BOX if side >= size else Image.Resampling.BILINEAR
    small_rgb = Image.fromarray(rgb, mode="RGB").resize((size, size), method)
    small_mask = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((size, size), method)
    return np.dstack([np.asarray(small_rgb), np.asarray(small_mask)])


def split_input(rgba: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Carried RGBA input -> ``(rgb (S, S, 3), alpha (S, S))`` float32 in [0, 1] at side ``size``."""
    arr = np.asarray(rgba)
    if arr.ndim != 3 or arr.shape[2] != 4 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"expected a square (S, S, 4) RGBA image, got {arr.shape}")
    out = _resize(arr.astype(np.float32), int(size)) / 255.0
    out = np.clip(out, 0.0, 1.0)
    return out[..., :3], out[..., 3]
