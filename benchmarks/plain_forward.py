"""Same-maths baselines: CRM's networks written with plain ``torch.nn.functional`` calls.

The benchmarks time our models against these forwards of the *same weights* in the same run
(`bench_recon.py`, `bench_multiview.py`): every convolution, norm, linear, attention and add in the
order the official models make them, no diffusers blocks, no module hooks. They read the weights
from our modules' attributes, so whatever memory layout the weights have (NCHW or NHWC) is what
they run. `tests/test_plain_forward.py` checks both against our models at the tiny configurations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["plain_forward", "plain_unet"]


# ---------------------------------------------------------------------------------- shared pieces
def _gn(m, x):
    return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)


def _ln(m, x):
    return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)


def _lin(m, x):
    return F.linear(x, m.weight, m.bias)


def _conv(m, x):
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding)


def _resnet(r, x, emb, output_scale: bool):
    """diffusers ResnetBlock2D (time embedding added after conv1); `output_scale`: divide the sum by
    its ``output_scale_factor`` as diffusers' UNet2DModel does (the multi-view UNet does not)."""
    h = _conv(r.conv1, F.silu(_gn(r.norm1, x)))
    h = h + _lin(r.time_emb_proj, F.silu(emb))[:, :, None, None]
    h = _conv(r.conv2, F.silu(_gn(r.norm2, h)))
    if r.conv_shortcut is not None:
        x = _conv(r.conv_shortcut, x)
    return (x + h) / r.output_scale_factor if output_scale else x + h


