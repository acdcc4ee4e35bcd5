"""The Hugging Face hub: its cache, one bounded reachability probe, and downloads into the cache.

Used for the CRM checkpoints (`pipeline.weights.resolve`) and for auxiliary models (the evaluation's
LPIPS and CLIP) through :func:`hub_file`: local cache first, then a download (progress bar; a dropped
connection resumes) unless ``HF_HUB_OFFLINE=1`` or the caller forbids it.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from huggingface_hub import hf_hub_download, try_to_load_from_cache

from pipeline.weights.errors import WeightsError, WeightsNotFoundError

OFFICIAL_REPO = "Zhengyi/CRM"
# One request to the hub before downloading: an unreachable hub ends the run in seconds.
HUB_PROBE_TIMEOUT_S = 5.0


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_lookup(repo: str, filename: str, revision: str | None) -> tuple[Path, str | None] | None:
    """A file from the local hub cache (no network): (path, commit hash) or None."""

    cache = hub_cache_dir()
    try:
        found = try_to_load_from_cache(repo, filename, cache_dir=str(cache), revision=revision)
    except Exception:
        found = None
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    if isinstance(found, str) and os.path.isfile(found):
        p = Path(found)
        return p, p.parent.name if p.parent.parent.name == "snapshots" else revision
    # Fallback: any snapshot holding the file (newest first), e.g. a cache without refs/.
    snaps = repo_dir / "snapshots"
    if snaps.is_dir() and revision is None:
        cands = [s / filename for s in snaps.iterdir() if (s / filename).is_file()]
        if cands:
            best = max(cands, key=lambda p: p.stat().st_mtime)
            return best, best.parent.name
    return None


def hub_endpoint() -> str:
    """The Hugging Face endpoint (``$HF_ENDPOINT``, read at call time; default https://huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hub_unreachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers within `timeout_s` (any HTTP status counts), else the reason.

    One request, no retries, name resolution included in the bound (it runs in a worker thread):
    huggingface_hub's own retries take ~25 s per file before giving up on an unreachable hub.
    """

    url = f"{hub_endpoint()}/api/models/{OFFICIAL_REPO}"

    def probe() -> str | None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
                return None
        except urllib.error.HTTPError:
            return None  # it answered
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"{hub_endpoint()} is unreachable ({reason})"

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hub-probe")
    try:
        return pool.submit(probe).result(timeout=timeout_s + 1.0)
    except concurrent.futures.TimeoutError:
        return f"{hub_endpoint()} did not answer within {timeout_s:.0f} s"
    finally:
        pool.shutdown(wait=False)


class HubAccess:
    """Downloads for one resolve: allowed or not, and the hub probed at most once."""

    def __init__(self, allowed: bool):
        self.allowed = allowed and not hub_offline()
        self.blocked: str | None = (
            None
            if self.allowed
            else ("HF_HUB_OFFLINE is set" if hub_offline() else "downloads are off (--offline)")
        )
        self._probed = False

    def can_download(self) -> bool:
        if self.allowed and not self._probed:
            self._probed = True
            self.blocked = hub_unreachable()
        return self.allowed and self.blocked is None

    def download(
        self, repo: str, filename: str, revision: str | None, size_hint: str = ""
    ) -> tuple[Path, str | None]:
        """`filename` of `repo` into the hub cache with a progress bar. A dropped connection is resumed
        where it stopped (a Range request); xet-backed files also reuse the local chunk cache on a rerun."""

        hint = f" ({size_hint})" if size_hint else ""
        print(f"downloading {repo}/{filename}{hint} into {hub_cache_dir()}", file=sys.stderr, flush=True)
        try:
            p = Path(
                hf_hub_download(
                    repo, filename, revision=revision, cache_dir=str(hub_cache_dir()), endpoint=hub_endpoint()
                )
            )
        except Exception as exc:
            raise WeightsError(
                f"download of {repo}/{filename} failed: {type(exc).__name__}: {exc}\n"
                f"Rerun to resume it, or fetch it by hand: hf download {repo} {filename}"
            ) from exc
        return p, p.parent.name


def hub_file(
    repo: str,
    filename: str,
    *,
    revision: str | None = None,
    allow_download: bool = True,
    what: str = "",
    local_flag: str = "",
) -> Path:
    """One file of a Hugging Face repo: the local hub cache, else a download into it (unless offline).

    The same resolution order as the CRM weights, for auxiliary models (evaluation's CLIP and LPIPS).

    Raises:
        WeightsNotFoundError: not cached and not downloadable; the message names the repo, the file,
            the ``hf download`` command and `local_flag` (the option that takes a local file).
    """
    hit = hub_lookup(repo, filename, revision)
    if hit is not None:
        return hit[0]
    hub = HubAccess(allow_download)
    if hub.can_download():
        return hub.download(repo, filename, revision)[0]
    label = f"{what} " if what else ""
    lines = [
        f"{label}weights not found: {repo}/{filename} is not in the Hugging Face cache ({hub_cache_dir()}) "
        f"and was not downloaded ({hub.blocked}).",
        f"Fetch it on a machine with network access: hf download {repo} {filename}",
    ]
    if local_flag:
        lines.append(f"or pass a local copy with {local_flag} PATH.")
    raise WeightsNotFoundError("\n".join(lines), [filename])
