"""Rigid alignment of a predicted mesh to the ground truth: coarse yaw/pitch search, then ICP.

Both inputs are point samples already in the GT frame (Z up) and of matching size (the caller,
:func:`evaluation.gso.align_to_gt`, matches the sizes first). The result is a rigid transform
``p' = R @ p + t`` (no scale, no reflection).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

__all__ = ["AlignConfig", "Alignment", "rotation_yaw_pitch", "coarse_search", "icp", "align"]


@dataclass
class AlignConfig:
    """Options of :func:`align`.

    Attributes:
        method: ``"icp"`` (coarse search + ICP) or ``"none"`` (identity).
        yaw_step_deg: step of the coarse yaw (about +Z) search over [0, 360).
        pitches_deg: pitch angles (about +Y, after yaw) tried in the coarse search.
        coarse_points: samples per side used by the coarse search.
        icp_points: samples per side used by ICP.
        icp_iters: maximum ICP iterations.
        icp_candidates: number of best coarse candidates refined by ICP (best final score wins).
        icp_tol: stop when the mean residual improves by less than this.
        seed: seed of the subsampling.
    """

    method: str = "icp"
    yaw_step_deg: float = 15.0
    pitches_deg: tuple[float, ...] = (-30.0, -15.0, 0.0, 15.0, 30.0)
    coarse_points: int = 1000
    icp_points: int = 3000
    icp_iters: int = 30
    icp_candidates: int = 3
    icp_tol: float = 1e-6
    seed: int = 0


@dataclass
class Alignment:
    """A rigid transform ``p' = rotation @ p + translation`` and how it was found."""

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    yaw_deg: float = 0.0  # coarse-search start of the winning ICP run
    pitch_deg: float = 0.0
    residual: float = float("nan")  # symmetric mean NN distance on the ICP samples after alignment
    method: str = "none"

    def apply(self, points: np.ndarray) -> np.ndarray:
        """``(N, 3)`` -> ``(N, 3)``."""
        return points @ self.rotation.T + self.translation

    def matrix(self) -> np.ndarray:
        """``(4, 4)`` homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.rotation
        m[:3, 3] = self.translation
        return m

    def angle_deg(self) -> float:
        """Angle of the final rotation (axis-angle magnitude), degrees."""
        c = (np.trace(self.rotation) - 1) / 2
        return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "yaw_deg": round(float(self.yaw_deg), 4),
            "pitch_deg": round(float(self.pitch_deg), 4),
            "rotation_angle_deg": round(float(self.angle_deg()), 4),
            "residual": float(self.residual),
            "matrix": np.round(self.matrix(), 6).tolist(),
        }


def rotation_yaw_pitch(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """``(3, 3)`` rotation: yaw about +Z, then pitch about +Y (``R = Ry(pitch) @ Rz(yaw)``)."""
    a, b = np.deg2rad(yaw_deg), np.deg2rad(pitch_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rz


def _subsample(p: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return p if len(p) <= n else p[rng.choice(len(p), n, replace=False)]


class _Pair:
    """Query subsets and KD-trees over the full sample sets of both sides (trees are built once).

    For a transform ``p -> R p + t`` the prediction queries go to the GT tree as ``R p + t`` and the GT
    queries go to the (untransformed) prediction tree as ``R^T (g - t)``, so nothing is rebuilt.
    """

    def __init__(
        self,
        pred: np.ndarray,
        gt: np.ndarray,
        n: int,
        rng: np.random.Generator,
        pred_normals: np.ndarray | None = None,
        gt_normals: np.ndarray | None = None,
    ) -> None:
        self.pred, self.gt = pred, gt
        self.pn, self.gn = pred_normals, gt_normals
        ip = rng.choice(len(pred), n, replace=False) if len(pred) > n else np.arange(len(pred))
        ig = rng.choice(len(gt), n, replace=False) if len(gt) > n else np.arange(len(gt))
        self.pq, self.gq = pred[ip], gt[ig]
        self.pred_tree = cKDTree(pred)
        self.gt_tree = cKDTree(gt)

    def score(self, r: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """Symmetric mean NN distance and the matched indices (into ``gt`` and ``pred``)."""
        d1, i1 = self.gt_tree.query(self.pq @ r.T + t)
        d2, i2 = self.pred_tree.query((self.gq - t) @ r)
        return 0.5 * (d1.mean() + d2.mean()), i1, i2


def coarse_search(pred: np.ndarray, gt: np.ndarray, cfg: AlignConfig) -> list[tuple[float, float, float]]:
    """Score every (yaw, pitch) rotation about the centroids by symmetric Chamfer distance.

    Args:
        pred: ``(N, 3)`` prediction samples; gt: ``(M, 3)`` GT samples.

    Returns:
        ``[(score, yaw_deg, pitch_deg)]`` sorted best first.
    """
    rng = np.random.default_rng(cfg.seed)
    # Sparse trees: far-off queries (wrong rotations) are slow in a dense tree, and the coarse ranking
    # only needs to tell rotations apart, not sub-millimetre distances.
    pair = _Pair(
        _subsample(pred, 4 * cfg.coarse_points, rng),
        _subsample(gt, 4 * cfg.coarse_points, rng),
        cfg.coarse_points,
        rng,
    )
    pc, gc = pred.mean(0), gt.mean(0)
    out = []
    for yaw in np.arange(0.0, 360.0, cfg.yaw_step_deg):
        for pitch in cfg.pitches_deg:
            r = rotation_yaw_pitch(yaw, pitch)
            out.append((float(pair.score(r, gc - r @ pc)[0]), float(yaw), float(pitch)))
    out.sort()
    return out


def _kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best rotation + translation (least squares) mapping paired ``src`` (N, 3) onto ``dst`` (N, 3)."""
    cs, cd = src.mean(0), dst.mean(0)
    h = (src - cs).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cd - r @ cs


