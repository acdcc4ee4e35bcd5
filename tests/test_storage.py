"""fsspec helpers: URI joins/resolution, atomic writes, object folders published to any storage."""

from __future__ import annotations

import uuid

import pytest

from flows.io import storage


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


def _write_object(dest, obj_id: str, files: dict[str, bytes]) -> None:
    with dest.staging(obj_id) as folder:
        for rel, data in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_storage_destination_publishes_each_file_once(tmp_path, kind):
    root = str(tmp_path / "objects") if kind == "local" else mem("objects")
    dest = storage.StorageDestination(root, marker="result.json")
    _write_object(dest, "obj", {"mesh.glb": b"glb", "sub/tex.png": b"png"})
    loc = dest.location("obj")
    assert loc == storage.join_uri(root, "obj")
    assert sorted(storage.list_files(loc)) == sorted(
        storage.join_uri(loc, r) for r in ("mesh.glb", "sub/tex.png")
    )
    assert storage.read_bytes(storage.join_uri(loc, "sub/tex.png")) == b"png"
    # the batch job writes the marker last; a new version removes it before publishing
    storage.write_bytes_atomic(storage.join_uri(loc, "result.json"), b"{}")
    _write_object(dest, "obj", {"mesh.glb": b"glb2"})
    assert storage.read_bytes(storage.join_uri(loc, "mesh.glb")) == b"glb2"
    assert not storage.exists(storage.join_uri(loc, "result.json"))
    if kind == "local":  # locally the new folder replaces the old one entirely, by one rename
        assert sorted(p.name for p in (tmp_path / "objects" / "obj").iterdir()) == ["mesh.glb"]
        assert sorted(p.name for p in (tmp_path / "objects").iterdir()) == ["obj"]


def test_storage_destination_publishes_nothing_on_error(tmp_path):
    for root in (str(tmp_path / "objects"), mem("objects-err")):
        dest = storage.StorageDestination(root)
        with pytest.raises(RuntimeError, match="exporter failed"), dest.staging("obj") as folder:
            (folder / "mesh.glb").write_bytes(b"half")
            raise RuntimeError("exporter failed")
        assert storage.list_files(dest.location("obj")) == []


def test_put_file_and_missing_sources(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    dest = mem("deep/x.bin")
    storage.put_file_atomic(f, dest)
    assert storage.read_bytes(dest) == b"x"
    local = tmp_path / "deep" / "x.bin"
    storage.put_file_atomic(f, str(local))
    assert local.read_bytes() == b"x" and sorted(p.name for p in local.parent.iterdir()) == ["x.bin"]
    with pytest.raises(FileNotFoundError, match="no such local file"):
        storage.put_file_atomic(tmp_path / "nope", dest)


def test_remove_and_list_missing(tmp_path):
    d = mem("d")
    storage.write_bytes_atomic(storage.join_uri(d, "a"), b"a")
    storage.remove(d, recursive=True)
    assert storage.list_files(d) == []
    storage.remove(mem("never"))  # missing target is fine
