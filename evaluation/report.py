"""Outputs of a GSO evaluation run: CSV, JSON, Markdown table, plots, metadata (all written atomically).

Files under the output folder:

* ``metrics.csv`` - one row per object plus a ``mean`` row (over objects with status ``ok``);
* ``metrics.json`` - the same rows, per-object alignment transforms and timings, and ``metadata``;
* ``metrics.md`` - Markdown table, notes on empty columns, objects present on one side only, batch rows
  not scored (grouped by reason);
* ``skipped_rows.csv`` - for a batch output folder as ``--pred``: every results row not scored, with
  its status and the reason;
* ``metadata.json`` - protocol options, seeds, sample counts, package versions, weight files;
* ``plots/<metric>.png`` - per-object bars for each metric; ``plots/renders_grid.png`` - GT vs
  prediction renders (views 0, 4, 8, 12);
* ``report.html`` - all of the above as one page (the table sortable by any column, the plots and the
  render grid shown from ``plots/``, the protocol and metadata); it opens from ``file://``.
"""

from __future__ import annotations

import csv
import html
import io
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.outputs.atomic import atomic_write_bytes
from pipeline.outputs.meta import versions

from .results import METRIC_COLUMNS

__all__ = ["write_report", "write_html_report", "mean_row", "package_versions", "group_skipped"]

_PACKAGES = ("numpy", "scipy", "torch", "trimesh", "transformers", "scikit-image", "matplotlib", "pillow")
_FMT = {"chamfer": "{:.4f}", "psnr": "{:.2f}", "lpips": "{:.4f}", "clip": "{:.2f}"}
_LOWER_IS_BETTER = {"chamfer", "lpips"}


def package_versions() -> dict[str, str]:
    """Versions of Python and of the packages the evaluation's numbers depend on."""
    return versions(_PACKAGES)


def mean_row(rows: list[dict], columns: list[str]) -> dict:
    """Mean of each column over rows with status ``ok`` and a finite value (None when there is none)."""
    out: dict = {"object": "mean", "status": f"{sum(r['status'] == 'ok' for r in rows)} ok"}
    for c in columns:
        vals = [r[c] for r in rows if r["status"] == "ok" and r.get(c) is not None and np.isfinite(r[c])]
        out[c] = float(np.mean(vals)) if vals else None
    return out


def group_skipped(skipped: list[dict]) -> dict[str, list]:
    """Skipped batch rows grouped by reason: ``{reason: [id, ...]}`` in first-seen order."""
    out: dict[str, list] = {}
    for s in skipped:
        out.setdefault(s["reason"], []).append(s["id"])
    return out


