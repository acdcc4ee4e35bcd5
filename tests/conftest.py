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


@pytest.fixture(scope="session")
def tiny_models():
    """The three seeded random tiny networks (`CRMModels`, CPU), built once per test session."""
    from pipeline.options import PipelineOptions
    from pipeline.weights import resolve_weights
    from pipeline.weights.models import load_models

    return load_models(resolve_weights("tiny-random"), PipelineOptions(device="cpu"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_models):
    """`ImageToMeshPipeline` over `tiny_models` with small CPU settings; tests change options with
    ``tiny_pipeline.with_options(...)`` (the components are shared, never reloaded)."""
    from pipeline.image_to_mesh import ImageToMeshPipeline
    from pipeline.options import PipelineOptions
    from pipeline.weights import resolve_weights

    options = PipelineOptions(
        steps_stage1=1, steps_stage2=1, texture_size=64, preview_size=32, device="cpu", batch_size=3, seed=11
    )
    m = tiny_models
    return ImageToMeshPipeline(m.stage1, m.stage2, m.recon, options, resolve_weights("tiny-random").identity)
