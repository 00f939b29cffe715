"""Apply's half of the sync: run the plan's fetch steps, node to node, and account every byte.

A `TransferContext` lives for one apply. The engine creates it from the plan (`for_plan`),
starts peer servers with ``async with ctx.serving(conns)`` and hands it to
``apply_plan(..., transfers=ctx)``, which gives it every change that has fetch steps
(`handles` / `apply_change`) and tells it when a host starts and stops applying.

* **Servers.** Every host that is a planned peer source or fetches a file runs the agent's
  ``serve`` op for the whole apply (a second channel on its SSH connection), bound to its
  ``ring_ip`` on one port, serving exactly the files it holds or will hold, to requests bearing
  a random per-run token. At the end each gets ``serve_stop`` and answers what it served.
* **Fetches.** A host's fetches run concurrently (at most `FETCH_SLOTS` transferring at once;
  waiting for a peer holds no slot). Each follows its planned source: a peer that fetches the
  file in this apply is waited for (the plan's ``after``). If the planned source cannot serve —
  its host failed, is not applying (``--serial``), or its transfer fails — another holder is
  used, else the host fetches from the origin itself; a host never fetches from the origin a
  file that another host has already fetched, or is fetching, from it in this apply (so
  failures aside, each file still leaves the Hub once). Waits only ever point along the plan's
  ``after`` edges (acyclic) or at a host fetching from the origin (which waits for nothing), so
  they cannot deadlock.
* **Sources** (typed: a host is a `FromPeer` whatever its name, ``hub`` and ``local``
  included). `FromHub`: the pinned commit's resolve URL with the Hub token as
  ``Authorization`` (read at apply time, sent only in the agent's stdin). `FromPeer`:
  ``http://ring_ip:port/<file>`` with the peer token. `FromController`: the controller's copy,
  streamed through the agent's ``write`` op a chunk at a time (`FileStream`), so a 5 GB shard
  of a local ``model.path`` costs the controller and the agent one chunk of memory each; it
  is not resumable (a cut copy starts over), and it is the one copy per file that crosses
  the controller's link — every other copy comes from a peer.
* **Accounting.** Every fetch is recorded with its source, bytes (from the Hub, over the LAN,
  from the controller, kept from an earlier partial, fetched twice), and wall-clock start and
  end (so "no bytes moved during an outage" can be checked). `summary` is what apply reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from orchestrator.config import Cluster
from orchestrator.errors import ActionFailed, HostError, HostUnreachable
from orchestrator.executor import Connection
from orchestrator.model.manifest import HubOrigin, Manifest
from orchestrator.model.token import hub_token, redact
from orchestrator.plan import Plan
from orchestrator.resources.base import Change, Resource
from orchestrator.resources.model_files import model_files_in
from orchestrator.resources.steps import (
    Fetch,
    FromController,
    FromHub,
    FromPeer,
    Origin,
    Source,
    origin,
)
from orchestrator.run.apply import run_step
from orchestrator.run.progress import Progress, make_progress
from orchestrator.run.report import ByteCounts, HostBytes, Route, TransferSummary

__all__ = ["DEFAULT_SYNC_PORT", "FetchRecord", "Peer", "TransferContext", "for_plan",
]

log = structlog.get_logger(__name__)

DEFAULT_SYNC_PORT = 47300  # until the cluster file has `runtime.sync_port`
FETCH_SLOTS = 4  # transfers from the origin at once per host
PEER_SLOTS_FACTOR = 2  # ... and this many times as many from peers
RELAY = True  # peers relay files they are still receiving (False: store-and-forward)
MIN_RATE_BPS = 1 << 20  # a fetch may take size / this (plus a base) before it is cut off
FETCH_BASE_TIMEOUT_S = 600.0
PEER_RETRIES, PEER_BACKOFF_S = 3, 0.2  # a dead peer is given up on in seconds, not minutes
HUB_READ_TIMEOUT_S = 60.0  # a Hub/CDN connection silent this long is cut and resumed
PEER_READ_TIMEOUT_S = 20.0  # a LAN peer has no excuse for a long silence
SERVE_DEADLINE_S = 86400  # a server outlives its controller by at most this (and a heartbeat)
STOP_WAIT_S = 30.0
POLL_INTERVAL_S = 1.0  # how often in-flight downloads' sizes are read, for progress


@dataclass(frozen=True)
class Peer:
    """Where a host serves its files to the others: its ring IP and the sync port."""

    address: str
    port: int

    def url(self, rel: str) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}/{urllib.parse.quote(rel)}"


@dataclass(frozen=True)
class FetchRecord:
    """One file that reached (or failed to reach) one host."""

    host: str
    file: str
    source: str  # the peer host's name, or "hub" / "local" for an origin (`kind` tells which)
    kind: Route
    size: int
    bytes_moved: int  # bytes that crossed the network (or the controller's link) for it
    bytes_resumed: int  # kept from a partial an earlier run left
    bytes_refetched: int  # received twice: a server ignored Range, or a hash mismatched
    mismatches: int
    retries: int
    requests: int
    started_at: float  # wall clock (time.time())
    finished_at: float
    ok: bool
    error: str | None = None


def _describe(source: Source) -> tuple[str, Route]:
    """(source, kind) as the report names them: a peer by its host name, over the "lan"."""
    if isinstance(source, FromPeer):
        return source.host, "lan"
    return source.kind, source.kind


class TransferContext:
    """One apply's transfers; see the module docstring."""

    def __init__(
        self,
        plan: Plan,
        manifest: Manifest,
        peers: Mapping[str, Peer],
        *,
        hub_token: str | None = None,
        progress: Progress | None = None,
        fetch_slots: int = FETCH_SLOTS,
        poll_interval: float = POLL_INTERVAL_S,
        relay: bool | None = None,
    ) -> None:
        self.manifest = manifest
        self.relay = RELAY if relay is None else relay
        self.peers = dict(peers)
        self.run_id = secrets.token_hex(8)
        self._peer_token = secrets.token_urlsafe(24)
        self._hub_token = hub_token
        self.progress = progress
        self.fetch_slots = fetch_slots
        self.poll_interval = poll_interval
        self._fetches: dict[tuple[str, str], Fetch] = {}
        self._holding: dict[str, set[str]] = {}  # file -> hosts holding it verified now
        for host_plan in plan.hosts:
            for change in host_plan.changes:
                for fetch in change.fetches:
                    self._fetches[(host_plan.host, fetch.file)] = fetch
                    source = fetch.source
                    held = set(source.fallback) if isinstance(source, FromPeer) else set()
                    if isinstance(source, FromPeer) and not source.scheduled:
                        held.add(source.host)
                    self._holding.setdefault(fetch.file, set()).update(held)
        self._done: dict[tuple[str, str], asyncio.Event] = {}
        self._begun: dict[tuple[str, str], asyncio.Event] = {}
        self._via: dict[tuple[str, str], Source] = {}  # the source of each running transfer
        self._ok: dict[tuple[str, str], bool] = {}
        self._started: set[str] = set()
        self._finished: set[str] = set()
        self._serving: dict[str, bool] = {}  # host -> its server is up (or starting)
        self._serve_answers: dict[str, dict[str, Any]] = {}
        self._load: Counter[str] = Counter()  # peer transfers each host is sending now
        self._seeding: dict[str, set[str]] = {}  # file -> hosts fetching it from the origin
        self._slots: dict[tuple[str, bool], asyncio.Semaphore] = {}
        self._records: list[FetchRecord] = []
        self._began: float | None = None
        self._ended: float | None = None

    # ------------------------------------------------------------------------- the apply hook

    def handles(self, change: Change) -> bool:
        return bool(change.fetches)

    def host_started(self, host: str) -> None:
        self._started.add(host)

    def host_finished(self, host: str) -> None:
        """The host stopped applying: a fetch it never got to will not happen; wake waiters."""
        self._finished.add(host)
        for (h, rel), event in self._done.items():
            if h == host and not event.is_set():
                self._ok.setdefault((h, rel), False)
                event.set()
        for (h, _rel), begun in self._begun.items():  # a relay waiter waits for a start
            if h == host:
                begun.set()

    async def apply_change(self, conn: Connection, change: Change) -> None:
        """Run a change's other steps in order, then its fetches concurrently."""
        for step in change.steps:
            if not isinstance(step, Fetch):
                await run_step(conn, step)
        fetches = change.fetches
        poller = (asyncio.create_task(self._poll(conn, fetches))
                  if self.poll_interval > 0 and self.progress is not None else None)
        try:
            results = await asyncio.gather(*(self._fetch(conn, s) for s in fetches),
                                           return_exceptions=True)
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, HostError) or isinstance(error, HostUnreachable):
                raise error
        if errors:
            first = str(errors[0]).removeprefix(f"{conn.name}: ")
            raise ActionFailed(conn.name, f"{len(errors)} of {len(fetches)} model files not "
                                          f"fetched; first: {first}")

    # ------------------------------------------------------------------------------ servers

    def serving_hosts(self) -> list[str]:
        """Hosts that serve in this apply: planned peer sources, their fallbacks, and every
        host that fetches (each may become a source if a planned one fails). None when no
        copy travels between hosts."""
        needers = {h for h, _ in self._fetches}
        holders = set().union(*self._holding.values()) if self._holding else set()
        if not holders and len(needers) <= 1:
            return []
        return sorted(h for h in needers | holders if h in self.peers)

    def served_files(self, host: str) -> dict[str, str]:
        files = {rel for (h, rel) in self._fetches if h == host}
        files |= {rel for rel, hosts in self._holding.items() if host in hosts}
        path_of = {rel: fetch.path for (_, rel), fetch in self._fetches.items()}
        return {"/" + rel: path_of[rel] for rel in sorted(files)}

    @contextlib.asynccontextmanager
    async def serving(self, conns: Mapping[str, Connection | HostError]
                      ) -> AsyncIterator[TransferContext]:
        """Peer servers for the duration of the block; stopped (and counted) at its end."""
        tasks: dict[str, asyncio.Task[None]] = {}
        for host in self.serving_hosts():
            conn = conns.get(host)
            if conn is None or isinstance(conn, HostError):
                continue
            self._serving[host] = True
            tasks[host] = asyncio.create_task(self._serve(conn))
        self._began = time.time()
        show = self.progress is not None and bool(self._fetches)
        if self.progress is not None and show:
            totals: Counter[str] = Counter()
            for (host, _), fetch in self._fetches.items():
                totals[host] += fetch.size
            self.progress.begin(dict(totals))
        try:
            yield self
        finally:
            self._ended = time.time()
            if self.progress is not None and show:
                self.progress.end()
            await self._stop(conns, tasks)

    async def _serve(self, conn: Connection) -> None:
        peer = self.peers[conn.name]
        request = {"files": self.served_files(conn.name), "bind": peer.address,
                   "port": peer.port, "token": self._peer_token, "run_id": self.run_id,
                   "timeout": SERVE_DEADLINE_S}
        if self.relay:
            request["growing"] = {"/" + rel: fetch.size
                                  for (h, rel), fetch in sorted(self._fetches.items())
                                  if h == conn.name}
        try:
            self._serve_answers[conn.name] = await conn.agent("serve", request)
        except HostError as exc:
            message = redact(str(exc), self._peer_token, self._hub_token)
            log.warning("sync_serve_failed", host=conn.name, error=message)
            self._serve_answers[conn.name] = {"error": message}
        finally:
            self._serving[conn.name] = False

    async def _stop(self, conns: Mapping[str, Connection | HostError],
                    tasks: Mapping[str, asyncio.Task[None]]) -> None:
        async def stop(host: str) -> None:
            conn = conns[host]
            assert not isinstance(conn, HostError)
            with contextlib.suppress(HostError):
                await conn.agent("serve_stop", {"run_id": self.run_id})

        await asyncio.gather(*(stop(h) for h, t in tasks.items() if not t.done()))
        if tasks:
            _, pending = await asyncio.wait(tasks.values(), timeout=STOP_WAIT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------------------ fetches

    def _event(self, host: str, rel: str) -> asyncio.Event:
        return self._done.setdefault((host, rel), asyncio.Event())

    def _begun_event(self, host: str, rel: str) -> asyncio.Event:
        """Set when ``host``'s transfer of ``rel`` has started (or its fetch has ended)."""
        return self._begun.setdefault((host, rel), asyncio.Event())

    async def _next_change(self, host: str, rel: str) -> None:
        """Wait until ``host``'s transfer of ``rel`` starts (when it may be relayed) or, once
        started, ends. Never returns at once for a state already seen (that would spin)."""
        begun = self._begun_event(host, rel)
        await (self._event(host, rel) if begun.is_set() or not self.relay else begun).wait()

    def _relaying(self, host: str, rel: str) -> bool:
        """``host`` is receiving ``rel`` now and its server relays it as it arrives."""
        return (self.relay and self._pending(host, rel) and self._can_serve(host)
                and self._begun_event(host, rel).is_set()
                # a copy from the controller is written to a temp file, not a partial
                and not isinstance(self._via.get((host, rel)), FromController))

    def _pending(self, host: str, rel: str) -> bool:
        """``host`` is applying now and has not finished fetching ``rel``."""
        return ((host, rel) in self._fetches and host in self._started
                and host not in self._finished and not self._event(host, rel).is_set())

    def _can_serve(self, host: str) -> bool:
        return self._serving.get(host, False) and host in self.peers

    def _origin(self, rel: str) -> Origin:
        return origin(self.manifest.seed_kind(rel))

    async def _choose(self, host: str, rel: str, planned: Source, tried: set[Source],
                      relays_tried: set[Source]) -> tuple[Source, bool] | None:
        """The source to fetch ``rel`` from now (a `FromPeer` naming only its host, or the
        file's origin) and whether it is a relay, waiting while the planned peer (or a host
        fetching it from the origin) is still at it. None: every source has been tried.

        A relay that broke off is not held against its host as a holder: a seeder whose own
        download restarts (a server that ignores Range) cuts back its partial and the relay
        with it, but once it holds the file it serves it whole. Taking the file from the
        origin instead would make it leave the Hub twice."""
        seed = self._origin(rel)
        want = planned.host if isinstance(planned, FromPeer) else None
        order = list(planned.fallback) if isinstance(planned, FromPeer) else []
        while True:
            holders = sorted(h for h in self._holding.get(rel, ())
                             if h != host and FromPeer(h) not in tried and self._can_serve(h))
            if want is not None and FromPeer(want) not in tried and self._can_serve(want):
                if want in holders:
                    return FromPeer(want), False
                if self._pending(want, rel):
                    if self._relaying(want, rel) and FromPeer(want) not in relays_tried:
                        return FromPeer(want), True  # cut-through: take it as it arrives there
                    await self._next_change(want, rel)
                    continue
            if holders:
                return FromPeer(min(holders, key=lambda h: (
                    self._load[h], h not in order, order.index(h) if h in order else 0, h))), False
            seeders = sorted(h for h in self._seeding.get(rel, ()) if h != host)
            if seeders:
                relay = next((h for h in seeders if FromPeer(h) not in tried | relays_tried
                              and self._relaying(h, rel)), None)
                if relay is not None:
                    return FromPeer(relay), True
                first = seeders[0]
                if FromPeer(first) in tried | relays_tried or not self._can_serve(first):
                    await self._event(first, rel).wait()
                else:
                    await self._next_change(first, rel)
                continue
            if seed in tried:
                return None
            self._seeding.setdefault(rel, set()).add(host)
            return seed, False

    async def _fetch(self, conn: Connection, step: Fetch) -> None:
        host, rel = conn.name, step.file
        planned = step.source or self._origin(rel)
        tried: set[Source] = set()
        relays_tried: set[Source] = set()
        last: HostError | None = None
        ok = False
        try:
            while not ok:
                chosen = await self._choose(host, rel, planned, tried, relays_tried)
                if chosen is None:
                    assert last is not None
                    raise last
                source, relayed = chosen
                (relays_tried if relayed else tried).add(source)
                try:
                    await self._transfer(conn, step, source)
                    ok = True
                except ActionFailed as exc:
                    last = exc
                    log.warning("sync_source_failed", host=host, file=rel,
                                source=_describe(source)[0], error=str(exc))
                finally:
                    self._seeding.get(rel, set()).discard(host)
        finally:
            self._ok[(host, rel)] = ok
            if ok:
                self._holding.setdefault(rel, set()).add(host)
            self._event(host, rel).set()
            self._begun_event(host, rel).set()

    def _slot(self, host: str, source: Source) -> asyncio.Semaphore:
        """Origin and LAN transfers are limited apart: a copy relayed from a peer's partial
        waits on the Hub as long as that peer does, and must not keep this host's own Hub
        downloads from starting."""
        lan = isinstance(source, FromPeer)
        return self._slots.setdefault((host, lan), asyncio.Semaphore(
            self.fetch_slots * (PEER_SLOTS_FACTOR if lan else 1)))

    async def _transfer(self, conn: Connection, step: Fetch, source: Source) -> None:
        host, rel, size = conn.name, step.file, step.size
        name = _describe(source)[0]
        peer = source.host if isinstance(source, FromPeer) else None
        async with self._slot(host, source):
            if peer is not None:
                self._load[peer] += 1
            if self.progress is not None:
                self.progress.started(host, rel, size, name)
            started, clock = time.time(), time.monotonic()
            self._via[(host, rel)] = source
            self._begun_event(host, rel).set()
            try:
                answer = await self._call(conn, step, source)
            except ActionFailed as exc:
                self._record(host, rel, source, size, {}, started, ok=False, error=str(exc))
                if self.progress is not None:
                    self.progress.failed(host, rel, str(exc))
                raise
            finally:
                if peer is not None:
                    self._load[peer] -= 1
            self._record(host, rel, source, size, answer, started, ok=True)
            if self.progress is not None:
                self.progress.finished(host, rel, size, name, time.monotonic() - clock)

    async def _call(self, conn: Connection, step: Fetch, source: Source) -> dict[str, Any]:
        rel = step.file
        timeout = math.ceil(FETCH_BASE_TIMEOUT_S + step.size / MIN_RATE_BPS)
        try:
            if isinstance(source, FromController):
                write = step.from_controller(str(self.manifest.controller_copies[rel]))
                answer = await run_step(conn, write, timeout=timeout)
                return {"bytes_downloaded": step.size if answer.get("changed") else 0}
            if isinstance(source, FromHub):
                from orchestrator.model.hub import HubClient  # only a Hub model's plan needs it

                hub = self.manifest.origin
                assert isinstance(hub, HubOrigin)
                url = HubClient(hub.endpoint).resolve_url(hub.repo, hub.commit, rel)
                headers = ({"Authorization": f"Bearer {self._hub_token}"}
                           if self._hub_token else {})
                return await conn.agent(step.op, step.request(
                    url, headers, timeout=timeout, read_timeout=HUB_READ_TIMEOUT_S))
            # A peer relaying a file it is still receiving may wait on its own source as long
            # as that source's read timeout: only a longer silence means the peer is gone.
            request = step.request(self.peers[source.host].url(rel),
                                   {"Authorization": f"Bearer {self._peer_token}"},
                                   timeout=timeout, retries=PEER_RETRIES,
                                   backoff=PEER_BACKOFF_S,
                                   read_timeout=(HUB_READ_TIMEOUT_S + PEER_READ_TIMEOUT_S
                                                 if self.relay else PEER_READ_TIMEOUT_S))
            return await conn.agent(step.op, request)
        except ActionFailed as exc:  # a last guard: no token crosses this edge
            message = redact(str(exc).removeprefix(f"{exc.host}: "),
                             self._peer_token, self._hub_token)
            raise ActionFailed(exc.host, message) from None

    def _record(self, host: str, rel: str, source: Source, size: int,
                answer: Mapping[str, Any], started: float, *, ok: bool,
                error: str | None = None) -> None:
        moved = int(answer.get("bytes_downloaded", 0))
        resumed = int(answer.get("bytes_resumed", 0))
        name, kind = _describe(source)
        record = FetchRecord(
            host=host, file=rel, source=name, kind=kind, size=size,
            bytes_moved=moved, bytes_resumed=resumed,
            bytes_refetched=max(0, moved + resumed - size) if ok else 0,
            mismatches=int(answer.get("mismatches", 0)), retries=int(answer.get("retries", 0)),
            requests=int(answer.get("requests", 0)), started_at=round(started, 3),
            finished_at=round(time.time(), 3), ok=ok,
            error=None if error is None else redact(error, self._peer_token, self._hub_token))
        self._records.append(record)

    async def _poll(self, conn: Connection, fetches: Sequence[Fetch]) -> None:
        """Progress of in-flight downloads: the size of their ``.partial`` files (stat only)."""
        partials = {f.path + ".partial": f.file for f in fetches}
        while True:
            await asyncio.sleep(self.poll_interval)
            live = {p: rel for p, rel in partials.items() if (conn.name, rel) not in self._ok}
            if not live:
                return
            with contextlib.suppress(HostError):
                answer = await conn.agent("sizes", {"paths": sorted(live)})
                for path, have in answer.get("sizes", {}).items():
                    if isinstance(have, int) and self.progress is not None:
                        self.progress.advance(conn.name, live[path], have)

    # ---------------------------------------------------------------------------- reporting

    @property
    def records(self) -> tuple[FetchRecord, ...]:
        return tuple(sorted(self._records, key=lambda r: (r.started_at, r.host, r.file)))

    def summary(self) -> TransferSummary:
        """The byte accounting apply reports (JSON-able); no token, no URL."""
        done = [r for r in self._records if r.ok]
        totals = ByteCounts(hub=0, lan=0, local=0,
                            resumed=sum(r.bytes_resumed for r in done),
                            refetched=sum(r.bytes_refetched for r in done))
        per_host: dict[str, HostBytes] = {}
        for r in done:
            totals[r.kind] += r.bytes_moved
            row = per_host.setdefault(r.host, HostBytes(files=0, hub=0, lan=0, local=0))
            row["files"] += 1
            row[r.kind] += r.bytes_moved
        served = {h: sum(a.get("bytes_served", {}).values())
                  for h, a in sorted(self._serve_answers.items()) if "error" not in a}
        return {
            "files": len(done),
            "failed": len({(r.host, r.file) for r in self._records if not r.ok}
                          - {(r.host, r.file) for r in done}),
            "bytes": totals,
            "mismatches": sum(r.mismatches for r in self._records),
            "retries": sum(r.retries for r in self._records),
            "hosts": dict(sorted(per_host.items())),
            "served": served,
            "serve_errors": {h: a["error"] for h, a in sorted(self._serve_answers.items())
                             if "error" in a},
            "started_at": self._began,
            "finished_at": self._ended,
            "fetches": [asdict(r) for r in self.records],
        }


def for_plan(cluster: Cluster, plan: Plan, desired: Mapping[str, Sequence[Resource]], *,
             port: int | None = None, tty: bool | None = None) -> TransferContext | None:
    """The context for applying ``plan``, or None when the cluster declares no model files.

    Peers are the inventory hosts' ``ring_ip`` and the sync port; the Hub token is read now,
    at apply time (see `orchestrator.model.token`)."""
    model = model_files_in(desired)
    if model is None:
        return None
    sync_port = port or cluster.runtime.sync_port
    peers = {name: Peer(host.ring_address, int(sync_port)) for name, host in cluster.hosts.items()}
    token = hub_token() if isinstance(model.manifest.origin, HubOrigin) else None
    show = sys.stderr.isatty() if tty is None else tty
    return TransferContext(plan, model.manifest, peers, hub_token=token,
                           progress=make_progress(show))
