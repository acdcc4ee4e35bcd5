"""FlexiCubes isosurface extraction (Dual Marching Cubes with learned weights), inference mode.

Vectorised, device-agnostic PyTorch: every tensor follows the device of ``x``; there is no per-cube
Python loop (the only loops run over the 8 cube corners, the 7 slots of a group and the 3 axes). The
order of every float operation follows the reference algorithm, so on CPU the outputs are bit-identical
to it (vertex order, face order and winding included) on the same kind of CPU. Differentiable in x, s
and the weights. See docs/flexicubes.md for the conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .grid import cube_corners
from .tables import CORNER_OFFSETS, CUBE_EDGES, MAX_GROUP_SIZE, QUAD_EDGES, get_tables

__all__ = ["FlexiCubesResult", "flexicubes_extract"]


@dataclass
class FlexiCubesResult:
    """Output of :func:`flexicubes_extract`.

    vertices:   (M, 3) float, dual vertices (by #groups of their cube, then cube index, then group)
    faces:      (T, 3) int64, raw FlexiCubes winding: normals point toward s >= 0 (CRM: inward)
    l_dev:      (K,) float, deviation regulariser, one entry per (dual vertex, edge of its group)
    surf_cubes: (C,) bool, cubes with mixed signs
    case_ids:   (S,) int64, case id of each surface cube (ascending cube index) after the ambiguity fix
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    l_dev: torch.Tensor
    surf_cubes: torch.Tensor
    case_ids: torch.Tensor


_LAYOUT_ERROR = (
    "cubes does not follow the construct_grid layout for res={res} (cube (a, b, c) = index (a*res + b)*res"
    " + c, corner n at offset (n & 1, (n >> 1) & 1, (n >> 2) & 1)); build it with construct_grid(res)"
)


def _check_finite(name: str, t: torch.Tensor) -> None:
    # One reduction without a full-size boolean temporary: min/max propagate NaN and expose +-inf.
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf)")


