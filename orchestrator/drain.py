"""Roll a node out of a running cluster (or back in) with the shortest outage.

The order is what keeps the outage short: the new placement is checked first (refused with
numbers, nothing changed, if the remaining nodes cannot hold the model); every file the new
placement needs is copied from peers while the old ring keeps serving, and a returning node
gets everything but its running worker (environment, wheelhouse, configs) then too; only then
is the drain declared in the inventory and the cluster converged, which restarts the ring with
its new hostfile and split and removes the drained node's worker (its files stay: a LAN source).
A probe asks the API for a completion throughout, so the outage reported is the real one:
from the last answer of the old ring to the first answer of the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from orchestrator.config import Cluster, load_cluster
from orchestrator.config.edit import set_drained
from orchestrator.errors import PlanError
from orchestrator.placement.intent import place, resolve_intent, without
from orchestrator.plan import Plan
from orchestrator.resources.base import Action, Change
from orchestrator.resources.layout import WorkerLayout, api_url
from orchestrator.run import engine
from orchestrator.run.apply import ApplyReport
from orchestrator.run.engine import RunOptions
from orchestrator.verify.health import chat_completion

PROBE_INTERVAL = 0.5
PROBE_TIMEOUT = 5.0  # seconds a probe's completion may take before it counts as no answer


@dataclass
class Probe:
    """Completions asked of every API URL the ring may answer on, with their outcomes."""

    urls: list[str]
    answers: list[tuple[float, str, bool]] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    asked: asyncio.Event = field(default_factory=asyncio.Event)  # set once every URL was asked

    async def run(self) -> None:
        while not self.stop.is_set():
            for url in list(self.urls):
                try:
                    await chat_completion(url, "ping", max_tokens=1, timeout=PROBE_TIMEOUT)
                    ok = True
                except Exception:
                    ok = False
                self.answers.append((time.time(), url, ok))
            self.asked.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), PROBE_INTERVAL)

    def outage(self, cut_started: float) -> tuple[float | None, float | None]:
        """(last answer before the cut-over's first failure, first answer after it)."""
        after = [a for a in self.answers if a[0] >= cut_started]
        first_fail = next((t for t, _, ok in after if not ok), None)
        if first_fail is None:
            return None, None
        last_ok = max((t for t, _, ok in self.answers if ok and t < first_fail), default=None)
        back = next((t for t, _, ok in self.answers if ok and t > first_fail), None)
        return last_ok, back


@dataclass(frozen=True)
class RollReport:
    node: str
    drained: bool
    staged: ApplyReport
    cutover_plan: Plan
    cutover: ApplyReport
    last_old_answer: float | None
    first_new_answer: float | None

    @property
    def outage_s(self) -> float | None:
        if self.last_old_answer is None or self.first_new_answer is None:
            return None
        return self.first_new_answer - self.last_old_answer

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "drained": self.drained, "outage_s": self.outage_s,
                "last_old_answer": self.last_old_answer,
                "first_new_answer": self.first_new_answer,
                "staged_transfers": self.staged.transfers,
                "cutover_transfers": self.cutover.transfers,
                # What the outage was spent on, as "host resource action" lines.
                "cutover_changes": [f"{host} {change.resource} {change.action.value}"
                                    for host, change in self.cutover_plan.changes],
                "health": self.cutover.health.to_json() if self.cutover.health else None}


def _copies_model_files(change: Change) -> bool:
    """What is pre-staged while the old ring serves: the changes that fetch model files (the
    steps the sync runs), chosen by their step types, not by parsing resource ids."""
    return bool(change.fetches)


def prestaged(old_ring: Sequence[str], worker: str) -> Callable[[str, Change], bool]:
    """What can be applied while the old ring serves: model files on any host, and on a host
    outside the old ring (a node coming back) everything but starting its worker — its
    Python environment, wheelhouse, wired limit and configs — so the cut-over only restarts
    ranks, and an undrain's outage is a drain's. `worker` is the worker job's resource id."""
    running = set(old_ring)

    def keep(host: str, change: Change) -> bool:
        if _copies_model_files(change):
            return True
        return (host not in running and change.resource != worker
                and change.action is not Action.DELETE)

    return keep


