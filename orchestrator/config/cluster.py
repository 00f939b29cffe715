"""The validated cluster as the rest of orch sees it: frozen, resolved, with no YAML left in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from orchestrator.errors import Diagnostic

GIB = 1024**3


@dataclass(frozen=True)
class Host:
    """One Mac after inventory precedence (host > group > vars > defaults) is applied."""

    name: str
    address: str
    ring_ip: str | None  # None only in a cluster that serves no model (load checks it)
    memory_gb: float | None  # likewise: only placement reads it
    port: int = 22
    user: str | None = None
    identity_file: Path | None = None
    chip: str | None = None
    drained: bool = False
    groups: tuple[str, ...] = ()
    rdma: tuple[tuple[str, str], ...] = ()  # (peer host, this Mac's RDMA device to it), sorted
    # The inventory's user variables (shared < group, in file order < host): host.vars.KEY.
    vars: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    @property
    def memory_bytes(self) -> int:
        """Apple's "192 GB" is 192 GiB: hw.memsize reports 206158430208."""
        assert self.memory_gb is not None, f"{self.name}: memory_gb is required to serve a model"
        return int(self.memory_gb * GIB)

    @property
    def ring_address(self) -> str:
        """The ring IP, which `load_cluster` requires of every host when a model is served."""
        assert self.ring_ip is not None, f"{self.name}: ring_ip is required to serve a model"
        return self.ring_ip


@dataclass(frozen=True)
class SSHSettings:
    """The inventory's `ssh:` block; a command-line flag wins over each (None: not set)."""

    known_hosts: Path | None = None
    connect_timeout: float | None = None
    proxy_jump: str | None = None  # "[user@]host[:port]", OpenSSH's ProxyJump


@dataclass(frozen=True)
class ModelSpec:
    repo: str | None
    revision: str | None
    path: Path | None
    endpoint: str = "https://huggingface.co"


@dataclass(frozen=True)
class PlacementSpec:
    nodes: Literal["auto"] | tuple[str, ...] = "auto"
    reserve_gb: float | None = None
    overhead: float | None = None
    kv_cache_gb: float | None = None
    parallelism: Literal["auto", "tensor", "pipeline"] = "auto"
    link: Literal["ethernet", "thunderbolt", "rdma"] | None = None
    link_latency_ms: float | None = None
    link_bandwidth_gb_s: float | None = None


@dataclass(frozen=True)
class Runtime:
    python: str = "auto"  # see config.models.RuntimeSection.python
    packages: tuple[str, ...] = ("mlx==0.32.4", "mlx-lm==0.32.2")
    api_port: int = 8080
    ring_port: int = 47100
    sync_port: int = 47300
    rendezvous_port: int = 47200
    env: tuple[tuple[str, str], ...] = ()  # extra worker environment, sorted
    throttle_interval: int = 10
    dir: str = ".orch"
    launchd_domain: Literal["system", "user"] = "system"  # where the workers run (README)
    backend: Literal["ring", "jaccl", "jaccl-ring"] = "ring"  # MLX's distributed backend


@dataclass(frozen=True)
class CommandTask:
    argv: tuple[str, ...]
    creates: str | None = None
    unless: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TemplateTask:
    src: Path
    dest: str
    mode: int


@dataclass(frozen=True)
class CopyTask:
    """A controller file or directory (absolute) copied to `dest` on each node as it is."""

    src: Path
    dest: str
    mode: int


@dataclass(frozen=True)
class DirectoryTask:
    path: str
    mode: int


@dataclass(frozen=True)
class SysctlTask:
    name: str
    value: str  # as `sysctl -n` prints it
    persist: bool = False


@dataclass(frozen=True)
class LaunchdTask:
    plist: str
    domain: Literal["user", "system"] = "user"
    label: str | None = None  # None: the Label of the plist the cluster writes there


TaskAction = (CommandTask | TemplateTask | CopyTask | DirectoryTask | SysctlTask
              | LaunchdTask)


@dataclass(frozen=True)
class Task:
    """A user's own playbook task, resolved: the template path is absolute."""

    name: str
    action: TaskAction
    hosts: tuple[str, ...] | None = None  # host or group names; None = every node
    vars: dict[str, Any] = field(default_factory=dict)
    origin: str = ""  # "FILE:LINE" where the task was written, for messages


@dataclass(frozen=True)
class Cluster:
    name: str
    file: Path
    inventory_file: Path | None
    hosts: dict[str, Host]
    model: ModelSpec | None  # None: a cluster that only runs its tasks, serving nothing
    placement: PlacementSpec
    runtime: Runtime
    tasks: tuple[Task, ...] = ()
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    warnings: tuple[Diagnostic, ...] = ()
    ssh: SSHSettings = field(default_factory=SSHSettings)

    @property
    def listed_nodes(self) -> tuple[str, ...] | None:
        """The hosts `placement.nodes` lists that may serve, in its order; None for `auto`.

        The one place drained hosts are left out of a list: placement (which also leaves them
        out of `auto`), the engine and drain all read it.
        """
        if self.placement.nodes == "auto":
            return None
        return tuple(n for n in self.placement.nodes if not self.hosts[n].drained)
