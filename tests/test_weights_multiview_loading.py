"""Lean loading of the diffusion stages: meta builds, CLIP from its own file, components held once."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from crm_models.multiview import MultiViewDiffusionModel
from crm_models.multiview.clip_encoders import OpenCLIPConfig
from crm_models.multiview.config import StageConfig
from crm_models.multiview.schedule import SCHEDULE_BUFFER_NAMES
from crm_models.multiview.vae import VAEConfig
from pipeline.weights.loading import build_on_meta
from pipeline.weights.multiview import load_multiview_weights
from pipeline.weights.tensor_files import TensorFile, _file_mappings, write_safetensors
from pipeline.weights.tiny import build_tiny_stage
from pipeline.weights.tiny_configs import TINY_CLIP_CONFIG, TINY_STAGE1_CONFIG, TINY_STAGE2_CONFIG

CLIP = "clip_model.model."


def _meta_stage(stage: int) -> MultiViewDiffusionModel:
    cfg = copy.deepcopy(TINY_STAGE1_CONFIG if stage == 1 else TINY_STAGE2_CONFIG)
    stage_cfg = StageConfig.from_fixture_config(copy.deepcopy(cfg))
    stage_cfg.unet.ip_embed_dim = int(TINY_CLIP_CONFIG["vision_cfg"]["width"])
    clip_cfg = OpenCLIPConfig.from_fixture_config(copy.deepcopy(TINY_CLIP_CONFIG), text_layer="penultimate")
    return build_on_meta(MultiViewDiffusionModel, stage_cfg, VAEConfig.from_fixture_config(cfg), clip_cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Official-layout files: two stage files without CLIP (stage 2 with stage 1's VAE, as frozen
    components are), a third stage-2 file whose VAE differs, and the open_clip file."""
    d = tmp_path_factory.mktemp("stages")
    s1, s2 = build_tiny_stage(1, seed=0), build_tiny_stage(2, seed=0)
    for name in ("vae", "text_encoder", "image_encoder"):
        getattr(s2, name).load_state_dict(getattr(s1, name).state_dict())
    sd1, _ = s1.official_state_dict()
    sd2, _ = s2.official_state_dict()
    write_safetensors({k: v for k, v in sd1.items() if not k.startswith(CLIP)}, d / "s1.safetensors")
    write_safetensors({k: v for k, v in sd2.items() if not k.startswith(CLIP)}, d / "s2.safetensors")
    other = {k: v for k, v in sd2.items() if not k.startswith(CLIP)}
    key = next(k for k in other if k.startswith("vae_model.") and k.endswith("conv_in.weight"))
    other[key] = other[key].clone()
    other[key].view(-1)[0] += 1e-3
    write_safetensors(other, d / "s2_other_vae.safetensors")
    write_safetensors(
        {k[len(CLIP) :]: v for k, v in sd1.items() if k.startswith(CLIP)}, d / "clip.safetensors"
    )
    return {"dir": d, "s1": s1, "s2": s2}


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stage_loads_exactly_with_clip_from_its_own_file(files):
    d = files["dir"]
    model = _meta_stage(1)
    report = load_multiview_weights(model, d / "s1.safetensors", clip_path=d / "clip.safetensors")
    assert _equal_state(model, files["s1"])
    assert report.clip_source == {"text": str(d / "clip.safetensors"), "vision": str(d / "clip.safetensors")}
    assert report.schedule_from_checkpoint and report.schedule_max_abs_diff == 0.0
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    if sys.platform.startswith("linux"):  # parameters are the files' data, not copies
        maps = _file_mappings(d / "s1.safetensors") + _file_mappings(d / "clip.safetensors")
        w = model.unet.unet.conv_in.weight
        assert any(lo <= w.data_ptr() < hi for lo, hi in maps)


def test_identical_components_are_held_once_and_change_nothing(files):
    d = files["dir"]
    clip = TensorFile(d / "clip.safetensors")
    stage1 = _meta_stage(1)
    load_multiview_weights(stage1, d / "s1.safetensors", clip_path=clip)
    shared = _meta_stage(2)
    report = load_multiview_weights(shared, d / "s2.safetensors", clip_path=clip, share_from=stage1)
    assert sorted(report.shared) == ["image_encoder", "text_encoder", "vae"]
    assert shared.vae is stage1.vae and shared.text_encoder is stage1.text_encoder
    assert shared.image_encoder is stage1.image_encoder
    alone = _meta_stage(2)
    load_multiview_weights(alone, d / "s2.safetensors", clip_path=d / "clip.safetensors")
    assert _equal_state(shared, alone) and _equal_state(shared, files["s2"])


def test_a_component_that_differs_is_loaded_separately(files):
    d = files["dir"]
    stage1 = _meta_stage(1)
    load_multiview_weights(stage1, d / "s1.safetensors", clip_path=d / "clip.safetensors")
    model = _meta_stage(2)
    report = load_multiview_weights(
        model, d / "s2_other_vae.safetensors", clip_path=d / "clip.safetensors", share_from=stage1
    )
    assert "vae" not in report.shared and model.vae is not stage1.vae
    assert model.text_encoder is stage1.text_encoder
    assert not _equal_state(model.vae, stage1.vae)


def test_half_precision_load_casts_each_tensor_and_keeps_the_schedule_fp32(files):
    d = files["dir"]
    model = _meta_stage(1).to(torch.bfloat16)
    load_multiview_weights(model, d / "s1.safetensors", clip_path=d / "clip.safetensors")
    ref = files["s1"].state_dict()
    for k, v in model.state_dict().items():
        if k in SCHEDULE_BUFFER_NAMES:
            assert v.dtype == torch.float32 and torch.equal(v, ref[k]), k
        elif v.is_floating_point():
            assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k].to(torch.bfloat16)), k
