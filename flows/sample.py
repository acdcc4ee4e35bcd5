"""The demo's input manifest: one row per bundled sample image (``pipeline.samples``).

:func:`write_sample_manifest` writes a Parquet input manifest referencing the images by absolute
path, one row per image, id = file stem.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.io.manifest import make_input_table, write_input_manifest
from pipeline.inputs.ids import default_ids
from pipeline.samples import IMAGE_SUFFIXES, sample_images


def write_sample_manifest(uri: str, limit: int | None = None, folder: str | os.PathLike | None = None) -> int:
    """Write the sample manifest to ``uri``; returns its number of rows.

    Args:
        uri: where to write it (any fsspec URI).
        limit: only the first N images (sorted by name); None = all.
        folder: an image folder instead of the bundled samples.
    """
    if folder is None:
        images = sample_images(limit)
    else:
        found = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images = found[: limit or None]
    if not images:
        raise FileNotFoundError(f"no images found in {folder}")
    ids = default_ids(images)
    write_input_manifest(make_input_table(ids, [str(p.resolve()) for p in images]), uri)
    return len(images)
