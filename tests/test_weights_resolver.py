"""Weight resolution: local folder, explicit files, Hugging Face cache layout, offline errors, conversion."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.checkpoints import CheckpointError
from pipeline.weights import (
    MODEL_FILES,
    WeightsError,
    WeightsNotFoundError,
    resolve_weights,
)

SNAPSHOT = "4b3ad1c1e1f0000000000000000000000000beef"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No real caches: every location the resolver reads is inside tmp_path."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "CRM_WEIGHTS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CRM_CACHE_DIR", str(tmp_path / "crm-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _fake_pth(path: Path, scale: float) -> str:
    """A small weights-only .pth; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3) * scale, "b": torch.ones(3) * scale}
    torch.save(sd, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hf_cache(hub: Path, files: dict[str, float]) -> dict[str, str]:
    """Build the huggingface_hub cache layout: blobs/<sha>, snapshots/<rev>/<name> -> blob, refs/main."""
    repo = hub / "models--Zhengyi--CRM"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    shas = {}
    for name, scale in files.items():
        tmp = repo / "tmp.pth"
        sha = _fake_pth(tmp, scale)
        (repo / "blobs").mkdir(exist_ok=True)
        blob = repo / "blobs" / sha
        os.replace(tmp, blob)
        snap = repo / "snapshots" / SNAPSHOT
        snap.mkdir(parents=True, exist_ok=True)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
        shas[name] = sha
    return shas


def test_local_dir_pth_converted_once_and_reused(tmp_path):
    d = tmp_path / "weights"
    shas = {n: _fake_pth(d / n, i + 1.0) for i, n in enumerate(MODEL_FILES.values())}
    rw = resolve_weights(str(d))
    assert rw.kind == "checkpoints" and not rw.is_random
    for role, name in MODEL_FILES.items():
        f = rw.files[role]
        assert f.source == d / name
        assert f.path == d / name.replace(".pth", ".safetensors")
        assert f.sha256 == shas[name] and f.origin == "local-dir"
        with safe_open(str(f.path), framework="pt") as fh:
            assert fh.metadata()["source_sha256"] == shas[name]
            assert torch.equal(fh.get_tensor("b"), torch.ones(3) * (list(MODEL_FILES).index(role) + 1.0))
    mtimes = {r: f.path.stat().st_mtime_ns for r, f in rw.files.items()}
    # Second resolution: the .safetensors is used as is, identity unchanged (taken from its metadata).
    rw2 = resolve_weights(str(d))
    assert {r: f.path.stat().st_mtime_ns for r, f in rw2.files.items()} == mtimes
    assert all(rw2.files[r].path.suffix == ".safetensors" for r in MODEL_FILES)
    assert rw2.identity == rw.identity
    assert rw.identity["files"]["recon"]["sha256"] == shas["CRM.pth"]
    assert len(rw.identity["id"]) == 16


def test_local_dir_missing_file_lists_exactly_it(tmp_path):
    d = tmp_path / "w"
    _fake_pth(d / "CRM.pth", 1.0)
    _fake_pth(d / "ccm-diffusion.pth", 2.0)
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights(str(d))
    msg = str(ei.value)
    assert ei.value.missing == ["stage1"]
    assert "pixel-diffusion.pth" in msg and str(d) in msg
    assert "missing CRM.pth" not in msg and "ccm-diffusion.pth (" not in msg


def test_hf_cache_layout_offline(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    shas = _hf_cache(hub, {n: i + 1.0 for i, n in enumerate(MODEL_FILES.values())})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    rw = resolve_weights("auto")
    for role, name in MODEL_FILES.items():
        f = rw.files[role]
        assert f.origin == "hf-cache" and f.repo == "Zhengyi/CRM" and f.revision == SNAPSHOT
        assert f.sha256 == shas[name]
        # converted beside the cache, never inside the snapshot folder
        assert f.path.is_file() and f.path.suffix == ".safetensors"
        assert hub / "crm-converted" in f.path.parents
    assert not any(p.suffix == ".safetensors" for p in (hub / "models--Zhengyi--CRM").rglob("*"))
    ident = rw.identity
    assert ident["files"]["stage1"] == {
        "file": "pixel-diffusion.pth",
        "sha256": shas["pixel-diffusion.pth"],
        "size": rw.files["stage1"].size,
        "origin": "hf-cache",
        "repo": "Zhengyi/CRM",
        "revision": SNAPSHOT,
    }
    # HF_HOME layout (hub under $HF_HOME/hub) gives the same files.
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    rw2 = resolve_weights("hf")
    assert {r: f.path for r, f in rw2.files.items()} == {r: f.path for r, f in rw.files.items()}


def test_offline_nothing_cached_error_says_what_to_fetch(tmp_path, monkeypatch):
    hub = tmp_path / "empty-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("auto", allow_download=True)  # offline wins over allow_download
    msg = str(ei.value)
    assert sorted(ei.value.missing) == ["recon", "stage1", "stage2"]
    for name in ("CRM.pth", "pixel-diffusion.pth", "ccm-diffusion.pth"):
        assert name in msg
    assert "hf download Zhengyi/CRM CRM.pth pixel-diffusion.pth ccm-diffusion.pth" in msg
    assert str(hub) in msg and "HF_HUB_OFFLINE" in msg and "--weights" in msg
    assert not hub.exists() or not any(hub.rglob("*.pth"))


def test_partial_cache_lists_only_missing(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    _hf_cache(hub, {"CRM.pth": 1.0})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("auto")
    assert sorted(ei.value.missing) == ["stage1", "stage2"]
    assert "downloads were not allowed" not in str(ei.value)  # offline is the stated reason
    assert "HF_HUB_OFFLINE is set" in str(ei.value)


def test_explicit_files_override_and_fill(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    _hf_cache(hub, {"CRM.pth": 1.0, "pixel-diffusion.pth": 2.0})
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    ro = tmp_path / "elsewhere"
    sha = _fake_pth(ro / "my_ccm.pth", 7.0)
    mine = _fake_pth(ro / "my_recon.pth", 9.0)
    rw = resolve_weights("auto", stage2_path=ro / "my_ccm.pth", recon_path=ro / "my_recon.pth")
    assert rw.files["stage2"].origin == "explicit" and rw.files["stage2"].sha256 == sha
    assert rw.files["recon"].sha256 == mine and rw.files["stage1"].origin == "hf-cache"


def test_readonly_dir_converts_into_crm_cache(tmp_path, monkeypatch):
    import pipeline.weights as w

    d = tmp_path / "ro"
    for i, n in enumerate(MODEL_FILES.values()):
        _fake_pth(d / n, i + 1.0)
    # Simulate a folder the user cannot write (tests may run as root, where chmod does not bite).
    monkeypatch.setattr(w, "_writable_dir", lambda p: False)
    rw = resolve_weights(str(d))
    assert all((tmp_path / "crm-cache" / "converted") in f.path.parents for f in rw.files.values())
    assert not list(d.glob("*.safetensors"))


def test_bad_files_and_specs(tmp_path):
    d = tmp_path / "w"
    for i, n in enumerate(MODEL_FILES.values()):
        _fake_pth(d / n, i + 1.0)
    (d / "CRM.pth").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty \(0 bytes\).*CRM.pth"):
        resolve_weights(str(d))
    (d / "CRM.pth").write_bytes(b"PK\x03\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="CRM.pth") as ei:
        resolve_weights(str(d))
    assert isinstance(ei.value, WeightsError)  # callers that catch WeightsError see it too
    with pytest.raises(WeightsError, match="neither"):
        resolve_weights(str(tmp_path / "does-not-exist"))
    with pytest.raises(WeightsError, match="hf:OWNER/REPO"):
        resolve_weights("hf:not-a-repo")
    with pytest.raises(WeightsError, match="cannot be combined"):
        resolve_weights("tiny-random", recon_path=d / "ccm-diffusion.pth")


def test_tiny_random_is_explicit_and_flagged():
    rw = resolve_weights("tiny-random", tiny_seed=3)
    assert rw.is_random and rw.files == {}
    ident = rw.identity
    assert ident["kind"] == "tiny-random" and ident["seed"] == 3 and "RANDOM" in ident["warning"]
    assert resolve_weights("tiny-random", tiny_seed=4).identity["id"] != ident["id"]


def test_auto_never_falls_back_to_random(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "nothing"))
    with pytest.raises(WeightsNotFoundError):
        resolve_weights()