def _timestep_embedding(t, dim: int):
    """Sinusoidal embedding, cos first (flip_sin_to_cos=True, no frequency shift): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    e = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(e), torch.sin(e)], dim=-1)


def _unet_body(u, x, resnet, attend):
    """The U-Net skeleton both networks share: conv_in, down blocks (resnets, each followed by its
    attention where the block has one, then the downsampler), mid block (resnet, attention, resnet),
    up blocks (each resnet on the skip concatenated, attention, nearest x2 upsampler), then
    norm, SiLU, conv_out. `resnet(r, h)` and `attend(a, h)` apply one block of each kind."""
    h = _conv(u.conv_in, x)
    skips = [h]
    for blk in u.down_blocks:
        attns = getattr(blk, "attentions", None)
        for i, r in enumerate(blk.resnets):
            h = resnet(r, h)
            if attns is not None:
                h = attend(attns[i], h)
            skips.append(h)
        if blk.downsamplers is not None:
            h = _conv(blk.downsamplers[0].conv, h)
            skips.append(h)
    mid = u.mid_block
    h = resnet(mid.resnets[1], attend(mid.attentions[0], resnet(mid.resnets[0], h)))
    for blk in u.up_blocks:
        attns = getattr(blk, "attentions", None)
        for i, r in enumerate(blk.resnets):
            h = resnet(r, torch.cat([h, skips.pop()], dim=1))
            if attns is not None:
                h = attend(attns[i], h)
        if blk.upsamplers is not None:
            h = _conv(blk.upsamplers[0].conv, F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(u.conv_out, F.silu(_gn(u.conv_norm_out, h)))


# ---------------------------------------------------------------------------------- reconstruction U-Net
def _attention(a, x):
    """diffusers Attention block of UNet2DModel (group norm, one-head-size SDPA, residual)."""
    b, c, h, w = x.shape
    y = _gn(a.group_norm, x.view(b, c, h * w)).transpose(1, 2)
    d = c // a.heads

    def heads(t):
        return t.view(b, -1, a.heads, d).transpose(1, 2)

    o = F.scaled_dot_product_attention(heads(_lin(a.to_q, y)), heads(_lin(a.to_k, y)), heads(_lin(a.to_v, y)))
    o = _lin(a.to_out[0], o.transpose(1, 2).reshape(b, -1, c))
    return (o.transpose(-1, -2).reshape(b, c, h, w) + x) / a.rescale_output_factor


def plain_unet(u, x, t):
    """diffusers `UNet2DModel.forward` (CRM's configuration) with torch.nn.functional only.

    `u`: the `UNet2DModel` (`TriplaneUNet.unet`); x: (B, c_dim, R, 3R) with the learned plane
    already concatenated; t: (B,) timesteps -> (B, c_dim, R, 3R).
    """
    te = u.time_embedding
    temb = _lin(te.linear_2, F.silu(_lin(te.linear_1, _timestep_embedding(t, u.time_proj.num_channels))))
    return _unet_body(u, x, lambda r, h: _resnet(r, h, temb, True), _attention)


# ---------------------------------------------------------------------------------- multi-view UNet
def _heads(t, groups: int, heads: int):
    """(B, N, h*d) -> (groups, h, B/groups*N, d)."""
    b, n, c = t.shape
    return t.reshape(groups, b // groups * n, heads, c // heads).transpose(1, 2)


def _transformer(tr, x, context, num_frames: int, ip_tokens: int):

    b, c, h, w = x.shape
    residual = x
    y = _gn(tr.norm, x).permute(0, 2, 3, 1).reshape(b, h * w, c)
    y = _lin(tr.proj_in, y)
    blk = tr.transformer_blocks[0]
    # attn1: joint self-attention over the frames of one object
    a1, n = blk.attn1, _ln(blk.norm1, y)
    groups = b // num_frames
    o = F.scaled_dot_product_attention(
        _heads(_lin(a1.to_q, n), groups, a1.heads),
        _heads(_lin(a1.to_k, n), groups, a1.heads),
        _heads(_lin(a1.to_v, n), groups, a1.heads),
    )
    o = o.transpose(1, 2).reshape(b, h * w, -1)
    y = _lin(a1.to_out[0], o) + y
    # attn2: text cross-attention + image-prompt cross-attention, summed
    a2, n = blk.attn2, _ln(blk.norm2, y)
    text, image = context[:, :-ip_tokens], context[:, -ip_tokens:]
    q = _heads(_lin(a2.to_q, n), b, a2.heads)
    o = F.scaled_dot_product_attention(
        q, _heads(_lin(a2.to_k, text), b, a2.heads), _heads(_lin(a2.to_v, text), b, a2.heads)
    )
    p = a2.processor
    o_ip = F.scaled_dot_product_attention(
        q, _heads(_lin(p.to_k_ip, image), b, a2.heads), _heads(_lin(p.to_v_ip, image), b, a2.heads)
    )
    o = (o + p.scale * o_ip).transpose(1, 2).reshape(b, h * w, -1)
    y = _lin(a2.to_out[0], o) + y
    # feed-forward (GEGLU)
    ff, n = blk.ff, _ln(blk.norm3, y)
    hid, gate = _lin(ff.net[0].proj, n).chunk(2, dim=-1)
    y = _lin(ff.net[2], hid * F.gelu(gate)) + y
    y = _lin(tr.proj_out, y)
    return y.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous() + residual


def plain_forward(
    mv, x, timesteps, context, camera, num_frames, image_embeds, ip_img=None, pixel_latents=None
):
    """`MultiViewUNet.forward` written with torch.nn.functional only (same weights, same maths)."""

    u, cfg = mv.unet, mv.config
    b = x.shape[0]
    if cfg.pixel_control:
        x = x.clone()
        x[num_frames - 1 :: num_frames] = ip_img
    if cfg.stage == 2:
        x = torch.cat([x, pixel_latents], dim=1)
    ctx = torch.cat(
        [context.repeat_interleave(num_frames, 0), image_embeds.repeat_interleave(num_frames, 0)], dim=1
    )
    te, ce = u.time_embedding, u.class_embedding
    emb = _lin(te.linear_2, F.silu(_lin(te.linear_1, _timestep_embedding(timesteps, u.conv_in.out_channels))))
    emb = emb + _lin(ce.linear_2, F.silu(_lin(ce.linear_1, camera.expand(b, -1))))
    ip = cfg.ip_dim
    return _unet_body(
        u,
        x,
        lambda r, h: _resnet(r, h, emb, False),
        lambda a, h: _transformer(a, h, ctx, num_frames, ip),
    )
