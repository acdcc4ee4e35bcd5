"""The six generated views, defined once: their dataset indices, names and their order in every strip.

Both diffusion stages generate, and reconstruction consumes, strips whose slices are the views with
dataset indices 001, 002, 003, 004, 005, 000 left to right (the official ``run.py`` order).
"""

from __future__ import annotations

#: Name of each dataset view index 0..5.
VIEW_NAMES: tuple[str, ...] = ("front", "left", "bottom", "back", "right", "top")
#: Dataset view index of each strip slice, left to right (left, bottom, back, right, top, front).
VIEW_ORDER: tuple[int, ...] = (1, 2, 3, 4, 5, 0)
#: Name of each strip slice, left to right.
STRIP_VIEW_NAMES: tuple[str, ...] = tuple(VIEW_NAMES[i] for i in VIEW_ORDER)
