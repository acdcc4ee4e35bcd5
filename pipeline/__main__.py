"""Command line: ``python -m pipeline IMAGE_OR_DIR... --out DIR`` (also installed as ``crm``).

Each image gets ``DIR/<id>/`` (mesh.glb, mesh.obj + mesh.mtl + mesh.png, views.png, preview.png,
meta.json), written atomically. A failing image is reported (id, error class, reason) and leaves no
folder; the others continue. Exit status: 0 all succeeded, 1 some image failed, 2 bad
arguments / options / weights (nothing was generated).

Examples::

    python -m pipeline photo.png --out out/          # official weights: HF cache, else downloaded into it
    python -m pipeline images/ --out out/ --weights /data/crm --batch-size 4 --device cuda
    python -m pipeline --samples --out out/ --weights tiny-random --steps 2   # bundled samples, smoke test
    python -m pipeline images/ --out out/ --sampler dpmpp --steps 10         # few-step solver
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from pipeline.mesh.frames import EXPORT_FRAMES
from pipeline.options import BACKGROUND_MODES, DTYPES, SAMPLERS, OptionsError, PipelineOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def build_parser() -> argparse.ArgumentParser:
    d = PipelineOptions()
    p = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="CRM: single image -> textured 3D mesh (GLB/OBJ). One output folder per image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE", help="image files and/or folders of images")
    p.add_argument("--samples", action="store_true", help="add the bundled sample images (pipeline/samples)")
    p.add_argument("--out", "-o", required=True, help="output folder (one sub-folder per image)")
    w = p.add_argument_group("weights")
    w.add_argument(
        "--weights",
        default="auto",
        help="'auto' (Hugging Face cache of Zhengyi/CRM, downloaded into it when missing), a folder with "
        "CRM.pth, pixel-diffusion.pth, ccm-diffusion.pth, 'hf[:OWNER/REPO[@REV]]', or 'tiny-random' "
        "(random tiny models: smoke tests only)",
    )
    w.add_argument("--offline", action="store_true", help="never download (as HF_HUB_OFFLINE=1 does)")
    # Downloads are the default now; the old opt-in flag is still accepted.
    w.add_argument("--allow-download", action="store_true", help=argparse.SUPPRESS)
    w.add_argument("--recon-weights", help="explicit reconstruction checkpoint (CRM.pth / .safetensors)")
    w.add_argument("--stage1-weights", help="explicit stage-1 checkpoint (pixel-diffusion.pth)")
    w.add_argument("--stage2-weights", help="explicit stage-2 checkpoint (ccm-diffusion.pth)")
    w.add_argument("--clip-weights", help="explicit OpenCLIP ViT-H-14 file (open_clip_pytorch_model.bin)")
    g = p.add_argument_group("generation")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=d.sampler,
        help="diffusion sampler: ddim (official), dpmpp (DPM-Solver++(2M)) or unipc; the solvers take "
        "1-50 steps, 10-20 is their range (docs/sampling.md)",
    )
    g.add_argument(
        "--steps", type=int, help="sampler steps of both stages (network calls; overrides the two below)"
    )
    g.add_argument("--steps-stage1", type=int, default=d.steps_stage1)
    g.add_argument("--steps-stage2", type=int, default=d.steps_stage2)
    g.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    g.add_argument("--guidance-scale-stage2", type=float, default=None, help="default: --guidance-scale")
    g.add_argument("--background", choices=BACKGROUND_MODES, default=d.background)
    g.add_argument("--foreground-ratio", type=float, default=d.foreground_ratio)
    g.add_argument("--grid-size", type=int, default=None, help="FlexiCubes grid (default: the model's, 80)")
    m = p.add_argument_group("mesh and export")
    m.add_argument("--texture-size", type=int, default=d.texture_size)
    m.add_argument("--vertex-colors", action="store_true", help="vertex colours instead of a baked texture")
    m.add_argument("--frame", choices=EXPORT_FRAMES, default=d.frame)
    m.add_argument("--no-clean", action="store_true", help="skip mesh cleaning")
    m.add_argument(
        "--max-faces",
        type=int,
        default=None,
        help="decimate to at most this many faces before UV unwrap (default: 50000; 0: never)",
    )
    m.add_argument("--no-obj", action="store_true", help="write only the GLB (no OBJ/MTL/PNG)")
    m.add_argument("--no-preview", action="store_true", help="skip preview.png")
    m.add_argument("--preview-size", type=int, default=d.preview_size)
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    r.add_argument("--dtype", choices=DTYPES, default=d.dtype, help="auto: fp32 on CPU, fp16 on CUDA")
    r.add_argument("--low-vram", action="store_true", help="move each stage to the device only while it runs")
    r.add_argument("--batch-size", type=int, default=d.batch_size, help="images per diffusion call")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--report", help="also write a JSON list of per-image results to this file")
    r.add_argument("-v", "--verbose", action="store_true")
    return p


def options_from_args(a: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(
        seed=a.seed,
        steps_stage1=a.steps if a.steps is not None else a.steps_stage1,
        steps_stage2=a.steps if a.steps is not None else a.steps_stage2,
        sampler=a.sampler,
        guidance_scale=a.guidance_scale,
        guidance_scale_stage2=a.guidance_scale_stage2,
        texture_size=a.texture_size,
        vertex_colors=a.vertex_colors,
        frame=a.frame,
        background=a.background,
        foreground_ratio=a.foreground_ratio,
        dtype=a.dtype,
        device=a.device,
        low_vram=a.low_vram,
        grid_size=a.grid_size,
        batch_size=a.batch_size,
        clean=not a.no_clean,
        max_faces=a.max_faces,
        preview_size=a.preview_size,
        write_obj=not a.no_obj,
        write_preview=not a.no_preview,
        progress=not a.no_progress,
    )


def expand_inputs(items: list[str], samples: bool = False) -> list[Path]:
    """Files as given (any name: a non-image fails per image later); folders -> their image files, sorted;
    `samples` adds the bundled sample images."""
    out: list[Path] = []
    if samples:
        from pipeline.samples import sample_images

        out.extend(sample_images())
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    err = sys.stderr
    try:
        options = options_from_args(args)
        options.resolved_dtype()  # device/dtype problems surface before loading anything
    except OptionsError as exc:
        print(f"error: {exc}", file=err)
        return 2
    sources = expand_inputs(args.inputs, samples=args.samples)
    if not sources:
        print("error: no input images found (give IMAGE paths or folders, or --samples)", file=err)
        return 2

    # torch and the models load only now: --help and bad arguments answer at once
    from pipeline.image_to_mesh import ImageToMeshPipeline
    from pipeline.results import ObjectResult
    from pipeline.weights import WeightsError, resolve_weights

    try:
        weights = resolve_weights(
            args.weights,
            allow_download=not args.offline,
            recon_path=args.recon_weights,
            stage1_path=args.stage1_weights,
            stage2_path=args.stage2_weights,
            clip_path=args.clip_weights,
        )
    except (WeightsError, OSError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    if weights.is_random:
        print(
            "warning: --weights tiny-random: RANDOM tiny models, outputs are meaningless (tests only)",
            file=err,
        )
    try:
        pipe = ImageToMeshPipeline.load(weights, options)
    except Exception as exc:
        print(f"error: cannot load the models: {type(exc).__name__}: {exc}", file=err)
        return 2

    results: list[ObjectResult] = []
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sources), unit="image", desc="image->mesh", file=err)

    def on_result(res: ObjectResult) -> None:
        results.append(res)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ok=sum(r.ok for r in results), failed=sum(not r.ok for r in results))
        if not res.ok:
            msg = f"FAILED {res.id} ({res.source}): {res.error_class}: {res.error_message}"
            (bar.write(msg, file=err) if bar is not None else print(msg, file=err))

    out_dir = Path(args.out)
    pipe.run([str(s) for s in sources], out_dir, on_result=on_result)
    if bar is not None:
        bar.close()
    ok = [r for r in results if r.ok]
    print(f"{len(ok)}/{len(results)} images converted -> {out_dir}", file=err)
    for r in ok:
        print(r.location)
    if args.report:
        from pipeline.outputs.atomic import atomic_write_json

        atomic_write_json(args.report, [dataclasses.asdict(r) for r in results])
    return 0 if len(ok) == len(results) == len(sources) else 1


if __name__ == "__main__":
    sys.exit(main())
