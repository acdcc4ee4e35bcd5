"""SD-2.1 KL autoencoder of CRM (``vae_model.*``) as a diffusers ``AutoencoderKL``.

The official model is the CompVis/LDM ``AutoencoderKL`` (GroupNorm(32, eps 1e-6), swish, one
single-head attention in each mid block, asymmetric zero-pad + stride-2 conv downsampling, nearest
x2 + conv upsampling). diffusers' ``AutoencoderKL`` computes the same thing; only the parameter
names differ, which `convert_ldm_vae_state_dict` / `ldm_vae_keys_from_diffusers` translate.

Shapes: images (B, 3, H, W) in [-1, 1] <-> latents (B, 4, H/8, W/8). Pipeline latents are
"scaled": ``0.18215 * posterior_sample``.

No file I/O here: callers read state dicts (``pipeline.weights.checkpoints``) and pass them in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "VAEConfig",
    "VAEKeyError",
    "build_vae",
    "convert_ldm_vae_state_dict",
    "diffusers_vae_key_from_ldm",
    "ldm_vae_key_from_diffusers",
    "ldm_vae_keys_from_diffusers",
    "vae_decode",
    "vae_encode_posterior",
    "vae_sample_scaled_latent",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class VAEKeyError(KeyError):
    """VAE weights with keys that have no counterpart (listed in ``.keys``)."""

    def __init__(self, message: str, keys: Iterable[str] = ()):
        super().__init__(message)
        self.keys = sorted(keys)

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class VAEConfig:
    """diffusers ``AutoencoderKL`` settings (defaults: SD-2.1 VAE, as in CRM).

    Fields:
        in_channels, out_channels: image channels (3).
        block_out_channels: channels per level = ldm ``ch * ch_mult`` ([128, 256, 512, 512]); the
            number of levels minus one is the number of x2 downsamplings (x8 for 4 levels).
        layers_per_block: ldm ``num_res_blocks`` (encoder; the decoder uses one more).
        latent_channels: ldm ``z_channels`` == ``embed_dim`` (4).
        norm_num_groups: GroupNorm groups (32; eps is fixed at 1e-6 by diffusers, as in ldm).
        sample_size: nominal image size (informational; any multiple of 8 works).
        scale_factor: latent scaling (0.18215): scaled latent = scale_factor * posterior sample.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 256
    scale_factor: float = 0.18215

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_fixture_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> VAEConfig:
        """Build from an ldm VAE config.

        Accepts a whole fixture ``config_json`` (``model.params.vae_config``), a
        ``{"target", "params"}`` entry, its ``params`` (``{"embed_dim", "ddconfig"}``) or the
        ``ddconfig`` itself. ``scale_factor`` is taken from ``model.params`` when present.
        """
        cfg = dict(cfg)
        scale = None
        if "model" in cfg:
            model_params = cfg["model"].get("params", {})
            scale = model_params.get("scale_factor")
            cfg = dict(model_params["vae_config"])
        if "params" in cfg and "target" in cfg:
            cfg = dict(cfg["params"])
        embed_dim = cfg.get("embed_dim")
        dd = dict(cfg.get("ddconfig", cfg))
        z = int(dd.get("z_channels", 4))
        if embed_dim is not None and int(embed_dim) != z:
            raise ValueError(
                f"embed_dim {embed_dim} != z_channels {z}: not representable by diffusers AutoencoderKL"
            )
        if not dd.get("double_z", True):
            raise ValueError("double_z=False (deterministic encoder) is not supported")
        if list(dd.get("attn_resolutions", [])):
            raise ValueError(
                f"attn_resolutions {dd['attn_resolutions']} not supported (SD VAEs have only a mid attention)"
            )
        if float(dd.get("dropout", 0.0)) != 0.0:
            raise ValueError("dropout must be 0 for inference parity")
        ch = int(dd.get("ch", 128))
        kwargs: dict[str, Any] = dict(
            in_channels=int(dd.get("in_channels", 3)),
            out_channels=int(dd.get("out_ch", 3)),
            block_out_channels=[ch * int(m) for m in dd.get("ch_mult", [1, 2, 4, 4])],
            layers_per_block=int(dd.get("num_res_blocks", 2)),
            latent_channels=z,
            sample_size=int(dd.get("resolution", 256)),
        )
        if scale is not None:
            kwargs["scale_factor"] = float(scale)
        kwargs.update(overrides)
        return cls(**kwargs)


def build_vae(cfg: VAEConfig | None = None):
    """A randomly initialised diffusers ``AutoencoderKL`` for ``cfg`` (in eval mode).

    Build under ``torch.device("meta")`` to get shapes without allocating memory.
    """
    from diffusers import AutoencoderKL

    cfg = cfg or VAEConfig()
    n = len(cfg.block_out_channels)
    vae = AutoencoderKL(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        scaling_factor=cfg.scale_factor,
    )
    return vae.eval()


# ---------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------

