"""The demo's sample manifest, generated at run time from the bundled CRM example images.

The images live in the shared reference data (``<repo>/../shared/data/crm_examples/examples/*.webp``,
or ``$CRM_SHARED_DIR/data/crm_examples/examples``); :func:`write_sample_manifest` writes a Parquet
input manifest referencing them by absolute path, one row per image, id = file stem.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.manifest import make_input_table, write_input_manifest

REPO_ROOT = Path(__file__).resolve().parents[2]


def examples_dir() -> Path:
    """Folder of the example images (``$CRM_SHARED_DIR`` overrides ``<repo>/../shared``)."""
    shared = Path(os.environ.get("CRM_SHARED_DIR", REPO_ROOT.parent / "shared"))
    return shared / "data" / "crm_examples" / "examples"


def safe_id(stem: str) -> str:
    """A file stem made safe as an object id (other characters become ``_``)."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")
    return out[:128] or "image"


def write_sample_manifest(uri: str, limit: int | None = None, folder: str | os.PathLike | None = None) -> int:
    """Write the sample manifest to ``uri``; returns its number of rows.

    Args:
        uri: where to write it (any fsspec URI).
        limit: only the first N images (sorted by name); None = all.
        folder: image folder (default :func:`examples_dir`).
    """
    src = Path(folder) if folder is not None else examples_dir()
    images = sorted(p for p in src.glob("*") if p.suffix.lower() in (".webp", ".png", ".jpg", ".jpeg"))
    if not images:
        raise FileNotFoundError(
            f"no example images found in {src} (set CRM_SHARED_DIR to the folder holding data/crm_examples)"
        )
    if limit:
        images = images[:limit]
    ids = [safe_id(p.stem) for p in images]
    write_input_manifest(make_input_table(ids, [str(p.resolve()) for p in images]), uri)
    return len(images)
