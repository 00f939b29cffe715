"""The seam between the loaded cluster file and the pure placement functions.

RAM comes from the inventory (``memory_gb``, Apple's GiB) until facts exist, and from the facts
(``hw.memsize``) after: a host whose facts say otherwise is placed by what it really has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from orchestrator.config import Cluster, ModelSpec
from orchestrator.errors import ModelError
from orchestrator.facts import HostFacts
from orchestrator.placement.choose import Placement, place
from orchestrator.placement.hub import HubClient, Transport, load_hub_meta, urllib_transport
from orchestrator.placement.model_meta import ModelMeta, load_local_meta
from orchestrator.placement.policy import GUIDE_OVERHEAD, NodeSpec, PlacementPolicy


def nodes_from_cluster(cluster: Cluster,
                       facts: Mapping[str, HostFacts] | None = None) -> tuple[NodeSpec, ...]:
    """Every inventory host as a `NodeSpec`, in inventory order; facts override RAM and chip."""
    nodes = []
    for host in cluster.hosts.values():
        fact = (facts or {}).get(host.name)
        memory = fact.memory_bytes if fact is not None and fact.memory_bytes else None
        chip = fact.chip if fact is not None and fact.chip else None
        nodes.append(NodeSpec(name=host.name, memory_bytes=memory or host.memory_bytes,
                              chip=chip or host.chip, drained=host.drained))
    return tuple(nodes)


def policy_from_cluster(cluster: Cluster, meta: ModelMeta | None = None) -> PlacementPolicy:
    """The cluster file's placement knobs over the calibrated defaults.

    A model sized from its parameter count alone gets the guide's O = 0.2 by default: exact
    header bytes include quantization scales and biases, ``params × bits/8`` does not.
    """
    spec = cluster.placement
    overhead = spec.overhead
    if overhead is None and meta is not None and meta.estimated:
        overhead = GUIDE_OVERHEAD
    return PlacementPolicy.from_settings(reserve_gb=spec.reserve_gb, overhead=overhead,
                                         kv_cache_gb=spec.kv_cache_gb)


def plan_placement(cluster: Cluster, meta: ModelMeta,
                   facts: Mapping[str, HostFacts] | None = None) -> Placement:
    """Place the cluster's model; `require_fit` on the result refuses with numbers."""
    # A listed node that is drained (`orch drain`) is left out, as it is from `auto`.
    requested = None if cluster.placement.nodes == "auto" else tuple(
        n for n in cluster.placement.nodes if not cluster.hosts[n].drained)
    return place(meta, nodes_from_cluster(cluster, facts), policy_from_cluster(cluster, meta),
                 requested)


def load_model_meta(spec: ModelSpec, *, environ: Mapping[str, str] | None = None,
                    transport: Transport | None = None) -> ModelMeta:
    """Measure the model: the local directory when ``model.path`` is set, else the Hub.

    Reads only config, index and safetensors headers. ``HF_TOKEN`` (from ``environ``, default
    the process environment) authenticates Hub requests.
    """
    if spec.path is not None:
        return load_local_meta(spec.path)
    if spec.repo is None:
        raise ModelError("the model has neither `path` nor `repo`")
    env = os.environ if environ is None else environ
    client = HubClient(endpoint=spec.endpoint.rstrip("/"), token=env.get("HF_TOKEN") or None,
                       transport=transport or urllib_transport)
    return load_hub_meta(spec.repo, spec.revision, client=client)
