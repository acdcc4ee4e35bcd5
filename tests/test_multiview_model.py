"""Multi-view UNet, schedule, cameras and official key mapping against the reference fixtures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from multiview_testutil import Fixture, _single_thread, first_stage_fixture, fixture_and_model, stage_params  # noqa: F401
from reference_files import REFERENCE_DIR, require

from crm_models.multiview import (
    MultiViewDiffusionModel,
    MultiViewUNet,
    MultiViewUNetConfig,
    StageConfig,
    camera_tensor,
    ddim_timesteps,
    make_ddim_scheduler,
    schedule_buffers,
    stage_cameras,
    unet_ldm_to_ours,
    unet_ours_to_ldm,
)
from crm_models.multiview.schedule import ScheduleConfig
from pipeline.weights.checkpoints import CheckpointKeyError
from pipeline.weights.multiview import load_multiview_weights


@pytest.mark.parametrize("path", stage_params())
def test_unet_first_guided_call_matches_recorded(path):
    fx, model = fixture_and_model(path)
    u = lambda k: fx.t("unet_call0/" + k)  # noqa: E731
    batch = u("x_in_before_ref_insert").shape[0]
    frames = int(u("num_frames"))
    ip = fx.t("cond/ip_embed")
    ip_tokens = torch.cat([torch.zeros_like(ip).expand(batch // 2, -1, -1), ip.expand(batch // 2, -1, -1)])
    kwargs = {"ip_img": u("ip_img")} if fx.stage == 1 else {"pixel_latents": u("pixel_images")}
    x_in = u("x_in_before_ref_insert")
    x_copy = x_in.clone()
    with torch.no_grad(), model.unet.record_intermediates() as acts:
        out = model.unet(
            x_in, u("timesteps"), u("context"), u("camera"), frames, ip_tokens=ip_tokens, **kwargs
        )
    assert torch.equal(x_in, x_copy), "the UNet must not modify its input"
    torch.testing.assert_close(out, u("out"), atol=5e-5, rtol=1e-5)
    names = [k[len("unet_call0/acts/") :] for k in fx.data.files if k.startswith("unet_call0/acts/")]
    assert len(names) >= 5
    for name in names:
        torch.testing.assert_close(acts[name], fx.t("unet_call0/acts/" + name), atol=1e-4, rtol=0, msg=name)


def _tiny_unet(seed=0, in_channels=4) -> MultiViewUNet:
    cfg = MultiViewUNetConfig(
        in_channels=in_channels,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1,),
        num_head_channels=16,
        context_dim=32,
        ip_embed_dim=48,
        resampler_depth=1,
        resampler_heads=2,
        resampler_dim_head=16,
    )
    torch.manual_seed(seed)
    unet = MultiViewUNet(cfg).eval()
    with torch.no_grad():  # zero-initialised layers would hide cross-frame effects
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet


def test_frames_attend_within_object_only():
    unet = _tiny_unet()
    frames, objects = 3, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(objects * frames, 4, 8, 8, generator=g)
    ctx = torch.randn(objects, 5, 32, generator=g)
    cam = torch.randn(objects * frames, 16, generator=g)
    ip = torch.randn(objects, 7, 48, generator=g)
    ip_img = torch.randn(objects, 4, 8, 8, generator=g)
    with torch.no_grad():
        base = unet(x, torch.full((6,), 500), ctx, cam, frames, ip_tokens=ip, ip_img=ip_img)
        x2 = x.clone()
        x2[frames] += 1.0  # first frame of object 2
        moved = unet(x2, torch.full((6,), 500), ctx, cam, frames, ip_tokens=ip, ip_img=ip_img)
        single = unet(
            x[:frames],
            torch.full((3,), 500),
            ctx[:1],
            cam[:frames],
            frames,
            ip_tokens=ip[:1],
            ip_img=ip_img[:1],
        )
    torch.testing.assert_close(moved[:frames], base[:frames], atol=1e-6, rtol=0)  # object 1 unaffected
    assert (
        moved[frames + 1 : 2 * frames] - base[frames + 1 : 2 * frames]
    ).abs().max() > 1e-4  # joint attention
    torch.testing.assert_close(single, base[:frames], atol=1e-5, rtol=1e-5)


def test_unet_rejects_bad_inputs():
    unet = _tiny_unet()
    x = torch.randn(6, 4, 8, 8)
    ctx, cam, ip = torch.randn(2, 5, 32), torch.randn(6, 16), torch.randn(2, 7, 48)
    with pytest.raises(ValueError, match="num_frames"):
        unet(x, torch.full((6,), 1), ctx, cam, 4, ip_tokens=ip, ip_img=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="ip_img"):
        unet(x, torch.full((6,), 1), ctx, cam, 3, ip_tokens=ip)
    with pytest.raises(ValueError, match="ip_embed_dim|image tokens"):
        unet(
            x,
            torch.full((6,), 1),
            ctx,
            cam,
            3,
            ip_tokens=torch.randn(2, 7, 40),
            ip_img=torch.zeros(2, 4, 8, 8),
        )


def test_schedule_buffers_and_ddim_tables_match_fixture():
    fx = Fixture(first_stage_fixture())
    bufs = schedule_buffers(ScheduleConfig.from_fixture_config(fx.config))
    for name, value in bufs.items():
        assert torch.equal(value, fx.t("sd/" + name)), name
    ab = bufs["alphas_cumprod"]
    assert ab[-1] == 0 and bufs["sqrt_one_minus_alphas_cumprod"][-1] == 1
    ts = ddim_timesteps(50)
    assert torch.equal(ts.flip(0), fx.t("schedule/ddim50_timesteps_ascending"))
    np.testing.assert_allclose(
        ab[ts.flip(0)].double().numpy(), fx.data["schedule/ddim50_alphas"], rtol=0, atol=0
    )
    sched = make_ddim_scheduler(ab, num_steps=50)
    prev = [
        float(sched.alphas_cumprod[t - 1000 // 50]) if t - 20 >= 0 else float(sched.final_alpha_cumprod)
        for t in ts
    ]
    np.testing.assert_allclose(prev[::-1], fx.data["schedule/ddim50_alphas_prev"], rtol=1e-7)
    steps = int(fx.config["sampler"]["ddim_steps"])
    assert torch.equal(make_ddim_scheduler(ab, num_steps=steps).timesteps, fx.t("ddim/timesteps"))


@pytest.mark.parametrize("steps,count", [(50, 50), (30, 31), (3, 3), (7, 8), (1, 1), (1000, 999)])
def test_ddim_timesteps_any_count(steps, count):
    ts = ddim_timesteps(steps)
    assert len(ts) == count
    assert int(ts.max()) < 1000 and int(ts.min()) == 1
    assert bool((ts[:-1] > ts[1:]).all())


@pytest.mark.parametrize("path", stage_params())
def test_cameras_match_fixture(path):
    fx = Fixture(path)
    cam = stage_cameras(fx.stage)
    assert torch.equal(cam, fx.t("cond/camera"))  # bit-identical, round-off entries included
    assert torch.equal(cam, camera_tensor(reference_position=6 if fx.stage == 1 else None))


@pytest.mark.parametrize("path", stage_params())
def test_official_state_dict_round_trips(path):
    fx, model = fixture_and_model(path)
    sd = fx.official_state_dict()
    back, unmapped = model.official_state_dict()
    assert unmapped == []
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    unet_sd, bad = unet_ldm_to_ours(sd, model.config.unet)
    assert bad == []
    again, bad = unet_ours_to_ldm(unet_sd, model.config.unet)
    assert bad == [] and all(torch.equal(again[k], sd[k]) for k in again)


@pytest.mark.parametrize("stage", [1, 2])
def test_full_config_reproduces_manifest(stage):
    manifest_path = require(REFERENCE_DIR / "multiview" / f"full_state_dict_manifest_stage{stage}.json")
    manifest = json.loads(manifest_path.read_text())
    expected = {e["key"]: tuple(e["shape"]) for e in manifest["keys"]}
    assert len(expected) == manifest["n_state_dict_keys"]
    with torch.device("meta"):
        model = MultiViewDiffusionModel(StageConfig.stage1() if stage == 1 else StageConfig.stage2())
        official = {k: torch.empty(s) for k, s in expected.items()}
    conv = model.convert_official_state_dict(official)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert conv.unmapped == []
    assert set(conv.mapped) == set(own)
    assert {k: tuple(v.shape) for k, v in conv.mapped.items()} == own
    # the only official keys not loaded: CLIP parts CRM never runs (last block of each tower, projections)
    assert all(k.startswith("clip_model.model.") for k in conv.unused)
    assert {k.split(".")[2] for k in conv.unused} <= {
        "logit_scale",
        "text_projection",
        "transformer",
        "visual",
    }
    back, unmapped = model.official_state_dict()
    assert unmapped == []
    assert set(back) | set(conv.unused) == set(expected)
    assert all(tuple(v.shape) == expected[k] for k, v in back.items())
    unet_params = sum(v.numel() for k, v in model.unet.state_dict().items())
    key = "model.diffusion_model (UNet total)"
    assert unet_params == manifest["parameter_counts"][key]


def test_key_mapping_errors_list_keys():
    fx = Fixture(first_stage_fixture())
    model = MultiViewDiffusionModel.from_fixture_config(fx.config).eval()
    sd = fx.official_state_dict()
    sd["model.diffusion_model.input_blocks.99.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError, match=r"input_blocks\.99") as err:
        load_multiview_weights(model, sd)
    assert "model.diffusion_model.input_blocks.99.0.weight" in err.value.unexpected
    sd = fx.official_state_dict()
    del sd["model.diffusion_model.out.2.weight"], sd["vae_model.decoder.conv_out.bias"]
    with pytest.raises(CheckpointKeyError) as err:
        load_multiview_weights(model, sd)
    assert err.value.missing == ["unet.unet.conv_out.weight", "vae.decoder.conv_out.bias"]
    sd = fx.official_state_dict()
    sd["model.diffusion_model.out.2.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointKeyError, match="conv_out.bias"):
        load_multiview_weights(model, sd)


def test_half_precision_keeps_float32_schedule():
    fx = Fixture(first_stage_fixture())
    model = MultiViewDiffusionModel.from_fixture_config(fx.config).to(torch.float16)
    assert model.unet.dtype == torch.float16
    assert model.alphas_cumprod.dtype == torch.float32
    assert torch.equal(model.alphas_cumprod, fx.t("sd/alphas_cumprod"))


def test_attention_chunking_gives_the_same_result():
    unet = _tiny_unet()
    chunked = _tiny_unet()
    chunked.load_state_dict(unet.state_dict())
    for proc in chunked.unet.attn_processors.values():
        proc.attention_chunk = 7  # not a divisor of the token counts
    g = torch.Generator().manual_seed(3)
    args = (torch.randn(3, 4, 8, 8, generator=g), torch.full((3,), 10), torch.randn(1, 5, 32, generator=g))
    kw = dict(ip_tokens=torch.randn(1, 7, 48, generator=g), ip_img=torch.randn(1, 4, 8, 8, generator=g))
    cam = torch.randn(3, 16, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked(*args, cam, 3, **kw), unet(*args, cam, 3, **kw), atol=1e-5, rtol=1e-5
        )