def _fmt(col: str, v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return _FMT.get(col.split("@")[0], "{:.4f}").format(v)
    return str(v)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _plots(out: Path, rows: list[dict], columns: list[str], results) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    plot_dir = out / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    names = [r["object"] for r in rows]
    for c in columns:
        vals = [r.get(c) for r in rows]
        if all(v is None for v in vals):
            continue
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(names) + 1.5), 3))
        ax.bar(names, [np.nan if v is None else v for v in vals], color="#4878a8")
        ax.set_title(f"{c} ({'lower' if c in _LOWER_IS_BETTER else 'higher'} is better)")
        ax.tick_params(axis="x", labelrotation=60, labelsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(plot_dir / f"{c.replace('@', '_at_')}.png", buf.getvalue())
        made.append(f"plots/{c.replace('@', '_at_')}.png")
    with_renders = [r for r in results if r.renders is not None and r.gt_views is not None]
    if with_renders:
        views = (0, 4, 8, 12)
        fig, axes = plt.subplots(
            len(with_renders), 2 * len(views), figsize=(2 * len(views) * 1.2, len(with_renders) * 1.3)
        )
        axes = np.atleast_2d(axes)
        for i, r in enumerate(with_renders):
            for j, v in enumerate(views):
                for k, (img, lab) in enumerate(((r.gt_views[v], "GT"), (r.renders[v], "pred"))):
                    ax = axes[i, 2 * j + k]
                    ax.imshow(np.clip(img, 0, 1))
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if i == 0:
                        ax.set_title(f"{lab} {v:03d}", fontsize=7)
                    if j == 0 and k == 0:
                        ax.set_ylabel(r.name, fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        atomic_write_bytes(plot_dir / "renders_grid.png", buf.getvalue())
        made.append("plots/renders_grid.png")
    return made


def write_report(
    run: dict,
    cfg,
    out_dir: str | Path,
    pred_dir: str | Path = "",
    gt_dir: str | Path = "",
    plots: bool = True,
    extra: dict | None = None,
) -> dict:
    """Write every output of an :func:`evaluation.gso.evaluate` run; returns ``{kind: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = run["results"]
    rows = [r.row() for r in results]
    fs_cols = sorted({k for r in rows for k in r if k.startswith("fscore@")}, key=lambda k: float(k[7:]))
    columns = METRIC_COLUMNS + fs_cols
    mean = mean_row(rows, columns)
    notes = dict(run.get("notes", {}))
    meta = {
        "protocol": asdict(cfg),
        "seeds": {"sampling": cfg.geometry.seed, "alignment": cfg.align.seed},
        "samples_per_mesh": cfg.geometry.num_samples,
        "headline_fscore_threshold": cfg.geometry.headline_threshold,
        "iou_grid": f"{cfg.geometry.iou_resolution}^3 nodes over [-{cfg.geometry.iou_range}, "
        f"{cfg.geometry.iou_range}]^3",
        "views": 16,
        "packages": package_versions(),
        "weights": run.get("files", {}),
        "empty_columns": notes,
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "objects_only_in_predictions": run.get("only_pred", []),
        "objects_only_in_ground_truth": run.get("only_gt", []),
        "prediction_kind": run.get("pred_kind", "folder"),
        "batch_rows": run.get("batch_rows", 0),
        "batch_rows_skipped": run.get("skipped", []),
        "seconds": run.get("seconds"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    header = ["object", "status", *columns, "frame", "reason"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in [*rows, mean]:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in header})
    paths = {"csv": out / "metrics.csv", "json": out / "metrics.json", "markdown": out / "metrics.md"}
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    per_object = []
    for r, row in zip(results, rows):
        per_object.append({**row, "alignment": r.alignment, "seconds": r.seconds})
    doc = {"objects": per_object, "mean": mean, "metadata": meta}
    atomic_write_bytes(paths["json"], json.dumps(doc, indent=1, default=_json_default).encode())
    paths["metadata"] = out / "metadata.json"
    atomic_write_bytes(paths["metadata"], json.dumps(meta, indent=1, default=_json_default).encode())
    skipped = run.get("skipped", [])
    if run.get("pred_kind") == "batch":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["id", "status", "reason"], lineterminator="\n")
        w.writeheader()
        w.writerows(skipped)
        paths["skipped"] = out / "skipped_rows.csv"
        atomic_write_bytes(paths["skipped"], buf.getvalue().encode())

    md = ["# GSO evaluation", ""]
    md.append(
        f"{len(results)} objects, {sum(r.status == 'ok' for r in results)} ok. Chamfer / LPIPS lower is "
        f"better; the rest higher. F-score column = F@{cfg.geometry.headline_threshold:g}. "
        "Protocol: docs/evaluation.md."
    )
    md.append("")
    md.append("| " + " | ".join(["object", "status", *columns]) + " |")
    md.append("|" + "---|" * (len(columns) + 2))
    for r in [*rows, mean]:
        md.append(
            "| " + " | ".join([r["object"], str(r["status"]), *(_fmt(c, r.get(c)) for c in columns)]) + " |"
        )
    md.append("")
    for col, note in notes.items():
        md.append(f"- `{col}` empty: {note}")
    for r in rows:
        if r["status"] != "ok":
            md.append(f"- `{r['object']}` failed: {r['reason']}")
    if run.get("only_pred"):
        md.append(f"- predictions without ground truth (skipped): {', '.join(run['only_pred'])}")
    if run.get("only_gt"):
        md.append(f"- ground truth without prediction (skipped): {', '.join(run['only_gt'])}")
    if run.get("pred_kind") == "batch":
        md.append(
            f"- batch run: {run.get('batch_rows', 0)} rows in results.parquet, {len(results)} scored, "
            f"{len(skipped)} not scored (all listed in skipped_rows.csv):"
        )
        for reason, ids in group_skipped(skipped).items():
            shown = ", ".join(f"`{i}`" for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
            md.append(f"  - {len(ids)} row(s), {reason}: {shown}")
    made = _plots(out, rows, columns, results) if plots else []
    if made:
        md.append("")
        md += [f"![{p}]({p})" for p in made]
    atomic_write_bytes(paths["markdown"], ("\n".join(md) + "\n").encode())
    paths["html"] = out / "report.html"
    page = write_html_report(
        rows=rows, mean=mean, columns=columns, notes=_report_notes(run, rows, notes), plots=made, meta=meta
    )
    atomic_write_bytes(paths["html"], page.encode("utf-8"))
    return paths


def _report_notes(run: dict, rows: list[dict], notes: dict) -> list[str]:
    """The Markdown report's bullet notes as plain sentences (empty columns, failures, skipped rows)."""
    out = [f"{col} is empty: {note}" for col, note in notes.items()]
    out += [f"{r['object']} failed: {r['reason']}" for r in rows if r["status"] != "ok"]
    if run.get("only_pred"):
        out.append(f"predictions without ground truth (skipped): {', '.join(run['only_pred'])}")
    if run.get("only_gt"):
        out.append(f"ground truth without prediction (skipped): {', '.join(run['only_gt'])}")
    skipped = run.get("skipped", [])
    if run.get("pred_kind") == "batch":
        out.append(
            f"batch run: {run.get('batch_rows', 0)} rows in results.parquet, {len(rows)} scored, "
            f"{len(skipped)} not scored (listed in skipped_rows.csv)"
        )
        for reason, ids in group_skipped(skipped).items():
            shown = ", ".join(map(str, ids[:10])) + (", ..." if len(ids) > 10 else "")
            out.append(f"{len(ids)} row(s) not scored, {reason}: {shown}")
    return out


_PAGE_STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2125; margin: 0;
  background: #f4f5f7; }
main { max-width: 1200px; margin: 0 auto; padding: 18px 22px 40px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 26px 0 8px; }
.sub { color: #626f7a; font-size: 12px; word-break: break-all; }
table { border-collapse: collapse; background: #fff; font-variant-numeric: tabular-nums; font-size: 13px; }
th, td { border: 1px solid #dde1e5; padding: 3px 8px; text-align: right; }
th { background: #eef0f3; cursor: pointer; user-select: none; white-space: nowrap; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.name, th.name { text-align: left; } tr.failed td { color: #b42318; } tfoot td { font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots figure { margin: 0; background: #fff;
  border: 1px solid #dde1e5; padding: 6px; } .plots img, .grid img { max-width: 100%; display: block; }
figcaption { font-size: 12px; color: #626f7a; } pre { background: #fff; border: 1px solid #dde1e5;
  padding: 10px; overflow: auto; font-size: 12px; }
"""
# Click a header to sort by that column (numbers numerically, empty cells last); the mean row stays put.
_PAGE_SCRIPT = """
document.querySelectorAll("table.metrics").forEach((table) => {
  const body = table.tBodies[0];
  table.querySelectorAll("thead th").forEach((th, col) => th.addEventListener("click", () => {
    const asc = !th.classList.contains("sorted-asc");
    table.querySelectorAll("thead th").forEach((h) => h.classList.remove("sorted-asc", "sorted-desc"));
    th.classList.add(asc ? "sorted-asc" : "sorted-desc");
    const key = (tr) => tr.cells[col].dataset.v;
    const rows = Array.from(body.rows).sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === "" || y === "") return (x === "") - (y === "");
      const d = isNaN(x) || isNaN(y) ? x.localeCompare(y) : Number(x) - Number(y);
      return asc ? d : -d;
    });
    body.replaceChildren(...rows);
  }));
});
"""


def write_html_report(
    *, rows: list[dict], mean: dict, columns: list[str], notes: list[str], plots: list[str], meta: dict
) -> str:
    """The evaluation as one HTML page (returned as text; :func:`write_report` writes ``report.html``).

    Args:
        rows: per-object rows (``ObjectScores.row()``); mean: the :func:`mean_row`.
        columns: metric columns in table order; notes: sentences listed under the table.
        plots: image paths relative to the page (``plots/<metric>.png``, ``plots/renders_grid.png``).
        meta: the run's metadata (``metadata.json``), shown at the end.
    """
    esc = html.escape

    def cell(col: str, v, name: bool = False) -> str:
        key = "" if v is None else (repr(float(v)) if isinstance(v, (int, float)) else str(v))
        cls = ' class="name"' if name else ""
        return f'<td{cls} data-v="{esc(key)}">{esc(_fmt(col, v))}</td>'

    head = "".join(
        f'<th title="{"lower" if c.split("@")[0] in _LOWER_IS_BETTER else "higher"} is better">{esc(c)}</th>'
        for c in columns
    )
    body = []
    for r in rows:
        cls = "" if r["status"] == "ok" else ' class="failed"'
        cells = cell("object", r["object"], True) + cell("status", r["status"], True)
        cells += "".join(cell(c, r.get(c)) for c in columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    foot = cell("object", "mean", True) + cell("status", mean["status"], True)
    foot += "".join(cell(c, mean.get(c)) for c in columns)
    grid = [p for p in plots if p.endswith("renders_grid.png")]
    bars = [p for p in plots if p not in grid]
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>GSO evaluation</title>',
        f"<style>{_PAGE_STYLE}</style></head><body><main>",
        "<h1>GSO evaluation</h1>",
        f'<div class="sub">predictions {esc(str(meta.get("pred_dir", "")))} &middot; ground truth '
        f"{esc(str(meta.get('gt_dir', '')))} &middot; {esc(str(meta.get('date_utc', '')))}</div>",
        f"<p>{len(rows)} objects, {sum(r['status'] == 'ok' for r in rows)} ok. Chamfer and LPIPS: lower is "
        f"better; the rest: higher. F-score = F@{meta.get('headline_fscore_threshold', '')}. Protocol: "
        "docs/evaluation.md. Click a column to sort.</p>",
        '<table class="metrics"><thead><tr><th class="name">object</th><th class="name">status</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody><tfoot><tr>{foot}</tr></tfoot></table>",
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    if grid:
        parts.append("<h2>Predictions vs ground truth (views 0, 4, 8, 12)</h2>")
        parts += [f'<div class="grid"><img src="{esc(p)}" alt="renders grid"></div>' for p in grid]
    if bars:
        parts.append('<h2>Per-object metrics</h2><div class="plots">')
        parts += [
            f'<figure><img src="{esc(p)}" alt="{esc(p)}"><figcaption>{esc(p)}</figcaption></figure>'
            for p in bars
        ]
        parts.append("</div>")
    parts.append("<h2>Protocol and metadata</h2><details><summary>metadata.json</summary>")
    parts.append(f"<pre>{esc(json.dumps(meta, indent=1, default=_json_default))}</pre></details>")
    parts.append(f"</main><script>{_PAGE_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"
