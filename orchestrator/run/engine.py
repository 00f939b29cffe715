"""One run against the cluster: connect, gather facts, plan, and (for apply) lock and apply.

The stages are the data flow of DESIGN.md; each takes the previous stage's frozen output. This
module is the only one that sequences them, and it owns the connections for the run: opened
once per host, reused by every stage, closed at the end whatever happens.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field, replace

import structlog

from orchestrator.config import Cluster
from orchestrator.errors import HostError, HostUnreachable, PlanError
from orchestrator.executor import Connection, SSHExecutor, SSHOptions, Target, for_each_host
from orchestrator.facts import FactRequest, HostFacts, Interpreter, parse_facts
from orchestrator.placement.choose import Placement
from orchestrator.placement.intent import Intent, resolve_intent
from orchestrator.plan import HostPlan, Plan
from orchestrator.plan.backend import check_backend
from orchestrator.plan.build import host_requests, plan_cluster
from orchestrator.plan.desired import desired_state, serving_nodes
from orchestrator.plan.preflight import check_disk, check_python, check_sudo, with_preflight
from orchestrator.resources.base import Change, Resource
from orchestrator.resources.layout import api_url
from orchestrator.resources.steps import ControllerFile, Text, Write
from orchestrator.resources.wheelhouse import NodePlatform, Wheelhouse, cluster_platform
from orchestrator.run.apply import ApplyReport, HostStatus, apply_plan
from orchestrator.run.lock import ClusterLock, force_unlock, new_holder
from orchestrator.run.report import LockLeft, RingCheck
from orchestrator.run.transfers import for_plan

log = structlog.get_logger(__name__)

VERIFY_TIMEOUT = 600.0  # seconds for the ring's first completion after a (re)start


@dataclass(frozen=True)
class RunOptions:
    ssh: SSHOptions = field(default_factory=SSHOptions)
    limit: tuple[str, ...] | None = None  # host names; None = every inventory host


def target_of(cluster: Cluster, name: str) -> Target:
    host = cluster.hosts[name]
    return Target(name=name, address=host.address, port=host.port, user=host.user,
                  identity_file=host.identity_file, known_hosts=cluster.ssh.known_hosts,
                  connect_timeout=cluster.ssh.connect_timeout,
                  proxy_jump=cluster.ssh.proxy_jump)


def selected_hosts(cluster: Cluster, limit: Sequence[str] | None) -> list[str]:
    if not limit:
        return list(cluster.hosts)
    unknown = [h for h in limit if h not in cluster.hosts]
    if unknown:
        raise PlanError(f"--limit names hosts not in the inventory: {', '.join(unknown)}")
    return [h for h in cluster.hosts if h in limit]


@asynccontextmanager
async def connected(cluster: Cluster, hosts: Sequence[str],
                    options: SSHOptions) -> AsyncIterator[dict[str, Connection | HostError]]:
    executor = SSHExecutor(options)
    # Every command that connects calls each host's agent next: start them while dialling.
    conns = await executor.connect_all((target_of(cluster, h) for h in hosts), start_agents=True)
    try:
        yield conns
    finally:
        await close_all(conns.values())


async def close_all(conns: Iterable[Connection | HostError]) -> None:
    """Close every connection at once. Each close waits for its agent to exit (a round trip to
    the host, which the exit status needs): one host after another, that wait was paid N
    times at the end of every run (0.35 s of a 25-host no-op). Every connection is closed even
    if one close fails; the first failure is raised after."""
    live = [c for c in conns if not isinstance(c, HostError)]
    failures = [r for r in await asyncio.gather(*(c.close() for c in live),
                                                return_exceptions=True) if r is not None]
    if failures:
        raise failures[0]


async def redial(cluster: Cluster, name: str, options: SSHOptions) -> Connection | HostError:
    """A new connection to `name`, for a caller that outlives the one it had (`orch status
    --watch` across a Mac's reboot). One attempt: the caller dials again on its next turn."""
    try:
        return await SSHExecutor(replace(options, connect_retries=0)).open(target_of(cluster, name))
    except HostError as exc:
        return exc


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
        raw = await conn.agent("facts", facts_request(request, read_only=read_only))
        return parse_facts(conn.name, raw, request)

    return await for_each_host(conns, facts_of, concurrency)


def facts_request(request: FactRequest, *, read_only: bool) -> dict[str, object]:
    """The agent's `facts` request for `request` (what its JSON is, in one place)."""
    return {**request.to_json(), "read_only": read_only}


def parsed_facts(conns: Mapping[str, Connection | HostError],
                 answers: Mapping[str, Mapping[str, object] | HostError],
                 requests: Mapping[str, FactRequest]) -> dict[str, HostFacts | HostError]:
    """Facts answers read elsewhere (with the lock), checked as `gather_facts` checks its own."""
    facts: dict[str, HostFacts | HostError] = {}
    for name, conn in conns.items():
        answer = conn if isinstance(conn, HostError) else answers[name]
        try:
            facts[name] = answer if isinstance(answer, HostError) else \
                parse_facts(name, answer, requests[name])
        except HostError as exc:
            facts[name] = exc
    return facts


@dataclass(frozen=True)
class Prepared:
    """The plan and what it was computed from, for apply and verify."""

    intent: Intent
    desired: Mapping[str, Sequence[Resource]]
    plan: Plan


@dataclass(frozen=True)
class FirstAsk:
    """What a run asks every host before it knows their facts: the placement, the nodes that
    serve it, and each host's facts request (built from the desired state with "~" for
    HOME, which asks for the same paths; the wheelhouse as a directory listing, whatever its
    wheels turn out to be). The ranks' jobs and status files are in it, so a converged
    serving cluster plans in one round trip per host."""

    intent: Intent
    nodes: Sequence[str]
    requests: Mapping[str, FactRequest]


async def first_ask(cluster: Cluster, intent: Intent | None = None) -> FirstAsk:
    """Placement (offline; `intent` when the caller placed the model already), then the
    fact requests it implies."""
    if intent is None:
        intent = await asyncio.to_thread(resolve_intent, cluster)
    nodes = serving_nodes(cluster, intent)
    return FirstAsk(intent, nodes, host_requests(cluster, intent,
                                                 desired_state(cluster, intent, nodes)))


async def prepare(cluster: Cluster, conns: Mapping[str, Connection | HostError],
                  options: RunOptions, *, read_only: bool,
                  intent: Intent | None = None) -> Prepared:
    """Placement, facts (one agent call per host), then the plan as data (`planned`)."""
    ask = await first_ask(cluster, intent)
    facts = await gather_facts(conns, {n: ask.requests[n] for n in conns},
                               options.ssh.concurrency, read_only=read_only)
    return await planned(cluster, conns, options, ask, facts, read_only=read_only)


async def planned(cluster: Cluster, conns: Mapping[str, Connection | HostError],
                  options: RunOptions, ask: FirstAsk,
                  facts: Mapping[str, HostFacts | HostError], *, read_only: bool) -> Prepared:
    """The plan from the first facts: the desired state is rebuilt once facts are in (a
    serving node's worker needs its HOME, OS and Python, which only facts give).

    A read-only run never downloads: without the wheelhouse in this controller's cache, each
    serving host's plan is the download (`with_pending_wheelhouse`), which apply does first.
    """
    intent, nodes = ask.intent, ask.nodes
    wheelhouse: Wheelhouse | NodePlatform | None = None
    # Refused before any change: a node with no Python for the venv (or none for the agent).
    pythons: dict[str, Interpreter] = check_python(
        facts, nodes if intent.placement is not None else (), cluster.runtime.python)
    if intent.placement is not None:
        wheelhouse = await _wheelhouse(cluster, nodes, facts, pythons, download=not read_only)
    built = wheelhouse if isinstance(wheelhouse, Wheelhouse) else None
    desired = desired_state(cluster, intent, nodes, facts, built, pythons)
    facts = await _complete_facts(conns, ask.requests, host_requests(cluster, intent, desired),
                                  facts, options, read_only=read_only)
    pending = wheelhouse if isinstance(wheelhouse, NodePlatform) else None
    result = plan_cluster(cluster, intent, desired, facts, pending_wheelhouse=pending)
    check_disk(desired, facts)  # before any change, or never
    check_sudo(result, desired, facts, cluster.runtime.dir)
    check_backend(cluster, intent.placement, facts)
    if intent.placement is not None:
        result = with_preflight(result, nodes, desired, facts, pythons)
    return Prepared(intent, desired, result)


async def _wheelhouse(cluster: Cluster, nodes: Sequence[str],
                      facts: Mapping[str, HostFacts | HostError],
                      pythons: Mapping[str, Interpreter], *,
                      download: bool) -> Wheelhouse | NodePlatform | None:
    """Packages for the nodes' platform (the Python version of each node's chosen
    interpreter), from this controller's cache; downloaded once when `download`, else the
    platform it would be downloaded for (None: no node answered). Imported here, as `_verify`
    imports the health checks: only a cluster that serves a model needs them."""
    from orchestrator.run.wheelhouse import cached_wheelhouse, ensure_wheelhouse

    known = [f for n in nodes if isinstance(f := facts.get(n), HostFacts)]
    if not known:
        return None
    platform = cluster_platform(known, pythons)
    if download:
        return await ensure_wheelhouse(cluster.runtime.packages, platform)
    return cached_wheelhouse(cluster.runtime.packages, platform) or platform


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
            return replace(host_plan, changes=tuple(_with_summary(c) for c in host_plan.changes))
        answer = await conn.agent("read", {"paths": sorted({p for p, _ in writes.values()})})
        contents: Mapping[str, str | None] = answer["contents"]

        def with_diff(change: Change) -> Change:
            if change.resource not in writes:
                return _with_summary(change)
            path, content = writes[change.resource]
            return replace(change, diff=unified_diff(contents.get(path), content, path))

        changes = tuple(with_diff(c) for c in host_plan.changes)
        return replace(host_plan, changes=changes)

    updated = await for_each_host({h.host: conns[h.host] for h in result.hosts
                                   if h.host in conns}, host_diffs, concurrency)
    hosts = tuple(u if isinstance(u, HostPlan) else h
                  for h, u in ((h, updated.get(h.host, h)) for h in result.hosts))
    return replace(result, hosts=hosts)


def _with_summary(change: Change) -> Change:
    """A copy's "diff": which files are sent from where, by sha256; binary-safe, and no file
    is read on either side to make it."""
    sent = [(s.path, s.payload) for s in change.steps
            if isinstance(s, Write) and isinstance(s.payload, ControllerFile)]
    if not change.resource.startswith("copy:") or not sent:
        return change
    lines = [f"{len(sent)} file(s) sent as bytes (content not shown):"]
    lines += [f"  {path} <- {source.path} (sha256 {source.sha256[:12]})"
              for path, source in sent]
    return replace(change, diff="\n".join(lines) + "\n")


def _written(change: Change) -> tuple[str, str] | None:
    """(path, content) of the change's text write; a controller file (a wheel) has no diff."""
    for step in change.steps:
        if isinstance(step, Write) and isinstance(step.payload, Text):
            return step.path, step.payload.content
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
        ask = await first_ask(cluster, intent)  # offline: nothing is locked yet
        lock = ClusterLock(cluster.name, cluster.runtime.dir, new_holder(command),
                           cluster_file=str(cluster.file), concurrency=options.ssh.concurrency)
        # Each host's facts travel with its lock (one round trip); raises having released
        # what it took.
        answers = await lock.acquire(conns, facts={
            n: facts_request(ask.requests[n], read_only=False)
            for n, c in conns.items() if not isinstance(c, HostError)})
        try:
            facts = parsed_facts(conns, answers, ask.requests)
            current, report = await _locked_apply(cluster, conns, options, ask, facts,
                                                  saved=saved, serial=serial,
                                                  fail_fast=fail_fast, only=only)
        except BaseException:
            await lock.release()  # what it cannot release is logged with the unlock command
            raise
        # Released after the report exists, and folded into it: a host lost now must not
        # take the report of what every other host did with it.
        return current, _with_release(report, await lock.release(), lock.unlock_hint)


async def _locked_apply(cluster: Cluster, conns: Mapping[str, Connection | HostError],
                        options: RunOptions, ask: FirstAsk,
                        facts: Mapping[str, HostFacts | HostError], *, saved: Plan | None,
                        serial: int | None, fail_fast: bool,
                        only: Callable[[str, Change], bool] | None) -> tuple[Plan, ApplyReport]:
    """Plan (or check a saved plan), apply and verify, with the cluster lock held."""
    prepared = await planned(cluster, conns, options, ask, facts, read_only=False)
    current = prepared.plan
    if saved is not None:
        _check_saved(saved, current)
    if only is not None:
        current = current.only(only)
    transfers = for_plan(cluster, current, prepared.desired)
    async with transfers.serving(conns) if transfers else nullcontext():
        report = await apply_plan(current, conns, concurrency=options.ssh.concurrency,
                                  serial=serial, fail_fast=fail_fast, transfers=transfers,
                                  state_dir=cluster.runtime.dir.strip("/"))
    if transfers is not None:
        report = replace(report, transfers=transfers.summary())
    if only is None and prepared.intent.placement is not None and not report.by_status(
            HostStatus.FAILED) and not report.by_status(HostStatus.UNREACHABLE):
        report = await _verify(cluster, prepared.intent.placement, conns, report,
                               current.has_changes)
    return current, report


def _with_release(report: ApplyReport, failures: Mapping[str, HostError],
                  unlock_hint: str) -> ApplyReport:
    """The report, plus where this run's lock is left and how to remove it.

    A host that converged but kept the lock is no longer `ok`: the next apply will be refused
    there, so it counts as failed (unreachable, if the host was lost), which sets the exit code.
    """
    if not failures:
        return report
    outcomes = []
    for outcome in report.outcomes:
        error = failures.get(outcome.host)
        if error is not None and outcome.status in (HostStatus.OK, HostStatus.CHANGED):
            status = (HostStatus.UNREACHABLE if isinstance(error, HostUnreachable)
                      else HostStatus.FAILED)
            reason = str(error).removeprefix(f"{outcome.host}: ")
            outcome = replace(outcome, status=status,
                              error=f"converged, but the cluster lock was not released: {reason}")
        outcomes.append(outcome)
    left = {host: str(error).removeprefix(f"{host}: ") for host, error in failures.items()}
    return replace(report, outcomes=tuple(outcomes),
                   lock=LockLeft(dict(sorted(left.items())), unlock_hint))


async def _verify(cluster: Cluster, placement: Placement,
                  conns: Mapping[str, Connection | HostError], report: ApplyReport,
                  changed: bool) -> ApplyReport:
    """Health after apply: every rank up, the ring of the right size, a real completion."""
    from orchestrator.verify.ring import verify_ring

    health = await verify_ring(cluster, placement, conns,
                               timeout=VERIFY_TIMEOUT if changed else VERIFY_TIMEOUT / 4)
    return replace(report, health=RingCheck(health.ok, health.message(),
                                            api_url(cluster, placement)))


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
        if isinstance(v, tuple | list):
            return [convert(x) for x in v]
        return v

    result = convert(value)
    assert isinstance(result, dict)
    return result


async def unlock(cluster: Cluster, options: RunOptions, nonce: str) -> list[str]:
    """Remove lock `nonce` from every host that has it; a host not reached is raised (exit 3)
    after the others were cleared, never skipped in silence."""
    hosts = selected_hosts(cluster, options.limit)
    async with connected(cluster, hosts, options.ssh) as conns:
        return await force_unlock(conns, cluster.name, cluster.runtime.dir, nonce,
                                  concurrency=options.ssh.concurrency)
