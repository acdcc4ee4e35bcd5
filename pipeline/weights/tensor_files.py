"""Checkpoint files read tensor by tensor, and a streaming `.safetensors` writer.

`TensorFile(path)` opens a `.safetensors` file (``safetensors.safe_open``) or a weights-only PyTorch
file (``torch.load(weights_only=True, mmap=True)``) without reading its data: each tensor is a view
of the file's private memory mapping, so a tensor costs memory only once its pages are touched, and
those pages are clean file pages the kernel can drop and re-read. `TensorFile.release(t)` takes the
pages of such a tensor out of the process once its data has been copied elsewhere (another dtype or
device, another file); they stay in the page cache.

`write_safetensors(tensors, dst)` writes one tensor at a time (header first, then each tensor's
bytes), so converting an 8 GB checkpoint needs the memory of one tensor, not of the whole state
dict; the file is written atomically (temp file + rename).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pipeline.outputs.atomic import atomic_file
from pipeline.weights.errors import CheckpointError

__all__ = [
    "TensorFile",
    "checkpoint_mappings",
    "release_mapped_tensor",
    "release_mapped_weights",
    "safetensors_dtype",
    "torch_dtype",
    "write_safetensors",
]

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

#: Data section alignment of the files we write (header padded with spaces, as the format allows).
DATA_ALIGNMENT = 64
_WRITE_CHUNK = 64 << 20


def torch_dtype(name: str) -> torch.dtype:
    """safetensors dtype name (``"F32"``) -> torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unsupported safetensors dtype {name!r}") from None


def safetensors_dtype(dtype: torch.dtype) -> str:
    """torch dtype -> safetensors dtype name."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors by this writer") from None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or the common {'state_dict': ...} / {'model': ...} wrappers."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model", "module"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise CheckpointError(f"{path}: no tensors found (expected a state dict)")


class TensorFile(Mapping):
    """A checkpoint file as a read-only mapping key -> tensor, read lazily (see module docstring).

    ``file[key]`` is a CPU tensor backed by the file's private memory mapping (no copy; writes to it
    never reach the file). `meta()` gives shape/dtype-only tensors without touching the data.
    `metadata` is the safetensors header's ``__metadata__`` (empty for PyTorch files).

    Raises `CheckpointError` naming the file when it is missing, empty, truncated, corrupt or not a
    weights-only file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint not found: {self.path}")
        size = self.path.stat().st_size
        if size == 0:
            raise CheckpointError(f"checkpoint is empty (0 bytes): {self.path}")
        self.size = size
        self.metadata: dict[str, str] = {}
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._mappings: list[tuple[int, int]] = []
        if self.path.suffix == ".safetensors":
            self._open_safetensors()
        else:
            self._open_pickle()

    # ------------------------------------------------------------------ opening
    def _open_safetensors(self) -> None:
        try:
            handle = safe_open(str(self.path), framework="pt")
            self.metadata = dict(handle.metadata() or {})
            for key in handle.keys():
                sl = handle.get_slice(key)
                self._specs[key] = (tuple(int(s) for s in sl.get_shape()), torch_dtype(sl.get_dtype()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises several types for truncated/corrupt headers
            raise CheckpointError(
                f"cannot read safetensors file {self.path} ({self.size} bytes): {exc}"
            ) from exc
        self._handle = handle

    def _open_pickle(self) -> None:
        def load(mmap_: bool):
            return torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=mmap_)

        try:
            try:
                obj = load(True)
            except RuntimeError as exc:  # legacy (pre-zip) files cannot be memory-mapped
                if "zipfile" not in str(exc) and "mmap" not in str(exc):
                    raise
                obj = load(False)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise CheckpointError(
                f"cannot read checkpoint {self.path} ({self.size} bytes; truncated or not a weights-only "
                f"PyTorch file): {type(exc).__name__}: {first}"
            ) from exc
        self._tensors = _unwrap(obj, self.path)
        self._specs = {k: (tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._specs:
            raise KeyError(key)
        if self._tensors is not None:
            return self._tensors[key]
        if self._handle is None:
            raise CheckpointError(f"{self.path} is closed")
        return self._handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of `key`, from the header (no data read)."""
        return self._specs[key]

    def meta(self) -> dict[str, torch.Tensor]:
        """key -> a tensor on the ``meta`` device with the stored shape and dtype (no data read)."""
        return {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in self._specs.items()}

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors (their stored dtypes)."""
        total = 0
        for shape, dtype in self._specs.values():
            n = 1
            for s in shape:
                n *= s
            total += n * dtype.itemsize
        return total

    def release(self, tensor: torch.Tensor) -> bool:
        """Unmap the pages under `tensor`, a tensor of this file, from this process (``MADV_DONTNEED``).

        Call it only once the tensor's data has been copied and the tensor will not be read again
        through this process's view: the pages leave the resident set (they stay in the page cache,
        and reading the tensor again would fault them back in from the file). Only ranges inside
        this file's private mappings are touched, so memory that is not the file's is never
        released. Returns whether anything was released (always False off Linux).
        """
        fn = _madvise()
        if fn is None or tensor.device.type != "cpu" or tensor.numel() == 0:
            return False
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self._mappings):
            self._mappings = _file_mappings(self.path)
            if not any(lo <= start and end <= hi for lo, hi in self._mappings):
                return False
        page = mmap.PAGESIZE
        lo = start + (-start % page)  # whole pages only: neighbouring tensors may share the edges
        hi = end - end % page
        if hi <= lo:
            return False
        return fn(lo, hi - lo, _MADV_DONTNEED) == 0

    def close(self) -> None:
        """Drop this object's references to the mapping (tensors handed out keep it alive)."""
        self._handle = None
        self._tensors = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, {len(self)} tensors)"


# ---------------------------------------------------------------------------------- page release
_MADV_DONTNEED = 4
_libc: Any = None


def _madvise():
    global _libc
    if _libc is None:
        if not sys.platform.startswith("linux"):
            _libc = False
        else:
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError):
                _libc = False
    return _libc.madvise if _libc else None


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's private read-write mappings of `path` (/proc/self/maps)."""
    real = str(path.resolve())
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real and parts[1].endswith("p"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi))
    except OSError:
        return []
    return out


