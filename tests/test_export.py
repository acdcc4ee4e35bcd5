"""GLB / OBJ export: round trips, glTF validation, coordinate frames, reference fixture, degenerate input."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh
from reference_files import fixtures_having

from pipeline.mesh.types import TexturedMesh, VertexColorMesh
from pipeline.outputs.export import ExportConfig, export_glb, export_obj, load_glb, load_obj, to_export_frame

REPO_ROOT = Path(__file__).resolve().parents[1]
VALIDATOR = REPO_ROOT / "node_modules" / "gltf-validator"

_NODE_SCRIPT = """
const v = require(process.argv[1]);
const data = require('fs').readFileSync(process.argv[2]);
v.validateBytes(new Uint8Array(data))
  .then(r => { console.log(JSON.stringify(r.issues)); })
  .catch(e => { console.error(String(e)); process.exit(2); });
"""


def validate_glb(path: Path) -> dict:
    """Run the Khronos glTF-Validator (npm gltf-validator via node) and return its issues report."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: cannot run the Khronos glTF-Validator")
    if not VALIDATOR.exists():
        pytest.fail("node_modules/gltf-validator missing: run `make install` (npm install)")
    res = subprocess.run(
        [node, "-e", _NODE_SCRIPT, str(VALIDATOR), str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    issues = json.loads(res.stdout)
    assert issues["numErrors"] == 0, issues["messages"]
    return issues


def marked_mesh() -> TexturedMesh:
    """Box in the CCM frame (+Z up) with a nose on its front (+Y) and a red texture region for the front."""
    box = trimesh.creation.box(extents=(0.8, 0.6, 1.0))
    nose = trimesh.creation.cone(radius=0.15, height=0.4)
    nose.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1, 0, 0]))  # +Z -> +Y
    nose.apply_translation([0, 0.3, 0.1])
    m = trimesh.util.concatenate([box, nose])
    v = np.asarray(m.vertices, dtype=np.float32)[np.asarray(m.faces)].reshape(-1, 3)
    f = np.arange(len(v)).reshape(-1, 3)
    uv = np.random.default_rng(0).random((len(v), 2)).astype(np.float32)
    tex = np.zeros((8, 16, 3), np.uint8)
    tex[..., 0] = np.arange(16, dtype=np.uint8)[None] * 15
    tex[..., 1] = np.arange(8, dtype=np.uint8)[:, None] * 30
    return TexturedMesh(v, f, uv, tex, frame="ccm")


def signed_volume(v, f):
    t = np.asarray(v, dtype=np.float64)[f]
    return float(np.einsum("ij,ij->i", t[:, 0], np.cross(t[:, 1], t[:, 2])).sum() / 6.0)


@pytest.mark.parametrize("frame", ["gltf", "reference"])
def test_glb_round_trip_and_validator(tmp_path, frame):
    mesh = marked_mesh()
    cfg = ExportConfig(frame=frame)
    info = export_glb(mesh, tmp_path / "m.glb", cfg)
    assert info["frame"] == frame
    validate_glb(tmp_path / "m.glb")
    d = load_glb(tmp_path / "m.glb")
    expected, _ = to_export_frame(mesh.vertices, frame, cfg)
    np.testing.assert_allclose(d["vertices"], expected, atol=1e-6)
    np.testing.assert_array_equal(d["faces"], mesh.faces)
    np.testing.assert_allclose(d["uvs"], mesh.uvs, atol=1e-6)
    np.testing.assert_array_equal(d["texture"], mesh.texture)
    assert d["extras"]["crm_export"] == info
    js = d["json"]
    mat = js["materials"][0]
    assert mat["pbrMetallicRoughness"]["metallicFactor"] == 0.0
    assert mat["pbrMetallicRoughness"]["roughnessFactor"] == 1.0
    assert mat["doubleSided"] is True and "baseColorTexture" in mat["pbrMetallicRoughness"]
    assert js["samplers"][0]["wrapS"] == 10497
    assert [p.name for p in tmp_path.iterdir()] == ["m.glb"]


