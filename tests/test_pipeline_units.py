"""Fast unit tests of the pipeline plumbing: options, atomic folders, views sheet, meta, ids, CLI args."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from pipeline.options import OptionsError, PipelineOptions
from pipeline.outputs.atomic import atomic_dir, atomic_write_json, is_temp_name, remove_stale_temps
from pipeline.outputs.views_image import strip_to_file_order, views_sheet


# ------------------------------------------------------------------------------- options
def test_options_defaults_are_the_official_values():
    o = PipelineOptions()
    assert (o.steps_stage1, o.steps_stage2, o.guidance_scale, o.texture_size) == (50, 50, 5.0, 1024)
    assert (o.frame, o.background, o.foreground_ratio, o.grid_size) == ("gltf", "alpha", 1.0, None)
    assert o.stage2_guidance == 5.0 and o.replace(guidance_scale_stage2=3.0).stage2_guidance == 3.0


@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", -1),
        ("seed", 1.5),
        ("steps_stage1", 0),
        ("guidance_scale", -1.0),
        ("texture_size", 8),
        ("frame", "blender"),
        ("background", "green"),
        ("foreground_ratio", 0.0),
        ("foreground_ratio", 1.5),
        ("dtype", "fp8"),
        ("device", "tpu"),
        ("grid_size", 2),
        ("batch_size", 0),
        ("sampler", "euler"),
        ("steps", 0),
    ],
)
def test_options_reject_bad_values_naming_the_field(field, value):
    with pytest.raises(OptionsError, match=field):
        PipelineOptions(**{field: value})


def test_options_dtype_rules_on_cpu():
    o = PipelineOptions(device="cpu")
    assert str(o.resolved_dtype()) == "torch.float32"
    with pytest.raises(OptionsError, match="only supported on CUDA"):
        PipelineOptions(device="cpu", dtype="fp16").resolved_dtype()


def test_options_roundtrip_and_hash():
    o = PipelineOptions(seed=7, steps_stage1=2, texture_size=64)
    d = o.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert PipelineOptions.from_dict(d) == o
    with pytest.raises(OptionsError, match="nonsense"):
        PipelineOptions.from_dict({**d, "nonsense": 1})
    # scheduling-only fields do not change the hash; result-changing fields do
    assert o.replace(batch_size=8, low_vram=True, device="cpu").options_hash() == o.options_hash()
    assert o.replace(seed=8).options_hash() != o.options_hash()
    assert o.replace(texture_size=128).options_hash() != o.options_hash()
    assert len(o.options_hash()) == 16


def test_sampler_and_steps_options():
    from crm_models.multiview import solvers

    assert PipelineOptions().sampler == "ddim"
    o = PipelineOptions(sampler="dpmpp", steps=10)
    assert (o.steps_stage1, o.steps_stage2) == (10, 10)
    assert "steps" not in o.to_dict() and PipelineOptions.from_dict(o.to_dict()) == o
    assert PipelineOptions.from_dict({"sampler": "unipc", "steps": 12}).steps_stage2 == 12
    assert o.replace(seed=3).steps_stage1 == 10 and o.replace(steps=15).steps_stage2 == 15
    with pytest.raises(OptionsError, match="steps_stage1.*at most 50"):
        PipelineOptions(sampler="unipc", steps_stage1=60)
    assert PipelineOptions(steps_stage1=60).steps_stage1 == 60  # DDIM takes any count
    # the light copies in pipeline.options are the solver module's names and limit
    assert PipelineOptions.__dataclass_fields__["sampler"].default in solvers.SAMPLERS
    from pipeline.options import SAMPLERS, SOLVER_MAX_STEPS

    assert SAMPLERS == solvers.SAMPLERS and SOLVER_MAX_STEPS == solvers.OFFICIAL_GRID_STEPS


def test_sampler_field_keeps_earlier_hashes():
    """Resume compares options hashes: adding `sampler` must not change the hash of earlier runs' options.
    The values were recorded with the options as they were before the field existed (commit 4aa63ff)."""
    assert PipelineOptions().options_hash() == "9b1a63301b4c26e8"
    assert PipelineOptions(seed=7, steps_stage1=2, texture_size=64).options_hash() == "32302689bddbb7e3"
    assert PipelineOptions(sampler="dpmpp").options_hash() != PipelineOptions().options_hash()
    assert PipelineOptions(sampler="dpmpp").options_hash() != PipelineOptions(sampler="unipc").options_hash()


def test_stage_sampling_options_follow_the_pipeline_options():
    from pipeline.stages import sampling_options

    o = PipelineOptions(sampler="unipc", steps_stage1=12, steps_stage2=8, guidance_scale_stage2=3.0)
    s1, s2 = sampling_options(o, 1), sampling_options(o, 2)
    assert (s1.sampler, s1.num_steps, s1.guidance_scale) == ("unipc", 12, 5.0)
    assert (s2.sampler, s2.num_steps, s2.guidance_scale) == ("unipc", 8, 3.0)


# ------------------------------------------------------------------------------- atomic writes
def test_atomic_dir_success_and_replace(tmp_path):
    final = tmp_path / "obj"
    with atomic_dir(final) as tmp:
        assert is_temp_name(tmp.name) and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("1")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "1"
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]


def test_atomic_dir_failure_leaves_nothing_and_keeps_old(tmp_path):
    final = tmp_path / "obj"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "partial.bin").write_bytes(b"x" * 100)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "good.txt").write_text("ok")
    with pytest.raises(ValueError):
        with atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("half")
            raise ValueError("later failure")
    assert [p.name for p in final.iterdir()] == ["good.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]
    with pytest.raises(FileExistsError):
        with atomic_dir(final, overwrite=False):
            pass


def test_atomic_write_json_and_stale_cleanup(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": [1, 2], "b": 1}
    (tmp_path / ".obj.tmp-abc").mkdir()
    (tmp_path / ".x.json.tmp-1").write_text("")
    removed = remove_stale_temps(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


# ------------------------------------------------------------------------------- views sheet
def test_views_sheet_layout_and_file_order():
    r = 4
    strip = np.zeros((r, 6 * r, 3), np.uint8)
    for slot in range(6):
        strip[:, slot * r : (slot + 1) * r] = slot + 1  # slot s holds dataset view (1,2,3,4,5,0)[s]
    ccm = strip + 100
    sheet = views_sheet(strip, ccm)
    assert sheet.shape == (2 * r, 6 * r, 3)
    assert np.array_equal(sheet[:r], strip) and np.array_equal(sheet[r:], ccm)
    by_file = strip_to_file_order(strip)
    # file view 000 (front) is the last slot, 001 (left) the first
    assert [int(v[0, 0, 0]) for v in by_file] == [6, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="6 x height"):
        views_sheet(strip[:, :-1], ccm)
    with pytest.raises(ValueError, match="different view sizes"):
        views_sheet(strip, np.zeros((8, 48, 3), np.uint8))


# ------------------------------------------------------------------------------- ids, meta, results
def test_default_ids_are_safe_and_unique():
    from pipeline.inputs.ids import ID_PATTERN as SAFE_ID_PATTERN
    from pipeline.inputs.ids import default_ids, safe_id

    ids = default_ids(["a/cat.png", "b/cat.webp", "x/ünïcode name!.png", b"\x89PNG", "/t/.hidden.png"])
    assert ids[:2] == ["cat", "cat-2"] and ids[3] == "image-3"
    assert all(SAFE_ID_PATTERN.match(i) for i in ids), ids
    assert safe_id("../../etc/passwd") == "etc_passwd"


def test_meta_and_results_are_serialisable():
    from pipeline.outputs.meta import build_meta
    from pipeline.results import ObjectResult
    from pipeline.stages import derive_seed

    meta = build_meta(
        obj_id="x",
        seed=3,
        options=PipelineOptions().to_dict(),
        options_hash="h",
        weights_identity={"kind": "tiny-random"},
        timings={"stage1": 1.0, "stage2": 2.0},
        outputs={"glb": "mesh.glb"},
    )
    assert meta["random_weights"] is True and meta["timings_s"]["total"] == 3.0
    assert meta["versions"]["torch"] and meta["view_order"][-1] == "000"
    json.dumps(meta)
    res = ObjectResult.failure("x", ValueError("bad thing\nmore detail"))
    assert (res.status, res.error_class, res.error_message) == ("failed", "ValueError", "bad thing")
    assert pickle.loads(pickle.dumps(res)) == res
    assert derive_seed(1, "stage1") != derive_seed(1, "stage2") != derive_seed(2, "stage2")
    assert 0 <= derive_seed(2**62, "recon") < 2**63


def test_cli_options_and_inputs(tmp_path):
    from pipeline.__main__ import build_parser, expand_inputs, options_from_args

    a = build_parser().parse_args(["x.png", "--out", "o", "--steps", "3", "--no-obj", "--frame", "reference"])
    o = options_from_args(a)
    assert (o.steps_stage1, o.steps_stage2, o.write_obj, o.frame) == (3, 3, False, "reference")
    assert o.sampler == "ddim"
    o = options_from_args(
        build_parser().parse_args(["x.png", "--out", "o", "--sampler", "dpmpp", "--steps", "10"])
    )
    assert (o.sampler, o.steps_stage1, o.steps_stage2) == ("dpmpp", 10, 10)
    with pytest.raises(SystemExit):  # argparse: invalid choice
        build_parser().parse_args(["x.png", "--out", "o", "--sampler", "euler"])
    (tmp_path / "d").mkdir()
    for name in ("b.png", "a.WEBP", "notes.txt", "c.jpg"):
        (tmp_path / "d" / name).write_bytes(b"")
    got = expand_inputs([str(tmp_path / "d"), str(tmp_path / "single.txt")])
    assert [p.name for p in got] == ["a.WEBP", "b.png", "c.jpg", "single.txt"]


def test_cli_usage_errors_exit_2(tmp_path, capsys, monkeypatch):
    from pipeline.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("CRM_WEIGHTS_DIR", raising=False)
    img = tmp_path / "a.png"
    img.write_bytes(b"")
    assert main([str(img), "--out", str(tmp_path / "o"), "--foreground-ratio", "2"]) == 2
    assert "foreground_ratio" in capsys.readouterr().err
    assert main([str(img), "--out", str(tmp_path / "o"), "--device", "cpu", "--dtype", "fp16"]) == 2
    assert main([str(img), "--out", str(tmp_path / "o")]) == 2  # auto weights, nothing cached, offline
    err = capsys.readouterr().err
    assert "CRM.pth" in err and "pixel-diffusion.pth" in err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_documented_face_budget_is_the_unwrapper_default():
    """`max_faces=None` means UnwrapConfig's budget; the CLI help and the options docs quote it."""
    from pipeline.__main__ import build_parser
    from pipeline.texturing.unwrap import UnwrapConfig

    budget = UnwrapConfig().max_faces
    action = next(a for a in build_parser()._actions if a.dest == "max_faces")
    assert f"default: {budget}" in action.help
    assert f"{budget:,} faces" in PipelineOptions.__doc__


def test_run_rejects_duplicate_ids_before_any_work(tmp_path):
    from pipeline.image_to_mesh import ImageToMeshPipeline

    pipe = ImageToMeshPipeline(None, None, None, PipelineOptions(device="cpu"))
    with pytest.raises(ValueError, match="duplicate object ids: x, z$"):
        pipe.run([b"1", b"2", b"3", b"4", b"5"], tmp_path, ids=["x", "z", "y", "z", "x"])
    assert list(tmp_path.iterdir()) == []
