"""Where a cluster's worker lives on a node, and how the ring and the API are addressed.

One place for every path, label and address, so the resources that put the worker on a node,
the readiness check and `orch status` can never disagree about them. Paths are HOME-relative
(``~/…``, what the agent expands); launchd and the worker need absolute ones, made with
`absolute` from the node's HOME (a fact).

Per node, under ``~/<runtime.dir>`` (default ``~/.orch``)::

    serve/<cluster>/venv/         the Python environment
    serve/<cluster>/wheelhouse/<key>/  the wheels it was installed from, pushed by the controller
    serve/<cluster>/mlx_worker.py the worker entry point
    serve/<cluster>/worker.json   its config (model dir, split, files with sha256, API address)
    serve/<cluster>/hostfile.json the ring hostfile (multi-node services only)
    serve/<cluster>/ibv_devices.json  instead, for the jaccl backends: MLX_IBV_DEVICES
    serve/<cluster>/status.json   the worker's status file
    serve/<cluster>/worker.log    its stdout and stderr (launchd does not rotate it)
    serve/<cluster>/hf-cache/     HF_HUB_CACHE: mlx-lm's /v1/models needs an existing folder

and the job's plist: by default a LaunchDaemon,
``/Library/LaunchDaemons/com.orch.<cluster>.worker.plist``, staged as the user at
``~/<runtime.dir>/system/`` and installed by root; with ``runtime.launchd_domain: user``, an
agent at ``~/Library/LaunchAgents/…``. Why a daemon: Local Network Privacy (macOS 15+, TN3179)
blocks a launchd *agent*'s connections to LAN peers, and jobs bootstrapped into ``user/<uid>``
over SSH are gone after a reboot; daemons are exempt and load at boot.

Everything else is under the cluster's own directory, the venv and the wheelhouse included: what
one cluster records for removal can never be something another cluster on the same Mac runs from
(a shared venv would need reference counting; a second copy costs disk, never a broken ring).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from orchestrator.config import Cluster
from orchestrator.facts import LaunchdRef
from orchestrator.placement.choose import Placement
from orchestrator.worker.hostfile import Endpoint

__all__ = ["WorkerLayout", "absolute", "api_bind_host", "api_url", "ring_endpoints"]


def absolute(path: str, home: str) -> str:
    """``~/x`` → ``<home>/x``; an absolute path is kept; anything else is an error."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return f"{home.rstrip('/')}/{path[2:]}"
    if path.startswith("/"):
        return path
    raise ValueError(f"{path!r} is neither absolute nor HOME-relative (~/...)")


@dataclass(frozen=True)
class WorkerLayout:
    """Every path orch uses for one cluster's worker on a node (HOME-relative)."""

    cluster: str
    runtime_dir: str = ".orch"
    domain: str = "system"  # launchd domain of the worker: "system" (a daemon) or "user"

    @classmethod
    def of(cls, cluster: Cluster) -> WorkerLayout:
        return cls(cluster.name, cluster.runtime.dir.strip("/"), cluster.runtime.launchd_domain)

    @property
    def root(self) -> str:
        return f"~/{self.runtime_dir}"

    @property
    def venv(self) -> str:
        return f"{self.dir}/venv"

    @property
    def venv_python(self) -> str:
        return f"{self.venv}/bin/python"

    def wheelhouse(self, key: str) -> str:
        return f"{self.dir}/wheelhouse/{key}"

    @property
    def dir(self) -> str:
        return f"{self.root}/serve/{self.cluster}"

    @property
    def script(self) -> str:
        return f"{self.dir}/mlx_worker.py"

    @property
    def config(self) -> str:
        return f"{self.dir}/worker.json"

    @property
    def hostfile(self) -> str:
        return f"{self.dir}/hostfile.json"

    @property
    def ibv_devices(self) -> str:
        return f"{self.dir}/ibv_devices.json"

    @property
    def status(self) -> str:
        return f"{self.dir}/status.json"

    @property
    def log(self) -> str:
        return f"{self.dir}/worker.log"

    @property
    def hf_cache(self) -> str:
        return f"{self.dir}/hf-cache"

    @property
    def label(self) -> str:
        return f"com.orch.{self.cluster}.worker"

    @property
    def system(self) -> bool:
        """The worker is a LaunchDaemon: its plist is root's, installed with ``sudo -n``."""
        return self.domain == "system"

    @property
    def plist_path(self) -> str:
        if self.system:
            return f"/Library/LaunchDaemons/{self.label}.plist"
        return f"~/Library/LaunchAgents/{self.label}.plist"

    @property
    def staged_plist(self) -> str | None:
        """Where a daemon's plist is written as the user before root installs it."""
        return f"{self.root}/system/{self.label}.plist" if self.system else None

    @property
    def job(self) -> LaunchdRef:
        return LaunchdRef(self.domain, self.label)

    @property
    def service_id(self) -> str:
        """The `LaunchdService` resource id of the worker (what `couple_ring` looks for)."""
        return f"launchd:{self.domain}/{self.label}"


def ring_endpoints(cluster: Cluster, placement: Placement) -> list[Endpoint]:
    """Each rank's ``(ring_ip, ring_port + rank)``, rank order: the hostfile's entries.

    One port per rank (as mlx's own launcher does) keeps two ranks that share an IP apart.
    """
    port = cluster.runtime.ring_port
    return [(cluster.hosts[n.name].ring_ip, port + n.rank) for n in placement.nodes]


def api_bind_host(cluster: Cluster, placement: Placement) -> str:
    """Where rank 0's HTTP server listens: its inventory address when that is an IP literal
    (the controller reaches it there), otherwise every interface."""
    address = cluster.hosts[placement.nodes[0].name].address
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "0.0.0.0"  # noqa: S104 - a host name: the API is for the LAN
    return address


def api_url(cluster: Cluster, placement: Placement) -> str:
    """Rank 0's OpenAI-compatible API, as the controller reaches it."""
    address = cluster.hosts[placement.nodes[0].name].address
    try:
        literal = ipaddress.ip_address(address)
    except ValueError:
        literal = None
    host = f"[{address}]" if literal is not None and literal.version == 6 else address
    return f"http://{host}:{cluster.runtime.api_port}"
