"""Atomic writes of files and whole folders (temp path in the same directory, then `os.replace`).

A reader never sees a half-written file or an incomplete output folder: everything is written
under a hidden temporary name next to the destination and renamed into place only once complete.
On any error the temporary file/folder is removed, so a failure leaves nothing behind.

Temporary names start with ``.`` and contain ``.tmp-`` (see `is_temp_name`), so listings and
manifests can skip them, and `remove_stale_temps` can clean up after a killed process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_MARKER = ".tmp-"


def is_temp_name(name: str) -> bool:
    """True for names created by this module for in-progress writes."""
    return name.startswith(".") and TEMP_MARKER in name


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (rename durability); silently skipped where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name (a Parquet or safetensors
    writer, a copy); renamed onto `path` when the block ends without error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARKER}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder + `os.replace`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> Path:
    """Serialise `obj` as JSON (sorted keys, trailing newline) and write it atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_modes(root: Path) -> None:
    """Give a finished temp folder the permissions a plain mkdir/open would have (mkdtemp/mkstemp
    create 0700/0600), so outputs are readable like any other file."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to `final` on success.

    Usage::

        with atomic_dir(out / "obj1") as tmp:
            (tmp / "mesh.glb").write_bytes(...)
        # here out/obj1 exists with all its files, or (on exception) nothing was created

    If `final` already exists it is replaced (when `overwrite`), as atomically as POSIX allows:
    the old folder is first renamed aside, the new one renamed into place, then the old one
    deleted. With ``overwrite=False`` an existing `final` raises `FileExistsError` before any work.
    """
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"output folder already exists: {final}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_MARKER}", dir=parent))
    try:
        yield tmp
        _publish_modes(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(f"output folder appeared while writing: {final}")
            old = parent / f".{final.name}{TEMP_MARKER}old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)  # put the previous result back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete leftover temporary files/folders (from a killed process) directly inside `folder`."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if is_temp_name(entry.name):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed.append(entry)
    return removed
