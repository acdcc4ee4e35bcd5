"""Where the team's reference material lives and how a test asks for it.

The material (golden fixtures, specs, real data) lives beside the repository in ``../shared``
(``$CRM_SHARED_DIR``; fixtures in ``$CRM_REFERENCE_DIR``, default ``../shared/reference``). A user's
clone has none of it: there, tests that need it are skipped. CI sets ``CRM_REQUIRE_REFERENCE=1``,
and then a missing file is a failure, never a silent skip.

Fixture sets grow: files are discovered by pattern, and files that belong together (a stage
fixture and the CLIP fixture that made its text context) are paired by case name, the ``<x>`` of
``*_case_<x>.npz``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CRM_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE_DIR = Path(os.environ.get("CRM_REFERENCE_DIR", SHARED_DIR / "reference"))
DATA_DIR = SHARED_DIR / "data"
GSO_DIR = DATA_DIR / "gso_sample"

MISSING_MARK = "reference_missing"
_CASE = re.compile(r"_case_([A-Za-z0-9]+)\.[A-Za-z0-9]+$")


def reference_required() -> bool:
    """True when a missing reference file must fail the test (``CRM_REQUIRE_REFERENCE=1``, as in CI)."""
    return os.environ.get("CRM_REQUIRE_REFERENCE", "").strip().lower() in ("1", "true", "yes", "on")


def missing(what: str | Path) -> NoReturn:
    """Skip (a user's clone) or fail (``CRM_REQUIRE_REFERENCE=1``) because `what` is not there."""
    msg = f"reference material not found: {what} (set CRM_REFERENCE_DIR / CRM_SHARED_DIR)"
    if reference_required():
        pytest.fail(msg + "; CRM_REQUIRE_REFERENCE=1 makes a missing reference file a failure")
    pytest.skip(msg)


def require(path: str | Path) -> Path:
    """`path` if it exists, else :func:`missing`."""
    path = Path(path)
    if not path.exists():
        missing(path)
    return path


def fixtures(subdir: str, pattern: str = "*.npz") -> list[Path]:
    """Every file matching `pattern` in ``$CRM_REFERENCE_DIR/<subdir>``, sorted by name."""
    return sorted((REFERENCE_DIR / subdir).glob(pattern))


def fixture_params(subdir: str, pattern: str = "*.npz", keep=None) -> list:
    """`pytest.param` per fixture file (id = file name) for ``@pytest.mark.parametrize``.

    With no file (or none that `keep(path)` accepts), one param marked ``reference_missing`` stands in:
    the test then skips or fails through :func:`missing` instead of vanishing as an empty parameter set.
    """
    found = [p for p in fixtures(subdir, pattern) if keep is None or keep(p)]
    if found:
        return [pytest.param(p, id=p.name) for p in found]
    where = REFERENCE_DIR / subdir / pattern
    return [pytest.param(where, id="missing", marks=getattr(pytest.mark, MISSING_MARK)(str(where)))]


def first_fixture(subdir: str, pattern: str = "*.npz") -> Path:
    """The first matching fixture, or :func:`missing`."""
    found = fixtures(subdir, pattern)
    if not found:
        missing(REFERENCE_DIR / subdir / pattern)
    return found[0]


def case_name(path: str | Path) -> str:
    """``tiny_stage1_case_a.npz`` -> ``"a"``."""
    m = _CASE.search(Path(path).name)
    if m is None:
        raise ValueError(f"{Path(path).name} is not named *_case_<x>.<ext>")
    return m.group(1)


def paired_fixture(path: str | Path, subdir: str, prefix: str) -> Path:
    """The fixture ``<prefix>_case_<x>.npz`` of the same case as `path`, or :func:`missing`."""
    case = case_name(path)
    return require(REFERENCE_DIR / subdir / f"{prefix}_case_{case}.npz")


def fixtures_having(subdir: str, keys, pattern: str = "*.npz") -> list[Path]:
    """Fixtures in `subdir` that hold every array named in `keys`, or :func:`missing` when none does."""
    import numpy as np

    keys = set(keys)
    found = []
    for p in fixtures(subdir, pattern):
        with np.load(p) as d:
            if keys <= set(d.files):
                found.append(p)
    if not found:
        missing(f"{REFERENCE_DIR / subdir / pattern} holding {sorted(keys)}")
    return found
