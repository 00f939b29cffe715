"""Serving a tensor-parallel placement: what reaches the worker, and that switching pipeline →
tensor is one planned restart of the ring (each rank's job restarted exactly once)."""

from __future__ import annotations

import json
from dataclasses import replace

from orchestrator.config import Cluster, Runtime
from orchestrator.placement.choose import Placement
from orchestrator.plan.ring import couple_ring
from orchestrator.resources.launchd import LaunchdService
from orchestrator.resources.steps import LaunchdBootstrap
from orchestrator.resources.worker import WorkerSettings, worker_config, worker_resources
from tests.fixtures.facts import HOME
from tests.unit.serving.helpers import cluster, files, placement
from tests.unit.serving.test_ring import host_plan_for, plan_of, running

LAYERS = (10**6,) * 6


def tensor(c: Cluster) -> Placement:
    """The tensor placement's shape as serving reads it (every rank every layer and file;
    the byte counts are placement's business and tested there)."""
    p = placement(c, LAYERS)
    nodes = tuple(replace(n, layers=(0, len(LAYERS))) for n in p.nodes)
    return replace(p, nodes=nodes, parallelism="tensor")


def config_of(p: Placement) -> dict[str, object]:
    c = cluster()
    text = worker_config(c, p, home=HOME, model_dir="~/m", files=files(),
                         settings=WorkerSettings())
    loaded: dict[str, object] = json.loads(text)
    return loaded


def test_the_worker_is_told_tensor_and_every_rank_holds_every_layer() -> None:
    c = cluster()
    assert config_of(tensor(c))["parallelism"] == "tensor"
    assert config_of(tensor(c))["split"] == [6, 6, 6]
    pipeline = config_of(placement(c, LAYERS))
    assert "parallelism" not in pipeline  # a converged pipeline cluster restarts nothing
    assert sum(pipeline["split"]) == 6  # type: ignore[arg-type]


def service(p: Placement, rank: int) -> LaunchdService:
    c = cluster(runtime=Runtime(launchd_domain="user"))  # the jobs test_ring's helpers know
    items = worker_resources(c, p, p.nodes[rank], home=HOME, system="Darwin", user="orch",
                             model_dir="~/m", files=files())
    return next(r for r in items if isinstance(r, LaunchdService))


def test_pipeline_to_tensor_is_one_restart_of_every_rank() -> None:
    c = cluster()
    before = {n.name: service(placement(c, LAYERS), n.rank) for n in placement(c, LAYERS).nodes}
    after = {n.name: service(tensor(c), n.rank) for n in tensor(c).nodes}
    assert all(before[h].plist != after[h].plist for h in before)
    plan = plan_of(*(host_plan_for(h, after[h], running(after[h], hash_of=before[h]))
                     for h in after))
    coupled = couple_ring(plan, after)
    for host in coupled.hosts:
        bootstraps = [s for c in host.changes for s in c.steps if isinstance(s, LaunchdBootstrap)]
        assert len(bootstraps) == 1, (host.host, host.changes)
    assert couple_ring(coupled, after) == coupled
