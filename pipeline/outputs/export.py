"""Mesh export: binary glTF (GLB) and OBJ + MTL + PNG, in an explicit coordinate frame.

Frames (details and a picture in ``docs/export_frames.md``); meshes come in the canonical ``"ccm"`` frame
(+Z up, the input view's camera on +Y) with outward winding:

* ``"gltf"`` (default): rotation ``(x, y, z) -> (-x, z, y)``: +Y up, the object's front (CCM +Y) faces +Z,
  which is where glTF viewers put their default camera.
* ``"reference"``: the official CRM convention, ``(x, y, z) -> (x, z, -y)`` rounded to 6 decimals: +Y up, the
  front faces -Z.

Both rotations are proper (det +1), so the outward winding is kept. With ``normalize=True`` (default) the
rotated vertices are centred on their bounding-box centre and scaled so the longest side spans ``[-bound,
bound]`` (``bound = 0.9``, the official GLB normalisation). ``v_out = (R @ v_ccm - center) * scale``; ``R``,
``center``, ``scale`` and the frame are written to the GLB's ``asset.extras["crm_export"]`` (and as a comment
in the OBJ).
"""

from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import trimesh
from PIL import Image

from pipeline.mesh.frames import AXES, EXPORT_FRAMES, FROM_CCM, check_frame
from pipeline.mesh.types import TexturedMesh, VertexColorMesh
from pipeline.outputs.atomic import atomic_write_bytes


@dataclass
class ExportConfig:
    """Options for :func:`export_glb` / :func:`export_obj`.

    Attributes:
        frame: ``"gltf"`` (+Y up, front +Z) or ``"reference"`` (official CRM: +Y up, front -Z).
        normalize: centre on the bounding box and scale the longest side to ``[-bound, bound]``.
        bound: half-extent of the longest side after normalisation.
        round_decimals: decimals the reference frame rounds to before normalising (the official OBJ writes
            ``%f``); ``None`` disables. Not used for the glTF frame.
        double_sided: glTF material ``doubleSided`` (the official GLB is double-sided).
        metallic: glTF ``metallicFactor``. roughness: glTF ``roughnessFactor``.
        material_name: material name in the GLB/MTL.
    """

    frame: Literal["gltf", "reference"] = "gltf"
    normalize: bool = True
    bound: float = 0.9
    round_decimals: int | None = 6
    double_sided: bool = True
    metallic: float = 0.0
    roughness: float = 1.0
    material_name: str = "material_0"


def to_export_frame(vertices, frame: str = "gltf", cfg: ExportConfig | None = None):
    """Rotate (and normalise) canonical-frame vertices into an export frame.

    Args:
        vertices: (V, 3) positions in the CCM frame.
        frame: ``"gltf"`` or ``"reference"``.
        cfg: normalisation options (``cfg.frame`` is ignored in favour of ``frame``).

    Returns:
        ``(vertices_out (V, 3) float32, info dict)`` where ``info`` holds ``frame``, ``up``, ``front``,
        ``rotation`` (3x3, row-major), ``center`` (3,), ``scale``, ``bound``, ``round_decimals`` and
        ``source_frame`` such that ``v_out = (round(R @ v) - center) * scale``.
    """
    cfg = cfg or ExportConfig()
    check_frame(frame, EXPORT_FRAMES)
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"vertices must be a non-empty (V, 3) array, got {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError("vertices are not finite")
    rot = FROM_CCM[frame]
    out = (v.astype(np.float32) @ rot.T.astype(np.float32)).astype(np.float64)
    decimals = cfg.round_decimals if frame == "reference" else None
    if decimals is not None:
        out = np.round(out, decimals)
    center = np.zeros(3)
    scale = 1.0
    if cfg.normalize:
        vmin, vmax = out.min(axis=0), out.max(axis=0)
        extent = float((vmax - vmin).max())
        if not extent > 0:
            raise ValueError("cannot normalise a mesh whose vertices all coincide (zero extent)")
        center = (vmin + vmax) / 2.0
        scale = 2.0 * cfg.bound / extent
        out = (out - center) * scale
    info = {
        "frame": frame,
        "source_frame": "ccm",
        **AXES[frame],
        "rotation": rot.tolist(),
        "center": [float(c) for c in center],
        "scale": float(scale),
        "normalized": bool(cfg.normalize),
        "bound": float(cfg.bound) if cfg.normalize else None,
        "round_decimals": decimals,
        "formula": "v_out = (round(R @ v_ccm) - center) * scale",
    }
    return out.astype(np.float32), info