def test_obj_round_trip(tmp_path):
    mesh = marked_mesh()
    info = export_obj(mesh, tmp_path / "sub" / "m.obj")
    assert {p.name for p in (tmp_path / "sub").iterdir()} == {"m.obj", "m.mtl", "m.png"}
    mtl = (tmp_path / "sub" / "m.mtl").read_text()
    assert "map_Kd m.png" in mtl and "Kd 1 1 1" in mtl
    d = load_obj(tmp_path / "sub" / "m.obj")
    expected, _ = to_export_frame(mesh.vertices, info["frame"])
    np.testing.assert_allclose(d["vertices"], expected, atol=1e-6)
    np.testing.assert_array_equal(d["faces"], mesh.faces)
    np.testing.assert_allclose(d["uvs"], mesh.uvs, atol=1e-6)
    np.testing.assert_array_equal(d["texture"], mesh.texture)
    text = (tmp_path / "sub" / "m.obj").read_text().splitlines()
    assert text[2] == "mtllib m.mtl" and any(line.startswith("usemtl material_0") for line in text)
    with pytest.raises(ValueError, match=".obj"):
        export_obj(mesh, tmp_path / "m.txt")


def test_vertex_colour_mode(tmp_path):
    m = trimesh.creation.icosphere(2)
    cols = np.random.default_rng(1).random((len(m.vertices), 3)).astype(np.float32)
    vc = VertexColorMesh(m.vertices, m.faces, cols)
    export_glb(vc, tmp_path / "vc.glb")
    validate_glb(tmp_path / "vc.glb")
    d = load_glb(tmp_path / "vc.glb")
    np.testing.assert_allclose(d["colors"], cols, atol=1 / 255)
    assert "COLOR_0" in d["json"]["meshes"][0]["primitives"][0]["attributes"]
    export_obj(vc, tmp_path / "vc.obj")
    o = load_obj(tmp_path / "vc.obj")
    assert not (tmp_path / "vc.mtl").exists()
    np.testing.assert_allclose(o["colors"], cols, atol=1 / 255)
    np.testing.assert_array_equal(o["faces"], m.faces)


@pytest.mark.parametrize("frame,front_sign", [("gltf", 1.0), ("reference", -1.0)])
def test_marked_front_faces_expected_axis(tmp_path, frame, front_sign):
    mesh = marked_mesh()
    export_glb(mesh, tmp_path / "m.glb", ExportConfig(frame=frame))
    v = load_glb(tmp_path / "m.glb")["vertices"]
    # The nose tip (max CCM +Y) ends up at the extreme of +Z (glTF) or -Z (reference); up (CCM +Z) is +Y.
    tip = int(np.argmax(mesh.vertices[:, 1]))
    assert v[tip, 2] * front_sign == pytest.approx(np.max(v[:, 2] * front_sign))
    top = int(np.argmax(mesh.vertices[:, 2]))
    assert v[top, 1] == pytest.approx(v[:, 1].max())
    assert signed_volume(v, mesh.faces) > 0  # proper rotation: winding stays outward
    # The longest side spans [-0.9, 0.9].
    ext = v.max(0) - v.min(0)
    assert ext.max() == pytest.approx(1.8, abs=1e-5)


def _fixtures_with(keys):
    return fixtures_having("recon", keys)


