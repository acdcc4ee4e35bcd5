"""Object ids: the one rule for turning a file name into an output folder name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ID_PATTERN", "MAX_ID_LENGTH", "default_ids", "is_safe_id", "safe_id"]

MAX_ID_LENGTH = 128
# A folder-safe id: no path separators, no leading dot (hidden/temporary names), bounded length.
ID_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_LENGTH - 1}}}$")


def is_safe_id(obj_id: str) -> bool:
    """True when `obj_id` can name an output folder as it is."""
    return bool(ID_PATTERN.match(obj_id)) and obj_id not in (".", "..")


def safe_id(name: str) -> str:
    """`name` made folder-safe: other characters become ``_``, leading ``._-`` dropped, at most 128."""
    out = "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "_" for c in name)
    out = out.lstrip("._-") or "image"
    return out[:MAX_ID_LENGTH]


def default_ids(sources: Sequence[Any]) -> list[str]:
    """File stems (made folder-safe and unique with ``-2``, ``-3`` ...), ``image-<i>`` for bytes."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        base = f"image-{i}" if isinstance(src, (bytes, bytearray, memoryview)) else safe_id(Path(src).stem)
        n = seen.get(base, 0) + 1
        seen[base] = n
        ids.append(base if n == 1 else f"{base}-{n}")
    return ids
