"""Turntable previews and contact sheets."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from PIL import Image

from pipeline.mesh.types import VertexColorMesh
from pipeline.outputs.export import to_export_frame
from pipeline.outputs.preview import contact_sheet, render_turntable, save_preview_png


def front_marked_box(frame: str = "ccm") -> VertexColorMesh:
    """Box in the CCM frame whose front (+Y) face is red and everything else blue; optionally exported."""
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    v = np.asarray(box.vertices, dtype=np.float32)[np.asarray(box.faces)].reshape(-1, 3)
    f = np.arange(len(v)).reshape(-1, 3)
    cols = np.tile([[0.1, 0.2, 0.9]], (len(v), 1)).astype(np.float32)
    front = np.repeat(np.all(v[f][:, :, 1] > 0.49, axis=1), 3)
    cols[front] = [0.9, 0.1, 0.1]
    if frame != "ccm":
        v, _ = to_export_frame(v, frame)
    return VertexColorMesh(v, f, cols, frame=frame)


@pytest.mark.parametrize("frame", ["ccm", "gltf", "reference"])
def test_turntable_starts_at_the_front(frame):
    imgs = render_turntable(front_marked_box(frame), n_views=4, size=48, elevation_deg=10)
    assert imgs.shape == (4, 48, 48, 4) and imgs.dtype == np.uint8
    alpha = imgs[..., 3]
    assert alpha[:, 0, 0].max() == 0  # transparent background
    assert (alpha[:, 24, 24] == 255).all()
    c0 = imgs[0, 24, 24, :3].astype(int)
    c2 = imgs[2, 24, 24, :3].astype(int)
    assert c0[0] > 2 * c0[2], c0  # view 0 sees the red front
    assert c2[2] > 2 * c2[0], c2  # view 2 sees the blue back
    cov = (alpha > 0).mean(axis=(1, 2))
    assert (cov > 0.15).all() and (cov < 0.9).all()


def test_contact_sheet_and_png(tmp_path):
    imgs = np.arange(5 * 3 * 2 * 4, dtype=np.uint8).reshape(5, 3, 2, 4)
    sheet = contact_sheet(imgs, cols=2)
    assert sheet.shape == (9, 4, 4)
    np.testing.assert_array_equal(sheet[3:6, 2:4], imgs[3])
    assert (sheet[6:9, 2:4] == 0).all()
    out = save_preview_png(front_marked_box(), tmp_path / "p.png", n_views=6, size=32, cols=3)
    img = np.asarray(Image.open(tmp_path / "p.png"))
    assert img.shape == (64, 96, 4)
    np.testing.assert_array_equal(img, out)
    with pytest.raises(ValueError):
        contact_sheet(imgs[0])
