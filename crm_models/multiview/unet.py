"""Multi-view diffusion UNet of CRM (stage 1: pixel diffusion, stage 2: CCM diffusion).

Built on diffusers' `UNet2DConditionModel` (SD-2.1 layout: ResnetBlock2D, Transformer2DModel with
linear projections, Downsample2D/Upsample2D, Timesteps/TimestepEmbedding). CRM's additions:

- camera MLP (16 -> 4C -> 4C) added to the time embedding: diffusers' `class_embed_type="projection"`
  with the flattened camera as `class_labels`;
- multi-view self-attention (`MultiViewSelfAttnProcessor`): the tokens of all F frames of one
  object attend jointly; frames of different objects never attend to each other. The batch is
  objects x frames, the frames of one object consecutive;
- image-prompt tokens: the `Resampler` turns CLIP local tokens (257 x 1280) into `ip_dim` tokens
  appended after the text context; every cross-attention (`IPCrossAttnProcessor`) attends to the
  text with `to_k`/`to_v` and to the image tokens with its own `to_k_ip`/`to_v_ip`, summing both;
- stage 1 ("pixel control"): frame F-1 of every object is overwritten by the clean reference
  latent before the UNet runs; stage 2: the stage-1 view latents are concatenated on the channel
  axis (8 input channels).

All attention goes through `F.scaled_dot_product_attention` (no attention matrix is formed in
Python); `attention_chunk` bounds the queries per call if a backend would materialise it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from .config import MultiViewUNetConfig
from .resampler import Resampler


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (b, h, n, d) tensors, optionally in query chunks."""
    if chunk is None or q.shape[2] <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [F.scaled_dot_product_attention(q[:, :, i : i + chunk], k, v) for i in range(0, q.shape[2], chunk)],
        dim=2,
    )


