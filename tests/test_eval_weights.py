"""Evaluation models resolve their weights like the CRM weights: given paths, standard caches, the
Hugging Face cache (repos named in evaluation.lpips_vgg / clip_similarity), then a download."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluation.clip_similarity import load_clip
from evaluation.lpips_vgg import HUB_LIN, HUB_VGG, VGG16Features, find_lpips_weights, load_lpips_vgg

SNAPSHOT = "ab" * 20


def _put_in_hub_cache(hub: Path, repo: str, name: str, write) -> Path:
    """Place one file in the huggingface_hub cache layout (blob + snapshot link + refs/main)."""
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(SNAPSHOT)
    (root / "blobs").mkdir(exist_ok=True)
    blob = root / "blobs" / f"blob-{name}"
    write(blob)
    snap = root / "snapshots" / SNAPSHOT
    snap.mkdir(parents=True, exist_ok=True)
    (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap / name


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_lpips_weights_come_from_the_hub_cache(empty_caches):
    """The timm VGG16 safetensors (features.* + timm's classifier keys) and the LPIPS head .pth, found in
    the HF cache under their hub names, load into the model."""
    torch.manual_seed(0)
    feats = {k: v.clone() for k, v in VGG16Features().state_dict().items()}
    timm_file = dict(
        feats, **{"pre_logits.fc1.weight": torch.zeros(2, 2), "head.fc.weight": torch.zeros(2, 2)}
    )
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    vgg_path = _put_in_hub_cache(empty_caches, *HUB_VGG, lambda p: save_file(timm_file, str(p)))
    lin_path = _put_in_hub_cache(empty_caches, *HUB_LIN, lambda p: torch.save(lin, p))
    vgg, head = find_lpips_weights()
    assert (vgg, head) == (vgg_path, lin_path)
    model = load_lpips_vgg(allow_download=False)
    assert torch.equal(model.net.features[28].weight, feats["features.28.weight"])
    assert torch.equal(model.lin4.model[1].weight, lin["lin4.model.1.weight"])


def test_missing_lpips_weights_name_the_hub_files(empty_caches):
    with pytest.raises(FileNotFoundError) as ei:
        load_lpips_vgg(allow_download=False)
    msg = str(ei.value)
    assert f"hf download {HUB_VGG[0]} {HUB_VGG[1]}" in msg and f"hf download {HUB_LIN[0]} {HUB_LIN[1]}" in msg


def test_missing_clip_names_the_hub_repo_and_why(empty_caches):
    with pytest.raises(FileNotFoundError) as ei:
        load_clip("openai/clip-vit-large-patch14")
    msg = str(ei.value)
    assert "HF_HUB_OFFLINE is set" in msg
    assert "hf download openai/clip-vit-large-patch14 config.json model.safetensors" in msg
