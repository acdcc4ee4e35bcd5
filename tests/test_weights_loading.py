"""Lean checkpoint loading: memory-mapped files, the streaming writer, meta builds, no second copy."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.weights.checkpoints import CheckpointError, CheckpointKeyError, convert_to_safetensors
from pipeline.weights.loading import (
    TensorSources,
    assign_state_dict,
    build_on_meta,
    materialize,
    parameters_on_meta,
)
from pipeline.weights.recon import load_recon_weights
from pipeline.weights.tensor_files import DATA_ALIGNMENT, TensorFile, _file_mappings, write_safetensors
from pipeline.weights.tiny import build_tiny_recon
from pipeline.weights.tiny_configs import TINY_RECON_CONFIG

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and madvise are Linux")


def _in_file_mapping(t: torch.Tensor, path: Path) -> bool:
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(lo <= start and end <= hi for lo, hi in _file_mappings(path))


def _run(code: str) -> dict:
    """Run `code` in a fresh interpreter (its peak RSS is its own); it prints one JSON line last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------- writer
def test_streaming_writer_round_trips_every_dtype_and_aligns_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "odd": torch.randn(7, generator=g),  # 28 bytes: goes after the aligned ones
        "w": torch.randn(64, 32, generator=g),
        "half": torch.randn(16, 16, generator=g).half(),
        "bf": torch.randn(32, generator=g).bfloat16(),
        "ids": torch.arange(16, dtype=torch.int64),
        "mask": torch.rand(64, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(32, 32, generator=g).t(),  # not contiguous: written as its values
    }
    path = write_safetensors(tensors, tmp_path / "w.safetensors", {"converted_from": "w.pth", "n": 3})
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % DATA_ALIGNMENT == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"converted_from": "w.pth", "n": "3"}
    for k, v in header.items():
        if k != "__metadata__" and (v["data_offsets"][1] - v["data_offsets"][0]) % DATA_ALIGNMENT == 0:
            assert v["data_offsets"][0] % DATA_ALIGNMENT == 0, k
    assert TensorFile(path).metadata["n"] == "3"


def test_final_metadata_fills_placeholders_and_a_failure_leaves_no_file(tmp_path):
    t = {"w": torch.ones(4)}
    path = write_safetensors(
        t, tmp_path / "a.safetensors", {"digest": "0" * 8}, final_metadata=lambda: {"digest": "abcdef12"}
    )
    assert TensorFile(path).metadata == {"digest": "abcdef12"}
    with pytest.raises(CheckpointError, match="placeholders"):
        write_safetensors(
            t, tmp_path / "b.safetensors", {"digest": "0"}, final_metadata=lambda: {"digest": "ab"}
        )
    assert list(tmp_path.iterdir()) == [path]


# ---------------------------------------------------------------------------------- reading
@linux_only
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_tensor_file_maps_instead_of_reading(tmp_path, suffix):
    sd = {"a": torch.randn(256, 256), "b": torch.arange(10.0)}
    path = tmp_path / f"w{suffix}"
    write_safetensors(sd, path) if suffix == ".safetensors" else torch.save(sd, path)
    f = TensorFile(path)
    assert set(f) == {"a", "b"} and f.spec("a") == ((256, 256), torch.float32)
    assert all(m.is_meta for m in f.meta().values())
    for k, v in sd.items():
        assert torch.equal(f[k], v)
        assert _in_file_mapping(f[k], path)  # a view of the file's mapping, not a copy


@linux_only
def test_release_takes_the_pages_out_of_the_process(tmp_path):
    path = write_safetensors({"big": torch.randn(16 << 20)}, tmp_path / "big.safetensors")  # 64 MiB
    out = _run(
        f"""
        import json, torch
        from pipeline.weights.tensor_files import TensorFile
        def file_mb():
            for line in open("/proc/self/status"):
                if line.startswith("RssFile"):
                    return int(line.split()[1]) / 1024
        f = TensorFile({str(path)!r})
        t = f["big"]
        float(t.sum())
        touched = file_mb()
        copy = t.clone()
        released = f.release(t)
        print(json.dumps({{"touched": touched, "after": file_mb(), "released": released,
                          "equal": bool(torch.equal(copy, f["big"]))}}))
        """
    )
    assert out["released"] and out["equal"]
    assert out["touched"] - out["after"] > 60  # MiB


