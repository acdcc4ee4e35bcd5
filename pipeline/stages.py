"""The GPU part of the pipeline as public stage functions (also what the benchmarks time).

Hand-offs (SPEC recon §2.1, multiview §5.3): both diffusion stages return a (R, 6R, 3) uint8 strip of
the views with dataset indices 001, 002, 003, 004, 005, 000 (left, bottom, back, right, top, front),
CCM channels in PNG order (R, G, B) = (X, Y, Z); the reconstruction model takes both strips as they
are (it reorders slices and swaps CCM channels itself). The mesh comes out of FlexiCubes in the CCM
frame with inward winding (``pipeline.finalize`` reverses it).

Randomness: every object has its own CPU generators per stage (:func:`stage_generators`, seeded
from the object seed and the stage name), so a batch gives the same results as single calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from crm_models.multiview.clip_encoders import clip_image_preprocess
from crm_models.multiview.sampler import MultiViewSampler, SamplingOptions
from pipeline.options import PipelineOptions

__all__ = [
    "derive_seed",
    "sampling_options",
    "stage_generators",
    "run_stage1",
    "run_stage2",
    "reconstruct",
]


def derive_seed(seed: int, tag: str) -> int:
    """Independent per-stage seed (63 bits) from the object seed and a stage tag."""
    digest = hashlib.sha256(f"{int(seed)}:{tag}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stage_generators(seeds: Sequence[int], tag: str) -> list[torch.Generator]:
    """One CPU generator per object for the stage `tag` (``"stage1"``, ``"stage2"``, ``"recon"``)."""
    return [torch.Generator("cpu").manual_seed(derive_seed(s, tag)) for s in seeds]


def _dtype_of(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _clip_pixels(model, images) -> torch.Tensor:
    """Preprocessed square RGB PIL images -> CLIP pixels (K, 3, S, S) on the model's device/dtype."""
    px = clip_image_preprocess(list(images), image_size=model.clip_config.image_size)
    return px.to(model.device, _dtype_of(model))


def _reference_images(model, images) -> torch.Tensor:
    """Preprocessed square RGB PIL images -> uint8 (K, R, R, 3) resized with PIL bilinear."""
    r = int(model.config.sampler.image_size)
    arr = np.stack([np.asarray(im.convert("RGB").resize((r, r), Image.Resampling.BILINEAR)) for im in images])
    return torch.from_numpy(arr)


_SAMPLERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _sampler(model) -> MultiViewSampler:
    """One `MultiViewSampler` per model (it caches the prompt's text features)."""
    if model not in _SAMPLERS:
        _SAMPLERS[model] = MultiViewSampler(model)
    return _SAMPLERS[model]


def sampling_options(options: PipelineOptions, stage: int) -> SamplingOptions:
    """The sampler settings of diffusion stage 1 or 2 from the pipeline options."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    return SamplingOptions(
        sampler=options.sampler,
        num_steps=options.steps_stage1 if stage == 1 else options.steps_stage2,
        guidance_scale=options.guidance_scale if stage == 1 else options.stage2_guidance,
    )


def _sample_strips(model, cond, images, generators, sampling: SamplingOptions) -> list[np.ndarray]:
    """One sampler call for K objects: `cond` is the stage's image input (see `MultiViewSampler.sample`)."""
    out = _sampler(model).sample(
        cond, clip_pixels=_clip_pixels(model, images), generator=list(generators), options=sampling
    )
    return [s.cpu().numpy() for s in out.strips]


def run_stage1(model, images, options: PipelineOptions, generators) -> list[np.ndarray]:
    """Stage 1: K preprocessed images -> K (R, 6R, 3) uint8 view strips (order 001..005, 000)."""
    ref = _reference_images(model, images)
    return _sample_strips(model, ref, images, generators, sampling_options(options, 1))


def run_stage2(model, images, view_strips, options: PipelineOptions, generators) -> list[np.ndarray]:
    """Stage 2: K preprocessed images + K view strips -> K (R, 6R, 3) uint8 CCM strips (RGB = XYZ)."""
    strips = torch.from_numpy(np.stack(view_strips))
    return _sample_strips(model, strips, images, generators, sampling_options(options, 2))


def reconstruct(model, rgb_strip, ccm_strip, generator, device: str, dtype):
    """Reconstruction: strips -> (vertices (V, 3) float32, faces (F, 3) int64 raw winding,
    CPU colour field)."""
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
    return verts, faces, model.color_field(triplane).to("cpu")
