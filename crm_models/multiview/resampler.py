"""Image-prompt Resampler: CLIP local tokens (B, 257, 1280) -> (B, ip_dim, context_dim) tokens.

This is the IP-Adapter-Plus perceiver, i.e. diffusers `IPAdapterPlusImageProjection`: learned
queries cross-attend (12 heads x 64) to the projected CLIP tokens concatenated with themselves,
4 layers with a GELU feed-forward, then proj_out + LayerNorm. The unconditional branch feeds
zeros; its output is not zero (biases, learned queries).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import IPAdapterPlusImageProjection

from .config import MultiViewUNetConfig


class Resampler(IPAdapterPlusImageProjection):
    """diffusers `IPAdapterPlusImageProjection` configured from a `MultiViewUNetConfig`."""

    def __init__(self, cfg: MultiViewUNetConfig):
        super().__init__(
            embed_dims=cfg.ip_embed_dim,
            output_dims=cfg.context_dim,
            hidden_dims=cfg.context_dim,
            depth=cfg.resampler_depth,
            dim_head=cfg.resampler_dim_head,
            heads=cfg.resampler_heads,
            num_queries=cfg.ip_dim,
            ffn_ratio=cfg.resampler_ff_mult,
        )
        self.embed_dim = cfg.ip_embed_dim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, ip_embed_dim) -> (B, ip_dim, context_dim)."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"image tokens must be (B, N, {self.embed_dim}), got {tuple(tokens.shape)}")
        return super().forward(tokens)
