"""Official (ldm) state-dict keys <-> this package's modules, as pure functions.

Official checkpoints (`pixel-diffusion.pth`, `ccm-diffusion.pth`) hold, under one
`LatentDiffusionInterface`:

- `model.diffusion_model.*`: the multi-view UNet -> `MultiViewUNet` (`unet_ldm_to_ours`);
- `vae_model.*`: the KL autoencoder -> diffusers AutoencoderKL (delegated to `vae.py`);
- `clip_model.model.*`: open_clip ViT-H-14 -> transformers CLIP towers (delegated to `clip_encoders.py`);
- 12 schedule buffers without prefix.

Every function returns `(mapped, unmapped)`: the converted tensors and the input keys it could not
place. Callers decide what is an error (see `pipeline.weights.multiview`). The tables are derived
from the UNet config, so tiny and full configs share one code path.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import MultiViewUNetConfig
from .schedule import SCHEDULE_BUFFER_NAMES

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "vae_model."
CLIP_PREFIX = "clip_model.model."

# ldm ResBlock -> diffusers ResnetBlock2D
_RESNET_RENAMES = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
# Inside a transformer, only the IP weights move (they live in the attn2 processor).
_TRANSFORMER_RENAMES = (
    ("attn2.to_k_ip.", "attn2.processor.to_k_ip."),
    ("attn2.to_v_ip.", "attn2.processor.to_v_ip."),
)


def unet_block_table(cfg: MultiViewUNetConfig) -> list[tuple[str, str, str]]:
    """(ldm prefix, our prefix, kind) for every UNet block; kind in {plain, resnet, transformer}.

    Prefixes are relative to `model.diffusion_model.` (ldm) and to `MultiViewUNet` (ours).
    """
    levels, nrb = len(cfg.channel_mult), cfg.num_res_blocks
    has_attn = cfg.level_has_attention
    table = [
        ("time_embed.0.", "unet.time_embedding.linear_1.", "plain"),
        ("time_embed.2.", "unet.time_embedding.linear_2.", "plain"),
        ("camera_embed.0.", "unet.class_embedding.linear_1.", "plain"),
        ("camera_embed.2.", "unet.class_embedding.linear_2.", "plain"),
        ("input_blocks.0.0.", "unet.conv_in.", "plain"),
        ("out.0.", "unet.conv_norm_out.", "plain"),
        ("out.2.", "unet.conv_out.", "plain"),
        ("middle_block.0.", "unet.mid_block.resnets.0.", "resnet"),
        ("middle_block.1.", "unet.mid_block.attentions.0.", "transformer"),
        ("middle_block.2.", "unet.mid_block.resnets.1.", "resnet"),
    ]
    idx = 1
    for k in range(levels):
        for j in range(nrb):
            table.append((f"input_blocks.{idx}.0.", f"unet.down_blocks.{k}.resnets.{j}.", "resnet"))
            if has_attn[k]:
                table.append(
                    (f"input_blocks.{idx}.1.", f"unet.down_blocks.{k}.attentions.{j}.", "transformer")
                )
            idx += 1
        if k < levels - 1:
            table.append((f"input_blocks.{idx}.0.op.", f"unet.down_blocks.{k}.downsamplers.0.conv.", "plain"))
            idx += 1
    idx = 0
    for u in range(levels):
        attn = has_attn[levels - 1 - u]
        for j in range(nrb + 1):
            table.append((f"output_blocks.{idx}.0.", f"unet.up_blocks.{u}.resnets.{j}.", "resnet"))
            if attn:
                table.append(
                    (f"output_blocks.{idx}.1.", f"unet.up_blocks.{u}.attentions.{j}.", "transformer")
                )
            if j == nrb and u < levels - 1:
                pos = 2 if attn else 1
                table.append(
                    (f"output_blocks.{idx}.{pos}.conv.", f"unet.up_blocks.{u}.upsamplers.0.conv.", "plain")
                )
            idx += 1
    return table


def _rename_inner(rest: str, kind: str, inverse: bool = False) -> str:
    renames = {"resnet": _RESNET_RENAMES, "transformer": _TRANSFORMER_RENAMES}.get(kind, ())
    for a, b in renames:
        src, dst = (b, a) if inverse else (a, b)
        if kind == "resnet" and rest.startswith(src):
            return dst + rest[len(src) :]
        if kind == "transformer" and src in rest:
            return rest.replace(src, dst)
    return rest


def _resampler_ldm_to_ours(rest: str) -> str | None:
    """ldm Resampler key (after `image_embed.`) -> diffusers IPAdapterPlusImageProjection key; None: to_kv."""
    parts = rest.split(".")
    if parts[0] in ("latents", "proj_in", "proj_out", "norm_out"):
        return rest
    if parts[0] != "layers" or len(parts) < 4:
        raise KeyError(rest)
    i, sub, tail = parts[1], parts[2], parts[3:]
    if sub == "0":
        name = {"norm1": "ln0", "norm2": "ln1", "to_q": "attn.to_q", "to_out": "attn.to_out.0"}.get(tail[0])
        if tail[0] == "to_kv":
            return None
        if name is None or len(tail) != 2:
            raise KeyError(rest)
        return f"layers.{i}.{name}.{tail[1]}"
    if sub == "1" and len(tail) == 2:
        name = {"0": "ff.0", "1": "ff.1.net.0.proj", "3": "ff.1.net.2"}.get(tail[0])
        if name is not None:
            return f"layers.{i}.{name}.{tail[1]}"
    raise KeyError(rest)


def unet_ldm_to_ours(
    sd: Mapping[str, torch.Tensor], cfg: MultiViewUNetConfig, prefix: str = UNET_PREFIX
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official UNet keys (`prefix` + ldm name) -> `MultiViewUNet.state_dict()` keys.

    Keys not starting with `prefix` are ignored (not reported); keys under it that fit no block are
    returned as unmapped. The Resampler's fused `to_kv` is split row-wise into `to_k` / `to_v`.
    """
    table = unet_block_table(cfg)
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name.startswith("image_embed."):
            rest = name[len("image_embed.") :]
            try:
                new = _resampler_ldm_to_ours(rest)
            except KeyError:
                unmapped.append(key)
                continue
            if new is None:  # layers.i.0.to_kv.weight: (2*inner, D) -> to_k (first half), to_v
                i = rest.split(".")[1]
                k_w, v_w = value.chunk(2, dim=0)
                mapped[f"resampler.layers.{i}.attn.to_k.weight"] = k_w
                mapped[f"resampler.layers.{i}.attn.to_v.weight"] = v_w
            else:
                mapped["resampler." + new] = value
            continue
        for ldm, ours, kind in table:
            if name.startswith(ldm):
                mapped[ours + _rename_inner(name[len(ldm) :], kind)] = value
                break
        else:
            unmapped.append(key)
    return mapped, unmapped


