"""Shared pytest fixtures: the reference material (see ``reference_files``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from reference_files import DATA_DIR, GSO_DIR, MISSING_MARK, REFERENCE_DIR, missing, require

# No test downloads anything: weights resolution stays on local files unless a test says otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{MISSING_MARK}(where): the parametrized fixture set is empty (skip, or fail in CI)"
    )


def pytest_runtest_setup(item):
    """A parameter that stands in for an empty fixture set skips, or fails under CRM_REQUIRE_REFERENCE,
    before any fixture (module-scoped ones included) is set up."""
    mark = item.get_closest_marker(MISSING_MARK)
    if mark is not None:
        missing(mark.args[0])


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """`$CRM_REFERENCE_DIR` (default ../shared/reference): golden fixtures and specs."""
    return require(REFERENCE_DIR)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """../shared/data: real example images, one training example, GSO sample."""
    return require(DATA_DIR)


@pytest.fixture(scope="session")
def gso_dir() -> Path:
    """../shared/data/gso_sample: GSO-30 ground truth (meshes, renders, cameras, rotation table)."""
    return require(GSO_DIR)
