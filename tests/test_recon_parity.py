"""Parity of the reconstruction stage with the golden fixtures `$CRM_REFERENCE_DIR/recon/*.npz`.

Every fixture is run from its own `config_json` and `sd/*` weights, from the uint8 strips with the
recorded noise, and every recorded intermediate is compared (U-Net blocks through forward hooks,
triplane, decoder, FlexiCubes internals, mesh, colours, point queries, cleaned meshes). Nothing here
depends on a particular fixture's sizes: everything comes from the config and the array shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_files import fixture_params
from scipy.spatial import cKDTree

from crm_models.recon import (
    ConvolutionalReconstructionModel,
    ReconConfig,
    colors_to_texture255,
    colors_to_unit,
)
from pipeline.mesh.cleaning import CleaningConfig, clean_mesh
from pipeline.weights.recon import load_recon_weights

ATOL = RTOL = 1e-4
FIXTURES = fixture_params("recon")
_UNET_KEY = re.compile(r"^unet_(time_emb|mid_out|down\d+_out|up\d+_out)$")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, old)))
    yield
    torch.set_num_threads(old)


class Run:
    """One fixture, run once: the reference arrays and everything our implementation produced."""

    def __init__(self, path: Path):
        self.path = path
        with np.load(path) as z:
            self.ref = {k: z[k] for k in z.files}
        self.cfg = ReconConfig.from_fixture_config(json.loads(str(self.ref["config_json"])))
        model = ConvolutionalReconstructionModel(self.cfg).eval()
        sd = {k[3:]: torch.from_numpy(v) for k, v in self.ref.items() if k.startswith("sd/")}
        load_recon_weights(model, sd)
        self.model = model
        self.out: dict[str, torch.Tensor] = {}
        self._run()

    def _hook(self, name: str, pick_first: bool = False):
        def hook(_module, _inputs, output):
            self.out[name] = (output[0] if pick_first else output).detach().clone()

        return hook

    def _run(self) -> None:
        m, ref, out = self.model, self.ref, self.out
        unet = m.unet2.unet
        handles = [unet.time_embedding.register_forward_hook(self._hook("unet_time_emb"))]
        handles += [
            b.register_forward_hook(self._hook(f"unet_down{i}_out", True))
            for i, b in enumerate(unet.down_blocks)
        ]
        handles += [
            b.register_forward_hook(self._hook(f"unet_up{i}_out")) for i, b in enumerate(unet.up_blocks)
        ]
        handles.append(unet.mid_block.register_forward_hook(self._hook("unet_mid_out")))
        try:
            with torch.inference_mode():
                x = m.assemble_input(ref["input_rgb_strip"], ref["input_ccm_strip"])
                out["unet_input_clean"] = x
                out["unet_input_noised"] = m.add_noise(x, noise=ref["noise"])
                out["timestep"] = m.noiser.timesteps(1)
                out["alphas_cumprod_t"] = torch.tensor([m.noiser.alpha_cumprod], dtype=torch.float64)
                out["triplane_features"] = m.run_unet(out["unet_input_noised"])
        finally:
            for h in handles:
                h.remove()
        # The public path (encode) must give the same triplane.
        self.triplane_encode = m.encode(ref["input_rgb_strip"], ref["input_ccm_strip"], noise=ref["noise"])
        # NHWC convolutions: same math, float rounding only.
        m.unet2.use_channels_last(True)
        try:
            with torch.inference_mode():
                self.triplane_channels_last = m.run_unet(out["unet_input_noised"])
        finally:
            m.unet2.use_channels_last(False)
        tri = out["triplane_features"]
        self.mesh = m.decode(tri, return_intermediates=True)
        out.update(self.mesh.intermediates)
        self.fast_mesh = m.decode(tri)
        raw = out["mesh_vertex_rgb_raw"]
        out["mesh_vertex_rgb01"] = colors_to_unit(raw)
        out["mesh_vertex_rgb255_texture_mapping"] = colors_to_texture255(raw)
        if "query_points" in ref:
            q = ref["query_points"]
            out["query_features"] = m.query_features(tri, q)
            out["query_sdf_mlp_out"] = m.query_sdf(tri, q)
            out["query_rgb_raw"] = m.query_color(tri, q)

    def pairs(self, keys):
        for k in keys:
            if k in self.ref:
                yield k, self.out[k].cpu().numpy(), self.ref[k]


_RUNS: dict[Path, Run] = {}


@pytest.fixture(scope="module", params=FIXTURES)
def run(request) -> Run:
    if request.param not in _RUNS:
        _RUNS.clear()  # keep one fixture's arrays in memory at a time
        _RUNS[request.param] = Run(request.param)
    return _RUNS[request.param]


def _close(name: str, got: np.ndarray, want: np.ndarray, atol: float = ATOL, rtol: float = RTOL) -> None:
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    bad = diff > atol + rtol * np.abs(want.astype(np.float64))
    assert not bad.any(), f"{name}: {int(bad.sum())} values off, max abs diff {diff.max():.3g}"


def test_config_from_fixture(run):
    cfg, ref = run.cfg, run.ref
    r = ref["input_rgb_strip"].shape[0]
    assert cfg.plane_resolution == r
    assert (cfg.decoder.grid_res + 1) ** 3 == ref["grid_verts"].shape[0]
    assert tuple(run.model.unet2.learned_plane.shape) == tuple(ref["sd/unet2.learned_plane"].shape)


def test_input_assembly_and_noise(run):
    for k, got, want in run.pairs(["unet_input_clean", "unet_input_noised", "alphas_cumprod_t"]):
        _close(k, got, want, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(run.out["timestep"].numpy(), run.ref["timestep"])


def test_unet_blocks(run):
    keys = sorted(k for k in run.ref if _UNET_KEY.match(k))
    assert keys, "fixture records no U-Net intermediates"
    for k in keys:
        assert k in run.out, f"no forward hook produced {k}"
        _close(k, run.out[k].numpy(), run.ref[k])


def test_triplane(run):
    _close("triplane_features", run.out["triplane_features"].numpy(), run.ref["triplane_features"])
    assert torch.equal(run.triplane_encode, run.out["triplane_features"]), (
        "encode() differs from the staged run"
    )


def test_triplane_channels_last(run):
    """The NHWC U-Net (as the pipeline runs it on the CPU) meets the reference at the same tolerance."""
    _close("triplane_features (NHWC)", run.triplane_channels_last.numpy(), run.ref["triplane_features"])


def test_decoder_intermediates(run):
    keys = [
        "grid_verts",
        "grid_point_features",
        "sdf_mlp_out",
        "sdf_raw",
        "sdf",
        "deformation_raw",
        "v_deformed",
        "weight_mlp_out",
        "weights21",
        "fc_L_dev",
    ]
    for k, got, want in run.pairs(keys):
        _close(k, got, want)
    np.testing.assert_array_equal(run.out["cube_indices"].numpy(), run.ref["cube_indices"])


def test_flexicubes_topology(run):
    np.testing.assert_array_equal(run.out["fc_surf_cubes"].numpy(), run.ref["fc_surf_cubes"])
    np.testing.assert_array_equal(run.out["fc_case_ids"].numpy(), run.ref["fc_case_ids"])
    np.testing.assert_array_equal(run.out["mesh_faces"].numpy(), run.ref["mesh_faces"].astype(np.int64))
    _close("mesh_verts", run.out["mesh_verts"].numpy(), run.ref["mesh_verts"])
    assert run.mesh.faces.dtype == torch.int64 and run.mesh.vertices.dtype == torch.float32


def test_fast_decode_matches_full_decode(run):
    """Evaluating the weight MLP only on surface cubes gives the identical mesh."""
    fast, full = run.fast_mesh, run.mesh
    assert fast.intermediates is None
    assert torch.equal(fast.faces, full.faces)
    assert torch.equal(fast.vertices, full.vertices)
    assert torch.equal(fast.vertex_colors, full.vertex_colors)


def test_colours_and_queries(run):
    for k, got, want in run.pairs(["mesh_vertex_rgb_raw", "mesh_vertex_rgb01"]):
        _close(k, got, want)
    for k, got, want in run.pairs(["mesh_vertex_rgb255_texture_mapping"]):
        _close(k, got, want, atol=2e-2, rtol=0)
    for k, got, want in run.pairs(["query_features", "query_sdf_mlp_out", "query_rgb_raw"]):
        _close(k, got, want)


def test_color_field_matches_query(run):
    import pickle

    tri = run.out["triplane_features"]
    field = pickle.loads(pickle.dumps(run.model.color_field(tri)))
    pts = run.out["mesh_verts"][:257]
    assert torch.equal(field(pts), run.model.query_color(tri, pts))
    assert tuple(field.triplane.shape) == tuple(tri.shape[1:])


def _match_points(name: str, got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> None:
    assert got.shape == want.shape, f"{name}: {got.shape} vs reference {want.shape}"
    if len(want) == 0:
        return
    d1, _ = cKDTree(want).query(got)
    d2, _ = cKDTree(got).query(want)
    assert max(d1.max(), d2.max()) <= tol, f"{name}: vertices differ by up to {max(d1.max(), d2.max()):.3g}"


@pytest.mark.parametrize(
    "prefix, cfg",
    [("clean_kiui027", CleaningConfig()), ("clean_kiui02x_new", CleaningConfig.kiui_new_defaults())],
)
def test_mesh_cleaning(run, prefix, cfg):
    if f"{prefix}_verts" not in run.ref:
        pytest.skip(f"fixture has no {prefix}_* arrays")
    v, f = clean_mesh(run.mesh.vertices.numpy(), run.mesh.faces.numpy(), cfg)
    rv, rf = run.ref[f"{prefix}_verts"], run.ref[f"{prefix}_faces"]
    assert f.shape == rf.shape, f"{prefix}: {len(f)} faces vs reference {len(rf)}"
    _match_points(prefix, v, rv)
    # Faces compared order-independently: map our vertices to their nearest reference vertex.
    nearest = cKDTree(rv).query(v)[1]
    ours = {tuple(t) for t in np.sort(nearest[f], axis=1).tolist()}
    theirs = {tuple(t) for t in np.sort(rf, axis=1).tolist()}
    assert ours == theirs, f"{prefix}: {len(ours ^ theirs)} faces differ"
