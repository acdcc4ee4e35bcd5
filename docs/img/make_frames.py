"""Regenerate ``docs/img/frames.png``: the two export frames seen from a glTF viewer's default camera.

Top row: the exported vertices rendered by the project's rasterizer. Bottom row: the GLB files themselves,
loaded by three.js's GLTFLoader and rendered by WebGL in headless Chromium (``tests/browser/render.mjs``),
i.e. what a browser glTF viewer shows. The bottom row needs Node, ``npm install`` and Chromium; it is left
out (with a note) when they are missing.

Usage: ``python docs/img/make_frames.py`` (from the repository root).
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from browser import three_render  # noqa: E402  (tests/browser/three_render.py)

from pipeline.mesh.types import VertexColorMesh  # noqa: E402
from pipeline.outputs.export import ExportConfig, export_glb, to_export_frame  # noqa: E402
from pipeline.outputs.preview import render_views  # noqa: E402
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


EYE = np.array([1.9, 1.6, 4.9])  # a glTF viewer's default camera is on +Z, looking at -Z, +Y up


def browser_image(glb: Path) -> np.ndarray | None:
    """(SIZE, SIZE, 4) uint8: ``glb`` as three.js shows it in headless Chromium, or None without the tools."""
    if three_render.missing():
        return None
    view = {"eye": EYE.tolist(), "target": [0, 0, 0], "up": [0, 1, 0], "fov": 30, "near": 1.0, "far": 10.0}
    page = {"model": "/m.glb", "kind": "glb", "size": SIZE, "shading": "lit", "views": [view]}
    imgs, _ = three_render.render({"/m.glb": glb}, page, glb.parent / glb.stem)
    return imgs[0]


def panel(mesh: VertexColorMesh, title: str, subtitle: str, img: np.ndarray | None = None) -> Image.Image:
    w2c = look_at(EYE, [0, 0, 0], [0, 1, 0])
    mvp = perspective(30, SIZE, SIZE, 1.0, 10.0) @ w2c
    if img is None:
        img = render_views(mesh, mvp[None], EYE[None], SIZE)[0]
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
    frames = [
        ("gltf", 'frame="gltf" (default)', "+Y up, front (red nose) faces +Z"),
        ("reference", 'frame="reference" (official CRM)', "+Y up, front faces -Z: back (blue) seen"),
    ]
    rows = [[], []]
    with tempfile.TemporaryDirectory() as tmp:
        for frame, title, sub in frames:
            v, _ = to_export_frame(obj.vertices, frame)
            mesh = VertexColorMesh(v, obj.faces, obj.colors, frame=frame)
            rows[0].append(panel(mesh, title, sub + " (our rasterizer)"))
            glb = Path(tmp) / f"{frame}.glb"
            export_glb(obj, glb, ExportConfig(frame=frame))
            img = browser_image(glb)
            if img is not None:
                rows[1].append(panel(mesh, title, "the GLB in three.js (Chromium)", img))
    if not rows[1]:
        print("note: node/three.js/Chromium missing: browser row left out")
        rows.pop()
    sheet = Image.new("RGB", (SIZE * 2 + 10, (SIZE + 40) * len(rows) + 10 * (len(rows) - 1)), "white")
    for r, row in enumerate(rows):
        for i, p in enumerate(row):
            sheet.paste(p, (i * (SIZE + 10), r * (SIZE + 50)))
    buf = io.BytesIO()
    sheet.quantize(colors=128).save(buf, format="PNG", optimize=True)
    out = REPO / "docs" / "img" / "frames.png"
    out.write_bytes(buf.getvalue())
    print(f"wrote {out} ({len(buf.getvalue()) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
