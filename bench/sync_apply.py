"""The controller of one bench run: the real ``orch apply``, with the model's files per node
given by hand (``python -m bench.sync_apply CLUSTER FILES.json``).

Why a process of its own: its peak RSS is the controller's, measured by the bench from the
kernel (``wait4``), with nothing else (the Hub, the bench's sampler) in it. Everything below
the file lists is real: the Hub's tree API and manifest, facts, the plan and its sources,
SSH, the agents, the peer servers. The placement is replaced because the bench's model is
random bytes (no safetensors header to place by) and because tensor parallelism, where
every node needs every file, is not placed by orch yet.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from orchestrator.cli import main as orch_main
from orchestrator.config import Cluster
from orchestrator.model.cache import cache_dir
from orchestrator.model.hub import HubClient
from orchestrator.model.manifest import hub_manifest, model_directory
from orchestrator.model.token import hub_token
from orchestrator.placement.intent import Intent
from orchestrator.resources.base import Resource
from orchestrator.resources.model_files import model_files_by_host
from orchestrator.run import engine, transfers


def run(cluster_file: Path, files: dict[str, list[str]], known_hosts: Path) -> int:
    def desired(cluster: Cluster, intent: Intent, nodes: Sequence[str],
                facts: object = None, wheelhouse: object = None,
                pythons: object = None) -> dict[str, list[Resource]]:
        assert cluster.model is not None and cluster.model.repo is not None
        client = HubClient(endpoint=cluster.model.endpoint, token=hub_token())
        manifest = hub_manifest(client, cluster.model.repo, cluster.model.revision,
                                cache=cache_dir())
        directory = model_directory(cluster.runtime.dir, cluster.model.repo)
        by_host = model_files_by_host(manifest, directory, files,
                                      holders=[h for h in cluster.hosts if h not in files])
        return {name: [by_host[name]] if name in by_host else [] for name in cluster.hosts}

    if os.environ.get("ORCH_BENCH_STORE_AND_FORWARD"):
        transfers.RELAY = False  # the bench's baseline: each copy waits for a whole file
    engine.resolve_intent = lambda cluster: Intent()  # type: ignore[assignment]
    engine.desired_state = desired  # type: ignore[assignment]
    try:
        orch_main(["--log-format", "json", "-q", "apply", str(cluster_file), "--yes", "--json",
                   "--known-hosts", str(known_hosts)], standalone_mode=False)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()),
                 Path(sys.argv[3])))
