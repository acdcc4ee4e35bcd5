"""Shared pytest fixtures: where the reference material lives, and thread settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CRM_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_DIR = Path(os.environ.get("CRM_REFERENCE_DIR", SHARED_DIR / "reference"))
DATA_DIR = SHARED_DIR / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference material not found: {path} (set CRM_SHARED_DIR / CRM_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """`$CRM_REFERENCE_DIR` (default ../shared/reference): golden fixtures and specs."""
    return _require(REFERENCE_DIR)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data: real example images, one training example, GSO sample."""
    return _require(DATA_DIR)


def recon_fixtures() -> list[Path]:
    """Every `*.npz` in `$CRM_REFERENCE_DIR/recon` (new fixtures are picked up without code changes)."""
    return sorted((REFERENCE_DIR / "recon").glob("*.npz"))


def multiview_fixtures(pattern: str = "*.npz") -> list[Path]:
    """Every matching `*.npz` in `$CRM_REFERENCE_DIR/multiview`."""
    return sorted((REFERENCE_DIR / "multiview").glob(pattern))
