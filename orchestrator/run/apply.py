"""Carry out a plan: each host's changes in order, hosts independent of each other.

A host that fails stops at the failing step and is reported; the others carry on (unless the
caller asks to fail fast). Before touching a host, its managed record is widened to include
everything the plan may create, so an interrupted run never leaves something orch put there
that a later run would not know to clean up. The record is narrowed to the declared set only
after every change succeeded.

A host's steps travel as one agent ``batch`` (`Connection.agent_batch`): the widened record,
every change's steps, the narrowed record, run in order by the agent, which stops at the first
failure and answers each step's outcome; ten changes cost one round trip, not ten. Only the
changes the model sync applies (fetches that stream for minutes) leave the batch: the steps
before such a change go as one batch, the change runs, and the next batch starts after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import structlog

from orchestrator.errors import ActionFailed, HostError, HostUnreachable
from orchestrator.executor import AgentStep, Connection, FileStream, StepState
from orchestrator.plan import HostPlan, Plan
from orchestrator.plan.core import widened_record
from orchestrator.resources.base import Change
from orchestrator.resources.steps import Fetch, Payload, Run, Step, Text, Write
from orchestrator.run.report import LockLeft, RingCheck, TransferSummary

log = structlog.get_logger(__name__)


class HostStatus(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class HostOutcome:
    host: str
    status: HostStatus
    applied: tuple[str, ...] = ()  # resource ids whose steps all succeeded
    error: str | None = None


@dataclass(frozen=True)
class ApplyReport:
    outcomes: tuple[HostOutcome, ...]
    transfers: TransferSummary | None = None  # set when the plan fetched model files
    lock: LockLeft | None = None  # set when the lock was left on some host
    health: RingCheck | None = None  # set when the ring was checked after the apply

    def by_status(self, status: HostStatus) -> list[str]:
        return [o.host for o in self.outcomes if o.status is status]


class TransferHook(Protocol):
    """How apply hands model-file transfers to the sync (`orchestrator.run.transfers`):
    a change with `Fetch` steps is applied by the hook (its fetches run concurrently and
    wait for peers), and the hook learns when each host starts and stops applying."""

    def handles(self, change: Change) -> bool: ...

    async def apply_change(self, conn: Connection, change: Change) -> None: ...

    def host_started(self, host: str) -> None: ...

    def host_finished(self, host: str) -> None: ...


async def run_step(conn: Connection, step: Step, *, timeout: float | None = None
                   ) -> dict[str, Any]:
    """One step through the agent. File content travels as raw stdin bytes, never as argv.
    ``timeout`` (a write only): how long the controller waits for it, when a large file may
    need longer than the connection's command timeout."""
    if isinstance(step, Fetch):  # its URL and token are only known to the transfer context
        raise ActionFailed(conn.name, "a fetch step needs the model sync: "
                                      "apply_plan(..., transfers=...)")
    op, request, stdin = await _agent_call(conn.name, step)
    if timeout is not None and isinstance(step, Write):
        request = {**request, "timeout": timeout}
    return await conn.agent(op, request, stdin=stdin or None)


async def _agent_call(host: str, step: Step) -> tuple[str, Mapping[str, Any], bytes | FileStream]:
    """A plan step as the agent runs it: op, request, stdin. A `Run` fails on a non-zero exit
    when it says so (``check``)."""
    assert not isinstance(step, Fetch), "a fetch runs through the model sync, never a batch"
    if isinstance(step, Write):
        return step.op, step.request(), await _bytes(host, step.payload)
    if isinstance(step, Run):
        return step.op, step.agent_request(), b""
    return step.op, step.request(), b""


async def _bytes(host: str, payload: Payload) -> bytes | FileStream:
    """What a write sends: the plan's text, or a controller file streamed in chunks now (a
    wheel's or a `copy:` task's bytes are never in the plan, only its path and sha256, which
    the agent checks; a multi-GB file is never held whole in memory)."""
    if isinstance(payload, Text):
        return payload.data()
    try:
        return await asyncio.to_thread(FileStream.of, Path(payload.path))
    except OSError as exc:
        raise ActionFailed(host, f"controller file {payload.path} cannot be read: {exc}") from exc


async def apply_host(conn: Connection, host_plan: HostPlan, *,
                     transfers: TransferHook | None = None,
                     state_dir: str = ".orch") -> HostOutcome:
    """One host's changes in order; `state_dir` is the cluster's runtime.dir, where the host
    keeps the cluster's managed record."""
    if transfers is None:
        return await _apply_host(conn, host_plan, None, state_dir)
    transfers.host_started(conn.name)
    try:
        return await _apply_host(conn, host_plan, transfers, state_dir)
    finally:
        transfers.host_finished(conn.name)


