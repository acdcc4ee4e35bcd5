"""FlexiCubes lookup tables, generated from first principles (no copied data).

Every table here is produced by a short procedure over the 256 sign configurations of a cube, run once
per process and cached; nothing is pasted in from another implementation.

Conventions (see docs/flexicubes.md):

* Corner ``n`` (0..7) of a cube has offset ``(n & 1, (n >> 1) & 1, (n >> 2) & 1)`` (x fastest).
* The 12 cube edges are *ordered* corner pairs ``CUBE_EDGES[k] = (first, second)``. x- and z-edges run
  from the lower to the higher coordinate, y-edges from the higher y to the lower y.
* A corner is *negative* iff its scalar value is ``< 0``; the case id of a cube is the sum of ``2**n``
  over its negative corners.

Procedure for the edge groups (one dual vertex per group):

1. crossed edges = edges whose two corners have different signs;
2. on each of the 6 faces, connect the crossed edges: 2 crossed edges are joined; on an ambiguous face
   (4 crossed edges) each pair of crossed edges that meets at a *negative* corner is joined;
3. groups = connected components of the crossed edges, edges ascending inside a group;
4. groups ordered by the smallest negative corner they touch, except case 231 whose two groups are
   swapped (equivalently: the four cases whose two non-negative corners lie on a body diagonal order
   their groups by non-negative corner, and only 231 differs from rule 4).

Ambiguity table: a case is *flagged* iff it has exactly one ambiguous face and exactly one group; it
stores the direction (cube-coordinate offset) to the neighbour across that face and the inverted case
``255 - c``.

Both tables are checked against published SHA-256 digests of a canonical text serialisation
(:func:`groups_digest`, :func:`ambiguity_digest`) every time they are generated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "CORNER_OFFSETS",
    "CUBE_EDGES",
    "EDGE_AXIS",
    "QUAD_EDGES",
    "GROUPS_SHA256",
    "AMBIGUITY_SHA256",
    "MAX_GROUPS",
    "MAX_GROUP_SIZE",
    "FlexiCubesTables",
    "generate_case_groups",
    "generate_ambiguity_table",
    "groups_canonical_text",
    "ambiguity_canonical_text",
    "groups_digest",
    "ambiguity_digest",
    "get_tables",
]

#: (8, 3) offsets (dx, dy, dz) of the cube corners; corner n = dx + 2*dy + 4*dz.
CORNER_OFFSETS: tuple[tuple[int, ...], ...] = tuple((n & 1, (n >> 1) & 1, (n >> 2) & 1) for n in range(8))

#: The 12 ordered cube edges (first corner, second corner); the order fixes beta and every table.
CUBE_EDGES: tuple[tuple[int, int], ...] = (
    (0, 1),
    (1, 5),
    (4, 5),
    (0, 4),
    (2, 3),
    (3, 7),
    (6, 7),
    (2, 6),
    (2, 0),
    (3, 1),
    (7, 5),
    (6, 4),
)

#: Axis (0 = x, 1 = y, 2 = z) of each cube edge, derived from the corner offsets.
EDGE_AXIS: tuple[int, ...] = tuple(
    next(a for a in range(3) if CORNER_OFFSETS[p][a] != CORNER_OFFSETS[q][a]) for p, q in CUBE_EDGES
)


def _quad_edges() -> tuple[tuple[int, int, int, int], ...]:
    """Per axis A, the cube edge under which each of the 4 cubes around an A-edge sees that edge.

    With (B, C) the other two axes in x, y, z order, the cubes around a grid edge sit at offsets
    (-,-), (-,+), (+,-), (+,+) in (B, C), which is also their ascending cube-index order. The cube at
    (-,-) holds the edge at its local (B, C) = (1, 1) position, (-,+) at (1, 0), (+,-) at (0, 1) and
    (+,+) at (0, 0).
    """
    out = []
    for axis in range(3):
        ax_b, ax_c = (a for a in range(3) if a != axis)
        row = []
        for ob, oc in ((1, 1), (1, 0), (0, 1), (0, 0)):
            for k, (p, _q) in enumerate(CUBE_EDGES):
                if EDGE_AXIS[k] == axis and (CORNER_OFFSETS[p][ax_b], CORNER_OFFSETS[p][ax_c]) == (ob, oc):
                    row.append(k)
        out.append(tuple(row))
    return tuple(out)


#: (3, 4) cube edges of an interior grid edge along x, y, z as seen by its 4 cubes (ascending index).
QUAD_EDGES: tuple[tuple[int, int, int, int], ...] = _quad_edges()

#: SHA-256 of :func:`groups_canonical_text` (FLEXICUBES description, section 3.1).
GROUPS_SHA256 = "af38664561dd4c5f41548ec2f56f3c2472d3d71bcb9cb34253bb9c5a3e46bc88"
#: SHA-256 of :func:`ambiguity_canonical_text` (FLEXICUBES description, section 3.2).
AMBIGUITY_SHA256 = "08aee2f8434d92eae8178be3d8328125502ec10bc3d51479935152c41d7dd36c"

MAX_GROUPS = 4  # most dual vertices a cube can emit
MAX_GROUP_SIZE = 7  # most crossed edges in one group

# Case whose group order differs from the "smallest negative corner" rule (see module docstring).
_SWAPPED_CASE = 231


def _faces() -> list[tuple[int, int, list[int], list[int]]]:
    """The 6 cube faces as (axis, side, corners, edges lying in the face)."""
    out = []
    for axis in range(3):
        for side in (0, 1):
            corners = [n for n in range(8) if CORNER_OFFSETS[n][axis] == side]
            edges = [k for k, (p, q) in enumerate(CUBE_EDGES) if p in corners and q in corners]
            out.append((axis, side, corners, edges))
    return out


def _analyse_case(case: int) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Edge groups of one case and its ambiguous faces as (axis, side)."""
    neg = [bool((case >> n) & 1) for n in range(8)]
    crossed = [k for k, (p, q) in enumerate(CUBE_EDGES) if neg[p] != neg[q]]
    parent = {k: k for k in crossed}

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    ambiguous: list[tuple[int, int]] = []
    for axis, side, corners, edges in _faces():
        face_crossed = [k for k in edges if k in parent]
        if len(face_crossed) == 2:
            union(*face_crossed)
        elif len(face_crossed) == 4:
            ambiguous.append((axis, side))
            for n in corners:
                if neg[n]:
                    incident = [k for k in face_crossed if n in CUBE_EDGES[k]]
                    union(*incident)

    comps: dict[int, list[int]] = {}
    for k in crossed:
        comps.setdefault(find(k), []).append(k)
    groups = [sorted(g) for g in comps.values()]

    def min_negative_corner(group: list[int]) -> int:
        return min(c for k in group for c in CUBE_EDGES[k] if neg[c])

    groups.sort(key=min_negative_corner)
    if case == _SWAPPED_CASE:
        groups.reverse()
    return groups, ambiguous


