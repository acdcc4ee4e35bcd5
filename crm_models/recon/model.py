"""CRM's reconstruction model: strips -> noised input -> U-Net -> triplane -> MLPs -> FlexiCubes mesh.

Submodule names follow the official checkpoint (`unet2`, `weightMlp`, `sdfMlp`, `rgbMlp`), so
`model.load_state_dict(official_state_dict, strict=True)` works. Non-parameter state (the DDIM
scheduler, the FlexiCubes grid) is rebuilt on demand and is not part of the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from crm_models.flexicubes import construct_grid, flexicubes_extract

from .color_field import TriplaneColorField, check_points
from .config import INPUT_CHANNELS, ReconConfig
from .heads import PointMlp, WeightMlp
from .input_assembly import assemble_input
from .noise import InputNoiser
from .triplane import sample_lattice, sample_points, split_planes
from .unet import TriplaneUNet


@dataclass
class ReconMesh:
    """Decoded mesh in the canonical CCM frame (Z up, front camera on +Y, object in [-1, 1]^3).

    Attributes:
        vertices: (V, 3) float32.
        faces: (F, 3) int64, RAW FlexiCubes winding: normals point inward (reverse for export).
        vertex_colors: (V, 3) float32 raw RGB-head colours (about [-1, 1]) or None.
        intermediates: with `return_intermediates=True`, a dict of every decoding step named as in
            the reference fixtures (`grid_verts`, `grid_point_features`, `sdf_mlp_out`, `sdf`,
            `v_deformed`, `weight_mlp_out`, `weights21`, `fc_surf_cubes`, `fc_case_ids`, `fc_L_dev`, ...).
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    vertex_colors: torch.Tensor | None = None
    intermediates: dict | None = None


