"""Batch orchestration end to end: real local Ray, real Prefect (test harness), real S3 API (moto server).

One Ray session, one moto server and one Prefect harness for the whole module (each costs seconds).
Everything binds to 127.0.0.1. The flow test runs the real pipeline with the ``tiny-random`` preset;
the fault-injection tests (killed actor, failing batch) use the no-op backend so they test the
orchestration in seconds.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("prefect")
pytest.importorskip("moto")

import pyarrow.parquet as pq  # noqa: E402
from flows_testutil import moto_s3, prefect_test_server  # noqa: E402
from PIL import Image  # noqa: E402

from flows.io import storage  # noqa: E402
from flows.io.lease import LeaseHeldError, OutputLease  # noqa: E402
from flows.io.manifest import (  # noqa: E402
    ManifestError,
    make_input_table,
    read_results,
    validate_input_table,
    write_input_manifest,
)
from flows.ray_job.backends import CRMBackend  # noqa: E402
from flows.ray_job.driver import BatchConfig, run_batch  # noqa: E402
from flows.ray_job.fake_backends import CrashOnceBackend, FailIdsBackend, NoOpBackend  # noqa: E402
from flows.ray_job.session import start_local_ray  # noqa: E402
from pipeline.weights.tiny_configs import SMOKE_OPTIONS

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]

TINY_OPTIONS = {**SMOKE_OPTIONS, "write_obj": False}
BUCKET = "crm-test"


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray's default (15) starves workers on a shared box
    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1; yields the fsspec storage options that reach it."""
    with moto_s3(BUCKET) as opts:
        yield opts


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    with prefect_test_server(tmp_path_factory.mktemp("prefect-home")):
        yield


def _png(color=(200, 40, 40)) -> bytes:
    img = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (48, 56), (*color, 255)), (24, 20))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def example_images():
    """Three bundled sample images (PNG bytes)."""
    from pipeline.samples import sample_images

    return [p.read_bytes() for p in sample_images(3)]


def _local_manifest(tmp_path: Path, ids: list[str], n_bad_image: int = 0):
    """Rows with local PNGs (+ optional corrupt files); returns the validated manifest."""
    uris = []
    for i in range(len(ids)):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(b"not an image" if i < n_bad_image else _png((30 * i % 255, 90, 160)))
        uris.append(str(p))
    return validate_input_table(make_input_table(ids, uris))


