"""`orch status --watch` across a Mac's reboot: the node drops out of the frame, then comes back
over a new connection, with no restart of the watch.

A simulated Mac of this file's own (127.0.0.141), rebooted for real (`simulator.hosts.reboot`:
every process dies, so the watch's SSH connection drops, and sshd comes back on the same
address and host key). No worker runs: the watch reads reachability, launchd and the files.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.config import load_cluster
from orchestrator.executor import SSHOptions
from orchestrator.run.engine import RunOptions
from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, reboot, start_hosts, stop_hosts
from orchestrator.simulator.tiny_model import make_tiny_deepseek
from orchestrator.watch import watch


@pytest.fixture
def host(tmp_path: Path) -> Iterator[RunningHost]:
    [started] = start_hosts(tmp_path / "hosts", [HostSpec("mini", 64 * GIB, "Apple M4 Pro",
                                                          address="127.0.0.141")])
    yield started
    stop_hosts([started])


def _rows(out: io.StringIO) -> list[str]:
    """The watched node's row in each frame printed so far, in order."""
    return re.findall(r"^.*\bmini\b.*\b(?:yes|NO)\b.*$", out.getvalue(), re.M)


async def _until(check: Callable[[], bool], what: str, within: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def test_a_rebooted_node_leaves_the_watch_and_comes_back_on_a_new_connection(
        tmp_path: Path, host: RunningHost) -> None:
    model = make_tiny_deepseek(tmp_path / "model", n_layers=4, n_files=2)
    (tmp_path / "inventory.yml").write_text(inventory_yaml([host]))
    cluster_file = tmp_path / "watch.yml"
    cluster_file.write_text(f"name: watch\ninventory: inventory.yml\nmodel:\n  path: {model}\n"
                            "placement:\n  nodes: [mini]\n")
    cluster = load_cluster(cluster_file)
    options = RunOptions(ssh=SSHOptions(known_hosts=host.known_hosts_file))
    out = io.StringIO()

    async def scenario() -> None:
        watching = asyncio.create_task(watch(cluster, options, interval=0.2, probe=False,
                                             console=Console(file=out, width=200)))
        try:
            await _until(lambda: len(_rows(out)) >= 1, "the first frame")
            assert " yes " in _rows(out)[0], _rows(out)[0]
            before = len(_rows(out))
            await asyncio.to_thread(reboot, host)  # the watch's connection drops with sshd
            await _until(lambda: any(" NO " in r for r in _rows(out)[before:]),
                         "a frame with the node unreachable")
            down = next(i for i, r in enumerate(_rows(out)) if i >= before and " NO " in r)
            await _until(lambda: any(" yes " in r for r in _rows(out)[down:]),
                         "a frame with the node back")
            assert not watching.done()  # one watch throughout: nothing restarted it
        finally:
            watching.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watching

    asyncio.run(scenario())
    assert "Traceback" not in out.getvalue()
