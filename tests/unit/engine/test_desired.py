"""What a cluster file turns into, per host, before any host is contacted."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import load_cluster
from orchestrator.placement.intent import Intent
from orchestrator.plan.desired import desired_state
from orchestrator.resources.pyenv import PythonEnv


def test_a_cluster_without_a_model_installs_no_python_environment(tmp_path: Path) -> None:
    """Issue #14 (and #13 item 5): a task-only cluster declares its tasks and nothing else,
    so it can never claim, or remove, the venv a serving cluster's workers run from."""
    (tmp_path / "cluster.yml").write_text(
        "name: chores\n"
        "hosts:\n"
        "  a: {address: 127.0.0.1, ring_ip: 10.0.0.1, memory_gb: 16}\n"
        "  b: {address: 127.0.0.2, ring_ip: 10.0.0.2, memory_gb: 16}\n"
        "tasks:\n"
        "  - name: scratch\n"
        "    directory: {path: ~/scratch, mode: '0755'}\n")
    cluster = load_cluster(tmp_path / "cluster.yml")
    desired = desired_state(cluster, Intent(), ["a", "b"])
    assert {name: [r.id for r in resources] for name, resources in desired.items()} == {
        "a": ["directory:~/scratch"], "b": ["directory:~/scratch"]}
    assert not any(isinstance(r, PythonEnv) for rs in desired.values() for r in rs)
