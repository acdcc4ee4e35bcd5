"""Errors of weight resolution and loading."""

from __future__ import annotations

from pipeline.weights.checkpoints import CheckpointError


class WeightsError(RuntimeError):
    """The requested weights could not be resolved."""


class WeightsFileError(WeightsError, CheckpointError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not weights-only)."""


class WeightsNotFoundError(WeightsError):
    """Required checkpoint files are missing; the message says which files and where to put them."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing
