"""The import contracts in pyproject.toml hold, and they catch the back-imports orch once had.

`lint-imports` runs in CI (scripts/test); these tests prove the contracts are not vacuous: each
back-import that used to exist (or would recreate a cycle) is put back into a copy of the
package, and the contracts must then fail, naming it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")

# (module file, the line that would reach back up the chain, the layers it would break)
BACK_IMPORTS = [
    # resources/model_files ↔ the sync's schedule: the cycle hidden behind TYPE_CHECKING
    ("orchestrator/resources/model_files.py", "import orchestrator.plan.sources",
     "orchestrator.resources is not allowed to import orchestrator.plan"),
    # the model's manifest getting its Hub client from placement
    ("orchestrator/model/manifest.py", "import orchestrator.placement.adapter",
     "orchestrator.model is not allowed to import orchestrator.placement"),
    # the ring pass reading the controller's HTTP client
    ("orchestrator/plan/ring.py", "import orchestrator.verify.health",
     "orchestrator.plan is not allowed to import orchestrator.verify"),
    # placement taking facts, before any host was contacted
    ("orchestrator/placement/adapter.py", "import orchestrator.facts",
     "orchestrator.placement is not allowed to import orchestrator.facts"),
    # the engine reaching into the sandbox
    ("orchestrator/run/engine.py", "import orchestrator.simulator.hosts",
     "orchestrator.run is not allowed to import orchestrator.simulator"),
    # apply reading the renderer
    ("orchestrator/run/apply.py", "import orchestrator.render",
     "orchestrator.run is not allowed to import orchestrator.render"),
    # node-side code importing the controller
    ("orchestrator/agent/transfer.py", "import orchestrator.errors",
     "orchestrator.agent is not allowed to import orchestrator.errors"),
    ("orchestrator/worker/mlx_worker.py", "import orchestrator.verify.health",
     "orchestrator.worker is not allowed to import orchestrator.verify"),
    # a resource talking to hosts
    ("orchestrator/resources/files.py", "import orchestrator.executor",
     "orchestrator.resources is not allowed to import orchestrator.executor"),
    ("orchestrator/status.py", "import asyncssh",
     "orchestrator.status is not allowed to import asyncssh"),
]


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def copy_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "orchestrator", root / "orchestrator",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_package() -> None:
    result = lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ", 0 broken." in result.stdout


@pytest.mark.parametrize(("module", "line", "message"), BACK_IMPORTS,
                         ids=[m.removeprefix("orchestrator/") for m, _, _ in BACK_IMPORTS])
def test_a_back_import_breaks_a_contract(tmp_path: Path, module: str, line: str,
                                         message: str) -> None:
    root = copy_repo(tmp_path)
    target = root / module
    target.write_text(target.read_text() + f"\n{line}  # noqa\n")
    result = lint(root)
    assert result.returncode != 0, result.stdout
    assert message in " ".join(result.stdout.split()), result.stdout
