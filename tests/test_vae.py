"""SD KL-VAE as diffusers AutoencoderKL: fixture parity (posterior + decode), key mapping both ways
against the full stage-1 manifest, config parsing and error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference_files import fixture_params

from crm_models.multiview.vae import (
    VAEConfig,
    VAEKeyError,
    build_vae,
    convert_ldm_vae_state_dict,
    ldm_vae_keys_from_diffusers,
    vae_decode,
    vae_encode_posterior,
    vae_sample_scaled_latent,
)

ATOL = 5e-5  # README: VAE atol 5e-5
PREFIX = "sd/vae_model."


def _has_vae(path) -> bool:
    files = np.load(path).files
    return any(k.startswith(PREFIX) for k in files)


VAE_FIXTURES = fixture_params("multiview", keep=_has_vae)
MANIFESTS = fixture_params("multiview", "full_state_dict_manifest_stage*.json")


def load_vae_fixture(path):
    d = np.load(path)
    cfg = VAEConfig.from_fixture_config(json.loads(str(d["config_json"])))
    sd = {k[len(PREFIX) :]: torch.from_numpy(d[k]) for k in d.files if k.startswith(PREFIX)}
    vae = build_vae(cfg)
    vae.load_state_dict(convert_ldm_vae_state_dict(sd), strict=True)
    return cfg, vae, sd, d


@pytest.fixture(scope="module", params=VAE_FIXTURES)
def vae_case(request):
    return load_vae_fixture(request.param)


def test_encode_posterior_parity(vae_case):
    cfg, vae, _, d = vae_case
    groups = sorted({k.split("/")[1] for k in d.files if k.startswith("vae_enc/")})
    assert groups, "fixture has no vae_enc/* groups"
    for g in groups:
        x = torch.from_numpy(d[f"vae_enc/{g}/input"])
        with torch.no_grad():
            mean, logvar, std = vae_encode_posterior(vae, x)
        h = x.shape[-1] // cfg.downsample_factor
        assert mean.shape == (x.shape[0], cfg.latent_channels, h, h)
        for name, t in (("mean", mean), ("logvar", logvar), ("std", std)):
            err = float((t - torch.from_numpy(d[f"vae_enc/{g}/{name}"])).abs().max())
            assert err <= ATOL, f"{g}/{name}: {err}"
        lat = vae_sample_scaled_latent(
            mean, std, cfg.scale_factor, noise=torch.from_numpy(d[f"vae_enc/{g}/noise"])
        )
        err = float((lat - torch.from_numpy(d[f"vae_enc/{g}/latent_scaled"])).abs().max())
        assert err <= ATOL, f"{g}/latent_scaled: {err}"


def test_decode_parity(vae_case):
    cfg, vae, _, d = vae_case
    lat = torch.from_numpy(d["decode/latents"])
    with torch.no_grad():
        x = vae_decode(vae, lat, cfg.scale_factor)
    ref = torch.from_numpy(d["decode/x_float"])
    assert x.shape == ref.shape == (lat.shape[0], 3, lat.shape[2] * 8, lat.shape[3] * 8)
    assert float((x - ref).abs().max()) <= ATOL
    # unclamped: the tiny random decoder overshoots [-1, 1] somewhere
    assert float(x.abs().max()) > 1.0


def test_fixture_keys_round_trip(vae_case):
    _, vae, sd, _ = vae_case
    inverse = ldm_vae_keys_from_diffusers(vae.state_dict().keys())
    assert sorted(inverse.values()) == sorted(sd)
    # the 'vae_model.' prefix is also accepted
    prefixed = convert_ldm_vae_state_dict({"vae_model." + k: v for k, v in sd.items()})
    assert set(prefixed) == set(vae.state_dict())


def test_logvar_clamp_and_sampling():
    cfg = VAEConfig(block_out_channels=[32, 32], layers_per_block=1)
    torch.manual_seed(0)
    vae = build_vae(cfg)
    with torch.no_grad():
        vae.quant_conv.bias[cfg.latent_channels :] = 100.0  # logvar far above the clamp
        mean, logvar, std = vae_encode_posterior(vae, torch.zeros(1, 3, 16, 16))
    assert float(logvar.max()) == 20.0
    assert torch.allclose(std, torch.exp(0.5 * logvar))
    g = torch.Generator().manual_seed(3)
    a = vae_sample_scaled_latent(mean, std, 0.5, generator=g)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, 0.5 * (mean + std * noise))


@pytest.mark.parametrize("manifest", MANIFESTS)
def test_full_manifest_maps_key_by_key(manifest):
    """All 248 vae_model.* keys of the official model map to build_vae(VAEConfig()) (meta device)
    with identical shapes (1x1 attention convs become Linear), and back."""
    m = json.loads(manifest.read_text())
    entries = [e for e in m["keys"] if e["key"].startswith("vae_model.")]
    assert len(entries) == 248
    with torch.device("meta"):
        vae = build_vae(VAEConfig())
    own = vae.state_dict()
    sd = {e["key"][len("vae_model.") :]: torch.empty(e["shape"], device="meta") for e in entries}
    conv = convert_ldm_vae_state_dict(sd)
    assert set(conv) == set(own)
    for k, v in conv.items():
        assert tuple(v.shape) == tuple(own[k].shape), k
    inverse = ldm_vae_keys_from_diffusers(own.keys())
    assert set(inverse.values()) == set(sd)
    assert len(set(inverse.values())) == len(inverse)  # one-to-one
    assert sum(p.numel() for p in vae.parameters()) == m["parameter_counts"]["vae_model (total)"] == 83653863
    assert VAEConfig().scale_factor == 0.18215 and VAEConfig().downsample_factor == 8


def test_unmapped_keys_are_reported():
    sd = {
        "encoder.down.0.block.0.conv1.weight": torch.zeros(1),
        "loss.discriminator.main.0.weight": torch.zeros(1),
        "encoder.mid.attn_1.bogus.weight": torch.zeros(1),
    }
    with pytest.raises(VAEKeyError, match="2 VAE keys") as info:
        convert_ldm_vae_state_dict(sd)
    assert info.value.keys == ["encoder.mid.attn_1.bogus.weight", "loss.discriminator.main.0.weight"]
    out = convert_ldm_vae_state_dict(sd, ignore_unmapped=True)
    assert list(out) == ["encoder.down_blocks.0.resnets.0.conv1.weight"]
    with pytest.raises(VAEKeyError, match="not an ldm VAE"):
        convert_ldm_vae_state_dict({"foo.bar": torch.zeros(1)})
    with pytest.raises(VAEKeyError, match="no ldm counterpart"):
        ldm_vae_keys_from_diffusers(["encoder.down_blocks.0.resnets.0.conv1.weight", "encoder.extra.weight"])


def test_config_parsing():
    dd = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    params = {"embed_dim": 4, "ddconfig": dd}
    whole = {"model": {"params": {"scale_factor": 0.5, "vae_config": {"target": "x", "params": params}}}}
    a = VAEConfig.from_fixture_config(whole)
    assert a.block_out_channels == [32, 64] and a.layers_per_block == 1 and a.scale_factor == 0.5
    assert (
        VAEConfig.from_fixture_config(params)
        == VAEConfig.from_fixture_config(dd)
        == VAEConfig.from_fixture_config({"target": "x", "params": params})
    )
    assert VAEConfig.from_fixture_config(dd).scale_factor == 0.18215
    with pytest.raises(ValueError, match="attn_resolutions"):
        VAEConfig.from_fixture_config(dict(dd, attn_resolutions=[16]))
    with pytest.raises(ValueError, match="embed_dim"):
        VAEConfig.from_fixture_config({"embed_dim": 8, "ddconfig": dd})


def test_input_validation():
    vae = build_vae(VAEConfig(block_out_channels=[32, 32], layers_per_block=1))
    with pytest.raises(ValueError, match="multiple of 2"):
        vae_encode_posterior(vae, torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae_encode_posterior(vae, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae_decode(vae, torch.zeros(1, 3, 8, 8), 0.18215)
