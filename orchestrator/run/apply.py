"""Carry out a plan: each host's changes in order, hosts independent of each other.

A host that fails stops at the failing step and is reported; the others carry on (unless the
caller asks to fail fast). Before touching a host, its managed record is widened to include
everything the plan may create, so an interrupted run never leaves something orch put there
that a later run would not know to clean up. The record is narrowed to the declared set only
after every change succeeded.
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
from orchestrator.executor import Connection, FileStream
from orchestrator.plan import HostPlan, Plan
from orchestrator.resources.base import Action, Change
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


async def run_step(conn: Connection, step: Step) -> dict[str, Any]:
    """One step through the agent. File content travels as raw stdin bytes, never as argv."""
    if isinstance(step, Fetch):  # its URL and token are only known to the transfer context
        raise ActionFailed(conn.name, "a fetch step needs the model sync: "
                                      "apply_plan(..., transfers=...)")
    if isinstance(step, Write):
        stdin = await _bytes(conn.name, step.payload)
        return await conn.agent(step.op, step.request(), stdin=stdin)
    response = await conn.agent(step.op, step.request())
    if isinstance(step, Run) and not response.get("skipped") \
            and response.get("exit_status") != 0:
        raise ActionFailed(conn.name, f"`{' '.join(step.argv)}` exited "
                           f"{response.get('exit_status')}: "
                           f"{str(response.get('stderr', '')).strip()[-2000:]}")
    return response


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


def _interim_record(host_plan: HostPlan) -> dict[str, Any]:
    """The final record plus every resource the plan removes: a superset, safe if interrupted."""
    record = dict(host_plan.record)
    resources = list(record.get("resources", []))
    # Removals are listed newest first in the plan; kept in creation order in the record.
    removed = [{"id": c.resource, "cleanup": [s.to_json() for s in c.steps]}
               for c in host_plan.changes if c.action is Action.DELETE]
    record["resources"] = list(reversed(removed)) + resources
    return record


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
    current: Change | None = None
    try:
        cluster = str(host_plan.record["cluster"])
        await conn.agent("managed_write", {"record": _interim_record(host_plan),
                                           "cluster": cluster, "dir": state_dir})
        for current in host_plan.changes:
            log.info("change_started", host=conn.name, resource=current.resource,
                     action=current.action.value)
            if transfers is not None and transfers.handles(current):
                await transfers.apply_change(conn, current)
            else:
                for step in current.steps:
                    await run_step(conn, step)
            applied.append(current.resource)
        await conn.agent("managed_write", {"record": dict(host_plan.record), "cluster": cluster,
                                           "dir": state_dir})
    except HostUnreachable:
        raise
    except HostError as exc:
        where = f" while applying {current.resource}" if current else ""
        log.warning("host_failed", host=conn.name, error=str(exc))
        return HostOutcome(host_plan.host, HostStatus.FAILED, tuple(applied),
                           f"{_why(conn.name, exc)}{where}")
    return HostOutcome(host_plan.host, HostStatus.CHANGED, tuple(applied))


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
