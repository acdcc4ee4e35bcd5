"""Reference-image preprocessing before the diffusion stages (CRM's ``preprocess_image``).

Steps (``background_mode="alpha"``, the path every shipped example takes), all on PIL images:

1. foreground mask: the image's own alpha (alpha-composited onto transparent black, which zeroes
   the colour of fully transparent pixels);
2. ``foreground_ratio`` != 1: the whole RGBA image is scaled by the ratio (PIL default resampling,
   bicubic) and pasted centred (integer floor offsets) on a transparent canvas of the original
   size; with ``recenter=True`` the image is first cropped to the alpha bounding box (a
   project extension, off by default);
3. expand to square: centred on a transparent square canvas (floor offsets);
4. alpha-composite over an opaque background colour (default grey (127, 127, 127)) and convert to
   RGB at full resolution (CLIP and the VAE resize it themselves).

Background modes:

- ``"auto"``: the official default: use the alpha when the image has a real one (minimum alpha
  < 255), otherwise run rembg (which must be installed and have its model locally).
- ``"alpha"``: always use the alpha channel. An image without transparency (RGB, or RGBA that is
  opaque everywhere) is taken as all foreground: it is squared and padded with the background
  colour (rembg is never called).
- ``"rembg"``: always estimate the mask with rembg (optional extra ``rembg[cpu]``). Fails with a
  clear `BackgroundRemovalError` when rembg is not installed or its ONNX model is not on disk
  (nothing is downloaded).
- ``"none"``: no mask: the image is flattened to RGB as-is (alpha dropped), then squared with the
  background colour and scaled by ``foreground_ratio``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.inputs.decode import ImageInputError, has_foreground

__all__ = [
    "BACKGROUND_MODES",
    "BackgroundRemovalError",
    "PreprocessConfig",
    "expand_to_square",
    "find_rembg_model",
    "preprocess_image",
    "remove_background_rembg",
    "resize_content",
    "to_uint8_array",
]

BACKGROUND_MODES = ("auto", "alpha", "rembg", "none")


class BackgroundRemovalError(RuntimeError):
    """rembg is unavailable (not installed, model not on disk) or failed."""


@dataclass
class PreprocessConfig:
    """Options of `preprocess_image` (defaults reproduce CRM's run.py).

    Fields:
        background_mode: "auto" | "alpha" | "rembg" | "none" (see the module docstring).
        foreground_ratio: in (0, 1]; content scale inside the canvas (1.0 = unchanged).
        background_color: RGB 0..255 of the final background (CRM: (127, 127, 127)).
        recenter: crop to the foreground bounding box before scaling and squaring (extension;
            the reference does not do this).
        rembg_model: rembg session name (CRM uses rembg's classic default, "u2net").
    """

    background_mode: str = "auto"
    foreground_ratio: float = 1.0
    background_color: tuple[int, int, int] = (127, 127, 127)
    recenter: bool = False
    rembg_model: str = "u2net"

    def __post_init__(self) -> None:
        if self.background_mode not in BACKGROUND_MODES:
            raise ValueError(
                f"background_mode must be one of {BACKGROUND_MODES}, got {self.background_mode!r}"
            )
        ratio = float(self.foreground_ratio)
        if not (0.0 < ratio <= 1.0):
            raise ValueError(f"foreground_ratio must be in (0, 1], got {self.foreground_ratio}")
        color = tuple(int(c) for c in self.background_color)
        if len(color) != 3 or any(c < 0 or c > 255 for c in color):
            raise ValueError(f"background_color must be 3 ints in 0..255, got {self.background_color!r}")
        self.background_color = color  # type: ignore[assignment]


def resize_content(img: Image.Image, ratio: float, fill=(0, 0, 0, 0)) -> Image.Image:
    """Scale the whole image by ``ratio`` (PIL default bicubic) and paste it centred on a canvas of
    the original size and mode filled with ``fill`` (default transparent); identity for ratio 1."""
    if ratio == 1:
        return img
    new_size = tuple(max(1, int(d * ratio)) for d in img.size)
    small = img.resize(new_size)
    canvas = Image.new(img.mode, img.size, fill)
    canvas.paste(small, ((img.width - small.width) // 2, (img.height - small.height) // 2))
    return canvas


def expand_to_square(img: Image.Image, fill=(0, 0, 0, 0)) -> Image.Image:
    """Pad to a square (side = the longer side), image centred with integer floor offsets."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def _rembg_model_candidates(name: str) -> list[Path]:
    """Where rembg looks for ``<name>.onnx`` without downloading (current and legacy layouts)."""
    fname = f"{name}.onnx"
    xdg = os.environ.get("XDG_DATA_HOME")
    u2net_home = os.environ.get("U2NET_HOME")
    legacy = Path(os.path.expanduser(u2net_home or os.path.join(xdg or "~", ".u2net")))
    if u2net_home:
        home = legacy
    else:
        default = os.path.join(xdg, "rembg") if xdg else os.path.join("~", ".rembg")
        home = Path(os.path.expanduser(os.environ.get("REMBG_HOME", default)))
    return [home / "models" / name / fname, legacy / fname]


def find_rembg_model(name: str = "u2net") -> Path | None:
    """The local ONNX file rembg would use for session ``name``, or None if it is not on disk."""
    for path in _rembg_model_candidates(name):
        if path.is_file() and path.stat().st_size > 0:
            return path
    return None


# rembg sessions by model file: loading one costs seconds, and a different file is a different session.
_REMBG_SESSIONS: dict[str, object] = {}


def remove_background_rembg(img: Image.Image, model: str = "u2net") -> Image.Image:
    """Foreground mask with rembg -> RGBA. Never downloads: the model must already be on disk."""
    try:
        import rembg
    except Exception as exc:  # ImportError, or rembg's own SystemExit-like failures without onnxruntime
        raise BackgroundRemovalError(
            "background removal needs the optional extra 'rembg[cpu]' (pip install 'crm-batch[rembg]'); "
            f"it could not be imported ({type(exc).__name__}: {exc}). Alternatively give an RGBA image "
            "with a real alpha channel and use background_mode='alpha', or background_mode='none'."
        ) from exc
    model_file = find_rembg_model(model)
    if model_file is None:
        searched = ", ".join(str(p) for p in _rembg_model_candidates(model))
        raise BackgroundRemovalError(
            f"rembg model {model!r} is not available offline: none of [{searched}] exists. Place "
            f"{model}.onnx there (or set REMBG_HOME / U2NET_HOME), or use background_mode='alpha'/'none'."
        )
    try:
        session = _REMBG_SESSIONS.get(str(model_file))
        if session is None:
            session = _REMBG_SESSIONS[str(model_file)] = rembg.new_session(model)
        out = rembg.remove(img.convert("RGB"), session=session)
    except Exception as exc:
        raise BackgroundRemovalError(f"rembg ({model}) failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, Image.Image):
        raise BackgroundRemovalError(f"rembg returned {type(out).__name__}, expected a PIL image")
    return out.convert("RGBA")


def _has_real_alpha(img: Image.Image) -> bool:
    return img.mode == "RGBA" and img.getchannel("A").getextrema()[0] < 255


def _crop_to_foreground(img: Image.Image) -> Image.Image:
    bbox = img.getchannel("A").getbbox()
    return img.crop(bbox) if bbox else img


def preprocess_image(img: Image.Image, config: PreprocessConfig | None = None) -> Image.Image:
    """Reference image (any PIL mode; RGBA from `pipeline.inputs.decode.load_image`) -> square RGB image.

    Returns:
        RGB ``PIL.Image`` of side max(W, H) (the input resolution is kept).
    Raises:
        ImageInputError: the mask is empty ("no foreground").
        BackgroundRemovalError: rembg needed but unavailable or failing.
    """
    cfg = config or PreprocessConfig()
    bg = tuple(cfg.background_color)
    mode = cfg.background_mode
    if mode == "none":
        rgb = img.convert("RGBA").convert("RGB") if img.mode == "P" else img.convert("RGB")
        return resize_content(expand_to_square(rgb, bg), float(cfg.foreground_ratio), bg)

    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    if mode == "rembg" or (mode == "auto" and not _has_real_alpha(rgba)):
        rgba = remove_background_rembg(rgba, cfg.rembg_model)
    else:
        rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 0)), rgba)
    if not has_foreground(rgba):
        raise ImageInputError("no foreground: the mask is empty (fully transparent image)")
    if cfg.recenter:
        rgba = expand_to_square(_crop_to_foreground(rgba))
    rgba = resize_content(rgba, float(cfg.foreground_ratio))
    rgba = expand_to_square(rgba)
    background = Image.new("RGBA", rgba.size, (*bg, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_uint8_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> (H, W, 3) uint8 array."""
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
