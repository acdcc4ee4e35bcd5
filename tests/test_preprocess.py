"""Reference-image preprocessing: fixture parity (alpha path), squaring, foreground ratio, colours,
background modes (alpha / auto / rembg / none) and the offline rembg checks."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image
from reference_files import fixture_params

from pipeline.inputs.decode import ImageInputError
from pipeline.inputs.preprocess import (
    BackgroundRemovalError,
    PreprocessConfig,
    expand_to_square,
    find_rembg_model,
    preprocess_image,
    to_uint8_array,
)


def _has_input(path) -> bool:
    return "input/src_rgba_uint8" in np.load(path).files


INPUT_FIXTURES = fixture_params("multiview", keep=_has_input)
GREY = (127, 127, 127)


def _rgba_blob(w: int, h: int, box: tuple[int, int, int, int], color=(200, 30, 40)) -> Image.Image:
    arr = np.zeros((h, w, 4), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1, :3] = color
    arr[y0:y1, x0:x1, 3] = 255
    return Image.fromarray(arr, "RGBA")


@pytest.mark.parametrize("path", INPUT_FIXTURES)
@pytest.mark.parametrize("mode", ["alpha", "auto"])
def test_fixture_parity_exact(path, mode):
    d = np.load(path)
    src = Image.fromarray(d["input/src_rgba_uint8"], "RGBA")
    out = preprocess_image(src, PreprocessConfig(background_mode=mode))
    assert out.mode == "RGB"
    np.testing.assert_array_equal(to_uint8_array(out), d["input/preprocessed_rgb_uint8"])
    if "input/pipeline_ip_rgb_uint8" in d.files:
        np.testing.assert_array_equal(to_uint8_array(out), d["input/pipeline_ip_rgb_uint8"])


def test_non_square_is_centred_with_floor_offsets():
    img = _rgba_blob(10, 5, (0, 0, 10, 5))  # opaque 10x5 -> pad 5 rows: 2 above, 3 below
    out = to_uint8_array(preprocess_image(img, PreprocessConfig(background_mode="alpha")))
    assert out.shape == (10, 10, 3)
    assert (out[:2] == GREY).all() and (out[7:] == GREY).all()
    assert (out[2:7] == (200, 30, 40)).all()
    tall = to_uint8_array(
        preprocess_image(_rgba_blob(3, 8, (0, 0, 3, 8)), PreprocessConfig(background_mode="alpha"))
    )
    assert (
        (tall[:, :2] == GREY).all() and (tall[:, 2:5] == (200, 30, 40)).all() and (tall[:, 5:] == GREY).all()
    )


def test_transparent_pixels_get_the_background_colour_and_partial_alpha_blends():
    arr = np.zeros((4, 4, 4), np.uint8)
    arr[..., :3] = (255, 255, 255)  # hidden colour under alpha 0 must not leak
    arr[0, 0] = (0, 0, 0, 255)
    arr[1, 1] = (255, 0, 0, 128)
    out = to_uint8_array(
        preprocess_image(Image.fromarray(arr, "RGBA"), PreprocessConfig(background_color=(10, 20, 30)))
    )
    assert tuple(out[3, 3]) == (10, 20, 30)
    assert tuple(out[0, 0]) == (0, 0, 0)
    r, g, b = (int(v) for v in out[1, 1])
    assert (
        abs(r - (255 * 128 + 10 * 127) / 255) <= 1
        and abs(g - 20 * 127 / 255) <= 1
        and abs(b - 30 * 127 / 255) <= 1
    )


def test_foreground_ratio_scales_whole_image_about_the_centre():
    img = _rgba_blob(100, 100, (0, 0, 100, 100))
    out = to_uint8_array(
        preprocess_image(img, PreprocessConfig(background_mode="alpha", foreground_ratio=0.5))
    )
    assert out.shape == (100, 100, 3)
    fg = np.all(out == (200, 30, 40), axis=-1)
    ys, xs = np.nonzero(fg)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 74, 25, 74)  # 50x50 pasted at floor((100-50)/2)
    assert (out[:25] == GREY).all()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="foreground_ratio"):
            PreprocessConfig(foreground_ratio=bad)


def test_recenter_moves_an_off_centre_object_to_the_middle():
    img = _rgba_blob(64, 64, (0, 0, 16, 8))  # object in the top-left corner
    out = to_uint8_array(preprocess_image(img, PreprocessConfig(recenter=True)))
    assert out.shape == (16, 16, 3)  # cropped to the 16x8 box, then squared
    fg = np.all(out == (200, 30, 40), axis=-1)
    ys, xs = np.nonzero(fg)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 11, 0, 15)
    default = to_uint8_array(preprocess_image(img))
    assert default.shape == (64, 64, 3) and np.all(default[0, 0] == (200, 30, 40))


def test_alpha_mode_opaque_and_rgb_inputs_are_all_foreground(monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", None)  # would raise if rembg were called
    rgb = Image.new("RGB", (6, 4), (1, 2, 3))
    out = to_uint8_array(preprocess_image(rgb, PreprocessConfig(background_mode="alpha")))
    assert out.shape == (6, 6, 3)
    assert (out[1:5] == (1, 2, 3)).all() and (out[0] == GREY).all() and (out[5] == GREY).all()
    opaque = rgb.convert("RGBA")
    np.testing.assert_array_equal(
        to_uint8_array(preprocess_image(opaque, PreprocessConfig(background_mode="alpha"))), out
    )


def test_none_mode_uses_image_as_is():
    arr = np.zeros((4, 8, 4), np.uint8)
    arr[..., :3] = (50, 60, 70)  # fully transparent, but "none" ignores alpha
    out = to_uint8_array(
        preprocess_image(Image.fromarray(arr, "RGBA"), PreprocessConfig(background_mode="none"))
    )
    assert out.shape == (8, 8, 3)
    assert (out[2:6] == (50, 60, 70)).all() and (out[:2] == GREY).all() and (out[6:] == GREY).all()
    half = to_uint8_array(
        preprocess_image(
            Image.new("RGB", (8, 8), (9, 9, 9)),
            PreprocessConfig(background_mode="none", foreground_ratio=0.5),
        )
    )
    assert (half[2:6, 2:6] == 9).all() and (half[:2] == GREY).all()


def test_fully_transparent_is_no_foreground():
    with pytest.raises(ImageInputError, match="no foreground"):
        preprocess_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)))


def test_auto_mode_without_rembg_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rembg", None)
    with pytest.raises(BackgroundRemovalError, match=r"rembg\[cpu\]"):
        preprocess_image(Image.new("RGB", (8, 8), (1, 2, 3)))  # no alpha -> auto wants rembg
    with pytest.raises(BackgroundRemovalError, match="background_mode='alpha'"):
        preprocess_image(_rgba_blob(8, 8, (2, 2, 6, 6)), PreprocessConfig(background_mode="rembg"))


def _fake_rembg(calls: list):
    mod = types.ModuleType("rembg")

    def new_session(name):
        calls.append(("session", name))
        return f"session:{name}"

    def remove(img, session=None):
        calls.append(("remove", session, img.mode))
        arr = np.dstack([np.asarray(img.convert("RGB")), np.zeros(img.size[::-1], np.uint8)])
        arr[2:6, 2:6, 3] = 255
        return Image.fromarray(arr, "RGBA")

    mod.new_session, mod.remove = new_session, remove
    return mod


def _isolate_rembg_env(monkeypatch, tmp_path):
    for var in ("U2NET_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("REMBG_HOME", str(tmp_path / "rembg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_rembg_model_must_be_on_disk(monkeypatch, tmp_path):
    _isolate_rembg_env(monkeypatch, tmp_path)
    calls: list = []
    monkeypatch.setitem(sys.modules, "rembg", _fake_rembg(calls))
    assert find_rembg_model("u2net") is None
    with pytest.raises(BackgroundRemovalError, match="not available offline") as info:
        preprocess_image(Image.new("RGB", (8, 8), (5, 5, 5)), PreprocessConfig(background_mode="rembg"))
    assert str(tmp_path / "rembg" / "models" / "u2net" / "u2net.onnx") in str(info.value)
    assert calls == []  # nothing was called (so nothing could download)


@pytest.mark.parametrize("layout", ["models_dir", "legacy_u2net_home"])
def test_rembg_path_with_local_model(monkeypatch, tmp_path, layout):
    _isolate_rembg_env(monkeypatch, tmp_path)
    if layout == "models_dir":
        model = tmp_path / "rembg" / "models" / "u2net" / "u2net.onnx"
    else:
        monkeypatch.setenv("U2NET_HOME", str(tmp_path / "u2"))
        model = tmp_path / "u2" / "u2net.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"onnx")
    assert find_rembg_model("u2net") == model
    calls: list = []
    monkeypatch.setitem(sys.modules, "rembg", _fake_rembg(calls))
    img = Image.new("RGB", (8, 8), (90, 80, 70))
    out = to_uint8_array(preprocess_image(img, PreprocessConfig(background_mode="auto")))
    assert calls[0] == ("session", "u2net") and calls[1][1] == "session:u2net"
    assert (out[2:6, 2:6] == (90, 80, 70)).all()
    assert (out[0] == GREY).all() and (out[:, 7] == GREY).all()
    # an RGBA image with a real alpha does not call rembg in auto mode
    calls.clear()
    preprocess_image(_rgba_blob(8, 8, (1, 1, 4, 4)), PreprocessConfig(background_mode="auto"))
    assert calls == []


def test_config_validation_and_square_helper():
    with pytest.raises(ValueError, match="background_mode"):
        PreprocessConfig(background_mode="magic")
    with pytest.raises(ValueError, match="background_color"):
        PreprocessConfig(background_color=(300, 0, 0))
    assert PreprocessConfig(background_color=[1, 2, 3]).background_color == (1, 2, 3)
    sq = expand_to_square(Image.new("RGBA", (3, 7), (1, 1, 1, 255)))
    assert sq.size == (7, 7) and sq.getpixel((0, 0)) == (0, 0, 0, 0) and sq.getpixel((2, 0)) == (1, 1, 1, 255)
