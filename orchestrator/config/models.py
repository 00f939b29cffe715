"""The typed shape of the files users write: cluster file, inventory, playbook task lists.

Every model forbids unknown keys and is strict about types ("22" is not a port), because a
mistyped key that is silently ignored is how a node ends up half-configured. These models
check shape only; cross-file rules (unique ring IPs, referenced files, placement nodes that
exist) live in `semantics.py`, where they can point at the line the user wrote.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
PINNED_REQUIREMENT = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address (the ring needs IPs, not hostnames)") from None


def _pinned(value: str) -> str:
    if not PINNED_REQUIREMENT.match(value.replace(" ", "")):
        raise ValueError(
            f"{value!r} is not pinned; "
            "expected NAME==VERSION so every node installs the same build")
    return value.replace(" ", "")


# The default pins, and the oldest Python they install on: mlx-lm 0.32 declares
# Requires-Python >=3.11 (and mlx >= 0.30 publishes no cp39 wheels). `runtime.python: auto`
# picks the newest interpreter at or above this floor; raise it with the pins.
DEFAULT_PINS = ("mlx==0.32.4", "mlx-lm==0.32.2")
PINS_REQUIRE_PYTHON = (3, 11)
# `auto`, a version ("3.12"), an absolute or HOME-relative path, or a command name ("python3")
PYTHON_CHOICE = r"^(auto|3\.\d+|/\S+|~/\S+|[A-Za-z0-9_.+-]+)$"

IPAddress = Annotated[str, AfterValidator(_ip)]
Port = Annotated[int, Field(ge=1, le=65535)]
HostName = Annotated[str, Field(pattern=NAME_PATTERN)]
PinnedRequirement = Annotated[str, AfterValidator(_pinned)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class HostVars(_Strict):
    """Connection and hardware settings that `vars` and groups may supply to many hosts."""

    port: Port | None = Field(None, description="SSH port (default 22)")
    user: str | None = Field(None, description="SSH user (default: ~/.ssh/config, then local user)")
    identity_file: str | None = Field(None, description="SSH private key, relative to the file")
    memory_gb: float | None = Field(
        None, gt=0, description="RAM in GiB as Apple sells it (192); needed when a model is served")
    chip: str | None = Field(None, description='Apple chip, e.g. "M2 Ultra", "M4 Max"')
    drained: bool | None = Field(None, description="rolled out of the cluster (orch drain)")


class SharedVars(HostVars):
    """`vars` of the inventory or of a group: the connection keys above, typed, plus any other
    key, which becomes a user variable templates read as ``host.vars.KEY`` (Ansible's group
    vars). A near-miss of a connection key (``prot``) is warned about by the loader."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class HostEntry(HostVars):
    """One Mac as written in the inventory; missing fields may come from groups and vars."""

    address: str = Field(description="hostname or IP that SSH connects to")
    ring_ip: IPAddress | None = Field(
        None, description="IP the MLX ring uses (Thunderbolt or Ethernet); needed when a model "
                          "is served")
    rdma: dict[HostName, str] | None = Field(
        None, description="runtime.backend jaccl: this Mac's RDMA device (ibv_devices) that "
                          "reaches each peer over its Thunderbolt cable, e.g. {studio-2: rdma_en3}")
    vars: dict[str, Any] = Field(default_factory=dict,
                                 description="the host's own user variables (host.vars.KEY in "
                                             "templates); they win over group and shared vars")


class Group(_Strict):
    hosts: list[HostName] = Field(default_factory=list)
    vars: SharedVars = Field(default_factory=SharedVars)  # type: ignore[arg-type]


class InventorySSH(_Strict):
    """SSH settings that belong to the inventory, so its cluster files need no flags; the
    command line's --known-hosts and --connect-timeout still win."""

    known_hosts: str | None = Field(None, description="known_hosts file, relative to the file")
    connect_timeout: float | None = Field(None, gt=0, description="seconds per SSH connection")
    proxy_jump: str | None = Field(
        None, pattern=r"^([^@\s]+@)?[^@:\s]+(:[0-9]{1,5})?$",
        description="[user@]host[:port] to reach every host through (OpenSSH's ProxyJump)")


