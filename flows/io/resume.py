"""Resume: which manifest rows an earlier run already completed, decided one record batch at a time.

A row is complete when ``<output>/objects/<id>/result.json`` (the marker the batch job writes last)
says ``ok`` for the same image URI, seed, options hash and weights identity as this run. Markers are
read for one batch of rows at a time (concurrent reads on object stores), so memory does not grow
with the manifest; a fresh output folder (no ``objects/``) costs no read at all.
"""

from __future__ import annotations

import json
from typing import Any

from flows.io import storage
from flows.io.manifest import ManifestRow

__all__ = ["MARKER_NAME", "OBJECTS_DIR", "ResumeCheck"]

MARKER_NAME = "result.json"
OBJECTS_DIR = "objects"


class ResumeCheck:
    """Splits batches of manifest rows into rows to run and results kept from earlier runs.

    Args:
        output_uri: the run folder (``objects/<id>/result.json`` inside).
        storage_options: fsspec options of the output storage.
        run_info: ``weights_identity`` (JSON text) and ``options_hash`` of this run.
        default_seed: the seed of rows without one.
    """

    def __init__(
        self,
        output_uri: str,
        storage_options: dict[str, Any] | None,
        run_info: dict[str, str],
        default_seed: int,
    ):
        self.objects_uri = storage.join_uri(output_uri, OBJECTS_DIR)
        self.storage_options = storage_options
        self.run_info = run_info
        self.default_seed = default_seed
        self.enabled = storage.exists(self.objects_uri, storage_options)

    def split(self, rows: list[ManifestRow]) -> tuple[list[ManifestRow], list[dict[str, Any]]]:
        """``(rows to run, kept results rows with resumed=true)`` for one batch of rows."""
        if not self.enabled:
            return list(rows), []
        markers = {
            storage.join_uri(self.objects_uri, r.id, MARKER_NAME): r for r in rows if r.problem is None
        }
        found = storage.read_many(list(markers), self.storage_options)
        previous: dict[str, dict[str, Any]] = {}
        for uri, data in found.items():
            try:
                prev = json.loads(data)
            except ValueError:
                continue
            if isinstance(prev, dict) and prev.get("id") == markers[uri].id:
                previous[prev["id"]] = prev
        todo: list[ManifestRow] = []
        kept: list[dict[str, Any]] = []
        for row in rows:
            prev = previous.get(row.id) if row.problem is None else None
            if prev is not None and self._same_work(prev, row):
                kept.append({**prev, "resumed": True})
            else:
                todo.append(row)
        return todo, kept

    def _same_work(self, prev: dict[str, Any], row: ManifestRow) -> bool:
        seed = row.seed if row.seed is not None else self.default_seed
        return (
            prev.get("status") == "ok"
            and prev.get("image_uri") == row.image_uri
            and prev.get("seed") == seed
            and prev.get("options_hash") == self.run_info["options_hash"]
            and prev.get("weights_identity") == self.run_info["weights_identity"]
        )
