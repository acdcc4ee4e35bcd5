"""What a batch worker runs: the CRM image-to-mesh pipeline behind a small picklable interface.

A backend is a plain picklable object shipped to Ray workers. It has

* ``preprocess(image) -> image`` (CPU fetch stage: background handling, recentre, square);
* ``load()`` -> a generator object with ``generate(images, ids, seeds, preprocessed=True, ...)
  -> list[GeneratedObject]`` (the GPU part, called once per batch of K objects on a resident actor);
* ``finalize(obj, destination) -> pipeline.results.ObjectResult`` (the CPU part: clean, unwrap, bake,
  quality checks, export), which publishes ``<id>/`` in the destination (``pipeline.outputs.destination``);
* ``weights_identity()`` and ``options_hash()``, recorded in every result row and used by resume.

:class:`CRMBackend` is the real pipeline; ``flows.ray_job.fake_backends`` has no-op and fault-injecting
backends for benchmarks and tests.
"""

from __future__ import annotations

from typing import Any

from flows.io.manifest import identity_json
from pipeline.finalize import finalize
from pipeline.image_to_mesh import ImageToMeshPipeline, preprocess
from pipeline.options import PipelineOptions
from pipeline.qc import QCConfig
from pipeline.weights import resolve_weights

__all__ = ["CRMBackend", "identity_json"]


class CRMBackend:
    """The real CRM pipeline (``pipeline.image_to_mesh``).

    Args:
        weights: weights spec as understood by ``pipeline.weights.resolve_weights``
            (``"auto"``, ``"tiny-random"``, a folder, ``"hf"``...).
        options: ``PipelineOptions`` fields (dict); unknown keys raise ``OptionsError``.
        allow_download: fetch weights missing from the Hugging Face cache into it (the default, like
            ``resolve_weights``; off under ``HF_HUB_OFFLINE=1``); also the default of the quality
            checks' ``clip_allow_download``.
        qc: ``pipeline.qc.QCConfig`` fields (dict) for the quality checks in finalize; unknown keys
            raise ``ValueError``. Not part of the options hash: checks do not change the outputs.
    """

    def __init__(
        self,
        weights: str = "auto",
        options: dict[str, Any] | None = None,
        allow_download: bool = True,
        qc: dict[str, Any] | None = None,
    ):

        self.weights = weights
        self.options = PipelineOptions.from_dict(dict(options or {})).to_dict()
        self.allow_download = allow_download
        self.qc = QCConfig.from_dict({"clip_allow_download": allow_download, **dict(qc or {})}).to_dict()
        self._identity: dict[str, Any] | None = None

    def pipeline_options(self):

        return PipelineOptions.from_dict(self.options)

    def weights_identity(self) -> dict[str, Any]:
        """Identity of the resolved weights (raises ``WeightsNotFoundError`` when missing)."""
        if self._identity is None:
            self._identity = dict(resolve_weights(self.weights, allow_download=self.allow_download).identity)
        return self._identity

    def options_hash(self) -> str:
        return self.pipeline_options().options_hash()

    def default_seed(self) -> int:
        return int(self.options.get("seed", 0))

    def preprocess(self, image: Any) -> Any:

        return preprocess(image, self.pipeline_options())

    def load(self):

        return ImageToMeshPipeline.load(weights=self.weights, options=self.pipeline_options())

    def finalize(self, obj: Any, destination: Any):

        return finalize(obj, destination, self.pipeline_options(), self.qc_config())

    def qc_config(self) -> QCConfig:
        return QCConfig.from_dict(self.qc)