def _validate(
    x: torch.Tensor, s: torch.Tensor, cubes: torch.Tensor, res: int, weights: torch.Tensor, weight_scale
) -> None:
    for name, t in (("x", x), ("s", s), ("cubes", cubes), ("weights", weights)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise ValueError(f"res must be a positive int, got {res!r}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if s.dtype != x.dtype or weights.dtype != x.dtype:
        raise TypeError(
            f"x, s and weights must share one floating dtype, got {x.dtype}, {s.dtype}, {weights.dtype}"
        )
    if cubes.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"cubes must be int64 (or int32), got {cubes.dtype}")
    for name, t in (("s", s), ("cubes", cubes), ("weights", weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; put all inputs on one device")
    n_verts, n_cubes = (res + 1) ** 3, res**3
    if x.ndim != 2 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (V, 3), got {tuple(x.shape)}")
    if x.shape[0] != n_verts:
        raise ValueError(f"x has {x.shape[0]} vertices but res={res} needs (res+1)^3 = {n_verts}")
    if s.shape != (n_verts,):
        raise ValueError(f"s must have shape (V,) = ({n_verts},), got {tuple(s.shape)}")
    if cubes.shape != (n_cubes, 8):
        raise ValueError(f"cubes must have shape (res^3, 8) = ({n_cubes}, 8), got {tuple(cubes.shape)}")
    if weights.shape != (n_cubes, 21):
        raise ValueError(f"weights must have shape (C, 21) = ({n_cubes}, 21), got {tuple(weights.shape)}")
    if not (isinstance(weight_scale, (int, float)) and math.isfinite(weight_scale) and weight_scale > 0):
        raise ValueError(f"weight_scale must be a positive finite number, got {weight_scale!r}")
    # Spot check of the cube layout (the rows actually used are checked in full later).
    sample = torch.unique(torch.linspace(0, n_cubes - 1, 257, device=cubes.device).round().long())
    if not torch.equal(cubes[sample].long(), cube_corners(sample, res)):
        raise ValueError(_LAYOUT_ERROR.format(res=res))
    _check_finite("x", x)
    _check_finite("s", s)
    _check_finite("weights", weights)


def _empty(x: torch.Tensor, surf: torch.Tensor) -> FlexiCubesResult:
    dev, dt = x.device, x.dtype
    return FlexiCubesResult(
        vertices=torch.zeros((0, 3), dtype=dt, device=dev),
        faces=torch.zeros((0, 3), dtype=torch.int64, device=dev),
        l_dev=torch.zeros((0,), dtype=dt, device=dev),
        surf_cubes=surf,
        case_ids=torch.zeros((0,), dtype=torch.int64, device=dev),
    )


def _segment_sum(values: torch.Tensor, row_start: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Per-row sums of consecutive entries, accumulated sequentially from 0 in entry order.

    values (K, ...) holds row r's entries at ``row_start[r] .. row_start[r] + size[r] - 1``; every
    row has 3..7 entries. Adding slot by slot keeps the float summation order of a sequential loop.
    """
    acc = values[row_start]  # 0 + v0 == v0 exactly
    for j in range(1, MAX_GROUP_SIZE):
        rows = (size > j).nonzero().squeeze(1)
        acc[rows] = acc[rows] + values[row_start[rows] + j]
    return acc


def flexicubes_extract(
    x: torch.Tensor,
    s: torch.Tensor,
    cubes: torch.Tensor,
    res: int,
    weights: torch.Tensor,
    weight_scale: float = 0.5,
    training: bool = False,
) -> FlexiCubesResult:
    """Extract the FlexiCubes triangle mesh of the zero level set of ``s``.

    Args:
        x: (V, 3) deformed grid vertex positions, V = (res+1)³, in the order of :func:`construct_grid`.
        s: (V,) scalar field; a vertex is "negative" iff s < 0 (CRM's sign: positive = inside; used as is).
        cubes: (C, 8) cube corner indices as built by :func:`construct_grid`, C = res³.
        res: grid resolution N.
        weights: (C, 21) = [beta (12, per cube edge) | alpha (8, per corner) | gamma (1)], unnormalised.
        weight_scale: w in beta' = 1 + w·tanh(beta), alpha' = 1 + w·tanh(alpha),
            gamma' = w·sigmoid(gamma) + (1 - w)/2 (CRM uses 0.5).
        training: only ``False`` (2 triangles per quad, what CRM runs at inference) is implemented.

    Returns:
        :class:`FlexiCubesResult` on the device of ``x``; floats in the dtype of ``x``.
    """
    if training:
        raise NotImplementedError(
            "flexicubes_extract(training=True) (centre vertex + 4 triangles per quad) is not implemented; "
            "CRM inference uses training=False"
        )
    _validate(x, s, cubes, res, weights, weight_scale)
    device = x.device
    tables = get_tables(device)
    n_verts = x.shape[0]
    n_cubes = cubes.shape[0]

    # Signs and case ids (bit n <-> corner n negative).
    # Built from shifted views of the (N+1)³ sign grid (same result as gathering through `cubes`, whose
    # layout is validated, without a (C, 8) temporary).
    neg = s < 0
    neg_grid = neg.reshape(res + 1, res + 1, res + 1).to(torch.uint8)
    case_u8 = torch.zeros((res, res, res), dtype=torch.uint8, device=device)
    for n, (dx, dy, dz) in enumerate(CORNER_OFFSETS):
        case_u8 |= neg_grid[dx : dx + res, dy : dy + res, dz : dz + res] << n
    case_u8 = case_u8.view(-1)
    del neg_grid
    surf = (case_u8 != 0) & (case_u8 != 255)  # (C,)
    surf_idx = surf.nonzero().squeeze(1)  # (S,) ascending cube index
    if surf_idx.numel() == 0:
        return _empty(x, surf)
    case_s = case_u8[surf_idx].long()
    del case_u8

    # Ambiguity fix: a flagged cube whose neighbour across its ambiguous face is also flagged (original
    # ids, simultaneous decisions, in-grid only) uses the complementary case.
    flag_s = tables.flagged[case_s]
    flag_full = torch.zeros(n_cubes, dtype=torch.bool, device=device)
    flag_full[surf_idx] = flag_s
    fpos = flag_s.nonzero().squeeze(1)
    p = surf_idx[fpos]
    q_abc = torch.stack((p // (res * res), (p // res) % res, p % res), dim=1) + tables.direction[case_s[fpos]]
    inside = ((q_abc >= 0) & (q_abc < res)).all(dim=1)
    q = (q_abc[:, 0] * res + q_abc[:, 1]) * res + q_abc[:, 2]
    invert = inside & flag_full[torch.where(inside, q, torch.zeros_like(q))]
    case_fixed = case_s.clone()
    inv_pos = fpos[invert]
    case_fixed[inv_pos] = 255 - case_s[inv_pos]
    del flag_full

    # Normalised weights of the surface cubes. The row gather keeps the (., 21) layout so that the
    # element-wise maps see the same strided column views as on the full weight matrix.
    w_s = weights.index_select(0, surf_idx)
    beta = torch.tanh(w_s[:, 0:12]) * weight_scale + 1
    alpha = torch.tanh(w_s[:, 12:20]) * weight_scale + 1
    gamma = torch.sigmoid(w_s[:, 20]) * weight_scale + (1 - weight_scale) / 2
    del w_s

    cubes_s = cubes.index_select(0, surf_idx).long()  # (S, 8)
    if not torch.equal(cubes_s, cube_corners(surf_idx, res)):
        raise ValueError(_LAYOUT_ERROR.format(res=res))
    e_first, e_second = tables.edges[:, 0], tables.edges[:, 1]

    # Dual vertices: surface cubes sorted by (number of groups, cube index), one row per group.
    n_groups = tables.n_groups[case_fixed]
    order = torch.sort(n_groups, stable=True).indices
    ng_o = n_groups[order]
    n_dual = int(ng_o.sum())
    v_cube = torch.repeat_interleave(order, ng_o, output_size=n_dual)  # (M,) surface-cube position
    cube_start = torch.cumsum(ng_o, 0) - ng_o
    v_slot = torch.arange(n_dual, device=device)
    v_slot -= torch.repeat_interleave(cube_start, ng_o, output_size=n_dual)  # group index in its cube
    del order, ng_o, cube_start
    v_edges = tables.groups[case_fixed[v_cube], v_slot]  # (M, 7) cube edges of each group, -1 padded
    del v_slot
    v_size = (v_edges >= 0).sum(dim=1)  # (M,) 3..7

    # One entry per (dual vertex, edge of its group), row-major: ascending edge index per vertex.
    ent_v, _ = (v_edges >= 0).nonzero().unbind(1)
    ent_k = v_edges[v_edges >= 0]
    del v_edges
    row_start = torch.cumsum(v_size, 0) - v_size
    ent_cube = v_cube[ent_v]
    ent_ck = ent_cube * 12 + ent_k  # flat (surface cube, cube edge) id
    ent_first_corner, ent_second_corner = e_first[ent_k], e_second[ent_k]
    g_first = cubes_s.view(-1)[ent_cube * 8 + ent_first_corner]
    g_second = cubes_s.view(-1)[ent_cube * 8 + ent_second_corner]
    s_p, s_q = s[g_first], s[g_second]
    x_p, x_q = x[g_first], x[g_second]
    del g_first, g_second
    a_p = alpha.view(-1)[ent_cube * 8 + ent_first_corner]
    a_q = alpha.view(-1)[ent_cube * 8 + ent_second_corner]
    b = beta.view(-1)[ent_ck]
    del ent_cube, ent_first_corner, ent_second_corner, ent_k, alpha, beta

    # Weighted edge crossings u = (xP·wQ - xQ·wP) / (wQ - wP), w = s·alpha', then the beta-weighted mean.
    w_p = (s_p * a_p)[:, None]
    w_q = (s_q * a_q)[:, None]
    del a_p, a_q
    u = (x_p * w_q - x_q * w_p) / (w_q - w_p)
    del w_p, w_q
    num = _segment_sum(b[:, None] * u, row_start, v_size)
    den = _segment_sum(b, row_start, v_size)
    vertices = num / den[:, None]
    del u, num, den, b

    # L_dev: |d - mean_v(d)| with d the distance from the plain (alpha-free) crossing to the vertex.
    z = (x_p * s_q[:, None] - x_q * s_p[:, None]) / (s_q - s_p)[:, None]
    del x_p, x_q, s_p, s_q
    dist = torch.linalg.vector_norm(z - vertices[ent_v], dim=-1)
    del z
    mean = _segment_sum(dist, row_start, v_size) / v_size.to(x.dtype)
    l_dev = (dist - mean[ent_v]).abs()
    del dist, mean, row_start, v_size

    # (surface cube, cube edge) -> dual vertex owning that edge (-1: edge not crossed).
    vmap = torch.full((surf_idx.numel() * 12,), -1, dtype=torch.int64, device=device)
    vmap[ent_ck] = ent_v
    del ent_ck, ent_v

    # Quads: one per crossed grid edge with 4 surrounding cubes (interior edges). Each such edge is
    # found once, from its (-,-) cube, whose 3 neighbours (-,+), (+,-), (+,+) follow by cube strides.
    strides = (res * res, res, 1)
    abc = torch.stack((surf_idx // (res * res), (surf_idx // res) % res, surf_idx % res), dim=1)
    quad_parts, key_parts, s1_parts = [], [], []
    for axis in range(3):
        ax_b, ax_c = (a for a in range(3) if a != axis)
        k_quad = tables.quad_edges[axis]  # (4,) cube edge seen by the (-,-), (-,+), (+,-), (+,+) cube
        corner_first, corner_second = CUBE_EDGES[QUAD_EDGES[axis][0]]
        v0, v1 = cubes_s[:, corner_first], cubes_s[:, corner_second]
        sel = (neg[v0] != neg[v1]) & (abc[:, ax_b] < res - 1) & (abc[:, ax_c] < res - 1)
        p0 = sel.nonzero().squeeze(1)
        step = torch.tensor(
            [0, strides[ax_c], strides[ax_b], strides[ax_b] + strides[ax_c]], dtype=torch.int64, device=device
        )
        pos = torch.searchsorted(surf_idx, surf_idx[p0, None] + step)  # (q, 4) surface positions
        quad_parts.append(vmap[pos * 12 + k_quad])
        first_v = v0[p0]
        key_parts.append(first_v * n_verts + v1[p0])
        s1_parts.append(s[first_v])
    del vmap, abc, cubes_s
    key, perm = torch.sort(torch.cat(key_parts))  # keys are unique: ascending surface-edge id
    quad = torch.cat(quad_parts)[perm]
    s1_pos = torch.cat(s1_parts)[perm] > 0
    del key, perm, quad_parts, key_parts, s1_parts

    # Orientation toward the non-negative endpoint, positive-first edges before the others.
    quad = torch.where(s1_pos[:, None], quad[:, [0, 1, 3, 2]], quad[:, [2, 3, 1, 0]])
    quad = quad[torch.cat((s1_pos.nonzero().squeeze(1), (~s1_pos).nonzero().squeeze(1)))]

    # Split each quad along the diagonal with the larger gamma' product.
    g = gamma[v_cube][quad]
    split02 = (g[:, 0] * g[:, 2] > g[:, 1] * g[:, 3])[:, None]
    tri_a = torch.where(split02, quad[:, [0, 1, 2]], quad[:, [0, 1, 3]])
    tri_b = torch.where(split02, quad[:, [0, 2, 3]], quad[:, [3, 1, 2]])
    faces = torch.stack((tri_a, tri_b), dim=1).reshape(-1, 3)

    return FlexiCubesResult(vertices=vertices, faces=faces, l_dev=l_dev, surf_cubes=surf, case_ids=case_fixed)
