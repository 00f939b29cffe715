"""Workers as LaunchDaemons on a real MLX ring: migration from user agents, and a reboot.

Three simulated Macs of their own (127.0.0.51-53, apart from the other e2e tests), the
sandbox's hub and tiny model, and the real CLI:

1. converge with ``runtime.launchd_domain: user`` (what an older orch did), then apply the
   default: every worker becomes a system-domain daemon, no user agent is left, and the ring
   restarts once;
2. reboot one Mac: launchd loads its daemons at boot, and with no orch command the ring
   answers again (the surviving ranks leave the broken ring and KeepAlive restarts them);
   the next ``orch plan`` has nothing to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.errors import OrchError
from orchestrator.simulator import cluster as sandbox
from orchestrator.simulator import processes
from orchestrator.simulator.hosts import RunningHost, reboot, start_hosts, stop_hosts
from orchestrator.simulator.tiny_model import make_tiny_deepseek
from orchestrator.verify.health import chat_completion
from tests.fixtures.cli import orch

ADDRESS_BASE = 51  # 127.0.0.51-53: this file's own Macs
LABEL = "com.orch.sandbox.worker"
PROMPT = "Say OK."


@dataclass(frozen=True)
class Lab:
    hosts: list[RunningHost]
    cluster_file: Path
    api_url: str

    @property
    def known(self) -> tuple[str, str]:
        return ("--known-hosts", str(self.hosts[0].known_hosts_file))


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """`orch sandbox up`'s pieces, on this file's addresses, keeping the RunningHosts (a
    reboot needs them)."""
    monkeypatch.setattr(sandbox, "ADDRESS_BASE", ADDRESS_BASE)
    model_dir = make_tiny_deepseek(tmp_path / "model", n_layers=6, n_files=6, seed=7)
    hosts = start_hosts(tmp_path / "hosts", sandbox.specs(3))
    hub_pid = None
    try:
        endpoint, commit, hub_pid = sandbox._start_hub(tmp_path, model_dir)
        api_port = processes.free_port(hosts[0].address)
        cluster_file = sandbox._write_cluster(tmp_path, hosts, endpoint, commit,
                                              api_port)
        yield Lab(hosts, cluster_file, f"http://{hosts[0].address}:{api_port}")
    finally:
        if hub_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hub_pid, signal.SIGTERM)
        stop_hosts(hosts)


def ssh(host: RunningHost, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(host.ssh_argv(*argv), capture_output=True, text=True, timeout=60,
                          check=False)


def job(host: RunningHost, domain: str) -> dict[str, str]:
    """Top-level fields of ``launchctl print`` for the worker ({} when not loaded)."""
    target = "system" if domain == "system" else f"user/{os.getuid()}"
    done = ssh(host, "launchctl", "print", f"{target}/{LABEL}")
    if done.returncode != 0:
        return {}
    return dict(line.strip().split(" = ", 1) for line in done.stdout.splitlines()
                if line.startswith("\t") and not line.startswith("\t\t") and " = " in line
                and not line.rstrip().endswith("{"))


def status(lab: Lab) -> dict[str, Any]:
    done = orch("status", lab.cluster_file, "--json", "--no-probe", *lab.known)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def answers(url: str, timeout: float = 20) -> bool:
    try:
        asyncio.run(chat_completion(url, PROMPT, max_tokens=4, timeout=timeout))
    except (OrchError, OSError, TimeoutError):
        return False
    return True


def test_migration_to_daemons_then_a_reboot_heals_without_orch(lab: Lab) -> None:
    text = lab.cluster_file.read_text()
    lab.cluster_file.write_text(text.replace("runtime:\n",
                                             "runtime:\n  launchd_domain: user\n", 1))
    applied = orch("apply", lab.cluster_file, "--yes", *lab.known)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert all(job(h, "user").get("state") == "running" for h in lab.hosts)
    assert all(not job(h, "system") for h in lab.hosts)
    agent_pids = {h.name: job(h, "user")["pid"] for h in lab.hosts}

    # 1. The default: daemons. The agent is removed before the daemon takes its ports.
    lab.cluster_file.write_text(text)
    planned = orch("plan", lab.cluster_file, "--json", "--detailed-exitcode", *lab.known)
    assert planned.returncode == 2, planned.stdout + planned.stderr
    for host in json.loads(planned.stdout)["hosts"]:
        ids = [(c["resource"], c["action"]) for c in host["changes"]]
        assert ids.index((f"launchd:user/{LABEL}", "delete")) < \
            ids.index((f"launchd:system/{LABEL}", "create")), ids
    started = time.monotonic()
    applied = orch("apply", lab.cluster_file, "--yes", *lab.known)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    migrated_in = time.monotonic() - started
    for host in lab.hosts:
        assert not job(host, "user"), f"{host.name}: the user agent is still loaded"
        assert not (host.launch_agents_dir / f"{LABEL}.plist").exists()
        assert (host.launch_daemons_dir / f"{LABEL}.plist").exists()
        daemon = job(host, "system")
        assert daemon["state"] == "running" and daemon["type"] == "LaunchDaemon"
        assert daemon["pid"] != agent_pids[host.name]
        assert daemon["runs"] == "1", f"{host.name}: the ring restarted more than once"
    assert answers(lab.api_url)
    again = orch("plan", lab.cluster_file, "--detailed-exitcode", *lab.known)
    assert again.returncode == 0, again.stdout + again.stderr

    # 2. A reboot of one Mac: no orch command until the ring answers again.
    victim = lab.hosts[1]
    before = {h.name: job(h, "system")["pid"] for h in lab.hosts}
    rebooted_at = time.monotonic()
    reboot(victim)
    deadline = rebooted_at + 300
    while not answers(lab.api_url, timeout=10):
        assert time.monotonic() < deadline, status(lab)
        time.sleep(1)
    healed_in = time.monotonic() - rebooted_at
    after = {h.name: job(h, "system")["pid"] for h in lab.hosts}
    assert all(after[n] != before[n] for n in before), (before, after)  # every rank restarted
    report = status(lab)
    assert report["ring"]["state"] == "serving", report
    clean = orch("plan", lab.cluster_file, "--detailed-exitcode", *lab.known)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    print(f"migration apply {migrated_in:.1f} s; ring serving again {healed_in:.1f} s "
          f"after the reboot began")
