"""Workers as LaunchDaemons on a real MLX ring: migration from user agents, and a reboot.

On the shared ``serving`` sandbox (see conftest), converged with the default (LaunchDaemons),
and the real CLI:

1. apply ``runtime.launchd_domain: user`` (what an older orch did: every worker becomes a
   user agent), then the default again: every worker is a system-domain daemon, no user agent
   is left, and the ring restarts once;
2. reboot one Mac: launchd loads its daemons at boot, and with no orch command the ring
   answers again (the surviving ranks leave the broken ring and KeepAlive restarts them);
   the next ``orch plan`` has nothing to change, and the ring gives the same tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from typing import Any

from orchestrator.errors import OrchError
from orchestrator.simulator.hosts import RunningHost, reboot
from orchestrator.verify.health import chat_completion
from tests.e2e.conftest import MAX_TOKENS, PROMPT, Serving

LABEL = "com.orch.sandbox.worker"


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


def status(serving: Serving) -> dict[str, Any]:
    done = serving.orch("status", "--json", "--no-probe")
    assert done.returncode in (0, 1), done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def answers(url: str, timeout: float = 20) -> bool:
    try:
        asyncio.run(chat_completion(url, PROMPT, max_tokens=MAX_TOKENS, timeout=timeout))
    except (OrchError, OSError, TimeoutError):
        return False
    return True


def test_migration_to_daemons_then_a_reboot_heals_without_orch(serving: Serving) -> None:
    hosts = serving.hosts
    text = serving.cluster_file.read_text()
    serving.cluster_file.write_text(text.replace("runtime:\n",
                                                 "runtime:\n  launchd_domain: user\n", 1))
    applied = serving.orch("apply", "--yes")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert all(job(h, "user").get("state") == "running" for h in hosts)
    assert all(not job(h, "system") for h in hosts)
    agent_pids = {h.name: job(h, "user")["pid"] for h in hosts}

    # 1. The default: daemons. The agent is removed before the daemon takes its ports.
    serving.cluster_file.write_text(text)
    planned = serving.orch("plan", "--json", "--detailed-exitcode")
    assert planned.returncode == 2, planned.stdout + planned.stderr
    for host in json.loads(planned.stdout)["hosts"]:
        ids = [(c["resource"], c["action"]) for c in host["changes"]]
        assert ids.index((f"launchd:user/{LABEL}", "delete")) < \
            ids.index((f"launchd:system/{LABEL}", "create")), ids
    started = time.monotonic()
    applied = serving.orch("apply", "--yes")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    migrated_in = time.monotonic() - started
    for host in hosts:
        assert not job(host, "user"), f"{host.name}: the user agent is still loaded"
        assert not (host.launch_agents_dir / f"{LABEL}.plist").exists()
        assert (host.launch_daemons_dir / f"{LABEL}.plist").exists()
        daemon = job(host, "system")
        assert daemon["state"] == "running" and daemon["type"] == "LaunchDaemon"
        assert daemon["pid"] != agent_pids[host.name]
        assert daemon["runs"] == "1", f"{host.name}: the ring restarted more than once"
    assert answers(serving.api_url)
    again = serving.orch("plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout + again.stderr

    # 2. A reboot of one Mac: no orch command until the ring answers again.
    victim = hosts[1]
    before = {h.name: job(h, "system")["pid"] for h in hosts}
    rebooted_at = time.monotonic()
    reboot(victim)
    deadline = rebooted_at + 300
    while not answers(serving.api_url, timeout=10):
        assert time.monotonic() < deadline, status(serving)
        time.sleep(1)
    healed_in = time.monotonic() - rebooted_at
    after = {h.name: job(h, "system")["pid"] for h in hosts}
    assert all(after[n] != before[n] for n in before), (before, after)  # every rank restarted
    report = status(serving)
    assert report["ring"]["state"] == "serving", report
    clean = serving.orch("plan", "--detailed-exitcode")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    completion = asyncio.run(chat_completion(serving.api_url, PROMPT, max_tokens=MAX_TOKENS,
                                             timeout=300))
    assert completion.token_ids == serving.expected
    print(f"migration apply {migrated_in:.1f} s; ring serving again {healed_in:.1f} s "
          f"after the reboot began")
