"""Multi-view samplers (stage 1 and 2) against the recorded official runs, plus RNG/batch behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from multiview_testutil import (  # noqa: F401
    Fixture,
    _single_thread,
    clip_fixture_for,
    first_stage_fixture,
    fixture_and_model,
    stage_params,
)

from crm_models.multiview import (
    MultiViewDiffusionModel,
    MultiViewSampler,
    RecordedDraws,
    images_to_model_input,
    make_ddim_scheduler,
    strips_to_views,
    views_to_strips,
)
from crm_models.multiview.clip_encoders import OpenCLIPConfig
from crm_models.multiview.sampler import SamplingOptions
from crm_models.multiview.solvers import solver_timesteps


def run_recorded(fx: Fixture, model, **kw):
    return MultiViewSampler(model).sample(
        fx.sampler_input(),
        ip_tokens=fx.t("cond/ip_embed"),
        context=fx.t("cond/context_c"),
        uncond_context=fx.t("cond/context_uc"),
        draws=[fx.recorded_draws()],
        num_steps=int(fx.config["sampler"]["ddim_steps"]),
        guidance_scale=float(fx.config["sampler"]["guidance_scale"]),
        **kw,
    )


def assert_uint8_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """README tolerance: at most 0.1% of the values differ, and only by 1."""
    assert got.shape == want.shape and got.dtype == torch.uint8, what
    diff = (got.int() - want.int()).abs()
    assert int(diff.max()) <= 1, f"{what}: max difference {int(diff.max())}"
    assert int((diff > 0).sum()) <= 1e-3 * diff.numel(), f"{what}: {int((diff > 0).sum())} values differ"


@pytest.mark.parametrize("path", stage_params())
def test_full_chain_matches_recorded_run(path):
    fx, model = fixture_and_model(path)
    out = run_recorded(fx, model, decode_reference_frame=True, return_trajectory=True)
    tr = out.trajectory
    enc = "vae_enc/pixel_control/" if fx.stage == 1 else "vae_enc/pixel_images/"
    if fx.stage == 2:  # stage 2 is fed from the recorded stage-1 images, not our own stage 1
        torch.testing.assert_close(
            images_to_model_input(fx.t("cond/pixel_images_uint8")), fx.t(enc + "input")
        )
    torch.testing.assert_close(tr["latents_scaled"], fx.t(enc + "latent_scaled"), atol=5e-5, rtol=0)
    assert torch.equal(tr["timesteps"], fx.t("ddim/timesteps"))
    xs = fx.t("ddim/x")
    frames = xs.shape[1]
    for i in range(xs.shape[0]):  # x_T and every DDIM step
        torch.testing.assert_close(tr["x"][i], xs[i], atol=1e-3, rtol=0, msg=f"ddim step {i}")
    for name in ("eps_uncond", "eps_cond", "eps_guided", "pred_x0"):
        torch.testing.assert_close(tr[name], fx.t("ddim/" + name), atol=1e-3, rtol=0, msg=name)
    torch.testing.assert_close(out.latents[0], fx.t("decode/latents"), atol=1e-3, rtol=0)
    torch.testing.assert_close(out.decoded[0], fx.t("decode/x_float"), atol=1e-4, rtol=0)
    assert out.decoded.shape[1] == frames
    key = "stage1" if fx.stage == 1 else "stage2"
    assert out.images.shape == (1, 6, *fx.t(f"output/{key}_images_uint8").shape[1:])
    assert_uint8_close(out.images[0], fx.t(f"output/{key}_images_uint8"), "views")
    assert_uint8_close(out.strips[0], fx.t(f"output/{key}_concat_uint8"), "strip")


@pytest.mark.parametrize("path", stage_params())
def test_ddim_chain_from_recorded_eps(path):
    fx, model = fixture_and_model(path)
    sched = make_ddim_scheduler(
        model.alphas_cumprod, model.config.schedule, int(fx.config["sampler"]["ddim_steps"])
    )
    xs, eps = fx.t("ddim/x"), fx.t("ddim/eps_guided")
    x = xs[0]
    for i, t in enumerate(sched.timesteps.tolist()):
        x = sched.step(eps[i], t, x, eta=0.0).prev_sample
        scale = float(xs[i + 1].abs().max())
        torch.testing.assert_close(x, xs[i + 1], atol=1e-5 * scale, rtol=0, msg=f"step {i}")


def _two_step(model, images, gens, **kw):
    d = {
        "ip_tokens": kw.pop("ip_tokens"),
        "context": kw.pop("context"),
        "uncond_context": kw.pop("uncond_context"),
    }
    return MultiViewSampler(model).sample(images, generator=gens, num_steps=2, **d, **kw)


@pytest.mark.parametrize("path", stage_params())
def test_seed_reproduces_and_batch_equals_single_calls(path):
    fx, model = fixture_and_model(path)
    img = fx.sampler_input()
    img2 = torch.flip(img, dims=[-2]) if fx.stage == 1 else torch.flip(img, dims=[2])
    ip = fx.t("cond/ip_embed")
    cond = dict(context=fx.t("cond/context_c"), uncond_context=fx.t("cond/context_uc"))
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = _two_step(model, img, gen(11), ip_tokens=ip, **cond)
    b = _two_step(model, img, gen(11), ip_tokens=ip, **cond)
    c = _two_step(model, img, gen(12), ip_tokens=ip, **cond)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
    assert (a.latents - c.latents).abs().max() > 1e-2
    d = _two_step(model, img2, gen(12), ip_tokens=0.5 * ip, **cond)
    both = _two_step(
        model, torch.cat([img, img2]), [gen(11), gen(12)], ip_tokens=torch.cat([ip, 0.5 * ip]), **cond
    )
    assert both.images.shape[0] == 2 and both.strips.shape[0] == 2
    scale = float(a.latents.abs().max())
    torch.testing.assert_close(both.latents[0], a.latents[0], atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(both.latents[1], d.latents[0], atol=1e-5 * scale, rtol=0)
    assert_uint8_close(both.images[0], a.images[0], "object 1")
    assert_uint8_close(both.images[1], d.images[0], "object 2")


@pytest.mark.parametrize("path", stage_params()[:1])
def test_any_step_count_and_guidance_one(path):
    fx, model = fixture_and_model(path)
    cond = dict(
        ip_tokens=fx.t("cond/ip_embed"),
        context=fx.t("cond/context_c"),
        uncond_context=fx.t("cond/context_uc"),
    )
    steps = []
    out = MultiViewSampler(model).sample(
        fx.sampler_input(),
        generator=torch.Generator().manual_seed(0),
        num_steps=3,
        guidance_scale=1.0,
        callback=lambda i, t, x: steps.append(t),
        **cond,
    )
    assert steps == [667, 334, 1]
    assert torch.isfinite(out.latents).all() and out.images.dtype == torch.uint8


def _solver_params():
    """Each solver on one stage fixture (DPM-Solver++ on the first, UniPC on the last): both samplers and
    both stages are covered without running every pair."""
    params = stage_params()
    return [
        pytest.param(p.values[0], name, id=f"{p.id}-{name}", marks=p.marks)
        for p, name in ((params[0], "dpmpp"), (params[-1], "unipc"))
    ]


@pytest.mark.parametrize("path,sampler", _solver_params())
def test_solver_batch_equals_single_calls_on_grid_timesteps(path, sampler):
    """A few-step solver: network calls at its grid timesteps; K objects in one batch equal K single calls."""
    fx, model = fixture_and_model(path)
    img = fx.sampler_input()
    img2 = torch.flip(img, dims=[-2]) if fx.stage == 1 else torch.flip(img, dims=[2])
    ip = fx.t("cond/ip_embed")
    cond = dict(context=fx.t("cond/context_c"), uncond_context=fx.t("cond/context_uc"))
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    opts = SamplingOptions(sampler=sampler, num_steps=3)
    seen: list[int] = []
    sampler_ = MultiViewSampler(model)
    a = sampler_.sample(
        img, ip_tokens=ip, generator=gen(11), options=opts, callback=lambda i, t, x: seen.append(t), **cond
    )
    assert seen == solver_timesteps(3).tolist() == [981, 501, 1]
    d = sampler_.sample(img2, ip_tokens=0.5 * ip, generator=gen(12), options=opts, **cond)
    both = sampler_.sample(
        torch.cat([img, img2]),
        ip_tokens=torch.cat([ip, 0.5 * ip]),
        generator=[gen(11), gen(12)],
        options=opts,
        **cond,
    )
    scale = float(a.latents.abs().max())
    torch.testing.assert_close(both.latents[0], a.latents[0], atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(both.latents[1], d.latents[0], atol=1e-5 * scale, rtol=0)
    assert_uint8_close(both.images[0], a.images[0], "object 1")
    assert_uint8_close(both.images[1], d.images[0], "object 2")
    ddim = sampler_.sample(img, ip_tokens=ip, generator=gen(11), num_steps=3, **cond)
    assert (ddim.latents - a.latents).abs().max() > 1e-3  # the solver is not DDIM under another name


@pytest.mark.parametrize("path", stage_params()[:1])
def test_sampling_options_are_checked(path):
    fx, model = fixture_and_model(path)
    kw = dict(
        ip_tokens=fx.t("cond/ip_embed"),
        context=fx.t("cond/context_c"),
        uncond_context=fx.t("cond/context_uc"),
    )
    sampler = MultiViewSampler(model)
    with pytest.raises(TypeError, match="num_step"):
        sampler.sample(fx.sampler_input(), num_step=3, **kw)
    with pytest.raises(ValueError, match="deterministic"):
        sampler.sample(fx.sampler_input(), sampler="dpmpp", num_steps=2, eta=0.5, **kw)
    with pytest.raises(ValueError, match="1..50"):
        sampler.sample(fx.sampler_input(), sampler="unipc", num_steps=60, **kw)
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler.sample(fx.sampler_input(), options=SamplingOptions(sampler="euler"), **kw)


def test_strip_helpers_round_trip():
    views = torch.randint(0, 256, (2, 6, 8, 8, 3), dtype=torch.uint8)
    strips = views_to_strips(views)
    assert strips.shape == (2, 8, 48, 3)
    assert torch.equal(strips[1, :, 16:24], views[1, 2])  # third view is the third 8-pixel slice
    assert torch.equal(strips_to_views(strips), views)
    with pytest.raises(ValueError, match="strips"):
        strips_to_views(strips[:, :, :40])


@pytest.mark.parametrize("path", stage_params()[:1])
def test_draw_shapes_are_checked(path):
    fx, model = fixture_and_model(path)
    with pytest.raises(ValueError, match="x_T"):
        MultiViewSampler(model).sample(
            fx.sampler_input(),
            ip_tokens=fx.t("cond/ip_embed"),
            context=fx.t("cond/context_c"),
            uncond_context=fx.t("cond/context_uc"),
            draws=[RecordedDraws(x_T=torch.zeros(3, 4, 8, 8))],
            num_steps=1,
        )
    with pytest.raises(ValueError, match="generators"):
        MultiViewSampler(model).sample(
            torch.cat([fx.sampler_input()] * 2),
            ip_tokens=torch.cat([fx.t("cond/ip_embed")] * 2),
            context=fx.t("cond/context_c"),
            uncond_context=fx.t("cond/context_uc"),
            generator=[torch.Generator()],
            num_steps=1,
        )


def _stage_and_clip_state_dict():
    """(stage fixture, CLIP config, its official state dict + the CLIP fixture's clip_model.* keys)."""
    import json

    fx = Fixture(first_stage_fixture())
    clip = np.load(clip_fixture_for(fx.path))
    clip_cfg = OpenCLIPConfig.from_fixture_config(json.loads(str(clip["config_json"])))
    sd = fx.official_state_dict()
    sd.update({k[3:]: torch.from_numpy(clip[k]) for k in clip.files if k.startswith("sd/")})
    for k in clip.files:
        if k.startswith("sd_sparse/") and k.endswith("/rows"):
            name = k[len("sd_sparse/") : -len("/rows")]
            dense = torch.zeros(tuple(clip[f"sd_sparse/{name}/shape"]))
            dense[torch.from_numpy(clip[k]).long()] = torch.from_numpy(clip[f"sd_sparse/{name}/values"])
            sd[name] = dense
    return fx, clip_cfg, sd


def test_prompt_text_path_with_clip_from_checkpoint(tmp_path):
    """Prompt strings -> tokenizer -> CLIP text tower (weights from the checkpoint's clip_model.* keys)."""
    from pipeline.weights.multiview import load_multiview_weights

    fx, clip_cfg, sd = _stage_and_clip_state_dict()
    model = MultiViewDiffusionModel.from_fixture_config(fx.config, clip_cfg=clip_cfg, with_clip=True).eval()
    # a complete clip_model.* set wins; the open_clip file is then not even read (this one does not exist)
    report = load_multiview_weights(model, sd, clip_path=tmp_path / "absent_open_clip.bin")
    assert report.clip_source == {"text": "checkpoint", "vision": "checkpoint"}
    sampler = MultiViewSampler(model)
    feats = sampler.encode_text([fx.config["sampler"]["prompt"], fx.config["sampler"]["negative_prompt"]])
    torch.testing.assert_close(feats[:1], fx.t("cond/context_c"), atol=1e-5, rtol=0)
    torch.testing.assert_close(feats[1:], fx.t("cond/context_uc"), atol=1e-5, rtol=0)


def test_partial_checkpoint_clip_takes_the_other_tower_from_open_clip(tmp_path):
    """A checkpoint with only the text tower: the vision tower comes from the open_clip file."""
    from pipeline.weights.multiview import load_multiview_weights

    fx, clip_cfg, sd = _stage_and_clip_state_dict()
    prefix = "clip_model.model."
    open_clip = {k[len(prefix) :]: v + 1.0 for k, v in sd.items() if k.startswith(prefix)}
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(open_clip, path)
    partial = {k: v for k, v in sd.items() if not k.startswith(prefix + "visual.")}
    model = MultiViewDiffusionModel.from_fixture_config(fx.config, clip_cfg=clip_cfg, with_clip=True)
    report = load_multiview_weights(model, partial, clip_path=path)
    assert report.clip_source == {"text": "checkpoint", "vision": str(path)}

    def weights(encoder):  # without the text_model./vision_model. wrapper of some transformers releases
        return {k.split("_model.", 1)[-1]: v for k, v in encoder.model.state_dict().items()}

    vis, txt = weights(model.image_encoder), weights(model.text_encoder)
    assert torch.equal(vis["pre_layrnorm.weight"], open_clip["visual.ln_pre.weight"])
    assert torch.equal(vis["embeddings.class_embedding"], open_clip["visual.class_embedding"])
    assert torch.equal(txt["final_layer_norm.weight"], sd[prefix + "ln_final.weight"])


def test_missing_clip_weights_error_names_the_file(tmp_path, monkeypatch):
    from pipeline.weights.checkpoints import CheckpointError
    from pipeline.weights.multiview import load_multiview_weights

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    fx = Fixture(first_stage_fixture())
    tiny_clip = OpenCLIPConfig(
        vision_width=64,
        vision_layers=2,
        vision_head_width=16,
        patch_size=32,
        text_width=64,
        text_heads=4,
        text_layers=2,
    )
    model = MultiViewDiffusionModel.from_fixture_config(fx.config, clip_cfg=tiny_clip, with_clip=True)
    with pytest.raises(CheckpointError, match="open_clip_pytorch_model.bin") as err:
        load_multiview_weights(model, fx.official_state_dict())
    assert str(tmp_path) in str(err.value)
