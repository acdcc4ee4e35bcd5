"""One image -> one textured mesh: the end-to-end CRM pipeline, composed of its three networks.

    load + preprocess -> stage 1 (six RGB views) -> stage 2 (six CCMs) -> reconstruction (triplane ->
    FlexiCubes mesh + colour field)      ==== GPU part: `ImageToMeshPipeline.generate` ====
    -> clean -> UV unwrap + bake -> GLB / OBJ / views.png / preview.png / meta.json
                                          ==== CPU part: `pipeline.finalize.finalize` (no model) ====

Like a diffusers pipeline, `ImageToMeshPipeline` takes its components in the constructor (the two
diffusion models and the reconstruction model: real ones from `ImageToMeshPipeline.load`, tiny
random ones in tests) and its `generate` reads as named steps: `check_inputs`, `prepare_images`,
`generate_views` (stage 1), `generate_ccms` (stage 2), `reconstruct_meshes`. Each step is a public
method, so a subclass can replace one (tests inject failures that way).

`generate` returns picklable `GeneratedObject`s (numpy arrays and a CPU colour field), so the GPU part
and the CPU part can run in different processes. `run` chains both with per-image error isolation and
atomic output folders.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.finalize import finalize
from pipeline.inputs.ids import default_ids
from pipeline.inputs.preprocess import PreprocessConfig, preprocess_image
from pipeline.inputs.source import load_source, read_source, source_name
from pipeline.options import PipelineOptions
from pipeline.outputs.destination import Destination, as_destination
from pipeline.qc.input_image import qc_input_image
from pipeline.results import GeneratedObject, ObjectResult
from pipeline.stages import reconstruct, run_stage1, run_stage2, stage_generators
from pipeline.timing import timed
from pipeline.weights import ResolvedWeights, resolve_weights
from pipeline.weights.cpu_allocator import trim_cpu_heap
from pipeline.weights.models import CRMModels, load_models
from pipeline.weights.tensor_files import release_mapped_weights

__all__ = ["ImageToMeshPipeline", "preprocess"]

log = logging.getLogger(__name__)


def preprocess(image: Image.Image, options: PipelineOptions) -> Image.Image:
    """RGBA/RGB PIL image -> square RGB PIL on grey 127 (``options.background`` / ``foreground_ratio``)."""
    cfg = PreprocessConfig(
        background_mode=options.background, foreground_ratio=float(options.foreground_ratio)
    )
    return preprocess_image(image, cfg)


class ImageToMeshPipeline:
    """The CRM pipeline: components + options; `generate` (GPU part) and `run` (both parts).

    Args:
        stage1: stage-1 `MultiViewDiffusionModel` (six RGB views).
        stage2: stage-2 `MultiViewDiffusionModel` (six CCMs).
        recon: `ConvolutionalReconstructionModel`.
        options: `PipelineOptions` (device, dtype, steps, ...); default options when None.
        weights_identity: what the components were loaded from (``ResolvedWeights.identity``),
            recorded in every ``meta.json``.
    """

    def __init__(
        self,
        stage1: Any,
        stage2: Any,
        recon: Any,
        options: PipelineOptions | None = None,
        weights_identity: dict[str, Any] | None = None,
    ):
        self.stage1 = stage1
        self.stage2 = stage2
        self.recon = recon
        self.options = options or PipelineOptions()
        self.device = self.options.resolved_device()
        self.dtype = self.options.resolved_dtype()
        self.weights_identity = dict(weights_identity or {})
        self.load_seconds = 0.0

    @classmethod
    def load(
        cls,
        weights: str | ResolvedWeights = "auto",
        options: PipelineOptions | None = None,
        *,
        allow_download: bool = True,
    ) -> ImageToMeshPipeline:
        """Resolve weights (see `pipeline.weights.resolve_weights`) and build the components.

        ``weights="tiny-random"`` must be asked for explicitly; ``"auto"`` never falls back to it.
        """
        options = options or PipelineOptions()
        t0 = time.perf_counter()
        if not isinstance(weights, ResolvedWeights):
            weights = resolve_weights(weights, allow_download=allow_download)
        if weights.is_random:
            log.warning(
                "using tiny RANDOM weights (tiny-random preset): outputs are meaningless, tests/CI only"
            )
        models = load_models(weights, options)
        pipe = cls(models.stage1, models.stage2, models.recon, options, weights.identity)
        pipe.load_seconds = time.perf_counter() - t0
        return pipe

    @property
    def models(self) -> CRMModels:
        """The three components."""
        return CRMModels(self.stage1, self.stage2, self.recon)

    def with_options(self, **changes: Any) -> ImageToMeshPipeline:
        """The same components with some options changed (nothing is reloaded)."""
        return type(self)(
            self.stage1, self.stage2, self.recon, self.options.replace(**changes), self.weights_identity
        )

    @property
    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "low_vram": self.options.low_vram,
        }
        if self.device.startswith("cuda"):
            info["cuda_name"] = torch.cuda.get_device_name(torch.device(self.device))
        return info

    def preprocess(self, image: Image.Image) -> Image.Image:
        """RGBA/RGB PIL image -> square RGB PIL on grey 127 (background handling per options)."""
        return preprocess(image, self.options)

    @contextmanager
    def _on_device(self, module, keep: tuple[Any, ...] = ()) -> Iterator[Any]:
        """Low-VRAM mode: move a stage to the device only while it runs.

        Once a diffusion stage has run, the resident pages of its memory-mapped CPU weights (not
        those `keep` holds too) are handed back (`release_mapped_weights`; they stay in the page
        cache and fault back in on the next call), and on the CPU the heap's free memory too
        (`trim_cpu_heap`): a CPU process then holds one stage's weights and activations at a time,
        not every model it has run.
        """
        if self.options.low_vram and self.device != "cpu":
            module.to(self.device)
            try:
                yield module
            finally:
                module.to("cpu")
                torch.cuda.empty_cache()
        else:
            try:
                yield module
            finally:
                if module is not self.recon:
                    release_mapped_weights(module, keep)
                trim_cpu_heap()

    # ---- GPU part, as named steps
    def check_inputs(
        self, images: Sequence[Any], ids: Sequence[str], seeds: Sequence[int] | None
    ) -> list[int]:
        """Validate one call's arguments; returns the K seeds (default: ``options.seed`` for each)."""
        k = len(images)
        if len(ids) != k:
            raise ValueError(f"{k} images but {len(ids)} ids")
        seeds = [self.options.seed] * k if seeds is None else [int(s) for s in seeds]
        if len(seeds) != k:
            raise ValueError(f"{k} images but {len(seeds)} seeds")
        return seeds

    def prepare_images(
        self, images: Sequence[Any], timings: list[dict[str, float]], preprocessed: bool
    ) -> list[Image.Image]:
        """K input images -> K square RGB images on grey (unless already `preprocessed`)."""
        out = []
        for img, t in zip(images, timings):
            with timed(t, "preprocess"):
                out.append(img if preprocessed else self.preprocess(img))
        return out

    def generate_views(self, images: list[Image.Image], seeds: list[int]) -> list[np.ndarray]:
        """Stage 1 for K objects in one diffusion call: K (R, 6R, 3) uint8 view strips."""
        with self._on_device(self.stage1, keep=(self.stage2,)) as m:
            return run_stage1(m, images, self.options, stage_generators(seeds, "stage1"))

    def generate_ccms(
        self, images: list[Image.Image], views: list[np.ndarray], seeds: list[int]
    ) -> list[np.ndarray]:
        """Stage 2 for K objects in one diffusion call: K (R, 6R, 3) uint8 CCM strips."""
        with self._on_device(self.stage2) as m:
            return run_stage2(m, images, views, self.options, stage_generators(seeds, "stage2"))

    def reconstruct_meshes(
        self,
        views: list[np.ndarray],
        ccms: list[np.ndarray],
        seeds: list[int],
        timings: list[dict[str, float]],
    ) -> list[tuple[np.ndarray, np.ndarray, Any]]:
        """Reconstruction per object: (vertices, raw faces, CPU colour field)."""
        out = []
        generators = stage_generators(seeds, "recon")
        with self._on_device(self.recon) as m:
            for view, ccm, gen, t in zip(views, ccms, generators, timings):
                with timed(t, "reconstruct"):
                    out.append(reconstruct(m, view, ccm, gen, self.device, self.dtype))
        return out

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
        seeds = self.check_inputs(images, ids, seeds)
        k = len(images)
        if k == 0:
            return []
        timings: list[dict[str, float]] = [{} for _ in range(k)]
        prepped = self.prepare_images(images, timings, preprocessed)

        def stage(name: str, fn: Callable[[], Any]) -> Any:
            if on_stage:
                on_stage(name)
            t0 = time.perf_counter()
            result = fn()
            for t in timings:  # one call for K objects: each carries its share
                t[name] = t.get(name, 0.0) + (time.perf_counter() - t0) / k
            return result

        views = stage("stage1", lambda: self.generate_views(prepped, seeds))
        ccms = stage("stage2", lambda: self.generate_ccms(prepped, views, seeds))
        if on_stage:
            on_stage("reconstruct")
        meshes = self.reconstruct_meshes(views, ccms, seeds, timings)
        out = []
        for i, (verts, faces, field_) in enumerate(meshes):
            info = dict(input_infos[i]) if input_infos else {}
            info.setdefault("preprocessed_size", list(prepped[i].size))
            out.append(
                GeneratedObject(
                    id=str(ids[i]),
                    seed=seeds[i],
                    views_strip=np.ascontiguousarray(views[i]),
                    ccm_strip=np.ascontiguousarray(ccms[i]),
                    vertices=verts,
                    faces=faces,
                    color_field=field_,
                    timings=timings[i],
                    weights_identity=self.weights_identity,
                    input_info=info,
                    device=self.device_info,
                    input_rgba=qc_input_image(prepped[i]),
                )
            )
        return out

    # ---- both parts
    def run(
        self,
        sources: Sequence[str | os.PathLike | bytes],
        destination: str | os.PathLike | Destination,
        ids: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        *,
        on_result: Callable[[ObjectResult], None] | None = None,
    ) -> list[ObjectResult]:
        """Images (paths or encoded bytes) -> one output folder each in `destination`.

        Inputs are processed in batches of ``options.batch_size``. A failing image (unreadable,
        empty mask, empty mesh, ...) yields a failed `ObjectResult` with the reason and leaves no
        folder; the others continue. Results are returned in input order.
        """
        dest = as_destination(destination)
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
            res.source = source_name(sources[idx])
            results[idx] = res
            if on_result:
                on_result(res)

        ready: list[tuple[int, Any, dict, dict]] = []  # (index, preprocessed image, info, timings)
        for idx, src in enumerate(sources):
            t: dict[str, float] = {}
            try:
                with timed(t, "load"):
                    img, info = load_source(read_source(src), source_name(src))
                with timed(t, "preprocess"):
                    prepped = self.preprocess(img)
                ready.append((idx, prepped, info, t))
            except Exception as exc:
                done(idx, ObjectResult.failure(ids[idx], exc, timings=t))
            # batch as soon as enough inputs are ready (keeps memory bounded)
            if len(ready) >= self.options.batch_size or (idx == n - 1 and ready):
                self._run_batch(ready, ids, seeds, dest, done)
                ready = []
        return [r for r in results if r is not None]

    def _run_batch(self, batch, ids, seeds, dest: Destination, done) -> None:
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
                    self._run_batch([b], ids, seeds, dest, done)
                return
            log.debug("generate failed:\n%s", traceback.format_exc())
            done(idxs[0], ObjectResult.failure(ids[idxs[0]], exc, timings=batch[0][3]))
            return
        for b, obj in zip(batch, objs):
            obj.timings = {**b[3], **{k: v for k, v in obj.timings.items() if k != "preprocess"}}
            done(b[0], finalize(obj, dest, self.options))
