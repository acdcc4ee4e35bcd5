"""Regenerate ``docs/img/gallery.png``: the gallery page of a batch run, as headless Chromium shows it.

Builds ``<run>/index.html`` (``flows.gallery``), opens it from ``file://`` and keeps the top of the page:
the filters and the first cards, with their QC values and flags. Needs Node, ``npm install`` and
Chromium (``tests/browser/page.mjs``).

Usage (from the repository root), on a finished demo run::

    make demo WEIGHTS=tiny-random            # or: python -m flows.demo --weights tiny-random --out DIR
    python docs/img/make_gallery.py out/demo/run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from browser.page_driver import run_page  # noqa: E402  (tests/browser/page_driver.py)

from flows.gallery import gallery_link, write_gallery  # noqa: E402

CARDS = "document.querySelectorAll('#cards .card').length"
PREVIEWS = "Array.from(document.querySelectorAll('img')).every(i => i.complete)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished batch run folder (e.g. out/demo/run)")
    parser.add_argument("--out", default=str(Path(__file__).with_name("gallery.png")))
    parser.add_argument("--height", type=int, default=760, help="pixels of the page kept")
    args = parser.parse_args()
    index = write_gallery(args.run)
    steps = [{"wait": f"{CARDS} > 0"}, {"wait": PREVIEWS}, {"screenshot": "page.png"}]
    with tempfile.TemporaryDirectory() as tmp:
        res = run_page(gallery_link(index), steps, Path(tmp), viewport=(1280, args.height))
        Image.open(res["results"]["page.png"]).convert("RGB").save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
