"""The CPU part of the pipeline: clean -> UV unwrap + bake -> quality checks -> export, into the destination.

``finalize(obj, destination, options)`` needs no model: a `GeneratedObject` (possibly from another
process) in, one folder of files out. The folder is published atomically by the destination:

* a local folder (a path): files are written into a hidden sibling and renamed into place
  (``pipeline.outputs.destination.LocalDestination``), replacing an earlier folder of the same id;
* anything with the ``Destination`` interface, e.g. the batch job's object-store destination
  (``flows.io.storage.StorageDestination``), which uploads each file once to its final key.

The result names the files relative to the published folder (``ObjectResult.outputs``) and says
where that folder is (``ObjectResult.location``). The quality checks (``pipeline.qc``, thresholds in a
`QCConfig`) compare the finished mesh with the preprocessed input the object carries
(``GeneratedObject.input_rgba``); their report goes into ``meta.json`` (``"qc"``) and
``ObjectResult.qc``. They never fail an object: a flagged object is still ``ok``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import traceback
from pathlib import Path

import numpy as np
import torch

from crm_models.recon.color_field import colors_to_unit
from pipeline.mesh.cleaning import CleaningConfig, clean_mesh
from pipeline.mesh.types import VertexColorMesh
from pipeline.options import PipelineOptions
from pipeline.outputs.destination import Destination, as_destination
from pipeline.outputs.export import ExportConfig, export_glb, export_obj
from pipeline.outputs.meta import build_meta
from pipeline.outputs.preview import save_preview_png
from pipeline.outputs.views_image import views_png_bytes
from pipeline.qc import QCConfig, run_quality_checks
from pipeline.raster import get_rasterizer
from pipeline.results import GeneratedObject, ObjectResult, PipelineError
from pipeline.texturing.bake import BakeConfig, bake_texture
from pipeline.texturing.unwrap import UnwrapConfig
from pipeline.timing import timed

__all__ = ["OUTPUT_FILES", "colour_mesh", "finalize", "outward"]

log = logging.getLogger(__name__)

OUTPUT_FILES = {
    "glb": "mesh.glb",
    "obj": "mesh.obj",
    "mtl": "mesh.mtl",
    "texture": "mesh.png",
    "views": "views.png",
    "preview": "preview.png",
    "meta": "meta.json",
}


def outward(faces: np.ndarray) -> np.ndarray:
    """Reverse the winding of each face (FlexiCubes' raw inward normals -> outward)."""
    return np.ascontiguousarray(np.asarray(faces)[:, ::-1]).astype(np.int64)


def _checked_mesh(obj: GeneratedObject) -> tuple[np.ndarray, np.ndarray]:
    verts = np.asarray(obj.vertices, dtype=np.float32)
    faces = np.asarray(obj.faces, dtype=np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise PipelineError(
            f"reconstruction produced no usable mesh ({len(verts)} vertices, {len(faces)} faces)"
        )
    return verts, faces


def colour_mesh(vertices, faces_out, color_field, options: PipelineOptions, rasterizer):
    """Texture (UV unwrap + bake) -> `TexturedMesh`, or per-vertex colours -> `VertexColorMesh`.

    `rasterizer` (used only for the bake) should live on ``options.finalize_device()``.
    """
    if options.vertex_colors:
        with torch.inference_mode():
            raw = color_field(torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)))
        return VertexColorMesh(vertices, faces_out, colors_to_unit(raw).float().cpu().numpy())
    # The (CPU) colour field follows the rasterizer so the per-texel MLP queries run on the same device, as a
    # moved copy: `Module.to` works in place, and the caller's object must stay as it was (e.g. still
    # picklable to a CPU-only process after a GPU bake).
    if isinstance(color_field, torch.nn.Module) and torch.device(rasterizer.device).type != "cpu":
        color_field = copy.deepcopy(color_field).to(rasterizer.device)
    field_device = getattr(color_field, "device", torch.device("cpu"))

    def color_fn(points: torch.Tensor) -> torch.Tensor:
        return color_field(points.to(field_device)).to(points.device)

    unwrap_cfg = (
        UnwrapConfig() if options.max_faces is None else UnwrapConfig(max_faces=int(options.max_faces))
    )
    cfg = BakeConfig(texture_size=options.texture_size, unwrap=unwrap_cfg)
    return bake_texture(vertices, faces_out, color_fn, cfg, rasterizer=rasterizer)


