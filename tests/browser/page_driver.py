"""Python side of ``page.mjs``: open a page (``file://`` or ``http(s)://``) in headless Chromium, run steps.

Shared by the gallery and evaluation-report tests and ``docs/img/make_gallery.py``; finds Node, Chromium and
the npm packages exactly as ``three_render`` does. Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from browser.three_render import _chromium, missing

PAGE_SCRIPT = Path(__file__).with_name("page.mjs")

__all__ = ["browser_missing", "require_browser", "run_page"]

browser_missing = missing


def require_browser() -> None:
    """Skip the calling test when no browser can run, or fail it under ``CRM_REQUIRE_BROWSER=1`` (CI)."""
    import pytest

    why = missing()
    if why:
        if os.environ.get("CRM_REQUIRE_BROWSER") == "1":
            pytest.fail(f"browser test required (CRM_REQUIRE_BROWSER=1) but {why}")
        pytest.skip(why)


def run_page(
    url: str,
    steps: list[dict[str, Any]],
    out_dir: Path,
    viewport: tuple[int, int] = (1280, 900),
    timeout: float = 180,
) -> dict[str, Any]:
    """Open `url`, run `steps` (see page.mjs) and return ``{"results", "console", "errors"}``.

    Raises ``RuntimeError`` with Chromium's console when the page or a step fails; every wait inside the
    page is bounded by ``timeout`` (and the whole run by the same bound, plus start-up).
    """
    why = missing()
    if why:
        raise RuntimeError(f"browser unavailable: {why}")
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "chromium": _chromium(),
        "url": url,
        "out_dir": str(out_dir),
        "viewport": list(viewport),
        "timeout_ms": int(timeout * 1000),
        "steps": steps,
    }
    spec_path = out_dir / "page_spec.json"
    spec_path.write_text(json.dumps(spec))
    res = subprocess.run(
        [shutil.which("node"), str(PAGE_SCRIPT), str(spec_path)],
        capture_output=True,
        text=True,
        timeout=timeout + 60,
    )
    if res.returncode != 0:
        raise RuntimeError(f"browser page run failed:\n{res.stderr[-6000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])