#: Suffixes of the checkpoint files `TensorFile` maps (the only mappings `release_mapped_weights` touches).
_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def checkpoint_mappings() -> list[tuple[int, int]]:
    """Sorted address ranges of this process's private mappings of checkpoint files."""
    out = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(maxsplit=5)
                if (
                    len(parts) == 6
                    and parts[1].endswith("p")
                    and parts[5].rstrip("\n").endswith(_CHECKPOINT_SUFFIXES)
                ):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi))
    except OSError:
        return []
    return sorted(out)


def _storages(modules) -> dict[int, int]:
    """data_ptr -> nbytes of the CPU storages of the modules' parameters and buffers."""
    out: dict[int, int] = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            if t.device.type == "cpu":
                st = t.untyped_storage()
                if st.nbytes():
                    out[st.data_ptr()] = st.nbytes()
    return out


def _release_range(fn, ranges: list[tuple[int, int]], start: int, nbytes: int) -> int:
    """``MADV_DONTNEED`` on the whole pages of [start, start + nbytes) if it lies in one of `ranges`."""
    end = start + nbytes
    if not any(lo <= start and end <= hi for lo, hi in ranges):
        return 0
    page = mmap.PAGESIZE
    lo, hi = start + (-start % page), end - end % page  # neighbouring tensors may share the edges
    if hi > lo and fn(lo, hi - lo, _MADV_DONTNEED) == 0:
        return hi - lo
    return 0


def release_mapped_weights(module: torch.nn.Module, keep: tuple[torch.nn.Module, ...] = ()) -> int:
    """Take the resident pages of `module`'s memory-mapped weights out of this process.

    For a model loaded by `TensorFile` (its tensors are views of a checkpoint file's private
    mapping), the pages of the weights stay resident once read, so a process that runs several
    models one after the other holds all of them. This drops the pages of every parameter and
    buffer of `module` that lies in a checkpoint-file mapping (``MADV_DONTNEED``, whole pages
    inside the storage), except storages that a module of `keep` also holds (a shared CLIP or
    VAE). The pages stay in the page cache: the next use faults them back in from it (minor faults,
    no disk read unless the kernel evicted them meanwhile). Tensors in ordinary memory (another
    dtype, another device, built in memory) are never touched.

    Only for inference weights, never written in place: a page of a private mapping that was
    written is discarded by ``MADV_DONTNEED`` and would read back the file's value.

    Returns the bytes advised (0 off Linux or when nothing is mapped).
    """
    fn = _madvise()
    if fn is None:
        return 0
    ranges = checkpoint_mappings()
    if not ranges:
        return 0
    kept = _storages(keep)
    return sum(
        _release_range(fn, ranges, start, nbytes)
        for start, nbytes in sorted(_storages((module,)).items())
        if start not in kept
    )