def test_reference_frame_reproduces_fixture(tmp_path):
    keys = [
        "clean_kiui027_verts",
        "clean_kiui027_faces",
        "obj_verts_from_clean_kiui027",
        "obj_faces_from_clean_kiui027",
        "glb_verts_from_clean_kiui027",
        "glb_center_scale_from_clean_kiui027",
    ]
    for p in _fixtures_with(keys):
        d = np.load(p)
        v = d["clean_kiui027_verts"]
        outward = d["clean_kiui027_faces"][:, ::-1].astype(np.int64)  # raw FlexiCubes faces are inward
        obj_v, _ = to_export_frame(v, "reference", ExportConfig(normalize=False))
        np.testing.assert_allclose(obj_v, d["obj_verts_from_clean_kiui027"], atol=1e-6)
        glb_v, info = to_export_frame(v, "reference")
        np.testing.assert_allclose(glb_v, d["glb_verts_from_clean_kiui027"], atol=2e-6)
        cs = d["glb_center_scale_from_clean_kiui027"]
        np.testing.assert_allclose(info["center"], cs[:3], atol=1e-6)
        assert info["scale"] == pytest.approx(float(cs[3]), rel=1e-6)
        # Through the files: OBJ (unnormalised, official convention) and GLB (normalised).
        uv = np.zeros((len(v), 2), np.float32)
        mesh = TexturedMesh(v, outward, uv, np.full((4, 4, 3), 200, np.uint8))
        export_obj(mesh, tmp_path / "ref.obj", ExportConfig(frame="reference", normalize=False))
        o = load_obj(tmp_path / "ref.obj")
        np.testing.assert_allclose(o["vertices"], d["obj_verts_from_clean_kiui027"], atol=1e-6)
        np.testing.assert_array_equal(o["faces"], d["obj_faces_from_clean_kiui027"])
        export_glb(mesh, tmp_path / "ref.glb", ExportConfig(frame="reference"))
        g = load_glb(tmp_path / "ref.glb")
        np.testing.assert_allclose(g["vertices"], d["glb_verts_from_clean_kiui027"], atol=2e-6)
        assert g["extras"]["crm_export"]["front"] == "-Z"
        validate_glb(tmp_path / "ref.glb")
        assert signed_volume(g["vertices"], g["faces"]) > 0


def test_degenerate_inputs_fail_clearly(tmp_path):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    tex = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="no faces"):
        TexturedMesh(v, np.zeros((0, 3), np.int64), np.zeros((3, 2)), tex)
    with pytest.raises(ValueError, match="not finite"):
        TexturedMesh(np.full((3, 3), np.nan), [[0, 1, 2]], np.zeros((3, 2)), tex)
    with pytest.raises(ValueError, match="uvs"):
        TexturedMesh(v, [[0, 1, 2]], np.zeros((2, 2)), tex)
    with pytest.raises(ValueError, match="texture"):
        TexturedMesh(v, [[0, 1, 2]], np.zeros((3, 2)), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="frame"):
        TexturedMesh(v, [[0, 1, 2]], np.zeros((3, 2)), tex, frame="blender")
    with pytest.raises(ValueError, match="zero extent"):
        export_glb(TexturedMesh(np.zeros((3, 3)), [[0, 1, 2]], np.zeros((3, 2)), tex), tmp_path / "z.glb")
    assert not (tmp_path / "z.glb").exists()
    with pytest.raises(ValueError, match="frame"):
        export_glb(TexturedMesh(v, [[0, 1, 2]], np.zeros((3, 2)), tex, frame="reference"), tmp_path / "x.glb")
    with pytest.raises(TypeError):
        export_glb(trimesh.creation.box(), tmp_path / "b.glb")
    # A single face and a non-manifold fan export and validate.
    one = TexturedMesh(v, [[0, 1, 2]], np.array([[0, 0], [1, 0], [0, 1]]), tex)
    export_glb(one, tmp_path / "one.glb")
    validate_glb(tmp_path / "one.glb")
    fan_v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, -1, 0.5]], np.float32)
    fan = VertexColorMesh(fan_v, [[0, 1, 2], [1, 0, 3], [0, 1, 4]], np.full((5, 3), 0.5))
    export_glb(fan, tmp_path / "fan.glb")
    validate_glb(tmp_path / "fan.glb")