# --------------------------------------------------------------------------- flow on S3 (real pipeline)
def test_flow_s3_bad_rows_resume_and_threshold(ray_session, s3, prefect_harness, example_images):
    from flows.crm_batch import FailureRateExceeded, crm_batch

    run = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    good = ["alpha", "beta", "gamma"]
    for obj_id, data in zip(good, example_images):
        storage.write_bytes_atomic(f"{run}/images/{obj_id}.webp", data, s3)
    storage.write_bytes_atomic(f"{run}/images/corrupt.png", b"\x89PNG\r\n\x1a\n garbage", s3)
    ids = [*good, "missing", "corrupt", "../evil"]
    uris = [f"images/{i}.webp" for i in good] + [
        "images/missing.png",
        "images/corrupt.png",
        "images/alpha.webp",
    ]
    table = make_input_table(ids, uris, [11, None, None, None, None, None])
    with storage.open_uri(f"{run}/manifest.parquet", "wb", s3) as fh:
        pq.write_table(table, fh)

    params = dict(
        manifest_uri=f"{run}/manifest.parquet", output_uri=f"{run}/out", weights="tiny-random",
        options=TINY_OPTIONS, batch_size=3, num_actors=1, storage_options=s3, max_failure_rate=0.6,
        timeout_s=800,
    )  # fmt: skip
    summary = crm_batch(**params)
    assert summary["rows"] == 6 and summary["ok"] == 3 and summary["failed"] == 3
    assert summary["generated"] == 3 and summary["resumed"] == 0

    results = {r["id"]: r for r in read_results(summary["results_uri"], s3).to_pylist()}
    assert set(results) == set(ids)
    assert results["missing"]["error_class"] == "FileNotFoundError"
    assert "images/missing.png" in results["missing"]["error_message"]
    assert results["corrupt"]["error_class"] == "ImageInputError"
    assert (
        results["../evil"]["error_class"] == "InvalidRow" and "unsafe" in results["../evil"]["error_message"]
    )
    ident = CRMBackend("tiny-random", TINY_OPTIONS)
    for obj_id in good:
        r = results[obj_id]
        assert r["status"] == "ok" and r["attempts"] == 1 and r["worker"]
        assert r["output_uri"] == f"{run}/out/objects/{obj_id}"
        outputs = dict(r["outputs"])
        for kind in ("glb", "views", "preview", "meta"):
            assert storage.exists(outputs[kind], s3), kind
        assert r["preview_uri"] == outputs["preview"]
        assert r["options_hash"] == ident.options_hash()
        assert '"tiny-random"' in r["weights_identity"]
        timings = set(dict(r["timings"]))  # preprocess ran in the CPU fetch task, export straight to S3
        assert {"fetch", "preprocess", "generate", "stage1", "reconstruct", "bake", "export"} <= timings
        assert storage.read_bytes(outputs["glb"], s3)[:4] == b"glTF"
        # quality checks ran in finalize: measured values in the row, the same as in meta.json
        meta = json.loads(storage.read_bytes(outputs["meta"], s3))
        assert r["qc_faces"] == meta["qc"]["values"]["faces"] > 0
        assert r["qc_silhouette_iou"] == meta["qc"]["values"]["silhouette_iou"]
        assert r["qc_flags"] == meta["qc"]["flags"]
    for obj_id in ("missing", "corrupt"):
        assert results[obj_id]["qc_faces"] is None and results[obj_id]["qc_flags"] == []
    assert results["alpha"]["seed"] == 11 and results["beta"]["seed"] == 0
    # the gallery: one card per row, written at the end of the run
    assert summary["gallery_uri"] == f"{run}/out/index.html"
    page = storage.read_bytes(summary["gallery_uri"], s3).decode()
    assert all(f'"id": "{i}"' in page or f'"id":"{i}"' in page for i in good)
    assert not storage.exists(f"{run}/out/objects/corrupt", s3)

    # resume: the complete rows are kept, nothing is generated again (bad rows are re-checked cheaply)
    again = crm_batch(**params)
    assert again["resumed"] == 3 and again["generated"] == 0 and again["ok"] == 3 and again["failed"] == 3
    kept = {r["id"]: r for r in read_results(again["results_uri"], s3).to_pylist()}
    assert all(kept[i]["resumed"] for i in good) and not kept["missing"]["resumed"]
    assert kept["alpha"]["output_uri"] == results["alpha"]["output_uri"]

    # the QC policy: a threshold every mesh misses, policy "fail" -> the kept rows fail as QualityCheckFailed
    # without generating again (flags are recomputed against this run's thresholds); "review" lists them
    strict = {**params, "qc": {"min_faces": 10**9}, "max_failure_rate": 1.0}
    failed = crm_batch(**strict, qc_policy="fail")
    assert failed["generated"] == 0 and failed["ok"] == 0 and failed["qc_failed"] == 3
    rows = {r["id"]: r for r in read_results(failed["results_uri"], s3).to_pylist()}
    for obj_id in good:
        assert rows[obj_id]["status"] == "failed" and rows[obj_id]["error_class"] == "QualityCheckFailed"
        assert "degenerate" in rows[obj_id]["qc_flags"] and "degenerate" in rows[obj_id]["error_message"]
        assert rows[obj_id]["output_uri"] == results[obj_id]["output_uri"]  # outputs kept for inspection
    review = crm_batch(**strict, qc_policy="review")
    assert review["ok"] == 3 and review["flagged"] == 3 and review["qc_failed"] == 0
    assert review["generated"] == 0

    # a failure rate above the threshold fails the flow, after writing the results
    storage.remove(again["results_uri"], s3)
    state = crm_batch(**{**params, "max_failure_rate": 0.25}, return_state=True)
    assert state.is_failed()
    with pytest.raises(FailureRateExceeded, match=r"3 of 6 rows failed"):
        state.result()
    assert storage.exists(again["results_uri"], s3)


def test_flow_rejects_duplicate_ids_before_any_work(s3, prefect_harness):
    from flows.crm_batch import crm_batch

    run = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    with storage.open_uri(f"{run}/manifest.parquet", "wb", s3) as fh:
        pq.write_table(make_input_table(["a", "b", "a"], ["x.png", "y.png", "z.png"]), fh)
    state = crm_batch(
        manifest_uri=f"{run}/manifest.parquet", output_uri=f"{run}/out", backend="noop",
        storage_options=s3, return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    with pytest.raises(ManifestError, match=r"duplicate ids: 'a' \(rows \[0, 2\]\)"):
        state.result()
    assert storage.list_files(f"{run}/out", s3) == []


# --------------------------------------------------------------------------- fault injection (no-op model)
def test_killed_actor_loses_no_row(ray_session, tmp_path):
    ids = [f"obj{i}" for i in range(6)]
    manifest = _local_manifest(tmp_path, ids)
    markers = tmp_path / "markers"
    markers.mkdir()
    backend = CrashOnceBackend(NoOpBackend(sleep_s=0.05), crash_ids=["obj3"], marker_dir=str(markers))
    rows: list[dict] = []
    config = BatchConfig(output_uri=str(tmp_path / "out"), batch_size=2, num_actors=1, timeout_s=300)
    stats = run_batch(manifest.rows(), backend, config, rows.append)
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ids and len(rows) == len(ids)
    assert all(r["status"] == "ok" for r in rows), [(r["id"], r["error_message"]) for r in rows]
    assert stats.actor_deaths == 1 and stats.ok == 6 and stats.retried_rows >= 2
    # the death is charged to at most one batch (one extra attempt); which of the in-flight batches
    # gets it depends on the order in which Ray reports the dead actor's calls
    attempts = [r["attempts"] for r in rows]
    assert set(attempts) <= {1, 2} and attempts.count(2) <= config.batch_size, attempts
    assert sorted(p.name for p in markers.iterdir()) == ["crashed-obj3"]
    for obj_id in ids:
        assert (tmp_path / "out" / "objects" / obj_id / "result.json").is_file()
    # obj3 ran again on the replacement actor (slot 0, second generation). The first actor may have
    # finished no row at all: images become ready in any order, so obj3 can be in the first batch.
    assert by_id["obj3"]["worker"].startswith("gen0.2@"), by_id["obj3"]["worker"]


@pytest.mark.parametrize("inflight", [1, 2])
def test_row_on_always_dying_actor_fails_after_max_attempts(ray_session, tmp_path, inflight):
    """Only the row that kills its worker is charged. With two calls queued per actor, a death can
    leave two calls unfinished: Ray also reports a call that finished just before the crash as failed
    when its reply died with the process. Such a death is charged to no row (the old driver charged the
    oldest unfinished call, an innocent row: the run then needed a third death, or failed a good row);
    its rows are retried alone, where every death is unambiguous."""
    ids = ["a", "b", "c"]
    manifest = _local_manifest(tmp_path, ids)
    backend = CrashOnceBackend(NoOpBackend(), crash_ids=["b"], marker_dir=str(tmp_path), always=True)
    rows: list[dict] = []
    config = BatchConfig(
        output_uri=str(tmp_path / "out"), batch_size=1, num_actors=1, max_attempts=2, timeout_s=300,
        max_inflight_per_actor=inflight,
    )  # fmt: skip
    stats = run_batch(manifest.rows(), backend, config, rows.append)
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == 3
    for good in ("a", "c"):  # never charged for b's crashes
        assert by_id[good]["status"] == "ok" and by_id[good]["attempts"] == 1, by_id[good]
    assert by_id["b"]["status"] == "failed" and by_id["b"]["error_class"] == "WorkerDiedError"
    assert by_id["b"]["attempts"] == 2
    # every death was b's: charged to b, or (at most once, before b ran alone) charged to nobody
    assert stats.actor_deaths == 2 + stats.unattributed_deaths, stats
    assert stats.unattributed_deaths <= (0 if inflight == 1 else 1), stats


def test_failing_batch_is_split_and_bad_rows_reported(ray_session, tmp_path):
    ids = ["r0", "r1", "r2", "r3", "r4", "r5"]
    manifest = _local_manifest(tmp_path, ids, n_bad_image=1)  # r0 is a corrupt file
    backend = FailIdsBackend(NoOpBackend(), fail_ids=["r4"])
    rows: list[dict] = []
    config = BatchConfig(output_uri=str(tmp_path / "out"), batch_size=3, num_actors=1, timeout_s=300)
    stats = run_batch(manifest.rows(), backend, config, rows.append)
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ids
    assert by_id["r0"]["error_class"] == "ImageInputError"
    assert by_id["r4"]["error_class"] == "RuntimeError" and "injected" in by_id["r4"]["error_message"]
    assert [i for i in ids if by_id[i]["status"] == "ok"] == ["r1", "r2", "r3", "r5"]
    assert stats.split_batches >= 1
    assert not (tmp_path / "out" / "objects" / "r4").exists()


def test_invalid_rows_fail_without_work(ray_session, tmp_path):
    manifest = validate_input_table(
        make_input_table(["../x", "ok"], [str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    )
    (tmp_path / "b.png").write_bytes(_png())
    rows: list[dict] = []
    run_batch(
        manifest.rows(),
        NoOpBackend(),
        BatchConfig(output_uri=str(tmp_path / "out"), timeout_s=300),
        rows.append,
    )
    by_id = {r["id"]: r for r in rows}
    assert by_id["../x"]["error_class"] == "InvalidRow" and by_id["../x"]["attempts"] == 0
    assert by_id["ok"]["status"] == "ok"
    assert sorted(p.name for p in (tmp_path / "out" / "objects").iterdir()) == ["ok"]


@pytest.mark.parametrize(
    "bad", [{"batch_size": 0}, {"num_actors": 0}, {"actor_wait_s": 0.0}, {"heap_trim_s": -1.0}]
)
def test_batch_config_rejects_values_that_cannot_run(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BatchConfig(output_uri="out", **bad)


@pytest.mark.parametrize("trim_s", [None, 0.2])
def test_driver_hands_back_free_heap_every_heap_trim_s(ray_session, tmp_path, monkeypatch, trim_s):
    """The driver returns its free heap pages (``release_free_memory``) every ``heap_trim_s`` seconds
    of its loop, never when it is None."""
    trims: list[float] = []
    monkeypatch.setattr("flows.ray_job.driver.release_free_memory", lambda: trims.append(time.monotonic()))
    ids = [f"t{i}" for i in range(4)]
    config = BatchConfig(
        output_uri=str(tmp_path / "out"), batch_size=2, num_actors=1, timeout_s=300, heap_trim_s=trim_s
    )
    stats = run_batch(_local_manifest(tmp_path, ids).rows(), NoOpBackend(sleep_s=0.5), config, lambda r: None)
    assert stats.ok == len(ids)
    if trim_s is None:
        assert trims == []
        return
    # the run lasts >= 2 s (two calls of 2 x 0.5 s on one actor): repeated calls, never closer than trim_s
    gaps = [b - a for a, b in zip(trims, trims[1:])]
    assert len(trims) >= 2 and all(g >= trim_s for g in gaps), gaps


# --------------------------------------------------------------------------- shards and leases (no-op model)
def _write_shard(folder: Path, image: Path, s: int, ids: list[str]) -> None:
    """Shard ``part-<s>.parquet`` of ``ids``, every row the same image."""
    folder.mkdir(parents=True, exist_ok=True)
    write_input_manifest(make_input_table(ids, [str(image)] * len(ids)), str(folder / f"part-{s}.parquet"))


def test_flow_runs_shards_resumes_per_shard_and_merges_results(ray_session, prefect_harness, tmp_path):
    from flows.crm_batch import crm_batch

    image = tmp_path / "img.png"
    image.write_bytes(_png())
    for s, n in enumerate([3, 2, 3]):
        _write_shard(tmp_path / "m", image, s, [f"s{s}-{i}" for i in range(n)])
    out = tmp_path / "out"
    params = dict(
        manifest_uri=str(tmp_path / "m"), output_uri=str(out), backend="noop", batch_size=2, num_actors=1,
        timeout_s=300,
    )  # fmt: skip
    first = crm_batch(**params)
    assert (first["shards"], first["rows"], first["ok"], first["generated"]) == (3, 8, 8, 8)
    assert first["shards_reused"] == 0 and first["resumed"] == 0
    results = read_results(first["results_uri"]).to_pylist()
    blocks = [sorted(r["id"] for r in results[a:b]) for a, b in ((0, 3), (3, 5), (5, 8))]
    assert blocks == [["s0-0", "s0-1", "s0-2"], ["s1-0", "s1-1"], ["s2-0", "s2-1", "s2-2"]]  # shard order
    for s, n in enumerate([3, 2, 3]):
        assert read_results(str(out / "shards" / f"part-{s}.parquet")).num_rows == n
    assert not (out / "lease.json").exists()

    # every shard complete: each is kept whole, nothing runs
    second = crm_batch(**params)
    assert second["shards_reused"] == 3 and second["generated"] == 0 and second["resumed"] == 8
    assert all(r["resumed"] for r in read_results(second["results_uri"]).to_pylist())

    # one shard file changed (a row added): only that shard runs, and only its new row is generated
    _write_shard(tmp_path / "m", image, 1, ["s1-0", "s1-1", "s1-new"])
    third = crm_batch(**params)
    assert third["shards_reused"] == 2 and third["generated"] == 1 and third["rows"] == 9
    assert third["resumed"] == 8
    by_id = {r["id"]: r for r in read_results(third["results_uri"]).to_pylist()}
    assert not by_id["s1-new"]["resumed"] and by_id["s1-0"]["resumed"] and by_id["s2-2"]["resumed"]

    # limit counts over the shards in order
    limited = crm_batch(**{**params, "output_uri": str(tmp_path / "out-limit"), "limit": 4})
    assert limited["shards"] == 2 and limited["rows"] == 4
    ids = sorted(r["id"] for r in read_results(limited["results_uri"]).to_pylist())
    assert ids == ["s0-0", "s0-1", "s0-2", "s1-0"]


def test_flow_refuses_an_output_held_by_a_live_run_and_takes_over_a_stale_lease(
    ray_session, s3, prefect_harness
):
    from flows.crm_batch import crm_batch

    run = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    storage.write_bytes_atomic(f"{run}/img.png", _png(), s3)
    with storage.open_uri(f"{run}/manifest.parquet", "wb", s3) as fh:
        pq.write_table(make_input_table(["a", "b"], ["img.png", "img.png"]), fh)
    out = f"{run}/out"
    params = dict(
        manifest_uri=f"{run}/manifest.parquet", output_uri=out, backend="noop", storage_options=s3,
        num_actors=1, timeout_s=300,
    )  # fmt: skip
    OutputLease(out, "other-run", s3, ttl_s=600, settle_s=0).acquire()  # a live run holds the output
    state = crm_batch(**params, return_state=True)
    assert state.is_failed()
    with pytest.raises(
        LeaseHeldError, match=r"in use by another run: run 'other-run' \(holder .+\), expires in"
    ):
        state.result()
    assert storage.list_files(out, s3) == [f"{out}/lease.json"]  # nothing else was written

    # the holder died long ago: its lease expired, the next run takes it over
    OutputLease(out, "other-run", s3, ttl_s=60, settle_s=0, clock=lambda: time.time() - 3600).acquire()
    summary = crm_batch(**params)
    assert summary["rows"] == 2 and summary["ok"] == 2
    assert not storage.exists(f"{out}/lease.json", s3)  # released at the end