@lru_cache(maxsize=1)
def generate_case_groups() -> tuple[tuple[tuple[int, ...], ...], ...]:
    """For each case id 0..255, the ordered tuple of edge groups (each an ascending tuple of edges)."""
    return tuple(tuple(tuple(g) for g in _analyse_case(c)[0]) for c in range(256))


@lru_cache(maxsize=1)
def generate_ambiguity_table() -> dict[int, tuple[tuple[int, int, int], int]]:
    """Flagged cases ``{case: ((da, db, dc), 255 - case)}`` (exactly one ambiguous face, one group)."""
    out: dict[int, tuple[tuple[int, int, int], int]] = {}
    for c in range(256):
        groups, ambiguous = _analyse_case(c)
        if len(ambiguous) == 1 and len(groups) == 1:
            axis, side = ambiguous[0]
            direction = [0, 0, 0]
            direction[axis] = 1 if side == 1 else -1
            out[c] = ((direction[0], direction[1], direction[2]), 255 - c)
    return out


def groups_canonical_text(groups: tuple[tuple[tuple[int, ...], ...], ...] | None = None) -> str:
    """Canonical serialisation: one line per case, groups joined by ``|``, edges by ``,``."""
    groups = generate_case_groups() if groups is None else groups
    return "\n".join("|".join(",".join(str(k) for k in g) for g in case) for case in groups)