def _undrained(cluster: Cluster, host: str) -> Cluster:
    hosts = dict(cluster.hosts)
    hosts[host] = replace(hosts[host], drained=False)
    return replace(cluster, hosts=hosts)


async def roll(cluster_file: Path, node: str, options: RunOptions, *, drain: bool,
               echo: Callable[[str], None]) -> RollReport:
    """Drain `node` (or undrain it): check, pre-stage, declare, cut over, verify."""
    cluster = load_cluster(cluster_file)
    if node not in cluster.hosts:
        raise PlanError(f"{node!r} is not a host of {cluster_file}")
    if cluster.inventory_file is None:
        raise PlanError("drain records its result in the inventory file; this cluster's hosts "
                        "are inline: move them to an `inventory:` file")
    if cluster.model is None:
        raise PlanError(f"{cluster_file} serves no model: there is nothing to drain from")
    target = without(cluster, node) if drain else _undrained(cluster, node)
    # Refuses with numbers (PlacementError) before anything is touched; placed once, here.
    new = await asyncio.to_thread(resolve_intent, target)
    old = await asyncio.to_thread(place, cluster)
    assert new.placement is not None
    old_ring = [n.name for n in old.nodes]
    echo(f"{'drain' if drain else 'undrain'} {node}: ring "
         f"{', '.join(old_ring)} → {', '.join(new.serving or ())}, "
         f"{new.placement.split_text}")

    probe = Probe([api_url(cluster, old)])
    probing = asyncio.create_task(probe.run())
    try:
        keep = prestaged(old_ring, WorkerLayout.of(cluster).service_id)
        _, staged = await engine.apply(target, options, only=keep, intent=new,
                                       command=f"orch {'drain' if drain else 'undrain'} "
                                               f"(pre-stage) {node}")
        echo("pre-staged: " + _bytes_line(staged))
        declared = _declare(cluster_file, cluster.inventory_file, node, drain)
        new_url = api_url(declared, new.placement)
        if new_url not in probe.urls:
            probe.urls.append(new_url)
        # The outage runs from the old ring's last answer before the cut: wait for the probe's
        # first answer (at most PROBE_TIMEOUT), else a quick pre-stage cuts before the probe
        # has heard the old ring at all, and no outage can be told.
        asked = asyncio.ensure_future(probe.asked.wait())
        await asyncio.wait({asked, probing}, return_when=asyncio.FIRST_COMPLETED)
        asked.cancel()  # still waiting only if the probe ended (raised at `await probing`)
        cut_started = time.time()
        plan, cutover = await engine.apply(declared, options, intent=new,
                                           command=f"orch {'drain' if drain else 'undrain'} "
                                                   f"{node}")
        # Give the probe the new ring's first answer (apply already waited for readiness).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
                ok and url == new_url and t >= cut_started for t, url, ok in probe.answers):
            await asyncio.sleep(PROBE_INTERVAL)
    finally:
        probe.stop.set()
        await probing
    last_old, first_new = probe.outage(cut_started)
    if last_old is None:  # the probe never saw the ring down
        first_new = last_old = next((t for t, url, ok in probe.answers
                                     if ok and url == new_url and t >= cut_started), None)
    return RollReport(node, drain, staged, plan, cutover, last_old, first_new)


def _declare(cluster_file: Path, inventory: Path, node: str, drain: bool) -> Cluster:
    """Record the drain in the inventory; an undrain removes the host's own `drained` key (the
    file returns to what it was) and writes `drained: false` only if a group still drains it."""
    set_drained(inventory, node, drain)
    declared = load_cluster(cluster_file)
    if not drain and declared.hosts[node].drained:
        set_drained(inventory, node, False, inherited=True)
        declared = load_cluster(cluster_file)
    return declared


def _bytes_line(report: ApplyReport) -> str:
    summary = report.transfers
    if not summary:
        return "nothing to copy"
    b = summary["bytes"]
    return (f"{summary['files']} files, {b['lan']} bytes over the LAN, {b['hub']} from the "
            f"Hub, {b['local']} from the controller")
