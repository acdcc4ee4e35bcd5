"""Exported meshes in a browser glTF viewer: three.js loaders in headless Chromium (tests/browser/).

What a user sees when they drop our GLB into a web viewer: the model is loaded by three.js's GLTFLoader (and
the OBJ by MTLLoader + OBJLoader), rendered by WebGL in Chromium, and the pictures are compared with

* the documented frame semantics: a box with a red front, a green top and a blue right side, seen from a
  camera in front (+Z), above (+Y) and to the object's right (-X) in the glTF frame;
* our own rasterizer rendering the same file's data with the same camera (silhouette IoU and colours),
  for a mesh that comes out of the reconstruction stage (tiny fixture model) through ``finalize``.

Needs Node, ``npm install`` (three, playwright-core) and a Chromium (Debian package ``chromium``; path from
``$CRM_CHROMIUM`` or ``PATH``). Without a Chromium the tests are skipped, unless ``CRM_REQUIRE_BROWSER=1``
(set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from browser import three_render  # tests/browser/three_render.py
from reference_files import first_fixture

from pipeline.mesh.types import TexturedMesh
from pipeline.outputs.export import ExportConfig, export_glb, load_glb, load_obj
from pipeline.raster import TorchRasterizer, look_at, perspective, to_clip

pytestmark = pytest.mark.e2e

SIZE = 192


def browser_render(files: dict[str, Path], page: dict, out_dir: Path) -> tuple[np.ndarray, dict]:
    """Render with three.js in headless Chromium; returns ((N, S, S, 4) uint8 RGBA, loader info)."""
    why = three_render.missing()
    if why:
        if os.environ.get("CRM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser viewer test required (CRM_REQUIRE_BROWSER=1) but {why}")
        pytest.skip(why)
    return three_render.render(files, page, out_dir)


def view(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), fov=40.0, near=0.5, far=10.0) -> dict:
    return {"eye": list(eye), "target": list(target), "up": list(up), "fov": fov, "near": near, "far": far}


def our_render(vertices, faces, uvs, texture, views: list[dict]) -> np.ndarray:
    """Unlit textured render with the project's rasterizer: (N, S, S, 4) uint8, same cameras as three.js."""
    rast = TorchRasterizer()
    mvp = torch.stack(
        [
            perspective(v["fov"], SIZE, SIZE, v["near"], v["far"]) @ look_at(v["eye"], v["target"], v["up"])
            for v in views
        ]
    )
    f = torch.as_tensor(faces)
    out = rast.rasterize(to_clip(torch.as_tensor(vertices, dtype=torch.float32), mvp), f, (SIZE, SIZE))
    uv = rast.interpolate(torch.as_tensor(uvs, dtype=torch.float32), out, f)
    tex = torch.from_numpy(np.array(texture)).permute(2, 0, 1)[None].float().expand(len(views), -1, -1, -1)
    col = F.grid_sample(tex, uv * 2 - 1, mode="bilinear", padding_mode="border", align_corners=False)
    cov = out.mask[..., None]
    rgb = col.permute(0, 2, 3, 1) * cov
    rgba = torch.cat([rgb, cov.float() * 255.0], dim=-1)
    return (rgba + 0.5).clamp(0, 255).to(torch.uint8).numpy()


# ------------------------------------------------------------------------------------- semantic frame check
RED, GREEN, BLUE, GREY = (230, 30, 30), (30, 200, 40), (40, 60, 230), (128, 128, 128)


