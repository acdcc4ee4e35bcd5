"""Image comparisons of the quality checks: silhouette IoU and masked colour PSNR (batched, torch).

Pure functions in the style of kaolin's metrics: tensors in, one value per batch item out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PSNR_CAP_DB", "erode", "masked_psnr", "silhouette_iou"]

#: PSNR of identical colours would be infinite; it is reported as this (an MSE of 1e-10 on [0, 1]).
PSNR_CAP_DB = 100.0


def silhouette_iou(pred: Tensor, target: Tensor) -> Tensor:
    """Intersection over union of two silhouettes.

    Args:
        pred: (B, H, W) bool mask (e.g. the render's coverage).
        target: (B, H, W) bool mask (e.g. the input's foreground).

    Returns:
        (B,) float32 IoU in [0, 1]; 1 where both masks are empty (they agree).
    """
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"masks must both be (B, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}")
    p, t = pred.bool(), target.bool()
    inter = (p & t).flatten(1).sum(1).float()
    union = (p | t).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def masked_psnr(pred: Tensor, target: Tensor, mask: Tensor, max_value: float = 1.0) -> Tensor:
    """PSNR (dB) over the masked pixels: ``10 log10(max_value^2 / MSE)``, MSE over pixels and channels.

    Args:
        pred: (B, H, W, C) float colours.
        target: (B, H, W, C) float colours, same range as `pred`.
        mask: (B, H, W) bool pixels to compare.
        max_value: the colours' peak value (1.0 for [0, 1]).

    Returns:
        (B,) float32 PSNR, at most :data:`PSNR_CAP_DB`; NaN where the mask is empty.
    """
    if pred.shape != target.shape or pred.dim() != 4 or mask.shape != pred.shape[:3]:
        raise ValueError(
            f"expected pred/target (B, H, W, C) and mask (B, H, W), got {tuple(pred.shape)}, "
            f"{tuple(target.shape)}, {tuple(mask.shape)}"
        )
    m = mask.bool()[..., None].float()
    sq = ((pred.float() - target.float()) ** 2 * m).flatten(1).sum(1)
    n = m.flatten(1).sum(1) * pred.shape[-1]
    mse = (sq / n.clamp(min=1)).clamp(min=max_value**2 * 10 ** (-PSNR_CAP_DB / 10))
    psnr = 10.0 * torch.log10(max_value**2 / mse)
    return torch.where(n > 0, psnr, torch.full_like(psnr, float("nan")))


def erode(mask: Tensor, pixels: int = 1) -> Tensor:
    """Binary erosion with a (2p+1)^2 square: (B, H, W) bool -> (B, H, W) bool (outside counts as empty)."""
    if pixels <= 0:
        return mask.bool()
    k = 2 * int(pixels) + 1
    hole = (~mask.bool()).float()[:, None]
    grown = F.max_pool2d(F.pad(hole, (pixels,) * 4, value=1.0), kernel_size=k, stride=1)
    return grown[:, 0] < 0.5
