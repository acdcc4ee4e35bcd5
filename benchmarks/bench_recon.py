"""Benchmark of the reconstruction stage at CRM's full size on the CPU (fp32): U-Net and decode.

Measurements, each in its own process (its peak RSS is its own), with the CPU allocator tuned as
the pipeline tunes it (`pipeline.weights.cpu_allocator`; ``--system-allocator`` leaves glibc's
defaults, for reference):

* ``unet``: the U-Net forward at 256 x 768 (``run_unet``, the t = 20 input noised, NHWC as the
  pipeline runs it on the CPU), timed round-robin against a plain ``torch.nn.functional`` forward
  of the same weights (`benchmarks/plain_forward.py`: the same maths as the diffusers
  ``UNet2DModel`` the official code runs: every convolution, norm, attention and add in the same
  order, no diffusers blocks),
  once in the same NHWC layout (``plain_f``, the same-maths baseline) and once in NCHW
  (``plain_f_nchw``, the official code's layout); outputs compared. The official figure of issue 15
  (5.2 s, this machine class, 2 threads) is recorded beside them;
* ``decode``: decode at grid 80 (lattice features + SDF MLP + weight MLP on surface cubes +
  FlexiCubes, no vertex colours, as the official decode) round-robin against a straightforward
  decode of the same triplane in the style of the official code (per-point sampling of all grid
  vertices, MLPs over all vertices / cubes at once, then FlexiCubes); face counts compared.

Weights: ``--weights DIR`` (official-format files, e.g. ``bench_loading.py make-files``), else
seeded random weights (1-D parameters perturbed so that every path contributes).
Results: ``benchmarks/results/bench_recon.json`` (or ``--name``).

Usage: ``python benchmarks/bench_recon.py [--repeats 3] [--threads 2] [--weights DIR] [--only unet]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.measure import MemorySampler, interleaved, machine, run_worker, save  # noqa: E402
from benchmarks.plain_forward import plain_unet  # noqa: E402

#: Issue 15: the official code on this machine class (CPU fp32, 2 threads).
OFFICIAL = {"unet_s": 5.2, "mesh_extraction_s": 5.9}


# ---------------------------------------------------------------------------------- workers
def _model(weights: str | None, grid_res: int):
    import torch

    from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig

    cfg = ReconConfig().with_decoder(grid_res=grid_res)
    if weights:
        from pipeline.weights import resolve_weights
        from pipeline.weights.recon import build_recon_model

        # on the CPU: NHWC U-Net, as the pipeline runs it (`pipeline.weights.recon.to_channels_last`)
        return build_recon_model(resolve_weights(weights, allow_download=False).path("recon"), cfg)
    from pipeline.weights.recon import to_channels_last

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ConvolutionalReconstructionModel(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return to_channels_last(model.eval().requires_grad_(False))


def _setup(threads: int | None, system: bool) -> bool:
    import torch

    from pipeline.weights.cpu_allocator import tune_cpu_allocator

    tuned = False if system else tune_cpu_allocator()
    if threads:
        torch.set_num_threads(threads)
    return tuned


def worker_unet(args) -> dict:
    import copy

    import torch

    tuned = _setup(args.threads, args.system_allocator)
    with MemorySampler() as mem:
        model = _model(args.weights, args.grid)
        # the U-Net with its weights in NCHW (the official code's layout), for the NCHW baseline
        nchw = copy.deepcopy(model.unet2.unet).to(memory_format=torch.contiguous_format)
        r = model.cfg.plane_resolution
        g = torch.Generator().manual_seed(2)
        with torch.inference_mode():
            xn = model.add_noise(torch.rand(1, 12, r, 3 * r, generator=g), generator=g)
            t = model.noiser.timesteps(1, device=xn.device)
            full = torch.cat([xn, model.unet2.learned_plane.expand(1, -1, -1, -1)], dim=1)
            full_nhwc = full.contiguous(memory_format=torch.channels_last)
            fns = {
                "ours": lambda: model.run_unet(xn),
                "plain_f": lambda: plain_unet(model.unet2.unet, full_nhwc, t),
                "plain_f_nchw": lambda: plain_unet(nchw, full, t),
            }
            first = {}
            for name, fn in fns.items():
                t0 = time.perf_counter()
                out = fn()
                first[name] = (time.perf_counter() - t0, out)
            a, b, c = (first[k][1] for k in fns)
            timing = interleaved(fns, args.repeats)
    wall = {k: v["median_wall_s"] for k, v in timing.items()}
    return {
        "allocator_tuned": tuned,
        "torch_threads": torch.get_num_threads(),
        "weights": args.weights or "seeded random",
        "layout": "ours and plain_f: NHWC (channels_last) weights and activations, as the pipeline runs on "
        "the CPU; plain_f_nchw: NCHW, the official code's layout",
        "first_call_s": {k: round(v[0], 2) for k, v in first.items()},
        "bit_identical_to_plain_f": bool(torch.equal(a, b)),
        "max_abs_diff_vs_plain_f": float((a - b).abs().max()),
        "max_abs_diff_vs_nchw": float((a - c).abs().max()),
        "max_abs_output": float(c.abs().max()),
        "timing": timing,
        "ours_over_plain_f": round(wall["ours"] / wall["plain_f"], 3),
        "ours_over_plain_f_nchw": round(wall["ours"] / wall["plain_f_nchw"], 3),
        "ours_over_official": round(wall["ours"] / OFFICIAL["unet_s"], 3),
        "peak": mem.peak(),
    }


def worker_decode(args) -> dict:
    import torch

    from crm_models.flexicubes import flexicubes_extract
    from crm_models.recon.triplane import sample_points, split_planes

    tuned = _setup(args.threads, args.system_allocator)
    with MemorySampler() as mem:
        model = _model(args.weights, args.grid)
        r, c, n = model.cfg.plane_resolution, model.cfg.c_dim, args.grid
        tri = torch.randn(1, c, r, 3 * r, generator=torch.Generator().manual_seed(1))

        @torch.no_grad()
        def straightforward():
            planes = split_planes(tri)
            verts, cubes, _ = model.grid()
            feats = sample_points(planes, verts)
            out = model.sdfMlp(feats)
            sdf = out[:, 0] + 0.5 - torch.norm(verts, dim=-1)
            v_def = verts + torch.tanh(out[:, 1:]) / n * 0.95 / 0.95 * 0.5
            w = model.weightMlp(feats[cubes.reshape(-1)].reshape(cubes.shape[0], -1)) * 0.1
            return flexicubes_extract(v_def, sdf, cubes, n, w, weight_scale=0.5, training=False)

        fns = {"ours": lambda: model.decode(tri, vertex_colors=False), "straightforward": straightforward}
        faces = {name: int(fn().faces.shape[0]) for name, fn in fns.items()}  # warm-up: grid, tables
        timing = interleaved(fns, args.repeats)
    return {
        "allocator_tuned": tuned,
        "torch_threads": torch.get_num_threads(),
        "grid_res": n,
        "faces": faces,
        "timing": timing,
        "ours_over_straightforward": round(
            timing["ours"]["median_wall_s"] / timing["straightforward"]["median_wall_s"], 3
        ),
        "peak": mem.peak(),
    }


WORKERS = {"unet": worker_unet, "decode": worker_decode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", nargs="?", default="run", choices=("run", "worker"))
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each variant (after a warm-up)")
    p.add_argument("--grid", type=int, default=80)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--weights", default=None, help="folder of official-format checkpoints (default: random)")
    p.add_argument("--system-allocator", action="store_true", help="leave glibc's allocator defaults")
    p.add_argument("--only", nargs="*", choices=sorted(WORKERS), default=sorted(WORKERS))
    p.add_argument("--which", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--name", default="bench_recon", help="results file name (without .json)")
    args = p.parse_args(argv)
    if args.mode == "worker":
        print(json.dumps(WORKERS[args.which](args)))
        return 0
    report: dict = {"machine": machine(), "official_issue_15": OFFICIAL, "plane": [256, 768]}
    me = Path(__file__).resolve()
    for name in args.only:
        wargs = ["--which", name, "--repeats", str(args.repeats), "--grid", str(args.grid)]
        if args.threads:
            wargs += ["--threads", str(args.threads)]
        if args.weights:
            wargs += ["--weights", args.weights]
        if args.system_allocator:
            wargs.append("--system-allocator")
        report[name] = run_worker(me, wargs)
        timing = report[name]["timing"]
        summary = ", ".join(
            f"{k} {v['median_wall_s']:.2f} s (cpu {v['median_cpu_s']:.1f} s)" for k, v in timing.items()
        )
        print(f"{name}: {summary}; peak {report[name]['peak']['hwm_mb']:.0f} MB", flush=True)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print("wrote", save(args.name, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
