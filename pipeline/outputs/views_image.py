"""The ``views.png`` contact sheet: the six generated RGB views above their six CCMs.

Layout (R = view size): a (2R) x (6R) RGB image; row 0 is the stage-1 strip, row 1 the stage-2
(CCM) strip, both exactly as handed to reconstruction, i.e. left to right the views with dataset
indices 001, 002, 003, 004, 005, 000 (left, bottom, back, right, top, front) — the official
``run.py`` order. CCM pixels are in PNG channel order (R, G, B) = (X, Y, Z).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from crm_models.views import VIEW_ORDER


def check_strip(strip: np.ndarray, what: str = "strip") -> int:
    """Validate a (R, 6R, 3) uint8 strip and return R."""
    if not isinstance(strip, np.ndarray) or strip.dtype != np.uint8 or strip.ndim != 3 or strip.shape[2] != 3:
        raise ValueError(f"{what}: expected a (R, 6R, 3) uint8 array, got {getattr(strip, 'shape', None)}")
    r = strip.shape[0]
    if strip.shape[1] != 6 * r:
        raise ValueError(f"{what}: width {strip.shape[1]} is not 6 x height {r}")
    return r


def views_sheet(views_strip: np.ndarray, ccm_strip: np.ndarray) -> np.ndarray:
    """Stack the RGB strip above the CCM strip -> (2R, 6R, 3) uint8."""
    r1 = check_strip(views_strip, "views strip")
    r2 = check_strip(ccm_strip, "CCM strip")
    if r1 != r2:
        raise ValueError(f"views strip ({r1}) and CCM strip ({r2}) have different view sizes")
    return np.concatenate([views_strip, ccm_strip], axis=0)


def strip_to_views(strip: np.ndarray) -> np.ndarray:
    """Split a strip into its six views in strip order -> (6, R, R, 3)."""
    r = check_strip(strip)
    return np.stack([strip[:, i * r : (i + 1) * r] for i in range(6)])


def strip_to_file_order(strip: np.ndarray) -> np.ndarray:
    """Views in dataset order 000..005 (front, left, bottom, back, right, top) -> (6, R, R, 3)."""
    views = strip_to_views(strip)
    return views[[VIEW_ORDER.index(i) for i in range(6)]]


def views_png_bytes(views_strip: np.ndarray, ccm_strip: np.ndarray) -> bytes:
    """PNG-encoded `views_sheet` (lossless)."""

    buf = io.BytesIO()
    Image.fromarray(views_sheet(views_strip, ccm_strip), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
