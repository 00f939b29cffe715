"""A cluster that only holds a model's files: `orch apply` with the files per node given.

Why: the sync's tests and bench exercise the real apply (the Hub's tree API and manifest,
facts, the plan and its sources, SSH, the agents, the peer servers) on models that placement
cannot or need not place — random bytes with no safetensors header, tensor parallelism given
by hand, a node joining. `desired_state` stands in for the engine's: each host declares only
its model files, nothing to serve. `apply_argv` sets up a process whose real CLI then runs
``orch apply`` (bench/sync_apply.py, tests/fixtures/files_apply.py): a controller of its
own, which a bench can measure or a test can kill.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from orchestrator.config import Cluster
from orchestrator.model.cache import cache_dir
from orchestrator.model.hub import HubClient
from orchestrator.model.manifest import hub_manifest, model_directory
from orchestrator.model.token import hub_token
from orchestrator.placement.intent import Intent
from orchestrator.resources.base import Resource
from orchestrator.resources.model_files import model_files_by_host

__all__ = ["DesiredState", "FilesFor", "apply_argv", "desired_state", "install"]

FilesFor = Callable[[Cluster], Mapping[str, Sequence[str]]]  # host -> its weight files
DesiredState = Callable[..., dict[str, list[Resource]]]


def desired_state(files_for: FilesFor, *, holders: bool = False) -> DesiredState:
    """The engine's ``desired_state`` for a cluster whose hosts declare only model files.

    ``files_for(cluster)``: each serving host's weight files (the metadata files the
    manifest has are added, as for a real placement). ``holders``: the cluster's other hosts
    declare a fetch-nothing set, so the planner knows what they can serve (as for drained
    hosts); otherwise they declare nothing."""

    def desired(cluster: Cluster, intent: Intent, nodes: Sequence[str],
                facts: object = None, wheelhouse: object = None,
                pythons: object = None) -> dict[str, list[Resource]]:
        assert cluster.model is not None and cluster.model.repo is not None
        client = HubClient(endpoint=cluster.model.endpoint, token=hub_token())
        manifest = hub_manifest(client, cluster.model.repo, cluster.model.revision,
                                cache=cache_dir())
        files = files_for(cluster)
        others = [h for h in cluster.hosts if h not in files] if holders else []
        by_host = model_files_by_host(manifest, model_directory(cluster.runtime.dir,
                                                                cluster.model.repo),
                                      files, holders=others)
        return {name: [by_host[name]] if name in by_host else [] for name in cluster.hosts}

    return desired


def install(files_for: FilesFor, *, holders: bool = False) -> None:
    """Make this process's engine plan only model files (no workers, no Python env)."""
    from orchestrator.run import engine

    engine.resolve_intent = lambda cluster: Intent()  # type: ignore[attr-defined]
    engine.desired_state = desired_state(files_for, holders=holders)  # type: ignore[attr-defined]


def apply_argv(argv: Sequence[str]) -> list[str]:
    """``CLUSTER FILES.json KNOWN_HOSTS [ORCH OPTION...]`` -> the argv of ``orch apply CLUSTER
    --yes --json``, after `install` with the files per host from FILES.json (hosts it leaves
    out hold files for the others). Extra options go before ``apply`` (``-q``,
    ``--log-format json``). The CLI itself is the caller's to run: it sits above this layer."""
    cluster_file, files_json, known_hosts, *options = argv
    files: dict[str, list[str]] = json.loads(Path(files_json).read_text())
    install(lambda cluster: files, holders=True)
    return [*options, "apply", cluster_file, "--yes", "--json", "--known-hosts", known_hosts]
