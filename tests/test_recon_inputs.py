"""Bad inputs to the reconstruction model give clear errors; a new configuration runs end to end."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from crm_models.recon import (
    ConvolutionalReconstructionModel,
    ReconConfig,
    colors_to_texture255,
    colors_to_unit,
)
from crm_models.recon.config import UNetConfig

R = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ReconConfig(plane_resolution=R, unet=UNetConfig(block_out_channels=(32,) * 7, layers_per_block=1))
    m = ConvolutionalReconstructionModel(cfg.with_decoder(grid_res=10)).eval()
    with torch.no_grad():
        m.rgbMlp.fc3.weight.mul_(4.0)
    return m


@pytest.fixture(scope="module")
def strips():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (R, 6 * R, 3), dtype=np.uint8), rng.integers(
        0, 256, (R, 6 * R, 3), dtype=np.uint8
    )


@pytest.mark.parametrize(
    "shape", [(R, 5 * R, 3), (R + 1, 6 * R, 3), (R, 6 * R, 4), (6 * R, R, 3), (R, 6 * R)]
)
def test_wrong_strip_shape(model, strips, shape):
    bad = np.zeros(shape, np.uint8)
    with pytest.raises(ValueError, match=r"RGB strip has shape .*expected \(64, 384, 3\)"):
        model.assemble_input(bad, strips[1])
    with pytest.raises(ValueError, match="CCM strip has shape"):
        model.assemble_input(strips[0], bad)


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint16])
def test_wrong_strip_dtype(model, strips, dtype):
    with pytest.raises(TypeError, match="RGB strip must be uint8"):
        model.assemble_input(strips[0].astype(dtype), strips[1])
    with pytest.raises(TypeError, match="CCM strip must be uint8"):
        model.encode(strips[0], torch.from_numpy(strips[1]).float())


def test_strip_not_an_array(model, strips):
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        model.assemble_input(strips[0].tolist(), strips[1])


def test_tensor_and_numpy_strips_agree(model, strips):
    a = model.assemble_input(*strips)
    b = model.assemble_input(torch.from_numpy(strips[0]), torch.from_numpy(strips[1]))
    assert a.shape == (1, 12, R, 3 * R) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_nan_noise_is_rejected(model, strips):
    noise = np.full((1, 12, R, 3 * R), 0.5, np.float32)
    noise[0, 3, 5, 7] = np.nan
    with pytest.raises(ValueError, match="noise contains NaN"):
        model.encode(*strips, noise=noise)
    with pytest.raises(ValueError, match="noise has shape"):
        model.encode(*strips, noise=noise[:, :6])


def test_nan_triplane_and_points_are_rejected(model):
    tri = torch.zeros(1, 32, R, 3 * R)
    tri[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="triplane contains NaN"):
        model.decode(tri)
    with pytest.raises(ValueError, match="triplane has shape"):
        model.decode(torch.zeros(1, 32, R, 2 * R))
    with pytest.raises(ValueError, match="triplane has shape"):
        model.decode(torch.zeros(1, 16, R, 3 * R))
    pts = torch.zeros(4, 3)
    pts[2, 1] = float("inf")
    with pytest.raises(ValueError, match="points contains NaN or infinite"):
        model.query_color(torch.zeros(1, 32, R, 3 * R), pts)
    with pytest.raises(ValueError, match=r"points must have shape \(N, 3\)"):
        model.query_color(torch.zeros(1, 32, R, 3 * R), torch.zeros(4, 2))


def test_generator_noise_is_reproducible(model, strips):
    x = model.assemble_input(*strips)
    a = model.add_noise(x, generator=torch.Generator().manual_seed(5))
    b = model.add_noise(x, generator=torch.Generator().manual_seed(5))
    c = model.add_noise(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Noise statistics: x_t - sqrt(a) x = sqrt(1 - a) (eps * 0.5 + 0.5).
    ab = model.noiser.alpha_cumprod
    noise = (a - ab**0.5 * x) / (1 - ab) ** 0.5
    assert abs(float(noise.mean()) - 0.5) < 0.01 and abs(float(noise.std()) - 0.5) < 0.01


def test_end_to_end_on_a_new_configuration(model, strips):
    """A configuration no fixture uses (grid 10, plane 64) decodes to a valid, closed-form-checked mesh."""
    tri = model.encode(*strips, generator=torch.Generator().manual_seed(1))
    full = model.decode(tri, return_intermediates=True)
    fast = model.decode(tri)
    assert torch.equal(fast.faces, full.faces) and torch.equal(fast.vertices, full.vertices)
    inter = full.intermediates
    n = model.cfg.decoder.grid_res
    assert inter["grid_verts"].shape == ((n + 1) ** 3, 3) and inter["weights21"].shape == (n**3, 21)
    # Sphere prior and deformation limits (SPEC §7).
    verts = inter["grid_verts"]
    torch.testing.assert_close(inter["sdf"], inter["sdf_raw"] + 0.5 - verts.norm(dim=-1))
    assert float((inter["v_deformed"] - verts).abs().max()) <= 1 / (2 * n) + 1e-7
    torch.testing.assert_close(inter["weights21"], inter["weight_mlp_out"] * 0.1)
    v, f = full.vertices, full.faces
    assert f.dtype == torch.int64 and v.dtype == torch.float32 and len(f) > 0
    assert int(f.min()) >= 0 and int(f.max()) < len(v)
    # Colours at the mesh vertices equal point queries there.
    torch.testing.assert_close(full.vertex_colors, model.query_color(tri, v))
    unit = colors_to_unit(full.vertex_colors)
    assert float(unit.min()) >= 0 and float(unit.max()) <= 1
    t255 = colors_to_texture255(full.vertex_colors.numpy())
    np.testing.assert_allclose(t255, np.clip((full.vertex_colors.numpy() + 1) * 127.5, 0, 255))


def test_color_field_pickles_and_moves(model):
    tri = torch.randn(1, 32, R, 3 * R, generator=torch.Generator().manual_seed(3))
    field = model.color_field(tri)
    pts = torch.rand(100, 3) * 2.6 - 1.3
    clone = pickle.loads(pickle.dumps(field)).to("cpu")
    assert torch.equal(clone(pts), model.query_color(tri, pts))
    assert torch.equal(field(pts.numpy()), field(pts))
    # The field owns a copy: changing the model afterwards does not change it.
    before = field(pts)
    with torch.no_grad():
        model.rgbMlp.fc3.bias.add_(1.0)
    try:
        assert torch.equal(field(pts), before)
    finally:
        with torch.no_grad():
            model.rgbMlp.fc3.bias.sub_(1.0)


def test_empty_surface_gives_empty_mesh(model):
    """A triplane whose sdf is negative everywhere (sphere prior outweighed) yields no faces."""
    with torch.no_grad():
        saved = model.sdfMlp.fc3.bias.clone()
        model.sdfMlp.fc3.bias[0] = -100.0
    try:
        mesh = model.decode(torch.zeros(1, 32, R, 3 * R))
    finally:
        with torch.no_grad():
            model.sdfMlp.fc3.bias.copy_(saved)
    assert mesh.vertices.shape == (0, 3) and mesh.faces.shape == (0, 3)
    assert mesh.vertex_colors.shape == (0, 3)
