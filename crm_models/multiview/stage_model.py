"""One multi-view diffusion stage: UNet + VAE + CLIP towers + schedule buffers.

`MultiViewDiffusionModel` mirrors the official `LatentDiffusionInterface`; its weights convert
from / to the official state dict (`model.diffusion_model.*`, `vae_model.*`, `clip_model.model.*`
and 12 schedule buffers) with `convert_official_state_dict` / `official_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .clip_encoders import (
    OpenCLIPConfig,
    OpenCLIPImageEncoder,
    OpenCLIPTextEncoder,
    _convert_open_clip,
    open_clip_key_from_transformers,
)
from .config import StageConfig
from .key_mapping import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    split_official_state_dict,
    unet_ldm_to_ours,
    unet_ours_to_ldm,
)
from .schedule import SCHEDULE_BUFFER_NAMES, schedule_buffers
from .unet import MultiViewUNet
from .vae import (
    VAEConfig,
    build_vae,
    convert_ldm_vae_state_dict,
    diffusers_vae_key_from_ldm,
    ldm_vae_key_from_diffusers,
)


@dataclass
class ConvertedStateDict:
    """Result of mapping an official state dict onto a `MultiViewDiffusionModel`.

    mapped: tensors keyed like `model.state_dict()`.
    unmapped: official keys that fit no module (an error for a strict loader).
    unused: official keys that are known and deliberately not loaded (CLIP parts CRM never runs:
        the last block of each tower with the "penultimate" layer choice, projections, logit_scale).
    components: which components had keys in the input ("unet", "vae", "clip", "schedule").
    """

    mapped: dict[str, torch.Tensor] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    components: set[str] = field(default_factory=set)


class MultiViewDiffusionModel(nn.Module):
    """A multi-view stage (1: RGB views, 2: CCMs).

    Children: `unet` (`MultiViewUNet`), `vae` (diffusers AutoencoderKL), `text_encoder` /
    `image_encoder` (transformers CLIP towers; None when built with `with_clip=False`, then the
    caller supplies text features and CLIP tokens). The 12 schedule buffers are persistent buffers
    under their official names.
    """

    def __init__(
        self,
        cfg: StageConfig | None = None,
        vae_cfg: VAEConfig | None = None,
        clip_cfg: OpenCLIPConfig | None = None,
        with_clip: bool = True,
        attention_chunk: int | None = None,
    ):
        super().__init__()
        self.config = cfg or StageConfig()
        self.vae_config = vae_cfg or VAEConfig(scale_factor=self.config.schedule.scale_factor)
        self.clip_config = clip_cfg or OpenCLIPConfig()
        self.unet = MultiViewUNet(self.config.unet, attention_chunk=attention_chunk)
        self.vae = build_vae(self.vae_config)
        self.text_encoder = OpenCLIPTextEncoder(self.clip_config) if with_clip else None
        self.image_encoder = OpenCLIPImageEncoder(self.clip_config) if with_clip else None
        for name, value in schedule_buffers(self.config.schedule).items():
            self.register_buffer(name, value.to(self.unet.unet.conv_in.weight.device))

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` / `.half()` cast every floating buffer; the schedule buffers stay float32
        (only their device follows), so a float16 model keeps an exact alpha_bar table."""
        saved = {name: self._buffers[name] for name in SCHEDULE_BUFFER_NAMES if name in self._buffers}
        super()._apply(fn, recurse)
        for name, value in saved.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != torch.float32:
                self._buffers[name] = value.to(device=moved.device, dtype=torch.float32)
        return self

    @classmethod
    def from_fixture_config(
        cls, cfg: Mapping, clip_cfg: OpenCLIPConfig | None = None, with_clip: bool = False, **kw
    ) -> MultiViewDiffusionModel:
        """Build from an official config dict (a fixture's `config_json`). CLIP sizes are not in
        the stage config, so pass `clip_cfg` to include the CLIP towers."""
        stage_cfg = StageConfig.from_fixture_config(dict(cfg))
        vae_cfg = VAEConfig.from_fixture_config(dict(cfg))
        return cls(stage_cfg, vae_cfg, clip_cfg, with_clip=with_clip, **kw)

    @property
    def stage(self) -> int:
        return self.config.stage

    @property
    def scale_factor(self) -> float:
        return self.config.schedule.scale_factor

    @property
    def has_clip(self) -> bool:
        return self.text_encoder is not None

    @property
    def device(self) -> torch.device:
        return self.unet.unet.conv_in.weight.device

    # ------------------------------------------------------------------ official weights
    def convert_official_state_dict(self, sd: Mapping[str, torch.Tensor]) -> ConvertedStateDict:
        """Map official keys onto this model (pure: nothing is loaded, nothing raised)."""
        out = ConvertedStateDict()
        groups = split_official_state_dict(sd)
        out.components = {k for k, v in groups.items() if v and k != "other"}
        out.unmapped.extend(groups["other"])
        unet_sd, unet_unmapped = unet_ldm_to_ours(groups["unet"], self.config.unet)
        out.mapped.update({"unet." + k: v for k, v in unet_sd.items()})
        out.unmapped.extend(unet_unmapped)
        levels = len(self.vae_config.block_out_channels)
        vae_ok = {}
        for k, v in groups["vae"].items():
            if diffusers_vae_key_from_ldm(k, levels) is None:
                out.unmapped.append(VAE_PREFIX + k)
            else:
                vae_ok[k] = v
        if vae_ok:
            conv = convert_ldm_vae_state_dict(vae_ok, num_levels=levels)
            out.mapped.update({"vae." + k: v for k, v in conv.items()})
        if groups["clip"]:
            if self.has_clip:
                text_sd, vision_sd, unused, unknown = _convert_open_clip(groups["clip"], self.clip_config)
                text_prefix = _wrapper_prefix(self.text_encoder.model, "text_model.")
                vision_prefix = _wrapper_prefix(self.image_encoder.model, "vision_model.")
                out.mapped.update({"text_encoder.model." + text_prefix + k: v for k, v in text_sd.items()})
                out.mapped.update(
                    {"image_encoder.model." + vision_prefix + k: v for k, v in vision_sd.items()}
                )
                out.unused.extend(CLIP_PREFIX + k for k in unused)
                out.unmapped.extend(CLIP_PREFIX + k for k in unknown)
            else:
                out.unused.extend(CLIP_PREFIX + k for k in groups["clip"])
        out.mapped.update(groups["schedule"])
        out.unmapped.sort()
        out.unused.sort()
        return out

    def official_state_dict(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """This model's weights under official keys -> (state dict, our keys that have no official key).

        UNet, VAE and schedule buffers round-trip exactly. CLIP keys are produced for the blocks we
        hold (q/k/v fused back into `in_proj_*`); the parts CRM never runs are absent.
        """
        own = self.state_dict()
        official: dict[str, torch.Tensor] = {}
        unmapped: list[str] = []
        unet_sd = {k[len("unet.") :]: v for k, v in own.items() if k.startswith("unet.")}
        conv, bad = unet_ours_to_ldm(unet_sd, self.config.unet, UNET_PREFIX)
        official.update(conv)
        unmapped.extend("unet." + k for k in bad)
        levels = len(self.vae_config.block_out_channels)
        for k, v in own.items():
            if k.startswith("vae."):
                ldm = ldm_vae_key_from_diffusers(k[len("vae.") :], levels)
                if ldm is None:
                    unmapped.append(k)
                    continue
                if ".attn_1." in ldm and ldm.endswith(".weight") and v.ndim == 2:
                    v = v.reshape(*v.shape, 1, 1)
                official[VAE_PREFIX + ldm] = v
            elif k in SCHEDULE_BUFFER_NAMES:
                official[k] = v
        fused: dict[str, dict[str, torch.Tensor]] = {}
        for tower, module_prefix in (("text", "text_encoder.model."), ("vision", "image_encoder.model.")):
            for k, v in own.items():
                if not k.startswith(module_prefix):
                    continue
                hf_key = k[len(module_prefix) :]
                oc = open_clip_key_from_transformers(tower, hf_key)
                if oc.endswith(("in_proj_weight", "in_proj_bias")):
                    fused.setdefault(oc, {})[hf_key.split(".")[-2]] = v
                else:
                    official[CLIP_PREFIX + oc] = v
        for oc, parts in fused.items():
            official[CLIP_PREFIX + oc] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
        return official, sorted(unmapped)


def _wrapper_prefix(model: nn.Module, prefix: str) -> str:
    """Some transformers releases nest the CLIP weights under `text_model.`/`vision_model.`, others
    do not; follow whatever the installed version does."""
    return prefix if any(k.startswith(prefix) for k in model.state_dict()) else ""
