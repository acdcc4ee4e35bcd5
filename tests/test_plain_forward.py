"""The benchmarks' same-maths baselines (`benchmarks/plain_forward.py`) compute what our models compute.

`bench_recon.py` and `bench_multiview.py` time our networks against these plain
``torch.nn.functional`` forwards of the same weights; a baseline that drifted from the model would
make those ratios meaningless. Checked here at the tiny configurations, in both memory layouts
the recon benchmark runs.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.plain_forward import plain_forward, plain_unet
from pipeline.weights.recon import to_channels_last
from pipeline.weights.tiny import build_tiny_recon, build_tiny_stage


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "nhwc"])
def test_plain_unet_is_the_reconstruction_unet(nhwc):
    model = build_tiny_recon(seed=3)
    if nhwc:
        to_channels_last(model)
    r = model.cfg.plane_resolution
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        xn = model.add_noise(torch.rand(1, 12, r, 3 * r, generator=g), generator=g)
        t = model.noiser.timesteps(1, device=xn.device)
        full = torch.cat([xn, model.unet2.learned_plane.expand(1, -1, -1, -1)], dim=1)
        if nhwc:
            full = full.contiguous(memory_format=torch.channels_last)
        ours = model.run_unet(xn)
        plain = plain_unet(model.unet2.unet, full, t)
    assert ours.shape == plain.shape == (1, model.cfg.c_dim, r, 3 * r)
    assert ours.abs().max() > 0.1  # a real output, not a degenerate one
    torch.testing.assert_close(plain, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stage", [1, 2])
def test_plain_forward_is_the_multiview_unet(stage):
    unet = build_tiny_stage(stage, seed=1).unet
    cfg = unet.config
    frames, objects = 4, 2
    batch = frames * objects
    g = torch.Generator().manual_seed(stage)
    x = torch.randn(batch, cfg.out_channels, 8, 8, generator=g)
    t = torch.tensor([981, 500] * frames).sort().values  # two timesteps, one per object
    ctx = torch.randn(objects, 7, cfg.context_dim, generator=g)
    cam = torch.randn(batch, cfg.camera_dim, generator=g)
    tokens = torch.randn(objects, 257, cfg.ip_embed_dim, generator=g)
    extra = (
        {"ip_img": torch.randn(objects, 4, 8, 8, generator=g)}
        if cfg.pixel_control
        else {"pixel_latents": torch.randn(batch, 4, 8, 8, generator=g)}
    )
    with torch.inference_mode():
        embeds = unet.encode_image_prompt(tokens)
        ours = unet(x, t, ctx, cam, frames, image_embeds=embeds, **extra)
        plain = plain_forward(unet, x, t, ctx, cam, frames, embeds, **extra)
    assert ours.shape == plain.shape == (batch, cfg.out_channels, 8, 8)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(plain, ours, rtol=1e-5, atol=1e-5)