async def _apply_host(conn: Connection, host_plan: HostPlan,
                      transfers: TransferHook | None, state_dir: str) -> HostOutcome:
    if not host_plan.changes:
        return HostOutcome(host_plan.host, HostStatus.OK)
    applied: list[str] = []
    batch = _Batch(conn, applied)
    try:
        cluster = str(host_plan.record["cluster"])
        await batch.add(None, AgentStep("managed_write", {
            "record": widened_record(host_plan.record, host_plan.changes), "cluster": cluster,
            "dir": state_dir}))
        for change in host_plan.changes:
            if transfers is not None and transfers.handles(change):
                await batch.flush()
                batch.current = change
                log.info("change_started", host=conn.name, resource=change.resource,
                         action=change.action.value)
                await transfers.apply_change(conn, change)
                applied.append(change.resource)
                continue
            if any(isinstance(step, Fetch) for step in change.steps):
                await batch.flush()
                batch.current = change
                raise ActionFailed(conn.name, "a fetch step needs the model sync: "
                                              "apply_plan(..., transfers=...)")
            for step in change.steps:
                op, request, stdin = await _agent_call(conn.name, step)
                if isinstance(stdin, FileStream):
                    # A controller file (a wheel, a `copy:`) streams in its own call: a batch
                    # frame holds its payloads whole, and this one may be gigabytes.
                    await batch.flush()
                    batch.current = change
                    await conn.agent(op, request, stdin=stdin)
                    # What crossed the link, as an event: how a converged copy is shown to
                    # send 0 bytes (bench/copy_rss.py sums these).
                    log.info("file_streamed", host=conn.name, resource=change.resource,
                             bytes=stdin.size)
                else:
                    await batch.add(change, AgentStep(op, request, stdin))
            await batch.add(change, None)  # the change is whole once its steps are done
        await batch.add(None, AgentStep("managed_write", {
            "record": dict(host_plan.record), "cluster": cluster, "dir": state_dir}))
        await batch.flush()
    except HostUnreachable:
        raise
    except HostError as exc:
        current = batch.current
        where = f" while applying {current.resource}" if current else ""
        log.warning("host_failed", host=conn.name, error=str(exc))
        return HostOutcome(host_plan.host, HostStatus.FAILED, tuple(applied),
                           f"{_why(conn.name, exc)}{where}")
    return HostOutcome(host_plan.host, HostStatus.CHANGED, tuple(applied))


class _Batch:
    """The steps of one host gathered for one ``batch`` request, each tagged with its change.

    A change counts as applied when its end marker (`add(change, None)`) is reached; `current`
    is the change whose step failed, for the report. Progress is logged per change as the
    answers come back: the batch is one round trip, so there is nothing to show before it.
    """

    def __init__(self, conn: Connection, applied: list[str]) -> None:
        self.conn = conn
        self.applied = applied
        self.current: Change | None = None
        self._steps: list[AgentStep] = []
        self._owners: list[Change | None] = []
        self._ends: dict[int, list[Change]] = {}  # step count at which changes are complete

    async def add(self, change: Change | None, step: AgentStep | None) -> None:
        if step is None:
            assert change is not None
            self._ends.setdefault(len(self._steps), []).append(change)
            return
        self._steps.append(step)
        self._owners.append(change)

    async def flush(self) -> None:
        """Send what was gathered; raise ActionFailed at the first failed step."""
        steps, owners, ends = self._steps, self._owners, self._ends
        self._steps, self._owners, self._ends = [], [], {}
        if not steps and not ends:
            return
        outcomes = await self.conn.agent_batch(steps) if steps else []
        for done, outcome in enumerate([*outcomes, None]):
            for change in ends.get(done, []):
                log.info("change_applied", host=self.conn.name, resource=change.resource,
                         action=change.action.value)
                self.applied.append(change.resource)
            if outcome is None:
                break
            if outcome.state is not StepState.OK:
                self.current = owners[done]
                raise ActionFailed(self.conn.name, f"agent {outcome.step.op} failed: "
                                                   f"{outcome.error}")


def _why(host: str, error: HostError) -> str:
    """The error without its "host: " prefix: the report's line already starts with the host."""
    return str(error).removeprefix(f"{host}: ")


async def apply_plan(
    plan: Plan,
    conns: Mapping[str, Connection | HostError],
    *,
    concurrency: int = 10,
    serial: int | None = None,
    fail_fast: bool = False,
    transfers: TransferHook | None = None,
    state_dir: str = ".orch",
) -> ApplyReport:
    """Apply every host's changes. `serial` applies hosts in batches of that size, in order;
    `fail_fast` stops starting new hosts (and batches) after the first failure; `transfers`
    runs the changes that fetch model files (see `TransferHook`)."""
    outcomes: dict[str, HostOutcome] = {
        host: HostOutcome(host, HostStatus.UNREACHABLE, error=reason)
        for host, reason in plan.unreachable.items()
    }
    pending = sorted(plan.hosts, key=lambda h: h.host)
    batches: Sequence[Sequence[HostPlan]] = (
        [pending[i:i + serial] for i in range(0, len(pending), serial)] if serial else [pending])
    gate = asyncio.Semaphore(concurrency)
    failed = asyncio.Event()

    async def one(host_plan: HostPlan) -> HostOutcome:
        conn = conns.get(host_plan.host)
        if conn is None or isinstance(conn, HostError):
            return HostOutcome(host_plan.host, HostStatus.UNREACHABLE,
                               error=_why(host_plan.host, conn) if conn else "no connection")
        async with gate:
            if fail_fast and failed.is_set():
                return HostOutcome(host_plan.host, HostStatus.FAILED,
                                   error="not started: another host failed (--fail-fast)")
            try:
                outcome = await apply_host(conn, host_plan, transfers=transfers,
                                           state_dir=state_dir)
            except HostUnreachable as exc:
                outcome = HostOutcome(host_plan.host, HostStatus.UNREACHABLE,
                                      error=_why(host_plan.host, exc))
            if outcome.status in (HostStatus.FAILED, HostStatus.UNREACHABLE):
                failed.set()
            return outcome

    for batch in batches:
        for outcome in await asyncio.gather(*(one(h) for h in batch)):
            outcomes[outcome.host] = outcome
        if fail_fast and failed.is_set():
            for host_plan in pending:
                outcomes.setdefault(host_plan.host, HostOutcome(
                    host_plan.host, HostStatus.FAILED,
                    error="not started: another host failed (--fail-fast)"))
            break
    return ApplyReport(tuple(outcomes[h] for h in sorted(outcomes)))
