"""The CPU part (`finalize`): clean -> bake -> export into an atomic folder, on a synthetic object.

No networks: a sphere with raw (inward) FlexiCubes winding and a position-coloured field stand in
for the reconstruction output, so these tests are fast and isolate the CPU side.
"""

from __future__ import annotations

import contextlib
import json
import pickle

import numpy as np
import pytest
import torch
import trimesh

from pipeline.finalize import finalize
from pipeline.options import PipelineOptions
from pipeline.outputs.destination import LocalDestination
from pipeline.results import GeneratedObject


class PositionColor:
    """Picklable colour field: raw colour = position (so red grows with x)."""

    device = torch.device("cpu")

    def __call__(self, points):
        pts = torch.as_tensor(points, dtype=torch.float32)
        return pts.clamp(-1.0, 1.0)


def _sphere_object(obj_id: str = "sphere") -> GeneratedObject:
    s = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    r = 16
    strip = np.zeros((r, 6 * r, 3), np.uint8)
    strip[:, :, 0] = np.arange(6 * r, dtype=np.uint8)[None] * 2
    return GeneratedObject(
        id=obj_id,
        seed=5,
        views_strip=strip,
        ccm_strip=255 - strip,
        vertices=np.asarray(s.vertices, np.float32),
        faces=np.asarray(s.faces, np.int64)[:, ::-1].copy(),  # raw FlexiCubes winding: inward
        color_field=PositionColor(),
        timings={"stage1": 1.0},
        weights_identity={"kind": "tiny-random", "id": "abc"},
        input_info={"name": "synthetic"},
        device={"device": "cpu"},
    )


OPTS = dict(texture_size=64, preview_size=32, device="cpu")


def test_finalize_writes_complete_folder(tmp_path):
    obj = pickle.loads(pickle.dumps(_sphere_object()))  # the CPU part may run in another process
    res = finalize(obj, tmp_path, PipelineOptions(**OPTS))
    assert res.ok, res.error_message
    folder = tmp_path / "sphere"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(
        ["mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png", "views.png", "preview.png", "meta.json"]
    )
    assert res.outputs == {
        "glb": "mesh.glb", "obj": "mesh.obj", "mtl": "mesh.mtl", "texture": "mesh.png",
        "views": "views.png", "preview": "preview.png", "meta": "meta.json",
    }  # fmt: skip
    assert res.location == str(folder) and res.path("glb") == str(folder / "mesh.glb")
    assert res.mesh["faces"] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["sphere"]  # no temp leftovers
    glb = trimesh.load(folder / "mesh.glb", force="mesh")
    assert glb.volume > 0  # outward winding after the flip
    assert len(glb.faces) > 100
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["id"] == "sphere" and meta["seed"] == 5 and meta["random_weights"] is True
    assert (
        meta["options"]["texture_size"] == 64
        and meta["options_hash"] == PipelineOptions(**OPTS).options_hash()
    )
    assert {"stage1", "clean", "bake", "export", "views", "preview", "total"} <= set(meta["timings_s"])
    assert meta["mesh"]["faces"] == len(glb.faces) and meta["weights"]["id"] == "abc"
    from PIL import Image

    views = np.asarray(Image.open(folder / "views.png"))
    assert views.shape == (32, 96, 3) and np.array_equal(views[:16], obj.views_strip)
    tex = np.asarray(Image.open(folder / "mesh.png"))
    assert tex.shape == (64, 64, 3) and tex[..., 0].std() > 10  # position colours vary over the surface
    assert (folder / "meta.json").stat().st_mode & 0o044  # readable like ordinary files


def test_finalize_vertex_colour_mode(tmp_path):
    res = finalize(
        _sphere_object(), tmp_path, PipelineOptions(vertex_colors=True, write_preview=False, **OPTS)
    )
    assert res.ok, res.error_message
    folder = tmp_path / "sphere"
    assert not (folder / "mesh.png").exists() and not (folder / "preview.png").exists()
    glb = trimesh.load(folder / "mesh.glb", force="mesh")
    colors = np.asarray(glb.visual.vertex_colors)[:, :3].astype(float)
    # red follows the position's x in the CCM frame: two distinct shades at least
    assert colors[:, 0].max() - colors[:, 0].min() > 100


def test_finalize_without_gpu_honours_cuda_options_on_the_cpu(tmp_path, monkeypatch):
    """The CPU part runs where no GPU is visible (a Ray CPU task) even when the networks ran on CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    opts = PipelineOptions(**{**OPTS, "device": "cuda"})
    with pytest.raises(Exception, match="CUDA is not available"):
        opts.resolved_device()  # the networks' device is still checked strictly
    assert opts.finalize_device() == "cpu"
    res = finalize(_sphere_object(), tmp_path, opts)
    assert res.ok, res.error_message
    assert {"glb", "preview", "texture"} <= set(res.outputs)


class _DiskFullAfterWriting(LocalDestination):
    """A local destination whose disk fills up once the files are written, before publication."""

    @contextlib.contextmanager
    def staging(self, obj_id):
        with super().staging(obj_id) as folder:
            yield folder
            assert (folder / "mesh.glb").is_file()
            raise OSError("disk full")


def test_finalize_failure_leaves_nothing_and_keeps_previous(tmp_path):
    ok = finalize(_sphere_object(), tmp_path, PipelineOptions(write_preview=False, **OPTS))
    assert ok.ok and ok.location == str(tmp_path / "sphere")
    before = sorted(p.name for p in (tmp_path / "sphere").iterdir())
    res = finalize(_sphere_object(), _DiskFullAfterWriting(tmp_path), PipelineOptions(**OPTS))
    assert (res.status, res.error_class, res.error_message) == ("failed", "OSError", "disk full")
    assert res.outputs == {}
    assert sorted(p.name for p in (tmp_path / "sphere").iterdir()) == before
    res2 = finalize(_sphere_object("other"), _DiskFullAfterWriting(tmp_path), PipelineOptions(**OPTS))
    assert not res2.ok and not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sphere"]


@pytest.mark.parametrize("kind", ["empty", "floaters"])
def test_finalize_unusable_mesh_is_a_clear_failure(tmp_path, kind):
    obj = _sphere_object()
    if kind == "empty":
        obj.faces = np.zeros((0, 3), np.int64)
        match = "no usable mesh"
    else:  # one tiny triangle: removed entirely by the floater filter
        obj.vertices = np.array([[0, 0, 0], [1e-3, 0, 0], [0, 1e-3, 0]], np.float32)
        obj.faces = np.array([[0, 1, 2]], np.int64)
        match = "removed every face"
    res = finalize(obj, tmp_path, PipelineOptions(**OPTS))
    assert res.status == "failed" and res.error_class == "PipelineError" and match in res.error_message
    assert list(tmp_path.iterdir()) == []
