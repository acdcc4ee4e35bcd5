"""Weights: where the checkpoints come from and how they load into our models.

* ``resolve``: ``resolve_weights(spec)`` -> `ResolvedWeights` (local folder, HF cache, download,
  ``tiny-random``); ``.pth`` converted once to ``.safetensors`` (hashed while converting).
* ``hub``: the Hugging Face cache, a bounded reachability probe, downloads (also for evaluation models).
* ``tensor_files``: checkpoint files read tensor by tensor, memory-mapped (`TensorFile`), and a
  streaming ``.safetensors`` writer.
* ``checkpoints``: reading state dicts safely (safetensors, ``torch.load(weights_only=True)``), strict
  key checks, conversion.
* ``loading``: models built with parameters on ``meta`` and loaded without a second copy.
* ``recon`` / ``multiview``: official state dicts -> our reconstruction / diffusion models.
* ``models``: the three networks of a pipeline built from resolved weights (one CLIP for both stages).
* ``cpu_allocator``: heap settings that keep CPU inference out of page faults.
* ``tiny_configs`` / ``tiny``: the tiny preset's configs (plain data) / its seeded random models
  (tests, smoke runs).
* ``convert``: ``python -m pipeline.weights.convert CRM.pth`` (convert once, ahead of time).

The names below are imported on first use, so that importing a light submodule (``tensor_files``,
``loading``) does not import the networks' libraries.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.weights.errors import WeightsError, WeightsFileError, WeightsNotFoundError
    from pipeline.weights.hub import hub_file
    from pipeline.weights.resolve import (
        MODEL_FILES,
        TINY_SPEC,
        ResolvedWeights,
        WeightFile,
        resolve_weights,
    )

_EXPORTS = {
    "MODEL_FILES": "pipeline.weights.resolve",
    "TINY_SPEC": "pipeline.weights.resolve",
    "ResolvedWeights": "pipeline.weights.resolve",
    "WeightFile": "pipeline.weights.resolve",
    "resolve_weights": "pipeline.weights.resolve",
    "WeightsError": "pipeline.weights.errors",
    "WeightsFileError": "pipeline.weights.errors",
    "WeightsNotFoundError": "pipeline.weights.errors",
    "hub_file": "pipeline.weights.hub",
}

__all__ = [
    "MODEL_FILES",
    "TINY_SPEC",
    "ResolvedWeights",
    "WeightFile",
    "WeightsError",
    "WeightsFileError",
    "WeightsNotFoundError",
    "hub_file",
    "resolve_weights",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.weights' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
