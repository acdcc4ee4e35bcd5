"""Benchmark of loading official-format checkpoints at full size: conversion, resolves, per-stage loads.

Sub-commands:

* ``make-files DIR [--stage-clip text|none|full] [--seed 0]``: write seeded random weights in the
  official formats and key layouts (the full-size manifests under ``$CRM_REFERENCE_DIR``):
  ``CRM.pth`` (476 MB), ``pixel-diffusion.pth`` / ``ccm-diffusion.pth`` (UNet + VAE + schedule
  buffers, plus CLIP keys per ``--stage-clip``: ``text`` = the text tower, 5.5 GB each) and
  ``open_clip_pytorch_model.bin`` (3.9 GB), each written with ``torch.save`` like the official
  code. CLIP and VAE values are the same in every file (frozen components), UNets differ per stage.
  Values are N(0, 1/fan_in) weights, 1 + 0.1 N norm gains, 0.05 N biases, the real schedule.
* ``run DIR``: the measurements below, each in a fresh process (its peak RSS is its own), written
  to ``benchmarks/results/bench_loading.json``:

  - ``resolve_first``: ``resolve_weights(DIR)`` with no converted file and no hash cache (every
    ``.pth`` hashed and converted to ``.safetensors``); the page cache is left as found (the
    record carries no guarantee that the source files are cached or not);
  - ``resolve_later``: the same call once the converted files exist;
  - ``load_recon`` / ``load_stage1`` / ``load_stage2``: `pipeline.weights.models` loaders on the CPU
    in fp32 from the converted files, each alone: load time, then the time to read every parameter
    once (``touch``: with memory-mapped weights the pages are read on first use, so this is part of
    the cost of a first call), resident memory after each, peak (kernel high-water mark) and the
    loaded model's bytes;
  - ``load_models``: all three in one process as the pipeline loads them (stage 2 takes stage 1's
    identical VAE and CLIP modules), then touched;
  - ``baseline_*`` (``--baseline-rev REV``): the same recon load and the conversion of the CLIP file
    with the loader at commit REV, in the same run (stage loads of that loader peak above 15 GB and
    are not run on shared machines; their figures are quoted from issue 15).

* ``cli DIR [--steps 2]``: the whole CLI in one process (``python -m pipeline SAMPLE --weights
  DIR --steps N --device cpu``) with the converted files: the child's peak RSS (kernel high-water
  mark from ``wait4``) and a timeline of its resident memory split into anonymous pages
  (activations, heap) and file pages (memory-mapped weights), sampled every 0.25 s, with the
  report's stage timings; written to ``benchmarks/results/bench_loading_cli.json``.

Usage: ``python benchmarks/bench_loading.py make-files /scratch/crm-full``, then
``python benchmarks/bench_loading.py run /scratch/crm-full [--baseline-rev eb218c4~1]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.measure import MemorySampler, machine, run_worker, save  # noqa: E402

REFERENCE = Path(os.environ.get("CRM_REFERENCE_DIR", REPO.parent / "shared" / "reference"))
CLIP_PREFIX = "clip_model.model."
TEXT_TOWER = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.")
FILES = {
    "recon": "CRM.pth",
    "stage1": "pixel-diffusion.pth",
    "stage2": "ccm-diffusion.pth",
    "clip": "open_clip_pytorch_model.bin",
}
#: Figures of the loader before issue 15, measured by the team on this machine class (issue text).
ISSUE_BEFORE = {
    "resolve_first_s": 48.6,
    "resolve_first_peak_gb": 7.9,
    "load_stage_peak_gb": 15.4,
    "official_load_stage_peak_gb": 11.6,
    "cli_peak_gb": 20.7,
}


# ---------------------------------------------------------------------------------- random files
def _manifest(name: str) -> list[dict]:
    return json.loads((REFERENCE / name).read_text())["keys"]


def _value(key: str, shape: list[int], seed: int, stream: str):
    import torch

    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{stream}:{key}".encode()))
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=g) / math.sqrt(fan_in)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return 0.05 * torch.randn(shape, generator=g)
    if leaf == "weight":  # 1-D weights are norm gains
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _stage_dict(stage: int, seed: int, stage_clip: str) -> dict:
    from crm_models.multiview.schedule import schedule_buffers

    schedule = schedule_buffers()
    out = {}
    for e in _manifest(f"multiview/full_state_dict_manifest_stage{stage}.json"):
        key = e["key"]
        if key in schedule:
            out[key] = schedule[key].clone()
        elif key.startswith(CLIP_PREFIX):
            bare = key[len(CLIP_PREFIX) :]
            if stage_clip == "full" or (stage_clip == "text" and bare.startswith(TEXT_TOWER)):
                out[key] = _value(bare, e["shape"], seed, "clip")
        elif key.startswith("vae_model."):
            out[key] = _value(key, e["shape"], seed, "vae")
        else:
            out[key] = _value(key, e["shape"], seed, f"stage{stage}")
    return out


def make_files(directory: Path, seed: int, stage_clip: str) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    writers = {
        "recon": lambda: {
            e["key"]: _value(e["key"], e["shape"], seed, "recon")
            for e in _manifest("recon/crm_full_state_dict_manifest.json")
        },
        "clip": lambda: {
            e["key"][len(CLIP_PREFIX) :]: _value(e["key"][len(CLIP_PREFIX) :], e["shape"], seed, "clip")
            for e in _manifest("multiview/full_state_dict_manifest_stage1.json")
            if e["key"].startswith(CLIP_PREFIX)
        },
        "stage1": lambda: _stage_dict(1, seed, stage_clip),
        "stage2": lambda: _stage_dict(2, seed, stage_clip),
    }
    for role, build in writers.items():
        t0 = time.perf_counter()
        sd = build()
        path = directory / FILES[role]
        torch.save(sd, path)
        print(
            f"{path}: {len(sd)} tensors, {path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s"
        )
        del sd
    (directory / "MAKE_FILES.json").write_text(json.dumps({"seed": seed, "stage_clip": stage_clip}) + "\n")


# ---------------------------------------------------------------------------------- workers
def _model_bytes(*models) -> int:
    seen, total = set(), 0
    for m in models:
        for t in (*m.parameters(), *m.buffers()):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def _touch(*models) -> float:
    """Read every parameter once (sum); returns seconds."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.sum()
    return time.perf_counter() - t0


