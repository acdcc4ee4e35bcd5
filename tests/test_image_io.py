"""load_image: odd-but-valid images convert correctly; bad inputs fail with a clear ImageInputError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs.decode import ImageInputError, ImageLoadConfig, load_image


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _noise_rgb(h=64, w=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC) and that has no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


# ---- valid inputs in unusual modes ----------------------------------------------------------


def test_rgba_path_bytes_and_pil_agree(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    arr[..., 3] = np.maximum(arr[..., 3], 1)
    img = Image.fromarray(arr, "RGBA")
    path = tmp_path / "a.png"
    img.save(path)
    for src in (path, str(path), path.read_bytes(), img):
        out = load_image(src)
        assert out.mode == "RGBA" and out.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(out), arr)


def test_grayscale(tmp_path):
    arr = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(arr, "L").save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (8, 8, 4)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], arr)
    assert (out[..., 3] == 255).all()


def test_grayscale_alpha(tmp_path):
    lum = np.full((6, 6), 200, np.uint8)
    alpha = np.zeros((6, 6), np.uint8)
    alpha[2:4, 2:4] = 255
    Image.fromarray(np.dstack([lum, alpha]), "LA").save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png"))
    np.testing.assert_array_equal(out[..., 3], alpha)
    assert (out[2:4, 2:4, :3] == 200).all()


def test_cmyk(tmp_path):
    cmyk = np.zeros((4, 4, 4), np.uint8)
    cmyk[..., 1] = 255  # magenta
    cmyk[..., 2] = 255  # + yellow = red
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    out = np.asarray(load_image(tmp_path / "c.tif"))
    assert out.shape == (4, 4, 4)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0, 255])
    # CMYK JPEG also loads
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=95)
    jpg = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert jpg[..., 0].min() > 200 and jpg[..., 1].max() < 60 and (jpg[..., 3] == 255).all()


def test_16bit_grayscale_is_rescaled(tmp_path):
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    img.save(tmp_path / "g16.png")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 3] == 255).all()


def test_float_image(tmp_path):
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(arr, "F").save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


def test_palette_with_transparency(tmp_path):
    idx = np.zeros((5, 5), np.uint8)
    idx[1:4, 1:4] = 1
    img = Image.fromarray(idx, "P")
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (256 * 3 - 6))
    img.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_image(tmp_path / "p.png"))
    assert (out[idx == 0, 3] == 0).all()
    assert (out[idx == 1] == [10, 200, 30, 255]).all()
    # palette without transparency -> opaque RGB colours
    img.save(tmp_path / "p2.png")
    out2 = np.asarray(load_image(tmp_path / "p2.png"))
    assert (out2[..., 3] == 255).all() and (out2[idx == 1, :3] == [10, 200, 30]).all()


def test_one_pixel_image_loads(tmp_path):
    Image.new("RGB", (1, 1), (9, 8, 7)).save(tmp_path / "one.png")
    out = load_image(tmp_path / "one.png")
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (9, 8, 7, 255)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(arr).save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "o.jpg")
    assert out.size == (20, 40)  # width/height swapped
    a = np.asarray(out).astype(int)
    top, bottom = a[:15].mean(axis=(0, 1)), a[-15:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    raw = load_image(tmp_path / "o.jpg", ImageLoadConfig(apply_exif_orientation=False))
    assert raw.size == (40, 20)


def test_animated_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(tmp_path / "a.gif")
    assert out.getpixel((4, 4))[:3] == (255, 0, 0)


# ---- bad inputs -----------------------------------------------------------------------------


def test_missing_empty_directory(tmp_path):
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageInputError, match=r"empty \(0 bytes\)"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageInputError, match=r"empty \(0 bytes\)"):
        load_image(b"")
    with pytest.raises(ImageInputError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(ImageInputError, match="expected a path"):
        load_image(12345)  # type: ignore[arg-type]


def test_text_file_is_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageInputError, match="not a recognised image format") as info:
        load_image(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated(tmp_path):
    data = _png_bytes(_noise_rgb(128, 128))
    p = tmp_path / "t.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match="truncated|corrupt"):
        load_image(p)
    jpg = io.BytesIO()
    _noise_rgb(128, 128).save(jpg, format="JPEG")
    with pytest.raises(ImageInputError, match="truncated|corrupt"):
        load_image(jpg.getvalue()[: len(jpg.getvalue()) // 3])


def test_corrupt_pixel_data(tmp_path):
    data = bytearray(_png_bytes(_noise_rgb(64, 64)))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 400] = bytes(390)  # zero out compressed data (CRC now wrong too)
    with pytest.raises(ImageInputError, match="corrupt|truncated"):
        load_image(bytes(data))


def test_huge_dimensions_from_crafted_header(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageInputError, match="too large"):
        load_image(p)
    # below PIL's own bomb threshold but above ours: caught from the header, nothing decoded
    with pytest.raises(ImageInputError, match=r"9000x9000 = 81000000 pixels exceeds the limit"):
        load_image(_png_header_only(9000, 9000))


def test_configurable_max_pixels(tmp_path):
    data = _png_bytes(_noise_rgb(100, 100))
    assert load_image(data).size == (100, 100)
    with pytest.raises(ImageInputError, match="exceeds the limit of 5000"):
        load_image(data, max_pixels=5000)
    with pytest.raises(ImageInputError, match="exceeds the limit of 9999"):
        load_image(data, ImageLoadConfig(max_pixels=9999))


def test_fully_transparent_has_no_foreground(tmp_path):
    p = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(p)
    with pytest.raises(ImageInputError, match="no foreground"):
        load_image(p)
    out = load_image(p, ImageLoadConfig(require_foreground=False))
    assert out.getchannel("A").getextrema() == (0, 0)
