"""User-facing options of the image-to-mesh pipeline (one documented dataclass).

Defaults follow the official CRM demo (`run.py`): 50 DDIM steps per diffusion stage, guidance
scale 5.0 (the Gradio app used 5.5), 1024² texture, grey-127 background, foreground ratio 1.0,
FlexiCubes grid 80 (the model's own size when ``grid_size`` is None). ``sampler="dpmpp"`` or
``"unipc"`` with 10-20 ``steps`` are the few-step alternatives (docs/sampling.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch

from pipeline.inputs.preprocess import BACKGROUND_MODES
from pipeline.mesh.frames import EXPORT_FRAMES

DTYPES = ("auto", "fp32", "fp16", "bf16")

# Fields that only change how the work is scheduled, never the result (excluded from the hash).
EXECUTION_ONLY_FIELDS = ("device", "low_vram", "batch_size", "progress")

# Fields added after results were first recorded: they enter the hash only when set away from their
# default, so the options of every earlier run keep their hash (resume still recognises their objects).
HASHED_WHEN_NOT_DEFAULT = ("sampler",)

#: Diffusion samplers (the names of ``crm_models.multiview.solvers.SAMPLERS``, repeated here so that
#: reading options does not import the networks): official DDIM, DPM-Solver++(2M), UniPC.
SAMPLERS = ("ddim", "dpmpp", "unipc")
#: Most steps a few-step solver takes: the points of the official timestep grid (981, 961, ..., 1).
SOLVER_MAX_STEPS = 50


class OptionsError(ValueError):
    """An option has an invalid value (the message names the option and the allowed values)."""


@dataclass
class PipelineOptions:
    """Everything a user can choose for one image-to-mesh run.

    Attributes:
        seed: base random seed. The same image, seed, options and weights give the same mesh
            (bit-identical on the same machine/device). Each object gets its own generators, so
            batching does not change results.
        steps_stage1: sampler steps (network calls) of the six-view RGB diffusion (stage 1).
            Official: 50 DDIM steps. The solvers take at most 50.
        steps_stage2: sampler steps of the CCM diffusion (stage 2). Official: 50.
        sampler: diffusion sampler of both stages: ``"ddim"`` (official, default), ``"dpmpp"``
            (DPM-Solver++(2M)) or ``"unipc"`` (UniPC); the solvers run on points of the official
            timestep grid and are meant for 10-20 steps (see docs/sampling.md).
        steps: init-only shorthand: when given, sets ``steps_stage1`` and ``steps_stage2`` both
            (``PipelineOptions(sampler="dpmpp", steps=10)``; also accepted by `from_dict`). It is not
            stored: `to_dict` and meta.json show the two stage fields.
        guidance_scale: classifier-free guidance scale of both stages. Official `run.py`: 5.0.
        guidance_scale_stage2: stage-2 scale if different from ``guidance_scale`` (None = same).
        texture_size: side of the baked square texture in pixels. Official: 1024.
        vertex_colors: also/only colour the mesh per vertex: when True the exported meshes carry
            vertex colours (RgbMlp at the vertices) instead of a baked texture; no UV unwrap.
        frame: export frame. ``"gltf"``: Y up, the input's front facing +Z (what glTF viewers
            expect); ``"reference"``: exactly the official CRM output frame (front facing -Z).
        background: ``"alpha"`` uses the input's alpha channel as the mask (an opaque image is
            kept whole); ``"rembg"`` always removes the background with rembg (optional extra,
            needs its model file); ``"auto"`` is the official behaviour (alpha when the image
            has transparency, rembg otherwise); ``"none"`` uses the image as is (no masking).
        foreground_ratio: scale applied to the whole image before it is squared, as the
            reference does (0 < r <= 1; 1.0 = unchanged, the official setting). It does not
            crop to the object first (see ``pipeline.inputs.preprocess.PreprocessConfig.recenter``).
        dtype: ``"auto"`` (fp32 on CPU, fp16 on CUDA), ``"fp32"``, ``"fp16"`` or ``"bf16"``.
            Half precision is only allowed on CUDA. Mesh extraction always runs in fp32.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        low_vram: keep the models on the CPU and move each stage to the device only while it runs.
        grid_size: FlexiCubes grid resolution (None = the weights' own, 80 for the official model).
        batch_size: images per diffusion call (K objects sampled together; frames of different
            objects never attend to each other).
        clean: run mesh cleaning (merge close vertices, drop degenerate faces and floaters).
        max_faces: decimate the cleaned mesh to at most this many faces before UV unwrapping
            (None = the unwrapper's default budget, 50,000 faces; 0 = never decimate). Unwrapping
            cost grows quickly with the face count (xatlas: ~25 s for 87k faces on 2 CPU cores).
        preview_size: side in pixels of each of the 8 turntable views of ``preview.png`` (a 4 x 2 sheet).
        write_obj: also write ``mesh.obj`` + ``mesh.mtl`` + texture PNG beside the GLB.
        write_preview: render ``preview.png``.
        progress: show progress bars (CLI).
    """

    seed: int = 0
    steps_stage1: int = 50
    steps_stage2: int = 50
    sampler: str = "ddim"
    steps: InitVar[int | None] = None
    guidance_scale: float = 5.0
    guidance_scale_stage2: float | None = None
    texture_size: int = 1024
    vertex_colors: bool = False
    frame: str = "gltf"
    background: str = "alpha"
    foreground_ratio: float = 1.0
    dtype: str = "auto"
    device: str = "auto"
    low_vram: bool = False
    grid_size: int | None = None
    batch_size: int = 1
    clean: bool = True
    max_faces: int | None = None
    preview_size: int = 256
    write_obj: bool = True
    write_preview: bool = True
    progress: bool = field(default=False)

    def __post_init__(self, steps: int | None = None) -> None:
        if steps is not None:
            if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 1000:
                raise OptionsError(f"invalid option steps={steps!r}: expected an integer in [1, 1000]")
            self.steps_stage1 = self.steps_stage2 = steps
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `OptionsError` naming the first invalid option."""

        def bad(name: str, allowed: str) -> OptionsError:
            return OptionsError(f"invalid option {name}={getattr(self, name)!r}: expected {allowed}")

        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise bad("seed", "an integer in [0, 2**63)")
        for name in ("steps_stage1", "steps_stage2"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1000:
                raise bad(name, "an integer in [1, 1000]")
        if self.sampler not in SAMPLERS:
            raise bad("sampler", ", ".join(repr(s) for s in SAMPLERS))
        if self.sampler != "ddim":
            for name in ("steps_stage1", "steps_stage2"):
                if getattr(self, name) > SOLVER_MAX_STEPS:
                    raise bad(
                        name,
                        f"at most {SOLVER_MAX_STEPS} with sampler={self.sampler!r} (the points of the "
                        "official timestep grid)",
                    )
        if not (isinstance(self.guidance_scale, (int, float)) and 0.0 <= self.guidance_scale <= 100.0):
            raise bad("guidance_scale", "a number in [0, 100] (1.0 disables guidance)")
        if self.guidance_scale_stage2 is not None and not (
            isinstance(self.guidance_scale_stage2, (int, float))
            and 0.0 <= self.guidance_scale_stage2 <= 100.0
        ):
            raise bad("guidance_scale_stage2", "None or a number in [0, 100]")
        if not isinstance(self.texture_size, int) or not 16 <= self.texture_size <= 8192:
            raise bad("texture_size", "an integer in [16, 8192]")
        if self.frame not in EXPORT_FRAMES:
            raise bad("frame", " or ".join(repr(f) for f in EXPORT_FRAMES))
        if self.background not in BACKGROUND_MODES:
            raise bad("background", ", ".join(repr(b) for b in BACKGROUND_MODES))
        if not (isinstance(self.foreground_ratio, (int, float)) and 0.0 < self.foreground_ratio <= 1.0):
            raise bad("foreground_ratio", "a number in (0, 1]")
        if self.dtype not in DTYPES:
            raise bad("dtype", ", ".join(repr(d) for d in DTYPES))
        dev = str(self.device)
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.grid_size is not None and (
            not isinstance(self.grid_size, int) or not 4 <= self.grid_size <= 512
        ):
            raise bad("grid_size", "None or an integer in [4, 512]")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", "a positive integer")
        if self.max_faces is not None and (
            not isinstance(self.max_faces, int) or not (self.max_faces == 0 or self.max_faces >= 4)
        ):
            raise bad("max_faces", "None, 0 (no decimation) or an integer >= 4")
        if not isinstance(self.preview_size, int) or not 16 <= self.preview_size <= 4096:
            raise bad("preview_size", "an integer in [16, 4096]")

    # ------------------------------------------------------------------ derived values
    @property
    def stage2_guidance(self) -> float:
        """Guidance scale used by stage 2."""
        return float(
            self.guidance_scale if self.guidance_scale_stage2 is None else self.guidance_scale_stage2
        )

    def resolved_device(self) -> str:
        """The torch device string to run on (``auto`` -> ``cuda`` when available, else ``cpu``)."""

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionsError(f"device={self.device!r} requested but CUDA is not available on this machine")
        return self.device

    def finalize_device(self) -> str:
        """Device of the CPU part's rasterizer and colour queries (UV bake, previews).

        The requested CUDA device (or ``auto``'s) when this process sees one, else the CPU: ``finalize``
        often runs in a process without a GPU (a Ray CPU task beside the GPU actors), where a
        ``device="cuda"`` meant for the networks must not fail the object.
        """

        if self.device == "auto" or self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                return "cpu"
            return "cuda" if self.device == "auto" else self.device
        return self.device

    def resolved_dtype(self):
        """The torch dtype of the diffusion/reconstruction networks (fp32 on CPU; fp16/bf16 on CUDA)."""

        device = self.resolved_device()
        name = self.dtype
        if name == "auto":
            name = "fp16" if device.startswith("cuda") else "fp32"
        if name != "fp32" and not device.startswith("cuda"):
            raise OptionsError(
                f"dtype={self.dtype!r} is only supported on CUDA; on {device} use dtype='fp32' (or 'auto')"
            )
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineOptions:
        """Inverse of `to_dict`; unknown keys raise `OptionsError` naming them (``steps`` is accepted)."""
        names = {f.name for f in dataclasses.fields(cls)} | {"steps"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise OptionsError(f"unknown pipeline option(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> PipelineOptions:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def options_hash(self) -> str:
        """16-hex-digit hash of every field that can change the result.

        Execution-only fields (`EXECUTION_ONLY_FIELDS`: device, low_vram, batch_size, progress)
        are excluded, so the hash identifies *what* is computed, not how it is scheduled. Fields in
        `HASHED_WHEN_NOT_DEFAULT` count only away from their default (earlier runs keep their hash).
        """
        d = {k: v for k, v in self.to_dict().items() if k not in EXECUTION_ONLY_FIELDS}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in HASHED_WHEN_NOT_DEFAULT:
            if d[name] == defaults[name]:
                del d[name]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