def worker_resolve(directory: Path) -> dict:
    from pipeline.weights import resolve_weights

    with MemorySampler() as mem:
        base = mem.mark("start")
        t0 = time.perf_counter()
        rw = resolve_weights(directory, allow_download=False)
        elapsed = time.perf_counter() - t0
    return {
        "seconds": round(elapsed, 2),
        "start_mb": base,
        "peak": mem.peak(),
        "files": {r: {"path": str(f.path), "sha256": f.sha256[:16]} for r, f in rw.files.items()},
    }


def worker_load(directory: Path, what: str) -> dict:
    import torch

    from pipeline.options import PipelineOptions
    from pipeline.weights import resolve_weights
    from pipeline.weights.models import load_models, load_recon, load_stage

    options = PipelineOptions(device="cpu")
    rw = resolve_weights(directory, allow_download=False)
    out: dict = {}
    with MemorySampler() as mem:
        out["start_mb"] = mem.mark("start")
        t0 = time.perf_counter()
        if what == "recon":
            models = [load_recon(rw, options)]
        elif what == "stage1":
            models = [load_stage(1, rw, torch.float32)]
        elif what == "stage2":
            models = [load_stage(2, rw, torch.float32)]
        elif what == "models":
            loaded = load_models(rw, options)
            models = list(loaded.modules())
            out["stage2_shares"] = [
                name
                for name in ("vae", "text_encoder", "image_encoder")
                if getattr(loaded.stage2, name) is getattr(loaded.stage1, name)
            ]
        else:
            raise ValueError(what)
        out["load_s"] = round(time.perf_counter() - t0, 2)
        out["after_load_mb"] = mem.mark("after_load")
        out["touch_s"] = round(_touch(*models), 2)
        out["after_touch_mb"] = mem.mark("after_touch")
    out["model_mb"] = round(_model_bytes(*models) / 2**20, 1)
    out["peak"] = mem.peak()
    out["peak_over_model"] = round((out["peak"]["hwm_mb"] - out["start_mb"]["VmRSS"]) / out["model_mb"], 3)
    return out


