"""The seam between the loaded cluster file and the pure placement functions.

RAM and chip come from the inventory (``memory_gb``, Apple's GiB): placement runs before any
host is contacted, since which files each node needs (and so what facts to ask for) follows
from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from orchestrator.config import Cluster, ModelSpec
from orchestrator.errors import ModelError
from orchestrator.model.meta import ModelMeta, load_local_meta
from orchestrator.model.token import hub_token
from orchestrator.placement.choose import Placement
from orchestrator.placement.parallel import place_model
from orchestrator.placement.policy import GUIDE_OVERHEAD, NodeSpec, PlacementPolicy

if TYPE_CHECKING:
    from orchestrator.model.hub import Transport

# The link a backend implies when `placement.link` is not set (the ring: the policy's default).
BACKEND_LINKS = {"jaccl": "rdma", "jaccl-ring": "rdma"}


def nodes_from_cluster(cluster: Cluster) -> tuple[NodeSpec, ...]:
    """Every inventory host as a `NodeSpec`, in inventory order."""
    return tuple(NodeSpec(name=host.name, memory_bytes=host.memory_bytes, chip=host.chip,
                          drained=host.drained) for host in cluster.hosts.values())


def policy_from_cluster(cluster: Cluster, meta: ModelMeta | None = None) -> PlacementPolicy:
    """The cluster file's placement knobs over the calibrated defaults.

    A model sized from its parameter count alone gets the guide's O = 0.2 by default: exact
    header bytes include quantization scales and biases, ``params × bits/8`` does not.
    Without ``placement.link``, the link is the one ``runtime.backend`` runs over: ``rdma``
    for ``jaccl``/``jaccl-ring`` (else the estimates would price RDMA's all-reduces as
    Ethernet's and ``auto`` would never choose tensor where it pays off), ``ethernet`` for the
    ring.
    """
    spec = cluster.placement
    overhead = spec.overhead
    if overhead is None and meta is not None and meta.estimated:
        overhead = GUIDE_OVERHEAD
    return PlacementPolicy.from_settings(reserve_gb=spec.reserve_gb, overhead=overhead,
                                         kv_cache_gb=spec.kv_cache_gb,
                                         link=spec.link or BACKEND_LINKS.get(
                                             cluster.runtime.backend),
                                         link_latency_ms=spec.link_latency_ms,
                                         link_bandwidth_gb_s=spec.link_bandwidth_gb_s)


def plan_placement(cluster: Cluster, meta: ModelMeta) -> Placement:
    """Place the cluster's model; `require_fit` on the result refuses with numbers."""
    return place_model(meta, nodes_from_cluster(cluster), policy_from_cluster(cluster, meta),
                       cluster.listed_nodes, cluster.placement.parallelism)


def load_model_meta(spec: ModelSpec, *, environ: Mapping[str, str] | None = None,
                    transport: Transport | None = None) -> ModelMeta:
    """Measure the model: the local directory when ``model.path`` is set, else the Hub.

    Reads only config, index and safetensors headers. The Hub token is `hub_token`'s (the
    same one the sync uses: ``HF_TOKEN``, else the file ``hf auth login`` writes).
    The Hub client is imported here: a cluster without a model never needs it.
    """
    from orchestrator.model.hub import HubClient, load_hub_meta, urllib_transport

    if spec.path is not None:
        return load_local_meta(spec.path)
    if spec.repo is None:
        raise ModelError("the model has neither `path` nor `repo`")
    client = HubClient(endpoint=spec.endpoint.rstrip("/"), token=hub_token(environ),
                       transport=transport or urllib_transport)
    return load_hub_meta(spec.repo, spec.revision, client=client)
