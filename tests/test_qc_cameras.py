"""The quality checks' view cameras against real data: a CRM training example's six orthographic views
and their canonical coordinate maps (``../shared/data/crm_examples/train_examples``).

Every foreground pixel of ``xyz_new_<v>.png`` stores the canonical position seen there; projected with
``view_camera(v)`` it must land back on that pixel (up to the maps' 8-bit quantisation: 2/255 of the
[-1, 1] range is 2 pixels at 512), and the front view's RGBA alpha is exactly the map's foreground.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from crm_models.views import VIEW_NAMES
from pipeline.qc.cameras import view_camera, view_cameras
from pipeline.raster import to_clip

EXAMPLE = "crm_examples/train_examples/0011662ee0fc4b4481bfd28314d154c1"


@pytest.fixture(scope="module")
def example(data_dir):
    return data_dir / EXAMPLE


@pytest.mark.parametrize("view", range(6), ids=VIEW_NAMES)
def test_view_camera_maps_ccm_points_back_to_their_pixels(example, view):
    ccm = np.asarray(Image.open(example / f"xyz_new_{view:03d}.png").convert("RGB")).astype(np.float64)
    alpha = np.asarray(Image.open(example / f"{view:03d}.png").convert("RGBA"))[..., 3]
    fg = (ccm != 127).any(-1)
    assert fg.sum() > 10_000 and ((alpha > 127) == fg).mean() > 0.999
    rows, cols = np.nonzero(fg & (alpha == 255))
    points = torch.tensor(ccm[rows, cols] / 255.0 * 2.0 - 1.0, dtype=torch.float32)
    clip = to_clip(points, view_camera(view))[0].numpy()
    size = ccm.shape[0]
    col = (clip[:, 0] + 1.0) * size / 2 - 0.5  # NDC -> pixel centre coordinates (pipeline.raster)
    row = (clip[:, 1] + 1.0) * size / 2 - 0.5
    err = np.maximum(np.abs(col - cols), np.abs(row - rows))
    assert np.percentile(err, 99) <= 2.5 and err.max() <= 3.5, (np.median(err), err.max())
    assert (np.abs(clip[:, 2]) < 1).all()  # inside the depth range


def test_front_is_view_zero_and_cameras_stack():
    assert view_cameras([0, 3]).shape == (2, 4, 4)
    torch.testing.assert_close(view_cameras([0])[0], view_camera(0))
    with pytest.raises(ValueError, match="0..5"):
        view_camera(6)
