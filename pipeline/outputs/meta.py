"""``meta.json``: what produced an output folder (options, weights, timings, versions, input).

Schema (version 1), all keys always present unless marked optional::

    {
      "schema": "crm-mesh-meta/1",
      "id": str, "status": "ok",
      "created_utc": ISO-8601 str,
      "input": {"name": str, "sha256": str, "width": int, "height": int, "mode": str,
                "preprocessed_size": [int, int]},
      "seed": int,
      "options": PipelineOptions.to_dict(), "options_hash": str,
      "weights": ResolvedWeights.identity,            # kind "tiny-random" is flagged with a warning
      "random_weights": bool,
      "view_order": ["001", ..., "000"], "ccm_channels": "RGB=XYZ",
      "mesh": {"vertices": int, "faces": int, "texture_size": int | null, "vertex_colors": bool,
               "frame": str},
      "timings_s": {stage: seconds, ..., "total": seconds},
      "device": {"device": str, "dtype": str, "low_vram": bool, "cuda_name": str (optional)},
      "versions": {"crm-batch": str, "python": str, "torch": str, ...},
      "outputs": {kind: file name relative to the folder},
      "qc": quality report, schema "crm-qc/1" (pipeline.qc.checks; absent in folders written before
            the checks existed)
    }
"""

from __future__ import annotations

import datetime as _dt
import platform
from functools import lru_cache
from importlib import metadata
from typing import Any

from crm_models.views import VIEW_ORDER

SCHEMA = "crm-mesh-meta/1"
_PACKAGES = (
    "crm-batch",
    "torch",
    "numpy",
    "diffusers",
    "transformers",
    "safetensors",
    "pillow",
    "trimesh",
    "xatlas",
    "pymeshlab",
    "huggingface_hub",
)


@lru_cache(maxsize=8)
def versions(packages: tuple[str, ...] = _PACKAGES) -> dict[str, str]:
    """Versions of Python, the platform and `packages` (default: those that influence a mesh)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_meta(
    *,
    obj_id: str,
    seed: int,
    options: dict[str, Any],
    options_hash: str,
    weights_identity: dict[str, Any],
    timings: dict[str, float],
    outputs: dict[str, str],
    input_info: dict[str, Any] | None = None,
    mesh_info: dict[str, Any] | None = None,
    device_info: dict[str, Any] | None = None,
    qc: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the meta.json dict (see the module docstring for the schema); ``qc`` is left out when None."""
    timings = {k: round(float(v), 4) for k, v in timings.items()}
    timings.setdefault("total", round(sum(v for k, v in timings.items() if k != "total"), 4))
    return {
        "schema": SCHEMA,
        "id": obj_id,
        "status": "ok",
        "created_utc": utc_now(),
        "input": input_info or {},
        "seed": int(seed),
        "options": options,
        "options_hash": options_hash,
        "weights": weights_identity,
        "random_weights": weights_identity.get("kind") == "tiny-random",
        "view_order": [f"{i:03d}" for i in VIEW_ORDER],
        "ccm_channels": "RGB=XYZ",
        "mesh": mesh_info or {},
        "timings_s": timings,
        "device": device_info or {},
        "versions": versions(),
        "outputs": outputs,
        **({} if qc is None else {"qc": qc}),
    }
