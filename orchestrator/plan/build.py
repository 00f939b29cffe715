"""The plan of a whole cluster from its desired resources and its hosts' facts: pure.

One function assembles it, in a fixed order, so the plan is never patched in several places:
each host's diff (`diff_host`), then the cluster-wide passes, each a `Plan → Plan` function —
which host each model-file copy comes from (`sources.assign_sources`), and the ranks of a ring
restarting together (`ring.couple_ring`, from the ranks' state in the same facts). No SSH, no
clock: a test gives facts and reads the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from orchestrator.config import Cluster
from orchestrator.errors import HostError
from orchestrator.facts import FactRequest, HostFacts
from orchestrator.placement.intent import Intent
from orchestrator.plan.backend import backend_request
from orchestrator.plan.core import HostPlan, Plan, diff_host, fact_request
from orchestrator.plan.ring import (
    couple_ring,
    rank_fact_request,
    rank_view,
    ring_restart_reasons,
)
from orchestrator.plan.sources import assign_sources
from orchestrator.resources.base import Action, Change, FieldChange, Resource
from orchestrator.resources.layout import WorkerLayout
from orchestrator.resources.model_files import model_files_in
from orchestrator.resources.wheelhouse import NodePlatform
from orchestrator.resources.worker import worker_services

__all__ = ["host_requests", "plan_cluster", "with_pending_wheelhouse"]


def host_requests(cluster: Cluster, intent: Intent,
                  desired: Mapping[str, Sequence[Resource]]) -> dict[str, FactRequest]:
    """Each host's one facts request: its resources' needs, plus, on a rank's node, what the
    ring's state is read from (the worker's job and status file)."""
    requests = {name: fact_request(resources, cluster.name, cluster.runtime.dir.strip("/"))
                for name, resources in desired.items()}
    if intent.placement is not None:
        observe = rank_fact_request(WorkerLayout.of(cluster)).merge(backend_request(cluster))
        for node in intent.placement.nodes:
            requests[node.name] = requests[node.name].merge(observe)
    return requests


def plan_cluster(cluster: Cluster, intent: Intent, desired: Mapping[str, Sequence[Resource]],
                 facts: Mapping[str, HostFacts | HostError], *,
                 pending_wheelhouse: NodePlatform | None = None) -> Plan:
    """Diff every host, then apply the cluster-wide passes; unreachable hosts are listed.

    `pending_wheelhouse`: the platform whose wheelhouse this controller does not have yet
    (a read-only plan never downloads); see `with_pending_wheelhouse`.
    """
    host_plans: list[HostPlan] = []
    unreachable: dict[str, str] = {}
    for name, fact in facts.items():
        if isinstance(fact, HostError):
            unreachable[name] = str(fact).removeprefix(f"{name}: ")
            continue
        host_plans.append(diff_host(cluster.name, desired[name], fact))
    model = model_files_in(desired)
    if model is not None:  # which host each model file comes from: a cluster-wide decision
        host_plans = list(assign_sources(host_plans, facts, model))
    result = Plan(cluster.name, str(cluster.file), tuple(host_plans), unreachable)
    if intent.placement is None:
        return result
    if pending_wheelhouse is not None:
        return with_pending_wheelhouse(result, intent.serving or (), pending_wheelhouse,
                                       cluster.runtime.packages)
    layout = WorkerLayout.of(cluster)
    views = [rank_view(n.name, n.rank, facts.get(n.name), layout)
             for n in intent.placement.nodes]
    broken = ring_restart_reasons(views, len(intent.placement.nodes))
    return couple_ring(result, worker_services(cluster, desired), broken=broken)


def with_pending_wheelhouse(result: Plan, nodes: Sequence[str], platform: NodePlatform,
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
