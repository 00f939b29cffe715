"""What the cluster file asks for, decided before any host is contacted: placement and files.

This is the "placement" stage of the flow: the model's exact bytes (headers only), which nodes
serve which layers (refusing with numbers when it does not fit), and the revision's manifest
(every file with its size and hash). Nothing here talks to a Mac.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from orchestrator.config import Cluster
from orchestrator.errors import ModelError
from orchestrator.model.manifest import Manifest, model_directory
from orchestrator.placement import load_model_meta, plan_placement, require_fit
from orchestrator.placement.choose import Placement


@dataclass(frozen=True)
class Intent:
    """None everywhere for a cluster that only runs tasks."""

    placement: Placement | None = None
    manifest: Manifest | None = None
    model_dir: str | None = None  # on every node, HOME-relative

    @property
    def serving(self) -> tuple[str, ...] | None:
        """Hosts that hold a rank, in rank order; None without a model."""
        return None if self.placement is None else tuple(n.name for n in self.placement.nodes)


def without(cluster: Cluster, host: str) -> Cluster:
    """The cluster as it is once `host` is drained (for `orch drain`'s placement)."""
    hosts = dict(cluster.hosts)
    hosts[host] = replace(hosts[host], drained=True)
    return replace(cluster, hosts=hosts)  # `listed_nodes` leaves drained hosts out


def place(cluster: Cluster) -> Placement:
    """Only the placement (headers, no file hashing); PlacementError when it cannot fit."""
    assert cluster.model is not None
    return require_fit(plan_placement(cluster, load_model_meta(cluster.model)))


def resolve_intent(cluster: Cluster) -> Intent:
    """Place the model and list its files; PlacementError (with numbers) when it cannot fit.

    What reads the model (the Hub client, the hash cache) is imported only when there is one.
    """
    model = cluster.model
    if model is None:
        return Intent()
    from orchestrator.model.cache import cache_dir
    from orchestrator.model.hub import HubClient
    from orchestrator.model.manifest import hub_manifest, local_manifest
    from orchestrator.model.token import hub_token

    placement = place(cluster)
    if model.path is not None:
        manifest = local_manifest(model.path, cache=cache_dir())
        name = model.path.name
    else:
        assert model.repo is not None
        client = HubClient(model.endpoint, token=hub_token())
        manifest = hub_manifest(client, model.repo, model.revision, cache=cache_dir())
        name = model.repo
    missing = sorted({f for n in placement.nodes for f in n.files} - set(manifest.files))
    if missing:
        raise ModelError(f"the placement needs files the model does not list: {missing}")
    return Intent(placement, manifest, model_directory(cluster.runtime.dir, name))
