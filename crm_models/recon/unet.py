"""The triplane U-Net: a diffusers `UNet2DModel` plus a learned plane (SPEC §5).

Parameter names match the official checkpoint: `learned_plane` (1, c_dim - 12, R, 3R) and `unet.*`.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn

from .config import INPUT_CHANNELS, ReconConfig


def build_unet2d(cfg: ReconConfig) -> UNet2DModel:
    """The diffusers `UNet2DModel` with CRM's arguments (everything else left at diffusers defaults)."""
    u = cfg.unet
    return UNet2DModel(
        sample_size=[cfg.plane_resolution, 3 * cfg.plane_resolution],
        in_channels=cfg.c_dim,
        out_channels=cfg.c_dim,
        layers_per_block=u.layers_per_block,
        block_out_channels=tuple(u.block_out_channels),
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        attention_head_dim=u.attention_head_dim,
        norm_num_groups=u.norm_num_groups,
        norm_eps=u.norm_eps,
    )


class TriplaneUNet(nn.Module):
    """U-Net mapping the noised 12-channel input (+ learned plane) to the rolled-out triplane.

    Attributes:
        learned_plane: (1, c_dim - 12, R, 3R) parameter, concatenated after the 12 data channels.
        unet: diffusers `UNet2DModel` (in/out channels c_dim).
    """

    def __init__(self, cfg: ReconConfig):
        super().__init__()
        self.cfg = cfg
        r = cfg.plane_resolution
        self.learned_plane = nn.Parameter(torch.zeros(1, cfg.learned_plane_channels, r, 3 * r))
        self.unet = build_unet2d(cfg)
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> TriplaneUNet:
        """Run the convolutions in NHWC memory layout (about 10 % faster on CPU; same math, results
        differ only by float rounding, ~1e-5). Off by default."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.unet.to(memory_format=fmt)
        self.channels_last = bool(enabled)
        return self

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | int) -> torch.Tensor:
        """(B, 12, R, 3R) noised input, timestep -> (B, c_dim, R, 3R) rolled-out triplane.

        An input that already has c_dim channels is passed through unchanged (no learned plane).
        """
        if x.ndim != 4:
            raise ValueError(f"U-Net input must be (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] < self.cfg.c_dim:
            if x.shape[1] != INPUT_CHANNELS:
                raise ValueError(f"U-Net input has {x.shape[1]} channels, expected {INPUT_CHANNELS}")
            if tuple(x.shape[2:]) != tuple(self.learned_plane.shape[2:]):
                raise ValueError(
                    f"U-Net input is {tuple(x.shape[2:])} pixels, the learned plane "
                    f"{tuple(self.learned_plane.shape[2:])}"
                )
            plane = self.learned_plane.to(x.dtype).expand(x.shape[0], -1, -1, -1)
            x = torch.cat([x, plane], dim=1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.unet(x, timestep).sample.contiguous()
