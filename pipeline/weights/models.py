"""The three networks of a pipeline, built from resolved weights.

Diffusion models are cast to the run's dtype; the reconstruction model stays fp32 (its U-Net runs
under autocast on CUDA; mesh extraction is always fp32). Real checkpoints are built directly on the
device (on the CPU in low-VRAM mode) and loaded one model at a time.
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
from pipeline.weights.multiview import load_multiview_weights
from pipeline.weights.recon import load_recon_weights
from pipeline.weights.resolve import ResolvedWeights
from pipeline.weights.tiny import TINY_RECON_CONFIG, build_tiny_recon, build_tiny_stage

__all__ = ["CRMModels", "load_models", "load_recon", "load_stage", "recon_config"]


@dataclass
class CRMModels:
    """The three networks of one pipeline (each an ``nn.Module``; on the CPU in low-VRAM mode).

    Attributes:
        stage1: `MultiViewDiffusionModel` making six RGB views.
        stage2: `MultiViewDiffusionModel` making six CCMs.
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
    """Reconstruction model in fp32, eval mode (tiny preset: built on the CPU, seeded)."""
    cfg = recon_config(weights, options)
    if weights.is_random:
        return build_tiny_recon(cfg, seed=weights.seed or 0)
    with torch.device(build_device):
        model = ConvolutionalReconstructionModel(cfg)
    load_recon_weights(model, weights.path("recon"))
    return model.eval().requires_grad_(False)


def load_stage(stage: int, weights: ResolvedWeights, dtype, build_device: str = "cpu"):
    """A `MultiViewDiffusionModel` (stage 1 or 2, with CLIP towers) cast to `dtype`, in eval mode."""
    if weights.is_random:
        model = build_tiny_stage(stage, seed=weights.seed or 0)
    else:
        with torch.device(build_device):
            model = MultiViewDiffusionModel(StageConfig.stage1() if stage == 1 else StageConfig.stage2())
        load_multiview_weights(
            model, weights.path(f"stage{stage}"), clip_path=weights.path("clip"), what=f"stage {stage}"
        )
    return model.to(dtype).eval().requires_grad_(False)


def load_models(weights: ResolvedWeights, options: PipelineOptions) -> CRMModels:
    """The three networks for `options` (device, dtype, low-VRAM mode, grid size).

    Without low-VRAM mode every model ends up on the options' device; with it they stay on the CPU
    and the pipeline moves each stage to the device only while it runs.
    """
    device = options.resolved_device()
    dtype = options.resolved_dtype()
    build_device = "cpu" if options.low_vram else device
    models = CRMModels(
        stage1=load_stage(1, weights, dtype, build_device),
        stage2=load_stage(2, weights, dtype, build_device),
        recon=load_recon(weights, options, build_device),
    )
    if not options.low_vram:
        for m in models.modules():
            m.to(device)
    return models
