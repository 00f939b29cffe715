"""What one serving node holds, as resources in apply order: env, limits, files, the job.

`worker_resources` is pure: placement, the node's HOME and the model files' hashes in, a
resource list out. Order is the apply order on the host, and it carries the safety rule "a
rank never starts before every file it needs is verified": every file the worker reads (and the
model files, which the shard sync declares before these) is written and sha256-checked by the
agent before the job's bootstrap step runs, and the worker itself re-verifies the model files
before it joins the ring.

Everything the job reads is an input of its plist hash (``ORCH_CONFIG_HASH``): the script, the
hostfile, the config (which lists the model files with their sha256) and ``inputs_digest``. So
a change to any of them changes the plist, and the running job's hash (from ``launchctl
print``) differs until it is restarted: level-triggered, and visible on the host even if a run
dies between writing a file and restarting the job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from orchestrator.config import Cluster
from orchestrator.placement.choose import NodePlacement, Placement
from orchestrator.resources.base import Resource
from orchestrator.resources.files import Directory, File
from orchestrator.resources.jaccl import jaccl_env, render_ibv_devices
from orchestrator.resources.launchd import LaunchdService, render_plist
from orchestrator.resources.layout import WorkerLayout, absolute, api_bind_host, ring_endpoints
from orchestrator.resources.pyenv import PythonEnv
from orchestrator.resources.wheelhouse import Wheelhouse, node_requirements
from orchestrator.resources.wired import wired_limit
from orchestrator.worker import worker_script
from orchestrator.worker.hostfile import render_hostfile

__all__ = [
    "FileDigest",
    "ModelInputs",
    "WorkerSettings",
    "model_inputs",
    "python_env",
    "worker_config",
    "worker_resources",
    "worker_services",
]

FileDigest = tuple[str, int | None]  # (sha256, size in bytes or None)


class _Entry(Protocol):
    @property
    def size(self) -> int: ...
    @property
    def sha256(self) -> str | None: ...


class _Manifest(Protocol):
    @property
    def files(self) -> Mapping[str, _Entry]: ...


class _ModelFiles(Protocol):
    """What `orchestrator.resources.model_files.ModelFiles` offers (duck-typed)."""

    @property
    def id(self) -> str: ...
    @property
    def directory(self) -> str: ...
    @property
    def needed(self) -> frozenset[str]: ...
    @property
    def manifest(self) -> _Manifest: ...


@dataclass(frozen=True)
class ModelInputs:
    """The shard sync's answer for one node, as `worker_resources` takes it."""

    model_dir: str
    files: Mapping[str, FileDigest]
    model_files_id: str


def model_inputs(model_files: _ModelFiles) -> ModelInputs:
    """A node's `ModelFiles` → the worker's model dir, its files with sha256 and size (only
    the files it needs: the worker verifies exactly those), and the id it must wait for."""
    files: dict[str, FileDigest] = {}
    for rel in sorted(model_files.needed):
        entry = model_files.manifest.files[rel]
        if entry.sha256 is None:
            raise ValueError(f"{rel}: a needed model file has no sha256 to verify")
        files[rel] = (entry.sha256, entry.size)
    return ModelInputs(model_files.directory, files, model_files.id)


@dataclass(frozen=True)
class WorkerSettings:
    """How the worker job runs; defaults are what a Mac cluster wants."""

    throttle_interval: int = 10  # launchd's minimum seconds between (re)starts
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment (MLX_RING_VERBOSE…)
    api_host: str | None = None  # rank 0's bind address; None: see `api_bind_host`
    server_args: tuple[str, ...] = ()  # appended to mlx_lm.server's command line


# pip byte-compiles every installed module by default: for mlx-lm's dependencies (transformers
# above all) that is ~11 s of CPU per node, 60 % of the install (measured: 18.8 s → 7.3 s).
# Python compiles what the worker imports at its first start instead.
PIP_ARGS = ("--no-compile",)


def python_env(cluster: Cluster, system: str, wheelhouse: Wheelhouse | None,
               python: str | None = None) -> PythonEnv:
    """The node's venv, made by `python` (the node's chosen interpreter, see
    `orchestrator.resources.interpreter`; None: runtime.python as written). With a
    wheelhouse: offline from it, every package pinned (a lock); without: the cluster's pins
    from the package index (each node downloads)."""
    layout = WorkerLayout.of(cluster)
    choice = cluster.runtime.python
    python = python or (choice if choice.startswith(("/", "~/")) else "python3")
    if wheelhouse is None:
        return PythonEnv(layout.venv, python,
                         node_requirements(cluster.runtime.packages, system), pip_args=PIP_ARGS,
                         choice=choice)
    find_links = layout.wheelhouse(wheelhouse.key).removeprefix("~/")  # pip runs from HOME
    return PythonEnv(layout.venv, python, wheelhouse.pins,
                     pip_args=(*PIP_ARGS, "--no-index", "--find-links", find_links),
                     choice=choice, python_version=wheelhouse.platform.python)


