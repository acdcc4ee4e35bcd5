"""Helpers shared by the multi-view tests: fixture discovery and model construction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_files import REFERENCE_DIR, fixtures, missing, paired_fixture

from crm_models.multiview import MultiViewDiffusionModel, MultiViewUNetConfig


def stage_fixture_files() -> list[Path]:
    """Every multi-view `*.npz` holding a stage model (config with a UNet), stage 1 or 2."""
    out = []
    for path in fixtures("multiview"):
        with np.load(path) as d:
            if "config_json" not in d.files:
                continue
            cfg = json.loads(str(d["config_json"]))
        if "unet_config" in cfg.get("model", {}).get("params", {}):
            out.append(path)
    return out


def stage_params():
    """One param per stage fixture; a stand-in that skips (fails in CI) when there is none."""
    files = stage_fixture_files()
    if not files:
        where = str(REFERENCE_DIR / "multiview" / "tiny_stage*_case_*.npz")
        return [pytest.param(None, id="missing", marks=pytest.mark.reference_missing(where))]
    return [pytest.param(p, id=p.stem) for p in files]


def first_stage_fixture() -> Path:
    """The first stage fixture (skips, or fails in CI, when there is none)."""
    files = stage_fixture_files()
    if not files:
        missing(REFERENCE_DIR / "multiview" / "tiny_stage*_case_*.npz")
    return files[0]


def clip_fixture_for(stage_path: Path) -> Path:
    """The CLIP fixture of the same case as `stage_path` (its text context was made by that CLIP)."""
    return paired_fixture(stage_path, "multiview", "tiny_clip")


class Fixture:
    """Lazy view of one stage fixture."""

    def __init__(self, path: Path):
        self.path = path
        self.data = np.load(path)
        self.config = json.loads(str(self.data["config_json"]))
        self.stage = MultiViewUNetConfig.from_fixture_config(self.config).stage

    def t(self, key: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data[key]))

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        return {k[3:]: self.t(k) for k in self.data.files if k.startswith("sd/")}

    def build(self, **kw) -> MultiViewDiffusionModel:
        from pipeline.weights.multiview import load_multiview_weights

        model = MultiViewDiffusionModel.from_fixture_config(self.config, **kw).eval()
        load_multiview_weights(model, self.official_state_dict())
        return model

    def recorded_draws(self):
        from crm_models.multiview import RecordedDraws

        enc = "vae_enc/pixel_control/" if self.stage == 1 else "vae_enc/pixel_images/"
        return RecordedDraws(
            posterior_noise=self.t(enc + "noise"),
            offset_posterior_noise=self.t("vae_enc/offset_noise_ref/noise"),
            x_T=self.t("offset_noise/q_noise"),
        )

    def sampler_input(self) -> torch.Tensor:
        if self.stage == 1:
            return self.t("vae_enc/pixel_control/input")
        return self.t("cond/pixel_images_uint8")[None]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: much faster than two on a shared 2-core machine, and deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_built: dict = {}


def fixture_and_model(path) -> tuple[Fixture, object]:
    """The fixture at `path` and its model built from the fixture's own config (built once per session)."""
    if path not in _built:
        fx = Fixture(path)
        _built[path] = (fx, fx.build())
    return _built[path]
