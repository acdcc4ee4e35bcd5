"""CRM's reconstruction stage: rolled-out views + CCMs -> triplane U-Net -> MLPs -> FlexiCubes mesh."""

from .color_field import TriplaneColorField, colors_to_texture255, colors_to_unit
from .config import DecoderConfig, NoiseConfig, ReconConfig, UNetConfig
from .input_assembly import assemble_input
from .model import ConvolutionalReconstructionModel, ReconMesh

__all__ = [
    "ConvolutionalReconstructionModel",
    "DecoderConfig",
    "NoiseConfig",
    "ReconConfig",
    "ReconMesh",
    "TriplaneColorField",
    "UNetConfig",
    "assemble_input",
    "colors_to_texture255",
    "colors_to_unit",
]
