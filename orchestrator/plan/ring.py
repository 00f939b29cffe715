"""Ring coupling: the ranks of one ring restart together or not at all. Pure functions.

Why (FACTS.md, checked with mlx 0.32.4): a ring forms once, when every rank starts. A rank
that restarts alone never rejoins — its peers accept no new connection — so rank 0 keeps
answering HTTP with ``/health`` 503 and chat fails until *every* rank restarts. Ranks other
than 0 exit about 31 s after start if their peer never listened; rank 0 waits forever; launchd's
KeepAlive restarts whatever exits, so any start order converges once all ranks are new.

So, level-triggered: a plan in which any rank's worker changes (its config hash, it is not
running, it is not loaded) or a ring observed broken (`ring_restart_reasons`) gets a restart
change for every other rank's worker (`couple_ring`), and the whole ring restarts once, in one
apply. The safe order, rank by rank and host by host:

1. on each host the worker's restart is the last change (files, venv and the model files come
   first, each verified by the agent's sha256 before the rename; the worker re-verifies the
   model files before it joins), so no rank starts on a file that is not verified;
2. a restart is ``launchd_bootstrap``: bootout, wait until launchd has forgotten the job (the
   old process and its ring port are gone), then bootstrap — no old-generation rank survives
   to confuse a new one;
3. hosts restart concurrently, in any order: rank 0 waits for its peers indefinitely and
   KeepAlive restarts a rank that gave up (after ThrottleInterval), so the order only costs
   time, never correctness;
4. readiness is then proven by a real chat completion (`verify_ring`), not by ``/health``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orchestrator.errors import HostError
from orchestrator.facts import FactRequest, HostFacts, JobState, LaunchdJob
from orchestrator.plan.core import HostPlan, Plan
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.launchd import LaunchdService
from orchestrator.resources.layout import WorkerLayout
from orchestrator.worker.status import WorkerState, WorkerStatus, parse_status

__all__ = ["RESTART_FIELD", "RankView", "couple_ring", "restart_change", "ring_restart_reasons"]

RESTART_FIELD = "ring restart"
FORMED = (WorkerState.LOADING, WorkerState.SERVING)  # states only reached after the ring formed


def restart_change(service: LaunchdService, reason: str) -> Change:
    """Restart an unchanged worker because its ring restarts: the same bootstrap step a
    changed worker gets, so the old process is gone before the new one starts."""
    return Change(service.id, Action.UPDATE, (FieldChange(RESTART_FIELD, None, reason),),
                  (service.bootstrap(),), cleanup=service.cleanup())


def _describe(change: Change) -> str:
    if change.action is Action.DELETE:
        return "removed"
    names = ", ".join(f.name for f in change.fields if f.name != RESTART_FIELD)
    return f"changed ({names})" if names else "restarts"


def couple_ring(plan: Plan, workers: Mapping[str, LaunchdService], *,
                broken: Mapping[str, str] | None = None) -> Plan:
    """Make every rank of the ring restart when any one must.

    ``workers`` maps each serving host to its worker's `LaunchdService` (the resource
    `worker_resources` put last). ``broken`` maps hosts to why the running ring cannot serve
    although launchd shows nothing to change (`ring_restart_reasons`). Each worker without a
    change of its own gets one `restart_change`, appended after its host's other changes, with
    a ``ring restart`` field naming the hosts that caused it. Unreachable hosts are not in the
    plan and cannot be restarted; the plan already reports them. Idempotent.
    """
    hosts = {h.host: h for h in plan.hosts}
    causes: dict[str, str] = {}
    for host in sorted(workers):
        host_plan = hosts.get(host)
        own = _worker_change(host_plan, workers[host]) if host_plan else None
        if own is not None and not _is_restart_only(own):
            causes[host] = _describe(own)
    for host, why in sorted((broken or {}).items()):
        if host in workers:
            causes.setdefault(host, why)
    if not causes:
        return plan
    reason = "; ".join(f"{host} {why}" for host, why in sorted(causes.items()))
    updated: list[HostPlan] = []
    for host_plan in plan.hosts:
        service = workers.get(host_plan.host)
        if service is None or _worker_change(host_plan, service) is not None:
            updated.append(host_plan)
            continue
        changes = (*host_plan.changes, restart_change(service, reason))
        updated.append(dataclasses.replace(host_plan, changes=changes))
    return dataclasses.replace(plan, hosts=tuple(updated))


def _worker_change(host_plan: HostPlan | None, service: LaunchdService) -> Change | None:
    if host_plan is None:
        return None
    return next((c for c in host_plan.changes if c.resource == service.id), None)


def _is_restart_only(change: Change) -> bool:
    return all(f.name == RESTART_FIELD for f in change.fields)


# ----------------------------------------------------------------------- observing a ring


@dataclass(frozen=True)
class RankSnapshot:
    """What the controller learned about one rank from its node (launchd state, files)."""

    rank: int
    host: str
    running: bool | None  # the worker process is alive (None: unknown)
    status: WorkerStatus | None  # its status file, if it has written one
    log_tail: str  # the end of its stderr log
    exit_code: int | None = None  # launchd's last exit status, when not running


@dataclass(frozen=True)
class RankView:
    """One rank as the controller sees it on its node: launchd's job and the status file."""

    rank: int
    host: str
    reachable: bool
    job: LaunchdJob | None  # None: unreachable, or not asked
    status: WorkerStatus | None  # the status file, whoever wrote it
    problem: str | None = None  # why the node or its status file could not be read
    log_tail: str = ""

    @property
    def running(self) -> bool | None:
        return None if self.job is None else self.job.state is JobState.RUNNING

    @property
    def current(self) -> WorkerStatus | None:
        """The status file, if the running process wrote it (a restart rewrites it at once;
        until then the file describes the previous process)."""
        status = self.status
        if status is None or self.job is None:
            return None
        if self.job.state is JobState.RUNNING and self.job.pid != status.pid:
            return None
        return status

    def snapshot(self) -> RankSnapshot:
        """What `orchestrator.verify.health` explains failures from."""
        exit_code = None if self.running else (self.job.last_exit if self.job else None)
        status = self.current if self.running else self.status
        return RankSnapshot(self.rank, self.host, self.running, status, self.log_tail,
                            exit_code)


