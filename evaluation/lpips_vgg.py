"""LPIPS (Zhang et al. 2018) with the VGG16 backbone, written in plain torch (no torchvision).

* :class:`VGG16Features` is the VGG16 convolution stack with torchvision's state-dict key names
  (``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,bias}``), so torchvision's
  ``vgg16-397923af.pth`` loads into it (classifier keys are ignored).
* :class:`LPIPSVGG` adds the LPIPS v0.1 head: input scaling, unit-normalised features at
  relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, squared differences weighted by the five 1x1 "lin" layers
  (keys ``lin{k}.model.1.weight`` as in the lpips package's ``weights/v0.1/vgg.pth``), spatial means,
  summed over the layers.

Weights are looked up (:func:`find_lpips_weights`) in user-given paths, then in standard caches:
``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``) for the backbone and an
installed ``lpips`` package's ``weights/v0.1/vgg.pth`` (found without importing it) for the head,
then in the Hugging Face cache, then downloaded into it like the CRM weights
(``pipeline.weights.hub_file``; not with ``allow_download=False`` or ``HF_HUB_OFFLINE=1``):

* backbone: ``timm/vgg16.tv_in1k`` file ``model.safetensors`` (torchvision's ImageNet VGG16 weights,
  BSD-3-Clause; the same ``features.*`` tensors as ``vgg16-397923af.pth``);
* head: ``chaofengc/IQA-PyTorch-Weights`` file ``LPIPS_v0.1_vgg-a78928a0.pth`` (the lpips package's
  ``weights/v0.1/vgg.pth``, BSD-2-Clause, sha256 ``a78928a0...``; read with ``weights_only=True``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn

__all__ = [
    "VGG16Features",
    "LPIPSVGG",
    "find_lpips_weights",
    "load_lpips_vgg",
    "LPIPS_WEIGHTS_HELP",
]

# (out channels) per conv; "M" = 2x2 max-pool. Index in ``features`` follows torchvision's layout.
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_TAPS = (3, 8, 15, 22, 29)  # ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_CHANNELS = (64, 128, 256, 512, 512)
VGG_FILE = "vgg16-397923af.pth"
# Hugging Face copies of the two files: (repo, file).
HUB_VGG = ("timm/vgg16.tv_in1k", "model.safetensors")
HUB_LIN = ("chaofengc/IQA-PyTorch-Weights", "LPIPS_v0.1_vgg-a78928a0.pth")

LPIPS_WEIGHTS_HELP = (
    "LPIPS needs two files: torchvision's VGG16 ImageNet weights (`hf download "
    f"{HUB_VGG[0]} {HUB_VGG[1]}`, or https://download.pytorch.org/models/vgg16-397923af.pth in "
    "$TORCH_HOME/hub/checkpoints, or "
    f"--lpips-vgg PATH) and the LPIPS v0.1 linear layers (`hf download {HUB_LIN[0]} {HUB_LIN[1]}`, "
    "or the lpips package's weights/v0.1/vgg.pth, or --lpips-lin PATH)."
)


class VGG16Features(nn.Module):
    """VGG16 ``features`` stack. Input ``(B, 3, H, W)``; :meth:`forward` returns the five LPIPS taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                outs.append(x)
            if i == _TAPS[-1]:
                break
        return outs


