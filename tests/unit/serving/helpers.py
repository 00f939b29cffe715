"""Builders for serving tests: a cluster, a placement over synthetic layers, facts, plans."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import Cluster, Host, ModelSpec, PlacementSpec, Runtime
from orchestrator.facts import FileFact, FileKind, HostFacts, JobState, LaunchdJob, VenvFact
from orchestrator.placement.choose import Placement, place
from orchestrator.placement.policy import NodeSpec, PlacementPolicy
from orchestrator.worker.status import WorkerState, WorkerStatus
from tests.fixtures.facts import host_facts
from tests.unit.placement.helpers import synthetic_meta

NAMES = ("mac1", "mac2", "mac3")


def cluster(n: int = 3, memory_gb: Sequence[float] = (192, 192, 128), *,
            runtime: Runtime | None = None, name: str = "lab") -> Cluster:
    hosts = {NAMES[i]: Host(NAMES[i], f"10.0.0.{i + 1}", f"10.0.1.{i + 1}", memory_gb[i])
             for i in range(n)}
    return Cluster(name=name, file=Path("/cluster.yml"), inventory_file=None, hosts=hosts,
                   model=ModelSpec(None, None, Path("/model")),
                   placement=PlacementSpec(nodes=tuple(hosts)), runtime=runtime or Runtime())


def placement(c: Cluster, layer_bytes: Sequence[int] = (10**6,) * 6, shared: int = 10**5,
              policy: PlacementPolicy | None = None) -> Placement:
    meta = synthetic_meta(layer_bytes, shared)
    nodes = [NodeSpec(h.name, h.memory_bytes, h.chip) for h in c.hosts.values()]
    return place(meta, nodes, policy or PlacementPolicy(), requested=list(c.hosts))


def files(n: int = 3) -> dict[str, tuple[str, int | None]]:
    return {f"f{i}.safetensors": (f"{i:x}" * 64, 100 + i) for i in range(n)} | {
        "model.safetensors.index.json": ("a" * 64, None)}


def file_fact(sha: str | None, kind: FileKind = FileKind.FILE, mode: int = 0o644) -> FileFact:
    if kind is FileKind.MISSING:
        return FileFact(kind, None, None, None)
    return FileFact(kind, 1, mode, sha)


def facts(host: str = "mac1", *, files: Mapping[str, FileFact] | None = None,
          launchd: Mapping[str, LaunchdJob] | None = None,
          venvs: Mapping[str, VenvFact] | None = None,
          managed: Mapping[str, Any] | None = None,
          trees: Mapping[str, Mapping[str, FileFact]] | None = None) -> HostFacts:
    return host_facts(host, files=dict(files or {}), venvs=dict(venvs or {}),
                      launchd=dict(launchd or {}), managed=dict(managed or {}),
                      trees=dict(trees or {}))


def job(state: JobState = JobState.RUNNING, pid: int | None = 100,
        last_exit: int | None = None) -> LaunchdJob:
    return LaunchdJob(state, pid if state is JobState.RUNNING else None, last_exit, {})


def status(rank: int, state: WorkerState = WorkerState.SERVING, *, pid: int = 100,
           started_at: float = 1000.0, updated_at: float = 1010.0, world_size: int = 3,
           split: Sequence[int] = (2, 2, 2), error: str | None = None) -> WorkerStatus:
    start = sum(split[rank + 1:])
    return WorkerStatus(rank=rank, world_size=world_size, split=tuple(split),
                        layers=(start, start + split[rank]), state=state, pid=pid,
                        started_at=started_at, updated_at=updated_at, error=error,
                        param_bytes=None)
