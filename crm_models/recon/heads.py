"""MLP heads on triplane features (SPEC §7), with the official parameter names.

* `PointMlp` (`fc1`, `fc2`, `fc3`): Linear(C, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, out).
  The SDF head has out = 4 (sdf, deformation xyz), the RGB head out = 3 (colour in about [-1, 1]).
* `WeightMlp` (`0`, `2`): Linear(8C, H) -> SiLU -> Linear(H, 21) on the 8 corner features of a cube.

Both evaluate large inputs in row chunks so that no (P, H) hidden activation for all P points is held.
"""

from __future__ import annotations

import torch
from torch import nn


class PointMlp(nn.Module):
    """Three-layer ReLU MLP (C -> H -> H -> out). Input (P, C), output (P, out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, out_dim)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.fc1(x))
        h = torch.relu_(self.fc2(h))
        return self.fc3(h)

    def forward(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """(P, C) -> (P, out); with `chunk`, rows are processed `chunk` at a time."""
        if chunk is None or x.shape[0] <= chunk:
            return self._forward(x)
        out = x.new_empty(x.shape[0], self.fc3.out_features)
        for start in range(0, x.shape[0], chunk):
            out[start : start + chunk] = self._forward(x[start : start + chunk])
        return out


class WeightMlp(nn.Sequential):
    """Linear(8C -> H) -> SiLU -> Linear(H -> 21); keys `0.*` and `2.*` as in the checkpoint."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int = 21):
        super().__init__(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def cube_weights(
        self,
        vertex_features: torch.Tensor,
        cubes: torch.Tensor,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Raw weights of the given cubes from their corner features.

        Args:
            vertex_features: (V, C) features of the grid vertices.
            cubes: (K, 8) int64 vertex indices of each cube, corner 0 first.
            chunk: cubes per chunk (the (K, 8C) gathered input is built one chunk at a time).

        Returns:
            (K, 21) raw (unscaled) weights.
        """
        k = cubes.shape[0]
        out = vertex_features.new_empty(k, self[2].out_features)
        step = k if chunk is None or chunk <= 0 else chunk
        for start in range(0, k, max(step, 1)):
            idx = cubes[start : start + step]
            x = vertex_features[idx.reshape(-1)].reshape(idx.shape[0], -1)
            out[start : start + step] = self(x)
        return out
