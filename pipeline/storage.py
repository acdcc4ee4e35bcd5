"""fsspec helpers: open, exists, URI joins and atomic writes of files and folders on any protocol.

A URI is either a plain local path (``out/run1``, ``/data/x.png``) or ``protocol://path``
(``file://``, ``s3://bucket/key``, ``gs://``, ``memory://``). ``storage_options`` are passed
verbatim to the fsspec filesystem (for S3: ``endpoint_url``, ``key``, ``secret``, ...);
credentials are better left to the environment (``AWS_ACCESS_KEY_ID`` ...), see docs/batch.md.

Atomicity:
- local files: write to a temporary sibling, then ``os.replace`` (readers never see a partial file);
- local folders: copy to a temporary sibling folder, then rename into place;
- object stores: one PUT is atomic per object; a folder is uploaded file by file and is *complete*
  only once its marker object (written last, see :func:`put_dir`) exists.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.atomic import atomic_write_bytes

__all__ = [
    "StorageError",
    "get_fs",
    "protocol_of",
    "is_local",
    "local_path",
    "join_uri",
    "parent_uri",
    "resolve_uri",
    "open_uri",
    "exists",
    "read_bytes",
    "read_many",
    "write_bytes_atomic",
    "put_file_atomic",
    "put_dir",
    "list_files",
    "remove",
]


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


def protocol_of(uri: str) -> str:
    """``"s3"`` for ``s3://b/k``; ``"file"`` for plain paths and ``file://`` URIs."""
    if "://" not in uri:
        return "file"
    proto = uri.split("://", 1)[0].lower()
    return "file" if proto in ("file", "local") else proto


def is_local(uri: str) -> bool:
    """True when the URI names a path on this machine's file system."""
    return protocol_of(uri) == "file"


def local_path(uri: str) -> Path:
    """The local path of a ``file://`` URI or plain path (raises for other protocols)."""
    if not is_local(uri):
        raise StorageError(f"not a local URI: {uri!r}")
    return Path(uri.split("://", 1)[1] if "://" in uri else uri)


def get_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path within it."""
    if is_local(uri):
        return LocalFileSystem(), str(local_path(uri).absolute())
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open filesystem for {uri!r}: {exc}") from exc
    return fs, path


def join_uri(base: str, *parts: str) -> str:
    """Join path components onto a URI, keeping its protocol: ``join_uri("s3://b/run", "objects", "a")``."""
    clean = [p.strip("/") for p in parts if p not in ("", None)]
    if not clean:
        return base
    if "://" in base:
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.join(rest.rstrip("/") if rest.rstrip("/") else rest, *clean)
    return str(Path(base).joinpath(*clean))


def parent_uri(uri: str) -> str:
    """The folder that holds ``uri`` (same protocol)."""
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        return f"{proto}://" + posixpath.dirname(rest.rstrip("/"))
    return str(Path(uri).parent)


def resolve_uri(uri: str, base: str | None) -> str:
    """Resolve a manifest reference against the folder ``base``.

    Absolute references (``s3://...``, ``/abs/path``) are returned unchanged; relative ones
    (``img/a.png``, ``../data/a.webp``) are joined onto ``base`` and ``..`` is normalised.
    """
    if "://" in uri or base is None or os.path.isabs(uri):
        return uri
    if "://" in base and not is_local(base):
        proto, rest = base.split("://", 1)
        return f"{proto}://" + posixpath.normpath(posixpath.join(rest, uri))
    return os.path.normpath(os.path.join(str(local_path(base)), uri))


def open_uri(uri: str, mode: str = "rb", storage_options: dict[str, Any] | None = None) -> IO:
    """Open ``uri`` (any protocol) like ``open``; raises FileNotFoundError for a missing object."""
    fs, path = get_fs(uri, storage_options)
    return fs.open(path, mode)


def exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    """True if the file or folder exists."""
    fs, path = get_fs(uri, storage_options)
    return bool(fs.exists(path))


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Whole content of ``uri``; FileNotFoundError names the URI when it is missing."""
    fs, path = get_fs(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no such object: {uri}") from exc


def read_many(uris: list[str], storage_options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """Contents of several objects on one filesystem in one (concurrent, for object stores) call.

    Missing objects are left out of the result.
    """
    if not uris:
        return {}
    fs, _ = get_fs(uris[0], storage_options)
    paths = {get_fs(u, storage_options)[1]: u for u in uris}
    got = fs.cat(list(paths), on_error="omit")
    if isinstance(got, bytes):  # a single path returns bytes, not a dict
        got = {next(iter(paths)): got}
    return {paths[p]: data for p, data in got.items() if isinstance(data, bytes)}


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def write_bytes_atomic(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``data`` to ``uri`` atomically (temp + ``os.replace`` locally, one PUT on object stores)."""
    if is_local(uri):
        atomic_write_bytes(local_path(uri), data)
        return uri
    fs, path = get_fs(uri, storage_options)
    fs.pipe_file(path, data)
    return uri


def put_file_atomic(src: str | os.PathLike, uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Copy the local file ``src`` to ``uri`` atomically."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no such local file to upload: {src}")
    if is_local(uri):
        dst = local_path(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dst)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return uri
    fs, path = get_fs(uri, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(str(src), path)
    return uri


def put_dir(
    src: str | os.PathLike,
    uri: str,
    storage_options: dict[str, Any] | None = None,
    marker: tuple[str, bytes] | None = None,
) -> dict[str, str]:
    """Copy the local folder ``src`` (recursively) to ``uri``; returns {relative path: uri}.

    ``marker=(name, data)`` writes one more file *after* all the others: on object stores its
    presence means the folder is complete. Locally the whole folder (marker included) is
    assembled in a temporary sibling and renamed into place, replacing an older version.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"no such local folder to upload: {src}")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    rels = [p.relative_to(src).as_posix() for p in files]
    out = {rel: join_uri(uri, rel) for rel in rels}
    if marker is not None:
        out[marker[0]] = join_uri(uri, marker[0])
    if is_local(uri):
        dst = local_path(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dst)
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            shutil.copytree(src, tmp)
            if marker is not None:
                (tmp / marker[0]).write_bytes(marker[1])
            if dst.exists():
                os.replace(dst, old)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return out
    fs, path = get_fs(uri, storage_options)
    if marker is not None:  # an older marker must not vouch for a half-replaced folder
        marker_path = posixpath.join(path, marker[0])
        if fs.exists(marker_path):
            fs.rm_file(marker_path)
    for p, rel in zip(files, rels):
        fs.put_file(str(p), posixpath.join(path, rel))
    if marker is not None:
        fs.pipe_file(posixpath.join(path, marker[0]), marker[1])
    return out


def list_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every file under the folder ``uri`` (recursively), as URIs; empty if it does not exist."""
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache(path)  # object-store listings are cached per filesystem instance
    if not fs.exists(path):
        return []
    found = fs.find(path)
    rel = [posixpath.relpath(f, path) if not is_local(uri) else os.path.relpath(f, path) for f in found]
    return [join_uri(uri, r.replace(os.sep, "/")) for r in rel]


def remove(uri: str, storage_options: dict[str, Any] | None = None, recursive: bool = False) -> None:
    """Delete a file (or a folder with ``recursive=True``); a missing target is not an error."""
    fs, path = get_fs(uri, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
