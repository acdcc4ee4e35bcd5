"""Pure-PyTorch rasterizer (CPU or CUDA), tiled so memory stays bounded.

Coverage test (homogeneous edge functions, no polygon clipping): with pixel-space homogeneous vertices
``P_i = (x_i W/2 + w_i (W/2 - 1/2), y_i H/2 + w_i (H/2 - 1/2), w_i)`` and ``M = [P_0 P_1 P_2]``, the
vector ``L(u, v) = M^-1 (u, v, 1)`` is affine in the pixel centre ``(u, v)``. The ray through the pixel hits
the triangle's plane at the point with barycentrics ``L / sum(L)`` and ``w = 1 / sum(L)``, and its NDC depth
``z/w = sum_i L_i z_i`` is affine as well. A pixel is drawn where all ``L_i >= 0`` (up to a relative
tolerance; this also puts the hit point in front of the eye, ``sum(L) > 0``) and ``-1 <= z/w <= 1``, which
is exactly nvdiffrast's near/far clipping, also for triangles with vertices at ``w <= 0`` (crossing the
camera plane).

Algorithm (per view):

1. Compute the triangles' screen bounding boxes: from the projected vertices, or for triangles with a
   vertex behind the near plane (``z < -w``) or at ``w <= 0`` from the triangle clipped against the near
   plane in clip space (triangles entirely behind it are dropped). Boxes larger than ``tile`` x ``tile``
   pixels are cut into tiles; every (triangle, tile) work item is put into the smallest size class
   ``(Sh, Sw)`` (per dimension, from a fixed ladder of sizes) that holds it.
2. Items are sorted by size class and processed in chunks of at most ``chunk_pixels`` candidate pixels as
   dense ``(function, items, Sh * Sw)`` tensors: the three coverage functions and the depth key are affine,
   so one small float32 GEMM (per-item value at the item's corner, computed in float64, and slopes, times
   the class's pixel offsets; elementwise on CUDA or under reduced-precision matmul settings) evaluates
   them all; there is no per-pixel gather and never a pixels x triangles matrix. Covered candidates write a
   packed 64-bit key ``(quantised depth << 32) | triangle index`` into the frame with
   ``scatter_reduce(amin)``: the nearest surface wins, ties go to the lower triangle index (nvdiffrast's
   rule).
3. One final per-pixel pass takes the depth from the winning key and computes the perspective-correct
   barycentrics ``L / sum(L)`` of the winning triangle in float64.

Work is proportional to the summed (rounded-up) bounding-box area, memory to ``chunk_pixels`` plus the frame
and per-triangle data. Degenerate triangles (zero area, or seen edge-on) are not drawn; everything else
follows :mod:`pipeline.raster.base`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rasterizer, RasterOutput, prepare_inputs

_INSIDE_EPS = 1e-6  # barycentric tolerance: pixel centres on a shared edge are covered by both triangles
_NO_KEY = torch.iinfo(torch.int64).max


_DEPTH_SCALE = float(1 << 29)  # depth key (z/w + 1) * 2^29 in [0, 2^30], evaluated in float32
_CLASS_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 96, 128, 192, 256)


class TorchRasterizer(Rasterizer):
    """Tiled PyTorch rasterizer.

    Args:
        device: torch device for the computation (outputs live there).
        chunk_pixels: maximum candidate pixels evaluated at once (memory ~ 60 bytes each).
        tile: largest work-item edge in pixels; bigger boxes are split into tiles (power of two).
    """

    name = "torch"

    def __init__(self, device=None, chunk_pixels: int = 1 << 21, tile: int = 64) -> None:
        super().__init__(device)
        if chunk_pixels < 1:
            raise ValueError("chunk_pixels must be positive")
        if tile < 1 or tile & (tile - 1):
            raise ValueError(f"tile must be a power of two, got {tile}")
        self.chunk_pixels = int(chunk_pixels)
        self.tile = int(tile)

    @torch.no_grad()
    def rasterize(self, clip_pos, faces, resolution: tuple[int, int]) -> RasterOutput:
        clip, f, h, w = prepare_inputs(clip_pos, faces, resolution, self.device)
        b = clip.shape[0]
        tid = torch.full((b, h * w), -1, dtype=torch.int64, device=self.device)
        bary = torch.zeros((b, h * w, 3), dtype=torch.float32, device=self.device)
        depth = torch.zeros((b, h * w), dtype=torch.float32, device=self.device)
        if f.shape[0] > 0:
            for i in range(b):
                self._rasterize_view(clip[i], f, h, w, tid[i], bary[i], depth[i])
        return RasterOutput(tid.view(b, h, w), bary.view(b, h, w, 3), depth.view(b, h, w))

    def _rasterize_view(self, clip: Tensor, faces: Tensor, h: int, w: int, out_tid, out_bary, out_depth):
        dev = clip.device
        # Component-major float64 vertex data: (4, 3, F) = (x y z w, vertex 0..2, triangle).
        tri = clip.double().T[:, faces.T]
        cx, cy, cz, cw = tri.unbind(0)  # (3, F) each
        # Homogeneous pixel coordinates P_i = (X, Y, W): P / W is the pixel position (centre of pixel (row i,
        # col j) at (j, i)).
        hx = cx * (w * 0.5) + cw * (w * 0.5 - 0.5)
        hy = cy * (h * 0.5) + cw * (h * 0.5 - 0.5)
        # Edge functions E_i = P_{i+1} x P_{i+2} = det * (row i of M^-1), components (d/du, d/dv, constant).
        nxt, nn = [1, 2, 0], [2, 0, 1]
        xj, yj, wj, xk, yk, wk = hx[nxt], hy[nxt], cw[nxt], hx[nn], hy[nn], cw[nn]
        ea, eb, ec = yj * wk - wj * yk, wj * xk - xj * wk, xj * yk - yj * xk  # (3, F) each
        det = hx[0] * ea[0] + hy[0] * eb[0] + cw[0] * ec[0]
        front = (cw > 1e-12).all(dim=0)
        cw_safe = torch.where(front, cw, 1.0)
        # Degenerate: screen-space area ~0 (det / (w0 w1 w2) is the doubled pixel area), or, for a triangle
        # crossing the camera plane, a plane (nearly) through the eye, relative to the vertex magnitudes.
        scale = torch.where(
            front, cw_safe.prod(dim=0), (hx * hx + hy * hy + cw * cw).prod(dim=0).sqrt() * 1e-10
        )
        ok = det.abs() > 1e-12 * scale
        # A drawn point is a convex combination of the vertices with -w <= z <= w.
        in_near = cz + cw >= 0
        ok &= in_near.any(dim=0) & (cw - cz >= 0).any(dim=0)
        sx = hx / cw_safe
        sy = hy / cw_safe
        xmin, xmax = sx.min(dim=0).values, sx.max(dim=0).values
        ymin, ymax = sy.min(dim=0).values, sy.max(dim=0).values
        nclip = torch.nonzero(ok & ~(front & in_near.all(dim=0))).squeeze(1)
        if nclip.numel():
            box = self._near_clipped_boxes(tri[:, :, nclip], h, w)
            xmin[nclip], xmax[nclip], ymin[nclip], ymax[nclip] = box.unbind(0)
        ok &= (xmax >= 0) & (xmin <= w - 1) & (ymax >= 0) & (ymin <= h - 1)
        c0 = torch.ceil(xmin).clamp(0, w - 1)
        c1 = torch.floor(xmax).clamp(-1, w - 1)
        r0 = torch.ceil(ymin).clamp(0, h - 1)
        r1 = torch.floor(ymax).clamp(-1, h - 1)
        ok &= (c1 >= c0) & (r1 >= r0)
        keep = torch.nonzero(ok).squeeze(1)
        if keep.numel() == 0:
            return
        # Affine functions of the pixel centre (u, v), tables (triangle, function, component) with components
        # (d/du, d/dv, constant): rows of M^-1 (L_0..2, float64, final pass); for coverage and keys
        # L_i + eps * sum(L) >= 0 and the quantised depth (z/w + 1) * _DEPTH_SCALE, z/w = sum_i L_i z_i
        # (scaling by a power of two keeps float32 precision).
        comp = torch.stack([ea, eb, ec]) / torch.where(ok, det, 1.0)  # (component, vertex, F): rows of M^-1
        zrow = (comp * cz).sum(dim=1, keepdim=True) * _DEPTH_SCALE
        zrow[2] += _DEPTH_SCALE
        lin = torch.cat([comp + _INSIDE_EPS * comp.sum(dim=1, keepdim=True), zrow], 1)  # (3, 4, F)
        lin = lin.permute(2, 1, 0).contiguous()  # (F, 4, 3)
        inv = comp.permute(2, 0, 1).reshape(-1, 9).contiguous()  # (F, 9): d/du, d/dv, constants of L_0..2
        need_zclip = bool(((cz.abs() > cw).any(dim=0) & ok).any())

        # Work items: tiles of the bounding boxes.
        t = self.tile
        c0, r0 = c0.long()[keep], r0.long()[keep]
        bw = c1.long()[keep] - c0 + 1
        bh = r1.long()[keep] - r0 + 1
        ntx = (bw + t - 1) // t
        nty = (bh + t - 1) // t
        n_items = ntx * nty
        item_k = torch.repeat_interleave(torch.arange(keep.numel(), device=dev), n_items)
        local = torch.arange(item_k.numel(), device=dev) - (torch.cumsum(n_items, 0) - n_items)[item_k]
        tx = local % ntx[item_k]
        ty = local // ntx[item_k]
        item_w = torch.clamp(bw[item_k] - tx * t, max=t)
        item_h = torch.clamp(bh[item_k] - ty * t, max=t)
        # Size classes per dimension (few wasted candidates); items sorted by class so that every chunk is a
        # contiguous slice of the per-item tables.
        sizes = torch.tensor([sz for sz in _CLASS_SIZES if sz < t] + [t], device=dev)
        # Classes that only hold items of exactly their size need no item-box mask.
        exact_fit = [sizes[0].item() == 1] + [a + 1 == b for a, b in zip(sizes.tolist(), sizes.tolist()[1:])]
        cls = torch.searchsorted(sizes, item_h) * sizes.numel() + torch.searchsorted(sizes, item_w)
        order = torch.argsort(cls)
        cls, item_k, tx, ty, item_w, item_h = (x[order] for x in (cls, item_k, tx, ty, item_w, item_h))
        item_c0 = c0[item_k] + tx * t
        item_r0 = r0[item_k] + ty * t
        item_tri = keep[item_k]
        # Per item and function (value at the item's corner pixel, d/du, d/dv); the corner value is computed
        # in float64 (no float32 cancellation). Function-major (4, N, 3) float32.
        li = lin.index_select(0, item_tri)  # (N, 4, 3)
        corner = li[..., 0] * item_c0[:, None] + li[..., 1] * item_r0[:, None] + li[..., 2]
        item_coef = torch.cat([corner[..., None], li[..., :2]], 2).float().transpose(0, 1).contiguous()
        del li, corner
        uniq, counts = torch.unique_consecutive(cls, return_counts=True)
        gemm = _exact_float32_gemm(dev)
        # Frame of keys plus one padding slot that absorbs the (no-op) updates of uncovered candidates.
        keys = torch.full((h * w + 1,), _NO_KEY, dtype=torch.int64, device=dev)
        start = 0
        for u, n in zip(uniq.tolist(), counts.tolist()):
            hi, wi = u // sizes.numel(), u % sizes.numel()
            sh, sw = int(sizes[hi]), int(sizes[wi])
            per = max(1, self.chunk_pixels // (sh * sw))
            for a in range(start, start + n, per):
                sl = slice(a, min(a + per, start + n))
                self._class_chunk(
                    sh, sw, item_tri[sl], item_coef[:, sl], item_r0[sl], item_c0[sl],
                    None if exact_fit[hi] else item_h[sl], None if exact_fit[wi] else item_w[sl],
                    w, keys, need_zclip, gemm,
                )  # fmt: skip
            start += n
        keys = keys[: h * w]

        covered = torch.nonzero(keys != _NO_KEY).squeeze(1)
        if covered.numel() == 0:
            return
        # Depth from the key; perspective-correct barycentrics L / sum(L) in float64 (small steps keep the
        # float64 temporaries in cache).
        step = 1 << 16
        for a in range(0, covered.numel(), step):
            pix = covered[a : a + step]
            key = keys[pix]
            win = key & 0xFFFFFFFF
            row = torch.div(pix, w, rounding_mode="floor")
            col = (pix - row * w).double()
            fn = inv.index_select(0, win)
            q = torch.addcmul(fn[:, 6:], fn[:, :3], col[:, None]).addcmul_(fn[:, 3:6], row.double()[:, None])
            q.clamp_(min=0.0)
            q /= q.sum(dim=1, keepdim=True).clamp_(min=1e-300)
            out_tid[pix] = win
            out_depth[pix] = ((key >> 32).double() + 0.5).mul_(1.0 / _DEPTH_SCALE).sub_(1.0).float()
            out_bary[pix] = q.float()

    @staticmethod
    def _near_clipped_boxes(tri: Tensor, h: int, w: int) -> Tensor:
        """Screen boxes ``(xmin, xmax, ymin, ymax)`` (4, N) in pixel units of (4, 3, N) clip-space triangles
        (component, vertex, triangle) clipped to the near half-space ``z + w >= 0``.

        The clipped polygon's vertices are the kept vertices plus the edge/plane crossings (order does not
        matter for a box). Empty (inf, -inf) when nothing is left; the whole screen when a remaining point
        has ``w <= 0`` (not possible with perspective or orthographic cameras, whose near plane is at w > 0).
        """
        dist = tri[2] + tri[3]  # (3, N) signed distance to the near plane
        nxt = tri[:, [1, 2, 0]]
        dnxt = dist[[1, 2, 0]]
        keep_v = dist >= 0
        crosses = keep_v != (dnxt >= 0)
        s = dist / torch.where(crosses, dist - dnxt, 1.0)
        pts = torch.cat([tri, tri + s * (nxt - tri)], 1)  # (4, 6, N): vertices, edge crossings
        valid = torch.cat([keep_v, crosses], 0)
        pw_ok = pts[3] > 1e-12
        pw = torch.where(pw_ok, pts[3], 1.0)
        px = (pts[0] / pw + 1.0) * (w * 0.5) - 0.5
        py = (pts[1] / pw + 1.0) * (h * 0.5) - 0.5
        use = valid & pw_ok
        inf = float("inf")
        box = torch.stack(
            [
                torch.where(use, px, inf).min(dim=0).values,
                torch.where(use, px, -inf).max(dim=0).values,
                torch.where(use, py, inf).min(dim=0).values,
                torch.where(use, py, -inf).max(dim=0).values,
            ]
        )
        unbounded = (valid & ~pw_ok).any(dim=0)
        full = torch.tensor([[0.0], [w - 1.0], [0.0], [h - 1.0]], dtype=box.dtype, device=box.device)
        return torch.where(unbounded, full, box)

    @staticmethod
    def _class_chunk(sh, sw, tri, coef, r0, c0, ih, iw, w, keys, need_zclip, gemm):
        """Evaluate T items of one size class (Sh, Sw) and merge their keys into ``keys``.

        ``coef`` (4, T, 3): per function (coverage 0..2, depth key) and item, the value at the item's corner
        and the d/du, d/dv slopes; ``ih`` / ``iw``: item sizes, None where every item fills the class.
        """
        dev = tri.device
        ii = torch.arange(sh, device=dev).repeat_interleave(sw)
        jj = torch.arange(sw, device=dev).repeat(sh)
        # Function-major rows so that each evaluated function is one contiguous (T, Sh * Sw) block; the item
        # box constraints iw - 1 - j >= 0, ih - 1 - i >= 0 are two more affine rows where needed.
        rows = [coef]
        one = torch.ones_like(coef[0, :, 0])
        if iw is not None:
            rows.append(torch.stack([iw.to(one.dtype) - 1.0, -one, 0.0 * one], 1)[None])
        if ih is not None:
            rows.append(torch.stack([ih.to(one.dtype) - 1.0, 0.0 * one, -one], 1)[None])
        coef = torch.cat(rows, 0) if len(rows) > 1 else coef
        grid = torch.stack(
            [torch.ones(ii.shape, dtype=one.dtype, device=dev), jj.to(one.dtype), ii.to(one.dtype)]
        )
        g = _affine(coef, grid, gemm)  # (R, T, Sh * Sw)
        inside = g[0] >= 0
        for r in range(1, g.shape[0]):
            if r != 3:
                inside &= g[r] >= 0
        zq = g[3]
        if need_zclip:  # -1 <= z/w <= 1
            inside &= zq >= 0
            inside &= zq <= 2.0 * _DEPTH_SCALE
        # Packed key: 31-bit quantised depth in the high word, triangle index in the low word.
        key = zq.long()
        key.mul_(1 << 32).add_(tri[:, None])
        pix = (r0 * w + c0)[:, None] + (ii * w + jj)[None, :]
        outside = ~inside
        key.masked_fill_(outside, _NO_KEY)
        pix.masked_fill_(outside, keys.numel() - 1)  # the padding slot (also for pixels past the item)
        keys.scatter_reduce_(0, pix.reshape(-1), key.reshape(-1), reduce="amin")


def _exact_float32_gemm(device: torch.device) -> bool:
    """True where a float32 matmul is plain IEEE float32 (CPU with no reduced-precision matmul setting)."""
    if device.type != "cpu":
        return False  # CUDA may use TF32; the elementwise form is as fast there
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
    except RuntimeError:  # mixed legacy / new precision APIs
        return False
    for obj in (torch.backends, getattr(torch.backends.mkldnn, "matmul", None)):
        if getattr(obj, "fp32_precision", None) not in (None, "none", "ieee"):
            return False
    return True


def _affine(coef: Tensor, grid: Tensor, gemm: bool) -> Tensor:
    """``coef (R, T, 3) @ grid (3, S)`` in float32 arithmetic: a GEMM where that is exact float32, else
    elementwise."""
    if gemm:
        return coef @ grid
    return coef[..., 0:1] * grid[0] + coef[..., 1:2] * grid[1] + coef[..., 2:3] * grid[2]
