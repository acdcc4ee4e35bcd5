"""Benchmark of the multi-view diffusion UNets at CRM's full size: one guided call, ours vs the same maths.

Modes:

* ``calls`` (default, CPU fp32): one guided UNet call of stage 1 (2 x 7 frames) and of stage 2
  (2 x 6 frames) at 32 x 32 latents, as the sampler makes it (CLIP image-prompt tokens already
  resampled; the Resampler runs once per sampling run and is timed separately). Each stage runs in
  its own process, which times, round-robin (A B A B ...):

  - ``ours``: `MultiViewUNet.forward`;
  - ``plain_f``: a plain ``torch.nn.functional`` forward of the same weights
    (`benchmarks/plain_forward.py`: the same maths: every convolution, norm, linear and
    ``scaled_dot_product_attention`` call in the order the official model makes them, no diffusers
    blocks), the same-run baseline; its output is compared with ours.

  The process first tunes the CPU allocator as the pipeline does (`pipeline.weights.cpu_allocator`);
  ``--system-allocator`` leaves glibc's defaults (for reference). Weights: ``--weights DIR``
  (official-format files, e.g. written by ``bench_loading.py make-files`` and converted by a resolve)
  or seeded random weights built in the process. The official per-call figures of issue 15 (this
  machine class, 2 threads, the official code with an exact SDPA stand-in for xformers) are recorded
  beside ours.
* ``stage`` (``--steps N``, e.g. ``--device cuda --dtype fp16 --steps 50``): a whole stage-1 sampling
  run (VAE encode, N guided steps, decode), CLIP towers left out (random features stand in).

Results: ``benchmarks/results/bench_multiview.json`` (or ``--name``).

Usage: ``python benchmarks/bench_multiview.py [--weights DIR] [--repeats 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.measure import MemorySampler, interleaved, machine, run_worker, save  # noqa: E402
from benchmarks.plain_forward import plain_forward  # noqa: E402

#: Issue 15: the official code on this machine class (CPU fp32, 2 threads, exact SDPA stand-in).
OFFICIAL_CALL_S = {"stage1": 18.2, "stage2": 14.9}


# ---------------------------------------------------------------------------------- workers
def _randomize_(module, seed: int) -> None:
    """N(0, 1/fan_in) weights, 1 + 0.1 N norm gains, 0.05 N biases (after a build on meta)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def _unet(stage: int, weights: str | None):
    import torch

    from crm_models.multiview import MultiViewDiffusionModel, MultiViewUNet, MultiViewUNetConfig, StageConfig

    if weights:
        from pipeline.weights import resolve_weights
        from pipeline.weights.loading import build_on_meta
        from pipeline.weights.multiview import load_multiview_weights

        rw = resolve_weights(weights, allow_download=False)
        cfg = StageConfig.stage1() if stage == 1 else StageConfig.stage2()
        model = build_on_meta(MultiViewDiffusionModel, cfg, with_clip=False)
        load_multiview_weights(model, rw.path(f"stage{stage}"))
        return model.unet.eval().requires_grad_(False)
    cfg = MultiViewUNetConfig.stage1() if stage == 1 else MultiViewUNetConfig.stage2()
    with torch.device("meta"):
        unet = MultiViewUNet(cfg)
    unet = unet.to_empty(device="cpu")
    _randomize_(unet, seed=stage)
    return unet.eval().requires_grad_(False)


