"""`orch status --watch`: `orch status` redrawn every few seconds, over connections held open.

Why a module of its own: `status.py` reads once and renders text; watching adds a loop, a
terminal view (rich) and one rule — the refreshes reuse what the first one opened. Each host's
SSH connection is made once, and its agent session (executor/session.py: one exec channel, one
agent process) answers every refresh's calls, so a refresh costs the node two small agent
requests and no new process, login or handshake; rank 0's API gets one probe completion.

The view: per node, reachable, the worker (launchd's state and its own), rank, layers, RSS
beside what the placement predicts the node needs (weights + overhead + KV cache), model files
verified n/n; for the ring, its state and the probe completion's latency. On a terminal the
frame is redrawn in place (rich ``Live``); piped, each frame is printed in turn, so a log of
it reads top to bottom.

A node that cannot be read (a Mac rebooting, a cable pulled) is dialled again in the
background, once per refresh, without holding up the frames of the others; when a dial
succeeds, the next frame reads it over the new connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.config import Cluster
from orchestrator.errors import HostError
from orchestrator.executor import Connection, SSHOptions
from orchestrator.placement.choose import Placement
from orchestrator.placement.intent import resolve_intent
from orchestrator.run.engine import RunOptions, connected, redial
from orchestrator.status import ClusterStatus, gather_status, model_file_list

__all__ = ["WatchResult", "frame", "watch"]


@dataclass(frozen=True)
class WatchResult:
    """What a watch did: how many frames, and the exec channels each host's one connection
    opened over all of them (its agent session: 1 when every refresh reused it)."""

    refreshes: int
    round_trips: Mapping[str, int]
    last: ClusterStatus | None


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _rss(rss: int | None, predicted: int | None) -> str:
    if rss is None:
        return "-"
    if not predicted:
        return _size(rss)
    return f"{_size(rss)} / {_size(predicted)} ({rss / predicted:.0%})"


def _layers(layers: tuple[int, int] | None) -> str:
    if not layers:
        return "-"
    start, end = layers
    return f"{start}-{end - 1}" if end - start > 1 else str(start)


def frame(status: ClusterStatus, placement: Placement, *, at: str = "") -> RenderableType:
    """One refresh: a row per node, then the ring and the API's latency."""
    predicted = {n.name: n.bytes for n in placement.nodes}
    table = Table(title=f"{status.cluster}{'  ' + at if at else ''}", title_justify="left",
                  expand=False)
    for column in ("HOST", "RANK", "REACHABLE", "WORKER", "STATE", "LAYERS",
                   "RSS / PREDICTED", "FILES"):
        table.add_column(column, no_wrap=True)
    for n in status.nodes:
        files = f"{n.files_verified}/{n.files_total}" if n.files_total is not None else "-"
        state = n.state or "-"
        table.add_row(
            n.host, str(n.rank),
            Text("yes") if n.reachable else Text("NO", style="bold red"),
            n.worker, Text(state, style="green" if state == "serving" else "yellow"),
            _layers(n.layers), _rss(n.rss_bytes, predicted.get(n.host)), files)
    size = "?" if status.ring_size is None else str(status.ring_size)
    lines = [Text(f"ring: {status.ring} — {status.ranks_serving}/{status.expected_ranks} ranks "
                  f"serving, size {size}")]
    api = f"api: {status.api_url} — "
    if status.probe_latency_s is not None:
        api += f"probe completion {status.probe_latency_s * 1000:.0f} ms"
    else:
        api += status.probe_error or "not probed"
    lines.append(Text(api))
    for n in status.nodes:
        why = n.problem if not n.reachable else n.error or n.problem
        if why:
            lines.append(Text(f"{n.host}: {why}", style="red"))
    return Group(table, *lines)


async def watch(cluster: Cluster, options: RunOptions, *, interval: float = 2.0,
                count: int | None = None, console: Console | None = None,
                probe: bool = True) -> WatchResult:
    """Refresh every `interval` seconds until cancelled (^C), or `count` frames.

    Connections are made once, read-only (the agent is never installed), and closed when the
    watch ends, however it ends.
    """
    console = console or Console()
    intent = await asyncio.to_thread(resolve_intent, cluster)
    assert intent.placement is not None
    placement = intent.placement
    files = model_file_list(intent)
    hosts = [n.name for n in placement.nodes]
    refreshes = 0
    last: ClusterStatus | None = None
    ssh = replace(options.ssh, install_agent=False)
    async with connected(cluster, hosts, ssh) as conns:
        dials = _Redials(cluster, ssh, conns)
        live = Live(console=console, auto_refresh=False) if console.is_terminal else None
        if live is not None:
            live.start()
        try:
            while count is None or refreshes < count:
                started = time.monotonic()
                await dials.take_back()
                last = await gather_status(cluster, conns, placement, model_files=files,
                                           probe=probe)
                dials.start([n.host for n in last.nodes if not n.reachable])
                refreshes += 1
                view = frame(last, placement, at=time.strftime("%H:%M:%S"))
                if live is not None:
                    live.update(view, refresh=True)
                else:
                    console.print(view)
                if count is not None and refreshes >= count:
                    break
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        finally:
            await dials.cancel()
            if live is not None:
                live.stop()
        trips = {name: conn.round_trips for name, conn in conns.items()
                 if not isinstance(conn, HostError)}
    return WatchResult(refreshes, trips, last)


class _Redials:
    """Background dials to the nodes the last frame could not read, swapped into `conns`
    (which `connected` closes at the end) once they succeed."""

    def __init__(self, cluster: Cluster, ssh: SSHOptions,
                 conns: MutableMapping[str, Connection | HostError]) -> None:
        self._cluster, self._ssh, self._conns = cluster, ssh, conns
        self._pending: dict[str, asyncio.Task[Connection | HostError]] = {}

    def start(self, hosts: list[str]) -> None:
        for host in hosts:
            if host not in self._pending:
                self._pending[host] = asyncio.create_task(redial(self._cluster, host, self._ssh))

    async def take_back(self) -> None:
        for host, task in list(self._pending.items()):
            if not task.done():
                continue
            del self._pending[host]
            fresh = task.result()
            if isinstance(fresh, HostError):
                continue  # still down: the frame says so, and the next one dials again
            lost, self._conns[host] = self._conns[host], fresh
            if not isinstance(lost, HostError):
                with contextlib.suppress(Exception):  # already broken; closing is tidy-up
                    await lost.close()

    async def cancel(self) -> None:
        for task in self._pending.values():
            task.cancel()
        for task in self._pending.values():
            with contextlib.suppress(asyncio.CancelledError):
                fresh = await task
                if not isinstance(fresh, HostError):
                    await fresh.close()
        self._pending.clear()
