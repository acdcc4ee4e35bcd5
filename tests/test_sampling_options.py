"""The sampler options through every entry point: pipeline stages, CLI, the batch backend of the flow."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

import crm_models.multiview.sampler as sampler_module
from pipeline.options import SAMPLERS
from pipeline.samples import sample_image


class _Stop(Exception):
    """Raised by the spy once a stage has called the sampler (the sampling itself is tested elsewhere)."""


@pytest.fixture
def sampler_calls(monkeypatch):
    """(stage, sampler, num_steps, guidance) of every `MultiViewSampler.sample` call; the stage then stops."""
    calls: list[tuple[int, str, int, float]] = []

    def spy(self, images, *, options=None, **kwargs):
        calls.append((self.stage, options.sampler, options.num_steps, options.guidance_scale))
        raise _Stop

    monkeypatch.setattr(sampler_module.MultiViewSampler, "sample", spy)
    return calls


def _image() -> Image.Image:
    return Image.open(sample_image("lion"))


def test_pipeline_stages_run_the_chosen_sampler(tiny_pipeline, sampler_calls):
    """Both diffusion stages of the pipeline call the sampler with the options' sampler, steps and
    guidance (what each sampler then does is tested in test_multiview_sampler.py and test_solvers.py)."""
    img = tiny_pipeline.preprocess(_image())
    r = tiny_pipeline.stage2.config.sampler.image_size
    views = np.zeros((r, 6 * r, 3), np.uint8)
    for name in SAMPLERS:
        pipe = tiny_pipeline.with_options(
            sampler=name, steps_stage1=20, steps_stage2=10, guidance_scale=4.0, guidance_scale_stage2=3.0
        )
        with pytest.raises(_Stop):
            pipe.generate_views([img], [5])
        with pytest.raises(_Stop):
            pipe.generate_ccms([img], [views], [5])
    assert sampler_calls == [c for name in SAMPLERS for c in ((1, name, 20, 4.0), (2, name, 10, 3.0))]


def test_cli_passes_sampler_and_steps_to_the_pipeline(tmp_path, capsys, monkeypatch):
    """``python -m pipeline --sampler unipc --steps 12`` loads the pipeline with those options."""
    from pipeline.__main__ import main
    from pipeline.image_to_mesh import ImageToMeshPipeline

    seen = []

    def load(weights, options=None, **kwargs):
        seen.append(options)
        raise RuntimeError("stop after the options")

    monkeypatch.setattr(ImageToMeshPipeline, "load", staticmethod(load))
    src = tmp_path / "in.png"
    _image().save(src)
    argv = [str(src), "--out", str(tmp_path / "out"), "--weights", "tiny-random", "--device", "cpu"]
    assert main([*argv, "--sampler", "unipc", "--steps", "12"]) == 2
    assert "stop after the options" in capsys.readouterr().err
    assert (seen[0].sampler, seen[0].steps_stage1, seen[0].steps_stage2) == ("unipc", 12, 12)
    assert main([*argv, "--sampler", "dpmpp", "--steps", "60"]) == 2  # solvers: at most 50 grid points
    assert "at most 50" in capsys.readouterr().err and len(seen) == 1


def test_batch_backend_takes_the_flow_options():
    """The flow hands its ``options`` dict to ``CRMBackend`` (what every Ray worker unpickles and loads)."""
    from flows.ray_job.backends import CRMBackend

    options = {"sampler": "dpmpp", "steps": 12, "texture_size": 64, "device": "cpu"}
    backend = pickle.loads(pickle.dumps(CRMBackend("tiny-random", options)))
    assert backend.options_hash() != CRMBackend("tiny-random", {**options, "sampler": "ddim"}).options_hash()
    loaded = backend.load().options
    assert (loaded.sampler, loaded.steps_stage1, loaded.steps_stage2) == ("dpmpp", 12, 12)