@linux_only
def test_channels_last_conversion_releases_each_mapped_weight(tmp_path):
    """`to_channels_last` on a U-Net whose weights are views of the file's mapping: the NHWC copies
    replace them one at a time and the mapped pages leave the process, so the conversion does not
    hold the weights twice; the convolution's output is unchanged up to float rounding."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1024, 1024, 3, padding=1)  # 36 MiB weight
    path = write_safetensors(conv.state_dict(), tmp_path / "conv.safetensors")
    out = _run(
        f"""
        import json, types, torch
        from pipeline.weights.recon import to_channels_last
        from pipeline.weights.tensor_files import TensorFile
        def rss(kind):
            for line in open("/proc/self/status"):
                if line.startswith("Rss" + kind):
                    return int(line.split()[1]) / 1024
        f = TensorFile({str(path)!r})
        conv = torch.nn.Conv2d(1024, 1024, 3, padding=1, device="meta")
        conv.load_state_dict(dict(f), assign=True)
        flags = []
        model = types.SimpleNamespace(unet2=types.SimpleNamespace(unet=conv, use_channels_last=flags.append))
        x = torch.randn(1, 1024, 8, 8, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            before = conv(x)
        file_before, anon_before = rss("File"), rss("Anon")
        to_channels_last(model)
        file_after, anon_after = rss("File"), rss("Anon")
        with torch.inference_mode():
            after = conv(x.contiguous(memory_format=torch.channels_last))
        print(json.dumps({{"file_drop": file_before - file_after, "anon_growth": anon_after - anon_before,
                          "nhwc": conv.weight.is_contiguous(memory_format=torch.channels_last),
                          "flags": flags, "diff": float((before - after).abs().max()),
                          "scale": float(before.abs().max())}}))
        """
    )
    mib = 1024 * 1024 * 9 * 4 / 2**20
    assert out["nhwc"] and out["flags"] == [True]
    assert out["file_drop"] > 0.9 * mib  # the mapped weight left the process
    assert out["anon_growth"] < 1.2 * mib  # its one NHWC copy, nothing else
    assert out["diff"] <= 1e-5 * out["scale"]


# ---------------------------------------------------------------------------------- loading
def test_parameters_on_meta_keeps_buffers_real():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 4)
            self.register_buffer("ids", torch.arange(5), persistent=False)

    m = build_on_meta(M)
    assert m.lin.weight.is_meta and m.lin.bias.is_meta and isinstance(m.lin.weight, torch.nn.Parameter)
    assert torch.equal(m.ids, torch.arange(5))
    with parameters_on_meta():
        pass
    assert not torch.nn.Linear(2, 2).weight.is_meta  # the patch ends with the block


def test_views_of_mirrors_are_traced_back_to_the_file(tmp_path):
    fused = torch.randn(12, 5)
    path = write_safetensors({"qkv": fused, "conv": torch.randn(6, 4, 1, 1)}, tmp_path / "w.safetensors")
    sources = TensorSources()
    mirrors = sources.mirror(TensorFile(path))
    q, k, v = mirrors["qkv"].chunk(3, dim=0)
    flat = mirrors["conv"].reshape(6, 4)
    refs = {
        "q": sources.ref(q),
        "v": sources.ref(v),
        "flat": sources.ref(flat),
        "whole": sources.ref(k._base),
    }
    assert refs["whole"].view is None and refs["v"].view is not None
    got = {name: ref.load() for name, ref in refs.items()}
    assert torch.equal(got["q"], fused[:4]) and torch.equal(got["v"], fused[8:])
    assert torch.equal(got["flat"], load_file(str(path))["conv"].reshape(6, 4))
    assert torch.equal(got["whole"], fused)
    with pytest.raises(RuntimeError, match="neither"):
        sources.ref(mirrors["qkv"].clone())


@linux_only
def test_recon_load_from_a_file_is_zero_copy_and_exact(tmp_path):
    from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig

    ref = build_tiny_recon(seed=3)
    path = write_safetensors(ref.state_dict(), tmp_path / "CRM.safetensors")
    cfg = ReconConfig.from_fixture_config(TINY_RECON_CONFIG)
    model = build_on_meta(ConvolutionalReconstructionModel, cfg)
    load_recon_weights(model, path)
    for k, v in ref.state_dict().items():
        got = model.state_dict()[k]
        assert torch.equal(got, v), k
        assert _in_file_mapping(got, path), k  # the parameter IS the file's data: no second copy


def test_in_memory_state_dicts_are_copied_not_aliased():
    from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig

    sd = build_tiny_recon(seed=1).state_dict()
    model = build_on_meta(
        ConvolutionalReconstructionModel, ReconConfig.from_fixture_config(TINY_RECON_CONFIG)
    )
    load_recon_weights(model, sd)
    ptrs = {v.data_ptr() for v in sd.values()}
    assert all(p.data_ptr() not in ptrs for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


def test_assign_reports_missing_and_shape_errors():
    m = build_on_meta(torch.nn.Linear, 3, 2)
    with pytest.raises(CheckpointKeyError, match="bias") as err:
        assign_state_dict(m, {"weight": torch.zeros(2, 3)}, "lin")
    assert err.value.missing == ["bias"]
    with pytest.raises(CheckpointKeyError, match=r"expected \(2, 3\), got \(3, 3\)"):
        assign_state_dict(m, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "lin")


_LOAD_PEAK = """
import json, torch
from pipeline.weights.loading import TensorSources, assign_state_dict, build_on_meta, materialize
from pipeline.weights.tensor_files import TensorFile

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024
    return out

def build():
    return torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(12)])  # 192 MiB in fp32

