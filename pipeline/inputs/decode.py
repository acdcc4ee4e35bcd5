"""Loading user images robustly: any common format/mode in, an RGBA ``PIL.Image`` out.

Every failure is an `ImageInputError` (a ``ValueError``) whose message names the source and the
problem: missing file, empty file, not an image, truncated or corrupt data, too many pixels
(decompression-bomb guard), fully transparent image. Unusual modes are converted, not rejected:

| input mode | conversion |
|---|---|
| 1, L, P, RGB, CMYK, YCbCr, LAB, HSV | to RGB, alpha 255 (P uses its palette transparency if any) |
| LA, PA, RGBa, La | to RGBA with the image's alpha |
| I;16 / I;16B / I;16L / I (16-bit grey) | rescaled 0..65535 -> 0..255 (round to nearest), alpha 255 |
| F (float grey) | [0, 1] data scaled by 255, otherwise clipped to [0, 255] |

EXIF orientation is applied (the pixels are rotated/flipped as a viewer shows them). Animated
files (GIF, APNG, WebP) use their first frame. A 1x1 image is valid and loads (it is a degenerate
but legal input; downstream resizing handles it).
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DEFAULT_MAX_PIXELS", "ImageInputError", "ImageLoadConfig", "has_foreground", "load_image"]

# 8192 x 8192: far above what the 256-pixel diffusion input needs, far below a bomb.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageInputError(ValueError):
    """An input image cannot be used; the message names the source and the reason."""


@dataclass
class ImageLoadConfig:
    """Options of `load_image`.

    Fields:
        max_pixels: refuse images with more pixels than this (decompression-bomb guard), checked
            from the header before any pixel data is decoded.
        apply_exif_orientation: rotate/flip according to the EXIF Orientation tag.
        require_foreground: raise "no foreground" for an image whose alpha is 0 everywhere.
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    apply_exif_orientation: bool = True
    require_foreground: bool = True


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def has_foreground(img: Image.Image) -> bool:
    """True if an RGBA/LA image has at least one pixel with alpha > 0 (or has no alpha)."""
    if "A" not in img.getbands():
        return True
    lo, hi = img.getchannel("A").getextrema()
    return hi > 0


def _to_rgba(img: Image.Image, what: str) -> Image.Image:
    mode = img.mode
    if mode == "RGBA":
        return img.copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGBA")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(np.rint(arr), nan=0.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGBA")
    if mode == "P":
        # convert("RGBA") honours the palette's tRNS transparency (index or per-entry alpha)
        return img.convert("RGBA")
    if mode in ("1", "L", "LA", "PA", "RGB", "RGBa", "La", "RGBX"):
        return img.convert("RGBA")
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB").convert("RGBA")
    try:
        return img.convert("RGBA")
    except (ValueError, OSError) as exc:
        raise ImageInputError(f"{what}: unsupported image mode {mode!r}: {exc}") from exc


def load_image(
    source: str | os.PathLike | bytes | bytearray | Image.Image,
    config: ImageLoadConfig | None = None,
    *,
    max_pixels: int | None = None,
) -> Image.Image:
    """Read an image file, bytes or PIL image and return a fully loaded RGBA ``PIL.Image``.

    Args:
        source: a path, the encoded file bytes, or a PIL image.
        config: options (`ImageLoadConfig`); ``max_pixels`` overrides ``config.max_pixels``.
    Returns:
        RGBA image (mode "RGBA", EXIF orientation applied, pixels decoded).
    Raises:
        ImageInputError: missing/empty/non-image/truncated/corrupt input, too many pixels, an
            unsupported mode, or (``require_foreground``) a fully transparent image.
    """
    cfg = config or ImageLoadConfig()
    limit = int(max_pixels if max_pixels is not None else cfg.max_pixels)
    what = _describe(source)

    if isinstance(source, Image.Image):
        img = source
        opened_here = False
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            if not data:
                raise ImageInputError(f"{what}: image data is empty (0 bytes)")
            fp = io.BytesIO(data)
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.exists():
                raise ImageInputError(f"{what}: image file not found")
            if not path.is_file():
                raise ImageInputError(f"{what}: not a regular file")
            if path.stat().st_size == 0:
                raise ImageInputError(f"{what}: image file is empty (0 bytes)")
            fp = path
        else:
            raise ImageInputError(f"{what}: expected a path, bytes or a PIL image")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp)
        except Image.DecompressionBombError as exc:
            raise ImageInputError(f"{what}: image is too large (decompression-bomb guard): {exc}") from exc
        except UnidentifiedImageError as exc:
            raise ImageInputError(f"{what}: not a recognised image format") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageInputError(f"{what}: cannot read image header: {exc}") from exc
        opened_here = True

    try:
        rgba = _decode_to_rgba(img, what, limit, cfg, seek_first=opened_here)
    finally:
        if opened_here:
            img.close()  # release the file handle on success and on failure
    if cfg.require_foreground and not has_foreground(rgba):
        raise ImageInputError(
            f"{what}: no foreground: the image is fully transparent (alpha is 0 everywhere)"
        )
    return rgba


def _decode_to_rgba(
    img: Image.Image, what: str, limit: int, cfg: ImageLoadConfig, seek_first: bool
) -> Image.Image:
    """Size guard, full decode (errors -> ImageInputError), EXIF orientation, mode conversion."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageInputError(f"{what}: image has no pixels ({w}x{h})")
    if w * h > limit:
        raise ImageInputError(
            f"{what}: image is too large: {w}x{h} = {w * h} pixels exceeds the limit of {limit} "
            "(raise max_pixels if this is intended)"
        )
    try:
        if seek_first:
            img.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{what}: image is too large (decompression-bomb guard): {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            raise ImageInputError(f"{what}: image data is truncated (incomplete file): {msg}") from exc
        raise ImageInputError(f"{what}: image data is corrupt: {msg}") from exc
    except Exception as exc:  # decoders raise assorted types for garbage data (zlib.error, struct.error, ...)
        raise ImageInputError(f"{what}: image data is corrupt: {type(exc).__name__}: {exc}") from exc

    oriented = img
    if cfg.apply_exif_orientation:
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception as exc:  # a broken EXIF block must not make a readable image unusable
            warnings.warn(f"{what}: ignoring unreadable EXIF orientation ({exc})", stacklevel=3)
    return _to_rgba(oriented, what)