class InventoryFile(_Strict):
    """The inventory file: hosts, groups and shared vars (precedence: host > group > vars)."""

    hosts: dict[HostName, HostEntry]
    groups: dict[HostName, Group] = Field(default_factory=dict)
    vars: SharedVars = Field(default_factory=SharedVars)  # type: ignore[arg-type]
    ssh: InventorySSH = Field(default_factory=InventorySSH)  # type: ignore[arg-type]


class ModelSection(_Strict):
    repo: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
                             description="Hub repository, e.g. mlx-community/DeepSeek-R1-4bit")
    revision: str | None = Field(None, description="commit sha to pin (a branch is a warning)")
    path: str | None = Field(None, description="local model directory used instead of the Hub")
    endpoint: str = Field("https://huggingface.co", pattern=r"^https?://",
                          description="Hub base URL")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.repo is None and self.path is None:
            raise ValueError("model needs `repo` (a Hub repository) or `path` (a local directory)")
        return self


class PlacementSection(_Strict):
    nodes: Literal["auto"] | list[HostName] = Field(
        "auto", description="`auto`, or the host names to use, in ring order")
    reserve_gb: float | None = Field(
        None, ge=0, description="memory kept for macOS per node (default: by RAM size)")
    overhead: float | None = Field(
        None, ge=0, le=2, description="the guide's O: runtime overhead as a share of weights")
    kv_cache_gb: float | None = Field(None, ge=0, description="KV cache budget per node")
    parallelism: Literal["auto", "tensor", "pipeline"] = Field(
        "auto", description="how the model is split: `pipeline` (layers per rank), `tensor` "
                            "(every layer split across all ranks) or `auto` (tensor when it "
                            "fits and its decode estimate is faster)")
    link: Literal["ethernet", "thunderbolt", "rdma"] | None = Field(
        None, description="the network between the Macs, for the decode estimates: `ethernet` "
                          "(the ring backend's default), `thunderbolt` (IP over a Thunderbolt "
                          "bridge) or `rdma` (jaccl over Thunderbolt 5; the default for "
                          "runtime.backend jaccl and jaccl-ring)")
    link_latency_ms: float | None = Field(
        None, gt=0, description="one message's latency over the link (default: by `link`)")
    link_bandwidth_gb_s: float | None = Field(
        None, gt=0, description="GB/s one Mac sends over the link (default: by `link`)")


class RuntimeSection(_Strict):
    python: Annotated[str, Field(pattern=PYTHON_CHOICE)] = Field(
        "auto", description="the nodes' interpreter that creates the venv: `auto` (the newest "
                            "one the pins accept), a version ('3.12', quoted), or a path")
    packages: list[PinnedRequirement] = Field(
        default_factory=lambda: list(DEFAULT_PINS),
        description="pinned requirements installed identically on every node")
    api_port: Port = Field(8080, description="port of rank 0's OpenAI-compatible API")
    ring_port: Port = Field(47100, description="port each rank's ring listens on")
    sync_port: Port = Field(47300, description="port nodes serve model files to peers on")
    rendezvous_port: Port = Field(
        47200, description="port on rank 0's ring_ip where the ranks meet before the ring forms")
    env: dict[str, str] = Field(default_factory=dict,
                                description="extra environment for the workers, e.g. "
                                            "MLX_RING_VERBOSE: '1'")
    throttle_interval: int = Field(10, ge=1, le=3600,
                                   description="launchd's minimum seconds between worker starts")
    dir: str = Field(".orch", description="orch's directory on each node, relative to HOME")
    launchd_domain: Literal["system", "user"] = Field(
        "system", description="system: workers are LaunchDaemons (load at boot, exempt from "
                              "Local Network Privacy; need NOPASSWD sudo); user: LaunchAgents")
    backend: Literal["ring", "jaccl", "jaccl-ring"] = Field(
        "ring", description="MLX's distributed backend: ring (TCP over ring_ip), jaccl (RDMA "
                            "over Thunderbolt 5, a cable between every two nodes), jaccl-ring "
                            "(RDMA, a ring of cables); jaccl needs the hosts' `rdma` devices")

    @model_validator(mode="after")
    def _distinct_ports(self) -> RuntimeSection:
        """Two services on one port: the second fails to bind only on the Macs, at run time."""
        ports = {"api_port": self.api_port, "ring_port": self.ring_port,
                 "sync_port": self.sync_port, "rendezvous_port": self.rendezvous_port}
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ValueError(f"{name} and {seen[port]} are both {port}; each needs its own")
            seen[port] = name
        return self


