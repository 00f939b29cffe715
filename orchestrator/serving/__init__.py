"""Serving: what turns a placement into a running, verified MLX ring on the nodes.

Where each piece enters the flow (config → placement → facts → plan → apply → verify):

- desired state: `worker_resources` (per serving node, after placement and a first facts
  call for HOME and the OS), with a `Wheelhouse` from `ensure_wheelhouse` /
  `cluster_platform` so packages are downloaded once, not once per node;
- build_plan: `couple_ring` over the plan, with `ring_restart_reasons` from observed ranks,
  so the ranks of a ring restart together;
- apply: `orchestrator.apply.run_step` pushes the wheelhouse's ``write`` steps that carry a
  controller file (its path and sha256 in the plan, its bytes read at apply time);
- after apply: `verify_ring` (a real completion, every rank in a ring of the right size);
- status: `orchestrator.status.gather_status` reads the same layout (`WorkerLayout`).

Modules: `layout` (paths, label, addresses), `wired` (iogpu.wired_limit_mb), `wheelhouse`
(package download and push), `resources` (the node's resource list), `ring` (coupling, broken
rings), `observe` (reading ranks), `verify` (readiness).
"""

from orchestrator.serving.layout import (
    WorkerLayout,
    absolute,
    api_bind_host,
    api_url,
    ring_endpoints,
)
from orchestrator.serving.observe import Observation, observe_rank, observe_ring
from orchestrator.serving.resources import (
    FileDigest,
    ModelInputs,
    WorkerSettings,
    model_inputs,
    python_env,
    worker_config,
    worker_resources,
    worker_services,
)
from orchestrator.serving.ring import RankView, couple_ring, restart_change, ring_restart_reasons
from orchestrator.serving.verify import RingHealth, verify_ring
from orchestrator.serving.wheelhouse import (
    NodePlatform,
    Wheel,
    Wheelhouse,
    WheelhouseFiles,
    build_wheelhouse,
    cluster_platform,
    ensure_wheelhouse,
    node_requirements,
    platform_of,
)
from orchestrator.serving.wired import default_wired_limit_mb, wired_limit

__all__ = [
    "FileDigest",
    "ModelInputs",
    "NodePlatform",
    "Observation",
    "RankView",
    "RingHealth",
    "Wheel",
    "Wheelhouse",
    "WheelhouseFiles",
    "WorkerLayout",
    "WorkerSettings",
    "absolute",
    "api_bind_host",
    "api_url",
    "build_wheelhouse",
    "cluster_platform",
    "couple_ring",
    "default_wired_limit_mb",
    "ensure_wheelhouse",
    "model_inputs",
    "node_requirements",
    "observe_rank",
    "observe_ring",
    "platform_of",
    "python_env",
    "restart_change",
    "ring_endpoints",
    "ring_restart_reasons",
    "verify_ring",
    "wired_limit",
    "worker_config",
    "worker_resources",
    "worker_services",
]
