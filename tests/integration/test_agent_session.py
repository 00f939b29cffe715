"""The agent session over real OpenSSH sshd hosts (tests/integration/conftest.py).

Exec channels are counted twice: by the connection's `round_trips`, and by the host's own
sshd, which logs "Starting session: ..." for every exec request at LogLevel VERBOSE (set in
orchestrator/sandbox/hosts.py). The two must agree, so a channel the executor forgot to count
is still caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from orchestrator.agent import agent_file_id, agent_source_hash
from orchestrator.errors import ActionFailed, HostError, HostUnreachable
from orchestrator.executor import SSHExecutor, SSHOptions, Target
from orchestrator.executor.base import AgentStep, StepState
from orchestrator.executor.ssh import SSHConnection
from orchestrator.simulator.hosts import RunningHost
from tests.integration.conftest import TreeHash, exec_channels_logged, sshd_log

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def connect(host: RunningHost, **kw: Any) -> SSHConnection:
    options = SSHOptions(known_hosts=host.known_hosts_file, **kw)
    target = Target(host.name, host.address, host.port, host.user, host.identity_file)
    return await SSHExecutor(options).open(target)


async def ensure_agent(host: RunningHost) -> None:
    conn = await connect(host)
    try:
        await conn.agent("facts", {})
    finally:
        await conn.close()


def test_a_runs_agent_calls_share_one_exec_channel(test_hosts: list[RunningHost]) -> None:
    host = test_hosts[0]
    run(ensure_agent(host))  # a converged host: the agent is cached
    data = os.urandom(200_000)
    holder = {"who": "test", "nonce": "n-session-1"}

    async def scenario() -> int:
        conn = await connect(host)
        try:
            facts = await conn.agent("facts", {"files": ["~/session/blob"]})
            assert facts["files"]["~/session/blob"]["kind"] == "missing"
            request = {
                "path": "~/session/blob",
                "mode": 0o600,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            assert (await conn.agent("write", request, stdin=data))["changed"] is True
            taken = await conn.agent(
                "lock_acquire", {"path": "~/.orch/session-lock", "holder": holder}
            )
            assert taken["acquired"] is True
            released = await conn.agent(
                "lock_release", {"path": "~/.orch/session-lock", "nonce": holder["nonce"]}
            )
            assert released == {"released": True}
            outcomes = await conn.agent_batch(
                [AgentStep("mkdir", {"path": "~/session/d", "mode": 0o700}),
                 AgentStep("sizes", {"paths": ["~/session/blob"]})]
            )  # fmt: skip
            assert [o.state for o in outcomes] == [StepState.OK, StepState.OK]
            assert outcomes[1].response == {"sizes": {"~/session/blob": len(data)}}
            return conn.round_trips
        finally:
            await conn.close()

    offset = sshd_log(host).stat().st_size
    trips = run(scenario())
    assert trips == 1
    assert exec_channels_logged(host, offset) == 1
    assert (host.home / "session" / "blob").read_bytes() == data


def test_sshd_log_counts_one_shot_channels_too(test_hosts: list[RunningHost]) -> None:
    """The counter above can fail: plain `run`s and a one-shot op each show up in sshd's log."""
    host = test_hosts[0]
    run(ensure_agent(host))

    async def scenario() -> int:
        conn = await connect(host)
        try:
            await conn.run(["true"])
            await conn.run(["true"])
            await conn.agent("facts", {})
            with pytest.raises(ActionFailed, match="run_id must be"):
                await conn.agent("serve", {"files": {}, "bind": "127.0.0.1", "port": 0,
                                           "token": "t", "run_id": "bad id"})  # fmt: skip
            return conn.round_trips
        finally:
            await conn.close()

    offset = sshd_log(host).stat().st_size
    trips = run(scenario())
    assert trips == 4  # two runs, the session, serve's own channel
    assert exec_channels_logged(host, offset) == 4


def test_read_only_run_writes_nothing_on_the_node(
    test_hosts: list[RunningHost], tree_hash: TreeHash
) -> None:
    host = test_hosts[2]
    (host.home / ".orch" / "agent" / f"{agent_file_id()}.pyz").unlink(missing_ok=True)
    (host.home / "ro").mkdir(exist_ok=True)
    (host.home / "ro" / "data").write_bytes(b"y" * 10_000)
    os.utime(host.home / "ro" / "data", (1e9, 1e9))  # cacheable, were the run not read-only
    before = tree_hash(host, "home")

    async def scenario() -> dict[str, Any]:
        conn = await connect(host, install_agent=False)
        try:
            facts = await conn.agent("facts", {"files": ["~/ro/data"], "read_only": True})
            await conn.agent("read", {"paths": ["~/ro/data"]})
            await conn.agent("sizes", {"paths": ["~/ro/data"]})
            assert conn.round_trips == 2  # no cached agent, then the streamed session
            return facts
        finally:
            await conn.close()

    facts = run(scenario())
    assert facts["agent"]["version"] == agent_source_hash()
    assert facts["files"]["~/ro/data"]["sha256"] == hashlib.sha256(b"y" * 10_000).hexdigest()
    assert tree_hash(host, "home") == before


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_killed_agent_is_a_host_error_and_the_next_call_reopens(
    test_hosts: list[RunningHost],
) -> None:
    host = test_hosts[1]
    run(ensure_agent(host))

    async def scenario() -> None:
        conn = await connect(host)
        try:
            await conn.agent("facts", {})
            first = conn.session.pid
            assert first is not None and conn.round_trips == 1
            call = asyncio.create_task(conn.agent("run", {"argv": ["sleep", "30"]}))
            deadline = time.monotonic() + 10
            while not children(first) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            sleeper = children(first)
            assert sleeper, "the agent never started the command"
            os.kill(first, signal.SIGKILL)
            with pytest.raises(HostError, match="agent run: the agent session ended unexpectedly"):
                await call
            for pid in sleeper:
                os.kill(pid, signal.SIGKILL)
            facts = await conn.agent("facts", {"files": ["~/nothing"]})
            assert facts["files"]["~/nothing"]["kind"] == "missing"
            assert conn.round_trips == 2
            assert conn.session.pid not in (None, first)
        finally:
            await conn.close()

    run(scenario())


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_connection_lost_mid_call_is_host_unreachable(test_hosts: list[RunningHost]) -> None:
    """Killing the sshd that serves the connection (the agent's ancestor) drops the whole
    connection: the pending call says the host is unreachable, not that an action failed."""
    host = test_hosts[1]
    run(ensure_agent(host))

    async def scenario() -> None:
        conn = await connect(host)
        try:
            await conn.agent("facts", {})
            agent = conn.session.pid
            assert agent is not None
            ancestors, pid = [], agent
            while pid > 1:
                pid = parent_of(pid)
                ancestors.append(pid)
            assert host.sshd_pid in ancestors
            # The listener's child that serves this connection.
            served_by = ancestors[ancestors.index(host.sshd_pid) - 1]
            call = asyncio.create_task(conn.agent("run", {"argv": ["sleep", "30"]}))
            deadline = time.monotonic() + 10
            while not children(agent) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            leftovers = [agent, *children(agent)]
            os.kill(served_by, signal.SIGKILL)
            with pytest.raises(HostUnreachable, match="connection lost"):
                await call
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        finally:
            await conn.close()

    run(scenario())