def _write_files(
    folder: Path, obj: GeneratedObject, mesh, options: PipelineOptions, rasterizer, timings
) -> dict:
    """Every output file of one object into `folder`; returns kind -> file name."""
    outputs: dict[str, str] = {}
    export_cfg = ExportConfig(frame=options.frame)
    with timed(timings, "export"):
        export_glb(mesh, folder / OUTPUT_FILES["glb"], export_cfg)
        outputs["glb"] = OUTPUT_FILES["glb"]
        if options.write_obj:
            export_obj(mesh, folder / OUTPUT_FILES["obj"], export_cfg)
            outputs.update(
                {
                    k: OUTPUT_FILES[k]
                    for k in ("obj", "mtl", "texture")
                    if (folder / OUTPUT_FILES[k]).is_file()
                }
            )
    with timed(timings, "views"):
        (folder / OUTPUT_FILES["views"]).write_bytes(views_png_bytes(obj.views_strip, obj.ccm_strip))
        outputs["views"] = OUTPUT_FILES["views"]
    if options.write_preview:
        with timed(timings, "preview"):
            save_preview_png(
                mesh, folder / OUTPUT_FILES["preview"], size=options.preview_size, rasterizer=rasterizer
            )
        outputs["preview"] = OUTPUT_FILES["preview"]
    return outputs


def finalize(
    obj: GeneratedObject,
    destination: str | os.PathLike | Destination,
    options: PipelineOptions,
    qc: QCConfig | None = None,
) -> ObjectResult:
    """CPU part: clean, unwrap + bake, check, export everything into the destination's ``<obj.id>/`` folder.

    Writes ``mesh.glb``, ``mesh.obj`` + ``mesh.mtl`` + ``mesh.png`` (unless ``write_obj`` is off;
    no PNG in vertex-colour mode), ``views.png``, ``preview.png`` (unless ``write_preview`` is off)
    and ``meta.json``. Never raises for a per-object problem: returns a failed `ObjectResult` and
    publishes nothing (an earlier complete folder of the same id is kept).

    Args:
        qc: quality-check options and thresholds (default ``QCConfig()``; ``QCConfig(enabled=False)``
            skips them).
    """
    qc = qc or QCConfig()
    dest = as_destination(destination)
    timings = dict(obj.timings)
    try:
        verts, faces = _checked_mesh(obj)
        if options.clean:
            with timed(timings, "clean"):
                verts, faces = clean_mesh(verts, faces, CleaningConfig())
            if len(faces) == 0:
                raise PipelineError(
                    "mesh cleaning removed every face (the reconstructed surface is all floaters)"
                )
        with timed(timings, "bake"):
            # One rasterizer for the bake, the quality checks and the preview, on the options' device (CUDA
            # when available with device="auto"); none when nothing needs one.
            rasterizer = None
            if not options.vertex_colors or options.write_preview or qc.enabled:
                rasterizer = get_rasterizer("auto", device=options.finalize_device())
            mesh = colour_mesh(verts, outward(faces), obj.color_field, options, rasterizer)
        with timed(timings, "qc"):
            report = run_quality_checks(mesh, obj.input_rgba, qc, rasterizer)
        mesh_info = {
            "vertices": int(len(mesh.vertices)),
            "faces": int(len(mesh.faces)),
            "texture_size": None if options.vertex_colors else options.texture_size,
            "vertex_colors": bool(options.vertex_colors),
            "frame": options.frame,
        }
        with dest.staging(obj.id) as folder:
            outputs = _write_files(folder, obj, mesh, options, rasterizer, timings)
            outputs["meta"] = OUTPUT_FILES["meta"]
            timings["total"] = sum(v for k, v in timings.items() if k != "total")
            meta = build_meta(
                obj_id=obj.id,
                seed=obj.seed,
                options=options.to_dict(),
                options_hash=options.options_hash(),
                weights_identity=obj.weights_identity,
                timings=timings,
                outputs=dict(outputs),
                input_info=obj.input_info,
                mesh_info=mesh_info,
                device_info=obj.device,
                qc=report,
            )
            (folder / OUTPUT_FILES["meta"]).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        log.info(
            "%s: %d faces, %d vertices, QC flags: %s",
            obj.id, mesh_info["faces"], mesh_info["vertices"], ", ".join(report["flags"]) or "none",
        )  # fmt: skip
        return ObjectResult(
            obj.id,
            "ok",
            outputs=outputs,
            location=dest.location(obj.id),
            timings=timings,
            mesh=mesh_info,
            qc=report,
        )
    except Exception as exc:  # per-object isolation: report, publish nothing
        log.debug("finalize %s failed:\n%s", obj.id, traceback.format_exc())
        return ObjectResult.failure(obj.id, exc, timings=timings)