class TemplateTask(_Strict):
    src: str = Field(description="jinja2 template, relative to the file that names it")
    dest: str
    mode: Annotated[str, Field(pattern=r"^0?[0-7]{3,4}$")] = "0644"


class CopyTask(_Strict):
    src: str = Field(description="a file or a directory on the controller, relative to the "
                                 "file that names it")
    dest: str = Field(description="the file (or, for a directory, the directory) on the node")
    mode: Annotated[str, Field(pattern=r"^0?[0-7]{3,4}$")] = Field(
        "0644", description="of every file copied")


class DirectoryTask(_Strict):
    path: str
    mode: Annotated[str, Field(pattern=r"^0?[0-7]{3,4}$")] = "0755"


SYSCTL_NAME = r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)+$"


class SysctlTask(_Strict):
    """A kernel setting, read in the facts call's one `sysctl` run and written with
    `sudo -n sysctl -w NAME=VALUE` only when it differs."""

    name: Annotated[str, Field(pattern=SYSCTL_NAME)] = Field(
        description="the sysctl, e.g. iogpu.wired_limit_mb")
    value: int | Annotated[str, Field(pattern=r"^[^\n\r]+$")] = Field(
        description="what `sysctl -n NAME` must print (an integer, or a one-line string)")
    persist: bool = Field(
        False, description="also set it at every boot, with a root LaunchDaemon "
                           "(com.orch.sysctl.NAME); false: until the next reboot, as "
                           "`sysctl -w` (a reboot shows as drift in `orch plan`)")


class LaunchdTask(_Strict):
    """A launchd job loaded from a plist on the node; reloaded when the plan rewrites it."""

    plist: str = Field(description="the job's plist on the node, e.g. "
                                   "~/Library/LaunchAgents/com.example.job.plist")
    domain: Literal["user", "system"] = Field(
        "user", description="user: user/<uid> (a LaunchAgent); system: a LaunchDaemon, "
                            "through `sudo -n launchctl`")
    label: Annotated[str, Field(pattern=NAME_PATTERN)] | None = Field(
        None, description="the job's Label; default: read from the plist, which an earlier "
                          "template or copy task must then write")


class Task(_Strict):
    """One Ansible-style task: exactly one of `command`, `template`, `copy`, `directory`,
    `sysctl`, `launchd`."""

    name: str
    hosts: list[HostName] | None = Field(None, description="hosts or groups (default: all nodes)")
    command: list[str] | None = Field(None, min_length=1, description="argv, never a shell string")
    creates: str | None = None
    unless: list[str] | None = Field(None, min_length=1)
    template: TemplateTask | None = None
    copy_: CopyTask | None = Field(None, alias="copy")
    directory: DirectoryTask | None = None
    sysctl: SysctlTask | None = None
    launchd: LaunchdTask | None = None
    vars: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_kind(self) -> Task:
        kinds = [k for k in ("command", "template", "copy_", "directory", "sysctl", "launchd")
                 if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("a task needs exactly one of `command`, `template`, `copy`, "
                             "`directory`, `sysctl`, `launchd`")
        if (self.creates or self.unless) and self.command is None:
            raise ValueError("`creates` and `unless` guard a `command` task only")
        return self


class PlaybookFile(_Strict):
    tasks: list[Task]


class ClusterFile(_Strict):
    """The cluster file that `orch apply` reads."""

    name: HostName
    inventory: str | None = Field(None, description="inventory file, relative to this file")
    hosts: dict[HostName, HostEntry] | None = Field(None, description="inline hosts")
    model: ModelSection | None = Field(
        None, description="the model to serve; without it orch only runs the tasks")
    placement: PlacementSection = Field(default_factory=PlacementSection)  # type: ignore[arg-type]
    runtime: RuntimeSection = Field(default_factory=RuntimeSection)  # type: ignore[arg-type]
    tasks: list[Task] = Field(default_factory=list)
    playbooks: list[str] = Field(default_factory=list, description="task-list files, relative")

    @model_validator(mode="after")
    def _one_inventory(self) -> ClusterFile:
        if (self.inventory is None) == (self.hosts is None):
            raise ValueError("give exactly one of `inventory` (a file) or `hosts` (inline)")
        return self
