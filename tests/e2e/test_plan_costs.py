"""What planning a serving cluster costs, and what a second cluster on the same Macs may touch.

On the shared ``serving`` sandbox (see conftest), which every test here leaves converged:
- a converged serving cluster plans in exactly one SSH command per host (issue #11): the ranks'
  state and the wheelhouse are facts of the one ``facts`` request;
- ``orch plan`` never runs pip: with the wheelhouse missing from this controller's cache it
  exits 2 and names it, and downloads nothing;
- ``orch status`` counts each rank's model files verified, and shows each node's preflight;
- a task-only cluster applied, narrowed and removed on the same three Macs never changes a file
  or a process of the serving cluster (issue #13 item 5).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_cluster
from orchestrator.executor import SSHOptions
from orchestrator.run.engine import RunOptions, plan
from tests.e2e.conftest import Serving
from tests.fixtures.cli import orch

# Written by the running worker as it serves: its state, not orch's.
VOLATILE = ("status.json", "worker.log", "hf-cache")


def test_a_converged_serving_cluster_plans_in_one_ssh_command_per_host(
        serving: Serving) -> None:
    options = RunOptions(ssh=SSHOptions(known_hosts=serving.known_hosts))
    result, trips = asyncio.run(plan(load_cluster(serving.cluster_file), options))
    assert not result.has_changes, result.to_json()
    assert trips == {"mac1": 1, "mac2": 1, "mac3": 1}, trips
    # the preflight line of each node (Python, sudo -n, disk) came in that same one command
    assert [(p.host, p.sudo, p.disk_needed) for p in result.preflight] == [
        ("mac1", True, 0), ("mac2", True, 0), ("mac3", True, 0)], result.preflight


def test_plan_with_an_empty_wheelhouse_cache_runs_no_pip_and_names_the_wheelhouse(
        serving: Serving, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    real_run = subprocess.run
    pips: list[list[str]] = []

    def watched(argv: Any, *args: Any, **kwargs: Any) -> Any:
        if any("pip" in str(a) for a in argv):
            pips.append([str(a) for a in argv])
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", watched)
    ran = serving.orch("plan", "--detailed-exitcode")
    assert ran.returncode == 2, ran.output
    assert "wheelhouse" in ran.stdout and "not in this controller's cache" in ran.stdout, \
        ran.stdout
    assert "downloaded by orch apply" in ran.stdout
    assert pips == []
    assert not (cache / "orch" / "wheelhouse").exists()


def test_status_counts_every_ranks_files_verified(serving: Serving) -> None:
    status = serving.orch("status", "--json")
    assert status.returncode == 0, status.output
    nodes = json.loads(status.stdout)["nodes"]
    assert [n["host"] for n in nodes] == ["mac1", "mac2", "mac3"]
    assert all(n["files_total"] and n["files_verified"] == n["files_total"] for n in nodes), nodes
    assert all(n["preflight"]["python_version"] and n["preflight"]["sudo"] is True
               and n["preflight"]["disk_needed"] == 0 for n in nodes), nodes


def serving_state(serving: Serving) -> dict[str, str]:
    """Per host, a hash over everything the serving cluster put there (its directory, models,
    daemon plist, managed record), and the worker's pid."""
    result = {}
    for node in serving.sandbox.nodes:
        root = Path(node["root"])
        digest = hashlib.sha256()
        for top in (root / "home/.orch/serve/sandbox", root / "home/.orch/models",
                    root / "home/.orch/managed/sandbox.json",
                    root / "Library/LaunchDaemons/com.orch.sandbox.worker.plist"):
            paths = [top] if top.is_file() else sorted(
                p for p in top.rglob("*") if not set(p.relative_to(top).parts) & set(VOLATILE))
            assert paths, f"{top} is missing"
            for path in paths:
                digest.update(f"{path.relative_to(root)}\0{path.stat().st_mode:o}\0".encode())
                if path.is_file() and not path.is_symlink():
                    digest.update(path.read_bytes())
        result[node["name"]] = digest.hexdigest()
    status = json.loads(serving.orch("status", "--json").stdout)
    for n in status["nodes"]:
        result[n["host"]] += f" pid {n['pid']}"
    return result


def test_a_task_only_cluster_on_the_same_macs_never_touches_the_serving_one(
        serving: Serving, tmp_path: Path) -> None:
    before = serving_state(serving)
    chores = tmp_path / "chores.yml"

    def write(hosts: str) -> None:
        chores.write_text(
            f"name: chores\ninventory: {serving.directory / 'inventory.yml'}\n"
            "tasks:\n  - name: scratch\n    directory: {path: ~/chores, mode: '0755'}\n"
            f"    hosts: {hosts}\n")

    write("[mac1, mac2, mac3]")
    applied = orch("apply", chores, "--yes", known_hosts=serving.known_hosts)
    assert applied.returncode == 0, applied.output
    assert all(Path(n["root"], "home/chores").is_dir() for n in serving.sandbox.nodes)
    write("[mac1]")  # narrowed: removed from mac2 and mac3 through chores' own record
    narrowed = orch("apply", chores, "--yes", "--json", known_hosts=serving.known_hosts)
    assert narrowed.returncode == 0, narrowed.output
    assert [Path(n["root"], "home/chores").is_dir() for n in serving.sandbox.nodes] == [
        True, False, False]
    chores.write_text(f"name: chores\ninventory: {serving.directory / 'inventory.yml'}\n")
    removed = orch("apply", chores, "--yes", known_hosts=serving.known_hosts)
    assert removed.returncode == 0, removed.output
    assert not any(Path(n["root"], "home/chores").exists() for n in serving.sandbox.nodes)
    assert serving_state(serving) == before
    assert serving.orch("plan", "--detailed-exitcode").returncode == 0
