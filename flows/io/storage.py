"""fsspec helpers: open, exists, URI joins and atomic writes of files and folders on any protocol.

A URI is either a plain local path (``out/run1``, ``/data/x.png``) or ``protocol://path``
(``file://``, ``s3://bucket/key``, ``gs://``, ``memory://``). ``storage_options`` are passed
verbatim to the fsspec filesystem (for S3: ``endpoint_url``, ``key``, ``secret``, ...);
credentials are better left to the environment (``AWS_ACCESS_KEY_ID`` ...), see docs/batch.md.

Atomicity:
- local files: write to a temporary sibling, then ``os.replace`` (``pipeline.outputs.atomic``);
- local object folders: built in a temporary sibling and renamed into place (:class:`StorageDestination`);
- object stores: one PUT is atomic per object; an object folder is uploaded file by file, each file
  once, and is *complete* only once its marker object (``result.json``, written last by the batch
  job) exists.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.outputs.atomic import atomic_file, atomic_write_bytes
from pipeline.outputs.destination import LocalDestination

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
    "StorageDestination",
    "list_files",
    "remove",
    "content_key",
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
        with atomic_file(local_path(uri)) as tmp:
            shutil.copyfile(src, tmp)
        return uri
    fs, path = get_fs(uri, storage_options)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(str(src), path)
    return uri


class StorageDestination:
    """Object folders ``<root_uri>/<id>/`` on any storage, as a ``pipeline.finalize`` destination.

    Local paths and ``file://`` URIs are a `pipeline.finalize.LocalDestination` (one rename, nothing
    copied). On object stores the files are written to a local scratch folder (the exporters write
    files), then each is PUT once to its final key; an older `marker` object of the same folder is
    deleted first, so it never vouches for a half-replaced folder.
    """

    def __init__(
        self, root_uri: str, storage_options: dict[str, Any] | None = None, marker: str | None = None
    ):
        self.root_uri = root_uri
        self.storage_options = storage_options
        self.marker = marker
        self._local = LocalDestination(local_path(root_uri)) if is_local(root_uri) else None

    def location(self, obj_id: str) -> str:
        return join_uri(self.root_uri, obj_id)

    @contextlib.contextmanager
    def staging(self, obj_id: str) -> Iterator[Path]:
        if self._local is not None:
            with self._local.staging(obj_id) as folder:
                yield folder
            return
        with tempfile.TemporaryDirectory(prefix="crm-object-") as scratch:
            folder = Path(scratch)
            yield folder
            fs, path = get_fs(self.location(obj_id), self.storage_options)
            if self.marker is not None:
                with contextlib.suppress(FileNotFoundError):
                    fs.rm_file(posixpath.join(path, self.marker))
            for p in sorted(q for q in folder.rglob("*") if q.is_file()):
                fs.put_file(str(p), posixpath.join(path, p.relative_to(folder).as_posix()))


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


def content_key(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """A text that changes when the file at ``uri`` changes: its size and ETag (object stores) or
    modification time (local disk)."""
    fs, path = get_fs(uri, storage_options)
    fs.invalidate_cache(path)
    info = fs.info(path)
    tag = (
        info.get("ETag")
        or info.get("etag")
        or info.get("md5Hash")
        or info.get("mtime")
        or info.get("LastModified")
    )
    return f"{info.get('size')}:{tag}"
