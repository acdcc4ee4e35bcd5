"""One input as the pipeline receives it: a path or encoded bytes -> decoded image + its description."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.inputs.decode import load_image

__all__ = ["image_info", "load_source", "read_source", "source_name"]

Source = str | os.PathLike | bytes | bytearray | memoryview


def read_source(src: Source) -> bytes:
    """The encoded bytes of a path or bytes-like input."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    return Path(src).read_bytes()


def source_name(src: Source) -> str:
    """How reports name an input: its path, or ``<bytes>``."""
    return "<bytes>" if isinstance(src, (bytes, bytearray, memoryview)) else str(src)


def image_info(img: Image.Image, name: str, data: bytes | None = None) -> dict[str, Any]:
    """Name, size, mode and (when the encoded bytes are known) sha256 of an input image (for meta.json)."""
    info: dict[str, Any] = {"name": name, "width": img.width, "height": img.height, "mode": img.mode}
    if data is not None:
        info["sha256"] = hashlib.sha256(data).hexdigest()
    return info


def load_source(data: bytes, name: str) -> tuple[Image.Image, dict[str, Any]]:
    """Decode encoded image bytes (``ImageInputError`` on a bad image) and describe them."""
    img = load_image(data)
    return img, image_info(img, name, data)
