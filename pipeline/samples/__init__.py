"""Sample inputs shipped with the package: twelve 256x256 RGBA renders of Google Scanned Objects.

Used by ``make demo`` (``python -m flows.demo``), the CLI examples and the tests, so that a fresh
clone or a ``pip install`` runs end to end with nothing beside it. Licence and attribution
(CC-BY 4.0, Google LLC): ``ATTRIBUTION.md`` in this folder.
"""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parent
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg")


def sample_images(limit: int | None = None) -> list[Path]:
    """The sample images, sorted by name (the first `limit` when given)."""
    images = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return images[:limit] if limit else images


def sample_image(name: str) -> Path:
    """One sample by stem, e.g. ``sample_image("teapot")``."""
    path = SAMPLES_DIR / f"{name}.png"
    if not path.is_file():
        names = ", ".join(p.stem for p in sample_images())
        raise FileNotFoundError(f"no sample image {name!r}; available: {names}")
    return path