def _prepare(mesh, cfg: ExportConfig):
    if not isinstance(mesh, TexturedMesh | VertexColorMesh):
        raise TypeError(f"expected TexturedMesh or VertexColorMesh, got {type(mesh).__name__}")
    if mesh.frame == "ccm":
        return to_export_frame(mesh.vertices, cfg.frame, cfg)
    if mesh.frame == cfg.frame:
        info = {"frame": cfg.frame, "source_frame": cfg.frame, **AXES[cfg.frame], "normalized": None}
        return mesh.vertices.astype(np.float32), info
    raise ValueError(f"mesh is in frame {mesh.frame!r}; export to {cfg.frame!r} needs a 'ccm' mesh")


def _png_bytes(texture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(texture, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def glb_bytes(mesh: TexturedMesh | VertexColorMesh, cfg: ExportConfig | None = None) -> bytes:
    """Serialise a mesh to GLB bytes (see :func:`export_glb`)."""

    cfg = cfg or ExportConfig()
    verts, info = _prepare(mesh, cfg)
    tm = trimesh.Trimesh(vertices=verts, faces=mesh.faces, process=False, validate=False)
    if isinstance(mesh, TexturedMesh):
        mat = trimesh.visual.material.PBRMaterial(
            name=cfg.material_name,
            baseColorTexture=Image.fromarray(mesh.texture, mode="RGB"),
            baseColorFactor=[255, 255, 255, 255],
            metallicFactor=float(cfg.metallic),
            roughnessFactor=float(cfg.roughness),
            doubleSided=bool(cfg.double_sided),
        )
        # trimesh stores UVs with a bottom-left origin and flips v when writing glTF.
        uv_tm = np.stack([mesh.uvs[:, 0], 1.0 - mesh.uvs[:, 1]], axis=1)
        tm.visual = trimesh.visual.TextureVisuals(uv=uv_tm, material=mat)
    else:
        rgba = np.concatenate(
            [np.round(mesh.colors * 255.0), np.full((len(mesh.colors), 1), 255.0)], axis=1
        ).astype(np.uint8)
        tm.visual = trimesh.visual.ColorVisuals(tm, vertex_colors=rgba)
    extras = {"crm_export": info}

    def post(tree: dict) -> None:
        tree.setdefault("asset", {})["extras"] = extras
        tree["asset"]["generator"] = "crm-batch pipeline.outputs.export (trimesh)"
        if tree.get("textures"):
            tree["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 10497, "wrapT": 10497}]
            for tex in tree["textures"]:
                tex["sampler"] = 0
        views = tree.get("bufferViews", [])
        for mesh_js in tree.get("meshes", []):
            for prim in mesh_js.get("primitives", []):
                for acc in prim.get("attributes", {}).values():
                    views[tree["accessors"][acc]["bufferView"]]["target"] = 34962  # ARRAY_BUFFER
                if "indices" in prim:
                    views[tree["accessors"][prim["indices"]]["bufferView"]]["target"] = 34963  # ELEMENT_ARRAY
        for mat in tree.get("materials", []):
            mat["doubleSided"] = bool(cfg.double_sided)
            pbr = mat.setdefault("pbrMetallicRoughness", {})
            pbr["metallicFactor"] = float(cfg.metallic)
            pbr["roughnessFactor"] = float(cfg.roughness)

    return trimesh.exchange.gltf.export_glb(trimesh.Scene(tm), include_normals=False, tree_postprocessor=post)


def export_glb(mesh: TexturedMesh | VertexColorMesh, path, cfg: ExportConfig | None = None) -> dict:
    """Write a binary glTF file atomically.

    ``TexturedMesh``: embedded PNG base-colour texture, TEXCOORD_0, PBR material (metallic 0, roughness 1,
    double-sided), linear/mipmap sampler with repeat wrap. ``VertexColorMesh``: COLOR_0 vertex colours.
    The frame record goes to ``asset.extras["crm_export"]``. Returns that record.
    """
    cfg = cfg or ExportConfig()
    data = glb_bytes(mesh, cfg)
    atomic_write_bytes(path, data)
    return read_glb_json(data)["asset"]["extras"]["crm_export"]


def export_obj(mesh: TexturedMesh | VertexColorMesh, path_obj, cfg: ExportConfig | None = None) -> dict:
    """Write ``name.obj`` + ``name.mtl`` + ``name.png`` (textured) or a vertex-colour OBJ, each atomically.

    OBJ conventions as the official exporter: ``v`` with 6 decimals, ``vt u (1 - v)`` (OBJ's bottom-left
    origin), 1-based ``f p/t p/t p/t`` (outward winding), ``usemtl material_0``; MTL with ``Kd 1 1 1``, ``Ka 1
    1 1``, ``Ks 0.4 0.4 0.4``, ``Ns 10``, ``illum 2``, ``map_Kd name.png``. Vertex-colour meshes write
    ``v x y z r g b`` and no MTL. The PNG and MTL are written before the OBJ. Returns the frame record.
    """
    cfg = cfg or ExportConfig()
    path_obj = Path(path_obj)
    if path_obj.suffix.lower() != ".obj":
        raise ValueError(f"OBJ path must end with .obj, got {path_obj}")
    verts, info = _prepare(mesh, cfg)
    stem = path_obj.stem
    lines = [
        "# crm-batch OBJ export",
        "# crm_export " + json.dumps(info, separators=(",", ":")),
    ]
    if isinstance(mesh, TexturedMesh):
        atomic_write_bytes(path_obj.with_suffix(".png"), _png_bytes(mesh.texture))
        mtl = (
            f"newmtl {cfg.material_name}\nKa 1 1 1\nKd 1 1 1\nKs 0.4 0.4 0.4\nNs 10\nillum 2\n"
            f"map_Kd {stem}.png\n"
        )
        atomic_write_bytes(path_obj.with_suffix(".mtl"), mtl.encode())
        lines.append(f"mtllib {stem}.mtl")
        lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
        lines += [f"vt {u:.6f} {1.0 - v:.6f}" for u, v in mesh.uvs]
        lines.append(f"usemtl {cfg.material_name}")
        lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in (mesh.faces + 1)]
    else:
        lines += [
            f"v {x:.6f} {y:.6f} {z:.6f} {r:.4f} {g:.4f} {b:.4f}"
            for (x, y, z), (r, g, b) in zip(verts, mesh.colors)
        ]
        lines += [f"f {a} {b} {c}" for a, b, c in (mesh.faces + 1)]
    atomic_write_bytes(path_obj, ("\n".join(lines) + "\n").encode())
    return info


# ------------------------------------------------------------------------------------------------------------
# Loading helpers (tests, evaluation)


def read_glb_json(data: bytes) -> dict:
    """Parse the JSON chunk of GLB bytes."""
    if len(data) < 20 or data[:4] != b"glTF":
        raise ValueError("not a binary glTF file (bad magic)")
    version, total = struct.unpack_from("<II", data, 4)
    if version != 2 or total != len(data):
        raise ValueError(f"bad GLB header: version {version}, length {total} vs {len(data)} bytes")
    clen, ctype = struct.unpack_from("<II", data, 12)
    if ctype != 0x4E4F534A:
        raise ValueError("first GLB chunk is not JSON")
    return json.loads(data[20 : 20 + clen].decode("utf-8"))


def load_glb(path) -> dict:
    """Load a GLB written by :func:`export_glb` with trimesh.

    Returns a dict with ``vertices (V,3)``, ``faces (F,3)``, ``uvs (V,2)`` in the glTF convention or None,
    ``texture (H,W,3) uint8`` or None, ``colors (V,3) float`` or None, ``json`` (the glTF JSON) and ``extras``
    (``asset.extras``).
    """

    data = Path(path).read_bytes()
    js = read_glb_json(data)
    scene = trimesh.load(io.BytesIO(data), file_type="glb", process=False)
    geoms = list(scene.geometry.values()) if isinstance(scene, trimesh.Scene) else [scene]
    if len(geoms) != 1:
        raise ValueError(f"expected one mesh in {path}, found {len(geoms)}")
    out = _mesh_arrays(geoms[0], "baseColorTexture")
    out.update(json=js, extras=js.get("asset", {}).get("extras", {}))
    return out


def load_obj(path) -> dict:
    """Load an OBJ written by :func:`export_obj` with trimesh (vertex order kept).

    Returns ``vertices``, ``faces``, ``uvs`` (glTF convention) and ``texture`` (or ``colors``).
    """

    m = trimesh.load(str(path), file_type="obj", process=False, maintain_order=True, force="mesh")
    return _mesh_arrays(m, "image")


def _mesh_arrays(m, image_attr: str) -> dict:
    """Vertices, faces, UVs (glTF top-left origin), texture or vertex colours of a loaded trimesh."""

    out: dict = {
        "vertices": np.asarray(m.vertices, dtype=np.float32),
        "faces": np.asarray(m.faces, dtype=np.int64),
        "uvs": None,
        "texture": None,
        "colors": None,
    }
    vis = m.visual
    if isinstance(vis, trimesh.visual.TextureVisuals) and vis.uv is not None:
        uv = np.asarray(vis.uv, dtype=np.float32)
        out["uvs"] = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=1)
        img = getattr(vis.material, image_attr, None)
        if img is not None:
            out["texture"] = np.asarray(img.convert("RGB"))
    elif getattr(vis, "kind", None) == "vertex":
        out["colors"] = np.asarray(vis.vertex_colors, dtype=np.float32)[:, :3] / 255.0
    return out