def ambiguity_canonical_text(table: dict[int, tuple[tuple[int, int, int], int]] | None = None) -> str:
    """Canonical serialisation: ``"{c}:{da},{db},{dc}:{inverse}"`` per flagged case, ascending."""
    table = generate_ambiguity_table() if table is None else table
    return "\n".join(f"{c}:{d[0]},{d[1]},{d[2]}:{inv}" for c, (d, inv) in sorted(table.items()))


def groups_digest() -> str:
    return hashlib.sha256(groups_canonical_text().encode("utf-8")).hexdigest()


def ambiguity_digest() -> str:
    return hashlib.sha256(ambiguity_canonical_text().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class FlexiCubesTables:
    """Tensor form of the tables, all on one device.

    groups:      (256, 4, 7) int64, cube-edge indices of each group, padded with -1
    n_groups:    (256,) int64, dual vertices per case
    flagged:     (256,) bool, case takes part in the ambiguity fix
    direction:   (256, 3) int64, cube-coordinate offset to the neighbour across the ambiguous face
    edges:       (12, 2) int64, CUBE_EDGES
    quad_edges:  (3, 4) int64, QUAD_EDGES
    """

    groups: torch.Tensor
    n_groups: torch.Tensor
    flagged: torch.Tensor
    direction: torch.Tensor
    edges: torch.Tensor
    quad_edges: torch.Tensor

    def to(self, device: torch.device) -> FlexiCubesTables:
        return FlexiCubesTables(**{k: getattr(self, k).to(device) for k in self.__dataclass_fields__})


@lru_cache(maxsize=1)
def _cpu_tables() -> FlexiCubesTables:
    got_groups, got_amb = groups_digest(), ambiguity_digest()
    if got_groups != GROUPS_SHA256 or got_amb != AMBIGUITY_SHA256:
        raise RuntimeError(
            f"generated FlexiCubes tables do not match their reference digests "
            f"(groups {got_groups} vs {GROUPS_SHA256}, ambiguity {got_amb} vs {AMBIGUITY_SHA256})"
        )
    case_groups = generate_case_groups()
    groups = torch.full((256, MAX_GROUPS, MAX_GROUP_SIZE), -1, dtype=torch.int64)
    n_groups = torch.zeros(256, dtype=torch.int64)
    for c, case in enumerate(case_groups):
        n_groups[c] = len(case)
        for g, edges in enumerate(case):
            groups[c, g, : len(edges)] = torch.tensor(edges, dtype=torch.int64)
    flagged = torch.zeros(256, dtype=torch.bool)
    direction = torch.zeros((256, 3), dtype=torch.int64)
    for c, (d, _inv) in generate_ambiguity_table().items():
        flagged[c] = True
        direction[c] = torch.tensor(d, dtype=torch.int64)
    edges = torch.tensor(CUBE_EDGES, dtype=torch.int64)
    quad_edges = torch.tensor(QUAD_EDGES, dtype=torch.int64)
    return FlexiCubesTables(groups, n_groups, flagged, direction, edges, quad_edges)


_DEVICE_CACHE: dict[torch.device, FlexiCubesTables] = {}


def get_tables(device: torch.device | str | None = None) -> FlexiCubesTables:
    """The tables on ``device`` (generated and digest-checked once per process, then cached)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    tables = _DEVICE_CACHE.get(device)
    if tables is None:
        tables = _cpu_tables().to(device)
        _DEVICE_CACHE[device] = tables
    return tables
