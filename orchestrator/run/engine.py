"""One run against the cluster: connect, gather facts, plan, and (for apply) lock and apply.

The stages are the data flow of DESIGN.md; each takes the previous stage's frozen output. This
module is the only one that sequences them, and it owns the connections for the run: opened
once per host, reused by every stage, closed at the end whatever happens.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace

import structlog

from orchestrator.config import Cluster
from orchestrator.errors import HostError, PlanError
from orchestrator.executor import Connection, SSHExecutor, SSHOptions, Target, for_each_host
from orchestrator.facts import FactRequest, HostFacts, parse_facts
from orchestrator.placement.choose import Placement
from orchestrator.placement.intent import Intent, resolve_intent
from orchestrator.plan import HostPlan, Plan, diff_host, fact_request
from orchestrator.plan.desired import desired_state
from orchestrator.plan.preflight import check_sudo
from orchestrator.plan.ring import couple_ring, rank_fact_request, rank_view, ring_restart_reasons
from orchestrator.plan.sources import assign_sources
from orchestrator.resources.base import Action, Change, FieldChange, Resource
from orchestrator.resources.layout import WorkerLayout, api_url
from orchestrator.resources.model_files import model_files_in
from orchestrator.resources.wheelhouse import NodePlatform, Wheelhouse, cluster_platform
from orchestrator.resources.worker import worker_services
from orchestrator.run.apply import ApplyReport, HostStatus, apply_plan
from orchestrator.run.lock import ClusterLock, new_holder
from orchestrator.run.transfers import for_plan
from orchestrator.run.wheelhouse import cached_wheelhouse, ensure_wheelhouse
from orchestrator.verify.ring import verify_ring

log = structlog.get_logger(__name__)

VERIFY_TIMEOUT = 600.0  # seconds for the ring's first completion after a (re)start


@dataclass(frozen=True)
class RunOptions:
    ssh: SSHOptions = field(default_factory=SSHOptions)
    limit: tuple[str, ...] | None = None  # host names; None = every inventory host


def target_of(cluster: Cluster, name: str) -> Target:
    host = cluster.hosts[name]
    return Target(name=name, address=host.address, port=host.port, user=host.user,
                  identity_file=host.identity_file)


def selected_hosts(cluster: Cluster, limit: Sequence[str] | None) -> list[str]:
    if not limit:
        return list(cluster.hosts)
    unknown = [h for h in limit if h not in cluster.hosts]
    if unknown:
        raise PlanError(f"--limit names hosts not in the inventory: {', '.join(unknown)}")
    return [h for h in cluster.hosts if h in limit]


def serving_nodes(cluster: Cluster, intent: Intent) -> list[str]:
    """The hosts that serve: the placement's ranks; without a model, the listed placement
    nodes or every host, drained ones left out either way (as placement leaves them out)."""
    if intent.serving is not None:
        return list(intent.serving)
    listed = cluster.listed_nodes
    if listed is None:
        return [name for name, host in cluster.hosts.items() if not host.drained]
    return list(listed)


@asynccontextmanager
async def connected(cluster: Cluster, hosts: Sequence[str],
                    options: SSHOptions) -> AsyncIterator[dict[str, Connection | HostError]]:
    executor = SSHExecutor(options)
    conns = await executor.connect_all(target_of(cluster, h) for h in hosts)
    try:
        yield conns
    finally:
        for conn in conns.values():
            if not isinstance(conn, HostError):
                await conn.close()


async def gather_facts(
    conns: Mapping[str, Connection | HostError],
    requests: Mapping[str, FactRequest],
    concurrency: int,
    *,
    read_only: bool,
) -> dict[str, HostFacts | HostError]:
    """One agent call per host, asking for everything in that host's request."""

    async def facts_of(conn: Connection) -> HostFacts:
        request = requests[conn.name]
        raw = await conn.agent("facts", {**request.to_json(), "read_only": read_only})
        return parse_facts(conn.name, raw, request)

    return await for_each_host(conns, facts_of, concurrency)


def host_requests(cluster: Cluster, intent: Intent,
                  desired: Mapping[str, Sequence[Resource]]) -> dict[str, FactRequest]:
    """Each host's one facts request: its resources' needs, plus, on a rank's node, what the
    ring's state is read from (the worker's job and status file)."""
    requests = {name: fact_request(resources, cluster.name)
                for name, resources in desired.items()}
    if intent.placement is not None:
        observe = rank_fact_request(WorkerLayout.of(cluster))
        for node in intent.placement.nodes:
            requests[node.name] = requests[node.name].merge(observe)
    return requests