def worker_baseline_recon(directory: Path) -> dict:
    """The loader at the baseline commit (on sys.path first): recon model from CRM.safetensors."""
    import torch

    from pipeline.weights.recon import build_recon_model

    with MemorySampler() as mem:
        start = mem.mark("start")
        t0 = time.perf_counter()
        model = build_recon_model(directory / "CRM.safetensors")
        load_s = time.perf_counter() - t0
        mem.mark("after_load")
    with torch.no_grad():
        touch = _touch(model)
    return {
        "load_s": round(load_s, 2),
        "touch_s": round(touch, 2),
        "start_mb": start,
        "marks": mem.marks,
        "model_mb": round(_model_bytes(model) / 2**20, 1),
        "peak": mem.peak(),
    }


def worker_baseline_convert(src: Path, dst: Path) -> dict:
    """The conversion at the baseline commit: `convert_to_safetensors(src, dst)`."""
    from pipeline.weights.checkpoints import convert_to_safetensors

    with MemorySampler() as mem:
        start = mem.mark("start")
        t0 = time.perf_counter()
        convert_to_safetensors(src, dst)
        elapsed = time.perf_counter() - t0
    dst.unlink()
    return {"seconds": round(elapsed, 2), "start_mb": start, "peak": mem.peak(), "bytes": src.stat().st_size}


def worker_convert(src: Path, dst: Path) -> dict:
    from pipeline.weights.checkpoints import convert_to_safetensors

    with MemorySampler() as mem:
        start = mem.mark("start")
        t0 = time.perf_counter()
        convert_to_safetensors(src, dst)
        elapsed = time.perf_counter() - t0
    dst.unlink()
    return {"seconds": round(elapsed, 2), "start_mb": start, "peak": mem.peak(), "bytes": src.stat().st_size}


# ---------------------------------------------------------------------------------- whole CLI
def _proc_status_mb(pid: int) -> dict[str, float] | None:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024.0
    except OSError:
        return None
    return out


def run_cli(args) -> dict:
    """`python -m pipeline` on the sample image, its memory sampled from outside (see docstring)."""
    directory = Path(args.directory).resolve() if Path(args.directory).is_dir() else Path(args.directory)
    made = directory / "MAKE_FILES.json"
    image = REPO / "pipeline" / "samples" / args.image
    with tempfile.TemporaryDirectory(prefix="bench-loading-cli-") as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable, "-m", "pipeline", str(image), "--weights", str(directory),
            "--steps", str(args.steps), "--device", "cpu", "--out", str(Path(tmp) / "out"),
            "--report", str(report), "--no-progress", "--offline",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        timeline, peak = [], {"VmRSS": 0.0, "RssAnon": 0.0, "RssFile": 0.0, "t": 0.0}
        while proc.poll() is None:
            s = _proc_status_mb(proc.pid)
            if s:
                t = round(time.perf_counter() - t0, 2)
                if s.get("VmRSS", 0.0) > peak["VmRSS"]:
                    peak = {**s, "t": t}
                if not timeline or t - timeline[-1][0] >= 1.0:
                    timeline.append([t, round(s.get("RssAnon", 0.0)), round(s.get("RssFile", 0.0))])
            time.sleep(0.25)
        wall = time.perf_counter() - t0
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        # the child is reaped by poll(); its high-water mark is in the children's rusage
        maxrss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
        rows = json.loads(report.read_text()) if report.is_file() else []
    row = rows[0] if rows else {}
    return {
        "machine": machine(),
        "command": " ".join(
            ["python", *cmd[1:3], f"pipeline/samples/{args.image}", "--weights", "DIR", *cmd[6:10]]
        ),
        "files": json.loads(made.read_text()) if made.is_file() else str(directory),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_mb_kernel": round(maxrss_mb, 1),
        "peak_rss_sampled_mb": {k: round(v, 1) for k, v in peak.items()},
        "timeline_s_anon_mb_file_mb": timeline,
        "timings_s": {k: round(v, 2) for k, v in row.get("timings", {}).items()},
        "mesh": row.get("mesh"),
        "status": row.get("status"),
        "output_tail": output[-2000:],
        "issue_15_before_cli_peak_gb": ISSUE_BEFORE["cli_peak_gb"],
        "note": args.note,
    }


# ---------------------------------------------------------------------------------- driver
def _clear_converted(directory: Path) -> None:
    for name in FILES.values():
        stem = name.rsplit(".", 1)[0]
        (directory / f"{stem}.safetensors").unlink(missing_ok=True)