def rank_fact_request(layout: WorkerLayout) -> FactRequest:
    """What a rank's view needs from its node: launchd's job and the worker's status file.

    Asked in the same facts call as the plan's resources, so observing the ring costs no
    round trip of its own.
    """
    return FactRequest(launchd=frozenset({layout.job}), texts=frozenset({layout.status}),
                       managed=False)


def rank_view(host: str, rank: int, facts: HostFacts | HostError | None,
              layout: WorkerLayout, *, log_tail: str = "") -> RankView:
    """One rank as its node's facts show it (facts answering `rank_fact_request`)."""
    if facts is None or isinstance(facts, HostError):
        reason = "no connection" if facts is None else str(facts).removeprefix(f"{host}: ")
        return RankView(rank, host, False, None, None, reason)
    text = facts.text(layout.status)
    problem = None
    status = None
    if text is None:
        problem = f"no status file at {layout.status}"
    else:
        try:
            status = parse_status(text)
        except ValueError as exc:
            problem = str(exc)
    return RankView(rank, host, True, facts.job(layout.job), status, problem, log_tail)


def ring_restart_reasons(views: Sequence[RankView], expected_world_size: int, *,
                         health_status: int | None = None) -> dict[str, str]:
    """Hosts whose rank cannot rejoin the running ring, and why: input for `couple_ring`.

    A rank whose process started after another rank of the expected ring had already formed
    it (that rank's status reached ``loading``/``serving`` before this process existed) can
    never join: the ring must restart. Start times come from the status files (each node's
    clock; the gap after a crash is a ThrottleInterval or more, far beyond LAN clock skew).
    With ``health_status`` (rank 0's ``/health``), a 503 from a serving rank 0 means a peer
    left the ring even when no restart is visible yet.
    """
    formed = [(v, s) for v in views if (s := v.current) is not None and v.running
              and s.state in FORMED and s.world_size == expected_world_size]
    if not formed:
        return {}
    reasons: dict[str, str] = {}
    for view in views:
        status = view.current
        if not view.running or status is None or status.state in FORMED:
            continue
        earlier = [(v, s) for v, s in formed if s.updated_at < status.started_at]
        if earlier:
            first = min(earlier, key=lambda pair: pair[1].updated_at)[0]
            reasons[view.host] = (
                f"rank {view.rank} restarted (now {status.state.value}) after rank "
                f"{first.rank} on {first.host} formed the ring; a ring cannot take a rank back")
    rank0 = next((s for v, s in formed if v.rank == 0), None)
    if not reasons and health_status == 503 and rank0 is not None \
            and rank0.state is WorkerState.SERVING:
        host = next(v.host for v, _ in formed if v.rank == 0)
        reasons[host] = "rank 0 serves but /health answers 503: a peer left the ring"
    return reasons
