"""What the user sees while model files move: bars on a TTY, structured events otherwise.

`Tracker` keeps the numbers (bytes done and to do per node, rate, ETA); the views only show
them. `EventProgress` logs structlog events — one per file started, finished or failed, and a
``sync_progress`` summary at most every `EVENT_INTERVAL_S` — and `RichProgress` draws one bar
for the cluster and one per node with ``rich``. Bytes of a file in flight come from the
controller polling the size of its ``.partial`` (see `transfers`), so a 5 GB shard does not
look frozen for a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

__all__ = ["EventProgress", "Progress", "RichProgress", "Tracker", "make_progress"]

log = structlog.get_logger(__name__)

EVENT_INTERVAL_S = 5.0


class Progress(Protocol):
    def begin(self, totals: Mapping[str, int]) -> None:
        """Bytes each host will fetch in this apply."""
        ...

    def started(self, host: str, rel: str, size: int, source: str) -> None: ...

    def advance(self, host: str, rel: str, have: int) -> None:
        """``have`` bytes of an in-flight file are on the host (absolute, not a delta)."""
        ...

    def finished(self, host: str, rel: str, size: int, source: str, seconds: float) -> None: ...

    def failed(self, host: str, rel: str, error: str) -> None: ...

    def end(self) -> None: ...


@dataclass
class _HostState:
    total: int = 0
    completed: int = 0
    inflight: dict[str, int] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return min(self.total, self.completed + sum(self.inflight.values()))


class Tracker:
    """Bytes done / to do per host and overall, with rates and ETAs since `begin`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.hosts: dict[str, _HostState] = {}
        self.started_at = clock()

    def begin(self, totals: Mapping[str, int]) -> None:
        self.hosts = {h: _HostState(total=n) for h, n in sorted(totals.items())}
        self.started_at = self.clock()

    def advance(self, host: str, rel: str, have: int) -> None:
        state = self.hosts.setdefault(host, _HostState())
        state.inflight[rel] = max(have, state.inflight.get(rel, 0))

    def finished(self, host: str, rel: str, size: int) -> None:
        state = self.hosts.setdefault(host, _HostState())
        state.inflight.pop(rel, None)
        state.completed += size

    def failed(self, host: str, rel: str) -> None:
        self.hosts.setdefault(host, _HostState()).inflight.pop(rel, None)

    def snapshot(self, host: str | None = None) -> dict[str, Any]:
        states = [self.hosts[host]] if host is not None else list(self.hosts.values())
        done = sum(s.done for s in states)
        total = sum(s.total for s in states)
        elapsed = max(1e-6, self.clock() - self.started_at)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else None
        return {"bytes_done": done, "bytes_total": total, "rate_bps": round(rate),
                "eta_s": None if eta is None else round(eta, 1)}


class EventProgress:
    """structlog events; the default when stderr is not a terminal."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.tracker = Tracker(clock)
        self.clock = clock
        self.last_event = clock()

    def begin(self, totals: Mapping[str, int]) -> None:
        self.tracker.begin(totals)
        log.info("sync_started", hosts=len(totals), bytes_total=sum(totals.values()))

    def started(self, host: str, rel: str, size: int, source: str) -> None:
        self.tracker.advance(host, rel, 0)
        log.info("sync_file_started", host=host, file=rel, size=size, source=source)

    def advance(self, host: str, rel: str, have: int) -> None:
        self.tracker.advance(host, rel, have)
        self._maybe_summary()

    def finished(self, host: str, rel: str, size: int, source: str, seconds: float) -> None:
        self.tracker.finished(host, rel, size)
        log.info("sync_file_done", host=host, file=rel, size=size, source=source,
                 seconds=round(seconds, 3), rate_bps=round(size / seconds) if seconds else None)
        self._maybe_summary()

    def failed(self, host: str, rel: str, error: str) -> None:
        self.tracker.failed(host, rel)
        log.warning("sync_file_failed", host=host, file=rel, error=error)

    def end(self) -> None:
        log.info("sync_finished", **self.tracker.snapshot())

    def _maybe_summary(self) -> None:
        now = self.clock()
        if now - self.last_event < EVENT_INTERVAL_S:
            return
        self.last_event = now
        log.info("sync_progress", **self.tracker.snapshot(),
                 hosts={h: self.tracker.snapshot(h) for h in self.tracker.hosts})


class RichProgress:
    """Bars on the terminal: the cluster, then one per node (bytes, rate, time left)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as Bars

        self.tracker = Tracker()
        self.bars = Bars(TextColumn("{task.description:>16}"), BarColumn(), DownloadColumn(),
                         TransferSpeedColumn(), TimeRemainingColumn(),
                         console=Console(stderr=True), transient=False)
        self.tasks: dict[str | None, Any] = {}

    def begin(self, totals: Mapping[str, int]) -> None:
        self.tracker.begin(totals)
        self.bars.start()
        self.tasks[None] = self.bars.add_task("model files", total=sum(totals.values()))
        for host, total in sorted(totals.items()):
            self.tasks[host] = self.bars.add_task(host, total=total)

    def _refresh(self, host: str) -> None:
        for key in (None, host):
            if key in self.tasks:
                snap = self.tracker.snapshot(key)
                self.bars.update(self.tasks[key], completed=snap["bytes_done"])

    def started(self, host: str, rel: str, size: int, source: str) -> None:
        self.tracker.advance(host, rel, 0)

    def advance(self, host: str, rel: str, have: int) -> None:
        self.tracker.advance(host, rel, have)
        self._refresh(host)

    def finished(self, host: str, rel: str, size: int, source: str, seconds: float) -> None:
        self.tracker.finished(host, rel, size)
        self._refresh(host)
        log.debug("sync_file_done", host=host, file=rel, size=size, source=source)

    def failed(self, host: str, rel: str, error: str) -> None:
        self.tracker.failed(host, rel)
        from rich.text import Text

        self.bars.console.print(Text(f"{host}: {rel}: {error}", style="red"))

    def end(self) -> None:
        self.bars.stop()


def make_progress(tty: bool) -> Progress:
    return RichProgress() if tty else EventProgress()
