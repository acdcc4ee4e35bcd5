"""Python side of ``render.mjs``: find Node, Chromium and the npm packages, render, read the pictures back.

Shared by ``tests/test_browser_viewer.py`` and ``docs/img/make_frames.py``; standard library, numpy and
Pillow only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

RENDER_SCRIPT = Path(__file__).with_name("render.mjs")
REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_PACKAGES = ("three", "playwright-core")


def _chromium() -> str | None:
    return os.environ.get("CRM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """Why the browser renderer cannot run here (no Node, no Chromium, npm packages missing), or None."""
    if shutil.which("node") is None:
        return "node is not installed"
    if not _chromium():
        return "no Chromium found (apt-get install chromium, or set CRM_CHROMIUM)"
    for pkg in NODE_PACKAGES:
        if not (REPO_ROOT / "node_modules" / pkg).exists():
            return f"node_modules/{pkg} is missing: run `make install` (npm install)"
    return None


def render(
    files: dict[str, Path], page: dict, out_dir: Path, timeout: float = 180
) -> tuple[np.ndarray, dict]:
    """Render with three.js in headless Chromium (``page``: the viewer config described in viewer.mjs).

    ``files`` maps the URLs the page loads (``"/mesh.glb"``) to local files; the PNGs and the spec go to
    ``out_dir``. Returns ``((N, S, S, 4) uint8 RGBA, loader info)``; raises ``RuntimeError`` when the tools
    are missing or the render fails.
    """
    why = missing()
    if why:
        raise RuntimeError(f"browser renderer unavailable: {why}")
    spec = {
        "chromium": _chromium(),
        "out_dir": str(out_dir),
        "files": {k: str(v) for k, v in files.items()},
        "page": page,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    res = subprocess.run(
        [shutil.which("node"), str(RENDER_SCRIPT), str(spec_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if res.returncode != 0:
        raise RuntimeError(f"browser render failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    imgs = np.stack([np.asarray(Image.open(p).convert("RGBA")) for p in out["images"]])
    return imgs, out["info"]