before = status()["VmRSS"]
model = build_on_meta(build).to(DTYPE)
f = TensorFile(PATH)
sources = TensorSources()
mirrors = sources.mirror(f)
own = model.state_dict()
assign_state_dict(model, materialize({k: sources.ref(v) for k, v in mirrors.items()}, own), "seq")
for p in model.parameters():
    float(p.sum())  # every page read
model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"before": before, **status(), "model_mb": model_mb}))
"""


@linux_only
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_peaks_at_the_loaded_model_not_two_copies(tmp_path, dtype):
    """Tensor-by-tensor loading never holds a second copy: zero-copy at the stored dtype, and a
    cast (bf16) keeps only the cast model resident (the file pages are released as it goes)."""
    torch.manual_seed(0)
    sd = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(12)]).state_dict()
    path = write_safetensors(sd, tmp_path / "seq.safetensors")
    del sd
    code = _LOAD_PEAK.replace("PATH", repr(str(path))).replace("DTYPE", f"torch.{dtype}")
    out = _run(code)
    grown = out["VmHWM"] - out["before"]
    itemsize = 4 if dtype == "float32" else 2
    assert out["model_mb"] == 12 * (2048 * 2048 + 2048) * itemsize / 2**20
    assert grown <= 1.2 * out["model_mb"] + 24, out  # 24 MiB: allocator and import slack


@linux_only
def test_conversion_holds_about_one_tensor(tmp_path):
    torch.manual_seed(0)
    torch.save({f"w{i}": torch.randn(1024, 2048) for i in range(24)}, tmp_path / "w.pth")  # 192 MiB
    out = _run(
        f"""
        import json
        from pipeline.weights.checkpoints import convert_to_safetensors
        def status():
            out = {{}}
            for line in open("/proc/self/status"):
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) / 1024
            return out
        before = status()["VmRSS"]
        convert_to_safetensors({str(tmp_path / "w.pth")!r})
        print(json.dumps({{"before": before, **status()}}))
        """
    )
    assert out["VmHWM"] - out["before"] < 64, out  # MiB; the file is 192 MiB
    a, b = torch.load(tmp_path / "w.pth", weights_only=True), load_file(str(tmp_path / "w.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_conversion_transform_and_check_see_only_keys_and_shapes(tmp_path):
    torch.save({"old.weight": torch.ones(2, 2)}, tmp_path / "x.pth")
    dst = convert_to_safetensors(
        tmp_path / "x.pth", transform=lambda sd: {k.replace("old", "new"): v for k, v in sd.items()}
    )
    assert list(load_file(str(dst))) == ["new.weight"]
    with pytest.raises(CheckpointError, match="refused"):

        def refuse(sd):
            raise CheckpointError("refused")

        convert_to_safetensors(tmp_path / "x.pth", tmp_path / "y.safetensors", check=refuse)
    assert not (tmp_path / "y.safetensors").exists()


def test_materialize_casts_to_the_models_dtype(tmp_path):
    path = write_safetensors({"w": torch.randn(4, 4)}, tmp_path / "w.safetensors")
    sources = TensorSources()
    mirrors = sources.mirror(TensorFile(path))
    out = materialize(
        {"w": sources.ref(mirrors["w"])}, {"w": torch.empty(4, 4, dtype=torch.float64, device="meta")}
    )
    assert out["w"].dtype == torch.float64 and torch.equal(out["w"], load_file(str(path))["w"].double())


# ---------------------------------------------------------------------------------- CPU allocator
@linux_only
def test_cpu_allocator_serves_large_blocks_from_the_heap():
    out = _run(
        """
        import json, os, torch
        from pipeline.weights.cpu_allocator import tune_cpu_allocator
        def region(t):
            p = t.data_ptr()
            for line in open("/proc/self/maps"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= p < hi:
                    return line.split()[-1] if len(line.split()) > 5 else "anonymous"
        before = region(torch.empty(100 << 20, dtype=torch.uint8))
        tuned = tune_cpu_allocator()
        after = region(torch.empty(100 << 20, dtype=torch.uint8))
        print(json.dumps({"before": before, "after": after, "tuned": tuned, "again": tune_cpu_allocator()}))
        """
    )
    assert out["before"] == "anonymous"  # glibc default: a 100 MB block is its own mmap
    assert out["tuned"] and out["again"] and out["after"] == "[heap]"


@linux_only
def test_release_free_heap_hands_back_what_a_thread_freed():
    """Memory a thread freed between blocks it still holds stays resident (glibc trims only an arena's
    top) until ``release_free_heap``."""
    out = _run(
        """
        import json, threading
        from pipeline.weights.cpu_allocator import release_free_heap
        def anon_mb():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon"):
                    return int(line.split()[1]) / 1024
        kept = []
        def work():  # 160 MB in 64 KB blocks from this thread's arena; 1 in 10 kept, interleaved
            blocks = [b"x" * (64 << 10) for _ in range(2560)]
            kept.extend(blocks[::10])
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        before = anon_mb()
        released = release_free_heap()
        print(json.dumps({"before": before, "after": anon_mb(), "released": released, "kept": len(kept)}))
        """
    )
    assert out["kept"] == 256 and out["released"]
    assert out["before"] - out["after"] > 100, out  # ~144 MB freed between kept blocks


@linux_only
def test_release_mapped_weights_hands_back_a_finished_models_pages(tmp_path):
    """A model loaded zero-copy from a file: its pages leave the process after release (the values
    read back unchanged), storages a kept model shares stay, in-memory tensors are never touched."""
    torch.manual_seed(0)
    sd = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048)).state_dict()  # 32 MiB
    path = write_safetensors(sd, tmp_path / "two.safetensors")
    out = _run(
        f"""
        import json, torch
        from pipeline.weights.tensor_files import TensorFile, release_mapped_weights
        def file_mb():
            for line in open("/proc/self/status"):
                if line.startswith("RssFile"):
                    return int(line.split()[1]) / 1024
        f = TensorFile({str(path)!r})
        model = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))
        model.load_state_dict(dict(f), assign=True)  # tensors are views of the mapping
        shared = torch.nn.Sequential(model[1])  # another model holding the second layer
        in_memory = torch.nn.Linear(2048, 2048)
        expect = {{k: v.clone() for k, v in model.state_dict().items()}}
        mem_before = in_memory.weight.clone()
        for p in model.parameters():
            float(p.sum())
        touched = file_mb()
        kept = release_mapped_weights(model, keep=(shared,))
        after_kept = file_mb()
        released = release_mapped_weights(model)
        after_all = file_mb()
        same = all(torch.equal(v, model.state_dict()[k]) for k, v in expect.items())
        print(json.dumps({{"touched": touched, "after_kept": after_kept, "after_all": after_all,
                          "kept": kept, "released": released, "same": same,
                          "in_memory": release_mapped_weights(in_memory),
                          "in_memory_same": bool(torch.equal(mem_before, in_memory.weight))}}))
        """
    )
    mib = 2048 * 2048 * 4 / 2**20
    assert out["same"] and out["in_memory"] == 0 and out["in_memory_same"]
    assert out["touched"] - out["after_kept"] > 0.9 * mib  # the first layer only
    assert out["after_kept"] - out["after_all"] > 0.9 * mib  # then the shared one too
    assert 0.9 * mib < out["kept"] / 2**20 <= mib + 1 and out["released"] / 2**20 > 1.9 * mib
