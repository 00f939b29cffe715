"""launchd services and persisted sysctls on simulated Macs: converge, drift, restart, cleanup."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from orchestrator.executor import Connection, SSHExecutor, SSHOptions, Target
from orchestrator.facts import HostFacts, JobState, LaunchdRef
from orchestrator.plan import HostPlan, diff_host
from orchestrator.resources.base import Resource
from orchestrator.resources.launchd import HASH_ENV, LaunchdService, render_plist
from orchestrator.resources.sysctl import Sysctl
from orchestrator.run.apply import HostOutcome, HostStatus, apply_host
from orchestrator.simulator.hosts import (
    GIB,
    HostSpec,
    RunningHost,
    reboot,
    start_hosts,
    stop_hosts,
)
from tests.fixtures.facts import read_facts

CLUSTER = "services-test"

T = TypeVar("T")


def target(host: RunningHost) -> Target:
    return Target(host.name, host.address, host.port, host.user, host.identity_file)


class Node:
    """Plan/apply resources on one real host over SSH, as the engine does."""

    def __init__(self, host: RunningHost) -> None:
        self.host = host
        self.options = SSHOptions(known_hosts=host.known_hosts_file)

    def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        async def go() -> T:
            async with SSHExecutor(self.options).connect(target(self.host)) as conn:
                return await fn(conn)
        return asyncio.run(go())

    def facts(self, resources: Sequence[Resource]) -> HostFacts:
        return self._run(lambda conn: read_facts(conn, resources, CLUSTER))

    def plan(self, resources: Sequence[Resource]) -> HostPlan:
        return diff_host(CLUSTER, resources, self.facts(resources))

    def apply(self, resources: Sequence[Resource]) -> HostPlan:
        host_plan = self.plan(resources)

        async def fn(conn: Connection) -> HostOutcome:
            return await apply_host(conn, host_plan)
        outcome = self._run(fn)
        assert outcome.status in (HostStatus.OK, HostStatus.CHANGED), outcome.error
        return host_plan


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def service(host: RunningHost, config: str, label: str = "com.orch.test.sleeper") -> LaunchdService:
    plist = render_plist(
        label, [str(host.python3), "-c", "import time\nwhile True: time.sleep(1)"],
        env={"GREETING": "it's \"quoted\" $(x)"}, inputs=[config], throttle_interval=1,
        stdout_path=str(host.home / "sleeper.log"), stderr_path=str(host.home / "sleeper.log"))
    return LaunchdService(label, f"~/Library/LaunchAgents/{label}.plist", plist)


def test_service_starts_restarts_on_config_change_and_is_removed(
    test_hosts: list[RunningHost],
) -> None:
    node = Node(test_hosts[0])
    svc = service(test_hosts[0], "config v1")
    ref = LaunchdRef("user", svc.label)
    first = node.apply([svc])
    assert [c.resource for c in first.changes] == [svc.id]
    job = node.facts([svc]).job(ref)
    assert job.state is JobState.RUNNING and job.pid
    assert job.env["GREETING"] == "it's \"quoted\" $(x)"
    assert node.plan([svc]).changes == ()

    # The worker dies: launchd's KeepAlive brings it back; orch sees a running job again.
    os.kill(job.pid, signal.SIGKILL)
    wait_for(lambda: (j := node.facts([svc]).job(ref)).state is JobState.RUNNING
             and j.pid != job.pid, what="KeepAlive restart")
    assert node.plan([svc]).changes == ()

    # A config the job reads changes: exactly one restart, then no-op.
    v2 = service(test_hosts[0], "config v2")
    change = node.plan([v2]).changes
    assert [(c.resource, sorted(f.name for f in c.fields)) for c in change] == [
        (svc.id, ["config_hash", "plist"])]
    before = node.facts([v2]).job(ref).pid
    node.apply([v2])
    after = node.facts([v2]).job(ref)
    assert after.state is JobState.RUNNING and after.pid != before
    assert node.plan([v2]).changes == ()

    # A run that wrote the plist and died before restarting: the restart is still owed.
    v3 = service(test_hosts[0], "config v3")
    plist_file = test_hosts[0].home / "Library/LaunchAgents" / f"{svc.label}.plist"
    plist_file.write_text(v3.plist)
    owed = node.plan([v3]).changes
    assert [sorted(f.name for f in c.fields) for c in owed] == [["config_hash"]]
    node.apply([v3])
    assert node.facts([v3]).job(ref).env[HASH_ENV] in v3.plist
    assert node.plan([v3]).changes == ()

    # No longer declared: booted out and its plist removed.
    node.apply([])
    assert node.facts([v3]).job(ref).state is JobState.NOT_LOADED
    assert not plist_file.exists()


@pytest.fixture
def spare_host(tmp_path: Path) -> Iterator[RunningHost]:
    [host] = start_hosts(tmp_path / "spare", [HostSpec("studio-spare", 192 * GIB,
                                                       address="127.0.0.29")])
    try:
        yield host
    finally:
        stop_hosts([host])


def test_wired_limit_is_set_and_survives_a_reboot(spare_host: RunningHost) -> None:
    node = Node(spare_host)
    wired = Sysctl("iogpu.wired_limit_mb", 180_000, "com.orch.wired-limit")
    plan = node.apply([wired])
    assert [(f.name, f.before) for f in plan.changes[0].fields] == [
        ("value", "0"), ("persisted by", None)]
    assert node.facts([wired]).sysctl["iogpu.wired_limit_mb"] == "180000"
    assert (spare_host.launch_daemons_dir / "com.orch.wired-limit.plist").exists()
    assert node.plan([wired]).changes == ()

    reboot(spare_host)
    wait_for(lambda: node.facts([wired]).sysctl["iogpu.wired_limit_mb"] == "180000",
             what="the LaunchDaemon to restore the wired limit")
    assert node.plan([wired]).changes == ()

    # Lowered by hand: drift on the value only, repaired without touching the daemon.
    subprocess.run(spare_host.ssh_argv("sudo", "sysctl", "-w", "iogpu.wired_limit_mb=1000"),
                   check=True, capture_output=True, timeout=30)
    drift = node.plan([wired]).changes
    assert [[(f.name, f.before, f.after) for f in c.fields] for c in drift] == [
        [("value", "1000", "180000")]]
    assert [s.op for s in drift[0].steps] == ["run"]
    node.apply([wired])
    assert node.plan([wired]).changes == ()

    node.apply([])  # no longer declared: the value is reset and the daemon removed
    assert node.facts([wired]).sysctl["iogpu.wired_limit_mb"] == "0"
    assert not (spare_host.launch_daemons_dir / "com.orch.wired-limit.plist").exists()


def test_after_a_reboot_daemons_come_back_agents_do_not(spare_host: RunningHost) -> None:
    """What a Mac does at boot: /Library/LaunchDaemons load (a KeepAlive worker daemon runs
    again, as its UserName, and the wired-limit daemon restores the limit); jobs bootstrapped
    into user/<uid> over SSH are forgotten."""
    node = Node(spare_host)
    home, user = str(spare_host.home), spare_host.user
    report = f"{home}/daemon.env"
    code = ("import json, os, time; json.dump({k: os.environ.get(k) for k in "
            "('HOME', 'USER', 'ORCH_SIM_EUID')} | {'pid': os.getpid()}, "
            f"open({report!r}, 'w')); time.sleep(600)")
    label = "com.orch.test.daemon"
    daemon = LaunchdService(
        label, f"/Library/LaunchDaemons/{label}.plist",
        render_plist(label, ["/usr/bin/python3", "-c", code], env={"HOME": home, "USER": user},
                     throttle_interval=1, background=False, user_name=user),
        "system", staged=f"~/.orch/system/{label}.plist")
    agent = service(spare_host, "agent", label="com.orch.test.agent")
    wired = Sysctl("iogpu.wired_limit_mb", 180_000, "com.orch.wired-limit")
    resources = [wired, daemon, agent]
    node.apply(resources)
    assert node.plan(resources).changes == ()
    printed = subprocess.run(spare_host.ssh_argv("launchctl", "print", f"system/{label}"),
                             capture_output=True, text=True, check=True, timeout=30).stdout
    assert "\tresource coalition = {\n\t\tID = " in printed and "\t\tstate = active\n" in printed
    first = Path(report).read_text()

    reboot(spare_host)
    wait_for(lambda: Path(report).read_text() != first, what="the daemon to start at boot")
    facts = node.facts(resources)
    assert facts.job(daemon.ref).state is JobState.RUNNING
    assert facts.job(agent.ref).state is JobState.NOT_LOADED  # forgotten: no login session
    wait_for(lambda: node.facts([wired]).sysctl["iogpu.wired_limit_mb"] == "180000",
             what="the wired-limit daemon")
    env = json.loads(Path(report).read_text())
    assert (env["HOME"], env["USER"], env["ORCH_SIM_EUID"]) == (home, user, None)  # not root
    assert [c.resource for c in node.plan(resources).changes] == [agent.id]
    node.apply([])
    assert not (spare_host.launch_daemons_dir / f"{label}.plist").exists()