def build_plan(cluster: Cluster, desired: Mapping[str, Sequence[Resource]],
               facts: Mapping[str, HostFacts | HostError]) -> Plan:
    host_plans = []
    unreachable: dict[str, str] = {}
    for name, fact in facts.items():
        if isinstance(fact, HostError):
            unreachable[name] = str(fact).removeprefix(f"{name}: ")
            continue
        host_plans.append(diff_host(cluster.name, desired[name], fact))
    model = model_files_in(desired)
    if model is not None:  # which host each model file comes from: a cluster-wide decision
        host_plans = list(assign_sources(host_plans, facts, model))
    return Plan(cluster.name, str(cluster.file), tuple(host_plans), unreachable)


@dataclass(frozen=True)
class Prepared:
    """The plan and what it was computed from, for apply and verify."""

    intent: Intent
    desired: Mapping[str, Sequence[Resource]]
    plan: Plan


async def prepare(cluster: Cluster, conns: Mapping[str, Connection | HostError],
                  options: RunOptions, *, read_only: bool,
                  intent: Intent | None = None) -> Prepared:
    """Placement (offline), facts (one agent call per host), then the plan as data.

    A serving node's worker needs its HOME, OS and Python, which only facts give: the fact
    request is built from the desired state with "~" for HOME, which asks for the same paths
    (the wheelhouse is asked for as a directory listing, whatever its wheels turn out to be),
    and the desired state is rebuilt once facts are in. The ranks' jobs and status files come
    in the same call, so a converged serving cluster plans in one round trip per host.

    A read-only run never downloads: without the wheelhouse in this controller's cache, each
    serving host's plan is the download (`pending_wheelhouse`), which apply carries out first.
    `intent`, when the caller has placed the model already, is used as it is.
    """
    if intent is None:
        intent = await asyncio.to_thread(resolve_intent, cluster)
    nodes = serving_nodes(cluster, intent)
    sketch = desired_state(cluster, intent, nodes)
    asked = host_requests(cluster, intent, sketch)
    facts = await gather_facts(conns, {n: asked[n] for n in conns}, options.ssh.concurrency,
                               read_only=read_only)
    wheelhouse: Wheelhouse | NodePlatform | None = None
    if intent.placement is not None:
        wheelhouse = await _wheelhouse(cluster, nodes, facts, download=not read_only)
    built = wheelhouse if isinstance(wheelhouse, Wheelhouse) else None
    desired = desired_state(cluster, intent, nodes, facts, built)
    facts = await _complete_facts(conns, asked, host_requests(cluster, intent, desired), facts,
                                  options, read_only=read_only)
    result = build_plan(cluster, desired, facts)
    if intent.placement is not None:
        if isinstance(wheelhouse, NodePlatform):
            result = pending_wheelhouse(result, nodes, wheelhouse, cluster.runtime.packages)
        else:
            layout = WorkerLayout.of(cluster)
            views = [rank_view(n.name, n.rank, facts.get(n.name), layout)
                     for n in intent.placement.nodes]
            broken = ring_restart_reasons(views, len(intent.placement.nodes))
            result = couple_ring(result, worker_services(cluster, desired), broken=broken)
    check_sudo(result, desired, facts, cluster.runtime.dir)  # before any change, or never
    return Prepared(intent, desired, result)


async def _wheelhouse(cluster: Cluster, nodes: Sequence[str],
                      facts: Mapping[str, HostFacts | HostError], *,
                      download: bool) -> Wheelhouse | NodePlatform | None:
    """Packages for the nodes' platform, from this controller's cache; downloaded once when
    `download`, else the platform it would be downloaded for (None: no node answered)."""
    known = [f for n in nodes if isinstance(f := facts.get(n), HostFacts)]
    if not known:
        return None
    platform = cluster_platform(known)
    if download:
        return await ensure_wheelhouse(cluster.runtime.packages, platform)
    return cached_wheelhouse(cluster.runtime.packages, platform) or platform


