"""Where one object's folder is published: the ``Destination`` interface and its local form."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, runtime_checkable

from pipeline.outputs.atomic import atomic_dir

__all__ = ["Destination", "LocalDestination", "as_destination"]


@runtime_checkable
class Destination(Protocol):
    """Where finalize publishes one object's folder."""

    def staging(self, obj_id: str) -> AbstractContextManager[Path]:
        """A local folder to write the object's files into; published when the block ends without
        error, discarded otherwise."""

    def location(self, obj_id: str) -> str:
        """The published folder of `obj_id` (a path or a URI)."""


class LocalDestination:
    """``root/<id>/`` on the local file system, published by one rename (nothing else is copied)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def staging(self, obj_id: str) -> AbstractContextManager[Path]:
        return atomic_dir(self.root / obj_id)

    def location(self, obj_id: str) -> str:
        return str(self.root / obj_id)


def as_destination(dest: str | os.PathLike | Destination) -> Destination:
    """A `Destination` as it is; a path becomes a `LocalDestination`."""
    return dest if isinstance(dest, Destination) else LocalDestination(dest)
