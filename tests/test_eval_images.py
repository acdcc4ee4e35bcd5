"""Image metrics of the GSO evaluation: PSNR/SSIM on the real chicken views, LPIPS and CLIP code paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from skimage import metrics as skm

from evaluation.clip_similarity import clip_embed, clip_preprocess, clip_similarity, load_clip
from evaluation.image_metrics import composite_white, load_views, psnr, ssim
from evaluation.lpips_vgg import LPIPSVGG, VGG16Features, find_lpips_weights, load_lpips_vgg, lpips_distance


def test_chicken_psnr_ssim_match_reference(gso_dir):
    """SyncDreamer's generated chicken views vs GT renders (values in the data README)."""
    root = gso_dir
    gt = load_views(root / "objects" / "chicken" / "renders")
    pred = load_views(root / "example_predictions" / "syncdreamer_chicken_views")
    assert gt.shape == (16, 256, 256, 3)
    assert abs(float(psnr(pred, gt).mean()) - 25.4133) < 1e-3
    assert abs(float(ssim(pred, gt).mean()) - 0.8855) < 1e-3


def test_ssim_matches_skimage_on_random_images():
    rng = np.random.default_rng(0)
    a = rng.random((2, 40, 48, 3))
    b = np.clip(a + 0.1 * rng.normal(size=a.shape), 0, 1)
    ours = ssim(b, a).numpy()
    ref = [
        skm.structural_similarity(
            b[i],
            a[i],
            channel_axis=-1,
            data_range=1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        for i in range(2)
    ]
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    assert float(ssim(a, a).mean()) == pytest.approx(1.0)


def test_psnr_and_compositing():
    a = np.zeros((1, 8, 8, 3))
    b = np.full((1, 8, 8, 3), 0.1)
    assert float(psnr(a, b)[0]) == pytest.approx(20.0)
    rgba = np.array([[0.2, 0.4, 0.6, 0.5]])
    np.testing.assert_allclose(composite_white(rgba), [[0.6, 0.7, 0.8]])


# ------------------------------------------------------------------------------------------------ LPIPS
def _reference_lpips(vgg_sd: dict, lin_sd: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS written independently from the state dicts (functional convs)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    pools_after = {2, 7, 14, 21}
    taps_after = {2, 7, 14, 21, 28}

    def feats(z):
        out = []
        for c in convs:
            z = F.relu(F.conv2d(z, vgg_sd[f"features.{c}.weight"], vgg_sd[f"features.{c}.bias"], padding=1))
            if c in taps_after:
                out.append(z)
            if c in pools_after:
                z = F.max_pool2d(z, 2)
        return out

    fx, fy = feats((x * 2 - 1 - shift) / scale), feats((y * 2 - 1 - shift) / scale)
    total = 0
    for k, (a, b) in enumerate(zip(fx, fy)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        total = total + F.conv2d((a - b) ** 2, lin_sd[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total


def test_lpips_with_seeded_random_weights(tmp_path):
    torch.manual_seed(0)
    vgg = VGG16Features()
    vgg_sd = {k: v.clone() for k, v in vgg.state_dict().items()}
    full = dict(vgg_sd)
    full["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier too
    lin_sd = {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(full, tmp_path / "vgg16-397923af.pth")
    torch.save(lin_sd, tmp_path / "vgg.pth")
    model = load_lpips_vgg(str(tmp_path / "vgg16-397923af.pth"), str(tmp_path / "vgg.pth"))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 48, 48, 3, generator=g)
    y = torch.rand(2, 48, 48, 3, generator=g)
    d = lpips_distance(model, x, y)
    ref = _reference_lpips(vgg_sd, lin_sd, x.permute(0, 3, 1, 2), y.permute(0, 3, 1, 2))
    torch.testing.assert_close(d, ref, rtol=1e-4, atol=1e-6)
    assert (d > 0).all()
    assert float(lpips_distance(model, x, x).abs().max()) < 1e-6


def test_lpips_missing_weights_explain_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    vgg, _ = find_lpips_weights()
    assert vgg is None
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        load_lpips_vgg(lin_path=str(tmp_path / "nope.pth"))


def test_lpips_rejects_wrong_linear_keys():
    with pytest.raises(KeyError, match="lin0.model.1.weight"):
        LPIPSVGG().load_linear({"foo": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------- CLIP
def tiny_clip_dir(tmp_path):
    """A random-weight tiny CLIPModel saved to a folder (also used by test_eval_cli); (path, model)."""
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=99,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=2,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(cfg).eval()
    path = tmp_path / "tiny-clip"
    model.save_pretrained(path)
    return path, model


def test_clip_similarity_with_tiny_random_model(tmp_path):
    path, ref_model = tiny_clip_dir(tmp_path)
    model = load_clip(str(path))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 40, 40, 3, generator=g)
    y = torch.rand(3, 40, 40, 3, generator=g)
    sim = clip_similarity(model, x, y)
    assert sim.shape == (3,)
    torch.testing.assert_close(clip_similarity(model, x, x), torch.full((3,), 100.0), rtol=0, atol=1e-3)
    # reference: the model's own forward pass (image_embeds are the normalised projections)
    px = clip_preprocess(x, 32)
    py = clip_preprocess(y, 32)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        ex = ref_model(input_ids=ids, pixel_values=px).image_embeds
        ey = ref_model(input_ids=ids, pixel_values=py).image_embeds
    torch.testing.assert_close(sim, 100 * (ex * ey).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(clip_embed(model, x), ex / ex.norm(dim=-1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_clip_preprocess_normalises_and_crops():
    img = torch.full((1, 30, 60, 3), 0.5)
    out = clip_preprocess(img, 16)
    assert out.shape == (1, 3, 16, 16)
    expected = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    torch.testing.assert_close(out[0, :, 8, 8], expected, rtol=1e-5, atol=1e-5)


def test_clip_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local directory"):
        load_clip(str(tmp_path / "does-not-exist"))
