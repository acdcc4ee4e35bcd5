"""Convert CRM's official `CRM.pth` to `.safetensors` (weights-only read, atomic write).

Usage: ``python -m pipeline.weights.convert SRC [DST] [--no-verify]``

By default the converted keys and shapes are checked against the official full configuration of the
reconstruction model (built on the `meta` device, so no memory is allocated); a mismatch is an error
listing the keys and nothing is written. `--no-verify` converts any state dict as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig
from pipeline.weights.checkpoints import CheckpointError, check_state_dict, convert_to_safetensors
from pipeline.weights.recon import rename_legacy_keys


def expected_recon_shapes(cfg=None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reconstruction model's state dict (built on the meta device)."""

    with torch.device("meta"):
        model = ConvolutionalReconstructionModel(cfg or ReconConfig())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert(src: str | Path, dst: str | Path | None = None, verify: bool = True) -> Path:
    """Read `src` (.pth/.safetensors), optionally verify it against the model, write `dst` (.safetensors)."""
    src = Path(src)

    def check(sd: dict) -> None:
        check_state_dict(expected_recon_shapes(), sd, f"CRM reconstruction model (from {src})")

    return convert_to_safetensors(
        src, dst, metadata={"format": "pt"}, transform=rename_legacy_keys, check=check if verify else None
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.weights.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help="checkpoint to read (.pth, read with weights_only=True, or .safetensors)")
    parser.add_argument(
        "dst", nargs="?", default=None, help="output .safetensors (default: SRC with .safetensors)"
    )
    parser.add_argument("--no-verify", action="store_true", help="do not check keys against the model")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, verify=not args.no_verify)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
