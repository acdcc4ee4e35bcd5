"""The gallery of a batch run: ``<run>/index.html``, one card per results row, and a 3-D viewer.

Each card shows the row's preview (and its input image), id, status, error, quality-check values and
flags; the page filters by all / ok / flagged / failed and by text, and a click opens the object's GLB
in an interactive three.js viewer. The page is static and self-contained: its data and three.js (vendored
in ``flows/gallery_assets/three``, MIT) are inlined, so it needs no CDN and no server:

* a local run's page works from ``file://``: links are relative to the run folder, and since a page
  opened from a file cannot fetch files, every GLB is also written as a base64 script
  (``<run>/gallery/models/<id>.js``, refreshed only when the GLB changed; ``GalleryConfig.embed_models``);
* on object stores (``s3://``, ``gs://``) every link is presigned (``GalleryConfig.link_expiry_s``, at most
  7 days on S3): open the page through its own presigned link (:func:`gallery_link`); rebuilding the page
  renews them.

Rows come from ``<run>/results.parquet`` (or, for a run that has not written it yet, the
``objects/<id>/result.json`` markers). QC values come from the row's ``qc_*`` columns, or from the
object's ``meta.json`` when the row carries none (results written before those columns existed).
Rebuild any time::

    python -m flows.gallery RUN_URI [--storage-options JSON] [--link-expiry-s S] [--no-embed]
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import posixpath
import re
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flows.io import storage
from pipeline.qc import FLAGS, QC_VALUES, qc_columns

__all__ = [
    "GALLERY_NAME",
    "GalleryConfig",
    "GalleryError",
    "THREE_LINK",
    "gallery_link",
    "gallery_rows",
    "main",
    "write_gallery",
]

log = logging.getLogger(__name__)

GALLERY_NAME = "index.html"
MODELS_DIR = "gallery/models"
MAX_LINK_EXPIRY_S = 7 * 24 * 3600
#: How the page links the vendored three.js modules: (file, {import specifier in it: file it names}), in
#: dependency order. ``tests/test_gallery.py`` checks that it covers every import of the vendored files.
THREE_LINK: list[tuple[str, dict[str, str]]] = [
    ("three.core.js", {}),
    ("three.module.js", {"./three.core.js": "three.core.js"}),
    ("BufferGeometryUtils.js", {"three": "three.module.js"}),
    ("SkeletonUtils.js", {"three": "three.module.js"}),
    (
        "GLTFLoader.js",
        {
            "three": "three.module.js",
            "../utils/BufferGeometryUtils.js": "BufferGeometryUtils.js",
            "../utils/SkeletonUtils.js": "SkeletonUtils.js",
        },
    ),
    ("OrbitControls.js", {"three": "three.module.js"}),
]
# What a card shows: (QC value, label, format, the flag it can raise).
_CARD_VALUES = [
    ("silhouette_iou", "silhouette IoU", "float", "low_silhouette_iou"),
    ("color_psnr", "colour PSNR", "db", "low_color_psnr"),
    ("clip_similarity", "CLIP similarity", "ratio", "low_clip_similarity"),
    ("components", "components", "int", "fragmented"),
    ("largest_component_share", "largest component", "percent", "fragmented"),
    ("boundary_edges", "boundary edges", "int", "open_surface"),
    ("nonmanifold_edges", "non-manifold edges", "int", "non_manifold"),
    ("faces", "faces", "int", "degenerate"),
    ("bbox_aspect", "bbox aspect", "ratio", "degenerate"),
    ("texture_coverage", "texture used", "percent", "low_texture_coverage"),
]
# Extra links of a card: (output kind, label).
_LINKS = [("glb", "GLB"), ("obj", "OBJ"), ("views", "views"), ("meta", "meta.json")]


class GalleryError(RuntimeError):
    """The run folder cannot be shown (no results table and no object markers); the message says why."""


@dataclass(frozen=True)
class GalleryConfig:
    """Options of :func:`write_gallery`.

    Attributes:
        title: page title (default: ``crm-batch run <folder name>``).
        link_expiry_s: lifetime of presigned links on object stores, seconds (1 .. 7 days).
        embed_models: ``"auto"`` (local runs: write ``gallery/models/<id>.js`` so models open from
            ``file://``), ``"always"`` (also on object stores, for pages downloaded and opened locally)
            or ``"never"``.
        max_embed_bytes: GLBs larger than this are not embedded (they still open over http(s)).
    """

    title: str | None = None
    link_expiry_s: int = MAX_LINK_EXPIRY_S
    embed_models: str = "auto"
    max_embed_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        if not isinstance(self.link_expiry_s, int) or not 1 <= self.link_expiry_s <= MAX_LINK_EXPIRY_S:
            raise ValueError(
                f"link_expiry_s must be an integer in [1, {MAX_LINK_EXPIRY_S}], got {self.link_expiry_s!r}"
            )
        if self.embed_models not in ("auto", "always", "never"):
            raise ValueError(f"embed_models must be 'auto', 'always' or 'never', got {self.embed_models!r}")
        if self.max_embed_bytes < 0:
            raise ValueError("max_embed_bytes must be >= 0")


# ------------------------------------------------------------------------------------------------ rows
def _as_dict(value: Any) -> dict:
    """A Parquet map (list of pairs), a dict or None -> dict."""
    if value is None:
        return {}
    return dict(value.items() if isinstance(value, dict) else value)


def gallery_rows(run_uri: str, storage_options: dict[str, Any] | None = None) -> tuple[list[dict], str]:
    """The run's results rows and where they were read from (``results.parquet`` or the markers).

    Raises:
        GalleryError: neither a readable results table nor any ``objects/<id>/result.json``.
    """
    results_uri = storage.join_uri(run_uri, "results.parquet")
    if storage.exists(results_uri, storage_options):
        return _read_results(results_uri, storage_options), "results.parquet"
    objects = storage.join_uri(run_uri, "objects")
    markers = [u for u in storage.list_files(objects, storage_options) if u.endswith("/result.json")]
    rows = []
    for uri, data in sorted(storage.read_many(markers, storage_options).items()):
        try:
            row = json.loads(data)
        except ValueError:
            log.warning("skipping unreadable marker %s", uri)
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            rows.append(row)
    if not rows:
        raise GalleryError(
            f"{run_uri} is not a batch run folder: no results.parquet and no objects/<id>/result.json "
            "(a run writes results.parquet when it ends; `python -m pipeline --out` folders have no gallery)"
        )
    return rows, "result.json markers"


def _read_results(uri: str, storage_options: dict[str, Any] | None) -> list[dict]:
    """Rows of a results table, whatever columns its writer knew (only ``id`` and ``status`` are needed:
    tables from before and after the ``qc_*`` columns both show)."""
    try:
        with storage.open_uri(uri, "rb", storage_options) as fh:
            table = pq.read_table(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise GalleryError(f"{uri}: not a readable Parquet file: {exc}") from exc
    missing = [c for c in ("id", "status") if c not in table.column_names]
    if missing:
        raise GalleryError(f"{uri}: not a results table (no column {', '.join(missing)})")
    return table.to_pylist()


class _Links:
    """Browser links to files of the run: relative (local run), ``file://`` or presigned (object stores)."""

    def __init__(self, run_uri: str, storage_options: dict[str, Any] | None, expiry_s: int):
        self.local = storage.is_local(run_uri)
        self.root = storage.local_path(run_uri).absolute() if self.local else None
        self.storage_options = storage_options
        self.expiry_s = expiry_s
        self.problems: dict[str, str] = {}

    def __call__(self, uri: str | None) -> str | None:
        if not uri:
            return None
        if storage.is_local(uri):
            if not self.local:
                return None  # a page on an object store cannot open files on this machine
            path = storage.local_path(uri).absolute()
            try:
                rel = path.relative_to(self.root)
            except ValueError:
                return path.as_uri()
            return urllib.parse.quote(rel.as_posix())
        proto = storage.protocol_of(uri)
        try:
            fs, path = storage.get_fs(uri, self.storage_options)
            return fs.sign(path, expiration=self.expiry_s)
        except Exception as exc:  # noqa: BLE001 - not every filesystem can sign (memory://, anonymous)
            self.problems.setdefault(proto, f"{type(exc).__name__}: {exc}")
            return None


def _has_qc(row: dict) -> bool:
    """Whether a results row carries a quality report (every report measures ``faces``)."""
    return any(row.get(f"qc_{name}") is not None for name in QC_VALUES)


def _qc_from_meta(rows: list[dict], folders: dict[str, str], names: dict[str, dict], so) -> dict[str, dict]:
    """QC columns read from ``meta.json`` for ok rows whose results carry none (written before the
    ``qc_*`` columns existed, or kept from such a run)."""
    wanted = {
        r["id"]: storage.join_uri(folders[r["id"]], names[r["id"]]["meta"])
        for r in rows
        if r.get("status") == "ok" and not _has_qc(r) and "meta" in names.get(r["id"], {})
    }
    if not wanted:
        return {}
    got = storage.read_many(list(wanted.values()), so)
    out = {}
    for obj_id, uri in wanted.items():
        try:
            out[obj_id] = qc_columns((json.loads(got[uri]) or {}).get("qc"))
        except (KeyError, ValueError, AttributeError):
            continue
    return out


def _card(row: dict, folder: str, names: dict[str, str], qc: dict, links: _Links) -> dict[str, Any]:
    files = {kind: storage.join_uri(folder, name) for kind, name in names.items()}
    error = None
    if row.get("status") != "ok":
        error = ": ".join(str(x) for x in (row.get("error_class"), row.get("error_message")) if x) or "failed"
    return {
        "id": row["id"],
        "status": row.get("status") or "failed",
        "error": error,
        "preview": links(files.get("preview")),
        "input": links(row.get("image_uri")),
        "glb": links(files.get("glb")),
        "model": None,
        "links": {label: u for kind, label in _LINKS if (u := links(files.get(kind)))},
        "qc": {name: qc.get(f"qc_{name}") for name in QC_VALUES},
        "flags": list(qc.get("qc_flags") or []),
        "notes": _as_dict(qc.get("qc_notes")),
    }


# ------------------------------------------------------------------------------------------- embedding
def _embed_models(run_uri: str, cards: list[dict], files: dict[str, str], cfg: GalleryConfig, so) -> int:
    """Write ``gallery/models/<id>.js`` for each card's GLB (only when it changed); drop stale ones."""
    models = storage.join_uri(run_uri, MODELS_DIR)
    written = 0
    keep = set()
    local = storage.is_local(run_uri)
    for card in cards:
        glb = files.get(card["id"])
        if not glb:
            continue
        target = storage.join_uri(models, f"{card['id']}.js")
        try:
            fs, path = storage.get_fs(glb, so)
            info = fs.info(path)
            if info.get("size", 0) > cfg.max_embed_bytes:
                continue
            if local:
                tpath = storage.local_path(target)
                if tpath.is_file() and tpath.stat().st_mtime >= Path(path).stat().st_mtime:
                    card["model"] = f"{MODELS_DIR}/{card['id']}.js"
                    keep.add(tpath.name)
                    continue
            data = base64.b64encode(storage.read_bytes(glb, so)).decode("ascii")
        except OSError as exc:
            log.warning("not embedding %s: %s", glb, exc)
            continue
        payload = (
            "window.crmGalleryModels = window.crmGalleryModels || {};\n"
            f'window.crmGalleryModels[{json.dumps(card["id"])}] = "{data}";\n'
        )
        storage.write_bytes_atomic(target, payload.encode("ascii"), so)
        card["model"] = f"{MODELS_DIR}/{card['id']}.js"
        keep.add(f"{card['id']}.js")
        written += 1
    if local:
        folder = storage.local_path(models)
        for stale in folder.glob("*.js") if folder.is_dir() else ():
            if stale.name not in keep:
                stale.unlink(missing_ok=True)
    return written


# ------------------------------------------------------------------------------------------------ page
def _asset(name: str) -> str:
    return resources.files("flows.gallery_assets").joinpath(name).read_text(encoding="utf-8")


def _script_safe(text: str) -> str:
    """JSON text that cannot end the ``<script>`` element it sits in."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


def _three_sources() -> str:
    sources = {f: _asset(f"three/{f}") for f, _ in THREE_LINK}
    return "window.CRM_THREE_SOURCES = " + _script_safe(json.dumps(sources)) + ";"


def render_page(payload: dict[str, Any]) -> str:
    """The gallery HTML for a page payload (``title``, ``run``, ``rows``, ...; see ``gallery.js``)."""
    parts = {
        "TITLE": _html_escape(payload["title"]),
        "STYLE": _asset("gallery.css"),
        "DATA": _script_safe(json.dumps(payload, separators=(",", ":"), default=str)),
        "THREE": _three_sources(),
        "SCRIPT": _asset("gallery.js"),
    }
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], _asset("gallery.html"))


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _publish(uri: str, data: bytes, so: dict[str, Any] | None) -> None:
    """Write the page atomically; on object stores through a local file of the same name, so the store
    records ``Content-Type: text/html`` (a browser then shows the page instead of downloading it)."""
    if storage.is_local(uri):
        storage.write_bytes_atomic(uri, data, so)
        return
    with tempfile.TemporaryDirectory(prefix="crm-gallery-") as tmp:
        local = Path(tmp) / posixpath.basename(uri)
        local.write_bytes(data)
        storage.put_file_atomic(local, uri, so)


def write_gallery(
    run_uri: str, storage_options: dict[str, Any] | None = None, config: GalleryConfig | None = None
) -> str:
    """Build ``<run_uri>/index.html`` (and, for local runs, the embedded models); returns its URI.

    Args:
        run_uri: a batch run's output folder (local path, ``file://``, ``s3://``, ...).
        storage_options: fsspec options of that storage.
        config: :class:`GalleryConfig`.

    Raises:
        GalleryError: the folder holds no results (see :func:`gallery_rows`).
    """
    cfg = config or GalleryConfig()
    t0 = time.perf_counter()
    rows, source = gallery_rows(run_uri, storage_options)
    links = _Links(run_uri, storage_options, cfg.link_expiry_s)
    folders = {r["id"]: storage.join_uri(run_uri, "objects", r["id"]) for r in rows}
    names = {
        r["id"]: {k: posixpath.basename(str(v)) for k, v in _as_dict(r.get("outputs")).items() if v}
        for r in rows
    }
    from_meta = _qc_from_meta(rows, folders, names, storage_options)
    cards = []
    glbs: dict[str, str] = {}
    for r in rows:
        qc = from_meta.get(r["id"], r)
        cards.append(_card(r, folders[r["id"]], names[r["id"]], qc, links))
        if "glb" in names[r["id"]]:
            glbs[r["id"]] = storage.join_uri(folders[r["id"]], names[r["id"]]["glb"])
    embed = cfg.embed_models == "always" or (cfg.embed_models == "auto" and storage.is_local(run_uri))
    embedded = _embed_models(run_uri, cards, glbs, cfg, storage_options) if embed else 0
    notice = []
    if not storage.is_local(run_uri):
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + cfg.link_expiry_s))
        notice.append(
            f"Links are presigned and work until {until}; rebuild with python -m flows.gallery {run_uri}."
        )
    for proto, why in links.problems.items():
        notice.append(f"{proto}:// links could not be signed ({why}); those files are not shown.")
    if source != "results.parquet":
        notice.append("This run has no results.parquet yet: rows come from the objects' result.json markers.")
    parts = [p for p in run_uri.split("://")[-1].rstrip("/").split("/") if p]
    name = "/".join(parts[-2:]) or run_uri
    payload = {
        "title": cfg.title or f"crm-batch run {name}",
        "run": run_uri,
        "generated_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "notice": " ".join(notice) or None,
        "flags": FLAGS,
        "values": _CARD_VALUES,
        "three_link": THREE_LINK,
        "rows": cards,
    }
    index_uri = storage.join_uri(run_uri, GALLERY_NAME)
    _publish(index_uri, render_page(payload).encode("utf-8"), storage_options)
    log.info(
        "gallery %s: %d rows (%s), %d models embedded now, %.1f s",
        index_uri, len(cards), source, embedded, time.perf_counter() - t0,
    )  # fmt: skip
    return index_uri


def gallery_link(
    index_uri: str, storage_options: dict[str, Any] | None = None, expiry_s: int = MAX_LINK_EXPIRY_S
) -> str:
    """An address a browser opens the page at: ``file://...`` locally, a presigned URL on object stores
    (the plain URI when the store cannot sign)."""
    if storage.is_local(index_uri):
        return storage.local_path(index_uri).absolute().as_uri()
    try:
        fs, path = storage.get_fs(index_uri, storage_options)
        return fs.sign(path, expiration=expiry_s)
    except Exception:  # noqa: BLE001 - not every filesystem can sign
        return index_uri


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.gallery",
        description="Write <RUN_URI>/index.html: a browsable page of a crm-batch run (cards, QC, viewer).",
    )
    p.add_argument("run_uri", metavar="RUN_URI", help="the run's output folder (path, file://, s3://, gs://)")
    p.add_argument("--storage-options", default=None, help="fsspec options as JSON (e.g. an endpoint_url)")
    p.add_argument(
        "--link-expiry-s",
        type=int,
        default=MAX_LINK_EXPIRY_S,
        help="lifetime of presigned links on object stores, seconds (at most 7 days)",
    )
    p.add_argument("--no-embed", action="store_true", help="do not write gallery/models/<id>.js (local runs)")
    p.add_argument("--title", default=None, help="page title")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; 0 on success, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        so = json.loads(args.storage_options) if args.storage_options else None
        if so is not None and not isinstance(so, dict):
            raise ValueError("--storage-options must be a JSON object")
        cfg = GalleryConfig(
            title=args.title,
            link_expiry_s=args.link_expiry_s,
            embed_models="never" if args.no_embed else "auto",
        )
        index = write_gallery(args.run_uri, so, cfg)
    except (GalleryError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(index)
    print(f"open: {gallery_link(index, so, args.link_expiry_s)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig(level=os.environ.get("CRM_LOG_LEVEL", "WARNING"))
    sys.exit(main())
