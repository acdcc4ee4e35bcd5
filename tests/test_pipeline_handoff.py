"""Hand-offs between the stages, checked against the reference fixtures (no diffusion sampling).

* the tiny-random preset's configs equal the fixtures' configs;
* the strip a stage returns is the official run.py concatenation (views 001..005, 000) and is what
  stage 2 and the reconstruction model receive, unchanged (no reorder, no channel swap in between);
* the pipeline's reconstruction step, fed the fixture strips and noise, gives the fixture mesh.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from reference_files import REFERENCE_DIR, require

RECON = REFERENCE_DIR / "recon" / "tiny_case_a.npz"
STAGE1 = REFERENCE_DIR / "multiview" / "tiny_stage1_case_a.npz"
STAGE2 = REFERENCE_DIR / "multiview" / "tiny_stage2_case_a.npz"
CLIP = REFERENCE_DIR / "multiview" / "tiny_clip_case_a.npz"


def _load(path):
    return np.load(require(path))


def _cfg(d) -> dict:
    return json.loads(str(d["config_json"]))


def _oriented_faces(verts, faces, decimals: int = 3) -> set:
    """Faces as cyclically normalised triples of rounded positions (keeps the winding)."""
    pos = [tuple(p) for p in np.round(np.asarray(verts, np.float64), decimals)]
    out = set()
    for f in np.asarray(faces):
        tri = [pos[i] for i in f]
        k = min(range(3), key=lambda j: tri[j])
        out.add(tuple(tri[k:] + tri[:k]))
    return out


# ------------------------------------------------------------------------------- tiny configs
def test_tiny_recon_config_equals_fixture():
    from crm_models.recon.config import ReconConfig
    from pipeline.weights.tiny_configs import TINY_RECON_CONFIG

    ours = ReconConfig.from_fixture_config(TINY_RECON_CONFIG)
    ref = ReconConfig.from_fixture_config(_cfg(_load(RECON)))
    assert dataclasses.replace(ours, name="x") == dataclasses.replace(ref, name="x")
    assert (ours.plane_resolution, ours.decoder.grid_res) == (64, 16)


@pytest.mark.parametrize("stage", [1, 2])
def test_tiny_stage_configs_equal_fixture(stage):
    from pipeline.weights.tiny_configs import TINY_STAGE1_CONFIG, TINY_STAGE2_CONFIG

    ref = _cfg(_load(STAGE1 if stage == 1 else STAGE2))
    ours = TINY_STAGE1_CONFIG if stage == 1 else TINY_STAGE2_CONFIG
    rp, op = ref["model"]["params"], ours["model"]["params"]
    assert op["unet_config"] == rp["unet_config"]
    ref_vae = {k: v for k, v in rp["vae_config"]["params"].items() if k in ("embed_dim", "ddconfig")}
    assert op["vae_config"]["params"] == ref_vae
    for key in ("linear_start", "linear_end", "timesteps", "scale_factor", "parameterization", "zero_snr"):
        assert op[key] == rp[key], key
    # the sampler settings match except the step count (the fixture ran 4 steps; the preset
    # defaults to the official 50 and the pipeline options override it anyway)
    assert {k: v for k, v in ours["sampler"].items() if k != "ddim_steps"} == {
        k: v for k, v in ref["sampler"].items() if k != "ddim_steps"
    }


def test_tiny_clip_config_equals_fixture():
    from pipeline.weights.tiny_configs import TINY_CLIP_CONFIG

    assert TINY_CLIP_CONFIG == _cfg(_load(CLIP))["open_clip_model_cfg"]


def test_tiny_recon_model_takes_the_fixture_state_dict():
    """Same architecture: the fixture's full state dict loads strictly into the preset's model."""
    from pipeline.weights.recon import load_recon_weights
    from pipeline.weights.tiny import build_tiny_recon

    d = _load(RECON)
    sd = {k[3:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd/")}
    load_recon_weights(build_tiny_recon(seed=0), sd)


# ------------------------------------------------------------------------------- strips
def test_stage_strips_are_the_run_py_concatenation_and_feed_stage2():
    from crm_models.multiview.sampler import strips_to_views, views_to_strips

    s1, s2 = _load(STAGE1), _load(STAGE2)
    views1 = torch.from_numpy(s1["output/stage1_images_uint8"])  # (6, R, R, 3), frame order 1,2,3,4,5,0
    strip1 = views_to_strips(views1[None])[0].numpy()
    assert np.array_equal(strip1, s1["output/stage1_concat_uint8"])
    # stage 2 receives the stage-1 strip and splits it back into the views it was recorded with
    back = strips_to_views(torch.from_numpy(strip1)[None])[0].numpy()
    assert np.array_equal(back, s2["cond/pixel_images_uint8"])
    strip2 = views_to_strips(torch.from_numpy(s2["output/stage2_images_uint8"])[None])[0].numpy()
    assert np.array_equal(strip2, s2["output/stage2_concat_uint8"])


def test_views_png_order_matches_recon_fixture_file_order():
    from pipeline.outputs.views_image import strip_to_file_order, views_sheet

    d = _load(RECON)
    assert np.array_equal(strip_to_file_order(d["input_rgb_strip"]), d["input_views_rgb_uint8"])
    assert np.array_equal(strip_to_file_order(d["input_ccm_strip"]), d["input_views_ccm_uint8"])
    sheet = views_sheet(d["input_rgb_strip"], d["input_ccm_strip"])
    assert np.array_equal(sheet[64:], d["input_ccm_strip"])  # CCMs stored as generated (RGB = XYZ)


def test_pipeline_preprocess_matches_fixture():
    from PIL import Image

    from pipeline.image_to_mesh import preprocess
    from pipeline.options import PipelineOptions

    d = _load(STAGE1)
    out = np.asarray(preprocess(Image.fromarray(d["input/src_rgba_uint8"], "RGBA"), PipelineOptions()))
    assert np.array_equal(out, d["input/preprocessed_rgb_uint8"])


def test_generate_passes_stage_strips_unchanged_to_recon(monkeypatch):
    """generate(): stage-1/2 strips go to reconstruction as they are; the mesh equals the fixture's."""
    from PIL import Image

    from crm_models.recon.noise import InputNoiser
    from pipeline.image_to_mesh import ImageToMeshPipeline
    from pipeline.options import PipelineOptions
    from pipeline.weights import resolve_weights
    from pipeline.weights.recon import load_recon_weights
    from pipeline.weights.tiny import build_tiny_recon

    d = _load(RECON)
    model = build_tiny_recon(seed=0)
    load_recon_weights(model, {k[3:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd/")})
    rgb, ccm = d["input_rgb_strip"], d["input_ccm_strip"]

    class FixtureStrips(ImageToMeshPipeline):
        """The diffusion stages replaced by the fixture's strips."""

        def generate_views(self, images, seeds):
            return [rgb.copy() for _ in images]

        def generate_ccms(self, images, views, seeds):
            return [ccm.copy() for _ in images]

    seen = {}
    orig_encode = type(model).encode

    def spy_encode(self, rgb_strip, ccm_strip, noise=None, generator=None):
        seen["rgb"], seen["ccm"] = np.array(rgb_strip), np.array(ccm_strip)
        return orig_encode(self, rgb_strip, ccm_strip, noise=noise, generator=generator)

    monkeypatch.setattr(type(model), "encode", spy_encode)
    monkeypatch.setattr(
        InputNoiser,
        "draw_noise",
        lambda self, shape, generator=None, device=None: torch.from_numpy(d["noise"]),
    )
    identity = resolve_weights("tiny-random").identity
    pipe = FixtureStrips(None, None, model, PipelineOptions(device="cpu"), identity)
    (obj,) = pipe.generate([Image.new("RGB", (32, 32), (127, 127, 127))], ["fx"], preprocessed=True)
    assert np.array_equal(seen["rgb"], rgb) and np.array_equal(seen["ccm"], ccm)
    assert np.array_equal(obj.views_strip, rgb) and np.array_equal(obj.ccm_strip, ccm)
    assert obj.faces.dtype == np.int64 and obj.faces.shape == d["mesh_faces"].shape
    assert obj.vertices.shape == d["mesh_verts"].shape
    # same oriented triangles (raw inward winding kept), compared independently of vertex/face order
    assert _oriented_faces(obj.vertices, obj.faces) == _oriented_faces(d["mesh_verts"], d["mesh_faces"])
    raw = obj.color_field(torch.from_numpy(d["mesh_verts"])).numpy()
    np.testing.assert_allclose(raw, d["mesh_vertex_rgb_raw"], atol=1e-4, rtol=1e-4)
    assert obj.weights_identity["kind"] == "tiny-random"
