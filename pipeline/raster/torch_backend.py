"""Pure-PyTorch rasterizer (CPU or CUDA), tiled so memory stays bounded.

Algorithm (per view):

1. Project the triangles to pixel coordinates and compute their screen bounding boxes. Boxes larger than
   ``tile`` x ``tile`` pixels are cut into tiles; every (triangle, tile) work item is put into the smallest
   size class ``(Sh, Sw)`` (per dimension, from a fixed ladder of sizes) that holds it.
2. For each size class, items are processed in chunks of at most ``chunk_pixels`` candidate pixels as dense
   ``(items, Sh, Sw)`` tensors: barycentric edge functions are evaluated by broadcasting per-item
   coefficients, so there is no per-pixel gather and never a pixels x triangles matrix. Covered candidates
   write a packed 64-bit key ``(quantised depth << 32) | triangle index`` into the frame with
   ``scatter_reduce(amin)``: the
   nearest surface wins, ties go to the lower triangle index (nvdiffrast's rule).
3. One final per-pixel pass recomputes depth and perspective-correct barycentrics of the winning triangle.

Work is proportional to the summed (rounded-up) bounding-box area, memory to ``chunk_pixels`` plus the frame.
Triangles with a vertex at ``w <= 0`` (crossing the camera plane) are skipped as a whole (nvdiffrast
clips them); everything else follows :mod:`pipeline.raster.base`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Rasterizer, RasterOutput, prepare_inputs

_INSIDE_EPS = 1e-6  # barycentric tolerance: pixel centres on a shared edge are covered by both triangles
_NO_KEY = torch.iinfo(torch.int64).max


_DEPTH_SCALE = float(1 << 29)  # depth key resolution 2^-29 over [-1, 1] (finer than float32 near 1)
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
        tri = clip[faces].double()  # (F, 3, 4)
        cw = tri[..., 3]
        ok = (cw > 1e-12).all(dim=1)
        cw_safe = torch.where(cw > 1e-12, cw, torch.ones_like(cw))
        # Pixel units: pixel (row i, col j) has its centre at (x = j, y = i).
        sx = (tri[..., 0] / cw_safe + 1.0) * (w * 0.5) - 0.5
        sy = (tri[..., 1] / cw_safe + 1.0) * (h * 0.5) - 0.5
        sz = tri[..., 2] / cw_safe
        e1x, e1y = sx[:, 1] - sx[:, 0], sy[:, 1] - sy[:, 0]
        e2x, e2y = sx[:, 2] - sx[:, 0], sy[:, 2] - sy[:, 0]
        det = e1x * e2y - e2x * e1y
        ok &= det.abs() > 1e-12
        ok &= (sz >= -1.0).any(dim=1) & (sz <= 1.0).any(dim=1)
        xmin, xmax = sx.min(dim=1).values, sx.max(dim=1).values
        ymin, ymax = sy.min(dim=1).values, sy.max(dim=1).values
        ok &= (xmax >= 0) & (xmin <= w - 1) & (ymax >= 0) & (ymin <= h - 1)
        c0 = torch.ceil(xmin).clamp(0, w - 1)
        c1 = torch.floor(xmax).clamp(-1, w - 1)
        r0 = torch.ceil(ymin).clamp(0, h - 1)
        r1 = torch.floor(ymax).clamp(-1, h - 1)
        ok &= (c1 >= c0) & (r1 >= r0)
        keep = torch.nonzero(ok).squeeze(1)
        if keep.numel() == 0:
            return
        safe_det = torch.where(ok, det, torch.ones_like(det))
        # Per-triangle coefficients: b1 = (x - x0) * a1 + (y - y0) * b1c; b2 = (x - x0) * a2 + (y - y0) * b2c.
        coef = torch.stack(
            [sx[:, 0], sy[:, 0], e2y / safe_det, -e2x / safe_det, -e1y / safe_det, e1x / safe_det], dim=1
        ).float()
        zs = sz.float()
        inv_w = (1.0 / cw_safe).float()

        keys = torch.full((h * w,), _NO_KEY, dtype=torch.int64, device=dev)
        # Work items: tiles of the bounding boxes.
        t = self.tile
        bw = (c1 - c0 + 1).long()[keep]
        bh = (r1 - r0 + 1).long()[keep]
        ntx = (bw + t - 1) // t
        nty = (bh + t - 1) // t
        n_items = ntx * nty
        item_k = torch.repeat_interleave(torch.arange(keep.numel(), device=dev), n_items)
        local = torch.arange(item_k.numel(), device=dev) - (torch.cumsum(n_items, 0) - n_items)[item_k]
        tx = local % ntx[item_k]
        ty = local // ntx[item_k]
        item_c0 = c0.long()[keep][item_k] + tx * t
        item_r0 = r0.long()[keep][item_k] + ty * t
        item_w = torch.clamp(bw[item_k] - tx * t, max=t)
        item_h = torch.clamp(bh[item_k] - ty * t, max=t)
        item_tri = keep[item_k]
        # Size classes per dimension (few wasted candidates), items sorted by class.
        sizes = torch.tensor([sz for sz in _CLASS_SIZES if sz < t] + [t], device=dev)
        ch = torch.searchsorted(sizes, item_h)
        cwi = torch.searchsorted(sizes, item_w)
        cls = ch * sizes.numel() + cwi
        order = torch.argsort(cls)
        cls_sorted = cls[order]
        uniq, counts = torch.unique_consecutive(cls_sorted, return_counts=True)
        need_zclip = bool(((zs < -1.0) | (zs > 1.0)).any())
        start = 0
        for u, n in zip(uniq.tolist(), counts.tolist()):
            sh, sw = int(sizes[u // sizes.numel()]), int(sizes[u % sizes.numel()])
            per = max(1, self.chunk_pixels // (sh * sw))
            for a in range(start, start + n, per):
                idx = order[a : min(a + per, start + n)]
                self._class_chunk(
                    sh, sw, item_tri[idx], item_r0[idx], item_c0[idx], item_h[idx], item_w[idx],
                    coef, zs, w, keys, need_zclip,
                )  # fmt: skip
            start += n

        covered = torch.nonzero(keys != _NO_KEY).squeeze(1)
        if covered.numel() == 0:
            return
        win = keys[covered] & 0xFFFFFFFF
        cf = coef[win]
        row = torch.div(covered, w, rounding_mode="floor")
        col = covered - row * w
        dx = col.float() - cf[:, 0]
        dy = row.float() - cf[:, 1]
        b1 = dx * cf[:, 2] + dy * cf[:, 3]
        b2 = dx * cf[:, 4] + dy * cf[:, 5]
        bs = torch.stack([1.0 - b1 - b2, b1, b2], dim=1)
        z = (bs * zs[win]).sum(dim=1)
        q = bs.clamp(min=0.0) * inv_w[win]
        q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-30)
        out_tid[covered] = win
        out_depth[covered] = z
        out_bary[covered] = q

    @staticmethod
    def _class_chunk(sh, sw, tri, r0, c0, ih, iw, coef, zs, w, keys, need_zclip):
        dev = tri.device
        ii = torch.arange(sh, device=dev)
        jj = torch.arange(sw, device=dev)
        cf = coef[tri]  # (T, 6)
        zt = zs[tri]  # (T, 3)
        colf = ((c0[:, None] + jj[None, :]).float() - cf[:, 0:1])[:, None, :]  # (T, 1, Sw)
        rowf = ((r0[:, None] + ii[None, :]).float() - cf[:, 1:2])[:, :, None]  # (T, Sh, 1)
        b1 = colf * cf[:, 2, None, None] + rowf * cf[:, 3, None, None]  # (T, Sh, Sw)
        b2 = colf * cf[:, 4, None, None] + rowf * cf[:, 5, None, None]
        inside = (b1 >= -_INSIDE_EPS) & (b2 >= -_INSIDE_EPS) & (b1 + b2 <= 1.0 + _INSIDE_EPS)
        z = zt[:, 0, None, None] + b1 * (zt[:, 1] - zt[:, 0])[:, None, None]
        z = z + b2 * (zt[:, 2] - zt[:, 0])[:, None, None]
        if need_zclip:
            inside &= (z >= -1.0) & (z <= 1.0)
        if sh > 1 or sw > 1:
            inside &= (jj[None, None, :] < iw[:, None, None]) & (ii[None, :, None] < ih[:, None, None])
        pix = (r0[:, None, None] + ii[None, :, None]) * w + (c0[:, None, None] + jj[None, None, :])
        # Packed key: 31-bit quantised depth (z in [-1, 1]) in the high word, triangle index in the low word.
        qz = ((z.clamp(-1.0, 1.0) + 1.0) * _DEPTH_SCALE).long()
        key = torch.where(inside, qz * (1 << 32) + tri[:, None, None], _NO_KEY)
        pix = torch.where(inside, pix, 0)
        keys.scatter_reduce_(0, pix.reshape(-1), key.reshape(-1), reduce="amin")