def release_mapped_tensor(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> int:
    """`release_mapped_weights` for one tensor that is no longer used (e.g. once copied to another
    memory layout): the resident pages under it leave the process if it lies in a checkpoint-file
    mapping (whole pages only). Memory that is not a checkpoint file's is never touched. Only for a
    tensor that nothing reads again (a later read of those bytes faults the file's pages back in,
    from the page cache). `mappings`: `checkpoint_mappings()`, read once by a caller releasing many
    tensors (each read of ``/proc/self/maps`` costs ~2 ms); default: read here. Returns the bytes
    advised."""
    fn = _madvise()
    if fn is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    nbytes = tensor.numel() * tensor.element_size()
    ranges = checkpoint_mappings() if mappings is None else mappings
    return _release_range(fn, ranges, tensor.data_ptr(), nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    dst: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    *,
    release: Callable[[torch.Tensor], object] | None = None,
    final_metadata: Callable[[], Mapping[str, Any]] | None = None,
) -> Path:
    """Write `tensors` to `dst` as `.safetensors`, one tensor at a time, atomically.

    Only shapes and dtypes are read to build the header; each tensor's data is then read and
    written in turn (a non-contiguous tensor is made contiguous first, which copies that tensor
    only). Tensors whose size is a multiple of 64 bytes come first, so with the header padded to
    64 bytes every such tensor starts 64-byte aligned in the file (and in a memory mapping of it).

    Args:
        tensors: key -> CPU-readable tensor (e.g. a `TensorFile`, whose data is read lazily).
        dst: destination path; written through a temporary file in the same folder.
        metadata: ``__metadata__`` entries (values converted with ``str``).
        release: called with each source tensor once it is written; pass `TensorFile.release` of
            the source file so that the conversion's resident set stays near one tensor.
        final_metadata: called once the data is written; its entries replace those of `metadata`
            (same keys, values of the same length as the placeholders), e.g. a digest computed
            while the file was being written.
    """
    keys = sorted(tensors, key=lambda k: (_nbytes(tensors[k]) % DATA_ALIGNMENT != 0, k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for k in keys:
        t = tensors[k]
        n = _nbytes(t)
        header[k] = {
            "dtype": safetensors_dtype(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    blob = _header_blob(header)
    with atomic_file(dst) as tmp, open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for k in keys:
            src = tensors[k]
            t = src.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            if _nbytes(t) == 0:
                continue
            flat = t.contiguous().reshape(-1).view(torch.uint8).numpy()
            view = memoryview(flat)
            for i in range(0, len(view), _WRITE_CHUNK):
                fh.write(view[i : i + _WRITE_CHUNK])
            del view, flat
            if release is not None:
                release(src)
        if fh.tell() != 8 + len(blob) + offset:
            raise CheckpointError(f"writing {dst}: size mismatch (internal error)")
        if final_metadata is not None:
            final = {str(k): str(v) for k, v in final_metadata().items()}
            placeholders = header.get("__metadata__", {})
            if any(k not in placeholders or len(v) != len(placeholders[k]) for k, v in final.items()):
                raise CheckpointError(f"writing {dst}: final metadata must replace equal-length placeholders")
            header["__metadata__"] = {**placeholders, **final}
            final_blob = _header_blob(header)
            if len(final_blob) != len(blob):
                raise CheckpointError(f"writing {dst}: header size changed (internal error)")
            fh.seek(8)
            fh.write(final_blob)
        fh.flush()
    return Path(dst)


def _header_blob(header: Mapping[str, Any]) -> bytes:
    """The JSON header, padded with spaces so that the data section starts `DATA_ALIGNMENT`-aligned."""
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return blob + b" " * (-(8 + len(blob)) % DATA_ALIGNMENT)
