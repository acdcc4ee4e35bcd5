"""Checkpoint loading for the reconstruction model: strict keys, safe formats, truncation, conversion."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig
from crm_models.recon.config import UNetConfig
from pipeline.weights import convert as convert_weights
from pipeline.weights.checkpoints import CheckpointError, CheckpointKeyError
from pipeline.weights.recon import build_recon_model, load_recon_weights, rename_legacy_keys

CFG = ReconConfig(plane_resolution=64, unet=UNetConfig(block_out_channels=(32,) * 7, layers_per_block=1))


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(1)
    model = ConvolutionalReconstructionModel(CFG)
    with torch.no_grad():
        model.unet2.learned_plane.normal_()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fresh():
    return ConvolutionalReconstructionModel(CFG)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_roundtrip_loads_every_tensor(tmp_path, state_dict, suffix):
    path = tmp_path / f"crm{suffix}"
    if suffix == ".pth":
        torch.save(state_dict, path)
    else:
        save_file(state_dict, str(path))
    model = build_recon_model(path, cfg=CFG)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_dict[k]), k


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_missing_key_is_named(tmp_path, state_dict, suffix):
    sd = dict(state_dict)
    del sd["unet2.learned_plane"]
    path = tmp_path / f"missing{suffix}"
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    with pytest.raises(CheckpointKeyError, match=r"1 missing keys: unet2\.learned_plane") as err:
        load_recon_weights(_fresh(), path)
    assert err.value.missing == ["unet2.learned_plane"] and not err.value.unexpected
    assert str(path) in str(err.value)


def test_extra_key_is_named(state_dict):
    sd = dict(state_dict, **{"renderer.extra_buffer": torch.zeros(3)})
    with pytest.raises(CheckpointKeyError, match=r"1 unexpected keys: renderer\.extra_buffer"):
        load_recon_weights(_fresh(), sd)


def test_wrong_shape_is_named(state_dict):
    sd = dict(state_dict)
    sd["rgbMlp.fc3.bias"] = torch.zeros(4)
    with pytest.raises(CheckpointKeyError, match=r"rgbMlp\.fc3\.bias \(expected \(3,\), got \(4,\)\)"):
        load_recon_weights(_fresh(), sd)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_reported(tmp_path, state_dict, suffix):
    path = tmp_path / f"trunc{suffix}"
    small = {k: v for k, v in state_dict.items() if k.startswith("rgbMlp")}
    torch.save(small, path) if suffix == ".pth" else save_file(small, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc") as err:
        load_recon_weights(_fresh(), path)
    assert not isinstance(err.value, CheckpointKeyError)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_recon_weights(_fresh(), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_recon_weights(_fresh(), tmp_path / f"nope{suffix}")


def test_pickled_objects_are_refused(tmp_path):
    import argparse

    path = tmp_path / "evil.pth"
    torch.save({"obj": argparse.Namespace(x=1), "w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_recon_weights(_fresh(), path)


def test_legacy_attention_names_are_mapped(state_dict):
    old = {}
    for k, v in state_dict.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{legacy}.")
        old[k] = v
    assert any(".query." in k for k in old)
    assert rename_legacy_keys(old).keys() == state_dict.keys()
    load_recon_weights(_fresh(), old)


def test_convert_cli(tmp_path, state_dict, capsys):
    src = tmp_path / "CRM.pth"
    torch.save(state_dict, src)
    # The tiny state dict does not fit the official full model: verification fails, nothing written.
    assert convert_weights.main([str(src)]) == 1
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "unet2.learned_plane" in err
    assert not (tmp_path / "CRM.safetensors").exists()
    assert convert_weights.main([str(src), "--no-verify"]) == 0
    out = tmp_path / "CRM.safetensors"
    model = build_recon_model(out, cfg=CFG)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_dict[k]), k
    dst = tmp_path / "sub" / "w.safetensors"
    assert convert_weights.main([str(src), str(dst), "--no-verify"]) == 0 and dst.is_file()
    assert not list(tmp_path.glob("**/*.tmp"))
    with pytest.raises(CheckpointError, match="is the source"):
        convert_weights.convert(out, out)


def test_convert_expects_the_official_full_model_keys():
    """The converter verifies against the full configuration (built on the meta device)."""
    shapes = convert_weights.expected_recon_shapes()
    assert len(shapes) == 629
    assert shapes["unet2.learned_plane"] == (1, 20, 256, 768)
