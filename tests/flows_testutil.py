"""Helpers shared by the batch tests: an S3 test server on 127.0.0.1, a Prefect test server, small
input images."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from flows.io import storage


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(bucket: str | None = None, start_timeout_s: float = 20.0) -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (start-up wait bounded by ``start_timeout_s``), with ``bucket``
    created when given; yields the fsspec storage options that reach it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"moto server on port {port} did not start in {start_timeout_s:g} s"
                    ) from None
                time.sleep(0.1)
        opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        if bucket:
            fs, _ = storage.get_fs(f"s3://{bucket}", opts)
            fs.mkdir(bucket)
        yield opts
    finally:
        server.stop()


@contextlib.contextmanager
def prefect_test_server(home: Path) -> Iterator[None]:
    """Prefect's test harness (a temporary server and database) with ``PREFECT_HOME`` in ``home``."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def png_bytes(color: tuple[int, int, int] = (200, 40, 40), size: int = 96) -> bytes:
    """An RGBA PNG: a coloured rectangle on a transparent background."""
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    img.paste(Image.new("RGBA", (size // 2, size * 7 // 12), (*color, 255)), (size // 4, size * 5 // 24))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
