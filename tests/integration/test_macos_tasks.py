"""`sysctl:` and `launchd:` tasks on real sshd hosts: applied, then "No changes.", then each
drift made on a host shows in the plan as exactly that change, on that host.

Two simulated Macs of their own (127.0.0.220-221). The job's plist is written by a template
task and its label read from it; the wired limit is set through the `sudo` stand-in. Then
`persist: true` is shown to survive a simulated reboot (its LaunchDaemon sets the value at
boot; the user job, as on a Mac, does not come back), and switching it off removes the daemon.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, reboot, start_hosts, stop_hosts
from tests.fixtures import clusters
from tests.fixtures.cli import orch

LABEL = "com.example.peers"
PLIST = f"~/Library/LaunchAgents/{LABEL}.plist"
TEMPLATE = Path(__file__).resolve().parents[2] / "bench" / "peers_workload" / "templates" \
    / "service.plist.j2"
DAEMON = "com.orch.sysctl.iogpu.wired_limit_mb.plist"


def tasks(persist: bool = False) -> str:
    return f"""\
runtime:
  packages: []
tasks:
  - name: service plist
    template: {{src: service.plist.j2, dest: {PLIST}}}
    vars: {{label: {LABEL}}}
  - name: service loaded
    launchd: {{plist: {PLIST}}}
  - name: GPU wired limit
    sysctl: {{name: iogpu.wired_limit_mb, value: 49152, persist: {str(persist).lower()}}}
"""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningHost]]:
    running = start_hosts(tmp_path_factory.mktemp("macos-task-hosts"), [
        HostSpec(f"mt{i}", 64 * GIB, "Apple M4 Pro", address=f"127.0.0.{220 + i}")
        for i in range(2)])
    try:
        yield running
    finally:
        stop_hosts(running)


def on_host(host: RunningHost, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.ssh_argv("sh", "-c", f"'{script}'"), capture_output=True,
                          text=True, timeout=60, check=False)


def wired(host: RunningHost) -> str:
    return on_host(host, "sysctl -n iogpu.wired_limit_mb").stdout.strip()


def job_pid(host: RunningHost) -> int | None:
    """The job's pid, or None when launchd does not know it."""
    printed = on_host(host, f'launchctl print "user/$(id -u)/{LABEL}"')
    if printed.returncode != 0:
        return None
    pids = [line.split("=")[1].strip() for line in printed.stdout.splitlines()
            if line.strip().startswith("pid =")]
    return int(pids[0]) if pids else 0


def gone(host: RunningHost) -> None:
    """Wait until launchd has forgotten the job: bootout returns before it is gone, as on a
    Mac (a plan meanwhile still sees it loaded, rightly)."""
    deadline = time.monotonic() + 30
    while job_pid(host) is not None:
        assert time.monotonic() < deadline, f"{host.name}: {LABEL} still loaded after bootout"
        time.sleep(0.1)


def planned(cluster: Path, known: Path) -> dict[str, list[tuple[str, str, Any]]]:
    """Per host: each change's resource, action and fields, as `orch plan --json` says."""
    ran = orch("plan", cluster, "--json", known_hosts=known)
    assert ran.returncode == 0, ran.output
    plan = json.loads(ran.stdout)
    return {h["host"]: [(c["resource"], c["action"],
                         [(f["name"], f["before"], f["after"]) for f in c["fields"]])
                        for c in h["changes"]] for h in plan["hosts"]}


def converge(cluster: Path, known: Path) -> None:
    applied = orch("apply", cluster, "--yes", known_hosts=known)
    assert applied.returncode == 0, applied.output
    again = orch("plan", cluster, "--detailed-exitcode", known_hosts=known)
    assert again.returncode == 0, again.output  # converged: no changes


def test_converged_then_each_drift_is_exactly_that(tmp_path: Path,
                                                   hosts: list[RunningHost]) -> None:
    known = hosts[0].known_hosts_file
    (tmp_path / "service.plist.j2").write_text(TEMPLATE.read_text())
    cluster = clusters.write_cluster(tmp_path, "macostasks", tasks(), hosts=hosts)
    converge(cluster, known)
    for host in hosts:
        assert wired(host) == "49152"
        assert job_pid(host)  # loaded and running (KeepAlive)

    # The Mac's limit reset (as a reboot does) on one host, the job booted out on the other.
    first, second = hosts
    assert on_host(first, "sudo -n sysctl -w iogpu.wired_limit_mb=0").returncode == 0
    assert on_host(second, f'launchctl bootout "user/$(id -u)/{LABEL}"').returncode == 0
    gone(second)
    assert planned(cluster, known) == {
        first.name: [("sysctl:iogpu.wired_limit_mb", "update",
                      [("value", "0", "49152")])],
        second.name: [(f"launchd:user/{LABEL}", "create",
                       [("state", "not_loaded", "loaded")])],
    }
    converge(cluster, known)
    assert wired(first) == "49152"
    assert job_pid(second)

    # The plist changes: the file is written, then the job reloaded.
    before = {h.name: job_pid(h) for h in hosts}
    (tmp_path / "service.plist.j2").write_text(TEMPLATE.read_text().replace("86400", "86401"))
    plan = planned(cluster, known)
    for host in hosts:
        assert [(r, a) for r, a, _ in plan[host.name]] == [
            (f"file:{PLIST}", "update"), (f"launchd:user/{LABEL}", "update")]
    converge(cluster, known)
    for host in hosts:
        pid = job_pid(host)
        assert pid and pid != before[host.name]  # a new process: reloaded from the new plist
        assert "86401" in on_host(host, f"cat {PLIST}").stdout


def test_persist_survives_a_reboot_and_is_removed_when_switched_off(
        tmp_path: Path, hosts: list[RunningHost]) -> None:
    known = hosts[0].known_hosts_file
    (tmp_path / "service.plist.j2").write_text(TEMPLATE.read_text())
    cluster = clusters.write_cluster(tmp_path, "macostasks", tasks(persist=True), hosts=hosts)
    converge(cluster, known)
    first, second = hosts
    assert (first.launch_daemons_dir / DAEMON).is_file()

    reboot(first)
    assert wired(first) == "49152"  # set at boot by the daemon
    # The user job is gone with the reboot (user agents need a login), and only that shows.
    assert planned(cluster, known) == {
        first.name: [(f"launchd:user/{LABEL}", "create", [("state", "not_loaded", "loaded")])],
        second.name: [],
    }
    converge(cluster, known)

    cluster.write_text(cluster.read_text().replace("persist: true", "persist: false"))
    plan = planned(cluster, known)
    for host in hosts:
        assert plan[host.name] == [
            ("sysctl-persisted:iogpu.wired_limit_mb", "delete", [("declared", True, False)])]
    converge(cluster, known)
    for host in hosts:
        assert not (host.launch_daemons_dir / DAEMON).exists()
        assert wired(host) == "49152"  # the value stays until the next reboot
