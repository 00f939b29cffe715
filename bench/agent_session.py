"""Host-side cost of a no-op apply's agent traffic: facts + lock_acquire + lock_release.

    .venv/bin/python -m bench.agent_session [--runs 20] [--calls 40]

One simulated Mac (real OpenSSH sshd). Each run connects, makes the three agent calls and
disconnects; then one run makes `--calls` more lock calls (what each further call costs).
The host-side CPU is read from the kernel, not estimated: sshd's listener reaps each
connection's sshd, which reaped every shell and agent process of that connection, so the
growth of the listener's ``cutime + cstime`` (/proc/PID/stat) is everything the host spent on
the run: SSH crypto, login shells, agent interpreters and the commands facts runs. Wall time
is the controller's view (noisy on a shared machine). The agent is installed first, so upload
is not measured (a converged cluster never pays it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from pathlib import Path

import structlog

from orchestrator.executor import SSHExecutor, SSHOptions, Target
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, running_hosts

TICKS = os.sysconf("SC_CLK_TCK")


def children_cpu(pid: int) -> float:
    """Seconds of CPU used by pid's reaped descendants (cutime + cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / TICKS  # fields 16 and 17 of stat(5)


async def one_run(host: RunningHost, extra: int = 0) -> tuple[int, float]:
    options = SSHOptions(known_hosts=host.known_hosts_file)
    target = Target(host.name, host.address, host.port, host.user, host.identity_file)
    started = time.perf_counter()
    conn = await SSHExecutor(options).open(target)
    try:
        await conn.agent("facts", {"files": ["~/x"]})
        holder = {"who": "bench", "nonce": "n-bench"}
        taken = await conn.agent("lock_acquire", {"path": "~/.orch/lock", "holder": holder})
        assert taken["acquired"], taken
        released = await conn.agent("lock_release", {"path": "~/.orch/lock", "nonce": "n-bench"})
        assert released["released"], released
        for _ in range(extra // 2):
            await conn.agent("lock_acquire", {"path": "~/.orch/lock", "holder": holder})
            await conn.agent("lock_release", {"path": "~/.orch/lock", "nonce": "n-bench"})
        trips = conn.round_trips
    finally:
        await conn.close()
    return trips, time.perf_counter() - started


def wait_reaped(sshd: int, before: float, timeout: float = 5.0) -> float:
    """The listener reaps the connection's sshd a moment after the client disconnects."""
    deadline = time.monotonic() + timeout
    value = children_cpu(sshd)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        again = children_cpu(sshd)
        if again == value and again > before:
            return again
        value = again
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    spec = HostSpec("bench1", 64 * GIB, address="127.0.0.97")
    with tempfile.TemporaryDirectory() as base, running_hosts(Path(base), [spec]) as hosts:
        host = hosts[0]
        assert host.sshd_pid is not None
        asyncio.run(one_run(host))  # installs the agent
        cpu_before = wait_reaped(host.sshd_pid, -1.0)
        walls, trips = [], 0
        for _ in range(args.runs):
            trips, wall = asyncio.run(one_run(host))
            walls.append(wall)
        cpu_after = wait_reaped(host.sshd_pid, cpu_before)
        cpu = (cpu_after - cpu_before) / args.runs
        wall = sum(walls) / len(walls)
        print(f"runs={args.runs} exec_channels_per_run={trips} "
              f"host_cpu_per_run={cpu * 1000:.0f}ms wall_per_run={wall * 1000:.0f}ms "
              "(facts + lock_acquire + lock_release, connect included)")  # fmt: skip
        trips, wall = asyncio.run(one_run(host, args.calls))
        cpu_extra = wait_reaped(host.sshd_pid, cpu_after) - cpu_after
        per_call = (cpu_extra - cpu) / args.calls
        print(f"one run with {args.calls} more lock calls: exec_channels={trips} "
              f"host_cpu={cpu_extra * 1000:.0f}ms wall={wall * 1000:.0f}ms "
              f"=> host CPU per further call ~{per_call * 1000:.1f}ms")  # fmt: skip


if __name__ == "__main__":
    main()
