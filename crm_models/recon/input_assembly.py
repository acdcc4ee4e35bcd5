"""Input assembly: two uint8 strips (RGB, CCM) -> the 12-channel rolled-out U-Net input (SPEC §3).

Strips are R x 6R x 3 uint8 in RGB channel order, views left to right in the order the diffusion stages
deliver them: file indices 001, 002, 003, 004, 005, 000. The result is (1, 12, R, 3R) float32 in [0, 1]:
channels 0-2 RGB row A, 3-5 RGB row B, 6-8 CCM row A, 9-11 CCM row B; width columns [0, R) belong to
the xy plane, [R, 2R) to yz and [2R, 3R) to zx.
"""

from __future__ import annotations

import numpy as np
import torch

from crm_models.views import VIEW_ORDER

#: (source view, transform) per slot; rows A = slots 0-2, B = slots 3-5.
SLOT_SOURCES = (2, 4, 0, 5, 1, 3)

#: CCM channel (after the RGB -> BGR swap: 0 = Z, 1 = Y, 2 = X) kept in each slot: the depth axis.
CCM_KEPT_CHANNEL = (0, 2, 1, 0, 2, 1)


def _slot_transform(view: torch.Tensor, slot: int) -> torch.Tensor:
    """Apply slot `slot`'s pixel permutation to a (..., R, R) view (SPEC §3.2, L = R - 1)."""
    if slot in (0, 1):  # rotate 180: out[i, j] = in[L-i, L-j]
        return view.flip(-2, -1)
    if slot == 2:  # anti-transpose: out[i, j] = in[L-j, L-i]
        return view.flip(-2, -1).transpose(-2, -1)
    if slot == 3:  # horizontal flip: out[i, j] = in[i, L-j]
        return view.flip(-1)
    if slot == 4:  # vertical flip: out[i, j] = in[L-i, j]
        return view.flip(-2)
    if slot == 5:  # rotate 90 clockwise: out[i, j] = in[L-j, i]
        return view.flip(-2).transpose(-2, -1)
    raise ValueError(f"slot must be 0..5, got {slot}")


def validate_strip(strip, resolution: int, what: str) -> torch.Tensor:
    """Check a strip is (R, 6R, 3) uint8 and return it as a CPU-or-device uint8 tensor.

    Raises:
        TypeError: not a numpy array / tensor, or not uint8.
        ValueError: wrong shape.
    """
    if isinstance(strip, np.ndarray):
        if strip.dtype != np.uint8:
            raise TypeError(f"{what} strip must be uint8, got dtype {strip.dtype}")
        strip = torch.from_numpy(np.ascontiguousarray(strip))
    elif isinstance(strip, torch.Tensor):
        if strip.dtype != torch.uint8:
            raise TypeError(f"{what} strip must be uint8, got dtype {strip.dtype}")
    else:
        raise TypeError(f"{what} strip must be a numpy array or torch tensor, got {type(strip).__name__}")
    expected = (resolution, 6 * resolution, 3)
    if tuple(strip.shape) != expected:
        raise ValueError(
            f"{what} strip has shape {tuple(strip.shape)}, expected {expected} "
            f"(R x 6R x 3 with R = plane_resolution = {resolution}, views 001..005,000 side by side)"
        )
    return strip


def strip_to_views(strip: torch.Tensor, resolution: int) -> torch.Tensor:
    """(R, 6R, 3) uint8 strip -> (6, 3, R, R) uint8 views in file order 000..005."""
    slices = strip.reshape(resolution, 6, resolution, 3).permute(1, 3, 0, 2)  # (6, 3, R, R) strip order
    order = [VIEW_ORDER.index(i) for i in range(6)]  # file index -> strip slice
    return slices[order]


def rgb_views_float(strip: torch.Tensor, resolution: int) -> torch.Tensor:
    """RGB strip -> (6, 3, R, R) float32 in [0, 1], file order."""
    return strip_to_views(strip, resolution).to(torch.float32) / 255.0


def ccm_views_float(strip: torch.Tensor, resolution: int) -> torch.Tensor:
    """CCM strip -> (6, 3, R, R) float32 in [0, 1], file order, channels reversed (0 = Z, 1 = Y, 2 = X)."""
    return strip_to_views(strip, resolution).flip(1).to(torch.float32) / 255.0


def roll_out(views: torch.Tensor, ccm: bool) -> torch.Tensor:
    """(6, 3, R, R) views in file order -> (6, R, 3R): rows A and B stacked along channels.

    For CCMs (`ccm=True`) every channel but the slot's depth channel is zeroed after the transform.
    """
    slots = []
    for slot, src in enumerate(SLOT_SOURCES):
        img = _slot_transform(views[src], slot)
        if ccm:
            keep = CCM_KEPT_CHANNEL[slot]
            mask = torch.zeros(3, 1, 1, dtype=img.dtype, device=img.device)
            mask[keep] = 1
            img = img * mask
        slots.append(img)
    row_a = torch.cat(slots[0:3], dim=-1)
    row_b = torch.cat(slots[3:6], dim=-1)
    return torch.cat([row_a, row_b], dim=0)


def assemble_input(rgb_strip, ccm_strip, resolution: int, device=None) -> torch.Tensor:
    """Two uint8 strips -> (1, 12, R, 3R) float32 rolled-out input in [0, 1] (SPEC §3).

    Args:
        rgb_strip: (R, 6R, 3) uint8, numpy or tensor, views 001, 002, 003, 004, 005, 000.
        ccm_strip: (R, 6R, 3) uint8 CCM strip in the same order, PNG channel order (X, Y, Z).
        resolution: R.
        device: where to build the result (default: the strips' device).
    """
    rgb = validate_strip(rgb_strip, resolution, "RGB")
    ccm = validate_strip(ccm_strip, resolution, "CCM")
    if device is not None:
        rgb, ccm = rgb.to(device), ccm.to(device)
    rgb_rows = roll_out(rgb_views_float(rgb, resolution), ccm=False)
    ccm_rows = roll_out(ccm_views_float(ccm, resolution), ccm=True)
    return torch.cat([rgb_rows, ccm_rows], dim=0).unsqueeze(0).contiguous()
