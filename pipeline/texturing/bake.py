"""Texture baking: UV atlas -> per-texel surface positions -> colour field -> padded uint8 texture.

Steps (SPEC recon 9.2, with a better seam padding):

1. :func:`pipeline.texturing.unwrap.unwrap` (decimating above the face budget first).
2. Rasterize the UV layout at ``texture_size`` with clip positions ``(2u - 1, 2v - 1, 0, 1)``: texel (row i,
   col j) covers (u, v) = ((j + 0.5)/S, (i + 0.5)/S), row 0 = v = 0 = top of the image (glTF convention).
3. Interpolate the 3-D positions at covered texels with the rasterizer's barycentrics and query
   ``color_fn`` there (in chunks).
4. Map raw colours like the reference texture baker: ``clip((c + 1) * 127.5, 0, 255)``, cast to uint8 by
   truncation (``BakeConfig.rounding = "truncate"``, the reference behaviour) or rounding.
5. Seam padding (see :func:`fill_texture`): ``dilation_rings`` rings of neighbour-average dilation, then
   push-pull (mip pyramid) fill of every remaining texel. No texel keeps a background value, so bilinear or
   mipmapped lookups near chart borders never blend in background colour (the reference uses one 3x3 max
   dilation and leaves the rest of the atlas at 1/255).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.mesh.types import TexturedMesh, validate_mesh_arrays
from pipeline.raster import Rasterizer, get_rasterizer
from pipeline.texturing.unwrap import UnwrapConfig, unwrap
from pipeline.timing import timed


@dataclass
class BakeConfig:
    """Options for :func:`bake_texture`.

    Attributes:
        texture_size: square texture resolution S (texels per side).
        padding: xatlas gap between charts in texels (also the minimum ring count of the dilation).
        dilation_rings: neighbour-average dilation rings before the push-pull fill (>= padding is sensible).
        rounding: ``"truncate"`` (reference behaviour) or ``"round"`` when converting to uint8.
        query_chunk: points per ``color_fn`` call.
        query_dtype: precision of the ``color_fn`` calls: ``"float32"`` (exact, the default) or
            ``"bfloat16"`` (``torch.autocast`` on the rasterizer's device). The colour query is ~90 % of
            a CPU bake with the official colour MLP (32 -> 512 -> 512 -> 3 at every covered texel); on a
            CPU with native bf16 (AVX512-BF16 / AMX) bfloat16 halves it, changing texel values by at most
            ~0.2 / 255 (see docs/texturing.md). On a CPU without native bf16 it is slower: keep float32.
        unwrap: :class:`UnwrapConfig` (``texture_size``/``padding`` are overridden by the fields above).
    """

    texture_size: int = 1024
    padding: int = 2
    dilation_rings: int = 4
    rounding: Literal["truncate", "round"] = "truncate"
    query_chunk: int = 262_144
    query_dtype: Literal["float32", "bfloat16"] = "float32"
    unwrap: UnwrapConfig = field(default_factory=UnwrapConfig)


def raw_to_texture_values(raw: torch.Tensor) -> torch.Tensor:
    """Reference texture-baker mapping of raw colours (~[-1, 1]) to float [0, 255].

    ``clip((c + 1) * 127.5, 0, 255)`` (SPEC recon 9.2).
    """
    return ((raw.float() + 1.0) * 127.5).clamp(0.0, 255.0)


def _dilate_once(img: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ring: unfilled texels with filled 8-neighbours take their mean. img (C,H,W), mask (1,H,W)."""
    c = img.shape[0]
    m = mask.to(img.dtype)
    # 3x3 box sums, separable (much faster than conv2d / avg_pool2d on CPU).
    p = F.pad(torch.cat([img * m, m], dim=0), (1, 1, 1, 1))
    p = p[:, :-2] + p[:, 1:-1] + p[:, 2:]
    both = p[:, :, :-2] + p[:, :, 1:-1] + p[:, :, 2:]
    s, n = both[:c], both[c:]
    grow = (n > 0) & ~mask
    avg = s / n.clamp(min=1e-12)
    img = torch.where(grow.expand(c, -1, -1), avg, img)
    return img, mask | grow


def _push_pull(img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill every texel with ``mask == False`` from coarser, mask-weighted averages (push-pull)."""
    if bool(mask.all()) or not bool(mask.any()):
        return img
    m = mask.to(img.dtype)
    h, w = img.shape[-2:]
    if h <= 1 and w <= 1:
        return img
    # Pull: mask-weighted 2x2 average at half resolution.
    ph, pw = h % 2, w % 2
    s = F.avg_pool2d(F.pad((img * m)[None], (0, pw, 0, ph)), 2, ceil_mode=True)[0]
    n = F.avg_pool2d(F.pad(m[None], (0, pw, 0, ph)), 2, ceil_mode=True)[0]
    coarse = s / n.clamp(min=1e-12)
    coarse = _push_pull(coarse, n > 0)
    # Push: unfilled texels take the (bilinearly upsampled) coarse value.
    up = F.interpolate(coarse[None], size=(h + ph, w + pw), mode="bilinear", align_corners=False)[
        0, :, :h, :w
    ]
    return torch.where(mask.expand_as(img), img, up)


def fill_texture(values: torch.Tensor, covered: torch.Tensor, dilation_rings: int = 4) -> torch.Tensor:
    """Pad a partially covered texture so that every texel holds a plausible colour.

    Args:
        values: (H, W, C) float texel values (anything where ``covered`` is False).
        covered: (H, W) bool texels whose centre lies on the surface.
        dilation_rings: rings of 8-neighbour averaging grown outward from covered texels first; texels
            still empty afterwards are filled by push-pull (coarse-to-fine mask-weighted averages).

    Returns:
        (H, W, C) float tensor: equal to ``values`` on covered texels, filled elsewhere.
    """
    if values.dim() != 3 or covered.shape != values.shape[:2]:
        raise ValueError(
            f"fill_texture: values (H, W, C) and covered (H, W) expected, got {values.shape}, {covered.shape}"
        )
    if not bool(covered.any()):
        raise ValueError("fill_texture: no covered texel to pad from")
    img = values.permute(2, 0, 1).float().contiguous()
    mask = covered[None].clone()
    for _ in range(max(0, int(dilation_rings))):
        if bool(mask.all()):
            break
        img, mask = _dilate_once(img, mask)
    img = _push_pull(img, mask[0])
    return img.permute(1, 2, 0)


def _checked(cfg: BakeConfig | None) -> BakeConfig:
    cfg = cfg or BakeConfig()
    if cfg.texture_size < 2:
        raise ValueError(f"texture_size must be >= 2, got {cfg.texture_size}")
    if cfg.rounding not in ("truncate", "round"):
        raise ValueError(f"rounding must be 'truncate' or 'round', got {cfg.rounding!r}")
    if cfg.query_chunk < 1:
        raise ValueError(f"query_chunk must be positive, got {cfg.query_chunk}")
    if cfg.query_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"query_dtype must be 'float32' or 'bfloat16', got {cfg.query_dtype!r}")
    return cfg


def bake_texture(
    vertices,
    faces,
    color_fn: Callable[[torch.Tensor], torch.Tensor],
    cfg: BakeConfig | None = None,
    rasterizer: Rasterizer | None = None,
    timings: dict[str, float] | None = None,
) -> TexturedMesh:
    """Unwrap a mesh and bake ``color_fn`` into a texture.

    Args:
        vertices: (V, 3) float positions in the reconstruction model's canonical (CCM) frame.
        faces: (F, 3) int indices with OUTWARD winding (counter-clockwise seen from outside; reverse the raw,
            inward-wound FlexiCubes faces before calling).
        color_fn: maps points ``(N, 3) float32`` (on the rasterizer's device) to raw colours ``(N, 3)``
        roughly in
            [-1, 1] (the RGB MLP output); called without gradients, in chunks of ``cfg.query_chunk``.
        cfg: :class:`BakeConfig`. rasterizer: defaults to ``get_rasterizer("auto")``.
        timings: when given, wall seconds are added per step: ``decimate`` and ``xatlas`` (see
            :func:`pipeline.texturing.unwrap.unwrap`), then the steps of :func:`bake_on_atlas`.

    Returns:
        :class:`TexturedMesh` in frame ``"ccm"``: seam-split vertices (decimated if above the face budget),
        outward faces, glTF-convention UVs, (S, S, 3) uint8 texture.
    """
    cfg = _checked(cfg)
    timings = {} if timings is None else timings
    v, f = validate_mesh_arrays(vertices, faces, name="bake_texture")
    ucfg = UnwrapConfig(**{**cfg.unwrap.__dict__, "texture_size": cfg.texture_size, "padding": cfg.padding})
    v_split, f_split, uvs, _ = unwrap(v, f, ucfg, timings=timings)
    return bake_on_atlas(v_split, f_split, uvs, color_fn, cfg, rasterizer, timings=timings)


def bake_on_atlas(
    vertices_split,
    faces,
    uvs,
    color_fn: Callable[[torch.Tensor], torch.Tensor],
    cfg: BakeConfig | None = None,
    rasterizer: Rasterizer | None = None,
    timings: dict[str, float] | None = None,
) -> TexturedMesh:
    """Bake ``color_fn`` for an already unwrapped mesh (the part of :func:`bake_texture` after ``unwrap``).

    Args:
        vertices_split: (V, 3) seam-split positions (CCM frame). faces: (F, 3) outward winding.
        uvs: (V, 2) glTF-convention UVs in [0, 1]. Other arguments as :func:`bake_texture`.
        timings: when given, wall seconds are added per step: ``rasterize`` (UV layout), ``interpolate``
            (texel positions), ``query`` (``color_fn`` over the covered texels), ``fill`` (seam padding
            and the uint8 conversion).
    """
    cfg = _checked(cfg)
    timings = {} if timings is None else timings
    v_split, f_split = validate_mesh_arrays(vertices_split, faces, name="bake_on_atlas")
    uvs = np.asarray(uvs, dtype=np.float32)
    if uvs.shape != (len(v_split), 2) or not np.isfinite(uvs).all():
        raise ValueError(f"uvs must be finite with shape ({len(v_split)}, 2), got {uvs.shape}")
    rast = rasterizer or get_rasterizer("auto")
    dev = rast.device
    s = int(cfg.texture_size)
    uv_t = torch.as_tensor(uvs, device=dev)
    clip = torch.cat([uv_t * 2.0 - 1.0, torch.zeros_like(uv_t[:, :1]), torch.ones_like(uv_t[:, :1])], dim=1)
    f_t = torch.as_tensor(f_split, device=dev)
    with timed(timings, "rasterize"):
        out = rast.rasterize(clip, f_t, (s, s))
        covered = out.triangle_id[0] >= 0
    if not bool(covered.any()):
        raise ValueError("bake_texture: the UV layout covers no texel (mesh too small for the texture?)")
    with timed(timings, "interpolate"):
        pos = rast.interpolate(torch.as_tensor(v_split, device=dev), out, f_t)[0]  # (S, S, 3)
        pts = pos[covered]
    cols = []
    precision = (
        torch.autocast(torch.device(dev).type, dtype=torch.bfloat16)
        if cfg.query_dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    with timed(timings, "query"), torch.no_grad():
        for a in range(0, pts.shape[0], cfg.query_chunk):
            with precision:
                c = color_fn(pts[a : a + cfg.query_chunk].float())
            c = torch.as_tensor(c, device=dev).float()
            if c.shape != (min(cfg.query_chunk, pts.shape[0] - a), 3):
                raise ValueError(f"color_fn must return (N, 3) colours, got {tuple(c.shape)}")
            cols.append(raw_to_texture_values(c))
    with timed(timings, "fill"):
        tex = torch.zeros((s, s, 3), dtype=torch.float32, device=dev)
        tex[covered] = torch.cat(cols).float()
        if not bool(torch.isfinite(tex).all()):
            raise ValueError("bake_texture: color_fn returned non-finite colours")
        tex = fill_texture(tex, covered, max(cfg.dilation_rings, cfg.padding))
        tex = tex.clamp(0.0, 255.0)
        tex = torch.floor(tex) if cfg.rounding == "truncate" else torch.round(tex)
        texture = tex.to(torch.uint8).cpu().numpy()
    return TexturedMesh(v_split, f_split, uvs, texture, frame="ccm")


def sample_texture(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture lookup (glTF UV convention, clamp-to-edge): texture (H,W,C), uv (N,2) -> (N,C)."""
    t = torch.as_tensor(np.asarray(texture), dtype=torch.float32).permute(2, 0, 1)[None]
    g = torch.as_tensor(np.asarray(uv), dtype=torch.float32) * 2.0 - 1.0
    out = F.grid_sample(t, g[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].T.numpy()
