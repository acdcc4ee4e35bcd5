"""The ``tiny-random`` weights preset: every model at the reference fixtures' tiny sizes, seeded random.

The configurations (and the smoke-run settings) are plain data in ``pipeline.weights.tiny_configs``;
this module builds the seeded random models from them.
"""

from __future__ import annotations

import copy

import torch

from crm_models.multiview.clip_encoders import OpenCLIPConfig
from crm_models.multiview.config import StageConfig
from crm_models.multiview.stage_model import MultiViewDiffusionModel
from crm_models.multiview.vae import VAEConfig
from crm_models.recon.config import ReconConfig
from crm_models.recon.model import ConvolutionalReconstructionModel
from pipeline.weights.tiny_configs import (
    TINY_CLIP_CONFIG,
    TINY_RECON_CONFIG,
    TINY_STAGE1_CONFIG,
    TINY_STAGE2_CONFIG,
)


def _seeded_init(build, seed: int):
    """Call `build()` with torch's global RNG seeded, without disturbing the caller's RNG state."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()


def _perturb(module, seed: int, bias_std: float = 0.05) -> None:
    """Make zero/one-initialised 1-D parameters (biases, norm affines) non-trivial, deterministically."""

    gen = torch.Generator("cpu").manual_seed(int(seed))
    with torch.no_grad():
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1:
                p.add_(bias_std * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def build_tiny_recon(cfg=None, seed: int = 0):
    """Seeded random reconstruction model at the tiny size (`TINY_RECON_CONFIG`), fp32, eval mode.

    Default PyTorch/diffusers initialisation under `seed`, then every 1-D parameter gets
    +0.05·N(0, 1) and the colour head's last layer is scaled x4 (as in the reference fixture), so
    colours vary over the surface. The sphere prior keeps the random surface a closed blob.
    """

    cfg = cfg or ReconConfig.from_fixture_config(TINY_RECON_CONFIG)
    model = _seeded_init(lambda: ConvolutionalReconstructionModel(cfg), seed)
    _perturb(model, seed + 1)
    with torch.no_grad():
        last = [m for m in model.rgbMlp.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(4.0)
        last.bias.mul_(4.0)
    return model.eval().requires_grad_(False)


def build_tiny_stage(stage: int, seed: int = 0):
    """Seeded random multi-view diffusion model (stage 1 or 2) at the tiny size, with tiny CLIP towers.

    The tiny CLIP vision tower is 64 wide, so the Resampler's input width (`ip_embed_dim`, 1280 in
    the real model) is set to 64; everything else is the fixture configuration. Default
    initialisation under `seed` (+ `stage`), then 1-D parameters get +0.05·N(0, 1).
    """

    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    cfg = TINY_STAGE1_CONFIG if stage == 1 else TINY_STAGE2_CONFIG
    stage_cfg = StageConfig.from_fixture_config(copy.deepcopy(cfg))
    stage_cfg.unet.ip_embed_dim = int(TINY_CLIP_CONFIG["vision_cfg"]["width"])
    vae_cfg = VAEConfig.from_fixture_config(copy.deepcopy(cfg))
    clip_cfg = OpenCLIPConfig.from_fixture_config(copy.deepcopy(TINY_CLIP_CONFIG), text_layer="penultimate")
    model = _seeded_init(
        lambda: MultiViewDiffusionModel(stage_cfg, vae_cfg, clip_cfg, with_clip=True), seed + stage
    )
    _perturb(model, seed + 10 * stage)
    return model.eval().requires_grad_(False)
