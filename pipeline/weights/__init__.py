"""Weights: where the checkpoints come from and how they load into our models.

* ``resolve``: ``resolve_weights(spec)`` -> `ResolvedWeights` (local folder, HF cache, download,
  ``tiny-random``); ``.pth`` converted once to ``.safetensors``.
* ``hub``: the Hugging Face cache, a bounded reachability probe, downloads (also for evaluation models).
* ``checkpoints``: reading state dicts safely (safetensors, ``torch.load(weights_only=True)``).
* ``recon`` / ``multiview``: official state dicts -> our reconstruction / diffusion models.
* ``models``: the three networks of a pipeline built from resolved weights.
* ``tiny``: the seeded random tiny preset (tests, smoke runs).
* ``convert``: ``python -m pipeline.weights.convert CRM.pth`` (convert once, ahead of time).
"""

from pipeline.weights.errors import WeightsError, WeightsFileError, WeightsNotFoundError
from pipeline.weights.hub import hub_file
from pipeline.weights.resolve import (
    MODEL_FILES,
    TINY_SPEC,
    ResolvedWeights,
    WeightFile,
    resolve_weights,
)

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
