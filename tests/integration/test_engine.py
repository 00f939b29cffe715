"""The convergence engine end to end on real sshd hosts: plan = apply, drift, exit codes, lock.

Every `orch` invocation here is the real CLI (`tests.fixtures.cli`), so exit codes, output and
the absence of tracebacks are what a user would see; the concurrent apply runs in a process of
its own.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

from orchestrator.config import load_cluster
from orchestrator.errors import HostError
from orchestrator.executor import Connection, SSHOptions
from orchestrator.run import engine
from orchestrator.run.apply import HostStatus
from orchestrator.run.engine import RunOptions, plan
from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import HostSpec, RunningHost, start_hosts, stop_hosts
from tests.fixtures import clusters
from tests.fixtures.cli import orch
from tests.integration.conftest import TreeHash, exec_channels_logged, sshd_log

GIB = 1024**3
ODD = "va lue 'q' \"dq\" $(touch /tmp/orch-pwned) ; echo x"


def write_cluster(directory: Path, hosts: Sequence[RunningHost], extra_tasks: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "motd.j2").write_text("{{ host.name }} serves {{ cluster }}: {{ odd }}\n")
    return clusters.write_cluster(directory, "itest", f"""\
runtime:
  packages: []
tasks:
  - name: config dir
    directory: {{path: "~/conf dir", mode: "0750"}}
  - name: motd
    template: {{src: motd.j2, dest: "~/conf dir/motd; $(x).txt", mode: "0640"}}
    vars: {{odd: {json.dumps(ODD)}}}
  - name: marker
    command: [touch, "made it"]
    creates: "~/made it"
{extra_tasks}""", hosts=hosts, ring_ips=[f"10.9.0.{i + 1}" for i in range(len(hosts))])


@pytest.fixture(scope="module")
def cluster(test_hosts: list[RunningHost], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cluster(tmp_path_factory.mktemp("engine"), test_hosts)


@pytest.fixture(scope="module")
def known(test_hosts: list[RunningHost]) -> Path:
    return test_hosts[0].known_hosts_file


def changes_of(plan_json: dict[str, object]) -> list[tuple[str, str, str]]:
    return [(h["host"], c["resource"], c["action"])  # type: ignore[index]
            for h in plan_json["hosts"] for c in h["changes"]]  # type: ignore[attr-defined]


def test_check_predicts_apply_exactly_then_plan_is_clean(
    cluster: Path, known: Path, test_hosts: list[RunningHost], tree_hash: TreeHash
) -> None:
    before = [tree_hash(h, "home") for h in test_hosts]
    check = orch("apply", cluster, "--check", "--detailed-exitcode", "--json", known_hosts=known)
    assert check.returncode == 2, check.stderr
    assert [tree_hash(h, "home") for h in test_hosts] == before, "--check changed a host"
    predicted = json.loads(check.stdout)

    applied = orch("apply", cluster, "--yes", "--json", known_hosts=known)
    assert applied.returncode == 0, applied.stderr
    result = json.loads(applied.stdout)
    assert changes_of(result["plan"]) == changes_of(predicted)
    assert result["plan"]["hosts"] == predicted["hosts"]
    done = {o["host"]: o["applied"] for o in result["outcome"]["hosts"]}
    for host in predicted["hosts"]:
        assert done[host["host"]] == [c["resource"] for c in host["changes"]]

    for host in test_hosts:
        motd = host.home / "conf dir" / "motd; $(x).txt"
        assert motd.read_text() == f"{host.name} serves itest: {ODD}\n"
        assert (host.home / "made it").exists()
    assert not Path("/tmp/orch-pwned").exists()

    again = orch("plan", cluster, "--detailed-exitcode", known_hosts=known)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "No changes. 3 hosts match the cluster file." in again.stdout


def test_drift_on_one_host_names_exactly_that_file(
    cluster: Path, known: Path, test_hosts: list[RunningHost]
) -> None:
    assert orch("apply", cluster, "--yes", known_hosts=known).returncode == 0
    victim = test_hosts[1]
    (victim.home / "conf dir" / "motd; $(x).txt").write_text("edited by hand\n")
    drift = orch("plan", cluster, "--detailed-exitcode", "--json", known_hosts=known)
    assert drift.returncode == 2
    assert changes_of(json.loads(drift.stdout)) == [
        (victim.name, "file:~/conf dir/motd; $(x).txt", "update")]
    text = orch("plan", cluster, known_hosts=known).stdout
    assert f"{victim.name}:\n  ~ file:~/conf dir/motd; $(x).txt" in text
    assert "Plan: 0 to add, 1 to change, 0 to destroy on 1 of 3 hosts." in text
    diff = orch("plan", cluster, "--diff", known_hosts=known).stdout
    assert "      -edited by hand\n" in diff
    assert f"      +{victim.name} serves itest: {ODD}\n" in diff
    assert orch("apply", cluster, "--yes", known_hosts=known).returncode == 0
    assert orch("plan", cluster, "--detailed-exitcode", known_hosts=known).returncode == 0


def test_saved_plan_applies_exactly_or_refuses(
    cluster: Path, known: Path, test_hosts: list[RunningHost], tmp_path: Path
) -> None:
    assert orch("apply", cluster, "--yes", known_hosts=known).returncode == 0
    target = test_hosts[0].home / "made it"
    target.unlink()
    saved = tmp_path / "plan.json"
    assert orch("plan", cluster, "--out", saved, known_hosts=known).returncode == 0
    (test_hosts[2].home / "made it").unlink()  # the hosts change after the plan was made
    stale = orch("apply", saved, known_hosts=known)
    assert stale.returncode == 1
    assert "the hosts changed since the plan was made" in stale.stderr
    assert not target.exists(), "a stale plan must apply nothing"
    assert orch("plan", cluster, "--out", saved, known_hosts=known).returncode == 0
    assert orch("apply", saved, known_hosts=known).returncode == 0
    assert target.exists()
    assert orch("plan", cluster, "--detailed-exitcode", known_hosts=known).returncode == 0


def test_removed_task_is_cleaned_up(
    cluster: Path, known: Path, test_hosts: list[RunningHost], tmp_path: Path
) -> None:
    bigger = write_cluster(tmp_path, test_hosts, extra_tasks=(
        "  - name: extra\n    template: {src: motd.j2, dest: ~/extra.txt}\n"
        "    vars: {odd: x}\n"))
    assert orch("apply", bigger, "--yes", known_hosts=known).returncode == 0
    assert all((h.home / "extra.txt").exists() for h in test_hosts)
    shrink = orch("plan", cluster, "--json", known_hosts=known)
    assert changes_of(json.loads(shrink.stdout)) == [
        (h.name, "file:~/extra.txt", "delete") for h in sorted(test_hosts, key=lambda h: h.name)]
    assert orch("apply", cluster, "--yes", known_hosts=known).returncode == 0
    assert not any((h.home / "extra.txt").exists() for h in test_hosts)
    assert orch("plan", cluster, "--detailed-exitcode", known_hosts=known).returncode == 0


def test_a_converged_apply_and_plan_open_one_ssh_channel_per_host(
    cluster: Path, known: Path, test_hosts: list[RunningHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lock, facts and unlock of a converged cluster's apply (a plan's facts) travel over one
    exec channel per host, the agent session: counted by the executor and by each sshd."""
    assert orch("apply", cluster, "--yes", known_hosts=known).returncode == 0
    one_each = {h.name: 1 for h in test_hosts}

    def log_ends() -> dict[str, int]:
        return {h.name: sshd_log(h).stat().st_size for h in test_hosts}

    def channels_since(ends: dict[str, int]) -> dict[str, int]:
        return {h.name: exec_channels_logged(h, ends[h.name]) for h in test_hosts}

    for command in (["apply", "--yes"], ["plan", "--detailed-exitcode"]):  # as a user runs it
        ends = log_ends()
        assert orch(command[0], cluster, *command[1:], known_hosts=known).returncode == 0
        assert channels_since(ends) == one_each, command

    counted: dict[str, int] = {}
    real_close_all = engine.close_all

    async def counting_close_all(conns: Iterable[Connection | HostError]) -> None:
        live = list(conns)
        counted.update({c.name: c.round_trips for c in live if not isinstance(c, HostError)})
        await real_close_all(live)

    monkeypatch.setattr(engine, "close_all", counting_close_all)
    options = RunOptions(ssh=SSHOptions(known_hosts=known))
    ends = log_ends()
    current, report = asyncio.run(engine.apply(load_cluster(cluster), options))
    assert not current.has_changes and {o.status for o in report.outcomes} == {HostStatus.OK}
    assert counted == one_each and channels_since(ends) == one_each
    ends = log_ends()
    assert asyncio.run(plan(load_cluster(cluster), options))[1] == one_each
    assert channels_since(ends) == one_each


