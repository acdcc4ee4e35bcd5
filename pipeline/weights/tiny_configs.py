"""The ``tiny-random`` weights preset's configurations and run settings: plain data, no torch.

For smoke tests and CI only (outputs are meaningless; every output records ``"kind":
"tiny-random"``). The configurations are defined here in code, in the official config-dict format
(the same shape as the fixtures' ``config_json``), so users and CI need no reference files; a test
checks they equal the fixtures' configs. The seeded random models built from them are in
``pipeline.weights.tiny``; this module stays free of the networks' libraries so that resolving
weights (and ``make demo`` without weights) does not import them.

Sizes: reconstruction plane 64 (strips 64 x 384), 7 U-Net levels of width 32, FlexiCubes grid 16;
multi-view UNets with 32 base channels, levels (1, 1, 2), views of 64 x 64 (latents 8 x 8); VAE
ch 32 with 8x downsampling; CLIP towers of width 64.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

#: Reconstruction model (fixture ``recon/tiny_case_a.npz``), official spec-dict format.
TINY_RECON_CONFIG: dict[str, Any] = {
    "name": "tiny-random",
    "plane_resolution": 64,
    "block_out_channels": [32, 32, 32, 32, 32, 32, 32],
    "layers_per_block": 1,
    "grid_res": 16,
    "specs": {
        "Input": {"tet_grid_size": 16, "scale": 0.95, "resolution": [256, 256]},
        "Pretrain": {"mode": None, "radius": 0.5},
        "ArchSpecs": {"unet_type": "diffusers", "fea_concat": False, "mlp_bias": True},
        "DecoderSpecs": {"c_dim": 32, "plane_resolution": 64},
    },
}

_TINY_UNET_PARAMS: dict[str, Any] = {
    "image_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 2,
    "channel_mult": [1, 1, 2],
    "num_head_channels": 16,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,
    "transformer_depth": 1,
    "context_dim": 64,
    "use_checkpoint": False,
    "legacy": False,
    "camera_dim": 16,
    "with_ip": True,
    "ip_dim": 16,
    "ip_mode": "local_resample",
}

_TINY_VAE_PARAMS: dict[str, Any] = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True,
        "z_channels": 4,
        "resolution": 64,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

_SCHEDULE_PARAMS: dict[str, Any] = {
    "linear_start": 0.00085,
    "linear_end": 0.012,
    "timesteps": 1000,
    "scale_factor": 0.18215,
    "parameterization": "eps",
    "zero_snr": True,
}

NEGATIVE_PROMPT = (
    "uniform low no texture ugly, boring, bad anatomy, blurry, pixelated,  obscure, unnatural colors, "
    "poor lighting, dull, and unclear."
)


def _stage_config(stage: int) -> dict[str, Any]:
    unet = dict(_TINY_UNET_PARAMS, in_channels=4 if stage == 1 else 8)
    target = "MultiViewUNetModel" if stage == 1 else "MultiViewUNetModelStage2"
    return {
        "model": {
            "params": {
                **_SCHEDULE_PARAMS,
                "unet_config": {
                    "target": f"imagedream.ldm.modules.diffusionmodules.openaimodel.{target}",
                    "params": unet,
                },
                "vae_config": {"params": copy.deepcopy(_TINY_VAE_PARAMS)},
            }
        },
        "sampler": {
            "image_size": 64,
            "ddim_steps": 50,
            "guidance_scale": 5.0,
            "eta": 0.0,
            "num_frames": 7 if stage == 1 else 6,
            "batch_size": 7 if stage == 1 else 6,
            "camera_views": [1, 2, 3, 4, 5, 0, 0] if stage == 1 else [1, 2, 3, 4, 5, 0],
            "ref_position": 6 if stage == 1 else None,
            "offset_noise": True,
            "prompt": "3D assets",
            "negative_prompt": NEGATIVE_PROMPT,
        },
    }


#: Stage-1 / stage-2 multi-view diffusion (fixtures ``multiview/tiny_stage{1,2}_case_a.npz``).
TINY_STAGE1_CONFIG: dict[str, Any] = _stage_config(1)
TINY_STAGE2_CONFIG: dict[str, Any] = _stage_config(2)

#: Tiny OpenCLIP towers (fixture ``multiview/tiny_clip_case_a.npz``).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 224,
        "layers": 3,
        "width": 64,
        "head_width": 16,
        "patch_size": 32,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}


def tiny_configs() -> dict[str, dict[str, Any]]:
    """Deep copies of all tiny configs by role."""
    return copy.deepcopy(
        {
            "recon": TINY_RECON_CONFIG,
            "stage1": TINY_STAGE1_CONFIG,
            "stage2": TINY_STAGE2_CONFIG,
            "clip": TINY_CLIP_CONFIG,
        }
    )


def tiny_config_hash() -> str:
    """16-hex-digit hash of all tiny configs (part of the weights identity)."""
    blob = json.dumps(tiny_configs(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Run settings for the tiny preset: its outputs are meaningless, so the smallest settings that still
#: exercise every stage (2 DDIM steps per stage, a 128 texture and preview) prove the plumbing fastest.
SMOKE_OPTIONS: dict[str, Any] = {
    "steps_stage1": 2,
    "steps_stage2": 2,
    "texture_size": 128,
    "preview_size": 128,
}
