"""CRM's multi-view diffusion stages (stage 1: reference -> 6 RGB views; stage 2: views -> 6 CCMs).

Main entry points: `MultiViewDiffusionModel` (weights, official key conversion) and
`MultiViewSampler` (the official sampling chain). See docs/multiview.md.
"""

from .cameras import VIEW_ORDER, camera_matrix, camera_tensor, stage_cameras
from .config import NEGATIVE_PROMPT, PROMPT, MultiViewUNetConfig, SamplerConfig, StageConfig
from .key_mapping import split_official_state_dict, unet_block_table, unet_ldm_to_ours, unet_ours_to_ldm
from .resampler import Resampler
from .sampler import (
    MultiViewOutput,
    MultiViewSampler,
    RecordedDraws,
    images_to_model_input,
    strips_to_views,
    to_uint8_images,
    views_to_strips,
)
from .schedule import ScheduleConfig, ddim_timesteps, make_ddim_scheduler, schedule_buffers
from .stage_model import ConvertedStateDict, MultiViewDiffusionModel
from .unet import IPCrossAttnProcessor, MultiViewSelfAttnProcessor, MultiViewUNet

__all__ = [
    "NEGATIVE_PROMPT",
    "PROMPT",
    "VIEW_ORDER",
    "ConvertedStateDict",
    "IPCrossAttnProcessor",
    "MultiViewDiffusionModel",
    "MultiViewOutput",
    "MultiViewSampler",
    "MultiViewSelfAttnProcessor",
    "MultiViewUNet",
    "MultiViewUNetConfig",
    "RecordedDraws",
    "Resampler",
    "SamplerConfig",
    "ScheduleConfig",
    "StageConfig",
    "camera_matrix",
    "camera_tensor",
    "ddim_timesteps",
    "images_to_model_input",
    "make_ddim_scheduler",
    "schedule_buffers",
    "split_official_state_dict",
    "stage_cameras",
    "strips_to_views",
    "to_uint8_images",
    "unet_block_table",
    "unet_ldm_to_ours",
    "unet_ours_to_ldm",
    "views_to_strips",
]
