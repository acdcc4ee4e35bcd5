"""fsspec helpers: URI joins/resolution, atomic writes, folder upload with completion marker."""

from __future__ import annotations

import uuid

import pytest

from pipeline import storage


def mem(name: str = "") -> str:
    return f"memory://storage-tests/{uuid.uuid4().hex}" + (f"/{name}" if name else "")


def test_protocols_and_joins(tmp_path):
    assert storage.protocol_of("s3://b/k") == "s3"
    assert storage.protocol_of("/a/b") == "file" and storage.protocol_of("file:///a") == "file"
    assert storage.join_uri("s3://bucket/run/", "objects", "a") == "s3://bucket/run/objects/a"
    assert storage.join_uri("memory://", "x") == "memory://x"
    assert storage.join_uri(str(tmp_path), "a", "b.png") == str(tmp_path / "a" / "b.png")
    assert storage.parent_uri("s3://bucket/run/m.parquet") == "s3://bucket/run"
    assert storage.local_path("file:///tmp/x") == storage.local_path("/tmp/x")
    with pytest.raises(storage.StorageError, match="not a local URI"):
        storage.local_path("s3://b/k")


def test_resolve_uri():
    assert storage.resolve_uri("img/a.png", "s3://b/run") == "s3://b/run/img/a.png"
    assert storage.resolve_uri("../img/a.png", "s3://b/run/m") == "s3://b/run/img/a.png"
    assert storage.resolve_uri("gs://o/a.png", "s3://b/run") == "gs://o/a.png"
    assert storage.resolve_uri("/abs/a.png", "s3://b/run") == "/abs/a.png"
    assert storage.resolve_uri("a.png", "/data/m") == "/data/m/a.png"
    assert storage.resolve_uri("../x/a.png", "file:///data/m") == "/data/x/a.png"
    assert storage.resolve_uri("a.png", None) == "a.png"


def test_bytes_round_trip_and_missing_object():
    uri = mem("a/b.bin")
    assert not storage.exists(uri)
    storage.write_bytes_atomic(uri, b"hello")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    with pytest.raises(FileNotFoundError, match="no such object: memory://"):
        storage.read_bytes(mem("missing"))


def test_local_atomic_write_leaves_no_temp(tmp_path):
    uri = str(tmp_path / "d" / "f.txt")
    storage.write_bytes_atomic(uri, b"1")
    storage.write_bytes_atomic(uri, b"22")
    assert (tmp_path / "d" / "f.txt").read_bytes() == b"22"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["f.txt"]


def test_read_many_skips_missing():
    a, b = mem("a"), mem("b")
    storage.write_bytes_atomic(a, b"A")
    storage.write_bytes_atomic(b, b"B")
    got = storage.read_many([a, b, mem("nope")])
    assert got == {a: b"A", b: b"B"}
    assert storage.read_many([]) == {}


def _make_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "mesh.glb").write_bytes(b"glb")
    (root / "sub" / "tex.png").write_bytes(b"png")
    return root


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_put_dir_with_marker_last(tmp_path, kind):
    src = _make_folder(tmp_path / "src")
    dest = str(tmp_path / "out" / "obj") if kind == "local" else mem("obj")
    out = storage.put_dir(src, dest, marker=("result.json", b"{}"))
    assert set(out) == {"mesh.glb", "sub/tex.png", "result.json"}
    assert storage.read_bytes(out["sub/tex.png"]) == b"png"
    assert storage.read_bytes(storage.join_uri(dest, "result.json")) == b"{}"
    listed = sorted(storage.list_files(dest))
    assert listed == sorted(out.values())
    # replacing: the new folder wins entirely (locally, stale files disappear)
    (src / "mesh.glb").write_bytes(b"glb2")
    storage.put_dir(src, dest, marker=("result.json", b'{"v":2}'))
    assert storage.read_bytes(storage.join_uri(dest, "mesh.glb")) == b"glb2"
    assert storage.read_bytes(storage.join_uri(dest, "result.json")) == b'{"v":2}'


def test_put_dir_local_replaces_old_files(tmp_path):
    src = _make_folder(tmp_path / "src")
    dest = tmp_path / "out" / "obj"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("old")
    storage.put_dir(src, str(dest))
    assert not (dest / "stale.txt").exists() and (dest / "mesh.glb").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["obj"]


def test_put_file_and_missing_sources(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    dest = mem("deep/x.bin")
    storage.put_file_atomic(f, dest)
    assert storage.read_bytes(dest) == b"x"
    with pytest.raises(FileNotFoundError, match="no such local file"):
        storage.put_file_atomic(tmp_path / "nope", dest)
    with pytest.raises(FileNotFoundError, match="no such local folder"):
        storage.put_dir(tmp_path / "nope", mem("d"))


def test_remove_and_list_missing(tmp_path):
    d = mem("d")
    storage.write_bytes_atomic(storage.join_uri(d, "a"), b"a")
    storage.remove(d, recursive=True)
    assert storage.list_files(d) == []
    storage.remove(mem("never"))  # missing target is fine
