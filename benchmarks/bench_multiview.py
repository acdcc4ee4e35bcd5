"""Benchmark of the multi-view diffusion UNet / stages at CRM's full size (random weights).

Modes:
  * unet (default): one guided UNet call of stage 1 at full size: 2 x 7 frames (cfg), 32x32 latents,
    77 + 16 context tokens; median of --runs calls after one untimed warm-up call (reported as
    `first_call_s`). Peak RSS of the process (it holds the 941M-parameter UNet, like a real run).
    Official reference on CPU, fp32: 87 s and 12.1 GB.
  * stage (`--steps N`): a whole stage-1 sampling run (VAE encode, N DDIM steps with cfg, decode),
    CLIP towers left out (random text features / CLIP tokens stand in), e.g.
    `--device cuda --dtype fp16 --steps 50`.

Results are printed as a table and written to benchmarks/results/bench_multiview.json.

Usage: ``python benchmarks/bench_multiview.py [--runs 2] [--threads N] [--device cpu|cuda]
[--dtype fp32|fp16|bf16] [--steps N] [--attention-chunk N] [--baseline]``

`--baseline` swaps in the official CPU attention stand-in (full float32 score matrices) so the
official cost can be re-measured on the same machine under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))

OFFICIAL_CPU = {"unet_call_s": 87.0, "peak_rss_gb": 12.1}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0**2  # Linux: KiB


def _randomize_(module, seed: int = 0) -> None:
    """Cheap random init after a meta build: N(0, 1/fan_in) weights, small biases, unit norms."""
    import torch

    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        with torch.no_grad():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.fill_(1.0)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _textbook_attention(q, k, v, chunk=None):
    """The official CPU stand-in for xformers: softmax(q k^T / sqrt(d)) v with the full matrix in float32."""
    import torch

    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def _build(args):
    import torch

    if args.baseline:
        import crm_models.multiview.unet as unet_module

        unet_module._sdpa = _textbook_attention

    from crm_models.multiview import MultiViewDiffusionModel, MultiViewUNet, MultiViewUNetConfig, StageConfig

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    with torch.device("meta"):
        if args.steps:
            model = MultiViewDiffusionModel(
                StageConfig.stage1(), with_clip=False, attention_chunk=args.attention_chunk
            )
        else:
            model = MultiViewUNet(MultiViewUNetConfig.stage1(), attention_chunk=args.attention_chunk)
    model = model.to_empty(device="cpu")
    _randomize_(model)
    if args.steps:
        from crm_models.multiview.schedule import schedule_buffers

        for name, value in schedule_buffers(model.config.schedule).items():
            getattr(model, name).copy_(value)
    return model.to(device=args.device, dtype=dtype).eval().requires_grad_(False)


def bench_unet(args) -> dict:
    import torch

    model = _build(args)
    build_rss = _peak_rss_gb()
    g = torch.Generator().manual_seed(1)
    frames, objects, lat = 7, 1, args.latent
    batch = 2 * objects * frames
    dev, dt = args.device, model.dtype
    x = torch.randn(batch, 4, lat, lat, generator=g).to(dev, dt)
    t = torch.full((batch,), 981, dtype=torch.long, device=dev)
    ctx = torch.randn(2 * objects, 77, 1024, generator=g).to(dev, dt)
    ip = torch.randn(2 * objects, 257, 1280, generator=g).to(dev, dt)
    cam = torch.randn(batch, 16, generator=g).to(dev, dt)
    ip_img = torch.randn(2 * objects, 4, lat, lat, generator=g).to(dev, dt)
    times = []
    with torch.inference_mode():
        for i in range(args.runs + 1):
            _sync(dev)
            t0 = time.perf_counter()
            out = model(x, t, ctx, cam, frames, ip_tokens=ip, ip_img=ip_img)
            _sync(dev)
            times.append(time.perf_counter() - t0)
            print(f"  call {i}: {times[-1]:.2f} s", flush=True)
    assert torch.isfinite(out).all()
    res = {
        "mode": "unet",
        "batch_frames": batch,
        "latent": lat,
        "first_call_s": times[0],
        "unet_call_s": statistics.median(times[1:]),
        "runs": args.runs,
        "peak_rss_gb": _peak_rss_gb(),
        "rss_after_build_gb": build_rss,
    }
    if dev.startswith("cuda"):
        res["cuda_peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 1024.0**3
    return res


def bench_stage(args) -> dict:
    import torch

    from crm_models.multiview import MultiViewSampler

    model = _build(args)
    g = torch.Generator().manual_seed(1)
    res_px = args.latent * 8
    image = torch.randint(0, 256, (1, res_px, res_px, 3), dtype=torch.uint8, generator=g)
    ctx = torch.randn(1, 77, 1024, generator=g)
    uctx = torch.randn(1, 77, 1024, generator=g)
    ip = torch.randn(1, 257, 1280, generator=g)
    sampler = MultiViewSampler(model)
    _sync(args.device)
    t0 = time.perf_counter()
    out = sampler.sample(
        image,
        ip_tokens=ip,
        context=ctx,
        uncond_context=uctx,
        generator=torch.Generator().manual_seed(0),
        num_steps=args.steps,
    )
    _sync(args.device)
    total = time.perf_counter() - t0
    res = {
        "mode": "stage",
        "steps": args.steps,
        "stage_s": total,
        "per_step_s": total / args.steps,
        "images_shape": list(out.images.shape),
        "peak_rss_gb": _peak_rss_gb(),
    }
    if args.device.startswith("cuda"):
        res["cuda_peak_alloc_gb"] = torch.cuda.max_memory_allocated() / 1024.0**3
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=2, help="timed UNet calls (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--steps", type=int, default=0, help="time a whole stage-1 run with this many DDIM steps")
    p.add_argument("--latent", type=int, default=32, help="latent size (32 = 256-pixel views)")
    p.add_argument("--attention-chunk", type=int, default=None, help="max queries per attention call")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="official-style attention (full float32 score matrices, as the official CPU stand-in) for a "
        "same-machine reference",
    )
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/bench_multiview[_baseline].json)"
    )
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_at_start": os.getloadavg()[0],
        "torch": torch.__version__,
        "device": args.device,
        "dtype": args.dtype,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    res = bench_stage(args) if args.steps else bench_unet(args)
    res.update(info)
    res["load_avg_1m_at_end"] = os.getloadavg()[0]
    if res["mode"] == "unet" and args.device == "cpu" and args.dtype == "fp32":
        res["time_vs_official"] = res["unet_call_s"] / OFFICIAL_CPU["unet_call_s"]
        res["official_cpu"] = OFFICIAL_CPU
    print()
    print(f"{'metric':<24}{'value':>16}")
    for key, value in res.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        print(f"{key:<24}{str(value):>16}")
    res["baseline_attention"] = bool(args.baseline)
    out = Path(
        args.out or RESULTS / ("bench_multiview_baseline.json" if args.baseline else "bench_multiview.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
