"""ReconConfig and model structure: the full configuration has exactly the official checkpoint's keys."""

from __future__ import annotations

import json

import pytest
import torch
from reference_files import require

from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig
from crm_models.recon.config import UNetConfig
from crm_models.recon.unet import build_unet2d


@pytest.fixture(scope="module")
def manifest(reference_dir):
    path = require(reference_dir / "recon" / "crm_full_state_dict_manifest.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return ConvolutionalReconstructionModel(ReconConfig())


def test_full_config_state_dict_matches_manifest(manifest, meta_model):
    sd = meta_model.state_dict()
    got = [(k, list(v.shape)) for k, v in sd.items()]
    want = [(e["key"], list(e["shape"])) for e in manifest["keys"]]
    missing = sorted({k for k, _ in want} - {k for k, _ in got})
    extra = sorted({k for k, _ in got} - {k for k, _ in want})
    assert not missing and not extra, f"missing {missing[:10]}, unexpected {extra[:10]}"
    assert got == want  # same shapes, same order
    assert len(sd) == manifest["num_keys"]
    assert sum(v.numel() for v in sd.values()) == manifest["num_parameters_total"]
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert not list(meta_model.buffers())


def test_full_config_unet_arguments_match_manifest(manifest):
    with torch.device("meta"):
        unet = build_unet2d(ReconConfig())
    for key, value in manifest["unet2_unet_config"].items():
        if key in unet.config:
            got = unet.config[key]
            got = list(got) if isinstance(got, tuple) else got
            assert got == value, f"UNet2DModel.{key}: {got!r} != official {value!r}"


def test_official_defaults():
    cfg = ReconConfig()
    assert cfg.plane_resolution == 256 and cfg.c_dim == 32 and cfg.learned_plane_channels == 20
    assert cfg.decoder.grid_res == 80
    assert cfg.decoder.deformation_scale == pytest.approx(1 / 160)
    assert cfg.noise.timestep == 20 and cfg.noise.noise_mean == 0.5 and cfg.noise.noise_std == 0.5
    assert json.loads(json.dumps(cfg.to_dict()))["unet"]["block_out_channels"][-1] == 512


def test_from_fixture_config_reads_sizes_and_specs():
    cfg = ReconConfig.from_fixture_config(
        {
            "name": "x",
            "plane_resolution": 128,
            "block_out_channels": [32, 64, 64, 32, 32, 32, 32],
            "layers_per_block": 1,
            "grid_res": 12,
            "specs": {
                "Input": {"tet_grid_size": 12, "scale": 0.95},
                "Pretrain": {"mode": None, "radius": 0.4},
                "ArchSpecs": {"fea_concat": False, "mlp_bias": True},
                "DecoderSpecs": {"c_dim": 32, "plane_resolution": 128},
            },
        }
    )
    assert cfg.plane_resolution == 128 and cfg.decoder.grid_res == 12
    assert cfg.unet.block_out_channels == (32, 64, 64, 32, 32, 32, 32) and cfg.unet.layers_per_block == 1
    assert cfg.decoder.sphere_radius == 0.4 and cfg.decoder.sphere_prior
    with pytest.raises(ValueError, match="fea_concat"):
        ReconConfig.from_fixture_config({"specs": {"ArchSpecs": {"fea_concat": True}}})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"plane_resolution": 100}, "multiple of 64"),
        ({"c_dim": 8}, "c_dim"),
        ({"unet": UNetConfig(block_out_channels=(32, 48, 32, 32, 32, 32, 32))}, "norm_num_groups"),
        ({"unet": UNetConfig(block_out_channels=(32, 32))}, "block types"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReconConfig(**kwargs)
