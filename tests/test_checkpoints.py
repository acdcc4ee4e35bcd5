"""Checkpoint file reading, strict loading and conversion (pipeline.weights.checkpoints)."""

from __future__ import annotations

import pytest
import torch

from pipeline.weights.checkpoints import (
    CheckpointError,
    CheckpointKeyError,
    convert_to_safetensors,
    load_state_dict_file,
    load_strict,
)


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_pth_and_safetensors_round_trip(tmp_path):
    m = _module()
    torch.save(m.state_dict(), tmp_path / "w.pth")
    dst = convert_to_safetensors(tmp_path / "w.pth")
    assert dst == tmp_path / "w.safetensors"
    for path in (tmp_path / "w.pth", dst):
        sd = load_state_dict_file(path)
        m2 = _module().apply(lambda mod: torch.nn.init.zeros_(mod.weight) if hasattr(mod, "weight") else None)
        load_strict(m2, sd)
        for k, v in m.state_dict().items():
            assert torch.equal(m2.state_dict()[k], v)


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    m = _module()
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "w.ckpt")
    assert set(load_state_dict_file(tmp_path / "w.ckpt")) == set(m.state_dict())


def test_missing_and_unexpected_keys_are_listed():
    m = _module()
    sd = dict(m.state_dict())
    sd.pop("0.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointKeyError) as err:
        load_strict(m, sd, "toy model")
    msg = str(err.value)
    assert "toy model" in msg and "0.bias" in msg and "extra.weight" in msg
    assert err.value.missing == ["0.bias"] and err.value.unexpected == ["extra.weight"]


def test_shape_mismatch_is_reported():
    m = _module()
    sd = dict(m.state_dict())
    sd["2.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointKeyError, match=r"2.weight \(expected \(2, 3\), got \(5, 3\)\)"):
        load_strict(m, sd)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_and_empty_files(tmp_path, suffix):
    m = _module()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(m.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(m.state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(path.name)):
        load_state_dict_file(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict_file(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "absent.pth")


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"w": torch.zeros(1), "obj": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        load_state_dict_file(tmp_path / "evil.pth")
