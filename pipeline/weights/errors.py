"""Errors of weight resolution and loading."""

from __future__ import annotations

from collections.abc import Iterable


class CheckpointError(RuntimeError):
    """A checkpoint file could not be read or does not fit the model."""


class CheckpointKeyError(CheckpointError):
    """Missing or unexpected keys (or shape mismatches) when loading a state dict strictly."""

    def __init__(
        self,
        what: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
    ):
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        parts = [f"state dict does not match {what}:"]
        for label, keys in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("shape mismatches", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... (+{len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"  {len(keys)} {label}: {shown}")
        super().__init__("\n".join(parts))


class WeightsError(RuntimeError):
    """The requested weights could not be resolved."""


class WeightsFileError(WeightsError, CheckpointError):
    """A checkpoint file exists but cannot be read (truncated, corrupt, not weights-only)."""


class WeightsNotFoundError(WeightsError):
    """Required checkpoint files are missing; the message says which files and where to put them."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing
