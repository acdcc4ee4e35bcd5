"""QC in batch results (``flows.qc_results``): the ``qc_*`` Parquet columns, the policy that keeps, reviews
or fails flagged rows, and the review list."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.io.manifest import RESULT_SCHEMA, result_row
from flows.qc_results import (
    QC_FAILED,
    QC_RESULT_FIELDS,
    QCPolicy,
    apply_qc_policy,
    qc_decision,
    qc_row_columns,
    review_rows,
)
from pipeline.qc import QC_COLUMNS
from pipeline.results import ObjectResult

REPORT = {
    "schema": "crm-qc/1",
    "values": {"silhouette_iou": 0.41, "faces": 1200, "components": 3, "clip_similarity": None},
    "flags": ["low_silhouette_iou", "fragmented"],
    "notes": {"clip_similarity": "CLIP weights did not resolve: offline"},
}


def ok_row(obj_id: str, report=REPORT) -> dict:
    res = ObjectResult(
        obj_id, "ok", outputs={"glb": "mesh.glb"}, location=f"/run/objects/{obj_id}", qc=report
    )
    row = result_row(obj_id, "ok", output_uri=res.location, outputs={"glb": res.path("glb")})
    row.update(qc_row_columns(res))
    return row


def test_columns_round_trip_through_parquet(tmp_path):
    fields = list(RESULT_SCHEMA) + [f for f in QC_RESULT_FIELDS if f.name not in RESULT_SCHEMA.names]
    assert [f.name for f in QC_RESULT_FIELDS] == list(QC_COLUMNS)
    failed = result_row("b", "failed", error_class="StageError", error_message="x")
    failed.update(qc_row_columns(ObjectResult.failure("b", RuntimeError("x"))))
    rows = [ok_row("a"), failed, ok_row("c", {})]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    pq.write_table(table, tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet").to_pylist()
    assert back[0]["qc_silhouette_iou"] == 0.41 and back[0]["qc_faces"] == 1200
    assert back[0]["qc_flags"] == ["low_silhouette_iou", "fragmented"]
    assert dict(back[0]["qc_notes"]) == REPORT["notes"] and back[0]["qc_clip_similarity"] is None
    assert back[1]["qc_flags"] == [] and back[1]["qc_silhouette_iou"] is None  # failed: no report
    assert back[2]["qc_flags"] == [] and back[2]["qc_faces"] is None


def test_policy_review_fail_ignore():
    row = ok_row("a")
    assert qc_decision(row) == "review"
    same, decision = apply_qc_policy(row, "review")
    assert decision == "review" and same is row and row["status"] == "ok"
    failed, decision = apply_qc_policy(row, "fail")
    assert decision == "fail" and failed["status"] == "failed" and failed["error_class"] == QC_FAILED
    assert failed["error_message"] == "quality checks flagged: low_silhouette_iou, fragmented"
    assert (
        failed["outputs"] == row["outputs"]
        and failed["qc_flags"] == row["qc_flags"]
        and row["status"] == "ok"
    )
    assert apply_qc_policy(row, "ignore") == (row, "pass")
    # only some flags trigger the action
    only = QCPolicy.parse("fail:fragmented")
    assert only == QCPolicy("fail", ("fragmented",))
    assert apply_qc_policy(row, only)[0]["error_message"] == "quality checks flagged: fragmented"
    assert qc_decision(row, QCPolicy("fail", ("degenerate",))) == "pass"
    assert qc_decision(ok_row("clean", {"flags": []}), "fail") == "pass"
    assert qc_decision(result_row("x", "failed"), "fail") == "pass"  # a failed row stays as it is


def test_policy_rejects_unknown_actions_and_flags():
    with pytest.raises(ValueError, match="QC action"):
        QCPolicy.parse("drop")
    with pytest.raises(ValueError, match="unknown QC flag"):
        QCPolicy.parse("fail:blurry")
    assert QCPolicy.parse(None) == QCPolicy() and QCPolicy.parse(" ") == QCPolicy()


def test_review_rows_lists_flagged_ok_rows_only():
    rows = [ok_row("a"), ok_row("clean", {"flags": []}), result_row("f", "failed"), ok_row("b")]
    got = review_rows(rows)
    assert [r["id"] for r in got] == ["a", "b"]
    assert got[0]["flags"] == "low_silhouette_iou, fragmented" and got[0]["silhouette_iou"] == 0.41
    assert len(review_rows(rows, limit=1)) == 1


def test_reflag_uses_the_run_thresholds_and_keeps_qc_error():
    from flows.qc_results import reflag
    from pipeline.qc import QCConfig

    row = ok_row("a")
    row["qc_flags"] = ["low_silhouette_iou", "fragmented", "qc_error"]
    loose = reflag(row, QCConfig(min_silhouette_iou=0.3, max_components=5, min_largest_component_share=0.0))
    assert loose["qc_flags"] == ["qc_error"]  # 0.41 >= 0.3, 3 components <= 5; qc_error is not a threshold
    strict = reflag(row, QCConfig(min_faces=5000))
    assert strict["qc_flags"] == ["low_silhouette_iou", "degenerate", "qc_error"]
    assert row["qc_flags"] == ["low_silhouette_iou", "fragmented", "qc_error"]  # the input is not changed
    failed = result_row("b", "failed", error_class="StageError", error_message="x")
    failed.update(qc_row_columns(None))
    assert reflag(failed, QCConfig(min_faces=5000)) is failed  # nothing measured: nothing to flag


def test_results_files_without_qc_columns_still_read_and_merge(tmp_path):
    """Results written before the ``qc_*`` columns existed: read_results accepts them and merge_results
    fills the new columns with nulls (empty flag lists)."""
    from flows.io.manifest import REQUIRED_RESULT_COLUMNS, merge_results, read_results, write_results

    old_schema = pa.schema([RESULT_SCHEMA.field(n) for n in REQUIRED_RESULT_COLUMNS])
    old_rows = [{k: v for k, v in result_row("old", "ok").items() if k in REQUIRED_RESULT_COLUMNS}]
    old_rows[0]["outputs"], old_rows[0]["timings"] = [], []
    pq.write_table(pa.Table.from_pylist(old_rows, schema=old_schema), tmp_path / "old.parquet")
    assert read_results(str(tmp_path / "old.parquet")).num_rows == 1
    write_results([ok_row("new")], str(tmp_path / "new.parquet"))
    merge_results(
        [str(tmp_path / "old.parquet"), str(tmp_path / "new.parquet")], str(tmp_path / "all.parquet")
    )
    rows = {r["id"]: r for r in read_results(str(tmp_path / "all.parquet")).to_pylist()}
    assert rows["old"]["qc_faces"] is None and not rows["old"]["qc_flags"]
    assert rows["new"]["qc_faces"] == 1200 and rows["new"]["qc_flags"] == ["low_silhouette_iou", "fragmented"]
    assert dict(rows["new"]["qc_notes"]) == REPORT["notes"]
