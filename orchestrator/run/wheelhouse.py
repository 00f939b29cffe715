"""Downloading a wheelhouse on the controller: pip, once per platform and list of pins.

The wheelhouse itself (what it is, how it reaches a node) is `orchestrator.resources.wheelhouse`;
this is the part that runs pip, which only apply does (`orch plan` looks in the cache and plans
the download when it is missing). The cache lives under orch's controller cache
(``~/.cache/orch/wheelhouse/<request key>/``), content-checked on every load.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import PlanError
from orchestrator.model.cache import cache_dir, sha256_file
from orchestrator.resources.wheelhouse import (
    MANIFEST,
    NodePlatform,
    Wheel,
    Wheelhouse,
    node_requirements,
)

__all__ = ["build_wheelhouse", "cached_wheelhouse", "default_cache_dir", "ensure_wheelhouse"]

PIP_TIMEOUT = 900.0


def default_cache_dir() -> Path:
    return cache_dir() / "wheelhouse"


def _request_key(requirements: Sequence[str], node: NodePlatform) -> str:
    raw = json.dumps({"requirements": sorted(requirements), "platform": node.key,
                      "tags": node.pip_platforms()}, sort_keys=True)
    return f"{node.key}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def _load(directory: Path) -> Wheelhouse | None:
    """A cached wheelhouse whose manifest and files agree (by size), else None."""
    try:
        raw = json.loads((directory / MANIFEST).read_text())
        wheels = tuple(Wheel(w["filename"], w["sha256"], int(w["size"])) for w in raw["wheels"])
        node = NodePlatform(**raw["platform"])
        requirements = tuple(raw["requirements"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for wheel in wheels:
        try:
            if (directory / wheel.filename).stat().st_size != wheel.size:
                return None
        except OSError:
            return None
    return Wheelhouse(directory, node, requirements, wheels)


def cached_wheelhouse(requirements: Sequence[str], node: NodePlatform,
                      cache_dir: Path | None = None) -> Wheelhouse | None:
    """The wheelhouse for ``requirements`` on ``node`` if this controller has it: no pip.

    What `orch plan` uses: a read-only plan never downloads; a missing wheelhouse is a
    planned change that `orch apply` carries out with `build_wheelhouse`.
    """
    root = cache_dir or default_cache_dir()
    return _load(root / _request_key(node_requirements(requirements, node.system), node))


def build_wheelhouse(requirements: Sequence[str], node: NodePlatform,
                     cache_dir: Path | None = None, *, python: str = sys.executable,
                     timeout: float = PIP_TIMEOUT) -> Wheelhouse:
    """Download (once) every wheel ``requirements`` need on ``node``; reuse the cache after.

    Blocking (a subprocess); `ensure_wheelhouse` runs it in a thread. Raises PlanError with
    pip's own message when a wheel does not exist for the platform.
    """
    root = cache_dir or default_cache_dir()
    requirements = node_requirements(requirements, node.system)
    final = root / _request_key(requirements, node)
    cached = _load(final)
    if cached is not None:
        return cached
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        argv = [python, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
                "--only-binary=:all:", "--dest", str(staging), "--implementation", "cp",
                "--python-version", node.python]
        for tag in node.pip_platforms():
            argv += ["--platform", tag]
        done = subprocess.run([*argv, *requirements], capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
            raise PlanError(f"pip download for {node.key} failed: "
                            + ("; ".join(errors) or done.stderr.strip()[-1500:]))
        wheels = tuple(sorted(Wheel(p.name, sha256_file(p), p.stat().st_size)
                              for p in staging.iterdir() if p.name.endswith(".whl")))
        manifest = {"requirements": list(requirements), "wheels": [vars(w) for w in wheels],
                    "platform": vars(node)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if final.exists() and _load(final) is None:  # damaged (a file changed or went)
            shutil.rmtree(final, ignore_errors=True)
        try:
            staging.rename(final)
        except OSError:  # another run finished the same download first: use that one
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result = _load(final)
    if result is None:
        raise PlanError(f"the wheelhouse in {final} is incomplete; remove it and retry")
    return result


async def ensure_wheelhouse(requirements: Sequence[str], node: NodePlatform,
                            cache_dir: Path | None = None) -> Wheelhouse:
    return await asyncio.to_thread(build_wheelhouse, requirements, node, cache_dir)
