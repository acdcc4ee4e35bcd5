"""Evaluate predicted meshes against Google Scanned Objects ground truth.

``python -m evaluation.gso --pred DIR|RUN|URI --gt DIR [--out DIR]`` (``--help`` lists every option; the
protocol and the reasons for its choices are in ``docs/evaluation.md``).

Per object: load the GT mesh into the evaluation frame (longest side 1, bounding box centred, then
rotated about +Z by minus the table angle: the SyncDreamer frame of the GT renders), bring the
prediction into that frame (frame mapping), fit its bounding box onto the GT's own box, align it rigidly
(coarse yaw/pitch search + ICP, or none) and fit its box onto the GT's again, then

* geometry: Chamfer distance, F-score at several thresholds, volume IoU (ray parity and winding number);
* texture: unlit renders at the 16 GT cameras vs the GT renders on white: PSNR, SSIM, LPIPS-VGG, CLIP.

``--pred`` is a mesh folder or a batch output folder (``results.parquet`` + ``objects/<id>/``, local or
any fsspec URI), see :mod:`evaluation.predictions`. Geometry and rendering run per object (optionally
in a pool of ``--jobs`` processes); LPIPS and CLIP run in the main process on the returned renders so
their weights are loaded once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .alignment import AlignConfig, align, icp
from .geometry_metrics import (
    GeometryConfig,
    chamfer_fscore,
    inside_ray_parity,
    inside_winding_number,
    sample_surface,
    volume_iou,
)
from .mesh_loading import (
    FRAMES,
    EvalMesh,
    bounding_box,
    fit_box,
    frame_to_gt,
    load_mesh,
    normalize_unit,
    rotation_z,
)
from .predictions import open_predictions
from .report import group_skipped, write_report
from .results import GEOMETRY_COLUMNS, IMAGE_COLUMNS, METRIC_COLUMNS, ObjectScores, fail

__all__ = [
    "EvalConfig",
    "ObjectScores",
    "FITS",
    "GSO_DIR_ENV",
    "evaluate_object",
    "evaluate",
    "gt_box",
    "gt_objects",
    "align_to_gt",
    "read_angle_table",
    "load_gt_mesh",
    "main",
    "METRIC_COLUMNS",
    "GEOMETRY_COLUMNS",
    "IMAGE_COLUMNS",
]

NUM_VIEWS = 16
ANGLE_TABLE = "gt_rotate_angle_deg.json"
CAMERAS = Path("cameras") / "cameras_16_elev30.json"
GSO_DIR_ENV = "CRM_GSO_DIR"
# How the prediction's bounding box is fitted before and after alignment (docs/evaluation.md, "Frames").
FITS = ("gt-box", "unit")


@dataclass
class EvalConfig:
    """Protocol options (all recorded in the output metadata).

    Attributes:
        frame: frame of the predictions: ``"auto"`` (read the record our exporter writes into the GLB /
            OBJ, else ``default_frame``), or one of ``gltf``, ``reference``, ``ccm``, ``gt``.
        default_frame: frame assumed by ``auto`` when a file records none.
        fit: ``"gt-box"`` (default): the prediction's bounding box is fitted onto the GT's own box (longest
            side and centre) in the GT frame, so a prediction equal to the GT matches it exactly for every
            table angle; ``"unit"``: longest side 1 and centred (SyncDreamer's normalisation; the GT's box
            differs from it when the table angle is not a multiple of 90 degrees).
        geometry: sampling, F-score thresholds, IoU grid (:class:`GeometryConfig`).
        align: alignment options (:class:`AlignConfig`).
        images: compute the image metrics (needs GT renders and the rasterizer).
        supersample: render supersampling factor (antialiasing).
        raster: rasterizer backend for :func:`pipeline.raster.get_rasterizer`.
        device: torch device for rendering / LPIPS / CLIP (None: CPU, or CUDA for nvdiffrast).
        lpips: compute LPIPS; lpips_vgg / lpips_lin: weight files (None: standard caches).
        clip: compute CLIP similarity; clip_model: HF id or local directory (offline only).
        iou_methods: which volume IoU inside tests to run.
    """

    frame: str = "auto"
    default_frame: str = "gltf"
    fit: str = "gt-box"
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    images: bool = True
    supersample: int = 2
    raster: str = "auto"
    device: str | None = None
    lpips: bool = True
    lpips_vgg: str | None = None
    lpips_lin: str | None = None
    clip: bool = True
    clip_model: str = "openai/clip-vit-large-patch14"
    iou_methods: tuple[str, ...] = ("parity", "winding")


def read_angle_table(gt_root: str | Path) -> dict[str, float]:
    """``gt_rotate_angle_deg.json`` of a GT folder: object name -> rotation about +Z in degrees.

    Raises:
        FileNotFoundError: the file is missing; ValueError: it is not a JSON object of numbers.
    """
    path = Path(gt_root) / ANGLE_TABLE
    if not path.is_file():
        raise FileNotFoundError(f"ground truth has no {ANGLE_TABLE}: {path}")
    table = json.loads(path.read_text())
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object name -> angle in degrees")
    return {str(k): float(v) for k, v in table.items()}


def load_gt_mesh(gt_root: Path, name: str, angle_deg: float) -> EvalMesh:
    """GT mesh of ``name``: normalised (longest side 1, bbox centred), rotated by ``Rz(-angle)``."""
    m = load_mesh(Path(gt_root) / "objects" / name / "model.obj")
    v, _, _ = normalize_unit(m.vertices)
    return EvalMesh(v @ rotation_z(-angle_deg).T, m.faces)


def gt_box(gt: EvalMesh, fit: str = "gt-box") -> tuple[float, np.ndarray]:
    """Target box ``(longest side, centre)`` a prediction is fitted onto (see :class:`EvalConfig.fit`)."""
    if fit == "gt-box":
        return bounding_box(gt.vertices)
    if fit == "unit":
        return 1.0, np.zeros(3)
    raise ValueError(f"unknown fit {fit!r}; expected one of {FITS}")


def prediction_to_gt_frame(
    mesh: EvalMesh,
    frame: str,
    default_frame: str,
    extent: float = 1.0,
    centre: np.ndarray | None = None,
) -> tuple[EvalMesh, str]:
    """Rotate a prediction into the GT frame and fit its box onto ``(extent, centre)``.

    Returns the mesh and the frame used.
    """
    used = frame
    if frame == "auto":
        used = mesh.frame if mesh.frame in FRAMES else default_frame
    m = mesh.transformed(frame_to_gt(used))
    m.vertices, _, _ = fit_box(m.vertices, extent, centre)
    return m, used


def _occupancy(mesh: EvalMesh, method: str, cfg: GeometryConfig) -> np.ndarray:
    if method == "parity":
        return inside_ray_parity(mesh.vertices, mesh.faces, cfg.iou_resolution, cfg.iou_range)
    if method == "winding":
        return inside_winding_number(
            mesh.vertices,
            mesh.faces,
            cfg.iou_resolution,
            cfg.iou_range,
            beta=cfg.winding_beta,
            method=cfg.winding_method,
        )
    raise ValueError(f"unknown IoU method {method!r}")


def _similarity(scale: float = 1.0, rotation: np.ndarray | None = None, translation=None) -> np.ndarray:
    """``(4, 4)`` matrix of ``p -> scale * rotation @ p + translation``."""
    m = np.eye(4)
    m[:3, :3] = scale * (np.eye(3) if rotation is None else rotation)
    if translation is not None:
        m[:3, 3] = translation
    return m


def _apply(mesh: EvalMesh, pts: np.ndarray, m: np.ndarray) -> tuple[EvalMesh, np.ndarray]:
    return mesh.transformed(m[:3, :3], m[:3, 3]), pts @ m[:3, :3].T + m[:3, 3]


def align_to_gt(
    pred: EvalMesh,
    ps: np.ndarray,
    pn: np.ndarray,
    gs: np.ndarray,
    gn: np.ndarray,
    extent: float,
    centre: np.ndarray,
    cfg: EvalConfig,
) -> tuple[EvalMesh, np.ndarray, dict]:
    """Align a prediction (GT frame, box fitted onto ``(extent, centre)``) to the GT.

    With ``cfg.align.method == "none"`` nothing moves. Otherwise (docs/evaluation.md, "Alignment"):

    1. ``fit == "gt-box"``: scale the prediction about its sample centroid so that the RMS distance of
       its samples from their centroid equals the GT's, and move the centroid onto the GT's (a size
       that does not depend on the pose, so the search sees the right size whatever the prediction's
       yaw; a bounding box does depend on it). ``fit == "unit"`` keeps the unit box here.
    2. Coarse yaw/pitch search + ICP (:func:`evaluation.alignment.align`).
    3. Fit the bounding box onto ``(extent, centre)`` again in the aligned pose, then one more ICP run.

    Args:
        pred: mesh; ps, pn: its ``(N, 3)`` samples and their normals; gs, gn: the GT's.

    Returns:
        The moved mesh, its moved samples, and the alignment record (``matrix``: the composed 4x4
        transform from the box-fitted prediction, coarse start, rotation angle, residual, fit).
    """
    fit = {"mode": cfg.fit, "extent": float(extent), "centre": np.round(centre, 9).tolist()}
    if cfg.align.method == "none":
        return pred, ps, {**align(ps, gs, cfg.align).to_dict(), "fit": fit}
    total = np.eye(4)
    if cfg.fit == "gt-box":
        pc, gc = ps.mean(0), gs.mean(0)
        s0 = float(np.sqrt(((gs - gc) ** 2).sum(1).mean() / ((ps - pc) ** 2).sum(1).mean()))
        m = _similarity(s0, translation=gc - s0 * pc)
        pred, ps = _apply(pred, ps, m)
        total = m @ total
        fit["size_match_scale"] = s0
    al = align(ps, gs, cfg.align, pn, gn)
    m = _similarity(1.0, al.rotation, al.translation)
    pred, ps = _apply(pred, ps, m)
    pn = pn @ al.rotation.T
    total = m @ total
    # A rotation changes the bounding box: fit the box again in the aligned pose, then refine.
    _, scale, shift = fit_box(pred.vertices, extent, centre)
    m = _similarity(scale, translation=shift)
    pred, ps = _apply(pred, ps, m)
    total = m @ total
    a = cfg.align
    r2, t2, resid = icp(
        ps, gs, np.eye(3), np.zeros(3), a.icp_iters, a.icp_tol, a.icp_points, a.seed + 2, pn, gn
    )
    m = _similarity(1.0, r2, t2)
    pred, ps = _apply(pred, ps, m)
    total = m @ total
    rec = al.to_dict()
    rec.update(
        matrix=np.round(total, 6).tolist(), renormalize_scale=float(scale), residual=float(resid), fit=fit
    )
    return pred, ps, rec


def evaluate_object(name: str, gt_root: str | Path, pred_path: str | Path, cfg: EvalConfig) -> ObjectScores:
    """Geometry metrics and prediction renders of one object (LPIPS / CLIP are added by the caller).

    Never raises for bad data: failures are recorded in ``status`` / ``reason``. ``seconds`` holds the
    wall time of the stages and ``cpu`` (process CPU time of the whole object, all threads).
    """
    gt_root = Path(gt_root)
    res = ObjectScores(name)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        angle = read_angle_table(gt_root).get(name, 0.0)
        gt = load_gt_mesh(gt_root, name, angle)
        extent, centre = gt_box(gt, cfg.fit)
    except Exception as exc:
        return fail(res, "ground truth", exc)
    try:
        raw = load_mesh(pred_path)
        pred, res.frame = prediction_to_gt_frame(raw, cfg.frame, cfg.default_frame, extent, centre)
    except Exception as exc:
        return fail(res, "prediction", exc)
    gcfg = cfg.geometry
    try:
        ps, pn = sample_surface(pred.vertices, pred.faces, gcfg.num_samples, gcfg.seed, return_normals=True)
        gs, gn = sample_surface(gt.vertices, gt.faces, gcfg.num_samples, gcfg.seed, return_normals=True)
        pred, ps, res.alignment = align_to_gt(pred, ps, pn, gs, gn, extent, centre, cfg)
        res.seconds["align"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        cd, fs = chamfer_fscore(ps, gs, gcfg.fscore_thresholds, gcfg.workers)
        res.metrics["chamfer"] = float(cd)
        res.fscores = {t: float(v) for t, v in fs.items()}
        res.metrics["fscore"] = res.fscores.get(float(gcfg.headline_threshold))
        for method in cfg.iou_methods:
            occ_p = _occupancy(pred, method, gcfg)
            occ_g = _occupancy(gt, method, gcfg)
            res.metrics[f"iou_{method}"] = float(volume_iou(occ_p, occ_g))
        res.seconds["geometry"] = time.perf_counter() - t1
    except Exception as exc:
        return fail(res, "geometry", exc)
    if cfg.images:
        t2 = time.perf_counter()
        try:
            _render_and_compare(res, pred, gt_root, name, cfg)
        except Exception as exc:
            fail(res, "images", exc)
        res.seconds["images"] = time.perf_counter() - t2
    res.seconds["total"] = time.perf_counter() - t0
    res.seconds["cpu"] = time.process_time() - c0
    return res


def _render_and_compare(res: ObjectScores, pred: EvalMesh, gt_root: Path, name: str, cfg: EvalConfig) -> None:
    # Deferred: torch and the rasterizer load only when image metrics run, so geometry-only runs and
    # their worker processes start without them (about 1.5 s of imports per process).
    from pipeline.raster import get_rasterizer

    from .image_metrics import load_views, psnr, ssim
    from .rendering import load_cameras, orbit_cameras, render_views

    res.gt_views = load_views(gt_root / "objects" / name / "renders", NUM_VIEWS)
    cam_file = gt_root / CAMERAS
    cams = load_cameras(cam_file) if cam_file.is_file() else orbit_cameras(NUM_VIEWS)
    key = (cfg.raster, cfg.device)
    if key not in _RAST:
        _RAST[key] = get_rasterizer(cfg.raster, device=cfg.device)
    res.renders, _ = render_views(pred, cams, _RAST[key], supersample=cfg.supersample)
    res.metrics["psnr"] = float(psnr(res.renders, res.gt_views).mean())
    res.metrics["ssim"] = float(ssim(res.renders, res.gt_views).mean())


_RAST: dict = {}


def _worker(args) -> ObjectScores:
    name, gt_root, pred_path, cfg = args
    try:
        return evaluate_object(name, gt_root, pred_path, cfg)
    except Exception as exc:  # defensive: a worker must always answer
        return fail(ObjectScores(name), "internal", f"{exc}\n{traceback.format_exc(limit=3)}")


_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _one_thread_env():
    """Thread-pool sizes of 1 in the environment while worker processes start (restored after).

    numpy's BLAS and torch size their pools from these variables when they load, which in a spawned
    worker happens before any initializer could run.
    """
    saved = {k: os.environ.get(k) for k in _THREAD_ENV}
    os.environ.update({k: "1" for k in _THREAD_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init_worker(images: bool) -> None:
    """Worker process set-up: one torch thread (the processes already share the cores)."""
    if images:
        import torch

        torch.set_num_threads(1)


def gt_objects(gt_root: Path) -> list[str]:
    """Object names with a folder under ``gt_root/objects``."""
    d = Path(gt_root) / "objects"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


@dataclass
class ImageModels:
    """LPIPS / CLIP models (None where unavailable) and why a column is empty."""

    lpips: object | None = None
    clip: object | None = None
    notes: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def load_image_models(cfg: EvalConfig) -> ImageModels:
    """Load the LPIPS and CLIP models that are enabled and available; record reasons otherwise."""
    im = ImageModels()
    if not cfg.images:
        im.notes["lpips"] = im.notes["clip"] = "image metrics disabled (--no-images)"
        return im
    # Deferred like the renders: torch / transformers load only when image metrics run.
    if cfg.lpips:
        from .lpips_vgg import find_lpips_weights, load_lpips_vgg

        try:
            im.lpips = load_lpips_vgg(cfg.lpips_vgg, cfg.lpips_lin)
            vgg, lin = find_lpips_weights(cfg.lpips_vgg, cfg.lpips_lin)
            im.files["lpips"] = {"vgg": str(vgg), "lin": str(lin)}
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
            im.notes["lpips"] = str(exc)
    else:
        im.notes["lpips"] = "disabled (--no-lpips)"
    if cfg.clip:
        from .clip_similarity import load_clip

        try:
            im.clip = load_clip(cfg.clip_model)
            im.files["clip"] = cfg.clip_model
        except FileNotFoundError as exc:
            im.notes["clip"] = str(exc)
    else:
        im.notes["clip"] = "disabled (--no-clip)"
    return im


def add_model_metrics(res: ObjectScores, models: ImageModels) -> None:
    """Fill LPIPS and CLIP columns of ``res`` from its renders (in place)."""
    if res.renders is None or res.gt_views is None:
        return
    if models.lpips is not None:
        from .lpips_vgg import lpips_distance

        res.metrics["lpips"] = float(lpips_distance(models.lpips, res.renders, res.gt_views).mean())
    if models.clip is not None:
        from .clip_similarity import clip_similarity

        res.metrics["clip"] = float(clip_similarity(models.clip, res.renders, res.gt_views).mean())


def _run_tasks(tasks: list, cfg: EvalConfig, jobs: int, models: ImageModels, bar) -> list[ObjectScores]:
    """Evaluate ``tasks`` (in a process pool for ``jobs > 1``); results in task order."""
    results: list[ObjectScores | None] = [None] * len(tasks)

    def done(i: int, res: ObjectScores) -> None:
        add_model_metrics(res, models)
        results[i] = res
        bar.update(1)

    if jobs > 1 and len(tasks) > 1:
        # spawn: a clean interpreter per worker (no inherited thread pools or locks); one KD-tree query
        # thread, one torch thread and single-threaded BLAS / OpenMP per process: the processes already
        # use the cores (OpenBLAS threads spinning beside a second process cost that process its core).
        one = replace(cfg, geometry=replace(cfg.geometry, workers=1))
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=min(jobs, len(tasks)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(cfg.images,),
        )
        with pool:
            with _one_thread_env():  # the workers start during the first submits and read it at start-up
                futures = {pool.submit(_worker, (n, g, p, one)): i for i, (n, g, p, _) in enumerate(tasks)}
            for fut in as_completed(futures):
                i = futures[fut]
                try:
                    res = fut.result()
                except Exception as exc:  # a worker process died (e.g. killed for memory)
                    res = fail(ObjectScores(tasks[i][0]), "internal", exc)
                done(i, res)
    else:
        for i, task in enumerate(tasks):
            done(i, _worker(task))
    return [r for r in results if r is not None]


def evaluate(
    pred: str | Path,
    gt_root: str | Path,
    cfg: EvalConfig,
    objects: list[str] | None = None,
    jobs: int = 1,
    progress: bool = True,
    models: ImageModels | None = None,
    storage_options: dict | None = None,
) -> dict:
    """Evaluate every ground-truth object that has a prediction in ``pred``.

    Args:
        pred: a mesh folder, or a batch output folder / URI (``results.parquet`` + ``objects/<id>/``).
        gt_root: ground-truth folder (layout in docs/evaluation.md).
        objects: restrict to these object names.
        jobs: worker processes over objects.
        storage_options: fsspec options for a remote ``pred``.

    Returns:
        ``{"results": [ObjectScores], "only_pred": [...], "only_gt": [...], "skipped": [{id, status,
        reason}], "pred_kind": "folder"|"batch", "batch_rows": int, "notes": {...}, "files": {...},
        "seconds": float}`` (results in ground-truth name order).

    Raises:
        FileNotFoundError: ``pred`` or the ground-truth folder (``objects/``, angle table) is missing.
    """
    gt_root = Path(gt_root)
    if not (gt_root / "objects").is_dir():
        raise FileNotFoundError(f"ground-truth folder has no objects/ folder: {gt_root}")
    read_angle_table(gt_root)
    gt_names = gt_objects(gt_root)
    if objects:
        gt_names = [n for n in gt_names if n in objects]
    t0 = time.perf_counter()
    with open_predictions(pred, gt_names, objects, storage_options) as preds:
        models = models if models is not None else load_image_models(cfg)
        tasks = [(n, str(gt_root), str(p), cfg) for n, p in preds.paths.items()]
        bar = tqdm(total=len(tasks), desc="gso eval", unit="obj", disable=not progress)
        try:
            results = _run_tasks(tasks, cfg, max(1, jobs), models, bar)
        finally:
            bar.close()
    return {
        "results": results,
        "only_pred": preds.only_pred,
        "only_gt": preds.only_gt,
        "skipped": preds.skipped,
        "pred_kind": preds.kind,
        "batch_rows": preds.rows,
        "notes": models.notes,
        "files": models.files,
        "seconds": time.perf_counter() - t0,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.gso",
        description=(
            "Score predicted meshes against Google Scanned Objects ground truth: Chamfer distance, "
            "F-score, volume IoU (geometry) and PSNR, SSIM, LPIPS, CLIP similarity of renders at the 16 "
            "GT cameras (texture). Writes per-object CSV/JSON, a Markdown table, plots and metadata. "
            "Protocol: docs/evaluation.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--pred",
        required=True,
        help="predictions: a mesh folder (<name>.glb|.obj|.gltf|.ply, or <name>/ holding one mesh; GLB "
        "preferred), or a batch output folder / URI, e.g. s3://bucket/run (results.parquet + objects/<id>/: "
        "the ok rows whose id is a GT object are scored, the report lists the other rows and why)",
    )
    p.add_argument(
        "--gt",
        default=None,
        help=f"ground-truth folder: objects/<name>/{{model.obj,renders/000..015.png}}, "
        f"{ANGLE_TABLE}, optionally cameras/cameras_16_elev30.json (docs/evaluation.md says where to get "
        f"GSO-30); "
        f"default: ${GSO_DIR_ENV}",
    )
    p.add_argument(
        "--storage-options",
        default=None,
        help='JSON object of fsspec options for a remote --pred, e.g. \'{"endpoint_url": '
        '"http://127.0.0.1:9000"}\' (keep keys in the environment: AWS_ACCESS_KEY_ID, ...)',
    )
    p.add_argument("--out", default=str(Path("out") / "eval-gso"), help="output folder")
    p.add_argument("--objects", default=None, help="comma-separated subset of object names")
    p.add_argument(
        "--frame",
        default="auto",
        choices=["auto", *FRAMES],
        help="frame of the predictions: auto reads the record our exporter writes (GLB asset.extras, OBJ "
        "header); gltf = Y up, front +Z; reference = CRM's export, Y up, front -Z; ccm = Z up, front +Y; "
        "gt = already in the GT frame",
    )
    p.add_argument(
        "--default-frame",
        default="gltf",
        choices=list(FRAMES),
        help="frame assumed by --frame auto when a file records none",
    )
    p.add_argument(
        "--fit",
        default="gt-box",
        choices=list(FITS),
        help="gt-box: fit the prediction's bounding box onto the GT's own box (a prediction equal to the GT "
        "scores at the sampling floor for every table angle); unit: longest side 1, centred (SyncDreamer's "
        "normalisation: wrong for table angles that are not multiples of 90 degrees)",
    )
    p.add_argument(
        "--align",
        default="icp",
        choices=["icp", "none"],
        help="icp: coarse yaw/pitch search then rigid ICP (transform reported per object); none: frames only",
    )
    p.add_argument("--samples", type=int, default=100_000, help="surface samples per mesh (Chamfer, F-score)")
    p.add_argument("--seed", type=int, default=0, help="seed of surface sampling and alignment subsampling")
    p.add_argument(
        "--fscore-thresholds",
        default="0.01,0.02,0.05",
        help="F-score distance thresholds in the unit frame (longest side 1), comma-separated",
    )
    p.add_argument("--headline-threshold", type=float, default=0.02, help="threshold of the 'fscore' column")
    p.add_argument(
        "--iou-resolution", type=int, default=64, help="volume IoU grid nodes per axis over [-1,1]^3"
    )
    p.add_argument(
        "--iou-methods",
        default="parity,winding",
        help="volume IoU inside tests: parity (ray crossing parity, published-number compatible) and/or "
        "winding (generalised winding number, robust to holes)",
    )
    p.add_argument(
        "--winding-method",
        default="fast",
        choices=["fast", "exact", "tree"],
        help="evaluation of the winding number test: fast (exact via signed ray crossings + boundary cap), "
        "exact (all solid angles, slow reference), tree (BVH dipole approximation)",
    )
    p.add_argument("--no-images", action="store_true", help="skip rendering and all image metrics")
    p.add_argument("--supersample", type=int, default=2, help="render supersampling factor (antialiasing)")
    p.add_argument(
        "--raster", default="auto", choices=["auto", "torch", "nvdiffrast"], help="rasterizer backend"
    )
    p.add_argument(
        "--device", default=None, help="torch device for rendering, LPIPS and CLIP (e.g. cpu, cuda)"
    )
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    p.add_argument(
        "--lpips-vgg",
        default=None,
        help="torchvision VGG16 weights vgg16-397923af.pth (default: $TORCH_HOME/hub/checkpoints)",
    )
    p.add_argument(
        "--lpips-lin",
        default=None,
        help="LPIPS v0.1 linear-layer weights vgg.pth (default: an installed lpips package's weights/v0.1)",
    )
    p.add_argument("--no-clip", action="store_true", help="skip CLIP similarity")
    p.add_argument(
        "--clip-model",
        default="openai/clip-vit-large-patch14",
        help="transformers CLIPModel: Hugging Face id (read from the local cache only) or local directory",
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="worker processes over objects (results do not depend on it)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def config_from_args(a: argparse.Namespace) -> EvalConfig:
    thresholds = tuple(float(x) for x in a.fscore_thresholds.split(",") if x.strip())
    if a.headline_threshold not in thresholds:
        thresholds = tuple(sorted({*thresholds, a.headline_threshold}))
    methods = tuple(m.strip() for m in a.iou_methods.split(",") if m.strip())
    for m in methods:
        if m not in ("parity", "winding"):
            raise SystemExit(f"--iou-methods: unknown method {m!r} (expected parity, winding)")
    return EvalConfig(
        frame=a.frame,
        default_frame=a.default_frame,
        fit=a.fit,
        geometry=GeometryConfig(
            num_samples=a.samples,
            seed=a.seed,
            fscore_thresholds=thresholds,
            headline_threshold=a.headline_threshold,
            iou_resolution=a.iou_resolution,
            winding_method=a.winding_method,
        ),
        align=AlignConfig(method=a.align, seed=a.seed),
        images=not a.no_images,
        supersample=a.supersample,
        raster=a.raster,
        device=a.device,
        lpips=not a.no_lpips,
        lpips_vgg=a.lpips_vgg,
        lpips_lin=a.lpips_lin,
        clip=not a.no_clip,
        clip_model=a.clip_model,
        iou_methods=methods,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 some objects failed or none scored, 2 bad input)."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    gt = args.gt or os.environ.get(GSO_DIR_ENV)
    if not gt:
        print(
            f"error: no ground truth: pass --gt DIR or set ${GSO_DIR_ENV} to a GSO folder "
            f"(objects/<name>/model.obj + renders/, {ANGLE_TABLE}; see docs/evaluation.md)",
            file=sys.stderr,
        )
        return 2
    storage_options = None
    if args.storage_options:
        try:
            storage_options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            print(f"error: --storage-options is not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(storage_options, dict):
            print("error: --storage-options must be a JSON object", file=sys.stderr)
            return 2
    objects = [o.strip() for o in args.objects.split(",")] if args.objects else None
    try:
        run = evaluate(
            args.pred,
            gt,
            cfg,
            objects,
            max(1, args.jobs),
            progress=not args.quiet,
            storage_options=storage_options,
        )
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    meta = {
        "command": ["python", "-m", "evaluation.gso", *(argv if argv is not None else sys.argv[1:])],
        "jobs": max(1, args.jobs),
    }
    paths = write_report(
        run, cfg, args.out, pred_dir=args.pred, gt_dir=gt, plots=not args.no_plots, extra=meta
    )
    results = run["results"]
    ok = [r for r in results if r.status == "ok"]
    print(f"evaluated {len(results)} objects ({len(ok)} ok) in {run['seconds']:.1f} s -> {paths['markdown']}")
    print(f"  report page: {paths['html'].resolve().as_uri()}")
    for r in results:
        if r.status != "ok":
            print(f"  failed {r.name}: {r.reason}")
    if run["pred_kind"] == "batch":
        print(f"  batch run: {run['batch_rows']} rows, {len(run['skipped'])} not scored")
        for reason, ids in group_skipped(run["skipped"]).items():
            shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
            print(f"    {len(ids)} skipped ({reason}): {shown}")
    if run["only_pred"]:
        print(f"  predictions without ground truth (skipped): {', '.join(run['only_pred'])}")
    if run["only_gt"]:
        print(f"  ground truth without prediction (skipped): {', '.join(run['only_gt'])}")
    for col, note in run["notes"].items():
        print(f"  {col} column empty: {note}")
    if not results:
        print("no object found on both sides", file=sys.stderr)
        return 1
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
