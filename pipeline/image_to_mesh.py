"""One image -> one textured mesh: the end-to-end CRM pipeline.

    preprocess -> stage 1 (six RGB views) -> stage 2 (six CCMs) -> reconstruction (triplane ->
    FlexiCubes mesh + colour field)   ==== GPU part: `ImageToMeshPipeline.generate` ====
    -> clean -> UV unwrap + bake -> GLB / OBJ / views.png / preview.png / meta.json
                                      ==== CPU part: `finalize` (module level, no model) ====

Hand-offs (SPEC recon §2.1, multiview §5.3): both diffusion stages return a (R, 6R, 3) uint8 strip
of the views with dataset indices 001, 002, 003, 004, 005, 000 (left, bottom, back, right, top,
front), CCM channels in PNG order (R, G, B) = (X, Y, Z); the reconstruction model takes both strips
as they are (it reorders slices and swaps CCM channels itself). The mesh comes out of FlexiCubes in
the CCM frame with inward winding; `finalize` reverses the winding before baking/exporting.

`generate` returns picklable `GeneratedObject`s (numpy arrays and a CPU `TriplaneColorField`), so
the GPU part and the CPU part can run in different processes. `run` chains both with per-image
error isolation and atomic output folders.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import time
import traceback
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_dir
from pipeline.options import PipelineOptions
from pipeline.weights import ResolvedWeights, resolve_weights

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


# ---------------------------------------------------------------------------------- data types
@dataclass
class GeneratedObject:
    """Result of the GPU part for one image; everything the CPU part needs (picklable).

    Attributes:
        id: object id (names the output folder).
        seed: the seed this object was generated with.
        views_strip: (R, 6R, 3) uint8 stage-1 views, order 001..005, 000.
        ccm_strip: (R, 6R, 3) uint8 stage-2 CCMs, same order, channels (X, Y, Z).
        vertices: (V, 3) float32 mesh vertices in the CCM frame (Z up, front on +Y).
        faces: (F, 3) int64 faces with the RAW FlexiCubes winding (normals point inward).
        color_field: `TriplaneColorField` on the CPU: (N, 3) points -> (N, 3) raw RGB (~[-1, 1]).
        timings: seconds per stage (preprocess, stage1, stage2, reconstruct).
        weights_identity: `ResolvedWeights.identity` of the models used.
        input_info: name, sha256, size and mode of the input image.
        device: device/dtype the stages ran with.
    """

    id: str
    seed: int
    views_strip: np.ndarray
    ccm_strip: np.ndarray
    vertices: np.ndarray
    faces: np.ndarray
    color_field: Any
    timings: dict[str, float] = field(default_factory=dict)
    weights_identity: dict[str, Any] = field(default_factory=dict)
    input_info: dict[str, Any] = field(default_factory=dict)
    device: dict[str, Any] = field(default_factory=dict)


@dataclass
class ObjectResult:
    """Outcome for one input.

    Attributes:
        id: object id.
        status: ``"ok"`` or ``"failed"``.
        error_class: exception class name when failed (e.g. ``ImageInputError``), else None.
        error_message: one-line reason when failed, else None.
        outputs: kind -> absolute path (glb, obj, mtl, texture, views, preview, meta); empty on failure.
        timings: seconds per stage.
        source: the input (path or ``<bytes>``), for reports.
    """

    id: str
    status: str
    error_class: str | None = None
    error_message: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    source: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failure(cls, obj_id: str, exc: BaseException, *, timings=None, source=None) -> ObjectResult:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return cls(obj_id, "failed", type(exc).__name__, msg, {}, dict(timings or {}), source)


class PipelineError(RuntimeError):
    """A stage produced an unusable result (e.g. an empty mesh); the message names the stage."""


@contextmanager
def _timed(timings: dict[str, float], key: str):
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def derive_seed(seed: int, tag: str) -> int:
    """Independent per-stage seed (63 bits) from the object seed and a stage tag."""
    digest = hashlib.sha256(f"{int(seed)}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_info(img, name: str, data: bytes | None = None) -> dict[str, Any]:
    """Name, size, mode and (when the encoded bytes are known) sha256 of an input image."""
    info: dict[str, Any] = {"name": name, "width": img.width, "height": img.height, "mode": img.mode}
    if data is not None:
        info["sha256"] = hashlib.sha256(data).hexdigest()
    return info


def preprocess(image, options: PipelineOptions):
    """RGBA/RGB PIL image -> square RGB PIL on grey 127 (``options.background``/``foreground_ratio``)."""
    from pipeline.preprocess import PreprocessConfig, preprocess_image

    cfg = PreprocessConfig(
        background_mode=options.background, foreground_ratio=float(options.foreground_ratio)
    )
    return preprocess_image(image, cfg)


# ---------------------------------------------------------------------------------- CPU part
def _outward(faces: np.ndarray) -> np.ndarray:
    """Reverse the winding of each face (FlexiCubes' raw inward normals -> outward)."""
    return np.ascontiguousarray(np.asarray(faces)[:, ::-1]).astype(np.int64)


def _bake_or_colour(vertices, faces_out, color_field, options: PipelineOptions, rasterizer):
    """Texture (UV unwrap + bake) -> `TexturedMesh`, or per-vertex colours -> `VertexColorMesh`.

    `rasterizer` (used only for the bake) should live on ``options.finalize_device()``.
    """
    import torch

    if options.vertex_colors:
        from crm_models.recon.color_field import colors_to_unit
        from pipeline.mesh_types import VertexColorMesh

        with torch.inference_mode():
            raw = color_field(torch.from_numpy(np.ascontiguousarray(vertices, dtype=np.float32)))
        return VertexColorMesh(vertices, faces_out, colors_to_unit(raw).float().cpu().numpy())

    from pipeline.texture_bake import BakeConfig, bake_texture
    from pipeline.uv_unwrap import UnwrapConfig

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


def finalize(obj: GeneratedObject, out_dir: str | os.PathLike, options: PipelineOptions) -> ObjectResult:
    """CPU part: clean, unwrap + bake, export everything to ``out_dir/<obj.id>/`` atomically.

    Writes ``mesh.glb``, ``mesh.obj`` + ``mesh.mtl`` + ``mesh.png`` (unless ``write_obj`` is off;
    no PNG in vertex-colour mode), ``views.png``, ``preview.png`` (unless ``write_preview`` is off)
    and ``meta.json``. Never raises for a per-object problem: returns a failed `ObjectResult`
    and leaves no folder (an earlier complete folder of the same id is kept).
    """
    from pipeline.export import ExportConfig, export_glb, export_obj
    from pipeline.meta import build_meta
    from pipeline.views_image import views_png_bytes

    timings = dict(obj.timings)
    final = Path(out_dir) / obj.id
    try:
        verts = np.asarray(obj.vertices, dtype=np.float32)
        faces = np.asarray(obj.faces, dtype=np.int64)
        if (
            verts.ndim != 2
            or verts.shape[1] != 3
            or faces.ndim != 2
            or faces.shape[1] != 3
            or len(faces) == 0
        ):
            raise PipelineError(
                f"reconstruction produced no usable mesh ({len(verts)} vertices, {len(faces)} faces)"
            )
        if options.clean:
            from pipeline.mesh_cleaning import CleaningConfig, clean_mesh

            with _timed(timings, "clean"):
                verts, faces = clean_mesh(verts, faces, CleaningConfig())
            if len(faces) == 0:
                raise PipelineError(
                    "mesh cleaning removed every face (the reconstructed surface is all floaters)"
                )
        with _timed(timings, "bake"):
            # One rasterizer for the bake and the preview, on the options' device (CUDA when
            # available with device="auto"); none when neither needs one.
            rasterizer = None
            if not options.vertex_colors or options.write_preview:
                from pipeline.raster import get_rasterizer

                rasterizer = get_rasterizer("auto", device=options.finalize_device())
            mesh = _bake_or_colour(verts, _outward(faces), obj.color_field, options, rasterizer)
        outputs: dict[str, str] = {}
        with atomic_dir(final) as tmp:
            export_cfg = ExportConfig(frame=options.frame)
            with _timed(timings, "export"):
                export_glb(mesh, tmp / OUTPUT_FILES["glb"], export_cfg)
                outputs["glb"] = OUTPUT_FILES["glb"]
                if options.write_obj:
                    export_obj(mesh, tmp / OUTPUT_FILES["obj"], export_cfg)
                    for kind in ("obj", "mtl", "texture"):
                        if (tmp / OUTPUT_FILES[kind]).is_file():
                            outputs[kind] = OUTPUT_FILES[kind]
            with _timed(timings, "views"):
                (tmp / OUTPUT_FILES["views"]).write_bytes(views_png_bytes(obj.views_strip, obj.ccm_strip))
                outputs["views"] = OUTPUT_FILES["views"]
            if options.write_preview:
                from pipeline.preview import save_preview_png

                with _timed(timings, "preview"):
                    save_preview_png(
                        mesh, tmp / OUTPUT_FILES["preview"], size=options.preview_size, rasterizer=rasterizer
                    )
                outputs["preview"] = OUTPUT_FILES["preview"]
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
                mesh_info={
                    "vertices": int(len(mesh.vertices)),
                    "faces": int(len(mesh.faces)),
                    "texture_size": None if options.vertex_colors else options.texture_size,
                    "vertex_colors": bool(options.vertex_colors),
                    "frame": options.frame,
                },
                device_info=obj.device,
            )
            (tmp / OUTPUT_FILES["meta"]).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return ObjectResult(
            obj.id, "ok", outputs={k: str(final / v) for k, v in outputs.items()}, timings=timings
        )
    except Exception as exc:  # per-object isolation: report, leave nothing partial
        log.debug("finalize %s failed:\n%s", obj.id, traceback.format_exc())
        return ObjectResult.failure(obj.id, exc, timings=timings)