def _baseline_tree(rev: str, dst: Path) -> Path:
    archive = subprocess.run(
        ["git", "archive", rev, "pipeline", "crm_models"], cwd=REPO, capture_output=True, check=True
    ).stdout
    dst.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    return dst


def run(args) -> dict:
    directory = Path(args.directory).resolve()
    files = json.loads((directory / "MAKE_FILES.json").read_text())
    result: dict = {
        "machine": machine(),
        "files": {
            **files,
            "sizes_gb": {r: round((directory / n).stat().st_size / 1e9, 3) for r, n in FILES.items()},
        },
        "issue_15_before": ISSUE_BEFORE,
    }
    me = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        tmp = Path(tmp)
        cache = {"CRM_CACHE_DIR": str(tmp / "crm-cache"), "HF_HUB_OFFLINE": "1"}
        if args.baseline_rev:
            tree = _baseline_tree(args.baseline_rev, tmp / "baseline")
            env = {**cache, "BENCH_LOADING_PATH": str(tree)}
        _clear_converted(directory)
        shutil.rmtree(tmp / "crm-cache", ignore_errors=True)
        result["resolve_first"] = run_worker(me, ["resolve", str(directory)], cache)
        print("resolve_first", result["resolve_first"])
        result["resolve_later"] = run_worker(me, ["resolve", str(directory)], cache)
        print("resolve_later", result["resolve_later"])
        for what in ("recon", "stage1", "stage2", "models"):
            result[f"load_{what}"] = run_worker(me, ["load", str(directory), what], cache)
            print(f"load_{what}", result[f"load_{what}"])
        if args.baseline_rev:
            result["baseline_rev"] = args.baseline_rev
            result["baseline_recon"] = run_worker(me, ["baseline-recon", str(directory)], env)
            print("baseline_recon", result["baseline_recon"])
            result["recon_now"] = run_worker(me, ["load", str(directory), "recon"], cache)
            print("recon_now", result["recon_now"])
            clip_src, clip_dst = directory / FILES["clip"], tmp / "clip-baseline.safetensors"
            result["baseline_convert_clip"] = run_worker(
                me, ["baseline-convert", str(clip_src), str(clip_dst)], env
            )
            print("baseline_convert_clip", result["baseline_convert_clip"])
            result["convert_clip_now"] = run_worker(me, ["convert", str(clip_src), str(clip_dst)], cache)
            print("convert_clip_now", result["convert_clip_now"])
    result["machine_after"] = {"load_average": [round(x, 2) for x in os.getloadavg()]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-files")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage-clip", choices=("text", "none", "full"), default="text")
    p = sub.add_parser("run")
    p.add_argument("directory")
    p.add_argument("--baseline-rev", default=None, help="also measure the loader at this commit")
    p.add_argument("--name", default="bench_loading", help="results file name (without .json)")
    p = sub.add_parser("cli")
    p.add_argument("directory")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--image", default="alarm.png", help="a file of pipeline/samples")
    p.add_argument("--name", default="bench_loading_cli", help="results file name (without .json)")
    p.add_argument("--note", default=None, help="recorded as is (e.g. the run's conditions)")
    p = sub.add_parser("worker")
    p.add_argument("what", choices=("resolve", "load", "baseline-recon", "baseline-convert", "convert"))
    p.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    if args.cmd == "make-files":
        make_files(Path(args.directory), args.seed, args.stage_clip)
    elif args.cmd == "cli":
        out = run_cli(args)
        print({k: v for k, v in out.items() if k not in ("timeline_s_anon_mb_file_mb", "output_tail")})
        print(f"wrote {save(args.name, out)}")
    elif args.cmd == "run":
        path = save(args.name, run(args))
        print(f"wrote {path}")
    else:
        rest = args.rest
        if args.what == "resolve":
            out = worker_resolve(Path(rest[0]))
        elif args.what == "load":
            out = worker_load(Path(rest[0]), rest[1])
        elif args.what == "baseline-recon":
            out = worker_baseline_recon(Path(rest[0]))
        elif args.what == "baseline-convert":
            out = worker_baseline_convert(Path(rest[0]), Path(rest[1]))
        else:
            out = worker_convert(Path(rest[0]), Path(rest[1]))
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    if os.environ.get("BENCH_LOADING_PATH"):  # a baseline tree goes before the repository
        sys.path.insert(0, os.environ["BENCH_LOADING_PATH"])
    sys.exit(main())
