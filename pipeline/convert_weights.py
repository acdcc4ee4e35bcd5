"""Convert CRM's official `CRM.pth` to `.safetensors` (weights-only read, atomic write).

Usage: ``python -m pipeline.convert_weights SRC [DST] [--no-verify]``

By default the converted keys and shapes are checked against the official full configuration of the
reconstruction model (built on the `meta` device, so no memory is allocated); a mismatch is an error
listing the keys and nothing is written. `--no-verify` converts any state dict as is.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from pipeline.checkpoints import (
    CheckpointError,
    check_state_dict,
    load_state_dict_file,
    save_safetensors_atomic,
)


def expected_recon_shapes(cfg=None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the reconstruction model's state dict (built on the meta device)."""
    from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig

    with torch.device("meta"):
        model = ConvolutionalReconstructionModel(cfg or ReconConfig())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert(src: str | Path, dst: str | Path | None = None, verify: bool = True) -> Path:
    """Read `src` (.pth/.safetensors), optionally verify it against the model, write `dst` (.safetensors)."""
    from pipeline.recon_weights import rename_legacy_keys

    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"destination {dst} is the source file")
    sd = rename_legacy_keys(load_state_dict_file(src))
    if verify:
        check_state_dict(expected_recon_shapes(), sd, f"CRM reconstruction model (from {src})")
    # safetensors refuses tensors that share storage: copy each one.
    sd = {k: v.detach().to("cpu").clone().contiguous() for k, v in sd.items()}
    return save_safetensors_atomic(sd, dst, metadata={"converted_from": src.name, "format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.convert_weights", description=__doc__.split("\n")[0]
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