# ---------------------------------------------------------------------------------- models
@dataclass
class _Models:
    """The three networks (each an `nn.Module`, kept on the CPU in low-VRAM mode)."""

    stage1: Any
    stage2: Any
    recon: Any


def _recon_config(weights: ResolvedWeights, options: PipelineOptions):
    from crm_models.recon.config import ReconConfig
    from pipeline.tiny_presets import TINY_RECON_CONFIG

    cfg = ReconConfig.from_fixture_config(TINY_RECON_CONFIG) if weights.is_random else ReconConfig()
    if options.grid_size is not None:
        cfg = cfg.with_decoder(grid_res=int(options.grid_size))
    return cfg


def _load_recon(weights: ResolvedWeights, options: PipelineOptions, build_device: str = "cpu"):
    """Reconstruction model in fp32 (tiny preset: built on the CPU, seeded)."""
    import torch

    from crm_models.recon.model import ConvolutionalReconstructionModel

    cfg = _recon_config(weights, options)
    if weights.is_random:
        from pipeline.tiny_presets import build_tiny_recon

        return build_tiny_recon(cfg, seed=weights.seed or 0)
    from pipeline.recon_weights import load_recon_weights

    with torch.device(build_device):
        model = ConvolutionalReconstructionModel(cfg)
    load_recon_weights(model, weights.path("recon"))
    return model.eval().requires_grad_(False)


