"""Configs of the multi-view diffusion UNet (both stages) and of the stage samplers.

Defaults are the official full-size settings (an SD-2.1 UNet with CRM's camera MLP, image-prompt
Resampler and IP cross-attention). `from_fixture_config` reads the official config dict (the
`config_json` of a reference fixture, or an ldm YAML loaded as a dict) so any tiny config works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cameras import VIEW_ORDER
from .schedule import ScheduleConfig

NEGATIVE_PROMPT = (
    "uniform low no texture ugly, boring, bad anatomy, blurry, pixelated,  obscure, unnatural colors, "
    "poor lighting, dull, and unclear."
)
PROMPT = "3D assets"


def _model_params(cfg: dict) -> dict:
    """The `model.params` dict of an official config (accepts the params dict itself)."""
    model = cfg.get("model", cfg)
    return model.get("params", model)


@dataclass
class MultiViewUNetConfig:
    """Multi-view UNet (official `MultiViewUNetModel` / `MultiViewUNetModelStage2`).

    Stage 1 has `in_channels` 4 and overwrites the last frame of every object with the clean
    reference latent ("pixel control"); stage 2 has `in_channels` 8 (noisy latent + stage-1 view
    latents) and no reference frame.
    """

    in_channels: int = 4
    """Input channels of conv_in: 4 (stage 1) or 8 (stage 2: noisy latent | pixel latents)."""
    out_channels: int = 4
    """Predicted noise channels."""
    model_channels: int = 320
    """Channels of the first level; the time embedding has 4x this width."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multiplier per level; a level per entry, downsampling between levels."""
    num_res_blocks: int = 2
    """ResBlocks per level on the way down (one more per level on the way up)."""
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    """Downsample factors (1, 2, 4, ...) whose levels carry a transformer after each ResBlock."""
    num_head_channels: int = 64
    """Channels per attention head (heads = channels / num_head_channels)."""
    transformer_depth: int = 1
    """Transformer blocks per spatial transformer."""
    context_dim: int = 1024
    """Width of the text context and of the Resampler output."""
    camera_dim: int = 16
    """Length of the flattened camera matrix fed to the camera MLP."""
    ip_dim: int = 16
    """Number of image-prompt tokens (Resampler queries) appended after the 77 text tokens."""
    ip_weight: float = 1.0
    """Weight of the image-prompt attention added to the text attention."""
    ip_embed_dim: int = 1280
    """Width of the CLIP local tokens the Resampler reads (hard-coded 1280 in the official code)."""
    resampler_depth: int = 4
    """Resampler perceiver layers."""
    resampler_heads: int = 12
    """Resampler attention heads."""
    resampler_dim_head: int = 64
    """Resampler channels per head."""
    resampler_ff_mult: int = 4
    """Resampler feed-forward expansion."""
    pixel_control: bool | None = None
    """Overwrite the last frame of each object with the reference latent; None: `in_channels == 4`."""

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(c) for c in self.channel_mult)
        self.attention_resolutions = tuple(int(a) for a in self.attention_resolutions)
        if self.pixel_control is None:
            self.pixel_control = self.in_channels == self.out_channels
        if self.in_channels not in (self.out_channels, 2 * self.out_channels):
            raise ValueError(
                "in_channels must be out_channels (stage 1) or 2*out_channels (stage 2), "
                f"got {self.in_channels}"
            )
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.num_head_channels:
                raise ValueError(
                    f"level width {self.model_channels * mult} not divisible by num_head_channels "
                    f"{self.num_head_channels}"
                )

    @property
    def stage(self) -> int:
        """1 for the pixel (RGB) diffusion, 2 for the CCM diffusion (8-channel input)."""
        return 2 if self.in_channels == 2 * self.out_channels else 1

    @property
    def level_has_attention(self) -> tuple[bool, ...]:
        """Whether level i (downsample factor 2**i) carries transformers."""
        return tuple(2**i in self.attention_resolutions for i in range(len(self.channel_mult)))

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads per level."""
        return tuple(self.model_channels * m // self.num_head_channels for m in self.channel_mult)

    @classmethod
    def stage1(cls) -> MultiViewUNetConfig:
        """Full-size stage-1 config."""
        return cls(in_channels=4)

    @classmethod
    def stage2(cls) -> MultiViewUNetConfig:
        """Full-size stage-2 config."""
        return cls(in_channels=8)

    @classmethod
    def from_fixture_config(cls, cfg: dict) -> MultiViewUNetConfig:
        """From an official config: the whole dict, `model.params`, or `unet_config(.params)`."""
        if "unet_config" in _model_params(cfg):
            unet = _model_params(cfg)["unet_config"]
        else:
            unet = cfg.get("unet_config", cfg)
        target = str(unet.get("target", ""))
        params = unet.get("params", unet)
        if params.get("legacy", False):
            raise ValueError("legacy=True UNet configs are not supported (CRM uses legacy=False)")
        if params.get("num_head_channels", -1) in (None, -1):
            raise ValueError(
                "the UNet config must set num_head_channels (heads = channels / num_head_channels)"
            )
        if str(params.get("ip_mode", "local_resample")) != "local_resample" or not params.get(
            "with_ip", True
        ):
            raise ValueError("only with_ip=True, ip_mode='local_resample' is supported")
        out = cls(
            in_channels=int(params["in_channels"]),
            out_channels=int(params["out_channels"]),
            model_channels=int(params["model_channels"]),
            channel_mult=tuple(params["channel_mult"]),
            num_res_blocks=int(params["num_res_blocks"]),
            attention_resolutions=tuple(params["attention_resolutions"]),
            num_head_channels=int(params["num_head_channels"]),
            transformer_depth=int(params.get("transformer_depth", 1)),
            context_dim=int(params["context_dim"]),
            camera_dim=int(params.get("camera_dim", 16)),
            ip_dim=int(params.get("ip_dim", 16)),
            ip_weight=float(params.get("ip_weight", 1.0)),
        )
        if target and ("Stage2" in target) != (out.stage == 2):
            raise ValueError(f"UNet target {target} does not match in_channels {out.in_channels}")
        return out


@dataclass
class SamplerConfig:
    """Sampling settings of one stage (official `TwoStagePipeline` / `run.py` values)."""

    num_frames: int = 7
    """Frames per object: 6 views (+1 reference frame in stage 1)."""
    camera_views: tuple[int, ...] = VIEW_ORDER
    """View indices of the generated frames (left, bottom, back, right, top, front)."""
    reference_position: int | None = 6
    """Frame index of the reference frame (stage 1), None in stage 2."""
    ddim_steps: int = 50
    """DDIM steps (official uniform discretisation)."""
    guidance_scale: float = 5.0
    """Classifier-free guidance scale (run.py: 5.0; the official app defaults to 5.5)."""
    eta: float = 0.0
    """DDIM eta (0: deterministic)."""
    image_size: int = 256
    """Output image size R (latents are R/8)."""
    prompt: str = PROMPT
    """Text prompt."""
    negative_prompt: str = NEGATIVE_PROMPT
    """Text of the unconditional branch."""

    @classmethod
    def stage1(cls) -> SamplerConfig:
        return cls(num_frames=7, reference_position=6)

    @classmethod
    def stage2(cls) -> SamplerConfig:
        return cls(num_frames=6, reference_position=None)

    @classmethod
    def from_fixture_config(cls, cfg: dict) -> SamplerConfig:
        """From a fixture's `config_json["sampler"]` dict (or the whole `config_json`)."""
        s = cfg.get("sampler", cfg)
        return cls(
            num_frames=int(s["num_frames"]),
            camera_views=tuple(int(v) for v in s["camera_views"])[: len(VIEW_ORDER)],
            reference_position=None if s.get("ref_position") is None else int(s["ref_position"]),
            ddim_steps=int(s.get("ddim_steps", 50)),
            guidance_scale=float(s.get("guidance_scale", 5.0)),
            eta=float(s.get("eta", 0.0)),
            image_size=int(s.get("image_size", 256)),
            prompt=str(s.get("prompt", PROMPT)),
            negative_prompt=str(s.get("negative_prompt", NEGATIVE_PROMPT)),
        )


@dataclass
class StageConfig:
    """One multi-view stage: UNet + schedule + sampler settings (VAE/CLIP configs live in their modules)."""

    unet: MultiViewUNetConfig = field(default_factory=MultiViewUNetConfig.stage1)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig.stage1)

    @property
    def stage(self) -> int:
        return self.unet.stage

    @classmethod
    def stage1(cls) -> StageConfig:
        return cls(MultiViewUNetConfig.stage1(), ScheduleConfig(), SamplerConfig.stage1())

    @classmethod
    def stage2(cls) -> StageConfig:
        return cls(MultiViewUNetConfig.stage2(), ScheduleConfig(), SamplerConfig.stage2())

    @classmethod
    def from_fixture_config(cls, cfg: dict) -> StageConfig:
        unet = MultiViewUNetConfig.from_fixture_config(cfg)
        sampler = (
            SamplerConfig.from_fixture_config(cfg)
            if "sampler" in cfg
            else (SamplerConfig.stage1() if unet.stage == 1 else SamplerConfig.stage2())
        )
        return cls(unet, ScheduleConfig.from_fixture_config(cfg), sampler)
