"""Configuration of the reconstruction stage (U-Net -> triplane -> MLPs -> FlexiCubes).

`ReconConfig()` is the official full configuration of CRM's reconstruction model (plane resolution
256, U-Net widths 64..512, grid 80). `ReconConfig.from_fixture_config(cfg)` builds the configuration a
reference fixture records in its `config_json` (tiny U-Nets, small grids), so a fixture with another
grid size, plane size or U-Net width is reproduced without code changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

OFFICIAL_DOWN_BLOCKS = (
    "DownBlock2D",
    "DownBlock2D",
    "DownBlock2D",
    "AttnDownBlock2D",
    "AttnDownBlock2D",
    "AttnDownBlock2D",
    "DownBlock2D",
)
OFFICIAL_UP_BLOCKS = (
    "UpBlock2D",
    "AttnUpBlock2D",
    "AttnUpBlock2D",
    "AttnUpBlock2D",
    "UpBlock2D",
    "UpBlock2D",
    "UpBlock2D",
)

#: Number of data channels of the rolled-out input: RGB rows A/B (6) + CCM rows A/B (6).
INPUT_CHANNELS = 12


@dataclass(frozen=True)
class UNetConfig:
    """Arguments of the diffusers `UNet2DModel` used as the triplane generator.

    Attributes:
        block_out_channels: channel width of each of the 7 resolution levels.
        layers_per_block: ResNet layers per down block (up blocks get one more).
        down_block_types / up_block_types: diffusers block class names, in order.
        attention_head_dim: head *size* of the attention layers (heads = channels / head size).
        norm_num_groups: GroupNorm groups in every ResNet/attention block.
        norm_eps: GroupNorm epsilon.
    """

    block_out_channels: tuple[int, ...] = (64, 128, 128, 256, 256, 512, 512)
    layers_per_block: int = 2
    down_block_types: tuple[str, ...] = OFFICIAL_DOWN_BLOCKS
    up_block_types: tuple[str, ...] = OFFICIAL_UP_BLOCKS
    attention_head_dim: int = 8
    norm_num_groups: int = 32
    norm_eps: float = 1e-5


@dataclass(frozen=True)
class NoiseConfig:
    """Inference-time "denoising trick" (SPEC §4): x_t = sqrt(a_t) x + sqrt(1 - a_t) (eps*std + mean).

    The DDIM scheduler is built locally with Stable Diffusion 2.1-base's values (no hub access).

    Attributes:
        timestep: the fixed timestep (also fed to the U-Net as its time input).
        noise_mean / noise_std: affine map of the standard normal noise (CRM: 0.5 / 0.5).
        num_train_timesteps, beta_start, beta_end, beta_schedule, steps_offset, clip_sample,
        set_alpha_to_one, prediction_type: `DDIMScheduler` arguments.
    """

    timestep: int = 20
    noise_mean: float = 0.5
    noise_std: float = 0.5
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    clip_sample: bool = False
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"


@dataclass(frozen=True)
class DecoderConfig:
    """Triplane decoding, heads and FlexiCubes settings (SPEC §6-§8).

    Attributes:
        grid_res: FlexiCubes grid resolution N ((N+1)^3 vertices, N^3 cubes).
        grid_scale: the grid spans [-grid_scale/2, grid_scale/2]^3 (CRM: 2.0 -> [-1, 1]^3).
        mlp_hidden: hidden width of the SDF, RGB and weight MLPs.
        sphere_prior: add `sphere_radius - |v|` to the raw sdf (on when CRM's `Pretrain.mode` is null).
        sphere_radius: radius of the sphere prior (`Pretrain.radius`).
        input_scale: `Input.scale`; deformation = tanh(d) / N * input_scale / 0.95 * 0.5.
        weight_multiplier: factor applied to the weight-MLP output before FlexiCubes (0.1).
        weight_scale: FlexiCubes' weight_scale (CRM: 0.5).
        mlp_chunk: rows per chunk when evaluating the MLPs over many points (memory bound only;
            results do not depend on it beyond float rounding of the matrix kernels).
    """

    grid_res: int = 80
    grid_scale: float = 2.0
    mlp_hidden: int = 512
    sphere_prior: bool = True
    sphere_radius: float = 0.5
    input_scale: float = 0.95
    weight_multiplier: float = 0.1
    weight_scale: float = 0.5
    mlp_chunk: int = 32768

    @property
    def deformation_scale(self) -> float:
        """Multiplier of tanh(deformation): 1/(2N) for CRM's scale 0.95."""
        return 1.0 / self.grid_res * self.input_scale / 0.95 * 0.5


@dataclass(frozen=True)
class ReconConfig:
    """Full configuration of the reconstruction model. Defaults = CRM's released configuration.

    Attributes:
        plane_resolution: R, the side of each view and of each triplane plane (input strips are
            R x 6R x 3, the rolled-out triplane is c_dim x R x 3R). Must be divisible by 2^(levels-1).
        c_dim: triplane channels = U-Net in/out channels (learned plane has c_dim - 12 channels).
        unet: `UNetConfig`.
        noise: `NoiseConfig`.
        decoder: `DecoderConfig`.
        name: free-form label (e.g. the fixture name).
    """

    plane_resolution: int = 256
    c_dim: int = 32
    unet: UNetConfig = field(default_factory=UNetConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    name: str = "crm_official"

    def __post_init__(self) -> None:
        levels = len(self.unet.block_out_channels)
        if len(self.unet.down_block_types) != levels or len(self.unet.up_block_types) != levels:
            raise ValueError(
                f"ReconConfig: {levels} block_out_channels but {len(self.unet.down_block_types)} down / "
                f"{len(self.unet.up_block_types)} up block types"
            )
        factor = 2 ** (levels - 1)
        if self.plane_resolution <= 0 or self.plane_resolution % factor:
            raise ValueError(
                f"ReconConfig: plane_resolution {self.plane_resolution} must be a positive multiple of "
                f"{factor} (the U-Net downsamples {levels - 1} times)"
            )
        if self.c_dim < INPUT_CHANNELS:
            raise ValueError(f"ReconConfig: c_dim {self.c_dim} must be >= {INPUT_CHANNELS} input channels")
        for width in self.unet.block_out_channels:
            if width % self.unet.norm_num_groups:
                raise ValueError(
                    f"ReconConfig: block width {width} not divisible by norm_num_groups "
                    f"{self.unet.norm_num_groups}"
                )
        if self.decoder.grid_res < 1:
            raise ValueError(f"ReconConfig: grid_res must be >= 1, got {self.decoder.grid_res}")

    @property
    def learned_plane_channels(self) -> int:
        """Channels of the learned plane appended after the 12 data channels (20 for CRM)."""
        return self.c_dim - INPUT_CHANNELS

    def with_decoder(self, **changes) -> ReconConfig:
        """Copy with some `DecoderConfig` fields changed (e.g. `grid_res=40`)."""
        return replace(self, decoder=replace(self.decoder, **changes))

    @classmethod
    def from_fixture_config(cls, cfg: dict) -> ReconConfig:
        """Build the configuration recorded in a fixture's `config_json` (already `json.loads`-ed).

        Reads `plane_resolution`, `block_out_channels`, `layers_per_block`, `grid_res` at top level
        (falling back to the official spec dict under `specs`) and the spec values that shape the
        decoder (`DecoderSpecs.c_dim`, `Input.tet_grid_size`, `Input.scale`, `Pretrain.radius`,
        `Pretrain.mode`). Unsupported spec switches (`fea_concat`, `mlp_bias=false`) raise.
        """
        if not isinstance(cfg, dict):
            raise TypeError(f"from_fixture_config expects a dict, got {type(cfg).__name__}")
        specs = cfg.get("specs", {}) or {}
        dec_specs = specs.get("DecoderSpecs", {})
        inp = specs.get("Input", {})
        pre = specs.get("Pretrain", {})
        arch = specs.get("ArchSpecs", {})
        if arch.get("fea_concat", False):
            raise ValueError("fixture config: fea_concat=true (concatenated plane features) is not supported")
        if not arch.get("mlp_bias", True):
            raise ValueError("fixture config: mlp_bias=false is not supported")
        plane_res = int(cfg.get("plane_resolution", dec_specs.get("plane_resolution", 256)))
        grid_res = int(cfg.get("grid_res", inp.get("tet_grid_size", 80)))
        unet_kwargs = {}
        if "block_out_channels" in cfg:
            unet_kwargs["block_out_channels"] = tuple(int(c) for c in cfg["block_out_channels"])
        for key in ("layers_per_block", "attention_head_dim", "norm_num_groups"):
            if key in cfg:
                unet_kwargs[key] = int(cfg[key])
        for key in ("down_block_types", "up_block_types"):
            if key in cfg:
                unet_kwargs[key] = tuple(cfg[key])
        decoder = DecoderConfig(
            grid_res=grid_res,
            sphere_prior=pre.get("mode", None) is None,
            sphere_radius=float(pre.get("radius", 0.5)),
            input_scale=float(inp.get("scale", 0.95)),
        )
        noise_kwargs = {}
        if "timestep" in cfg:
            noise_kwargs["timestep"] = int(cfg["timestep"])
        return cls(
            plane_resolution=plane_res,
            c_dim=int(dec_specs.get("c_dim", cfg.get("c_dim", 32))),
            unet=UNetConfig(**unet_kwargs),
            noise=NoiseConfig(**noise_kwargs),
            decoder=decoder,
            name=str(cfg.get("name", "fixture")),
        )

    def to_dict(self) -> dict:
        """Plain nested dict (JSON-serialisable) of all fields."""

        def conv(obj):
            if hasattr(obj, "__dataclass_fields__"):
                return {f.name: conv(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, tuple):
                return list(obj)
            return obj

        return conv(self)