def _load_models(weights: ResolvedWeights, options: PipelineOptions, device: str, dtype) -> _Models:
    """Build the stage-1/stage-2 diffusion models and the reconstruction model.

    Diffusion models are cast to `dtype`; the reconstruction model stays fp32 (its U-Net runs under
    autocast on CUDA; mesh extraction is always fp32). Real checkpoints are built directly on the
    device (on the CPU in low-VRAM mode) and loaded one model at a time, so host memory holds one
    checkpoint at a time. Without low-VRAM mode every model ends up on `device`.
    """
    build_device = "cpu" if options.low_vram else device
    stage1 = _load_stage(1, weights, dtype, build_device)
    stage2 = _load_stage(2, weights, dtype, build_device)
    recon = _load_recon(weights, options, build_device)
    models = _Models(stage1=stage1, stage2=stage2, recon=recon)
    if not options.low_vram:
        for m in (models.stage1, models.stage2, models.recon):
            m.to(device)
    return models


def _load_stage(stage: int, weights: ResolvedWeights, dtype, build_device: str = "cpu"):
    """A `MultiViewDiffusionModel` (stage 1 or 2, with CLIP towers) cast to `dtype`, in eval mode."""
    import torch

    if weights.is_random:
        from pipeline.tiny_presets import build_tiny_stage

        model = build_tiny_stage(stage, seed=weights.seed or 0)
    else:
        from crm_models.multiview.config import StageConfig
        from crm_models.multiview.stage_model import MultiViewDiffusionModel
        from pipeline.multiview_weights import load_multiview_weights

        with torch.device(build_device):
            model = MultiViewDiffusionModel(StageConfig.stage1() if stage == 1 else StageConfig.stage2())
        role = f"stage{stage}"
        load_multiview_weights(
            model, weights.path(role), clip_path=weights.path("clip"), what=f"stage {stage}"
        )
    return model.to(dtype).eval().requires_grad_(False)


