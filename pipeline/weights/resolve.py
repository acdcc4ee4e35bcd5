"""Finding the CRM checkpoints: local folder, explicit files, or the Hugging Face repo `Zhengyi/CRM`.

`resolve_weights(spec)` returns a `ResolvedWeights` naming one `.safetensors` file per model role
(``recon`` = CRM.pth, ``stage1`` = pixel-diffusion.pth, ``stage2`` = ccm-diffusion.pth, and
optionally ``clip`` = the open_clip ViT-H-14 file) plus an `identity` dict that is recorded in
every output. Specs:

* ``"auto"``: explicit per-model paths first, then ``$CRM_WEIGHTS_DIR`` (when set), then the
  Hugging Face cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``), then a download into that cache (with a
  progress bar; a dropped connection resumes), like diffusers' ``from_pretrained``. Downloads are
  off with ``allow_download=False`` (CLI ``--offline``) or ``HF_HUB_OFFLINE=1``; an unreachable hub
  is detected with one bounded request. Never falls back to random weights.
* a directory: the files by their official names (``CRM.pth`` or ``CRM.safetensors``, ...).
* ``"hf"``, ``"Zhengyi/CRM"`` or ``"hf:OWNER/REPO[@REVISION]"``: the Hugging Face repo only
  (cache, then download).
* ``"tiny-random"``: seeded random weights at the tiny test sizes (`pipeline.weights.tiny`) —
  for smoke tests and CI only; recorded as such in every output.

Pickle-based ``.pth`` files are read with ``torch.load(weights_only=True)`` once, converted to
``.safetensors`` (beside the file when its folder is writable, otherwise under the CRM cache,
``$CRM_CACHE_DIR`` or ``~/.cache/crm``; for Hugging Face files under ``<hub cache>/crm-converted``),
and the converted file is used from then on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from pipeline.outputs.atomic import atomic_write_json
from pipeline.weights.errors import CheckpointError, WeightsError, WeightsFileError, WeightsNotFoundError
from pipeline.weights.hub import OFFICIAL_REPO, HubAccess, hub_cache_dir, hub_lookup
from pipeline.weights.tiny_configs import tiny_config_hash

CLIP_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# role -> official file name in the Hugging Face repo.
MODEL_FILES: dict[str, str] = {
    "recon": "CRM.pth",
    "stage1": "pixel-diffusion.pth",
    "stage2": "ccm-diffusion.pth",
}
CLIP_FILE = "open_clip_pytorch_model.bin"
# Published sizes (for the error message): CRM.pth 475,621,273 bytes; each diffusion file ~5.7 GB.
APPROX_SIZES = {"recon": "476 MB", "stage1": "5.7 GB", "stage2": "5.7 GB", "clip": "3.9 GB"}
ROLE_LABEL = {
    "recon": "reconstruction model",
    "stage1": "stage-1 (six-view RGB) diffusion",
    "stage2": "stage-2 (CCM) diffusion",
    "clip": "OpenCLIP ViT-H-14 image/text encoder (only if the diffusion files lack clip_model.* keys)",
}
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin", ".pt")
TINY_SPEC = "tiny-random"


@dataclass
class WeightFile:
    """One resolved checkpoint file.

    Attributes:
        role: ``recon`` | ``stage1`` | ``stage2`` | ``clip``.
        path: the file to load (``.safetensors`` after conversion).
        source: the file as found (may be the ``.pth`` that `path` was converted from).
        origin: ``explicit`` | ``local-dir`` | ``hf-cache`` | ``hf-download`` | ``env-dir``.
        sha256: hex digest of `source` (identity of the weights).
        size: bytes of `source`.
        repo, revision: Hugging Face repo and commit hash when it came from the hub.
    """

    role: str
    path: Path
    source: Path
    origin: str
    sha256: str
    size: int
    repo: str | None = None
    revision: str | None = None

    def identity(self) -> dict[str, Any]:
        d = {"file": self.source.name, "sha256": self.sha256, "size": self.size, "origin": self.origin}
        if self.repo:
            d["repo"] = self.repo
            d["revision"] = self.revision
        return d


@dataclass
class ResolvedWeights:
    """Where each model's weights come from.

    Attributes:
        kind: ``"checkpoints"`` (real files) or ``"tiny-random"`` (seeded random tiny models).
        files: role -> `WeightFile` (empty for tiny-random; ``clip`` only when found/given).
        seed: weight seed of the tiny-random preset (None otherwise).
    """

    kind: str
    files: dict[str, WeightFile] = field(default_factory=dict)
    seed: int | None = None

    @property
    def is_random(self) -> bool:
        return self.kind == TINY_SPEC

    def path(self, role: str) -> Path | None:
        f = self.files.get(role)
        return f.path if f else None

    @property
    def identity(self) -> dict[str, Any]:
        """JSON-able description of exactly which weights were used (recorded in meta.json)."""
        if self.is_random:
            ident: dict[str, Any] = {
                "kind": TINY_SPEC,
                "seed": self.seed,
                "config_hash": tiny_config_hash(),
                "warning": "seeded RANDOM weights at tiny test sizes: outputs are meaningless "
                "(tests/CI only)",
            }
        else:
            ident = {"kind": self.kind, "files": {r: f.identity() for r, f in sorted(self.files.items())}}
        blob = json.dumps(ident, sort_keys=True, separators=(",", ":"))
        ident["id"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return ident


# ---------------------------------------------------------------------------------- helpers
def crm_cache_dir() -> Path:
    """Cache of converted files and hashes: ``$CRM_CACHE_DIR`` or ``~/.cache/crm``."""
    if os.environ.get("CRM_CACHE_DIR"):
        return Path(os.environ["CRM_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "crm"


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def cached_sha256(path: Path) -> str | None:
    """The sha256 of a file when it is known without reading it: a Hugging Face blob's name, or the
    entry of ``<crm cache>/sha256.json`` for this (real path, size, mtime); else None."""
    real = path.resolve()
    if _HEX64.match(real.name):  # Hugging Face stores LFS files as blobs named by their sha256
        return real.name
    index_path = crm_cache_dir() / "sha256.json"
    if index_path.is_file():
        try:
            return json.loads(index_path.read_text()).get(_index_key(real))
        except (OSError, ValueError):
            return None
    return None


def _index_key(real: Path) -> str:
    st = real.stat()
    return f"{real}|{st.st_size}|{st.st_mtime_ns}"


def file_sha256(path: Path, *, use_cache: bool = True, cancel: threading.Event | None = None) -> str:
    """sha256 of a file; cached in ``<crm cache>/sha256.json`` keyed on (real path, size, mtime).

    `cancel` stops the reading early (the result is then meaningless and not cached).
    """
    real = path.resolve()
    if use_cache:
        known = cached_sha256(real)
        if known is not None:
            return known
    key = _index_key(real)
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            if cancel is not None and cancel.is_set():
                return ""
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        index_path = crm_cache_dir() / "sha256.json"
        try:
            index = json.loads(index_path.read_text()) if index_path.is_file() else {}
        except (OSError, ValueError):
            index = {}
        try:
            index[key] = digest
            atomic_write_json(index_path, index)
        except OSError:
            pass
    return digest


def _safetensors_metadata(path: Path) -> dict[str, str]:

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:
        raise WeightsError(f"cannot read safetensors header of {path}: {exc}") from exc


def is_writable_dir(d: Path) -> bool:
    """Whether converted files can be written beside a checkpoint (else they go to the CRM cache)."""
    return d.is_dir() and os.access(d, os.W_OK)


def _convert_once(source: Path, target: Path, sha: str | None) -> tuple[Path, str]:
    """Convert `source` (.pth) to `target` (.safetensors) unless a matching conversion exists.

    Returns (target, sha256 of `source`). When the digest is not known yet it is computed while the
    file converts (both read the same pages) and written into the header at the end.
    """
    if target.is_file():
        sha = sha or file_sha256(source)
        if _safetensors_metadata(target).get("source_sha256") == sha:
            return target, sha
    from pipeline.weights.checkpoints import convert_to_safetensors  # torch: only when converting

    metadata = {"source_size": source.stat().st_size}
    try:
        if sha is not None:
            convert_to_safetensors(source, target, metadata={**metadata, "source_sha256": sha})
            return target, sha
        cancel = threading.Event()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crm-sha256") as pool:
            digest = pool.submit(file_sha256, source, cancel=cancel)
            try:
                convert_to_safetensors(
                    source,
                    target,
                    metadata={**metadata, "source_sha256": "0" * 64},
                    final_metadata=lambda: {"source_sha256": digest.result()},
                )
            except BaseException:
                cancel.set()
                raise
        return target, digest.result()
    except CheckpointError as exc:
        raise WeightsFileError(str(exc)) from exc


def _prepare(role: str, source: Path, origin: str, *, convert: bool, repo=None, revision=None) -> WeightFile:
    """Hash (cached) and, for pickle formats, convert to `.safetensors` once (hashing while converting)."""
    source = Path(source)
    if not source.is_file():
        raise WeightsNotFoundError(f"{ROLE_LABEL[role]} checkpoint not found: {source}", [str(source)])
    size = source.stat().st_size
    if size == 0:
        raise WeightsError(f"{ROLE_LABEL[role]} checkpoint is empty (0 bytes): {source}")
    if source.suffix == ".safetensors":
        meta = _safetensors_metadata(source)
        if meta.get("source_sha256"):
            # A file converted earlier carries the identity of its original (name, size, sha256).
            original = source.with_name(meta.get("converted_from") or source.name)
            size = int(meta.get("source_size") or size)
            return WeightFile(role, source, original, origin, meta["source_sha256"], size, repo, revision)
        return WeightFile(role, source, source, origin, file_sha256(source), size, repo, revision)
    if not convert:
        return WeightFile(role, source, source, origin, file_sha256(source), size, repo, revision)
    sha = cached_sha256(source)
    stem = source.name.rsplit(".", 1)[0]
    if origin in ("hf-cache", "hf-download"):
        sha = sha or file_sha256(source)
        repo_dir = (repo or "local").replace("/", "--")
        target = hub_cache_dir() / "crm-converted" / repo_dir / sha / f"{stem}.safetensors"
    elif is_writable_dir(source.parent):
        target = source.parent / f"{stem}.safetensors"
    else:
        sha = sha or file_sha256(source)
        target = crm_cache_dir() / "converted" / sha / f"{stem}.safetensors"
    path, sha = _convert_once(source, target, sha)
    return WeightFile(role, path, source, origin, sha, size, repo, revision)


def _find_in_dir(directory: Path, official_name: str) -> Path | None:
    """``CRM.safetensors`` (preferred) or ``CRM.pth`` (or another known suffix) in `directory`."""
    stem = official_name.rsplit(".", 1)[0]
    st = directory / f"{stem}.safetensors"
    if st.is_file():
        meta = _safetensors_metadata(st)
        src = directory / str(meta.get("converted_from", ""))
        # Stale conversion (the .pth beside it was replaced): use the .pth, it will be re-converted.
        if meta.get("converted_from") and src.is_file() and src.stat().st_mtime > st.stat().st_mtime:
            return src
        return st
    for suffix in CHECKPOINT_SUFFIXES[1:]:
        p = directory / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _missing_message(missing: list[str], searched: list[str], blocked: str | None) -> str:
    names = [MODEL_FILES[r] for r in missing if r in MODEL_FILES]
    lines = [
        "CRM weights not found: missing "
        + ", ".join(f"{MODEL_FILES.get(r, CLIP_FILE)} ({ROLE_LABEL[r]}, ~{APPROX_SIZES[r]})" for r in missing)
        + ".",
        "Searched: " + "; ".join(searched) + ".",
        f"Nothing was downloaded: {blocked or 'downloads are off'}.",
        "Three ways out:",
        "  1. a local folder holding the files by these names:",
        "       --weights /path/to/crm-weights        (make demo WEIGHTS=/path/to/crm-weights)",
        "  2. fetch them on a machine with network access, then copy the folder or the HF cache here:",
        f"       hf download {OFFICIAL_REPO} {' '.join(names)} --local-dir /path/to/crm-weights",
        f"     (or let this run download them into {hub_cache_dir()}: network access, no --offline,"
        " HF_HUB_OFFLINE unset)",
        "  3. see the machinery run on seeded RANDOM tiny weights (meaningless shapes, smoke test):",
        "       --weights tiny-random                 (make demo WEIGHTS=tiny-random)",
    ]
    return "\n".join(lines)


def _parse_hf_spec(spec: str) -> tuple[str, str | None] | None:
    if spec in ("hf", OFFICIAL_REPO):
        return OFFICIAL_REPO, None
    if spec.startswith("hf:"):
        body = spec[3:]
        repo, _, rev = body.partition("@")
        if repo.count("/") != 1:
            raise WeightsError(f"invalid Hugging Face spec {spec!r}: expected hf:OWNER/REPO[@REVISION]")
        return repo, rev or None
    return None


# ---------------------------------------------------------------------------------- public API
def resolve_weights(
    spec: str | os.PathLike = "auto",
    *,
    allow_download: bool = True,
    recon_path: str | os.PathLike | None = None,
    stage1_path: str | os.PathLike | None = None,
    stage2_path: str | os.PathLike | None = None,
    clip_path: str | os.PathLike | None = None,
    convert: bool = True,
    tiny_seed: int = 0,
) -> ResolvedWeights:
    """Resolve `spec` to concrete weight files (see the module docstring for the specs).

    Args:
        spec: ``"auto"`` | ``"tiny-random"`` | a directory | ``"hf"`` / ``"hf:OWNER/REPO[@REV]"``.
        allow_download: for ``"auto"`` and ``"hf..."``, fetch files missing from the hub cache into it
            (progress bar, resumable). False (``--offline``) or ``HF_HUB_OFFLINE=1`` forbids it; an
            unreachable hub is detected with one bounded request and reported at once.
        recon_path, stage1_path, stage2_path, clip_path: explicit files that override the spec per model.
        convert: convert ``.pth`` to ``.safetensors`` once (default) instead of loading the pickle
            container on every run.
        tiny_seed: weight seed of the ``tiny-random`` preset.

    Raises:
        WeightsNotFoundError: some required file is missing; the message lists the exact files,
            where they were searched, and how to obtain them.
        WeightsError: a file is unreadable / empty or the spec is malformed.
    """
    spec = str(spec)
    explicit = {"recon": recon_path, "stage1": stage1_path, "stage2": stage2_path, "clip": clip_path}
    if spec == TINY_SPEC:
        given = [r for r, p in explicit.items() if p is not None]
        if given:
            raise WeightsError(
                f"weights 'tiny-random' cannot be combined with explicit files ({', '.join(given)})"
            )
        return ResolvedWeights(kind=TINY_SPEC, seed=int(tiny_seed))

    files: dict[str, WeightFile] = {}
    for role, p in explicit.items():
        if p is not None:
            files[role] = _prepare(role, Path(p).expanduser(), "explicit", convert=convert)

    needed = [r for r in (*MODEL_FILES, "clip") if r not in files]
    searched: list[str] = []
    hf = _parse_hf_spec(spec)

    def from_dir(directory: Path, origin: str) -> None:
        searched.append(str(directory))
        for role in list(needed):
            name = MODEL_FILES.get(role, CLIP_FILE)
            found = _find_in_dir(directory, name)
            if found is not None:
                files[role] = _prepare(role, found, origin, convert=convert)
                needed.remove(role)

    blocked: str | None = None
    if spec != "auto" and hf is None:
        directory = Path(spec).expanduser()
        if not directory.is_dir():
            raise WeightsError(
                f"--weights {spec!r} is neither 'auto', 'tiny-random', 'hf[:OWNER/REPO[@REV]]' "
                "nor an existing directory"
            )
        from_dir(directory, "local-dir")
        blocked = f"--weights names a local folder ({directory})"
    else:
        if spec == "auto" and os.environ.get("CRM_WEIGHTS_DIR"):
            env_dir = Path(os.environ["CRM_WEIGHTS_DIR"]).expanduser()
            if env_dir.is_dir():
                from_dir(env_dir, "env-dir")
            else:
                searched.append(f"$CRM_WEIGHTS_DIR={env_dir} (not a directory)")
        repo, revision = hf if hf is not None else (OFFICIAL_REPO, None)
        searched.append(f"Hugging Face cache {hub_cache_dir()} ({repo})")

        def locate(role: str) -> tuple[str, str | None]:
            return (CLIP_REPO, None) if role == "clip" else (repo, revision)

        for role in list(needed):
            r_repo, r_rev = locate(role)
            hit = hub_lookup(r_repo, MODEL_FILES.get(role, CLIP_FILE), r_rev)
            if hit is not None:
                files[role] = _prepare(
                    role, hit[0], "hf-cache", convert=convert, repo=r_repo, revision=hit[1]
                )
                needed.remove(role)
        # The CLIP file is optional (the official diffusion files carry CLIP): never downloaded here.
        to_fetch = [r for r in needed if r in MODEL_FILES]
        hub = HubAccess(allow_download)
        if to_fetch and hub.can_download():
            for role in to_fetch:
                r_repo, r_rev = locate(role)
                path, rev = hub.download(r_repo, MODEL_FILES[role], r_rev, APPROX_SIZES[role])
                files[role] = _prepare(role, path, "hf-download", convert=convert, repo=r_repo, revision=rev)
                needed.remove(role)
        blocked = hub.blocked

    missing = [r for r in MODEL_FILES if r not in files]
    if missing:
        raise WeightsNotFoundError(_missing_message(missing, searched, blocked), missing)
    return ResolvedWeights(kind="checkpoints", files=files)