class _Lin(nn.Module):
    """1x1 conv without bias; ``model.1`` matches the lpips key layout (``model.0`` is a dropout)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(p=0.0), nn.Conv2d(cin, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPSVGG(nn.Module):
    """LPIPS distance, VGG16 backbone, v0.1 head. Inputs ``(B, 3, H, W)`` in [0, 1]; output ``(B,)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = VGG16Features()
        for k, c in enumerate(_CHANNELS):
            self.add_module(f"lin{k}", _Lin(c))
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def lins(self) -> list[_Lin]:
        return [getattr(self, f"lin{k}") for k in range(len(_CHANNELS))]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = ((x * 2 - 1) - self.shift) / self.scale
        y = ((y * 2 - 1) - self.shift) / self.scale
        fx = self.net(torch.cat([x, y]))
        total = 0.0
        b = x.shape[0]
        for lin, f in zip(self.lins(), fx):
            f0, f1 = f[:b], f[b:]
            f0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            f1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((f0 - f1) ** 2).mean(dim=(1, 2, 3))
        return total

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Load a torchvision VGG16 state dict (``features.*`` keys; ``classifier.*`` ignored)."""
        feats = {k: v for k, v in state.items() if k.startswith("features.")}
        missing, unexpected = self.net.load_state_dict(feats, strict=False)
        if missing or unexpected:
            raise KeyError(f"VGG16 weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")

    def load_linear(self, state: dict[str, torch.Tensor]) -> None:
        """Load LPIPS v0.1 ``vgg.pth`` (``lin{k}.model.1.weight``; ``lin{k}.model.weight`` accepted too)."""
        fixed = {}
        for k, v in state.items():
            parts = k.split(".")
            if len(parts) == 3 and parts[0].startswith("lin") and parts[1] == "model":
                k = f"{parts[0]}.model.1.{parts[2]}"
            fixed[k] = v
        want = {f"lin{k}.model.1.weight" for k in range(len(_CHANNELS))}
        if set(fixed) != want:
            raise KeyError(f"LPIPS linear weights: expected keys {sorted(want)}, got {sorted(fixed)[:8]}")
        for k in range(len(_CHANNELS)):
            self.lins()[k].model[1].weight.data.copy_(fixed[f"lin{k}.model.1.weight"])


def _torch_hub_dir() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(home) / "hub" / "checkpoints"


def find_lpips_weights(
    vgg_path: str | None = None, lin_path: str | None = None, *, allow_download: bool = False
) -> tuple[Path | None, Path | None]:
    """Resolve the backbone and head weight files (None where not found).

    Search order: the given paths; ``$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`` and an installed
    ``lpips`` package's ``weights/v0.1/vgg.pth`` (located with ``importlib.util.find_spec``, no import);
    the Hugging Face cache (:data:`HUB_VGG`, :data:`HUB_LIN`); with `allow_download`, a download into it.
    """
    from pipeline.weights.errors import WeightsError
    from pipeline.weights.hub import hub_file

    vgg = Path(vgg_path) if vgg_path else _torch_hub_dir() / VGG_FILE
    lin: Path | None = Path(lin_path) if lin_path else None
    if lin is None:
        spec = importlib.util.find_spec("lpips")
        if spec is not None and spec.submodule_search_locations:
            cand = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
            lin = cand
    found = [vgg if vgg.is_file() else None, lin if lin is not None and lin.is_file() else None]
    for i, (given, (repo, name)) in enumerate(((vgg_path, HUB_VGG), (lin_path, HUB_LIN))):
        if found[i] is None and not given:
            try:
                found[i] = hub_file(repo, name, allow_download=allow_download, what="LPIPS")
            except WeightsError:
                pass
    return found[0], found[1]


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def load_lpips_vgg(
    vgg_path: str | None = None, lin_path: str | None = None, *, allow_download: bool = True
) -> LPIPSVGG:
    """Build :class:`LPIPSVGG` with weights from files (see :func:`find_lpips_weights`; downloads into
    the Hugging Face cache unless `allow_download` is False or ``HF_HUB_OFFLINE=1``).

    Raises:
        FileNotFoundError: a weight file is missing; the message says how to get it.
    """
    vgg, lin = find_lpips_weights(vgg_path, lin_path, allow_download=allow_download)
    if vgg is None or lin is None:
        which = " and ".join(
            n for n, p in (("VGG16 backbone", vgg), ("LPIPS linear layers", lin)) if p is None
        )
        raise FileNotFoundError(f"LPIPS weights not found ({which}). {LPIPS_WEIGHTS_HELP}")
    model = LPIPSVGG()
    model.load_backbone(_read_state(vgg))
    model.load_linear(_read_state(lin))
    return model.eval()


def lpips_distance(model: LPIPSVGG, pred, gt, batch: int = 4) -> torch.Tensor:
    """LPIPS per image pair. ``pred``, ``gt``: ``(B, H, W, 3)`` in [0, 1] -> ``(B,)`` float32."""
    p = torch.as_tensor(pred, dtype=torch.float32).permute(0, 3, 1, 2)
    g = torch.as_tensor(gt, dtype=torch.float32).permute(0, 3, 1, 2)
    out = []
    with torch.no_grad():
        for s in range(0, len(p), batch):
            out.append(model(p[s : s + batch], g[s : s + batch]))
    return torch.cat(out)