def colour_coded_box() -> TexturedMesh:
    """Box in the CCM frame (front +Y, up +Z, object's right +X); one flat texture colour per side.

    Front red, top green, right side blue, the other sides grey; each face samples its own texel block.
    """
    import trimesh

    box = trimesh.creation.box(extents=(0.8, 0.6, 1.0))
    tri = np.asarray(box.vertices, np.float32)[np.asarray(box.faces)]  # (12, 3, 3)
    normals = np.asarray(box.face_normals)
    palette = {(0, 1, 0): RED, (0, 0, 1): GREEN, (1, 0, 0): BLUE}
    tex = np.zeros((4, 16, 3), np.uint8)
    uvs = np.zeros((len(tri), 3, 2), np.float32)
    for k, n in enumerate(normals):
        colour = palette.get(tuple(int(round(c)) for c in n), GREY)
        tex[:, k] = colour  # column k (of 16) belongs to face k
        uvs[k] = [(k + 0.5) / 16, 0.5]  # every corner at the column centre: the face is flat-coloured
    v = tri.reshape(-1, 3)
    f = np.arange(len(v)).reshape(-1, 3)
    return TexturedMesh(v, f, uvs.reshape(-1, 2), tex, frame="ccm")


def _centroid(img: np.ndarray, colour) -> tuple[float, float, int]:
    """(row, col, count) of the pixels within 40/255 of ``colour``."""
    near = (np.abs(img[..., :3].astype(int) - np.asarray(colour)).max(-1) < 40) & (img[..., 3] > 0)
    rows, cols = np.nonzero(near)
    if len(rows) == 0:
        return float("nan"), float("nan"), 0
    return float(rows.mean()), float(cols.mean()), len(rows)


def test_browser_viewer_sees_front_top_and_right_side(tmp_path):
    """glTF frame: front +Z, up +Y, object's right -X, as three.js shows it; the reference frame faces -Z."""
    mesh = colour_coded_box()
    for frame in ("gltf", "reference"):
        export_glb(mesh, tmp_path / f"{frame}.glb", ExportConfig(frame=frame))
    # A camera in front of +Z, above, and on the -X side: it sees the front, the top and the object's right.
    page = {"kind": "glb", "size": SIZE, "shading": "unlit", "views": [view((-1.6, 1.6, 3.2))]}
    imgs, info = browser_render(
        {"/gltf.glb": tmp_path / "gltf.glb"}, {**page, "model": "/gltf.glb"}, tmp_path / "gltf"
    )
    img = imgs[0]
    red, green, blue = (_centroid(img, c) for c in (RED, GREEN, BLUE))
    for name, c in (("front", red), ("top", green), ("right", blue)):
        assert c[2] > 200, f"the {name} side is not visible in the browser ({c[2]} pixels)"
    assert green[0] < red[0] - 10, "the top is not above the front on screen"
    assert blue[1] < red[1] - 10, "the object's right side is not on the screen's left, seen from the front"
    assert info["meshes"] == 1 and info["triangles"] == 12
    np.testing.assert_allclose(
        np.asarray(info["bbox_max"]) - np.asarray(info["bbox_min"]), [1.44, 1.8, 1.08], atol=1e-5
    )
    # Reference frame: the same camera sees the back (no red), the top and the object's left (grey).
    imgs, _ = browser_render(
        {"/ref.glb": tmp_path / "reference.glb"}, {**page, "model": "/ref.glb"}, tmp_path / "ref"
    )
    red, green, blue = (_centroid(imgs[0], c) for c in (RED, GREEN, BLUE))
    assert red[2] == 0 and blue[2] == 0 and green[2] > 200


# ------------------------------------------------------------------------ reconstruction mesh, GLB and OBJ
@pytest.fixture(scope="module")
def recon_export(tmp_path_factory):
    """A tiny-fixture reconstruction through ``finalize``: the same files a user receives."""
    from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig
    from pipeline.finalize import finalize
    from pipeline.options import PipelineOptions
    from pipeline.results import GeneratedObject
    from pipeline.weights.recon import load_recon_weights

    path = first_fixture("recon")
    with np.load(path) as z:
        ref = {k: z[k] for k in z.files}
    model = ConvolutionalReconstructionModel(
        ReconConfig.from_fixture_config(json.loads(str(ref["config_json"])))
    )
    load_recon_weights(
        model.eval(), {k[3:]: torch.from_numpy(v) for k, v in ref.items() if k.startswith("sd/")}
    )
    with torch.inference_mode():
        tri = model.encode(ref["input_rgb_strip"], ref["input_ccm_strip"], noise=ref["noise"])
        mesh = model.decode(tri, vertex_colors=False)
    obj = GeneratedObject(
        id="recon",
        seed=0,
        views_strip=np.asarray(ref["input_rgb_strip"]),
        ccm_strip=np.asarray(ref["input_ccm_strip"]),
        vertices=mesh.vertices.float().numpy(),
        faces=mesh.faces.numpy().astype(np.int64),
        color_field=model.color_field(tri),
        timings={},
        weights_identity={"kind": "fixture", "id": path.stem},
        input_info={"name": "fixture"},
        device={"device": "cpu"},
    )
    out = tmp_path_factory.mktemp("recon_export")
    res = finalize(obj, out, PipelineOptions(texture_size=256, preview_size=32, device="cpu"))
    assert res.ok, res.error_message
    return out / "recon"