def pending_wheelhouse(result: Plan, nodes: Sequence[str], platform: NodePlatform,
                       packages: Sequence[str]) -> Plan:
    """The plan when the wheelhouse is not in this controller's cache: on each serving host,
    the download, standing for everything that depends on it (the venv, the worker), which
    is known only once the wheels are. Other hosts keep their plans."""
    change = Change(
        f"wheelhouse:{platform.key}", Action.CREATE,
        (FieldChange("wheelhouse", "not in this controller's cache",
                     f"{', '.join(packages)} for {platform.key}: downloaded by orch apply"),),
        ())
    hosts = tuple(replace(h, changes=(change,)) if h.host in nodes else h for h in result.hosts)
    return replace(result, hosts=hosts)


async def _complete_facts(
    conns: Mapping[str, Connection | HostError],
    asked: Mapping[str, FactRequest],
    needed: Mapping[str, FactRequest],
    facts: Mapping[str, HostFacts | HostError],
    options: RunOptions,
    *,
    read_only: bool,
) -> dict[str, HostFacts | HostError]:
    """Ask a host again only for what the final desired state needs beyond the first request
    (nothing, for every resource orch declares today: the first request is complete)."""
    extra: dict[str, FactRequest] = {}
    for name, fact in facts.items():
        if isinstance(fact, HostFacts):
            delta = needed[name].minus(asked[name])
            if not delta.empty:
                extra[name] = delta
    if not extra:
        return dict(facts)
    added = await gather_facts({n: c for n, c in conns.items() if n in extra}, extra,
                               options.ssh.concurrency, read_only=read_only)
    merged = dict(facts)
    for name, fact in added.items():
        base = merged[name]
        merged[name] = fact if isinstance(fact, HostError) or isinstance(base, HostError) \
            else base.merged(fact)
    return merged


async def plan(cluster: Cluster, options: RunOptions,
               *, with_diff: bool = False) -> tuple[Plan, dict[str, int]]:
    """The plan, and the SSH round trips it cost per host. Writes nothing on any host.

    `with_diff` adds unified diffs of changed files, at one more round trip per such host
    (facts carry hashes, not contents, so planning a converged cluster reads no file data).
    """
    hosts = selected_hosts(cluster, options.limit)
    read_only = replace(options.ssh, install_agent=False)
    async with connected(cluster, hosts, read_only) as conns:
        result = (await prepare(cluster, conns, options, read_only=True)).plan
        if with_diff:
            result = await add_diffs(result, conns, options.ssh.concurrency)
        return result, _round_trips(conns)


async def add_diffs(result: Plan, conns: Mapping[str, Connection | HostError],
                    concurrency: int) -> Plan:
    """Fill `Change.diff` for file writes from the host's current content."""

    async def host_diffs(conn: Connection) -> HostPlan:
        host_plan = next(h for h in result.hosts if h.host == conn.name)
        writes: dict[str, tuple[str, str]] = {}
        for change in host_plan.changes:
            written = _written(change)
            if written is not None:
                writes[change.resource] = written
        if not writes:
            return host_plan
        answer = await conn.agent("read", {"paths": sorted({p for p, _ in writes.values()})})
        contents: Mapping[str, str | None] = answer["contents"]

        def with_diff(change: Change) -> Change:
            if change.resource not in writes:
                return change
            path, content = writes[change.resource]
            return replace(change, diff=unified_diff(contents.get(path), content, path))

        changes = tuple(with_diff(c) for c in host_plan.changes)
        return replace(host_plan, changes=changes)

    updated = await for_each_host({h.host: conns[h.host] for h in result.hosts
                                   if h.host in conns}, host_diffs, concurrency)
    hosts = tuple(u if isinstance(u, HostPlan) else h
                  for h, u in ((h, updated.get(h.host, h)) for h in result.hosts))
    return replace(result, hosts=hosts)


def _written(change: Change) -> tuple[str, str] | None:
    for step in change.steps:
        if step.op == "write" and "content" in step.request:  # not a controller file (a wheel)
            return str(step.request["path"]), str(step.request["content"])
    return None


def unified_diff(before: str | None, after: str, path: str) -> str:
    """`diff -u` of a file's content; binary or unreadable content is summarised."""
    old = [] if before is None else before.splitlines(keepends=True)
    lines = difflib.unified_diff(old, after.splitlines(keepends=True),
                                 fromfile=f"{path} (host)", tofile=f"{path} (wanted)")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