class MultiViewSelfAttnProcessor:
    """Self-attention (attn1) over the tokens of all frames of one object.

    hidden_states (B, N, C) with B = objects * num_frames -> (B, N, C). Projections act per token;
    only the attention product sees the (objects, num_frames * N) grouping.
    """

    def __init__(self, attention_chunk: int | None = None):
        self.attention_chunk = attention_chunk

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("multi-view self-attention takes no context and no mask")
        batch, tokens, _ = hidden_states.shape
        if batch % num_frames:
            raise ValueError(f"batch {batch} is not a multiple of num_frames {num_frames}")
        objects, heads = batch // num_frames, attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = q.shape[-1] // heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, h*d) -> (objects, h, F*N, d)
            return t.reshape(objects, num_frames * tokens, heads, head_dim).transpose(1, 2)

        out = _sdpa(split(q), split(k), split(v), self.attention_chunk)
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class IPCrossAttnProcessor(nn.Module):
    """Cross-attention (attn2) to text tokens plus `num_tokens` image tokens (IP-Adapter style).

    The context (R, T + num_tokens, D) is split: the last `num_tokens` rows are the image tokens.
    out = to_out(attn(q, k_txt, v_txt) + scale * attn(q, k_ip, v_ip)).

    R is the batch B (one context per frame) or B / num_frames (one context per object, shared by
    its frames, as the sampler passes it): then keys and values are projected once per object and
    the queries of all its frames attend in one call. Each query's result is the same either way
    (attention is independent per query), at a fraction of the key / value projection cost.
    """

    def __init__(self, hidden_size: int, context_dim: int, num_tokens: int, scale: float = 1.0, chunk=None):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden_size, bias=False)
        self.num_tokens = num_tokens
        self.scale = scale
        self.attention_chunk = chunk

    def __call__(  # overrides nn.Module.__call__ so diffusers sees the keyword arguments
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_frames: int = 1,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_tokens:
            raise ValueError(
                f"cross-attention needs a context of text tokens + {self.num_tokens} image tokens"
            )
        if attention_mask is not None:
            raise ValueError("IP cross-attention takes no mask")
        batch, tokens, _ = hidden_states.shape
        groups, heads = encoder_hidden_states.shape[0], attn.heads
        if groups not in (batch, batch // num_frames) or batch % groups:
            objects = batch // num_frames
            raise ValueError(f"context has {groups} rows; expected {batch} or {objects} (per frame / object)")
        text = encoder_hidden_states[:, : -self.num_tokens].contiguous()
        image = encoder_hidden_states[:, -self.num_tokens :].contiguous()
        q = attn.to_q(hidden_states)
        head_dim = q.shape[-1] // heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (rows, n, h*d) -> (groups, h, rows/groups*n, d)
            return t.reshape(groups, -1, heads, head_dim).transpose(1, 2)

        q = split(q)
        out = _sdpa(q, split(attn.to_k(text)), split(attn.to_v(text)), self.attention_chunk)
        out_ip = _sdpa(q, split(self.to_k_ip(image)), split(self.to_v_ip(image)), self.attention_chunk)
        out = out + self.scale * out_ip
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def diffusers_unet_kwargs(cfg: MultiViewUNetConfig) -> dict:
    """`UNet2DConditionModel` constructor arguments equivalent to the official UNet config."""
    has_attn = cfg.level_has_attention
    return dict(
        sample_size=None,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        downsample_padding=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name for the number of heads
        use_linear_projection=True,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=cfg.camera_dim,
        flip_sin_to_cos=True,
        freq_shift=0,
        upcast_attention=False,
        resnet_time_scale_shift="default",
    )


def _context_rows(
    context: torch.Tensor, image_embeds: torch.Tensor, batch: int, num_frames: int
) -> torch.Tensor:
    """(rows, T + ip_dim, D) cross-attention context: one row per object when both inputs have one
    row per object (or a single row), else one row per frame."""
    objects = batch // num_frames
    rows = {"context": context.shape[0], "image_embeds": image_embeds.shape[0]}
    for name, n in rows.items():
        if n not in (batch, objects, 1):
            raise ValueError(
                f"{name} has {n} rows; expected {batch} (per frame), {objects} (per object) or 1"
            )
    target = batch if batch in rows.values() and batch != objects else objects

    def expand(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == target:
            return t
        if t.shape[0] == 1:
            return t.expand(target, *t.shape[1:])
        return t.repeat_interleave(num_frames, dim=0)  # per object -> per frame

    return torch.cat([expand(context), expand(image_embeds)], dim=1)


class MultiViewUNet(nn.Module):
    """Noise predictor of one multi-view stage (see module docstring).

    Submodules: `unet` (diffusers UNet2DConditionModel with the camera MLP as `class_embedding`
    and the processors above) and `resampler`.
    """

    def __init__(self, cfg: MultiViewUNetConfig, attention_chunk: int | None = None):
        super().__init__()
        self.config = cfg
        self.unet = UNet2DConditionModel(**diffusers_unet_kwargs(cfg))
        self.resampler = Resampler(cfg)
        processors = {}
        for name in self.unet.attn_processors:
            if ".attn1." in name:
                processors[name] = MultiViewSelfAttnProcessor(attention_chunk)
            elif ".attn2." in name:
                attn = self.unet.get_submodule(name.removesuffix(".processor"))
                processors[name] = IPCrossAttnProcessor(
                    attn.inner_dim, cfg.context_dim, cfg.ip_dim, cfg.ip_weight, attention_chunk
                )
            else:
                raise RuntimeError(f"unexpected attention module {name}")
        self.unet.set_attn_processor(processors)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    def encode_image_prompt(self, ip_tokens: torch.Tensor) -> torch.Tensor:
        """CLIP local tokens (N, 257, ip_embed_dim) -> image-prompt tokens (N, ip_dim, context_dim)."""
        return self.resampler(ip_tokens.to(self.dtype))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        camera: torch.Tensor,
        num_frames: int,
        ip_tokens: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        ip_img: torch.Tensor | None = None,
        pixel_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the noise of `x`.

        Args:
            x: (B, 4, h, w) noisy latents, B = objects * num_frames, frames of an object consecutive.
            timesteps: (B,) or scalar int timesteps.
            context: (B | objects, T, context_dim) text features.
            camera: (B | 1, camera_dim) flattened cameras (zero row for the reference frame).
            num_frames: frames per object F.
            ip_tokens: (B | objects, 257, ip_embed_dim) CLIP local tokens (zeros for unconditional),
                or instead `image_embeds`: (B | objects, ip_dim, context_dim) precomputed
                `encode_image_prompt` output (constant over a sampling run).
            ip_img: stage 1 only, (objects, 4, h, w) clean reference latents written into frame F-1
                of every object (zeros for the unconditional rows). x itself is not modified.
            pixel_latents: stage 2 only, (B, 4, h, w) latents of the stage-1 views (zeros: unconditional).

        Returns:
            (B, out_channels, h, w) predicted noise.
        """
        cfg = self.config
        batch = x.shape[0]
        if x.ndim != 4 or x.shape[1] != cfg.out_channels:
            raise ValueError(f"x must be (B, {cfg.out_channels}, h, w), got {tuple(x.shape)}")
        if batch % num_frames:
            raise ValueError(f"batch {batch} is not a multiple of num_frames {num_frames}")
        dtype = self.dtype
        x = x.to(dtype)
        if cfg.pixel_control:
            if ip_img is None:
                raise ValueError("stage-1 UNet needs ip_img (reference latents, zeros for unconditional)")
            if ip_img.shape != (batch // num_frames, *x.shape[1:]):
                raise ValueError(
                    f"ip_img must be {(batch // num_frames, *x.shape[1:])}, got {tuple(ip_img.shape)}"
                )
            x = x.clone()
            x[num_frames - 1 :: num_frames] = ip_img.to(dtype)
        elif ip_img is not None:
            raise ValueError("ip_img is only used by the stage-1 UNet")
        if cfg.stage == 2:
            if pixel_latents is None or pixel_latents.shape != x.shape:
                got = None if pixel_latents is None else tuple(pixel_latents.shape)
                raise ValueError(f"stage-2 UNet needs pixel_latents of shape {tuple(x.shape)}, got {got}")
            x = torch.cat([x, pixel_latents.to(dtype)], dim=1)
        elif pixel_latents is not None:
            raise ValueError("pixel_latents are only used by the stage-2 UNet")
        if image_embeds is None:
            if ip_tokens is None:
                raise ValueError("pass ip_tokens (CLIP local tokens) or image_embeds")
            image_embeds = self.encode_image_prompt(ip_tokens)
        context = _context_rows(context.to(dtype), image_embeds.to(dtype), batch, num_frames)
        camera = camera.to(dtype)
        if camera.shape[0] not in (1, batch):
            raise ValueError(f"camera must have {batch} rows (one per frame) or 1, got {camera.shape[0]}")
        camera = camera.expand(batch, -1)
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        return self.unet(
            x,
            timesteps,
            encoder_hidden_states=context,
            class_labels=camera,
            cross_attention_kwargs={"num_frames": int(num_frames)},
            return_dict=False,
        )[0]

    # ------------------------------------------------------------------ introspection
    def ldm_block_modules(self) -> dict[str, nn.Module]:
        """Our module whose output equals each official block output (ldm names).

        Keys: `time_embed` (time MLP output), `camera_embed`, `image_embed` (Resampler),
        `input_blocks.i`, `middle_block`, `output_blocks.i`.
        """
        cfg, u = self.config, self.unet
        out: dict[str, nn.Module] = {
            "time_embed": u.time_embedding,
            "camera_embed": u.class_embedding,
            "image_embed": self.resampler,
            "input_blocks.0": u.conv_in,
        }
        levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
        idx = 1
        for k, block in enumerate(u.down_blocks):
            for j in range(nrb):
                out[f"input_blocks.{idx}"] = (
                    block.attentions[j] if cfg.level_has_attention[k] else block.resnets[j]
                )
                idx += 1
            if k < levels - 1:
                out[f"input_blocks.{idx}"] = block.downsamplers[0]
                idx += 1
        out["middle_block"] = u.mid_block
        idx = 0
        for k, block in enumerate(u.up_blocks):
            has_attn = cfg.level_has_attention[levels - 1 - k]
            for j in range(nrb + 1):
                mod = block.attentions[j] if has_attn else block.resnets[j]
                if j == nrb and k < levels - 1:
                    mod = block.upsamplers[0]
                out[f"output_blocks.{idx}"] = mod
                idx += 1
        return out

    @contextlib.contextmanager
    def record_intermediates(self) -> Iterator[dict[str, torch.Tensor]]:
        """Context manager collecting every `ldm_block_modules` output of the calls made inside it."""
        record: dict[str, torch.Tensor] = {}
        handles = []
        for name, mod in self.ldm_block_modules().items():

            def hook(_m, _inp, output, name=name):
                record[name] = (output[0] if isinstance(output, tuple) else output).detach()

            handles.append(mod.register_forward_hook(hook))
        try:
            yield record
        finally:
            for h in handles:
                h.remove()
