"""FlexiCubes: tables, grid, golden fixtures, a loop-based cross-check, analytic spheres, errors."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from reference_files import fixture_params

from crm_models.flexicubes import FlexiCubesResult, construct_grid, flexicubes_extract, get_tables
from crm_models.flexicubes.tables import (
    CORNER_OFFSETS,
    CUBE_EDGES,
    ambiguity_canonical_text,
    generate_ambiguity_table,
    generate_case_groups,
    groups_canonical_text,
)

# Digests published with the algorithm description (FLEXICUBES.md §3.1 and §3.2). Kept here as literals
# so that the test does not trust the module's own constants.
GROUPS_SHA = "af38664561dd4c5f41548ec2f56f3c2472d3d71bcb9cb34253bb9c5a3e46bc88"
AMBIGUITY_SHA = "08aee2f8434d92eae8178be3d8328125502ec10bc3d51479935152c41d7dd36c"

FIXTURES = fixture_params("recon")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------------
# Tables


def test_group_table_digest_and_facts():
    assert _sha(groups_canonical_text()) == GROUPS_SHA
    groups = generate_case_groups()
    assert Counter(len(g) for g in groups) == {0: 2, 1: 162, 2: 82, 3: 8, 4: 2}
    assert sum(len(e) for g in groups for e in g) == 1536
    assert Counter(len(e) for g in groups for e in g) == {3: 144, 4: 66, 5: 72, 6: 52, 7: 24}
    assert groups[1] == ((0, 3, 8),)
    assert groups[6] == ((0, 1, 9), (4, 7, 8))
    assert groups[249] == ((0, 1, 4, 7, 8, 9),)
    assert groups[22] == ((0, 1, 9), (4, 7, 8), (2, 3, 11))
    assert groups[105] == ((0, 3, 8), (4, 5, 9), (1, 2, 10), (6, 7, 11))
    assert groups[231] == ((4, 5, 9), (2, 3, 11))
    assert groups_canonical_text().split("\n")[:7] == [
        "",
        "0,3,8",
        "0,1,9",
        "1,3,8,9",
        "4,7,8",
        "0,3,4,7",
        "0,1,9|4,7,8",
    ]
    # Every crossed edge of every case is in exactly one group.
    for c, case_groups in enumerate(groups):
        crossed = sorted(k for k, (p, q) in enumerate(CUBE_EDGES) if ((c >> p) & 1) != ((c >> q) & 1))
        assert sorted(k for g in case_groups for k in g) == crossed


def test_ambiguity_table_digest_and_directions():
    assert _sha(ambiguity_canonical_text()) == AMBIGUITY_SHA
    table = generate_ambiguity_table()
    expected = {
        (1, 0, 0): [61, 124, 125, 199, 211, 215],
        (-1, 0, 0): [62, 188, 190, 203, 227, 235],
        (0, 1, 0): [91, 122, 123, 167, 181, 183],
        (0, -1, 0): [94, 173, 218, 222, 229, 237],
        (0, 0, 1): [103, 110, 111, 155, 157, 159],
        (0, 0, -1): [118, 185, 217, 230, 246, 249],
    }
    assert {c: (d, 255 - c) for d, cs in expected.items() for c in cs} == table
    groups = generate_case_groups()
    for c in table:  # the complement has the same crossed edges but two groups
        assert len(groups[c]) == 1 and len(groups[255 - c]) == 2


def test_tensor_tables_match_python_tables():
    t = get_tables("cpu")
    groups = generate_case_groups()
    for c in range(256):
        assert int(t.n_groups[c]) == len(groups[c])
        for g in range(4):
            row = [int(k) for k in t.groups[c, g] if k >= 0]
            assert row == (list(groups[c][g]) if g < len(groups[c]) else [])
    assert int(t.flagged.sum()) == 36
    assert get_tables("cpu") is t  # cached


# ----------------------------------------------------------------------------------------------------
# Grid


@pytest.mark.parametrize("res", [1, 3, 20, 80])
def test_construct_grid_layout(res):
    verts, cubes = construct_grid(res)
    n1 = res + 1
    assert verts.shape == (n1**3, 3) and verts.dtype == torch.float32
    assert cubes.shape == (res**3, 8) and cubes.dtype == torch.int64
    if 100000 % res == 0:  # the 5-decimal snapping is then a no-op
        axis = (torch.arange(n1, dtype=torch.float32) / res - 0.5) * 2
        assert torch.equal(verts[:, 0], axis.repeat_interleave(n1 * n1))
        assert torch.equal(verts[:, 2], axis.repeat(n1 * n1))
    a, b, c = res - 1, res // 2, 0
    for n, (dx, dy, dz) in enumerate(CORNER_OFFSETS):
        assert int(cubes[(a * res + b) * res + c, n]) == ((a + dx) * n1 + b + dy) * n1 + c + dz
    assert float(verts.min()) == -1.0 and float(verts.max()) == 1.0


def test_construct_grid_snapping_and_options():
    verts, _ = construct_grid(64)
    exact = (torch.arange(65, dtype=torch.float64) / 64 - 0.5) * 2
    assert (verts[:: 65 * 65, 0].double() - exact).abs().max() <= 2.5e-5
    v64, c64 = construct_grid(4, scale=1.0, dtype=torch.float64)
    assert v64.dtype == torch.float64 and float(v64.max()) == 0.5
    with pytest.raises(ValueError, match="res"):
        construct_grid(0)
    with pytest.raises(ValueError, match="dtype"):
        construct_grid(4, dtype=torch.int64)


# ----------------------------------------------------------------------------------------------------
# Golden fixtures (every *.npz of the recon fixture directory)


def _grid_size(d) -> int:
    cfg = json.loads(str(d["config_json"]))
    return int(cfg["specs"]["Input"]["tet_grid_size"])


@pytest.mark.parametrize("path", FIXTURES)
def test_fixture_grid_and_extraction(path):
    d = np.load(path)
    n = _grid_size(d)
    verts, cubes = construct_grid(n)
    assert np.array_equal(verts.numpy(), d["grid_verts"])
    assert np.array_equal(cubes.numpy(), d["cube_indices"])

    t = {k: torch.from_numpy(d[k]) for k in ("v_deformed", "sdf", "cube_indices", "weights21")}
    out = flexicubes_extract(t["v_deformed"], t["sdf"], t["cube_indices"], n, t["weights21"])
    assert isinstance(out, FlexiCubesResult)
    assert np.array_equal(out.surf_cubes.numpy(), d["fc_surf_cubes"])
    assert np.array_equal(out.case_ids.numpy(), d["fc_case_ids"])
    assert out.vertices.shape == d["mesh_verts"].shape and out.vertices.dtype == torch.float32
    np.testing.assert_allclose(out.vertices.numpy(), d["mesh_verts"], atol=1e-4, rtol=1e-4)
    assert out.l_dev.shape == d["fc_L_dev"].shape
    np.testing.assert_allclose(out.l_dev.numpy(), d["fc_L_dev"], atol=1e-4, rtol=1e-4)
    assert out.faces.dtype == torch.int64
    assert np.array_equal(out.faces.numpy(), d["mesh_faces"].astype(np.int64))  # order and winding too


# ----------------------------------------------------------------------------------------------------
# Loop-based transcription of the algorithm description, for small grids: an independent check of the
# vectorised code's ordering rules (vertex order, face order, orientation, split, ambiguity fix).


def _literal_extract(x: torch.Tensor, s: torch.Tensor, res: int, w: torch.Tensor):
    groups, amb = generate_case_groups(), generate_ambiguity_table()
    xs, ss = x.numpy(), s.numpy()
    beta = (torch.tanh(w[:, :12]) * 0.5 + 1).numpy()
    alpha = (torch.tanh(w[:, 12:20]) * 0.5 + 1).numpy()
    gamma = (torch.sigmoid(w[:, 20]) * 0.5 + 0.25).numpy()
    n1 = res + 1

    def vid(i, j, k):
        return (i * n1 + j) * n1 + k

    def cid(a, b, c):
        return (a * res + b) * res + c

    def corner(p, n):
        return vid(p[0] + CORNER_OFFSETS[n][0], p[1] + CORNER_OFFSETS[n][1], p[2] + CORNER_OFFSETS[n][2])

    original = {}
    for p in itertools.product(range(res), repeat=3):
        case = sum(1 << n for n in range(8) if ss[corner(p, n)] < 0)
        if case not in (0, 255):
            original[p] = case
    fixed = {}
    for p, case in original.items():
        fixed[p] = case
        if case in amb:
            (da, db, dc), inverse = amb[case]
            q = (p[0] + da, p[1] + db, p[2] + dc)
            if original.get(q) in amb:
                fixed[p] = inverse

    verts, ldev, owner, vgamma = [], [], {}, []
    for p in sorted(fixed, key=lambda p: (len(groups[fixed[p]]), cid(*p))):
        ci = cid(*p)
        for group in groups[fixed[p]]:
            num, den, crossings = np.zeros(3, np.float32), np.float32(0), []
            for k in group:
                pc, qc = CUBE_EDGES[k]
                vp, vq = corner(p, pc), corner(p, qc)
                wp, wq = ss[vp] * alpha[ci, pc], ss[vq] * alpha[ci, qc]
                num = num + beta[ci, k] * ((xs[vp] * wq - xs[vq] * wp) / (wq - wp))
                den = den + beta[ci, k]
                crossings.append((xs[vp] * ss[vq] - xs[vq] * ss[vp]) / (ss[vq] - ss[vp]))
                owner[(vp, vq, ci)] = len(verts)
            v = num / den
            dist = [np.float32(np.sqrt(np.sum((z - v) ** 2))) for z in crossings]
            mean = np.float32(sum(dist) / len(dist))
            ldev += [abs(d_ - mean) for d_ in dist]
            verts.append(v)
            vgamma.append(gamma[ci])

    quads = []  # (first, second, positive, quad)
    for i, j, k in itertools.product(range(n1), repeat=3):
        for first, second, cubes4 in (
            (vid(i, j, k), vid(i + 1, j, k), [(i, j - 1 + b, k - 1 + c) for b in (0, 1) for c in (0, 1)]),
            (vid(i, j + 1, k), vid(i, j, k), [(i - 1 + a, j, k - 1 + c) for a in (0, 1) for c in (0, 1)]),
            (vid(i, j, k), vid(i, j, k + 1), [(i - 1 + a, j - 1 + b, k) for a in (0, 1) for b in (0, 1)]),
        ):
            if not all(0 <= q < res for cube in cubes4 for q in cube):
                continue
            if (ss[first] < 0) == (ss[second] < 0):
                continue
            v0, v1, v2, v3 = (owner[(first, second, cid(*cube))] for cube in cubes4)
            positive = bool(ss[first] > 0)
            quads.append((first, second, positive, (v0, v1, v3, v2) if positive else (v2, v3, v1, v0)))
    quads.sort(key=lambda q: (not q[2], q[0], q[1]))
    faces = []
    for *_, (q0, q1, q2, q3) in quads:
        if np.float32(vgamma[q0] * vgamma[q2]) > np.float32(vgamma[q1] * vgamma[q3]):
            faces += [(q0, q1, q2), (q0, q2, q3)]
        else:
            faces += [(q0, q1, q3), (q3, q1, q2)]
    case_ids = [fixed[p] for p in sorted(fixed, key=lambda p: cid(*p))]
    return np.array(verts).reshape(-1, 3), np.array(faces).reshape(-1, 3), np.array(ldev), case_ids


def _random_inputs(res: int, kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    verts, cubes = construct_grid(res)
    if kind == "signs":  # maximal ambiguity: random +-1
        s = torch.randint(0, 2, (verts.shape[0],), generator=g).float() * 2 - 1
    else:  # Gaussian field with a few exact zeros
        s = torch.randn(verts.shape[0], generator=g)
        s[torch.randperm(verts.shape[0], generator=g)[:10]] = 0.0
    x = verts + torch.tanh(torch.randn(verts.shape, generator=g)) / (2 * res)
    w = torch.randn((cubes.shape[0], 21), generator=g) * 0.5
    return x, s, cubes, w


@pytest.mark.parametrize(
    "res,kind,seed", [(5, "gauss", 0), (6, "signs", 1), (6, "signs", 2), (4, "gauss", 3)]
)
def test_matches_loop_transcription(res, kind, seed):
    x, s, cubes, w = _random_inputs(res, kind, seed)
    out = flexicubes_extract(x, s, cubes, res, w)
    verts, faces, ldev, case_ids = _literal_extract(x, s, res, w)
    assert out.case_ids.tolist() == case_ids
    assert np.array_equal(out.faces.numpy(), faces)
    np.testing.assert_allclose(out.vertices.numpy(), verts, atol=1e-6, rtol=0)
    np.testing.assert_allclose(out.l_dev.numpy(), ldev, atol=1e-6, rtol=0)


def test_ambiguity_fix_inverts_flagged_pairs():
    # Cube P = (0,0,0) gets case 61 (ambiguous face at +x), its +x neighbour Q = (1,0,0) case 62
    # (ambiguous face at -x, the same face): both must be inverted. Changing Q breaks the pair.
    res = 2
    verts, cubes = construct_grid(res)

    def field(q_case):
        s = torch.ones(verts.shape[0])
        for cube_idx, case in ((0, 61), (res * res, q_case)):
            for n in range(8):
                if (case >> n) & 1:
                    s[cubes[cube_idx, n]] = -1.0
        return s

    w = torch.zeros((cubes.shape[0], 21))
    paired = flexicubes_extract(verts, field(62), cubes, res, w)
    surf = paired.surf_cubes.nonzero().squeeze(1).tolist()
    cases = dict(zip(surf, paired.case_ids.tolist()))
    assert cases[0] == 255 - 61 and cases[res * res] == 255 - 62
    # Q = 62 with corner 7 also negative is case 190, still flagged toward -x: still a pair.
    assert dict(zip(surf, flexicubes_extract(verts, field(190), cubes, res, w).case_ids.tolist()))[0] == 194
    # Q with corner 1 non-negative (case 60) is not flagged: P keeps its case.
    single = flexicubes_extract(verts, field(60), cubes, res, w)
    cases = dict(zip(single.surf_cubes.nonzero().squeeze(1).tolist(), single.case_ids.tolist()))
    assert cases[0] == 61


# ----------------------------------------------------------------------------------------------------
# Analytic spheres


def _sphere(res: int, radius: float, weights: str, dtype=torch.float32):
    verts, cubes = construct_grid(res, dtype=dtype)
    s = radius - verts.norm(dim=1)  # CRM sign: positive inside
    g = torch.Generator().manual_seed(res)
    if weights == "zero":
        x, w = verts, torch.zeros((cubes.shape[0], 21), dtype=dtype)
    else:
        x = verts + (torch.tanh(torch.randn(verts.shape, generator=g)) / (2 * res)).to(dtype)
        w = (torch.randn((cubes.shape[0], 21), generator=g) * 0.3).to(dtype)
    return x, s, cubes, w


def _signed_volume(v: torch.Tensor, f: torch.Tensor) -> float:
    a, b, c = (v[f[:, i]].double() for i in range(3))
    return float((a * torch.cross(b, c, dim=1)).sum() / 6)


def _check_closed_oriented(out: FlexiCubesResult) -> None:
    f = out.faces
    m = out.vertices.shape[0]
    directed = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    key = directed[:, 0] * m + directed[:, 1]
    rev = directed[:, 1] * m + directed[:, 0]
    assert key.unique().numel() == key.numel(), "a directed edge is used twice (inconsistent winding)"
    assert bool(torch.isin(rev, key).all()), "an edge has only one face (mesh not closed)"
    n_edges = key.numel() // 2
    assert m - n_edges + f.shape[0] == 2, "Euler characteristic of a sphere must be 2"
    assert torch.unique(f).numel() == m  # every dual vertex used


@pytest.mark.parametrize("res,rel_tol", [(20, 0.08), (80, 0.01)])
@pytest.mark.parametrize("weights", ["zero", "random"])
def test_sphere_closed_inward_volume(res, rel_tol, weights):
    radius = 0.4537  # no grid vertex lies exactly on the sphere
    x, s, cubes, w = _sphere(res, radius, weights)
    assert not bool((s == 0).any())
    out = flexicubes_extract(x, s, cubes, res, w)
    _check_closed_oriented(out)
    exact = 4 / 3 * math.pi * radius**3
    vol = _signed_volume(out.vertices, out.faces)
    assert vol < 0  # raw winding points toward s > 0, i.e. inward
    assert abs(-vol - exact) / exact < rel_tol
    assert float((out.vertices.norm(dim=1) - radius).abs().max()) < 2.0 / res  # within a cell
    again = flexicubes_extract(x, s, cubes, res, w)
    for name in ("vertices", "faces", "l_dev", "surf_cubes", "case_ids"):
        assert torch.equal(getattr(out, name), getattr(again, name)), name


def test_sphere_known_counts_at_80():
    # The plain r = 0.5 sphere with zero weights (exact zeros included) gives 7544 / 15084 / 30168 in
    # the reference implementation.
    x, s, cubes, w = _sphere(80, 0.5, "zero")
    out = flexicubes_extract(x, s, cubes, 80, w)
    assert (out.vertices.shape[0], out.faces.shape[0], out.l_dev.shape[0]) == (7544, 15084, 30168)


def test_float64_input():
    x, s, cubes, w = _sphere(20, 0.4537, "random", dtype=torch.float64)
    out64 = flexicubes_extract(x, s, cubes, 20, w)
    assert out64.vertices.dtype == torch.float64 and out64.l_dev.dtype == torch.float64
    out32 = flexicubes_extract(x.float(), s.float(), cubes, 20, w.float())
    assert torch.equal(out64.faces, out32.faces)
    assert torch.allclose(out64.vertices.float(), out32.vertices, atol=1e-5)
    _check_closed_oriented(out64)


def test_exact_zero_orientation_quirk():
    # Planes s = 5.001 - k and s = 5 - k (k = z index): the first normals point to -z (the s > 0 side);
    # with exact zeros on the first endpoints the second form is used and the normals point to +z.
    res = 10
    verts, cubes = construct_grid(res)
    k = torch.arange(res + 1, dtype=torch.float32).repeat((res + 1) ** 2)
    w = torch.zeros((cubes.shape[0], 21))
    for offset, sign in ((5.001, -1.0), (5.0, 1.0)):
        out = flexicubes_extract(verts, offset - k, cubes, res, w)
        tri = out.vertices[out.faces]
        normal_z = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)[:, 2]
        assert out.faces.shape[0] == 2 * (res - 1) ** 2
        assert bool((normal_z * sign > 0).all())


def test_differentiable_float64():
    # Not used by CRM inference, but the vertex positions are differentiable in x, s and the weights.
    x, s, cubes, w = (t.double() if t.is_floating_point() else t for t in _random_inputs(3, "gauss", 11))
    s = s + 0.01  # keep away from exact zeros
    args = (x.requires_grad_(), s.requires_grad_(), w.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda x_, s_, w_: flexicubes_extract(x_, s_, cubes, 3, w_).vertices,
        args,
        eps=1e-7,
        atol=1e-5,
        fast_mode=True,
    )


# ----------------------------------------------------------------------------------------------------
# Empty surface and bad input


@pytest.mark.parametrize("value", [1.0, -1.0, 0.0])
def test_empty_surface(value):
    verts, cubes = construct_grid(4)
    s = torch.full((verts.shape[0],), value)
    out = flexicubes_extract(verts, s, cubes, 4, torch.zeros((cubes.shape[0], 21)))
    assert out.vertices.shape == (0, 3) and out.vertices.dtype == torch.float32
    assert out.faces.shape == (0, 3) and out.faces.dtype == torch.int64
    assert out.l_dev.shape == (0,) and out.case_ids.shape == (0,)
    assert out.surf_cubes.shape == (64,) and not bool(out.surf_cubes.any())


def test_surface_only_on_boundary():
    # One negative grid-corner vertex: one cube, one dual vertex, no interior edge, no face.
    verts, cubes = construct_grid(3)
    s = torch.ones(verts.shape[0])
    s[0] = -1.0
    out = flexicubes_extract(verts, s, cubes, 3, torch.zeros((cubes.shape[0], 21)))
    assert (out.vertices.shape[0], out.faces.shape[0], out.l_dev.shape[0]) == (1, 0, 3)


def _good():
    x, s, cubes, w = _random_inputs(3, "gauss", 5)
    return {"x": x, "s": s, "cubes": cubes, "res": 3, "weights": w}


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(x=a["x"][:, :2]), ValueError, "x must have shape"),
        (lambda a: a.update(res=4), ValueError, "res=4"),
        (lambda a: a.update(res=0), ValueError, "res must be"),
        (lambda a: a.update(s=a["s"][:-1]), ValueError, "s must have shape"),
        (lambda a: a.update(cubes=a["cubes"][:-1]), ValueError, "cubes must have shape"),
        (lambda a: a.update(weights=a["weights"][:, :20]), ValueError, "weights must have shape"),
        (lambda a: a.update(cubes=a["cubes"].flip(0)), ValueError, "layout"),
        (lambda a: a.update(cubes=a["cubes"].float()), TypeError, "cubes must be int64"),
        (lambda a: a.update(s=a["s"].double()), TypeError, "dtype"),
        (lambda a: a["s"].__setitem__(3, float("nan")), ValueError, "s contains 1 non-finite"),
        (lambda a: a["x"].__setitem__((2, 1), float("inf")), ValueError, "x contains 1 non-finite"),
        (lambda a: a["weights"].__setitem__((0, 20), float("nan")), ValueError, "weights contains"),
        (lambda a: a.update(weight_scale=0.0), ValueError, "weight_scale"),
        (lambda a: a.update(training=True), NotImplementedError, "training=True"),
    ],
)
def test_bad_input(change, error, match):
    args = _good()
    flexicubes_extract(**args)  # the unchanged inputs work
    change(args)
    with pytest.raises(error, match=match):
        flexicubes_extract(**args)


# ----------------------------------------------------------------------------------------------------
# Devices


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_cuda_agree():
    cases = [_sphere(80, 0.4537, "random"), _random_inputs(20, "gauss", 7)]
    res_of = [80, 20]
    for (x, s, cubes, w), res in zip(cases, res_of):
        cpu = flexicubes_extract(x, s, cubes, res, w)
        gpu = flexicubes_extract(x.cuda(), s.cuda(), cubes.cuda(), res, w.cuda())
        assert gpu.vertices.device.type == "cuda" and gpu.faces.device.type == "cuda"
        assert torch.equal(cpu.surf_cubes, gpu.surf_cubes.cpu())
        assert torch.equal(cpu.case_ids, gpu.case_ids.cpu())
        assert torch.equal(cpu.faces, gpu.faces.cpu())
        torch.testing.assert_close(gpu.vertices.cpu(), cpu.vertices, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(gpu.l_dev.cpu(), cpu.l_dev, atol=1e-6, rtol=1e-6)
        again = flexicubes_extract(x.cuda(), s.cuda(), cubes.cuda(), res, w.cuda())
        assert torch.equal(gpu.vertices, again.vertices) and torch.equal(gpu.faces, again.faces)
