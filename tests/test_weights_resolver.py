"""Weight resolution: local folder, explicit files, Hugging Face cache layout, offline errors, conversion."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.weights import (
    MODEL_FILES,
    WeightsError,
    WeightsNotFoundError,
    resolve_weights,
)
from pipeline.weights.checkpoints import CheckpointError

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
    import pipeline.weights.resolve as w

    d = tmp_path / "ro"
    for i, n in enumerate(MODEL_FILES.values()):
        _fake_pth(d / n, i + 1.0)
    # Simulate a folder the user cannot write (tests may run as root, where chmod does not bite).
    monkeypatch.setattr(w, "is_writable_dir", lambda p: False)
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


# ------------------------------------------------------------------ downloads (a local stand-in for the hub)
class _FakeHub:
    """A minimal Hugging Face file endpoint on 127.0.0.1: ``HEAD/GET /<repo>/resolve/<rev>/<file>``
    (with ``Range`` support, like the hub's CDN) and ``HEAD /api/models/<repo>`` (the reachability probe).
    Files named in `drop` lose their connection half-way through their first GET."""

    COMMIT = "c0ffee" + "0" * 34

    def __init__(self, files: dict[str, bytes], drop: tuple[str, ...] = ()):
        import http.server
        import threading

        hub = self
        self.files = files
        self.requests: list[tuple[str, str, str | None]] = []
        self.drop = set(drop)

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _file(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) == 5 and parts[2] == "resolve" and "/".join(parts[:2]) == "Zhengyi/CRM":
                    return parts[4], hub.files.get(parts[4])
                return None, None

            def _head(self, name, data, status=200, length=None):
                self.send_response(status)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()

            def do_HEAD(self):
                hub.requests.append(("HEAD", self.path, None))
                if self.path.startswith("/api/models/"):
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                name, data = self._file()
                if data is None:
                    self.send_error(404)
                    return
                self._head(name, data)

            def do_GET(self):
                rng = self.headers.get("Range")
                hub.requests.append(("GET", self.path, rng))
                name, data = self._file()
                if data is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                body = data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("X-Repo-Commit", hub.COMMIT)
                self.send_header("Content-Length", str(len(body)))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if name in hub.drop:
                    hub.drop.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _pth_bytes(tmp_path: Path, scale: float) -> bytes:
    path = tmp_path / f"src-{scale}.pth"
    _fake_pth(path, scale)
    return path.read_bytes()


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    files = {n: _pth_bytes(tmp_path, i + 1.0) for i, n in enumerate(MODEL_FILES.values())}
    hub = _FakeHub(files)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once at its import
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    yield hub
    hub.close()


def test_auto_downloads_missing_files_into_the_hub_cache(fake_hub, tmp_path, capsys):
    """`auto` with an empty cache downloads the three files into the HF cache (after one probe), records
    them as such, and a later resolve finds them there without the network."""
    rw = resolve_weights("auto")
    for role, name in MODEL_FILES.items():
        f = rw.files[role]
        assert f.origin == "hf-download" and f.repo == "Zhengyi/CRM" and f.revision == _FakeHub.COMMIT
        assert f.sha256 == hashlib.sha256(fake_hub.files[name]).hexdigest()
        assert f.path.suffix == ".safetensors" and tmp_path / "hub" in f.path.parents
    assert "downloading Zhengyi/CRM/CRM.pth (476 MB)" in capsys.readouterr().err
    assert len([r for r in fake_hub.requests if r[1].startswith("/api/models/")]) == 1
    fake_hub.close()
    again = resolve_weights("auto")  # the hub is gone: everything comes from the cache now
    assert {r: f.origin for r, f in again.files.items()} == dict.fromkeys(MODEL_FILES, "hf-cache")
    assert {r: f.path for r, f in again.files.items()} == {r: f.path for r, f in rw.files.items()}


def test_dropped_connection_resumes_where_it_stopped(fake_hub, monkeypatch):
    """A connection lost half-way through a file is resumed with a Range request for the rest (not
    restarted), and the file is whole."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64)  # write as bytes arrive
    data = fake_hub.files["CRM.pth"]
    fake_hub.drop.add("CRM.pth")
    rw = resolve_weights("auto")
    assert rw.files["recon"].sha256 == hashlib.sha256(data).hexdigest()
    gets = [r[2] for r in fake_hub.requests if r[0] == "GET" and r[1].endswith("/CRM.pth")]
    assert len(gets) == 2 and gets[0] is None
    start = int(gets[1].split("=")[1].rstrip("-"))
    assert 0 < start <= len(data) // 2, gets


def test_offline_makes_no_request(fake_hub):
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("auto", allow_download=False)
    assert fake_hub.requests == []
    assert "--offline" in str(ei.value) and "Three ways out" in str(ei.value)


def test_unreachable_hub_fails_at_once_with_the_ways_out(tmp_path, monkeypatch):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("auto")
    assert time.monotonic() - t0 < 10.0
    msg = str(ei.value)
    assert f"http://127.0.0.1:{port} is unreachable" in msg
    assert "--weights /path/to/crm-weights" in msg
    assert "hf download Zhengyi/CRM CRM.pth pixel-diffusion.pth ccm-diffusion.pth" in msg
    assert "--weights tiny-random" in msg


def test_hub_file_for_auxiliary_models(fake_hub, tmp_path):
    from pipeline.weights import hub_file

    path = hub_file("Zhengyi/CRM", "CRM.pth")
    assert path.read_bytes() == fake_hub.files["CRM.pth"]
    assert hub_file("Zhengyi/CRM", "CRM.pth", allow_download=False) == path  # now cached
    with pytest.raises(WeightsNotFoundError, match=r"hf download Zhengyi/CRM missing.bin") as ei:
        hub_file("Zhengyi/CRM", "missing.bin", allow_download=False, local_flag="--thing")
    assert "--thing PATH" in str(ei.value)