async def apply(
    cluster: Cluster,
    options: RunOptions,
    *,
    saved: Plan | None = None,
    serial: int | None = None,
    fail_fast: bool = False,
    command: str = "orch apply",
    only: Callable[[str, Change], bool] | None = None,
    intent: Intent | None = None,
) -> tuple[Plan, ApplyReport]:
    """Lock the cluster, plan (or check a saved plan still holds), apply, unlock.

    `only(host, change)` applies just the changes it accepts (e.g. `orch drain` pre-staging
    model files while the old ring serves); the rest stay pending, and no health check
    follows. `intent` is the placement the caller made already (drain places once).
    """
    hosts = selected_hosts(cluster, options.limit)
    async with connected(cluster, hosts, options.ssh) as conns:
        lock = ClusterLock(cluster.name, cluster.runtime.dir, new_holder(command))
        await lock.acquire(conns)
        try:
            prepared = await prepare(cluster, conns, options, read_only=False, intent=intent)
            current = prepared.plan
            if saved is not None:
                _check_saved(saved, current)
            if only is not None:
                current = current.only(only)
            transfers = for_plan(cluster, current, prepared.desired)
            async with transfers.serving(conns) if transfers else nullcontext():
                report = await apply_plan(current, conns, concurrency=options.ssh.concurrency,
                                          serial=serial, fail_fast=fail_fast,
                                          transfers=transfers)
            if transfers is not None:
                report = replace(report, extra={**report.extra, "transfers": transfers.summary()})
            if only is None and prepared.intent.placement is not None and not report.by_status(
                    HostStatus.FAILED) and not report.by_status(HostStatus.UNREACHABLE):
                report = await _verify(cluster, prepared.intent.placement, conns, report,
                                       current.has_changes)
        finally:
            await lock.release()
        return current, report


async def _verify(cluster: Cluster, placement: Placement,
                  conns: Mapping[str, Connection | HostError], report: ApplyReport,
                  changed: bool) -> ApplyReport:
    """Health after apply: every rank up, the ring of the right size, a real completion."""
    health = await verify_ring(cluster, placement, conns,
                               timeout=VERIFY_TIMEOUT if changed else VERIFY_TIMEOUT / 4)
    return replace(report, extra={**report.extra, "health": {
        "ok": health.ok, "message": health.message(), "api_url": api_url(cluster, placement)}})


def _check_saved(saved: Plan, current: Plan) -> None:
    """A saved plan is applied only if planning now gives exactly the same changes."""
    if saved.cluster != current.cluster:
        raise PlanError(f"the plan is for cluster {saved.cluster!r}, not {current.cluster!r}")
    if saved.comparable() != current.comparable() or saved.unreachable != current.unreachable:
        raise PlanError("the hosts changed since the plan was made; nothing was applied. "
                        "Run `orch plan` again and review the new plan.")


def _round_trips(conns: Mapping[str, Connection | HostError]) -> dict[str, int]:
    return {n: c.round_trips for n, c in conns.items() if not isinstance(c, HostError)}


async def facts(cluster: Cluster, options: RunOptions) -> dict[str, dict[str, object]]:
    """The facts each host gives for its desired resources, as plain JSON-able data."""
    hosts = selected_hosts(cluster, options.limit)
    intent = await asyncio.to_thread(resolve_intent, cluster)
    desired = desired_state(cluster, intent, serving_nodes(cluster, intent))
    requests = host_requests(cluster, intent, desired)
    async with connected(cluster, hosts, replace(options.ssh, install_agent=False)) as conns:
        gathered = await gather_facts(conns, {n: requests[n] for n in conns},
                                      options.ssh.concurrency, read_only=True)
    return {name: ({"unreachable": str(f)} if isinstance(f, HostError) else _plain(f))
            for name, f in gathered.items()}


def _plain(value: object) -> dict[str, object]:
    import dataclasses
    import enum

    def convert(v: object) -> object:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, Mapping):
            return {str(k): convert(x) for k, x in v.items()}
        return v

    result = convert(value)
    assert isinstance(result, dict)
    return result


async def unlock(cluster: Cluster, options: RunOptions, nonce: str) -> list[str]:
    from orchestrator.run.lock import force_unlock

    hosts = selected_hosts(cluster, options.limit)
    async with connected(cluster, hosts, options.ssh) as conns:
        return await force_unlock(conns, cluster.name, cluster.runtime.dir, nonce)