def worker_config(cluster: Cluster, placement: Placement, *, home: str, model_dir: str,
                  files: Mapping[str, FileDigest], settings: WorkerSettings) -> str:
    """The worker's JSON config (see ``mlx_worker.py``), deterministic to the byte."""
    layout = WorkerLayout.of(cluster)
    config = {
        "model_dir": absolute(model_dir, home),
        "split": list(placement.split),
        "host": settings.api_host or api_bind_host(cluster, placement),
        "port": cluster.runtime.api_port,
        "expected_world_size": len(placement.nodes),
        "files": {rel: ({"sha256": sha, "size": size} if size is not None else sha)
                  for rel, (sha, size) in sorted(files.items())},
        "status_path": absolute(layout.status, home),
    }
    if settings.server_args:
        config["server_args"] = list(settings.server_args)
    if placement.parallelism == "tensor":  # mlx_lm.server without --pipeline; split = [L]*N
        config["parallelism"] = "tensor"
    if cluster.runtime.backend != "ring":  # absent when default: an upgrade restarts nothing
        config["backend"] = cluster.runtime.backend
    elif len(placement.nodes) > 1:  # where the ranks meet before mlx forms the ring
        rank0_ip = ring_endpoints(cluster, placement)[0][0]
        config["rendezvous"] = f"{rank0_ip}:{cluster.runtime.rendezvous_port}"
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def worker_resources(
    cluster: Cluster,
    placement: Placement,
    node: NodePlacement,
    *,
    home: str,
    system: str,
    user: str,
    model_dir: str,
    files: Mapping[str, FileDigest],
    model_files_id: str | None = None,
    inputs_digest: str = "",
    wheelhouse: Wheelhouse | None = None,
    settings: WorkerSettings | None = None,
    python: str | None = None,
) -> list[Resource]:
    """One serving node's resources, in apply order.

    ``home``, ``user`` and ``system`` are the node's facts (``HostFacts.home``, ``.user``,
    ``.os_system``): launchd and the worker need absolute paths, a LaunchDaemon runs as the
    SSH user (``UserName``), and the MLX build depends on the OS.
    ``model_dir`` / ``files`` (this rank's files, relative path → (sha256, size)) and
    ``model_files_id`` come from the shard sync; ``files`` must include config, tokenizer and
    ``model.safetensors.index.json``, not only weights. ``inputs_digest`` is anything else the
    worker depends on (it is already implied by ``files``' hashes; passing them again is
    harmless). ``python`` is the interpreter that creates the venv (the node's chosen one).
    """
    settings = settings or WorkerSettings()
    layout = WorkerLayout.of(cluster)
    multi = len(placement.nodes) > 1
    resources: list[Resource] = []
    if wheelhouse is not None:
        resources.append(wheelhouse.files(layout.wheelhouse(wheelhouse.key)))
    env_resource = python_env(cluster, system, wheelhouse, python)
    resources.append(env_resource)
    sysctl = wired_limit(node, layout.root)
    if sysctl is not None:
        resources.append(sysctl)
    script = File(layout.script, worker_script().decode(), 0o644)
    ring = cluster.runtime.backend == "ring"
    if not multi:
        hostfile = None
    elif ring:
        hostfile = File(layout.hostfile, render_hostfile(ring_endpoints(cluster, placement)),
                        0o644)
    else:  # jaccl / jaccl-ring: the RDMA devices file instead of the ring's hostfile
        hostfile = File(layout.ibv_devices, render_ibv_devices(cluster, placement), 0o644)
    config = File(layout.config, worker_config(cluster, placement, home=home,
                                               model_dir=model_dir, files=files,
                                               settings=settings), 0o644)
    files_read = [f for f in (script, hostfile, config) if f is not None]
    directories: list[Resource] = [Directory(layout.dir, 0o755),
                                   Directory(layout.hf_cache, 0o755)]
    resources += [*directories, *files_read]

    env = {
        "MLX_RANK": str(node.rank),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": absolute(layout.hf_cache, home),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    if multi and ring:  # a one-entry hostfile makes mlx wait forever; one node: no ring
        env["MLX_HOSTFILE"] = absolute(layout.hostfile, home)
    elif multi:
        env.update(jaccl_env(cluster, placement, absolute(layout.ibv_devices, home)))
    if layout.system:
        # A daemon's environment is launchd's minimal one: say who the worker runs as and
        # where its HOME is, rather than relying on what launchd adds for UserName.
        env.update({"HOME": home, "USER": user, "LOGNAME": user, "SHELL": "/bin/sh"})
    env.update(settings.env)
    log = absolute(layout.log, home)
    plist = render_plist(
        layout.label,
        [absolute(layout.venv_python, home), absolute(layout.script, home),
         absolute(layout.config, home)],
        env=env,
        inputs=[*(f.content for f in files_read), inputs_digest],
        working_directory=absolute(layout.dir, home),
        stdout_path=log,
        stderr_path=log,
        keep_alive=True,
        throttle_interval=settings.throttle_interval,
        background=not layout.system,
        user_name=user if layout.system else None,
    )
    needs = [env_resource.id, *(r.id for r in (*directories, *files_read))]
    if sysctl is not None:
        needs.append(sysctl.id)
    if model_files_id is not None:
        needs.append(model_files_id)
    resources.append(LaunchdService(layout.label, layout.plist_path, plist, layout.domain,
                                    needs=tuple(needs), staged=layout.staged_plist))
    return resources


def worker_services(cluster: Cluster,
                    desired: Mapping[str, Sequence[Resource]]) -> dict[str, LaunchdService]:
    """Each host's worker job among its desired resources: what `couple_ring` couples."""
    service_id = WorkerLayout.of(cluster).service_id
    return {host: r for host, resources in desired.items() for r in resources
            if isinstance(r, LaunchdService) and r.id == service_id}
