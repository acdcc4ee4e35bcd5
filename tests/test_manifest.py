"""Parquet manifests: schema, validation errors, round trips through fsspec (memory:// and local)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.io import storage
from flows.io.manifest import (
    RESULT_SCHEMA,
    ManifestError,
    ResultsWriter,
    id_problem,
    make_input_table,
    manifest_shards,
    merge_results,
    read_input_manifest,
    read_manifest_shards,
    read_results,
    read_results_metadata,
    result_row,
    validate_input_table,
    write_input_manifest,
    write_results,
)


def mem_uri(name: str) -> str:
    return f"memory://manifest-tests/{uuid.uuid4().hex}/{name}"


def put_table(table: pa.Table, uri: str) -> str:
    with storage.open_uri(uri, "wb") as fh:
        pq.write_table(table, fh)
    return uri


def test_round_trip_memory_resolves_relative_uris():
    uri = mem_uri("m.parquet")
    t = make_input_table(["a", "b"], ["img/a.png", "s3://bucket/b.png"], [7, None])
    write_input_manifest(t, uri)
    m = read_input_manifest(uri)
    assert len(m) == 2 and m.ids == ["a", "b"] and m.problems == {}
    rows = list(m.rows())
    base = storage.parent_uri(uri)
    assert rows[0].image_uri == base + "/img/a.png"
    assert rows[1].image_uri == "s3://bucket/b.png"
    assert rows[0].seed == 7 and rows[1].seed is None
    assert [r.index for r in rows] == [0, 1]


def test_local_relative_parent_paths(tmp_path):
    (tmp_path / "data").mkdir()
    uri = str(tmp_path / "sub" / "m.parquet")
    write_input_manifest(make_input_table(["x"], ["../data/x.webp"]), uri)
    row = next(read_input_manifest(uri).rows())
    assert row.image_uri == str(tmp_path / "data" / "x.webp")


def test_extra_columns_ignored_and_int32_seed_accepted():
    t = pa.table({"id": ["a"], "image_uri": ["/x.png"], "seed": pa.array([3], pa.int32()), "note": ["hello"]})
    m = validate_input_table(t)
    assert m.table.column_names == ["id", "image_uri", "seed"]
    assert m.table.column("seed").type == pa.int64()
    assert next(m.rows()).seed == 3


def test_missing_column_names_it():
    uri = put_table(pa.table({"id": ["a"], "path": ["/x.png"]}), mem_uri("m.parquet"))
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['image_uri'\]"):
        read_input_manifest(uri)


def test_wrong_type_names_column():
    with pytest.raises(ManifestError, match="column 'id' must be string, got int64"):
        validate_input_table(pa.table({"id": [1, 2], "image_uri": ["a", "b"]}))
    with pytest.raises(ManifestError, match="column 'seed' must be int64, got string"):
        validate_input_table(pa.table({"id": ["a"], "image_uri": ["a"], "seed": ["x"]}))


def test_duplicate_ids_rejected_with_rows():
    t = make_input_table(["a", "b", "a", "c", "c"], ["1", "2", "3", "4", "5"])
    with pytest.raises(ManifestError, match=r"duplicate ids: 'a' \(rows \[0, 2\]\), 'c' \(rows \[3, 4\]\)"):
        validate_input_table(t)


def test_empty_manifest_rejected():
    uri = put_table(make_input_table([], []), mem_uri("m.parquet"))
    with pytest.raises(ManifestError, match="empty"):
        read_input_manifest(uri)


def test_not_found_and_not_parquet():
    with pytest.raises(ManifestError, match="manifest not found"):
        read_input_manifest(mem_uri("missing.parquet"))
    uri = mem_uri("bad.parquet")
    storage.write_bytes_atomic(uri, b"this is not parquet")
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        read_input_manifest(uri)


@pytest.mark.parametrize(
    "bad",
    ["../etc", "a/b", "", ".", "..", ".hidden", "a b", "x" * 129, "caf\u00e9", "a\\b", "-lead"],
)
def test_unsafe_ids_are_row_problems(bad):
    assert id_problem(bad) is not None
    m = validate_input_table(make_input_table(["good", bad], ["/a.png", "/b.png"]))
    assert list(m.problems) == [1] and "id" in m.problems[1]
    rows = list(m.rows())
    assert rows[0].problem is None and rows[1].problem == m.problems[1]
    with pytest.raises(ManifestError, match="invalid row"):
        validate_input_table(make_input_table(["good", bad], ["/a.png", "/b.png"]), strict=True)


def test_safe_ids_accepted():
    for ok in ["a", "A-1_b.c", "0" * 128, "obj.001"]:
        assert id_problem(ok) is None


def test_null_id_and_empty_image_uri_are_row_problems():
    t = pa.table({"id": ["a", None, "c"], "image_uri": ["/a.png", "/b.png", " "]})
    m = validate_input_table(t)
    assert m.problems[1] == "id is null"
    assert m.problems[2] == "image_uri is empty"


def test_write_input_manifest_is_strict():
    with pytest.raises(ManifestError, match="unsafe"):
        write_input_manifest(make_input_table(["a/b"], ["/x.png"]), mem_uri("m.parquet"))


def test_results_round_trip_schema_and_streaming(tmp_path):
    uri = str(tmp_path / "out" / "results.parquet")
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    rows = [
        result_row(
            f"id{i}",
            "ok" if i % 3 else "failed",
            image_uri=f"/img/{i}.png",
            error_class=None if i % 3 else "ImageInputError",
            error_message=None if i % 3 else "corrupt",
            output_uri=f"/out/{i}",
            outputs={"glb": f"/out/{i}/mesh.glb"},
            preview_uri=f"/out/{i}/preview.png",
            timings={"generate": 1.5, "finalize": 0.25},
            weights_identity='{"kind":"x"}',
            options_hash="abc",
            seed=i,
            attempts=1,
            worker="w0",
            finished_at=when,
        )  # fmt: skip
        for i in range(10)
    ]
    with ResultsWriter(uri, flush_every=3) as w:
        for r in rows:
            w.write(r)
        assert not (tmp_path / "out" / "results.parquet").exists()  # published only on close
    assert w.status_counts == {"failed": 4, "ok": 6}
    t = read_results(uri)
    assert t.schema.equals(RESULT_SCHEMA, check_metadata=False)
    back = t.to_pylist()
    assert [r["id"] for r in back] == [f"id{i}" for i in range(10)]
    assert dict(back[1]["outputs"]) == {"glb": "/out/1/mesh.glb"}
    assert dict(back[1]["timings"]) == {"generate": 1.5, "finalize": 0.25}
    assert back[0]["error_class"] == "ImageInputError" and back[0]["status"] == "failed"
    assert back[5]["finished_at"] == when and back[5]["resumed"] is False


def test_results_writer_abort_publishes_nothing(tmp_path):
    uri = str(tmp_path / "results.parquet")
    with pytest.raises(RuntimeError):
        with ResultsWriter(uri) as w:
            w.write(result_row("a", "ok"))
            raise RuntimeError("boom")
    assert not (tmp_path / "results.parquet").exists()


def test_result_row_checks_status_and_read_results_checks_columns():
    with pytest.raises(ValueError, match="status must be one of"):
        result_row("a", "done")
    uri = put_table(pa.table({"id": ["a"]}), mem_uri("r.parquet"))
    with pytest.raises(ManifestError, match="not a results manifest"):
        read_results(uri)


def test_write_results_from_json_marker_rows():
    uri = mem_uri("results.parquet")
    row = result_row("a", "ok", timings={"x": 1})
    row["finished_at"] = row["finished_at"].isoformat()  # as stored in result.json markers
    write_results([row], uri)
    assert read_results(uri).column("id").to_pylist() == ["a"]


def _shard_folder(tmp_path, sizes: list[int], prefix: str = "part") -> list[str]:
    """Parquet shards with ids ``s<shard>-<row>`` under ``tmp_path/m``; returns their paths."""
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        ids = [f"s{s}-{i}" for i in range(n)]
        path = str(folder / f"{prefix}-{s}.parquet")
        write_input_manifest(make_input_table(ids, [f"img/{i}.png" for i in ids]), path)
        paths.append(path)
    return paths


def test_shards_from_folder_and_glob_skip_hidden_files(tmp_path):
    paths = _shard_folder(tmp_path, [3, 2, 4])
    (tmp_path / "m" / "_SUCCESS").write_text("")
    (tmp_path / "m" / ".part-9.parquet.tmp-x").write_text("")
    assert manifest_shards(str(tmp_path / "m")) == paths
    assert manifest_shards(str(tmp_path / "m" / "part-[12].parquet")) == paths[1:]
    assert manifest_shards(paths[0]) == [paths[0]]
    shards = read_manifest_shards(str(tmp_path / "m" / "*.parquet"))
    assert [len(m) for m in shards] == [3, 2, 4]
    rows = list(shards[2].rows())
    assert [r.index for r in rows] == [0, 1, 2, 3] and rows[1].id == "s2-1"
    assert rows[1].image_uri == str(tmp_path / "m" / "img" / "s2-1.png")
    with pytest.raises(ManifestError, match=r"no file matches .*nothing-\*\.parquet"):
        manifest_shards(str(tmp_path / "m" / "nothing-*.parquet"))


def test_duplicate_ids_across_shards_are_rejected(tmp_path):
    paths = _shard_folder(tmp_path, [2, 2])
    write_input_manifest(
        make_input_table(["s0-1", "new"], ["a.png", "b.png"]), str(tmp_path / "m" / "part-2.parquet")
    )
    with pytest.raises(ManifestError, match=r"\(3 shards\): duplicate ids: 's0-1' \(rows \[1, 4\]\)"):
        read_manifest_shards(str(tmp_path / "m"))
    assert len(read_manifest_shards(paths[0])) == 1


def test_file_manifest_streams_record_batches_with_problems(tmp_path, monkeypatch):
    """A manifest larger than one record batch: rows, problems and order are those of the file."""
    import flows.io.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "READ_BATCH_ROWS", 7)
    ids = [f"o{i}" for i in range(20)]
    ids[9], ids[15] = "../x", "bad\n"  # the second one: Python's `$` would accept it, the rule does not
    uris = [f"/img/{i}.png" for i in range(20)]
    uris[3] = "  "
    path = str(tmp_path / "big.parquet")
    pq.write_table(make_input_table(ids, uris), path, row_group_size=5)
    m = read_input_manifest(path)
    assert m.table is None and len(m) == 20
    assert sorted(m.problems) == [3, 9, 15] and m.problems[3] == "image_uri is empty"
    batches = list(m.row_batches(6))
    assert [len(b) for b in batches] == [6, 6, 6, 2]
    rows = [r for b in batches for r in b]
    assert [r.id for r in rows] == ids and [r.index for r in rows] == list(range(20))
    assert rows[9].problem == m.problems[9] and rows[0].problem is None


def test_merge_results_marks_resumed_parts_and_fills_new_columns(tmp_path):
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    write_results([result_row("x", "ok"), result_row("y", "failed", error_class="E")], a)
    old_schema = pa.schema([f for f in RESULT_SCHEMA if f.name != "worker"])  # a file of an older version
    pq.write_table(pa.Table.from_pylist([result_row("z", "ok")], schema=old_schema), b)
    out = str(tmp_path / "results.parquet")
    counts = merge_results([a, b], out, resumed=[b])
    assert counts == {"ok": 2, "failed": 1}
    t = read_results(out)
    assert t.schema.equals(RESULT_SCHEMA, check_metadata=False)
    assert t.column("id").to_pylist() == ["x", "y", "z"]
    assert t.column("resumed").to_pylist() == [False, False, True]
    assert t.column("worker").to_pylist() == [None, None, None]


def test_results_metadata_round_trip(tmp_path):
    uri = str(tmp_path / "r.parquet")
    w = ResultsWriter(uri, metadata={"crm.options_hash": "abc"})
    w.write(result_row("a", "ok"))
    w.close({"crm.rows": "1"})
    assert read_results_metadata(uri) == {"crm.options_hash": "abc", "crm.rows": "1"}


_READ_GROWTH = """
import json, sys
import psutil, pyarrow as pa, pyarrow.parquet as pq
import flows.io.manifest as manifest
if sys.argv[1] == "keep":
    manifest.release_free_memory = lambda: None
n = 300_000
pq.write_table(pa.table({"id": [f"row{i:07d}" for i in range(n)], "image_uri": ["a.png"] * n}), sys.argv[2])
pa.default_memory_pool().release_unused()
before = psutil.Process().memory_info().rss
rows = manifest.read_input_manifest(sys.argv[2]).num_rows
print(json.dumps({"rows": rows, "growth_mb": (psutil.Process().memory_info().rss - before) / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS of a glibc process")
def test_validation_leaves_no_freed_buffers_resident(tmp_path):
    """Validating 3 x 10^5 rows frees its buffers, but Arrow's pool keeps their pages (~75 MB measured)
    unless the reader hands them back (``release_free_memory``)."""
    growth = {}
    for mode in ("release", "keep"):
        out = subprocess.run(
            [sys.executable, "-c", _READ_GROWTH, mode, str(tmp_path / f"{mode}.parquet")],
            capture_output=True, text=True, timeout=300, check=True, cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        res = json.loads(out.stdout)
        assert res["rows"] == 300_000
        growth[mode] = res["growth_mb"]
    assert growth["release"] < 45 and growth["keep"] - growth["release"] > 30, growth
