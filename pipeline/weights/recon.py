"""Load CRM's reconstruction checkpoint (`CRM.pth` or `.safetensors`) into the model, strictly.

Unlike the official loader (`strict=False`, which silently ignores missing/unexpected keys and would
leave e.g. the learned plane at zero), any missing, unexpected or mis-shaped key is an error that
lists the keys. Attention parameters saved by very old diffusers (`query`/`key`/`value`/`proj_attn`)
are renamed to the current names (`to_q`/`to_k`/`to_v`/`to_out.0`) before checking.

Files are read tensor by tensor (`pipeline.weights.loading`): the loaded tensors become the model's
parameters, on the CPU as views of the file's memory mapping, so loading holds no second copy.

On the CPU the U-Net's convolutions run in NHWC (``channels_last``) layout by default
(`to_channels_last`): the same maths about 5 % faster with oneDNN on this project's CPU machine
(`benchmarks/bench_recon.py`), results differ by float rounding only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch

from crm_models.recon import ConvolutionalReconstructionModel, ReconConfig
from pipeline.weights.checkpoints import check_state_dict, load_state_dict_file
from pipeline.weights.loading import TensorSources, assign_state_dict, build_on_meta, materialize
from pipeline.weights.tensor_files import TensorFile, checkpoint_mappings, release_mapped_tensor

_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_RE = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)(\.(?:weight|bias))$")


def rename_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map pre-0.15 diffusers attention names to the current ones; other keys pass unchanged.

    Old attention projections were stored as Linear weights of the same shape, so only names change.
    """
    out = {}
    for key, value in state_dict.items():
        m = _OLD_ATTENTION_RE.search(key)
        if m:
            key = key[: m.start()] + m.group(1) + _OLD_ATTENTION_NAMES[m.group(2)] + m.group(3)
        out[key] = value
    return out


def load_recon_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a reconstruction checkpoint (`.pth` via weights-only torch.load, or `.safetensors`)."""
    return rename_legacy_keys(load_state_dict_file(path))


def load_recon_weights(
    model: ConvolutionalReconstructionModel,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    device: str | torch.device | None = None,
) -> ConvolutionalReconstructionModel:
    """Load weights from a file path or a state dict into `model` (strict; returns the model).

    The model may be built with `pipeline.weights.loading.parameters_on_meta` (no memory until
    loaded). Each tensor takes the dtype of the model's tensor and its device (`device`, default
    CPU, for tensors still on ``meta``). Tensors of an in-memory state dict are copied; a file's
    tensors on the CPU at the stored dtype are views of its memory mapping.

    Raises:
        pipeline.weights.checkpoints.CheckpointError: unreadable/truncated file.
        pipeline.weights.checkpoints.CheckpointKeyError: missing/unexpected/mis-shaped keys (all listed).
    """
    if isinstance(source, Mapping) and not isinstance(source, TensorFile):
        what = "CRM reconstruction model"
    else:
        source = source if isinstance(source, TensorFile) else TensorFile(source)
        what = f"CRM reconstruction model (from {os.fspath(source.path)})"
    sources = TensorSources()
    mapped = rename_legacy_keys(sources.mirror(source))
    own = model.state_dict()
    check_state_dict({k: v.shape for k, v in own.items()}, mapped, what)
    tensors = materialize({k: sources.ref(v) for k, v in mapped.items()}, own, device)
    assign_state_dict(model, tensors, what)
    return model


def to_channels_last(model: ConvolutionalReconstructionModel) -> ConvolutionalReconstructionModel:
    """Put the U-Net's convolution weights in NHWC (``channels_last``) layout and run it so; in place.

    Same maths; outputs differ from the NCHW run by float rounding only (2e-5 of the output scale at
    full size). The weights are converted one at a time and the pages of a weight that was a view of its
    checkpoint file's mapping are released as soon as its copy exists
    (`pipeline.weights.tensor_files.release_mapped_tensor`), so the conversion never holds the
    U-Net twice (peak: the model plus its largest weight).
    """
    mappings = checkpoint_mappings()  # the copies are ordinary memory: the file mappings stay as they are
    for module in model.unet2.unet.modules():
        for p in module.parameters(recurse=False):
            if p.ndim == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                old = p.data
                p.data = old.contiguous(memory_format=torch.channels_last)
                release_mapped_tensor(old, mappings)
                del old
    model.unet2.use_channels_last(True)  # every weight is NHWC already: flags the input layout only
    return model


def build_recon_model(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    cfg: ReconConfig | None = None,
    device: str | torch.device = "cpu",
    channels_last: bool | None = None,
) -> ConvolutionalReconstructionModel:
    """Build the model (official config by default), load `checkpoint` strictly if given, eval mode.

    With a checkpoint the model is built without initialising its parameters and the checkpoint's
    tensors are loaded straight onto `device`. `channels_last` runs the U-Net convolutions in NHWC
    layout (`to_channels_last`; same maths, float rounding differs); ``None``: on the CPU only.
    """
    cfg = cfg or ReconConfig()
    if checkpoint is None:
        model = ConvolutionalReconstructionModel(cfg)
    else:
        model = build_on_meta(ConvolutionalReconstructionModel, cfg)
        load_recon_weights(model, checkpoint, device=device)
    model = model.to(device).eval().requires_grad_(False)
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    if channels_last:
        to_channels_last(model)
    return model
