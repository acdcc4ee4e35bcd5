"""Regenerate ``docs/img/frames.png``: the two export frames seen from a glTF viewer's default camera.

Usage: ``python docs/img/make_frames.py`` (from the repository root).
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pipeline.export import to_export_frame  # noqa: E402
from pipeline.mesh_types import VertexColorMesh  # noqa: E402
from pipeline.preview import render_views  # noqa: E402
from pipeline.raster import look_at, perspective, to_clip  # noqa: E402

SIZE = 300


def marked_object() -> VertexColorMesh:
    """A box in the CCM frame (+Z up) with a nose on its front (+Y): front red, back blue, top green."""
    box = trimesh.creation.box(extents=(0.9, 0.7, 1.0))
    nose = trimesh.creation.cone(radius=0.18, height=0.45, sections=24)
    nose.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))  # +Z -> +Y
    nose.apply_translation([0, 0.35, 0.15])
    m = trimesh.util.concatenate([box, nose])
    v = np.asarray(m.vertices, np.float32)[np.asarray(m.faces)].reshape(-1, 3)
    f = np.arange(len(v)).reshape(-1, 3)
    n = np.asarray(m.face_normals)
    col = np.tile([0.75, 0.75, 0.75], (len(f), 1))
    col[n[:, 1] > 0.9] = [0.85, 0.15, 0.1]  # front face
    col[n[:, 1] < -0.9] = [0.15, 0.3, 0.85]  # back face
    col[n[:, 2] > 0.9] = [0.2, 0.7, 0.25]  # top
    col[len(box.faces) :] = [0.85, 0.15, 0.1]  # nose
    return VertexColorMesh(v, f, np.repeat(col, 3, axis=0).astype(np.float32))


def panel(mesh: VertexColorMesh, title: str, subtitle: str) -> Image.Image:
    eye = np.array([1.9, 1.6, 4.9])  # a glTF viewer's default camera is on +Z, looking at -Z, +Y up
    w2c = look_at(eye, [0, 0, 0], [0, 1, 0])
    mvp = perspective(30, SIZE, SIZE, 1.0, 10.0) @ w2c
    img = render_views(mesh, mvp[None], eye[None], SIZE)[0]
    canvas = Image.new("RGB", (SIZE, SIZE + 40), "white")
    rgb = Image.fromarray(img[..., :3])
    canvas.paste(rgb, (0, 40), Image.fromarray(img[..., 3]))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 4), title, fill="black")
    draw.text((8, 20), subtitle, fill=(80, 80, 80))
    # World axes drawn from the origin of the frame.
    axes = torch.tensor([[0, 0, 0], [1.15, 0, 0], [0, 1.3, 0], [0, 0, 1.5]], dtype=torch.float32)
    c = to_clip(axes, mvp)[0]
    px = ((c[:, :2] / c[:, 3:4] + 1) * SIZE / 2 - 0.5).numpy()
    for k, (name, color) in enumerate(
        [("+X", (200, 0, 0)), ("+Y", (0, 150, 0)), ("+Z", (0, 0, 220))], start=1
    ):
        a, b = px[0], px[k]
        draw.line([(a[0], a[1] + 40), (b[0], b[1] + 40)], fill=color, width=2)
        draw.text((b[0] + 3, b[1] + 40), name, fill=color)
    return canvas


def main() -> None:
    obj = marked_object()
    panels = []
    for frame, title, sub in [
        ("gltf", 'frame="gltf" (default)', "+Y up, front (red nose) faces +Z"),
        ("reference", 'frame="reference" (official CRM)', "+Y up, front faces -Z: back (blue) seen"),
    ]:
        v, _ = to_export_frame(obj.vertices, frame)
        panels.append(panel(VertexColorMesh(v, obj.faces, obj.colors, frame=frame), title, sub))
    sheet = Image.new("RGB", (SIZE * len(panels) + 10, SIZE + 40), "white")
    for i, p in enumerate(panels):
        sheet.paste(p, (i * (SIZE + 10), 0))
    buf = io.BytesIO()
    sheet.quantize(colors=128).save(buf, format="PNG", optimize=True)
    out = REPO / "docs" / "img" / "frames.png"
    out.write_bytes(buf.getvalue())
    print(f"wrote {out} ({len(buf.getvalue()) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