def _clip_pixels(model, images):
    """Preprocessed square RGB PIL images -> CLIP pixels (K, 3, S, S) on the model's device/dtype."""
    from crm_models.multiview.clip_encoders import clip_image_preprocess

    px = clip_image_preprocess(list(images), image_size=model.clip_config.image_size)
    return px.to(model.device, _dtype_of(model))


def _reference_images(model, images):
    """Preprocessed square RGB PIL images -> uint8 (K, R, R, 3) resized with PIL bilinear."""
    import torch
    from PIL import Image

    r = int(model.config.sampler.image_size)
    arr = np.stack([np.asarray(im.convert("RGB").resize((r, r), Image.Resampling.BILINEAR)) for im in images])
    return torch.from_numpy(arr)


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sampler(model):
    """One `MultiViewSampler` per model (it caches the prompt's text features)."""
    from crm_models.multiview.sampler import MultiViewSampler

    if model not in _SAMPLERS:
        _SAMPLERS[model] = MultiViewSampler(model)
    return _SAMPLERS[model]


def _sample_strips(model, cond, images, generators, num_steps: int, guidance: float) -> list[np.ndarray]:
    """One sampler call for K objects: `cond` is the stage's image input (see `MultiViewSampler.sample`)."""
    out = _sampler(model).sample(
        cond,
        clip_pixels=_clip_pixels(model, images),
        generator=list(generators),
        num_steps=num_steps,
        guidance_scale=guidance,
    )
    return [s.cpu().numpy() for s in out.strips]


def _run_stage1(model, images, options: PipelineOptions, generators) -> list[np.ndarray]:
    """K preprocessed images -> K (R, 6R, 3) uint8 view strips (order 001..005, 000)."""
    ref = _reference_images(model, images)
    return _sample_strips(model, ref, images, generators, options.steps_stage1, options.guidance_scale)


def _run_stage2(model, images, view_strips, options: PipelineOptions, generators) -> list[np.ndarray]:
    """K preprocessed images + K view strips -> K (R, 6R, 3) uint8 CCM strips (same order, RGB = XYZ)."""
    import torch

    strips = torch.from_numpy(np.stack(view_strips))
    return _sample_strips(model, strips, images, generators, options.steps_stage2, options.stage2_guidance)


def _dtype_of(model):
    return next(model.parameters()).dtype


def _run_recon(model, rgb_strip, ccm_strip, generator, device: str, dtype):
    """Strips -> (vertices (V,3) float32, faces (F,3) int64 raw winding, CPU colour field)."""
    import torch

    autocast = (
        torch.autocast("cuda", dtype=dtype)
        if device.startswith("cuda") and dtype != torch.float32
        else contextlib.nullcontext()
    )
    with autocast:  # the noise is drawn on the (CPU) generator: same result on every device
        triplane = model.encode(rgb_strip, ccm_strip, generator=generator)
    triplane = triplane.float()
    mesh = model.decode(triplane, vertex_colors=False)
    verts = mesh.vertices.detach().float().cpu().numpy()
    faces = mesh.faces.detach().cpu().numpy().astype(np.int64)
    field_ = model.color_field(triplane).to("cpu")
    return verts, faces, field_


