"""CLIP conditioning encoders: fixture parity (text + image), layer choice, preprocessing, full
ViT-H-14 state-dict manifest mapped key by key, weight-source selection and error messages."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from reference_files import REFERENCE_DIR, first_fixture, fixture_params, paired_fixture, require

from crm_models.multiview.clip_encoders import (
    CLIPWeightsError,
    OpenCLIPConfig,
    OpenCLIPImageEncoder,
    OpenCLIPTextEncoder,
    clip_image_preprocess,
    convert_open_clip_state_dict,
    merge_open_clip_sources,
    open_clip_keys_from_transformers,
    strip_open_clip_prefix,
)
from crm_models.multiview.tokenizer import OpenCLIPTokenizer

CLIP_FIXTURES = fixture_params("multiview", "tiny_clip_case_*.npz")
ATOL = 1e-5  # README: CLIP features atol 1e-5
MANIFEST = REFERENCE_DIR / "multiview" / "full_state_dict_manifest_stage1.json"


def load_clip_fixture(path):
    """(config, official state dict with 'clip_model.model.' keys, npz)."""
    d = np.load(path)
    cfg = OpenCLIPConfig.from_fixture_config(json.loads(str(d["config_json"])))
    sd = {k[3:]: torch.from_numpy(d[k]) for k in d.files if k.startswith("sd/")}
    for k in d.files:
        m = re.match(r"^sd_sparse/(.+)/rows$", k)
        if m:
            name = m.group(1)
            dense = torch.zeros(*d[f"sd_sparse/{name}/shape"].tolist())
            dense[torch.from_numpy(d[k])] = torch.from_numpy(d[f"sd_sparse/{name}/values"])
            sd[name] = dense
    return cfg, sd, d


def build_encoders(cfg, sd):
    text_sd, vision_sd, unused = convert_open_clip_state_dict(sd, cfg)
    te, ie = OpenCLIPTextEncoder(cfg), OpenCLIPImageEncoder(cfg)
    te.load_converted_state_dict(text_sd)
    ie.load_converted_state_dict(vision_sd)
    return te, ie, unused


def maxdiff(a, b) -> float:
    return float((a - torch.as_tensor(b)).abs().max())


@pytest.mark.parametrize("path", CLIP_FIXTURES)
def test_text_penultimate_parity(path):
    cfg, sd, d = load_clip_fixture(path)
    assert cfg.text_layer == "penultimate" and cfg.hidden_act == "gelu"
    te, _, _ = build_encoders(cfg, sd)
    ids = OpenCLIPTokenizer()([str(p) for p in d["text/prompts"]])
    with torch.no_grad():
        out = te(ids)
    assert out.shape == (2, 77, cfg.text_width)
    assert maxdiff(out[:1], d["text/penultimate_c"]) <= ATOL
    assert maxdiff(out[1:], d["text/penultimate_uc"]) <= ATOL
    # the wrong layer choice would give the diagnostic array: we must be far from it
    assert maxdiff(out[:1], d["text/last_layer_c_DIAGNOSTIC"]) > 1e-2
    # and the recorded token ids give the same features as our tokenizer's
    with torch.no_grad():
        out2 = te(torch.from_numpy(d["text/token_ids"]))
    assert torch.equal(out, out2)


@pytest.mark.parametrize("path", CLIP_FIXTURES)
def test_last_layer_choice_reproduces_diagnostics(path):
    """With layer 'last' the towers give the DIAGNOSTIC arrays: proves the last blocks convert too."""
    cfg, sd, d = load_clip_fixture(path)
    cfg_last = OpenCLIPConfig(**{**cfg.__dict__, "text_layer": "last", "image_layer": "last"})
    te, ie, unused = build_encoders(cfg_last, sd)
    assert not any("resblocks" in k for k in unused)
    with torch.no_grad():
        t = te(torch.from_numpy(d["text/token_ids"][:1]))
        v = ie(torch.from_numpy(d["image/preprocessed_224"]))
    assert maxdiff(t, d["text/last_layer_c_DIAGNOSTIC"]) <= ATOL
    assert maxdiff(v, d["image/last_hidden_DIAGNOSTIC"]) <= ATOL


@pytest.mark.parametrize("path", CLIP_FIXTURES)
def test_image_preprocess_parity(path):
    d = np.load(path)
    ref = d["image/preprocessed_224"]
    rgb = d["image/input_rgb_uint8"]
    from_array = clip_image_preprocess(rgb)
    from_pil = clip_image_preprocess([Image.fromarray(rgb)])
    assert from_array.shape == (1, 3, 224, 224) and from_array.dtype == torch.float32
    assert maxdiff(from_array, ref) <= 1e-6
    assert torch.equal(from_array, from_pil)


@pytest.mark.parametrize("path", CLIP_FIXTURES)
def test_image_local_tokens_parity(path):
    cfg, sd, d = load_clip_fixture(path)
    _, ie, _ = build_encoders(cfg, sd)
    pixels = clip_image_preprocess(d["image/input_rgb_uint8"])
    with torch.no_grad():
        out = ie(pixels)
    assert (
        out.shape
        == (1, cfg.num_image_tokens, cfg.vision_width)
        == d["image/local_tokens_hidden_minus2"].shape
    )
    assert maxdiff(out, d["image/local_tokens_hidden_minus2"]) <= ATOL
    assert maxdiff(out, d["image/last_hidden_DIAGNOSTIC"]) > 1e-2


def test_preprocess_non_square_and_batches():
    rng = np.random.default_rng(0)
    tall = rng.integers(0, 256, (300, 100, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (2, 90, 180, 3), dtype=np.uint8)
    out = clip_image_preprocess(tall)
    # shortest side 100 -> 224, long side int(224*300/100) = 672; centre crop rows 224..448
    expect = Image.fromarray(tall).resize((224, 672), Image.Resampling.BICUBIC).crop((0, 224, 224, 448))
    expect = (
        np.asarray(expect, dtype=np.float32) / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])
    ) / np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expect, atol=1e-5)
    assert clip_image_preprocess(wide).shape == (2, 3, 224, 224)
    # opaque RGBA PIL input: alpha dropped after the crop, like open_clip's _convert_to_rgb
    rgba = Image.fromarray(np.dstack([tall, np.full((300, 100), 255, np.uint8)]), "RGBA")
    assert torch.equal(clip_image_preprocess(rgba), out)
    with pytest.raises(ValueError, match="uint8"):
        clip_image_preprocess(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="no images"):
        clip_image_preprocess([])


def _manifest_clip():
    m = json.loads(require(MANIFEST).read_text())
    entries = [e for e in m["keys"] if e["key"].startswith("clip_model.")]
    return m, entries


def test_full_manifest_maps_key_by_key():
    """Every clip_model.* key of the official stage-1 model maps to a ViT-H-14 module built from the
    default config (on the meta device), with identical shapes; nothing is left over."""
    m, entries = _manifest_clip()
    assert len(entries) == 686
    cfg = OpenCLIPConfig()
    sd = {e["key"]: torch.empty(e["shape"], device="meta") for e in entries}
    text_sd, vision_sd, unused = convert_open_clip_state_dict(sd, cfg)
    with torch.device("meta"):
        te, ie = OpenCLIPTextEncoder(cfg), OpenCLIPImageEncoder(cfg)
    for module, conv in ((te.model, text_sd), (ie.model, vision_sd)):
        own = {re.sub(r"^(text_model|vision_model)\.", "", k): v for k, v in module.state_dict().items()}
        assert set(own) == set(conv)
        for k, v in conv.items():
            assert tuple(v.shape) == tuple(own[k].shape), k
    te.load_converted_state_dict({k: torch.empty_like(v) for k, v in text_sd.items()}, assign=True)
    ie.load_converted_state_dict({k: torch.empty_like(v) for k, v in vision_sd.items()}, assign=True)

    expected_unused = {
        "clip_model.model.text_projection",
        "clip_model.model.logit_scale",
        "clip_model.model.visual.proj",
    }
    expected_unused |= {
        e["key"] for e in entries if ".transformer.resblocks.23." in e["key"] and "visual" not in e["key"]
    }
    expected_unused |= {e["key"] for e in entries if "visual.transformer.resblocks.31." in e["key"]}
    assert set(unused) == expected_unused

    # inverse listing: module keys -> official keys covers the manifest minus the unused keys
    inverse = open_clip_keys_from_transformers(te.model.state_dict().keys(), ie.model.state_dict().keys())
    official = {strip_open_clip_prefix(e["key"]) for e in entries}
    assert set(inverse) == official - {strip_open_clip_prefix(k) for k in unused}
    assert all(len(v) == 3 for k, v in inverse.items() if k.endswith("in_proj_weight"))

    # parameter counts agree with the manifest's totals
    numel = {e["key"]: e["numel"] for e in entries}
    counts = m["parameter_counts"]
    text_used = sum(p.numel() for p in te.model.parameters())
    text_unused = sum(numel[k] for k in unused if "visual" not in k)
    vis_used = sum(p.numel() for p in ie.model.parameters())
    vis_unused = sum(numel[k] for k in unused if "visual" in k)
    assert text_used + text_unused == counts["clip_model.model (text side: everything except visual)"]
    assert vis_used + vis_unused == counts["clip_model.model.visual"]
    # ViT-H-14 output sizes
    assert cfg.num_image_tokens == 257 and cfg.vision_width == 1280 and cfg.text_width == 1024


def test_prefix_variants_and_unknown_keys():
    cfg, sd, _ = load_clip_fixture(first_fixture("multiview", "tiny_clip_case_*.npz"))
    plain = {k[len("clip_model.model.") :]: v for k, v in sd.items()}
    a = convert_open_clip_state_dict(sd, cfg)
    b = convert_open_clip_state_dict(plain, cfg)
    assert set(a[0]) == set(b[0]) and set(a[1]) == set(b[1])
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    bad = dict(plain, **{"visual.attnpool.weight": torch.zeros(1)})
    with pytest.raises(CLIPWeightsError, match="visual.attnpool.weight"):
        convert_open_clip_state_dict(bad, cfg)
    _, _, unused = convert_open_clip_state_dict(bad, cfg, strict=False)
    assert "visual.attnpool.weight" in unused
    # a block beyond the configured depth is unknown, not silently dropped
    with pytest.raises(CLIPWeightsError, match="resblocks.7"):
        convert_open_clip_state_dict(
            dict(plain, **{"transformer.resblocks.7.ln_1.weight": torch.zeros(64)}), cfg
        )


def test_load_errors_are_clear():
    cfg, sd, _ = load_clip_fixture(first_fixture("multiview", "tiny_clip_case_*.npz"))
    text_sd, vision_sd, _ = convert_open_clip_state_dict(sd, cfg)
    te = OpenCLIPTextEncoder(cfg)
    missing = dict(text_sd)
    missing.pop("final_layer_norm.weight")
    with pytest.raises(CLIPWeightsError, match="missing: final_layer_norm.weight"):
        te.load_converted_state_dict(missing)
    wrong = dict(text_sd, **{"final_layer_norm.weight": torch.zeros(3)})
    with pytest.raises(CLIPWeightsError, match="shape mismatch"):
        te.load_converted_state_dict(wrong)
    with pytest.raises(ValueError, match=r"\(B, 77\)"):
        te(torch.zeros(1, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        te(torch.zeros(1, 77))
    with pytest.raises(ValueError, match="224"):
        OpenCLIPImageEncoder(cfg)(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="text_layer"):
        OpenCLIPConfig(text_layer="middle")
    with pytest.raises(ValueError, match="ViT"):
        OpenCLIPConfig.from_fixture_config({"vision_cfg": {"layers": [3, 4, 6, 3]}, "text_cfg": {}})
    assert (
        OpenCLIPConfig.from_fixture_config(
            {"embed_dim": 8, "quick_gelu": True, "vision_cfg": {"layers": 2}, "text_cfg": {"layers": 2}}
        ).hidden_act
        == "quick_gelu"
    )


def test_merge_sources_per_tower():
    cfg, sd, d = load_clip_fixture(first_fixture("multiview", "tiny_clip_case_*.npz"))
    plain = {k[len("clip_model.model.") :]: v for k, v in sd.items()}
    # a CRM checkpoint that carries only the text tower; the vision tower must come from open_clip
    ckpt = {k: v for k, v in sd.items() if ".visual." not in k}
    ckpt["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other checkpoint keys are ignored
    other = {k: v + 1.0 if v.is_floating_point() else v for k, v in plain.items()}
    text_sd, vision_sd, sources = merge_open_clip_sources(ckpt, other, cfg)
    assert sources == {"text": "checkpoint", "vision": "open_clip"}
    assert torch.equal(text_sd["final_layer_norm.weight"], sd["clip_model.model.ln_final.weight"])
    assert torch.equal(vision_sd["pre_layrnorm.weight"], other["visual.ln_pre.weight"])
    te, ie = OpenCLIPTextEncoder(cfg), OpenCLIPImageEncoder(cfg)
    te.load_converted_state_dict(text_sd)
    ie.load_converted_state_dict(vision_sd)
    # checkpoint without CLIP keys -> everything from open_clip
    _, _, sources = merge_open_clip_sources({"vae_model.x": torch.zeros(1)}, plain, cfg)
    assert sources == {"text": "open_clip", "vision": "open_clip"}
    with pytest.raises(CLIPWeightsError, match="no CLIP weights"):
        merge_open_clip_sources({"vae_model.x": torch.zeros(1)}, None, cfg)
    with pytest.raises(CLIPWeightsError, match="vision tower"):
        merge_open_clip_sources(ckpt, None, cfg)


def _has_text_context(path) -> bool:
    return {"cond/context_c", "cond/prompt"} <= set(np.load(path).files)


STAGE_FIXTURES = fixture_params("multiview", "tiny_stage*_case_*.npz", keep=_has_text_context)


@pytest.mark.parametrize("stage_path", STAGE_FIXTURES)
def test_stage_fixture_text_context_from_shared_tiny_clip(stage_path):
    """Each stage fixture's text context was made by the tiny CLIP of the same case: prompt ->
    tokenizer -> text encoder reproduces `cond/context_c` / `cond/context_uc` end to end."""
    cfg, sd, _ = load_clip_fixture(paired_fixture(stage_path, "multiview", "tiny_clip"))
    te, _, _ = build_encoders(cfg, sd)
    s = np.load(stage_path)
    ids = OpenCLIPTokenizer()([str(s["cond/prompt"]), str(s["cond/negative_prompt"])])
    with torch.no_grad():
        out = te(ids)
    assert maxdiff(out[:1], s["cond/context_c"]) <= ATOL
    assert maxdiff(out[1:], s["cond/context_uc"]) <= ATOL