def icp(
    pred: np.ndarray,
    gt: np.ndarray,
    r0: np.ndarray,
    t0: np.ndarray,
    iters: int = 30,
    tol: float = 1e-6,
    points: int = 3000,
    seed: int = 0,
    pred_normals: np.ndarray | None = None,
    gt_normals: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric ICP from an initial transform (point-to-plane when both normals are given).

    Each iteration pairs ``points`` prediction samples with their nearest GT samples and ``points`` GT
    samples with their nearest prediction samples (nearest among *all* samples of the other side, which
    keeps the sampling bias small) and solves for the rigid transform of all pairs.

    Args:
        pred: ``(N, 3)``; gt: ``(M, 3)``; r0: ``(3, 3)``; t0: ``(3,)``; normals ``(N, 3)`` / ``(M, 3)``.

    Returns:
        rotation ``(3, 3)``, translation ``(3,)``, final symmetric mean NN distance.
    """
    pair = _Pair(pred, gt, points, np.random.default_rng(seed), pred_normals, gt_normals)
    return _icp(pair, r0, t0, iters, tol)


def _icp(
    pair: _Pair, r: np.ndarray, t: np.ndarray, iters: int, tol: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Point-to-plane ICP when both sides have normals (fast convergence), else point-to-point."""
    score, i1, i2 = pair.score(r, t)
    planes = pair.pn is not None and pair.gn is not None
    for _ in range(iters):
        if planes:
            # pred query -> GT point with GT normal; GT query -> pred point with (rotated) pred normal
            s_pts = np.concatenate([pair.pq @ r.T + t, pair.pred[i2] @ r.T + t])
            d_pts = np.concatenate([pair.gt[i1], pair.gq])
            nrm = np.concatenate([pair.gn[i1], pair.pn[i2] @ r.T])
            a = np.concatenate([np.cross(s_pts, nrm), nrm], axis=1)  # (K, 6)
            b = ((s_pts - d_pts) * nrm).sum(1)
            x, *_ = np.linalg.lstsq(a, -b, rcond=None)
            w, dt = x[:3], x[3:]
            ang = np.linalg.norm(w)
            k = w / ang if ang > 0 else np.zeros(3)
            kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
            dr = np.eye(3) + np.sin(ang) * kx + (1 - np.cos(ang)) * kx @ kx
            r_new, t_new = dr @ r, dr @ t + dt
        else:
            src = np.concatenate([pair.pq, pair.pred[i2]])
            dst = np.concatenate([pair.gt[i1], pair.gq])
            r_new, t_new = _kabsch(src, dst)
        new, j1, j2 = pair.score(r_new, t_new)
        if new > score:
            break
        done = score - new < tol
        r, t, score, i1, i2 = r_new, t_new, new, j1, j2
        if done:
            break
    return r, t, float(score)


def align(
    pred: np.ndarray,
    gt: np.ndarray,
    cfg: AlignConfig | None = None,
    pred_normals: np.ndarray | None = None,
    gt_normals: np.ndarray | None = None,
) -> Alignment:
    """Rigidly align prediction samples to GT samples.

    Args:
        pred: ``(N, 3)`` prediction surface samples (GT frame, size matched to the GT).
        gt: ``(M, 3)`` GT surface samples.
        cfg: options; ``method="none"`` returns the identity.
        pred_normals, gt_normals: ``(N, 3)`` / ``(M, 3)`` unit normals of the samples; with both, ICP
            minimises point-to-plane distances (converges in few iterations), else point-to-point.

    Returns:
        The :class:`Alignment` (apply it to the prediction's vertices).
    """
    cfg = cfg or AlignConfig()
    if cfg.method == "none":
        return Alignment(method="none")
    if cfg.method != "icp":
        raise ValueError(f"unknown alignment method {cfg.method!r}; expected 'icp' or 'none'")
    cands = coarse_search(pred, gt, cfg)
    pair = _Pair(pred, gt, cfg.icp_points, np.random.default_rng(cfg.seed + 1), pred_normals, gt_normals)
    pc, gc = pred.mean(0), gt.mean(0)
    best: Alignment | None = None
    for _, yaw, pitch in cands[: cfg.icp_candidates]:
        r0 = rotation_yaw_pitch(yaw, pitch)
        r, t, score = _icp(pair, r0, gc - r0 @ pc, cfg.icp_iters, cfg.icp_tol)
        if best is None or score < best.residual:
            best = Alignment(r, t, yaw, pitch, score, "icp")
    assert best is not None
    return best
