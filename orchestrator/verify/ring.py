"""After apply: is the service really serving? A real chat completion, and every rank in the ring.

`verify_ring` waits (up to a timeout) for rank 0's API to answer a greedy chat completion —
the only proof that every rank loaded its layers and the pipeline ran — while it watches the
ranks: a rank that refused to start for a reason a restart cannot fix (bad config, a missing or
wrong file, an mlx-lm without the worker's hooks: exit 2, 3 or 5) ends the wait early instead
of burning the whole timeout. Then it reads every rank's status file: each must be serving a
ring whose size is the node count. On failure the message names the rank to look at and shows
the end of its log (`orchestrator.verify.health.explain_not_ready`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from orchestrator.config import Cluster
from orchestrator.errors import HostError
from orchestrator.executor import Connection
from orchestrator.facts import JobState
from orchestrator.placement.choose import Placement
from orchestrator.plan.ring import RankView
from orchestrator.resources.layout import WorkerLayout, api_url
from orchestrator.verify.health import (
    ReadyResult,
    ReadyStage,
    Transport,
    explain_not_ready,
    rank_problems,
    urllib_transport,
    wait_ready,
)
from orchestrator.verify.observe import observe_ring

__all__ = ["FATAL_EXITS", "RingHealth", "capped", "verify_ring"]

FATAL_EXITS = (2, 3, 5)  # the worker's config / files / mlx-lm refusals: restarts cannot help


@dataclass(frozen=True)
class RingHealth:
    api_url: str
    expected_ranks: int
    ready: ReadyResult
    ranks: tuple[RankView, ...]
    problems: tuple[str, ...]  # one line per rank problem, rank order

    @property
    def ok(self) -> bool:
        return self.ready.ready and not self.problems

    def message(self) -> str:
        """One line when healthy; otherwise what failed, which rank, and its log's end."""
        if self.ok:
            tokens = len(self.ready.completion.token_ids) if self.ready.completion else 0
            return (f"ready: {self.expected_ranks} rank(s) serving at {self.api_url}; first "
                    f"completion ({tokens} tokens) after {self.ready.elapsed:.1f} s")
        return explain_not_ready(self.ready, [r.snapshot() for r in self.ranks],
                                 self.expected_ranks)


def capped(transport: Transport, seconds: float) -> Transport:
    """Bound every HTTP request: a completion queued behind a model that never loads must not
    keep a thread (and the event loop's shutdown) waiting for the whole readiness timeout."""

    def call(url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        return transport(url, body, min(timeout, seconds))

    return call


def _fatal(views: list[RankView]) -> list[str]:
    found = []
    for view in views:
        job = view.job
        if job is None:
            continue
        if job.state is JobState.NOT_LOADED:
            found.append(f"rank {view.rank} ({view.host}): the worker is not loaded")
        elif job.state is not JobState.RUNNING and job.last_exit in FATAL_EXITS:
            error = view.status.error if view.status and view.status.error else ""
            found.append(f"rank {view.rank} ({view.host}) refused to start (exit "
                         f"{job.last_exit}){': ' + error if error else ''}")
    return found


async def verify_ring(
    cluster: Cluster,
    placement: Placement,
    conns: Mapping[str, Connection | HostError],
    *,
    timeout: float = 600.0,
    prompt: str = "Say OK.",
    max_tokens: int = 4,
    transport: Transport = urllib_transport,
    request_timeout: float = 60.0,
    watch_interval: float = 5.0,
    log_lines: int = 40,
) -> RingHealth:
    """Wait for the first real completion, watching the ranks; then check every rank."""
    layout = WorkerLayout.of(cluster)
    url = api_url(cluster, placement)
    expected = len(placement.nodes)
    loop = asyncio.get_running_loop()
    started = loop.time()
    ready_task = asyncio.create_task(wait_ready(
        url, timeout=timeout, prompt=prompt, max_tokens=max_tokens,
        poll_interval=1.0, transport=capped(transport, request_timeout)))

    async def watch() -> list[str]:
        while True:
            await asyncio.sleep(watch_interval)
            views = [o.view for o in await observe_ring(placement, layout, conns)]
            fatal = _fatal(views)
            if fatal:
                return fatal

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({ready_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ready_task, watcher):
            if not task.done():
                task.cancel()
        await asyncio.gather(ready_task, watcher, return_exceptions=True)
    if ready_task.done() and not ready_task.cancelled():
        result = ready_task.result()  # an exception here is a bug: let it through
    else:
        fatal = watcher.result()
        result = ReadyResult(ReadyStage.NO_COMPLETION, loop.time() - started, 0,
                             "stopped waiting: " + "; ".join(fatal), None)
    views = [o.view for o in await observe_ring(
        placement, layout, conns, log_lines=0 if result.ready else log_lines)]
    problems = rank_problems([v.snapshot() for v in views], expected)
    if result.ready and problems:  # served, yet not the ring we placed: show the logs too
        views = [o.view for o in await observe_ring(placement, layout, conns,
                                                    log_lines=log_lines)]
    return RingHealth(url, expected, result, tuple(views), problems)