def worker_calls(stage: int, weights: str | None, repeats: int, threads: int | None, system: bool) -> dict:
    import torch

    from pipeline.weights.cpu_allocator import tune_cpu_allocator

    tuned = False if system else tune_cpu_allocator()
    if threads:
        torch.set_num_threads(threads)
    with MemorySampler() as mem:
        t0 = time.perf_counter()
        unet = _unet(stage, weights)
        build_s = time.perf_counter() - t0
        frames = 7 if stage == 1 else 6
        batch = 2 * frames
        g = torch.Generator().manual_seed(10 + stage)
        x = torch.randn(batch, 4, 32, 32, generator=g)
        t = torch.full((batch,), 981, dtype=torch.long)
        ctx = torch.randn(2, 77, 1024, generator=g)
        cam = torch.randn(batch, 16, generator=g)
        tokens = torch.randn(2, 257, 1280, generator=g)
        extra = (
            {"ip_img": torch.randn(2, 4, 32, 32, generator=g)}
            if stage == 1
            else {"pixel_latents": torch.randn(batch, 4, 32, 32, generator=g)}
        )
        with torch.inference_mode():
            t0 = time.perf_counter()
            embeds = unet.encode_image_prompt(tokens)
            resampler_s = time.perf_counter() - t0
            fns = {
                "ours": lambda: unet(x, t, ctx, cam, frames, image_embeds=embeds, **extra),
                "plain_f": lambda: plain_forward(unet, x, t, ctx, cam, frames, embeds, **extra),
            }
            first = {name: _timed(fn) for name, fn in fns.items()}  # warm-up (first touch of weights)
            diff = float((first["ours"][1] - first["plain_f"][1]).abs().max())
            equal = bool(torch.equal(first["ours"][1], first["plain_f"][1]))
            timing = interleaved(fns, repeats)
    return {
        "stage": stage,
        "batch_frames": batch,
        "latent": 32,
        "allocator_tuned": tuned,
        "torch_threads": torch.get_num_threads(),
        "weights": weights or "seeded random",
        "build_s": round(build_s, 2),
        "resampler_s": round(resampler_s, 3),
        "first_call_s": {k: round(v[0], 2) for k, v in first.items()},
        "max_abs_diff_vs_plain_f": diff,
        "bit_identical_to_plain_f": equal,
        "timing": timing,
        "ours_over_plain_f": round(timing["ours"]["median_wall_s"] / timing["plain_f"]["median_wall_s"], 3),
        "peak": mem.peak(),
    }


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def worker_stage(args) -> dict:
    import torch

    from crm_models.multiview import MultiViewDiffusionModel, MultiViewSampler, StageConfig
    from crm_models.multiview.schedule import schedule_buffers

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with torch.device("meta"):
        model = MultiViewDiffusionModel(StageConfig.stage1(), with_clip=False)
    model = model.to_empty(device="cpu")
    _randomize_(model, seed=1)
    with torch.no_grad():
        for name, value in schedule_buffers(model.config.schedule).items():
            getattr(model, name).copy_(value)
    model = model.to(device=args.device, dtype=dtype).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8, generator=g)
    ctx, uctx = torch.randn(1, 77, 1024, generator=g), torch.randn(1, 77, 1024, generator=g)
    ip = torch.randn(1, 257, 1280, generator=g)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    MultiViewSampler(model).sample(
        image,
        ip_tokens=ip,
        context=ctx,
        uncond_context=uctx,
        generator=torch.Generator().manual_seed(0),
        num_steps=args.steps,
    )
    sync()
    total = time.perf_counter() - t0
    res = {"mode": "stage", "steps": args.steps, "stage_s": total, "per_step_s": total / args.steps}
    if args.device.startswith("cuda"):
        res["cuda_peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 1024.0**3
        res["gpu"] = torch.cuda.get_device_name()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", nargs="?", default="calls", choices=("calls", "stage", "worker"))
    p.add_argument("--weights", default=None, help="folder of official-format checkpoints (default: random)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--system-allocator", action="store_true", help="leave glibc's allocator defaults")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--stage", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--name", default=None, help="results file name (default bench_multiview[_stage])")
    args = p.parse_args(argv)
    if args.mode == "worker":
        import json

        out = worker_calls(args.stage, args.weights, args.repeats, args.threads, args.system_allocator)
        print(json.dumps(out))
        return 0
    if args.mode == "stage":
        res = {"machine": machine(), **worker_stage(args), "device": args.device, "dtype": args.dtype}
        print(res)
        print("wrote", save(args.name or "bench_multiview_stage", res))
        return 0
    res: dict = {"machine": machine(), "official_call_s_issue_15": OFFICIAL_CALL_S}
    me = Path(__file__).resolve()
    for stage in (int(s) for s in args.stages.split(",")):
        wargs = ["--stage", str(stage), "--repeats", str(args.repeats)]
        if args.weights:
            wargs += ["--weights", args.weights]
        if args.threads:
            wargs += ["--threads", str(args.threads)]
        if args.system_allocator:
            wargs.append("--system-allocator")
        r = run_worker(me, wargs)
        official = OFFICIAL_CALL_S[f"stage{stage}"]
        r["ours_over_official"] = round(r["timing"]["ours"]["median_wall_s"] / official, 3)
        res[f"stage{stage}"] = r
        ours, plain = r["timing"]["ours"], r["timing"]["plain_f"]
        print(
            f"stage {stage}: ours {ours['median_wall_s']:.2f} s (cpu {ours['median_cpu_s']:.1f}), "
            f"plain F {plain['median_wall_s']:.2f} s (cpu {plain['median_cpu_s']:.1f}), "
            f"official (issue) {official} s; max |diff| {r['max_abs_diff_vs_plain_f']:.2e}"
        )
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print("wrote", save(args.name or "bench_multiview", res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