def test_unknown_host_key_is_refused_with_how_to(cluster: Path, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    proc = orch("plan", cluster, known_hosts=empty)
    assert proc.returncode == 3
    assert "--accept-new-host-keys" in proc.stdout + proc.stderr
    assert empty.read_text() == ""


def test_concurrent_apply_exits_4_naming_the_holder(
    cluster: Path, known: Path, test_hosts: list[RunningHost], tmp_path: Path
) -> None:
    slow = write_cluster(tmp_path, test_hosts, extra_tasks=(
        "  - name: slow\n    command: [sleep, '4']\n    unless: [test, -e, ~/never]\n"))
    argv = [sys.executable, "-m", "orchestrator", "apply", str(slow), "--yes",
            "--known-hosts", str(known)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock_dir = test_hosts[0].home / ".orch" / "locks" / "itest"
        deadline = time.monotonic() + 60
        while not lock_dir.exists():
            assert time.monotonic() < deadline, "first apply never took the lock"
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = orch("apply", cluster, "--yes", known_hosts=known)
        assert second.returncode == 4, second.stderr
        assert f"held by {getpass.getuser()}@{socket.gethostname()}" in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert not (test_hosts[0].home / ".orch" / "locks" / "itest").exists()


@pytest.fixture
def doomed_host(tmp_path: Path) -> Iterator[RunningHost]:
    [host] = start_hosts(tmp_path / "doomed", [HostSpec("mini-doomed", 64 * GIB, "Apple M4 Pro",
                                                         address="127.0.0.19")])
    try:
        yield host
    finally:
        stop_hosts([host])


def test_stopped_host_is_unreachable_and_the_others_converge(
    test_hosts: list[RunningHost], doomed_host: RunningHost, tmp_path: Path
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("\n".join(h.known_hosts_line for h in [*test_hosts, doomed_host]) + "\n")
    cluster = write_cluster(tmp_path / "c", [*test_hosts, doomed_host])
    (test_hosts[0].home / "made it").unlink(missing_ok=True)
    doomed_host.stop()
    proc = orch("apply", cluster, "--yes", known_hosts=known)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "mini-doomed: unreachable" in proc.stdout
    assert (test_hosts[0].home / "made it").exists()
    plan_proc = orch("plan", cluster, "--detailed-exitcode", known_hosts=known)
    assert plan_proc.returncode == 3
    assert "mini-doomed: UNREACHABLE" in plan_proc.stdout


def test_a_dead_runs_lock_is_removed_with_its_nonce(
    cluster: Path, known: Path, test_hosts: list[RunningHost]
) -> None:
    lock = test_hosts[1].home / ".orch" / "locks" / "itest"
    lock.mkdir(parents=True)
    (lock / "holder.json").write_text(json.dumps(
        {"who": "ghost@elsewhere", "pid": 4242, "since": 0, "nonce": "deadbeef",
         "command": "apply cluster.yml"}))
    blocked = orch("apply", cluster, "--yes", known_hosts=known)
    assert blocked.returncode == 4
    assert "held by ghost@elsewhere (pid 4242" in blocked.stderr
    assert "orch unlock --force deadbeef" in blocked.stderr
    assert not (test_hosts[0].home / ".orch" / "locks" / "itest").exists(), \
        "the loser must release the hosts it had already locked"
    wrong = orch("unlock", cluster, "--force", "cafe", known_hosts=known)
    assert wrong.returncode == 0 and lock.exists()
    unlocked = orch("unlock", cluster, "--force", "deadbeef", known_hosts=known)
    assert unlocked.returncode == 0
    assert f"removed lock deadbeef on: {test_hosts[1].name}" in unlocked.stdout
    assert orch("apply", cluster, "--yes", known_hosts=known).returncode == 0


def test_serving_plan_on_a_mac_without_nopasswd_sudo_is_refused_touching_nothing(
    tmp_path: Path, tree_hash: TreeHash
) -> None:
    """Workers are LaunchDaemons: root installs them. A Mac whose `sudo -n` would prompt is
    refused at plan time, naming it and the sudoers line, before anything is written; with
    `launchd_domain: user` (no root needed for a model this small) the same Mac plans."""
    from orchestrator.simulator.tiny_model import make_tiny_deepseek

    model = make_tiny_deepseek(tmp_path / "model", n_layers=4, n_files=2)
    [host] = start_hosts(tmp_path / "hosts", [HostSpec("nosudo", 64 * GIB, "Apple M4 Pro",
                                                       address="127.0.0.24",
                                                       sudo_nopasswd=False)])
    try:
        (tmp_path / "inventory.yml").write_text(inventory_yaml([host]))
        cluster = tmp_path / "serve.yml"
        cluster.write_text(f"name: serve\ninventory: inventory.yml\nmodel:\n  path: {model}\n"
                           "placement:\n  nodes: [nosudo]\n")
        volatile = ("log", "run", "tmp")  # the sshd log, launchd's socket, session temp files
        before = tree_hash(host, "", exclude=volatile)
        refused = orch("plan", cluster, known_hosts=host.known_hosts_file)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "nosudo: `sudo -n` would ask" in refused.stderr
        assert (f"{host.user} ALL=(root) NOPASSWD: /bin/cp {host.home}/.orch/system/com.orch.* "
                "/Library/LaunchDaemons/com.orch.*, ") in refused.stderr
        assert "/bin/launchctl bootstrap system /Library/LaunchDaemons/com.orch.*" \
            in refused.stderr
        assert refused.stdout == ""
        assert tree_hash(host, "", exclude=volatile) == before, "plan changed the host"
        # apply caches orch's agent and takes (then releases) the cluster lock before facts;
        # nothing else
        refused = orch("apply", cluster, "--yes", known_hosts=host.known_hosts_file)
        assert refused.returncode == 1 and "nosudo: `sudo -n` would ask" in refused.stderr
        orch_dir = host.home / ".orch"
        assert sorted(p.name for p in orch_dir.iterdir()) == ["agent", "locks"]
        assert not any((orch_dir / "locks").iterdir()), "the lock was not released"
        shutil.rmtree(orch_dir)
        assert tree_hash(host, "", exclude=volatile) == before, "apply changed the host"

        cluster.write_text(cluster.read_text() + "runtime:\n  launchd_domain: user\n")
        agents = orch("plan", cluster, "--detailed-exitcode", known_hosts=host.known_hosts_file)
        assert agents.returncode == 2, agents.stdout + agents.stderr
    finally:
        stop_hosts([host])
