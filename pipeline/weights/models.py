"""The three networks of a pipeline, built from resolved weights.

Diffusion models are cast to the run's dtype; the reconstruction model stays fp32 (its U-Net runs
under autocast on CUDA; mesh extraction is always fp32). Real checkpoints are loaded lean
(`pipeline.weights.loading`): each network is built with its parameters on the ``meta`` device
(no memory, no random initialisation), and every tensor is read once from its file and placed
directly on the device in the run's dtype (on the CPU in low-VRAM mode). On the CPU in fp32 the
parameters are views of the files' memory mappings: nothing is copied, pages are read when first
used, and processes on one machine share them through the page cache.

Both diffusion stages use the same frozen OpenCLIP ViT-H-14 towers and the same VAE: a component
whose weights would load identical in stage 2 is not loaded again, the two stages hold one module
(checked tensor by tensor, so outputs never change).

On the CPU the reconstruction U-Net runs in NHWC layout (`pipeline.weights.recon.to_channels_last`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from crm_models.multiview.config import StageConfig
from crm_models.multiview.stage_model import MultiViewDiffusionModel
from crm_models.recon.config import ReconConfig
from crm_models.recon.model import ConvolutionalReconstructionModel
from pipeline.options import PipelineOptions
from pipeline.weights.cpu_allocator import tune_cpu_allocator
from pipeline.weights.loading import build_on_meta
from pipeline.weights.multiview import load_multiview_weights
from pipeline.weights.recon import load_recon_weights, to_channels_last
from pipeline.weights.resolve import ResolvedWeights
from pipeline.weights.tensor_files import TensorFile
from pipeline.weights.tiny import build_tiny_recon, build_tiny_stage
from pipeline.weights.tiny_configs import TINY_RECON_CONFIG

__all__ = ["CRMModels", "load_models", "load_recon", "load_stage", "recon_config"]


@dataclass
class CRMModels:
    """The three networks of one pipeline (each an ``nn.Module``; on the CPU in low-VRAM mode).

    Attributes:
        stage1: `MultiViewDiffusionModel` making six RGB views.
        stage2: `MultiViewDiffusionModel` making six CCMs (holds stage 1's VAE / CLIP modules when
            their weights are identical).
        recon: `ConvolutionalReconstructionModel` (views + CCMs -> triplane -> mesh + colour field).
    """

    stage1: Any
    stage2: Any
    recon: Any

    def modules(self) -> tuple[Any, Any, Any]:
        return self.stage1, self.stage2, self.recon


def recon_config(weights: ResolvedWeights, options: PipelineOptions) -> ReconConfig:
    """The reconstruction config of these weights (tiny preset or official), with the options' grid."""
    cfg = ReconConfig.from_fixture_config(TINY_RECON_CONFIG) if weights.is_random else ReconConfig()
    if options.grid_size is not None:
        cfg = cfg.with_decoder(grid_res=int(options.grid_size))
    return cfg


def load_recon(weights: ResolvedWeights, options: PipelineOptions, build_device: str = "cpu"):
    """Reconstruction model in fp32, eval mode (tiny preset: built on the CPU, seeded).

    When the run's device is the CPU the U-Net runs in NHWC layout (`to_channels_last`: the same
    maths, faster with oneDNN; float rounding differs from NCHW).
    """
    cfg = recon_config(weights, options)
    if weights.is_random:
        model = build_tiny_recon(cfg, seed=weights.seed or 0)
    else:
        model = build_on_meta(ConvolutionalReconstructionModel, cfg)
        load_recon_weights(model, weights.path("recon"), device=build_device)
        model = model.to(build_device).eval().requires_grad_(False)
    if torch.device(options.resolved_device()).type == "cpu":
        to_channels_last(model)
    return model


def load_stage(
    stage: int,
    weights: ResolvedWeights,
    dtype: torch.dtype,
    build_device: str = "cpu",
    *,
    clip: TensorFile | None = None,
    share_from: MultiViewDiffusionModel | None = None,
) -> MultiViewDiffusionModel:
    """A `MultiViewDiffusionModel` (stage 1 or 2, with CLIP towers) in `dtype`, in eval mode.

    Args:
        clip: the open_clip file, already open (both stages then map it once); default: the
            resolved ``clip`` file, opened here.
        share_from: the other stage, already loaded: identical components are taken from it.
    """
    if weights.is_random:
        return build_tiny_stage(stage, seed=weights.seed or 0).to(dtype)
    cfg = StageConfig.stage1() if stage == 1 else StageConfig.stage2()
    model = build_on_meta(MultiViewDiffusionModel, cfg).to(dtype)  # the dtypes the loader casts to
    load_multiview_weights(
        model,
        weights.path(f"stage{stage}"),
        clip_path=clip if clip is not None else weights.path("clip"),
        what=f"stage {stage}",
        device=build_device,
        share_from=share_from,
    )
    return model.to(build_device).eval().requires_grad_(False)


def load_models(weights: ResolvedWeights, options: PipelineOptions) -> CRMModels:
    """The three networks for `options` (device, dtype, low-VRAM mode, grid size).

    Without low-VRAM mode every model ends up on the options' device; with it they stay on the CPU
    and the pipeline moves each stage to the device only while it runs. Stage 2 holds stage 1's
    VAE and CLIP modules when their weights are identical. On the CPU the process's allocator is
    tuned for inference first (`pipeline.weights.cpu_allocator`).
    """
    device = options.resolved_device()
    dtype = options.resolved_dtype()
    if torch.device(device).type == "cpu":
        tune_cpu_allocator()  # the networks run on the CPU: keep operators out of page faults
    build_device = "cpu" if options.low_vram else device
    if weights.is_random:
        stage1 = load_stage(1, weights, dtype, build_device)
        stage2 = load_stage(2, weights, dtype, build_device)
    else:
        clip = TensorFile(weights.path("clip")) if weights.path("clip") is not None else None
        stage1 = load_stage(1, weights, dtype, build_device, clip=clip)
        stage2 = load_stage(2, weights, dtype, build_device, clip=clip, share_from=stage1)
    models = CRMModels(stage1=stage1, stage2=stage2, recon=load_recon(weights, options, build_device))
    if not options.low_vram:
        for m in models.modules():
            m.to(device)
    return models
