"""Helpers shared by the batch tests: an S3 test server on 127.0.0.1 and small input images."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Iterator

from PIL import Image

from flows.io import storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 with ``bucket`` created; yields the fsspec storage options."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        fs, _ = storage.get_fs(f"s3://{bucket}", opts)
        fs.mkdir(bucket)
        yield opts
    finally:
        server.stop()


def png_bytes(color: tuple[int, int, int] = (200, 40, 40), size: int = 96) -> bytes:
    """An RGBA PNG: a coloured rectangle on a transparent background."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (size // 2, size * 7 // 12), (*color, 255)), (size // 4, size * 5 // 24))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