# ---------------------------------------------------------------------------------- pipeline
class ImageToMeshPipeline:
    """The loaded CRM models plus options; `generate` (GPU part) and `run` (both parts).

    Build with `ImageToMeshPipeline.load(weights, options)`.
    """

    def __init__(
        self, models: _Models, weights: ResolvedWeights, options: PipelineOptions, device: str, dtype
    ):
        self.models = models
        self.weights = weights
        self.options = options
        self.device = device
        self.dtype = dtype
        self.weights_identity = weights.identity
        self.load_seconds = 0.0

    @classmethod
    def load(
        cls,
        weights: str | ResolvedWeights = "auto",
        options: PipelineOptions | None = None,
        *,
        allow_download: bool = True,
    ) -> ImageToMeshPipeline:
        """Resolve weights (see `pipeline.weights.resolve_weights`) and build the models.

        ``weights="tiny-random"`` must be asked for explicitly; ``"auto"`` never falls back to it.
        """
        options = options or PipelineOptions()
        t0 = time.perf_counter()
        device = options.resolved_device()
        dtype = options.resolved_dtype()
        if not isinstance(weights, ResolvedWeights):
            weights = resolve_weights(weights, allow_download=allow_download)
        if weights.is_random:
            log.warning(
                "using tiny RANDOM weights (tiny-random preset): outputs are meaningless, tests/CI only"
            )
        models = _load_models(weights, options, device, dtype)
        pipe = cls(models, weights, options, device, dtype)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    # ---- helpers
    @property
    def device_info(self) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "low_vram": self.options.low_vram,
        }
        if self.device.startswith("cuda"):
            info["cuda_name"] = torch.cuda.get_device_name(torch.device(self.device))
        return info

    def preprocess(self, image):
        """RGBA/RGB PIL image -> square RGB PIL on grey 127 (background handling per options)."""
        return preprocess(image, self.options)

    @contextmanager
    def _on_device(self, module):
        """Low-VRAM mode: move a stage to the device only while it runs."""
        if self.options.low_vram and self.device != "cpu":
            import torch

            module.to(self.device)
            try:
                yield module
            finally:
                module.to("cpu")
                torch.cuda.empty_cache()
        else:
            yield module

    # ---- GPU part
    def generate(
        self,
        images: Sequence[Any],
        ids: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        input_infos: Sequence[dict] | None = None,
        preprocessed: bool = False,
        on_stage: Callable[[str], None] | None = None,
    ) -> list[GeneratedObject]:
        """Diffusion + reconstruction for K images in one diffusion call per stage.

        Args:
            images: K PIL images (any mode `load_image` returns; RGBA uses its alpha per options).
            ids: K object ids.
            seeds: K seeds (default: ``options.seed`` for every image). Results equal K single
                calls with the same seeds: every object has its own generators and frames of
                different objects never attend to each other.
            input_infos: optional per-image input description recorded in meta.json.
            preprocessed: images are already `preprocess`-ed (square RGB).
            on_stage: callback with the stage name, for progress reporting.

        Returns:
            K `GeneratedObject`s (CPU numpy / CPU colour field).
        """
        import torch

        k = len(images)
        if len(ids) != k:
            raise ValueError(f"{k} images but {len(ids)} ids")
        seeds = [self.options.seed] * k if seeds is None else [int(s) for s in seeds]
        if len(seeds) != k:
            raise ValueError(f"{k} images but {len(seeds)} seeds")
        if k == 0:
            return []
        timings = [dict() for _ in range(k)]
        prepped = []
        for i, img in enumerate(images):
            with _timed(timings[i], "preprocess"):
                prepped.append(img if preprocessed else self.preprocess(img))

        def gens(tag: str) -> list[torch.Generator]:
            return [torch.Generator("cpu").manual_seed(derive_seed(s, tag)) for s in seeds]

        def split_time(key: str, seconds: float) -> None:
            for t in timings:
                t[key] = t.get(key, 0.0) + seconds / k

        if on_stage:
            on_stage("stage1")
        t0 = time.perf_counter()
        with self._on_device(self.models.stage1) as m:
            view_strips = _run_stage1(m, prepped, self.options, gens("stage1"))
        split_time("stage1", time.perf_counter() - t0)
        if on_stage:
            on_stage("stage2")
        t0 = time.perf_counter()
        with self._on_device(self.models.stage2) as m:
            ccm_strips = _run_stage2(m, prepped, view_strips, self.options, gens("stage2"))
        split_time("stage2", time.perf_counter() - t0)

        if on_stage:
            on_stage("reconstruct")
        out: list[GeneratedObject] = []
        recon_gens = gens("recon")
        with self._on_device(self.models.recon) as m:
            for i in range(k):
                with _timed(timings[i], "reconstruct"):
                    verts, faces, field_ = _run_recon(
                        m, view_strips[i], ccm_strips[i], recon_gens[i], self.device, self.dtype
                    )
                info = dict(input_infos[i]) if input_infos else {}
                info.setdefault("preprocessed_size", list(prepped[i].size))
                out.append(
                    GeneratedObject(
                        id=str(ids[i]),
                        seed=seeds[i],
                        views_strip=np.ascontiguousarray(view_strips[i]),
                        ccm_strip=np.ascontiguousarray(ccm_strips[i]),
                        vertices=verts,
                        faces=faces,
                        color_field=field_,
                        timings=timings[i],
                        weights_identity=self.weights_identity,
                        input_info=info,
                        device=self.device_info,
                    )
                )
        return out

    # ---- both parts
    def run(
        self,
        sources: Sequence[str | os.PathLike | bytes],
        out_dir: str | os.PathLike,
        ids: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        *,
        on_result: Callable[[ObjectResult], None] | None = None,
    ) -> list[ObjectResult]:
        """Images (paths or encoded bytes) -> one output folder each under `out_dir`.

        Inputs are processed in batches of ``options.batch_size``. A failing image (unreadable,
        empty mask, empty mesh, ...) yields a failed `ObjectResult` with the reason and leaves no
        folder; the others continue. Results are returned in input order.
        """
        from pipeline.image_io import load_image

        n = len(sources)
        ids = list(ids) if ids is not None else default_ids(sources)
        if len(ids) != n:
            raise ValueError(f"{n} sources but {len(ids)} ids")
        dupes = sorted(i for i, c in Counter(ids).items() if c > 1)
        if dupes:
            raise ValueError(f"duplicate object ids: {', '.join(dupes)}")
        seeds = [self.options.seed] * n if seeds is None else [int(s) for s in seeds]
        results: list[ObjectResult | None] = [None] * n

        def done(idx: int, res: ObjectResult) -> None:
            res.source = _source_name(sources[idx])
            results[idx] = res
            if on_result:
                on_result(res)

        ready: list[tuple[int, Any, dict, dict]] = []  # (index, preprocessed image, info, timings)
        for idx, src in enumerate(sources):
            t: dict[str, float] = {}
            try:
                with _timed(t, "load"):
                    data = _read_source(src)
                    img = load_image(data)
                    info = image_info(img, _source_name(src), data)
                with _timed(t, "preprocess"):
                    prepped = self.preprocess(img)
                ready.append((idx, prepped, info, t))
            except Exception as exc:
                done(idx, ObjectResult.failure(ids[idx], exc, timings=t))
            # batch as soon as enough inputs are ready (keeps memory bounded)
            if len(ready) >= self.options.batch_size or (idx == n - 1 and ready):
                self._run_batch(ready, ids, seeds, out_dir, done)
                ready = []
        return [r for r in results if r is not None]

    def _run_batch(self, batch, ids, seeds, out_dir, done) -> None:
        idxs = [b[0] for b in batch]
        try:
            objs = self.generate(
                [b[1] for b in batch],
                [ids[i] for i in idxs],
                [seeds[i] for i in idxs],
                input_infos=[b[2] for b in batch],
                preprocessed=True,
            )
        except Exception as exc:
            if len(batch) > 1:
                # Isolate the culprit: retry one by one (results are batch-independent).
                for b in batch:
                    self._run_batch([b], ids, seeds, out_dir, done)
                return
            log.debug("generate failed:\n%s", traceback.format_exc())
            done(idxs[0], ObjectResult.failure(ids[idxs[0]], exc, timings=batch[0][3]))
            return
        for b, obj in zip(batch, objs):
            obj.timings = {**b[3], **{k: v for k, v in obj.timings.items() if k != "preprocess"}}
            done(b[0], finalize(obj, out_dir, self.options))


# ---------------------------------------------------------------------------------- inputs
def _source_name(src) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(src)


def _read_source(src) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src)
    return Path(src).read_bytes()


def safe_id(name: str) -> str:
    """A folder-safe object id (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128 characters)."""
    out = "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "_" for c in name)
    out = out.lstrip("._-") or "image"
    return out[:128]


def default_ids(sources: Sequence[Any]) -> list[str]:
    """File stems (made folder-safe and unique with ``-2``, ``-3`` ...), ``image-<i>`` for bytes."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for i, src in enumerate(sources):
        base = f"image-{i}" if isinstance(src, (bytes, bytearray, memoryview)) else safe_id(Path(src).stem)
        n = seen.get(base, 0) + 1
        seen[base] = n
        ids.append(base if n == 1 else f"{base}-{n}")
    return ids
