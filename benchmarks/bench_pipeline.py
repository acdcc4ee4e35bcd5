"""Per-stage timing of the image-to-mesh pipeline (not a test).

Modes:

* ``--mode tiny`` (default): the ``tiny-random`` preset on one example image, the whole chain
  (preprocess, stage 1, stage 2, reconstruction, clean, unwrap + bake, export, views, preview),
  ``--runs`` timed runs after one warm-up; median per stage and peak RSS.
* ``--mode full-cpu``: the FULL-size models with random weights on the CPU, each measurement in its
  own subprocess (its own peak RSS; the models do not all fit together in a small machine's RAM):
  one guided DDIM step of stage 1 (K=1), one of stage 2, reconstruction at grid 80, and the CPU
  part (clean, unwrap + bake at 1024, export). Slow: a full-size guided UNet call takes minutes on
  a 2-core CPU.
* ``--mode full``: the whole pipeline at full size with random weights in one process, for a GPU:
  ``--device cuda --dtype fp16 --batch 8`` runs 8 images in one diffusion call, 50 + 50 steps,
  1024 texture (override with ``--steps``, ``--sampler``, ``--texture-size``); reports per-stage times of the
  batch, objects per minute and peak GPU memory.

Results: a table on stdout and JSON in ``benchmarks/results/bench_pipeline_<mode>.json``.

Usage::

    python benchmarks/bench_pipeline.py --mode tiny --runs 3
    python benchmarks/bench_pipeline.py --mode full-cpu
    python benchmarks/bench_pipeline.py --mode full --device cuda --dtype fp16 --batch 8 \\
        [--finalize-workers 8 --batches 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
STAGE_ORDER = (
    "load",
    "preprocess",
    "stage1",
    "stage2",
    "reconstruct",
    "clean",
    "bake",
    "export",
    "views",
    "preview",
    "total",
)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _example_images(n: int) -> list[Path]:
    """`n` inputs cycling through the bundled sample images."""
    from pipeline.samples import sample_images

    imgs = sample_images()
    return [imgs[i % len(imgs)] for i in range(n)]


def _env() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "loadavg_1m": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def _table(rows: dict[str, float], title: str) -> str:
    width = max(len(k) for k in rows) + 2
    lines = [title, f"{'stage':<{width}}seconds", "-" * (width + 10)]
    lines += [f"{k:<{width}}{v:9.3f}" for k, v in rows.items()]
    return "\n".join(lines)


def _save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"bench_pipeline_{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------------- tiny
def bench_tiny(args) -> dict:
    from pipeline.image_to_mesh import ImageToMeshPipeline
    from pipeline.options import PipelineOptions

    opts = PipelineOptions(
        steps_stage1=args.steps or 2,
        steps_stage2=args.steps or 2,
        sampler=args.sampler,
        texture_size=args.texture_size or 256,
        device=args.device,
        dtype=args.dtype,
        batch_size=1,
    )
    t0 = time.perf_counter()
    pipe = ImageToMeshPipeline.load("tiny-random", opts)
    load_s = time.perf_counter() - t0
    image = _example_images(1)[0]
    per_run: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.runs + 1):
            (res,) = pipe.run([image], out, ids=[f"run{i}"])
            if not res.ok:
                raise SystemExit(f"run failed: {res.error_class}: {res.error_message}")
            if i > 0:  # first run is the warm-up
                per_run.append(dict(res.timings))
    keys = [k for k in STAGE_ORDER if k in per_run[0]]
    median = {k: statistics.median(r[k] for r in per_run) for k in keys}
    rows = {("image load" if k == "load" else k): median[k] for k in STAGE_ORDER if k in median}
    rows["model load (once, incl. imports)"] = load_s
    print(
        _table(
            rows,
            f"tiny-random, 1 image ({image.name}), {opts.steps_stage1}+{opts.steps_stage2} steps, "
            f"texture {opts.texture_size}, median of {args.runs} runs (load: once)",
        )
    )
    print(f"peak RSS {_peak_rss_mb():.0f} MB")
    return {
        "mode": "tiny",
        "options": opts.to_dict(),
        "image": image.name,
        "runs": args.runs,
        "median_s": rows,
        "per_run_s": per_run,
        "peak_rss_mb": _peak_rss_mb(),
        "env": _env(),
    }


# ---------------------------------------------------------------------------------- full size helpers
def build_full_random(stage: str, device: str = "cpu", dtype=None, seed: int = 0):
    """A full-size model with random (default-initialised) weights, built directly on `device`."""
    import torch

    torch.manual_seed(seed)
    with torch.device(device):
        if stage in ("stage1", "stage2"):
            from crm_models.multiview.config import StageConfig
            from crm_models.multiview.stage_model import MultiViewDiffusionModel

            cfg = StageConfig.stage1() if stage == "stage1" else StageConfig.stage2()
            model = MultiViewDiffusionModel(cfg, with_clip=True)
        else:
            from crm_models.recon.config import ReconConfig
            from crm_models.recon.model import ConvolutionalReconstructionModel

            model = ConvolutionalReconstructionModel(ReconConfig())
    if dtype is not None and stage != "recon":
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def _full_pipeline(models, options):
    from pipeline.image_to_mesh import ImageToMeshPipeline

    return ImageToMeshPipeline(
        models.stage1, models.stage2, models.recon, options, {"kind": "random-full-size"}
    )


# ---------------------------------------------------------------------------------- full-cpu workers
def _worker(name: str, tmp: Path, args) -> dict:
    """One measurement of --mode full-cpu (runs in its own process)."""
    import numpy as np
    import torch

    from pipeline import stages
    from pipeline.finalize import finalize
    from pipeline.image_to_mesh import preprocess
    from pipeline.inputs.decode import load_image
    from pipeline.options import PipelineOptions
    from pipeline.results import GeneratedObject

    opts = PipelineOptions(
        steps_stage1=1, steps_stage2=1, texture_size=args.texture_size or 1024, device="cpu", dtype="fp32"
    )
    image = _example_images(1)[0]
    prepped = preprocess(load_image(image), opts)
    out: dict = {"worker": name}
    t0 = time.perf_counter()
    if name in ("stage1", "stage2"):
        model = build_full_random(name)
        out["build_s"] = time.perf_counter() - t0
        gen = [torch.Generator().manual_seed(0)]
        t0 = time.perf_counter()
        if name == "stage1":
            strips = stages.run_stage1(model, [prepped], opts, gen)
        else:
            views = np.load(tmp / "stage1.npy") if (tmp / "stage1.npy").is_file() else None
            if views is None:
                views = np.random.default_rng(0).integers(0, 256, (256, 1536, 3), dtype=np.uint8)
            strips = stages.run_stage2(model, [prepped], [views], opts, gen)
        out["seconds"] = time.perf_counter() - t0
        np.save(tmp / f"{name}.npy", strips[0])
    elif name == "recon":
        model = build_full_random("recon")
        out["build_s"] = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        rgb = (
            np.load(tmp / "stage1.npy")
            if (tmp / "stage1.npy").is_file()
            else rng.integers(0, 256, (256, 1536, 3))
        )
        ccm = (
            np.load(tmp / "stage2.npy")
            if (tmp / "stage2.npy").is_file()
            else rng.integers(0, 256, (256, 1536, 3))
        )
        t0 = time.perf_counter()
        verts, faces, field = stages.reconstruct(
            model,
            rgb.astype(np.uint8),
            ccm.astype(np.uint8),
            torch.Generator().manual_seed(0),
            "cpu",
            torch.float32,
        )
        out["seconds"] = time.perf_counter() - t0
        out["vertices"], out["faces"] = int(len(verts)), int(len(faces))
        obj = GeneratedObject(
            id="full",
            seed=0,
            views_strip=rgb.astype(np.uint8),
            ccm_strip=ccm.astype(np.uint8),
            vertices=verts,
            faces=faces,
            color_field=field,
            weights_identity={"kind": "random-full-size"},
        )
        (tmp / "obj.pkl").write_bytes(pickle.dumps(obj))
    elif name == "finalize":
        obj = pickle.loads((tmp / "obj.pkl").read_bytes())
        res = finalize(obj, tmp / "out", opts)
        if not res.ok:
            raise SystemExit(f"finalize failed: {res.error_class}: {res.error_message}")
        out["seconds"] = time.perf_counter() - t0
        out["stages_s"] = {
            k: v for k, v in res.timings.items() if k in ("clean", "bake", "export", "views", "preview")
        }
    out["peak_rss_mb"] = _peak_rss_mb()
    return out


def bench_full_cpu(args) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for name in ("stage1", "stage2", "recon", "finalize"):
            cmd = [sys.executable, __file__, "--worker", name, "--worker-dir", tmpdir]
            if args.texture_size:
                cmd += ["--texture-size", str(args.texture_size)]
            print(f"[full-cpu] {name} ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"worker {name} failed")
            rec = json.loads(Path(tmpdir, f"{name}.json").read_text())
            results.append(rec)
            print(f"  {json.dumps(rec)}", flush=True)
    rows = {
        "stage1 (1 guided step + VAE + CLIP)": results[0]["seconds"],
        "stage2 (1 guided step + VAE + CLIP)": results[1]["seconds"],
        "reconstruct (U-Net + grid 80)": results[2]["seconds"],
    }
    rows.update({f"finalize: {k}": v for k, v in results[3]["stages_s"].items()})
    print(_table(rows, "full size, random weights, CPU fp32, 1 image"))
    for r in results:
        print(
            f"{r['worker']:<10} peak RSS {r['peak_rss_mb']:.0f} MB"
            + (f", build {r['build_s']:.1f} s" if "build_s" in r else "")
        )
    return {"mode": "full-cpu", "rows_s": rows, "workers": results, "env": _env()}


# ---------------------------------------------------------------------------------- full (GPU)
def bench_full(args) -> dict:
    import torch

    from pipeline.finalize import finalize
    from pipeline.image_to_mesh import preprocess
    from pipeline.inputs.decode import load_image
    from pipeline.options import PipelineOptions
    from pipeline.weights.models import CRMModels

    steps = args.steps or 50
    opts = PipelineOptions(
        steps_stage1=steps,
        steps_stage2=steps,
        sampler=args.sampler,
        texture_size=args.texture_size or 1024,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch,
        low_vram=args.low_vram,
        clean=not args.no_clean,
        max_faces=args.max_faces,
    )
    device, dtype = opts.resolved_device(), opts.resolved_dtype()
    t0 = time.perf_counter()
    build_dev = "cpu" if opts.low_vram else device
    if args.tiny_models:  # check this code path quickly (e.g. on a CPU) with the tiny preset's models
        from pipeline.weights.tiny import build_tiny_recon, build_tiny_stage

        models = CRMModels(build_tiny_stage(1), build_tiny_stage(2), build_tiny_recon())
        for m in (models.stage1, models.stage2):
            m.to(build_dev, dtype)
        models.recon.to(build_dev)
    else:
        models = CRMModels(
            stage1=build_full_random("stage1", build_dev, dtype),
            stage2=build_full_random("stage2", build_dev, dtype),
            recon=build_full_random("recon", build_dev),
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    build_s = time.perf_counter() - t0
    pipe = _full_pipeline(models, opts)
    images = [preprocess(load_image(p), opts) for p in _example_images(args.batch)]
    ids = [f"obj{i}" for i in range(args.batch)]
    stages: dict[str, float] = {}

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # warm-up with 1 step (kernels, cuDNN autotune), not timed
    pipe.with_options(steps_stage1=1, steps_stage2=1).generate(images[:1], ids[:1], preprocessed=True)
    sync()
    t0 = time.perf_counter()
    objs = pipe.generate(images, ids, seeds=list(range(args.batch)), preprocessed=True)
    sync()
    gen_s = time.perf_counter() - t0
    for key in ("stage1", "stage2", "reconstruct"):
        stages[key + " (batch total)"] = sum(o.timings[key] for o in objs)
    fin = []
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        for o in objs[: args.finalize]:
            res = finalize(o, out, opts)
            if not res.ok:
                raise SystemExit(f"finalize failed: {res.error_class}: {res.error_message}")
            fin.append(res.timings)
        fin_s = time.perf_counter() - t0
    pipelined = (
        _pipelined_run(pipe, images, ids, objs, gen_s, opts, args, sync) if args.finalize_workers else None
    )
    for key in ("clean", "bake", "export", "views", "preview"):
        stages[f"{key} (per object, mean of {len(fin)})"] = sum(t.get(key, 0.0) for t in fin) / max(
            len(fin), 1
        )
    stages["generate (GPU part) total"] = gen_s
    stages[f"finalize (CPU part), {len(fin)} objects"] = fin_s
    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    print(
        _table(
            stages,
            f"full size, random weights, {device} {str(dtype).replace('torch.', '')}, batch {args.batch}, "
            f"{steps}+{steps} {args.sampler} steps, texture {opts.texture_size}",
        )
    )
    n_fin = len(fin)
    # end to end: GPU part for the batch + the measured mean CPU part per object for every object
    per_min = 60.0 * args.batch / (gen_s + (fin_s / n_fin * args.batch if n_fin else 0.0))
    what = "end to end" if n_fin else "GPU part only (no object finalized)"
    print(
        f"build {build_s:.1f} s; {per_min:.2f} objects/min {what}; peak RSS {_peak_rss_mb():.0f} MB"
        + (f"; peak GPU memory {peak_gpu:.1f} GiB" if peak_gpu is not None else "")
    )
    if pipelined:
        print(
            f"pipelined: {pipelined['objects']} objects in {pipelined['wall_s']:.1f} s wall "
            f"({pipelined['batches']} batches, finalize in {pipelined['workers']} CPU processes of "
            f"{pipelined['threads_per_worker']} threads overlapping the next batch's generation): "
            f"{pipelined['objects_per_min']:.1f} objects/min, {pipelined['s_per_object']:.2f} s/object"
        )
    return {
        "mode": "full",
        "pipelined": pipelined,
        "options": opts.to_dict(),
        "batch": args.batch,
        "build_s": build_s,
        "stages_s": stages,
        "objects_per_min": per_min,
        "finalized_objects": n_fin,
        "mesh_faces": [int(len(o.faces)) for o in objs],
        "peak_gpu_gib": peak_gpu,
        "peak_rss_mb": _peak_rss_mb(),
        "env": _env(),
    }


def _finalize_worker_init(threads: int) -> None:
    import torch

    import pipeline.finalize  # noqa: F401  (imported here, before timing, not by the first task)

    torch.set_num_threads(threads)


def _finalize_cpu(obj, out: str, opts):
    """One object's CPU part in a worker process without a GPU (like the batch job's Ray CPU tasks)."""
    from pipeline.finalize import finalize

    res = finalize(obj, out, opts)
    return res.ok, res.error_class, res.error_message


def _pipelined_run(pipe, images, ids, first, first_s, opts, args, sync) -> dict:
    """``--batches`` batches end to end: the GPU generates batch b+1 while CPU processes finalize batch b.

    Measures what the batch job's layout gives on one GPU node: one resident generator plus a pool of
    CPU finalize workers (``--finalize-workers`` processes; CUDA hidden from them, as Ray hides it from
    tasks that reserve no GPU). Batch 0 is ``first``, the timed batch the caller already generated in
    ``first_s`` seconds (nothing else runs while the first batch is generated, so regenerating it here
    would only repeat that measurement); its time is added to the wall time of the rest.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    workers, batches = int(args.finalize_workers), max(1, args.batches)
    threads = max(1, (os.cpu_count() or 1) // (workers + 1))
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # inherited by the spawned workers only
    try:
        ctx = mp.get_context("spawn")
        pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_finalize_worker_init, initargs=(threads,)
        )
        # start every worker (its initializer: imports, threads) before timing
        list(pool.map(abs, range(workers)))
    finally:
        if old is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old
    with tempfile.TemporaryDirectory() as out, pool:
        t0 = time.perf_counter()
        futures = [pool.submit(_finalize_cpu, o, out, opts) for o in first]
        for b in range(1, batches):
            seeds = [b * len(ids) + i for i in range(len(ids))]
            objs = pipe.generate(images, [f"b{b}_{i}" for i in ids], seeds=seeds, preprocessed=True)
            sync()
            futures += [pool.submit(_finalize_cpu, o, out, opts) for o in objs]
        results = [f.result() for f in futures]
        wall = first_s + time.perf_counter() - t0
    bad = [r for r in results if not r[0]]
    if bad:
        raise SystemExit(f"finalize failed: {bad[0][1]}: {bad[0][2]}")
    n = len(results)
    return {
        "objects": n,
        "batches": batches,
        "workers": workers,
        "threads_per_worker": threads,
        "wall_s": wall,
        "objects_per_min": 60.0 * n / wall,
        "s_per_object": wall / n,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("tiny", "full-cpu", "full"), default="tiny")
    p.add_argument("--runs", type=int, default=3, help="timed runs (tiny mode)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=1, help="images per diffusion call (full mode)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per stage (tiny: 2, full: 50)")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "dpmpp", "unipc"), help="diffusion sampler")
    p.add_argument("--texture-size", type=int, default=None, help="tiny: 256, full: 1024")
    p.add_argument("--low-vram", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--finalize", type=int, default=None, help="full mode: finalize only the first N objects")
    p.add_argument("--no-clean", action="store_true", help="full mode: skip mesh cleaning (no pymeshlab)")
    p.add_argument(
        "--finalize-workers",
        type=int,
        default=0,
        help="full mode: also run --batches batches end to end with this many CPU finalize processes",
    )
    p.add_argument("--batches", type=int, default=2, help="full mode: batches of the pipelined run")
    p.add_argument(
        "--max-faces", type=int, default=None, help="full mode: face budget before unwrap (0: none)"
    )
    p.add_argument("--tiny-models", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        rec = _worker(args.worker, Path(args.worker_dir), args)
        Path(args.worker_dir, f"{args.worker}.json").write_text(json.dumps(rec))
        return 0
    payload = {"tiny": bench_tiny, "full-cpu": bench_full_cpu, "full": bench_full}[args.mode](args)
    path = _save(
        args.mode if args.mode != "full" else f"full_{args.device.replace(':', '')}_b{args.batch}", payload
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