def unet_ours_to_ldm(
    sd: Mapping[str, torch.Tensor], cfg: MultiViewUNetConfig, prefix: str = UNET_PREFIX
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inverse of `unet_ldm_to_ours`: `MultiViewUNet.state_dict()` -> official keys (with `prefix`)."""
    table = sorted(unet_block_table(cfg), key=lambda row: -len(row[1]))  # longest our-prefix first
    mapped: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    pending_kv: dict[str, dict[str, torch.Tensor]] = {}
    inv_res = {"ln0": "0.norm1", "ln1": "0.norm2", "attn.to_q": "0.to_q", "attn.to_out.0": "0.to_out"}
    inv_res |= {"ff.0": "1.0", "ff.1.net.0.proj": "1.1", "ff.1.net.2": "1.3"}
    for key, value in sd.items():
        if key.startswith("resampler."):
            rest = key[len("resampler.") :]
            parts = rest.split(".")
            if parts[0] in ("latents", "proj_in", "proj_out", "norm_out"):
                mapped[prefix + "image_embed." + rest] = value
                continue
            if parts[0] == "layers":
                i, mid, leaf = parts[1], ".".join(parts[2:-1]), parts[-1]
                if mid in ("attn.to_k", "attn.to_v"):
                    pending_kv.setdefault(i, {})[mid] = value
                    continue
                if mid in inv_res:
                    mapped[f"{prefix}image_embed.layers.{i}.{inv_res[mid]}.{leaf}"] = value
                    continue
            unmapped.append(key)
            continue
        for ldm, ours, kind in table:
            if key.startswith(ours):
                mapped[prefix + ldm + _rename_inner(key[len(ours) :], kind, inverse=True)] = value
                break
        else:
            unmapped.append(key)
    for i, kv in pending_kv.items():
        if set(kv) != {"attn.to_k", "attn.to_v"}:
            unmapped.extend(f"resampler.layers.{i}.{m}.weight" for m in kv)
            continue
        mapped[f"{prefix}image_embed.layers.{i}.0.to_kv.weight"] = torch.cat(
            [kv["attn.to_k"], kv["attn.to_v"]]
        )
    return mapped, unmapped


def split_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group official keys by component: {"unet", "vae", "clip", "schedule", "other"} (prefixes stripped
    for vae and clip; unet keeps its full keys; schedule uses the bare buffer names)."""
    groups: dict[str, dict[str, torch.Tensor]] = {
        "unet": {},
        "vae": {},
        "clip": {},
        "schedule": {},
        "other": {},
    }
    for key, value in sd.items():
        if key.startswith(UNET_PREFIX):
            groups["unet"][key] = value
        elif key.startswith(VAE_PREFIX):
            groups["vae"][key[len(VAE_PREFIX) :]] = value
        elif key.startswith(CLIP_PREFIX):
            groups["clip"][key[len(CLIP_PREFIX) :]] = value
        elif key in SCHEDULE_BUFFER_NAMES:
            groups["schedule"][key] = value
        else:
            groups["other"][key] = value
    return groups
