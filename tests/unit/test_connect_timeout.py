"""The inventory's `ssh.connect_timeout` reaches the connection, and the command line's wins.

A listener that accepts TCP and never speaks SSH is what a hung sshd (or a half-dead Mac) looks
like: only the connect timeout ends the wait. The default is 10 s, so a run that honours 0.5 s
returns well inside the 5 s bound here, and one that ignores it would hit the bound.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.config.load import load_cluster
from orchestrator.errors import HostUnreachable
from orchestrator.executor import SSHExecutor, SSHOptions, Target
from orchestrator.run.engine import target_of


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that completes the TCP handshake (the kernel's backlog) and then says nothing."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def connect(options: SSHOptions, target: Target) -> HostUnreachable:
    async def attempt() -> HostUnreachable:
        executor = SSHExecutor(options)
        try:
            conn = await asyncio.wait_for(executor.open(target), timeout=5)
        except HostUnreachable as exc:
            return exc
        await conn.close()
        raise AssertionError("connected to a port that never speaks SSH")

    return asyncio.run(attempt())


def test_the_inventorys_connect_timeout_ends_a_silent_connection(
    silent_listener: int, tmp_path: Path
) -> None:
    (tmp_path / "inventory.yml").write_text(
        "ssh:\n  connect_timeout: 0.5\n"
        f"hosts:\n  hung:\n    address: 127.0.0.1\n    port: {silent_listener}\n")
    (tmp_path / "cluster.yml").write_text("name: quiet\ninventory: inventory.yml\n")
    target = target_of(load_cluster(tmp_path / "cluster.yml"), "hung")
    assert target.connect_timeout == 0.5
    error = connect(SSHOptions(known_hosts=tmp_path / "kh", connect_retries=0), target)
    assert error.host == "hung"


def test_the_command_lines_connect_timeout_wins_over_the_inventorys(
    silent_listener: int, tmp_path: Path
) -> None:
    target = Target("hung", "127.0.0.1", port=silent_listener, connect_timeout=60)
    options = SSHOptions(known_hosts=tmp_path / "kh", connect_timeout=0.5, connect_retries=0)
    assert connect(options, target).host == "hung"