_RESNET_PARTS = {"norm1", "conv1", "norm2", "conv2"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_PARTS_INV = {v: k for k, v in _ATTN_PARTS.items()}


def _strip_prefix(key: str) -> str:
    return key[len("vae_model.") :] if key.startswith("vae_model.") else key


def diffusers_vae_key_from_ldm(key: str, num_levels: int) -> str | None:
    """One ldm VAE key (``vae_model.`` prefix optional) -> the diffusers key, or None if unknown."""
    key = _strip_prefix(key)
    m = re.match(r"^(quant_conv|post_quant_conv)\.(weight|bias)$", key)
    if m:
        return key
    m = re.match(r"^(encoder|decoder)\.(.+)$", key)
    if not m:
        return None
    part, rest = m.groups()
    m = re.match(r"^(conv_in|conv_out)\.(weight|bias)$", rest)
    if m:
        return f"{part}.{rest}"
    m = re.match(r"^norm_out\.(weight|bias)$", rest)
    if m:
        return f"{part}.conv_norm_out.{m.group(1)}"
    m = re.match(r"^mid\.block_([12])\.(\w+)\.(weight|bias)$", rest)
    if m:
        name = "conv_shortcut" if m.group(2) == "nin_shortcut" else m.group(2)
        if name not in _RESNET_PARTS | {"conv_shortcut"}:
            return None
        return f"{part}.mid_block.resnets.{int(m.group(1)) - 1}.{name}.{m.group(3)}"
    m = re.match(r"^mid\.attn_1\.(\w+)\.(weight|bias)$", rest)
    if m:
        if m.group(1) not in _ATTN_PARTS:
            return None
        return f"{part}.mid_block.attentions.0.{_ATTN_PARTS[m.group(1)]}.{m.group(2)}"
    level_word, block_word = ("down", "down_blocks") if part == "encoder" else ("up", "up_blocks")
    m = re.match(rf"^{level_word}\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)$", rest)
    if m:
        i, j, name, wb = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if i >= num_levels:
            return None
        name = "conv_shortcut" if name == "nin_shortcut" else name
        if name not in _RESNET_PARTS | {"conv_shortcut"}:
            return None
        level = i if part == "encoder" else num_levels - 1 - i
        return f"{part}.{block_word}.{level}.resnets.{j}.{name}.{wb}"
    sampler = "downsample" if part == "encoder" else "upsample"
    m = re.match(rf"^{level_word}\.(\d+)\.{sampler}\.conv\.(weight|bias)$", rest)
    if m:
        i = int(m.group(1))
        if i >= num_levels:
            return None
        level = i if part == "encoder" else num_levels - 1 - i
        kind = "downsamplers" if part == "encoder" else "upsamplers"
        return f"{part}.{block_word}.{level}.{kind}.0.conv.{m.group(2)}"
    return None


def ldm_vae_key_from_diffusers(key: str, num_levels: int) -> str | None:
    """One diffusers ``AutoencoderKL`` key -> the ldm key (without ``vae_model.``), or None."""
    if re.match(r"^(quant_conv|post_quant_conv)\.(weight|bias)$", key):
        return key
    m = re.match(r"^(encoder|decoder)\.(.+)$", key)
    if not m:
        return None
    part, rest = m.groups()
    if re.match(r"^(conv_in|conv_out)\.(weight|bias)$", rest):
        return key
    m = re.match(r"^conv_norm_out\.(weight|bias)$", rest)
    if m:
        return f"{part}.norm_out.{m.group(1)}"
    m = re.match(r"^mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)$", rest)
    if m:
        name = "nin_shortcut" if m.group(2) == "conv_shortcut" else m.group(2)
        return f"{part}.mid.block_{int(m.group(1)) + 1}.{name}.{m.group(3)}"
    m = re.match(r"^mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", rest)
    if m:
        return f"{part}.mid.attn_1.{_ATTN_PARTS_INV[m.group(1)]}.{m.group(2)}"
    level_word = "down" if part == "encoder" else "up"
    m = re.match(r"^(?:down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)$", rest)
    if m:
        level, j, name, wb = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        i = level if part == "encoder" else num_levels - 1 - level
        name = "nin_shortcut" if name == "conv_shortcut" else name
        return f"{part}.{level_word}.{i}.block.{j}.{name}.{wb}"
    m = re.match(r"^(?:down|up)_blocks\.(\d+)\.(?:downsamplers|upsamplers)\.0\.conv\.(weight|bias)$", rest)
    if m:
        level = int(m.group(1))
        i = level if part == "encoder" else num_levels - 1 - level
        sampler = "downsample" if part == "encoder" else "upsample"
        return f"{part}.{level_word}.{i}.{sampler}.conv.{m.group(2)}"
    return None


def _num_levels_from_ldm_keys(keys: Iterable[str]) -> int:
    levels = [int(m.group(1)) for k in keys if (m := re.search(r"encoder\.down\.(\d+)\.", _strip_prefix(k)))]
    levels += [int(m.group(1)) for k in keys if (m := re.search(r"decoder\.up\.(\d+)\.", _strip_prefix(k)))]
    if not levels:
        raise VAEKeyError("no 'encoder.down.*' / 'decoder.up.*' keys: this is not an ldm VAE state dict")
    return max(levels) + 1


def convert_ldm_vae_state_dict(
    sd: Mapping[str, torch.Tensor], num_levels: int | None = None, ignore_unmapped: bool = False
) -> dict[str, torch.Tensor]:
    """ldm/CompVis VAE weights -> diffusers ``AutoencoderKL`` weights.

    Args:
        sd: keys as in the official checkpoint with the ``vae_model.`` prefix stripped (a
            remaining ``vae_model.`` prefix is also accepted), e.g. ``encoder.down.0.block.0.conv1.weight``.
        num_levels: number of resolution levels (``len(ch_mult)``); inferred from the keys if None.
        ignore_unmapped: skip keys without a diffusers counterpart (e.g. training ``loss.*``)
            instead of raising.
    Returns:
        diffusers-keyed state dict; the mid-attention 1x1 conv weights (C, C, 1, 1) become
        Linear weights (C, C).
    Raises:
        VAEKeyError listing every unmapped key (``.keys``), unless ``ignore_unmapped``.
    """
    num_levels = num_levels or _num_levels_from_ldm_keys(sd)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in sd.items():
        new = diffusers_vae_key_from_ldm(key, num_levels)
        if new is None:
            unmapped.append(key)
            continue
        if ".mid_block.attentions.0.to_" in new and new.endswith(".weight") and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    if unmapped and not ignore_unmapped:
        raise VAEKeyError(
            f"{len(unmapped)} VAE keys have no diffusers AutoencoderKL counterpart: "
            + ", ".join(sorted(unmapped)[:12])
            + (" ..." if len(unmapped) > 12 else ""),
            unmapped,
        )
    return out


def ldm_vae_keys_from_diffusers(keys: Iterable[str], num_levels: int | None = None) -> dict[str, str]:
    """Inverse listing: {diffusers key: ldm key (without ``vae_model.``)} for manifest checks.

    ``num_levels`` is inferred from ``down_blocks.N`` keys when None. Raises `VAEKeyError` for
    diffusers keys without an ldm counterpart.
    """
    keys = list(keys)
    if num_levels is None:
        levels = [int(m.group(1)) for k in keys if (m := re.match(r"^encoder\.down_blocks\.(\d+)\.", k))]
        if not levels:
            raise VAEKeyError("no 'encoder.down_blocks.*' keys: not a diffusers AutoencoderKL state dict")
        num_levels = max(levels) + 1
    out, unmapped = {}, []
    for k in keys:
        ldm = ldm_vae_key_from_diffusers(k, num_levels)
        if ldm is None:
            unmapped.append(k)
        else:
            out[k] = ldm
    if unmapped:
        raise VAEKeyError(
            f"{len(unmapped)} diffusers VAE keys have no ldm counterpart: {unmapped[:12]}", unmapped
        )
    return out


# ---------------------------------------------------------------------------------------------
# Encode / decode
# ---------------------------------------------------------------------------------------------


def vae_encode_posterior(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Diagonal-Gaussian posterior of the images, as the official ``DiagonalGaussianDistribution``.

    Args:
        vae: diffusers ``AutoencoderKL``.
        images: (B, 3, H, W) in [-1, 1], H and W multiples of the downsampling factor (8).
    Returns:
        (mean, logvar, std), each (B, latent_channels, H/8, W/8); logvar is clamped to [-30, 20]
        and std = exp(0.5 * logvar). Latents are NOT scaled.
    """
    if images.ndim != 4 or images.shape[1] != vae.config.in_channels:
        raise ValueError(f"images must be (B, {vae.config.in_channels}, H, W), got {tuple(images.shape)}")
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if images.shape[-1] % factor or images.shape[-2] % factor:
        raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {factor}")
    param = next(vae.parameters())
    h = vae.encoder(images.to(device=param.device, dtype=param.dtype))
    if getattr(vae, "quant_conv", None) is not None:
        h = vae.quant_conv(h)
    mean, logvar = torch.chunk(h, 2, dim=1)
    logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
    std = torch.exp(0.5 * logvar)
    return mean, logvar, std


def vae_sample_scaled_latent(
    mean: torch.Tensor,
    std: torch.Tensor,
    scale_factor: float,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``scale_factor * (mean + std * noise)`` (the official code samples, it does not take the mode).

    ``noise`` (same shape as mean) is drawn with ``torch.randn`` on the CPU generator when None
    (as the official code does on CUDA), then moved to mean's device.
    """
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu")
    noise = noise.to(device=mean.device, dtype=mean.dtype)
    return scale_factor * (mean + std * noise)


def vae_decode(vae, latents_scaled: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Scaled latents (B, latent_channels, h, w) -> images (B, 3, 8h, 8w), float, NOT clamped
    (roughly [-1, 1]; the caller clamps/quantises)."""
    if latents_scaled.ndim != 4 or latents_scaled.shape[1] != vae.config.latent_channels:
        raise ValueError(
            f"latents must be (B, {vae.config.latent_channels}, h, w), got {tuple(latents_scaled.shape)}"
        )
    param = next(vae.parameters())
    z = latents_scaled.to(device=param.device, dtype=param.dtype) / scale_factor
    return vae.decode(z).sample
