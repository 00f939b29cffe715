"""The inventory's `ssh:` block (issue #17): a cluster file that needs no SSH flags.

* The sandbox's own cluster file plans with no flags: its inventory names its known_hosts.
* `proxy_jump`: every host is reached through the jump host (a second simulated Mac); with
  the jump host stopped the same inventory cannot reach them, so the jump is really used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.simulator import cluster as sandbox_cluster
from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, start_hosts, stop_hosts


def test_the_sandbox_cluster_file_plans_with_no_flags(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # 127.0.0.45-47, not the sandbox's own .41-.43: the e2e tests' sandbox may be up meanwhile.
    monkeypatch.setattr(sandbox_cluster, "ADDRESS_BASE", 45)
    directory = tmp_path / "sandbox"
    sandbox_cluster.up(directory, nodes=3)  # hosts, hub and files; no apply
    try:
        status = CliRunner().invoke(main, ["sandbox", "status", "--json", "--dir",
                                           str(directory)])
        assert status.exit_code == 0, status.output
        cluster_file = json.loads(status.stdout)["cluster_file"]
        result = CliRunner().invoke(main, ["plan", cluster_file])
        assert result.exit_code == 0, result.output
        assert "UNREACHABLE" not in result.stdout
        assert "mac1" in result.stdout and "mac3" in result.stdout
    finally:
        CliRunner().invoke(main, ["sandbox", "down", "--dir", str(directory)])


@pytest.fixture
def jump_and_target(tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[tuple[RunningHost, RunningHost]]:
    hosts = start_hosts(tmp_path_factory.mktemp("jump"), [
        HostSpec("jump", 64 * GIB, "Apple M4 Pro", address="127.0.0.91"),
        HostSpec("inner", 64 * GIB, "Apple M4 Pro", address="127.0.0.92")])
    try:
        yield hosts[0], hosts[1]
    finally:
        stop_hosts(hosts)


def test_proxy_jump_reaches_hosts_through_the_jump_host(
        tmp_path: Path, jump_and_target: tuple[RunningHost, RunningHost]) -> None:
    jump, inner = jump_and_target
    (tmp_path / "inv.yml").write_text(
        f"ssh:\n  known_hosts: {inner.known_hosts_file}\n  connect_timeout: 5\n"
        f"  proxy_jump: {jump.user}@{jump.address}:{jump.port}\n"
        + inventory_yaml([inner]))
    (tmp_path / "cluster.yml").write_text("name: jumped\ninventory: inv.yml\n")
    reached = CliRunner().invoke(main, ["facts", str(tmp_path / "cluster.yml"), "inner"])
    assert reached.exit_code == 0, reached.output
    assert "unreachable" not in json.loads(reached.stdout)["inner"]

    jump.stop()
    unreachable = CliRunner().invoke(main, ["plan", str(tmp_path / "cluster.yml")])
    assert unreachable.exit_code == 3, unreachable.output
    assert (f"cannot connect to {jump.address}:{jump.port} (the inventory's ssh.proxy_jump)"
            in unreachable.output)