class ConvolutionalReconstructionModel(nn.Module):
    """The CRM reconstruction network (SPEC §3-§8).

    Attributes:
        cfg: `ReconConfig`.
        unet2: `TriplaneUNet` (`learned_plane` + diffusers `UNet2DModel` as `unet`).
        weightMlp: `WeightMlp` (8C -> H -> 21), FlexiCubes weights per cube.
        sdfMlp: `PointMlp` (C -> H -> H -> 4): sdf + deformation per grid vertex.
        rgbMlp: `PointMlp` (C -> H -> H -> 3): raw colour at any point.
    """

    def __init__(self, cfg: ReconConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else ReconConfig()
        c, h = cfg.c_dim, cfg.decoder.mlp_hidden
        # Registration order = the checkpoint's key order.
        self.unet2 = TriplaneUNet(cfg)
        self.weightMlp = WeightMlp(8 * c, h, 21)
        self.sdfMlp = PointMlp(c, h, 4)
        self.rgbMlp = PointMlp(c, h, 3)
        self._noiser: InputNoiser | None = None
        self._grid_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.unet2.learned_plane.device

    @property
    def noiser(self) -> InputNoiser:
        """The t=20 noiser (DDIM scheduler built on first use)."""
        if self._noiser is None:
            self._noiser = InputNoiser(self.cfg.noise)
        return self._noiser

    def grid(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """FlexiCubes grid on `device`: verts (V, 3) float32, cubes (N^3, 8) int64, axis values (N+1,)."""
        device = torch.device(device) if device is not None else self.device
        key = str(device)
        if key not in self._grid_cache:
            n = self.cfg.decoder.grid_res
            verts, cubes = construct_grid(n, scale=self.cfg.decoder.grid_scale, device=device)
            axis = verts[:: (n + 1) ** 2, 0].clone()  # the grid is the x-slowest lattice axis^3
            self._grid_cache = {key: (verts, cubes, axis)}
        return self._grid_cache[key]

    def _apply(self, fn, *args, **kwargs):  # drop device-bound caches on .to()/.cuda()/...
        self._grid_cache = {}
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_grid_cache"] = {}
        state["_noiser"] = None
        return state

    # ------------------------------------------------------------------ encoding
    def assemble_input(self, rgb_strip, ccm_strip) -> torch.Tensor:
        """(R, 6R, 3) uint8 strips (views 001..005, 000) -> (1, 12, R, 3R) float32 in [0, 1]."""
        return assemble_input(rgb_strip, ccm_strip, self.cfg.plane_resolution, device=self.device)

    def add_noise(
        self, x: torch.Tensor, noise=None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """x_t = sqrt(a_20) x + sqrt(1 - a_20) noise; `noise` (1, 12, R, 3R) is eps*0.5+0.5 as recorded."""
        if noise is not None and isinstance(noise, np.ndarray):
            noise = torch.from_numpy(np.ascontiguousarray(noise))
        return self.noiser(x, noise=noise, generator=generator)

    def run_unet(self, x_noised: torch.Tensor) -> torch.Tensor:
        """(B, 12, R, 3R) noised input -> (B, C, R, 3R) rolled-out triplane (time = cfg.noise.timestep)."""
        if x_noised.ndim != 4 or x_noised.shape[1] != INPUT_CHANNELS:
            raise ValueError(f"U-Net input must be (B, 12, R, 3R), got {tuple(x_noised.shape)}")
        t = self.noiser.timesteps(x_noised.shape[0], device=x_noised.device)
        return self.unet2(x_noised, t)

    @torch.inference_mode()
    def encode(
        self, rgb_strip, ccm_strip, noise=None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Strips -> triplane (1, C, R, 3R) float32.

        Args:
            rgb_strip, ccm_strip: (R, 6R, 3) uint8 (numpy or tensor), views 001, 002, 003, 004, 005, 000.
            noise: optional (1, 12, R, 3R) noise already mapped to eps*0.5+0.5; otherwise drawn from
                `generator` (or the global RNG).
        """
        x = self.assemble_input(rgb_strip, ccm_strip)
        return self.run_unet(self.add_noise(x, noise=noise, generator=generator))

    # ------------------------------------------------------------------ decoding
    def _planes(self, triplane: torch.Tensor) -> torch.Tensor:
        if not isinstance(triplane, torch.Tensor):
            raise TypeError(f"triplane must be a torch tensor, got {type(triplane).__name__}")
        planes = split_planes(triplane)
        r = self.cfg.plane_resolution
        if planes.shape[1] != self.cfg.c_dim or planes.shape[2] != r:
            raise ValueError(
                f"triplane has shape {tuple(triplane.shape)}, expected (1, {self.cfg.c_dim}, {r}, {3 * r})"
            )
        if not bool(torch.isfinite(planes).all()):
            raise ValueError("triplane contains NaN or infinite values")
        return planes.to(device=self.device, dtype=torch.float32)

    def sdf_and_deformation(self, features: torch.Tensor, verts: torch.Tensor):
        """Per-vertex SdfMlp output (V, 4), sdf (V,) with the sphere prior, deformed vertices (V, 3)."""
        d = self.cfg.decoder
        out = self.sdfMlp(features, chunk=d.mlp_chunk)
        sdf_raw = out[:, 0]
        sdf = sdf_raw + d.sphere_radius - torch.norm(verts, dim=-1) if d.sphere_prior else sdf_raw.clone()
        v_def = verts + torch.tanh(out[:, 1:]) / d.grid_res * d.input_scale / 0.95 * 0.5
        return out, sdf, v_def

    @staticmethod
    def surface_cubes(sdf: torch.Tensor, cubes: torch.Tensor) -> torch.Tensor:
        """(C,) bool: cubes whose corners have mixed signs (some s < 0, some not), as FlexiCubes defines."""
        neg = (sdf < 0)[cubes]
        return neg.any(dim=1) & ~neg.all(dim=1)

    @torch.inference_mode()
    def decode(
        self, triplane: torch.Tensor, return_intermediates: bool = False, vertex_colors: bool = True
    ) -> ReconMesh:
        """Triplane (1, C, R, 3R) -> `ReconMesh` (raw winding, canonical frame).

        The weight MLP is evaluated only for surface cubes (FlexiCubes reads no other rows); with
        `return_intermediates=True` it runs on every cube so that `weight_mlp_out` is complete.
        """
        d = self.cfg.decoder
        planes = self._planes(triplane)
        verts, cubes, axis = self.grid()
        feats = sample_lattice(planes, axis).reshape(-1, planes.shape[1])
        sdf_out, sdf, v_def = self.sdf_and_deformation(feats, verts)

        surf = self.surface_cubes(sdf, cubes)
        if return_intermediates:
            w_raw = self.weightMlp.cube_weights(feats, cubes, chunk=d.mlp_chunk)
            weights = w_raw * d.weight_multiplier
        else:
            idx = surf.nonzero().squeeze(1)
            weights = feats.new_zeros(cubes.shape[0], 21)
            if idx.numel():
                weights[idx] = self.weightMlp.cube_weights(feats, cubes[idx], chunk=d.mlp_chunk) * (
                    d.weight_multiplier
                )

        fc = flexicubes_extract(
            v_def, sdf, cubes, d.grid_res, weights, weight_scale=d.weight_scale, training=False
        )
        if not torch.equal(fc.surf_cubes, surf):
            raise RuntimeError("surface-cube masks of the decoder and FlexiCubes disagree")
        colors = None
        if vertex_colors:
            colors = self._query(planes, fc.vertices)
        inter = None
        if return_intermediates:
            inter = {
                "grid_verts": verts,
                "cube_indices": cubes,
                "grid_point_features": feats,
                "sdf_mlp_out": sdf_out,
                "sdf_raw": sdf_out[:, 0],
                "sdf": sdf,
                "deformation_raw": sdf_out[:, 1:],
                "v_deformed": v_def,
                "weight_mlp_out": w_raw,
                "weights21": weights,
                "fc_surf_cubes": fc.surf_cubes,
                "fc_case_ids": fc.case_ids,
                "fc_L_dev": fc.l_dev,
                "mesh_verts": fc.vertices,
                "mesh_faces": fc.faces,
            }
            if colors is not None:
                inter["mesh_vertex_rgb_raw"] = colors
        return ReconMesh(vertices=fc.vertices, faces=fc.faces, vertex_colors=colors, intermediates=inter)

    @torch.inference_mode()
    def reconstruct(self, rgb_strip, ccm_strip, noise=None, generator=None, vertex_colors: bool = True):
        """encode + decode: strips -> (`ReconMesh`, triplane (1, C, R, 3R))."""
        tri = self.encode(rgb_strip, ccm_strip, noise=noise, generator=generator)
        return self.decode(tri, vertex_colors=vertex_colors), tri

    # ------------------------------------------------------------------ colour queries
    def _query(self, planes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        feats = sample_points(planes, points)
        return self.rgbMlp(feats, chunk=self.cfg.decoder.mlp_chunk)

    @torch.inference_mode()
    def query_features(self, triplane: torch.Tensor, points) -> torch.Tensor:
        """Summed triplane features (N, C) at points (N, 3)."""
        pts = check_points(points).to(self.device)
        return sample_points(self._planes(triplane), pts)

    @torch.inference_mode()
    def query_sdf(self, triplane: torch.Tensor, points) -> torch.Tensor:
        """Raw SdfMlp output (N, 4) at points (N, 3) (no sphere prior)."""
        feats = self.query_features(triplane, points)
        return self.sdfMlp(feats, chunk=self.cfg.decoder.mlp_chunk)

    @torch.inference_mode()
    def query_color(self, triplane: torch.Tensor, points) -> torch.Tensor:
        """Raw RGB (N, 3), about [-1, 1], at points (N, 3) in the canonical frame."""
        pts = check_points(points).to(self.device)
        return self._query(self._planes(triplane), pts)

    def color_field(self, triplane: torch.Tensor) -> TriplaneColorField:
        """A picklable, device-movable colour field holding the triplane (C, R, 3R) and the RGB head."""
        self._planes(triplane)  # validates shape and finiteness; the field drops the batch dim itself
        return TriplaneColorField(triplane, self.rgbMlp, chunk=self.cfg.decoder.mlp_chunk)
