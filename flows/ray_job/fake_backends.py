"""No-op and fault-injecting backends (same interface as ``flows.ray_job.backends.CRMBackend``).

Used by ``benchmarks/bench_batch.py`` (orchestration overhead with a model of known cost) and by
the tests (a worker that dies mid-batch, a pipeline that fails on chosen ids). They are importable
by Ray workers because they live in the installed package.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.outputs.destination import as_destination
from pipeline.results import ObjectResult

__all__ = ["FakeObject", "NoOpBackend", "WrappingBackend", "CrashOnceBackend", "FailIdsBackend"]


@dataclass
class FakeObject:
    """What the fake GPU stage returns for one object (picklable, small).

    ``generated_at`` (``time.time()`` when its generate call returned) lets tests order work by when
    and where it ran rather than by when it was finalized.
    """

    id: str
    seed: int
    size: tuple[int, int]
    checksum: str
    generated_at: float = 0.0


class _NoOpGenerator:
    def __init__(self, sleep_s: float):
        self.sleep_s = sleep_s

    def generate(
        self, images: list, ids: list[str], seeds: list[int] | None = None, **kwargs: Any
    ) -> list[FakeObject]:
        if len(images) != len(ids):
            raise ValueError(f"{len(images)} images for {len(ids)} ids")
        seeds = seeds if seeds is not None else [0] * len(ids)
        if self.sleep_s:
            time.sleep(self.sleep_s * len(ids))
        out = []
        now = time.time()
        for img, i, s in zip(images, ids, seeds):
            digest = hashlib.sha256(img.tobytes()).hexdigest()[:16]
            out.append(FakeObject(id=i, seed=int(s), size=tuple(img.size), checksum=digest, generated_at=now))
        return out


class NoOpBackend:
    """A pipeline that does no model work: ``sleep_s`` per object on the generator, ``finalize_sleep_s``
    per object on the CPU stage, then writes a tiny ``meta.json`` (+ ``preview.png`` 8x8)."""

    def __init__(
        self, sleep_s: float = 0.0, finalize_sleep_s: float = 0.0, seed: int = 0, write_files: bool = True
    ):
        self.sleep_s = sleep_s
        self.finalize_sleep_s = finalize_sleep_s
        self.seed = seed
        self.write_files = write_files

    def weights_identity(self) -> dict[str, Any]:
        return {"kind": "noop", "id": "noop"}

    def options_hash(self) -> str:
        return hashlib.sha256(f"noop:{self.seed}".encode()).hexdigest()[:16]

    def default_seed(self) -> int:
        return self.seed

    def load(self) -> _NoOpGenerator:
        return _NoOpGenerator(self.sleep_s)

    def preprocess(self, image: Any) -> Any:
        return image

    def finalize(self, obj: FakeObject, destination: Any) -> ObjectResult:
        t0 = time.perf_counter()
        if self.finalize_sleep_s:
            time.sleep(self.finalize_sleep_s)
        dest = as_destination(destination)
        outputs: dict[str, str] = {}
        with dest.staging(obj.id) as folder:
            if self.write_files:
                meta = {
                    "id": obj.id, "seed": obj.seed, "size": list(obj.size), "checksum": obj.checksum,
                    "generated_at": obj.generated_at,
                }  # fmt: skip
                (folder / "meta.json").write_text(json.dumps(meta, sort_keys=True))
                Image.new("RGB", (8, 8), (127, 127, 127)).save(folder / "preview.png")
                outputs = {"meta": "meta.json", "preview": "preview.png"}
        return ObjectResult(
            obj.id,
            "ok",
            outputs=outputs,
            location=dest.location(obj.id),
            timings={"finalize": time.perf_counter() - t0},
        )


class _CrashingGenerator:
    def __init__(self, inner: Any, crash_ids: set[str], marker_dir: str | None):
        self.inner = inner
        self.crash_ids = crash_ids
        self.marker_dir = marker_dir

    def generate(self, images: list, ids: list[str], seeds: list[int] | None = None, **kwargs: Any) -> list:
        for i in ids:
            if i not in self.crash_ids:
                continue
            if self.marker_dir is None:  # crash on every attempt
                os._exit(1)
            marker = os.path.join(self.marker_dir, f"crashed-{i}")
            if not os.path.exists(marker):
                Path(marker).touch()
                os._exit(1)  # the worker process dies mid-batch, like an OOM kill or a lost GPU
        return self.inner.generate(images, ids, seeds, **kwargs)


class WrappingBackend:
    """Delegates everything but ``load`` to the wrapped backend ``inner``."""

    inner: Any

    def weights_identity(self) -> dict[str, Any]:
        return self.inner.weights_identity()

    def options_hash(self) -> str:
        return self.inner.options_hash()

    def default_seed(self) -> int:
        return self.inner.default_seed()

    def preprocess(self, image: Any) -> Any:
        return self.inner.preprocess(image)

    def finalize(self, obj: Any, destination: Any) -> Any:
        return self.inner.finalize(obj, destination)


class CrashOnceBackend(WrappingBackend):
    """Wraps a backend; the worker process exits the first time it generates one of ``crash_ids``.

    ``marker_dir`` (shared by all workers of a local cluster) records which crashes happened, so each
    id crashes exactly once and its retry succeeds. ``always=True`` crashes on every attempt.
    """

    def __init__(self, inner: Any, crash_ids: list[str], marker_dir: str, always: bool = False):
        self.inner = inner
        self.crash_ids = set(crash_ids)
        self.marker_dir = marker_dir
        self.always = always

    def load(self) -> _CrashingGenerator:
        return _CrashingGenerator(self.inner.load(), self.crash_ids, None if self.always else self.marker_dir)


class _FailingGenerator:
    def __init__(self, inner: Any, fail_ids: set[str]):
        self.inner = inner
        self.fail_ids = fail_ids

    def generate(self, images: list, ids: list[str], seeds: list[int] | None = None, **kwargs: Any) -> list:
        bad = [i for i in ids if i in self.fail_ids]
        if bad:
            raise RuntimeError(f"injected generation failure for {bad}")
        return self.inner.generate(images, ids, seeds, **kwargs)


class FailIdsBackend(WrappingBackend):
    """Wraps a backend; ``generate`` raises for any batch that contains one of ``fail_ids``."""

    def __init__(self, inner: Any, fail_ids: list[str]):
        self.inner = inner
        self.fail_ids = set(fail_ids)

    def load(self) -> _FailingGenerator:
        return _FailingGenerator(self.inner.load(), self.fail_ids)