def _ring(radius: float = 2.6) -> list[dict]:
    """Front, right, back, left (glTF frame) at 25 degrees elevation, plus one from above."""
    out = []
    for a in (0, 90, 180, 270):
        t = np.radians(a)
        e = radius * np.array([np.sin(-t) * np.cos(0.44), np.sin(0.44), np.cos(t) * np.cos(0.44)])
        out.append(view(e))
    out.append(view((0.0, radius, 0.3)))
    return out


def _compare(browser: np.ndarray, ours: np.ndarray, what: str) -> None:
    for i, (b, o) in enumerate(zip(browser, ours)):
        mb, mo = b[..., 3] > 0, o[..., 3] > 0
        assert mo.sum() > 500, f"{what} view {i}: empty reference render"
        iou = (mb & mo).sum() / (mb | mo).sum()
        both = mb & mo
        diff = np.abs(b[..., :3].astype(float) - o[..., :3].astype(float))[both]
        assert iou > 0.99, f"{what} view {i}: silhouette IoU {iou:.4f} browser vs our rasterizer"
        assert diff.mean() < 3.0, f"{what} view {i}: mean colour difference {diff.mean():.2f}/255"


def test_reconstruction_glb_in_browser_matches_our_render(recon_export, tmp_path):
    glb = recon_export / "mesh.glb"
    views = _ring()
    page = {"kind": "glb", "model": "/mesh.glb", "size": SIZE, "shading": "unlit", "views": views}
    imgs, info = browser_render({"/mesh.glb": glb}, page, tmp_path)
    d = load_glb(glb)
    assert info["meshes"] == 1 and info["triangles"] == len(d["faces"])
    np.testing.assert_allclose(info["bbox_min"], d["vertices"].min(0), atol=1e-5)
    np.testing.assert_allclose(info["bbox_max"], d["vertices"].max(0), atol=1e-5)
    mat = info["materials"][0]
    assert mat["type"] == "MeshStandardMaterial" and mat["map"] and mat["map_size"] == [256, 256]
    assert mat["map_color_space"] == "srgb" and mat["metalness"] == 0 and mat["roughness"] == 1
    ours = our_render(d["vertices"], d["faces"], d["uvs"], d["texture"], views)
    _compare(imgs, ours, "GLB")


def test_reconstruction_obj_in_browser_matches_our_render(recon_export, tmp_path):
    obj = recon_export / "mesh.obj"
    views = _ring()
    page = {
        "kind": "obj",
        "model": "/mesh.obj",
        "mtl": "/mesh.mtl",
        "size": SIZE,
        "shading": "unlit",
        "views": views,
    }
    files = {f"/mesh{s}": recon_export / f"mesh{s}" for s in (".obj", ".mtl", ".png")}
    imgs, info = browser_render(files, page, tmp_path)
    d = load_obj(obj)
    assert info["triangles"] == len(d["faces"]) and info["materials"][0]["map_size"] == [256, 256]
    np.testing.assert_allclose(info["bbox_min"], d["vertices"].min(0), atol=1e-5)
    ours = our_render(d["vertices"], d["faces"], d["uvs"], d["texture"], views)
    _compare(imgs, ours, "OBJ")
