"""The embedded default: a real N-node MLX cluster on this machine, as a normal user.

`up` starts N simulated Macs (real sshd on 127.0.0.4x, the macOS stand-ins, their own RAM and
chip), a local Hub serving a tiny generated deepseek_v3 model, and writes an inventory and a
cluster file for them. The caller then runs the same engine as for real Macs: only the
connection targets and the stand-ins differ. Everything started is recorded by pid in
`state.json`, so `down` (from any later process) stops exactly that and removes the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestrator.config import Runtime
from orchestrator.simulator import processes
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, SandboxError, start_hosts

REPO_ID = "sandbox/tiny-deepseek"
ADDRESS_BASE = 41  # 127.0.0.41, .42, ...: apart from the test suite's 127.0.0.1x hosts
CHIPS = [("Apple M2 Ultra", 192), ("Apple M2 Ultra", 192), ("Apple M4 Max", 128),
         ("Apple M3 Max", 128), ("Apple M4 Pro", 64)]


def default_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "orch" / "sandbox"


@dataclass(frozen=True)
class Sandbox:
    """What `up` started, as recorded in `state.json`."""

    directory: Path
    cluster_file: Path
    known_hosts: Path
    api_url: str
    hub_endpoint: str
    hub_pid: int
    nodes: tuple[dict[str, Any], ...]

    def to_json(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "cluster_file": str(self.cluster_file),
                "known_hosts": str(self.known_hosts), "api_url": self.api_url,
                "hub": {"endpoint": self.hub_endpoint, "pid": self.hub_pid},
                "nodes": list(self.nodes)}

    @classmethod
    def load(cls, directory: Path) -> Sandbox | None:
        try:
            raw = json.loads((directory / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return cls(Path(raw["directory"]), Path(raw["cluster_file"]), Path(raw["known_hosts"]),
                   raw["api_url"], raw["hub"]["endpoint"], int(raw["hub"]["pid"]),
                   tuple(raw["nodes"]))


def specs(count: int) -> list[HostSpec]:
    if not 1 <= count <= 9:
        raise SandboxError(f"--nodes must be between 1 and 9, not {count}")
    return [HostSpec(f"mac{i + 1}", CHIPS[i % len(CHIPS)][1] * GIB, CHIPS[i % len(CHIPS)][0],
                     address=f"127.0.0.{ADDRESS_BASE + i}") for i in range(count)]


def up(directory: Path, nodes: int = 3) -> Sandbox:
    """Start (or restart) the simulated Macs and the hub; write the cluster files."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    previous = Sandbox.load(directory)
    if previous is not None and processes.alive(previous.hub_pid) and all(
            processes.port_open(n["address"], n["port"]) for n in previous.nodes) and len(
            previous.nodes) == nodes:
        return previous
    if previous is not None:
        stop_processes(previous)
    return boot(directory, nodes)[0]


def boot(directory: Path, nodes: int = 3) -> tuple[Sandbox, list[RunningHost]]:
    """Start the simulated Macs and the hub in ``directory`` (nothing of it running), and
    write the cluster files. Also returns the running hosts, which a caller that reboots one
    (`orchestrator.simulator.hosts.reboot`) needs. `down` stops them, rebooted or not: it finds
    a host's processes by its root when the recorded pids are gone."""
    directory = directory.absolute()
    directory.mkdir(parents=True, exist_ok=True)
    model_dir = directory / "model"
    if not (model_dir / "config.json").exists():
        # Written with the standard library: the controller never needs mlx (issue #17).
        from orchestrator.simulator.tiny_model import TENSOR_3_OVERRIDES
        from orchestrator.simulator.tiny_plain import make_tiny_deepseek

        # 6 heads: the sandbox also serves tensor-parallel on 2 or 3 ranks (tests/e2e).
        make_tiny_deepseek(model_dir, n_layers=6, n_files=6, seed=7, overrides=TENSOR_3_OVERRIDES)
    hosts = start_hosts(directory / "hosts", specs(nodes))
    endpoint, commit, hub_pid = _start_hub(directory, model_dir)
    api_port = processes.free_port(hosts[0].address)
    cluster_file = _write_cluster(directory, hosts, endpoint, commit, api_port)
    sandbox = Sandbox(
        directory=directory, cluster_file=cluster_file,
        known_hosts=hosts[0].known_hosts_file,
        api_url=f"http://{hosts[0].address}:{api_port}", hub_endpoint=endpoint, hub_pid=hub_pid,
        nodes=tuple({"name": h.name, "address": h.address, "port": h.port,
                     "root": str(h.root), "sshd_pid": h.sshd_pid, "launchd_pid": h.launchd_pid}
                    for h in hosts))
    (directory / "state.json").write_text(json.dumps(sandbox.to_json(), indent=2) + "\n")
    return sandbox, hosts


def _start_hub(directory: Path, model_dir: Path) -> tuple[str, str, int]:
    ready = directory / "hub.json"
    ready.unlink(missing_ok=True)
    log = (directory / "hub.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.simulator.hubd", "--repo", f"{REPO_ID}={model_dir}",
         "--ready-file", str(ready)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SandboxError("the sandbox hub did not start: "
                               + processes.tail(directory / "hub.log"))
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return str(info["endpoint"]), str(info["commits"][REPO_ID]), proc.pid


def _pins() -> list[str]:
    """The nodes run this controller's mlx and mlx-lm when it has them (the sandbox's nodes
    are this machine), else the versions orch pins by default: the nodes get them from the
    wheelhouse either way, so the controller itself never needs mlx."""
    pins = []
    defaults = {name: version for name, _, version in
                (p.partition("==") for p in Runtime().packages)}
    for name in ("mlx", "mlx-lm"):
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(f"{name}=={defaults[name]}")
    if sys.platform == "linux":
        pins[0] = pins[0].replace("mlx==", "mlx[cpu]==")
    return pins


def inventory_yaml(hosts: Sequence[RunningHost], ring_ips: Sequence[str] | None = None,
                   names: Sequence[str] | None = None) -> str:
    """The inventory a user writes for these hosts: how to reach each, its ring IP (its own
    address unless given), RAM and chip, under their names (or `names`). The sandbox and the
    tests write it the same way."""
    lines = ["hosts:"]
    for i, host in enumerate(hosts):
        memory = host.spec.memory_bytes
        memory_gb = str(memory // GIB) if memory % GIB == 0 else repr(memory / GIB)
        name = host.name if names is None else names[i]
        lines += [f"  {name}:", f"    address: {host.address}", f"    port: {host.port}",
                  f"    user: {host.user}", f"    identity_file: {host.identity_file}",
                  f"    ring_ip: {host.address if ring_ips is None else ring_ips[i]}",
                  f"    memory_gb: {memory_gb}",
                  f"    chip: {host.spec.chip.removeprefix('Apple ')}"]
    return "\n".join(lines) + "\n"


def _write_cluster(directory: Path, hosts: list[RunningHost], endpoint: str, commit: str,
                   api_port: int) -> Path:
    (directory / "inventory.yml").write_text(
        "# Written by `orch sandbox up`: simulated Macs on this machine.\n"
        "ssh:  # so every orch command works on this cluster with no SSH flags\n"
        f"  known_hosts: {json.dumps(str(hosts[0].known_hosts_file))}\n"
        + inventory_yaml(hosts))
    packages = ", ".join(json.dumps(p) for p in _pins())  # `mlx[cpu]` needs quotes in YAML
    cluster = directory / "sandbox.yml"
    cluster.write_text(f"""\
# Written by `orch sandbox up`. The same engine as for real Macs; only the targets differ.
name: sandbox
inventory: inventory.yml
model:
  repo: {REPO_ID}
  revision: {commit}
  endpoint: {endpoint}
placement:
  nodes: [{", ".join(h.name for h in hosts)}]   # every simulated Mac holds a rank
runtime:
  packages: [{packages}]
  api_port: {api_port}
""")
    return cluster


def stop_processes(sandbox: Sandbox) -> list[int]:
    """Stop the hub and every simulated Mac (sshd, launchd, their jobs); returns what was killed."""
    killed: list[int] = []
    if processes.alive(sandbox.hub_pid):
        os.kill(sandbox.hub_pid, signal.SIGTERM)
        killed.append(sandbox.hub_pid)
    for node in sandbox.nodes:
        root = Path(node["root"])
        daemons = [int(p) for p in (node.get("launchd_pid"), node.get("sshd_pid")) if p]
        # launchd first, so it cannot respawn the jobs we kill next; then whatever is left,
        # found again each round, until the host has no process.
        for _ in range(20):
            pids = [p for p in daemons if processes.alive(p)] or processes.host_pids(root, daemons)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            daemons = []
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while any(processes.alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def down(directory: Path) -> list[int]:
    """Stop everything `up` started (by pid) and remove the sandbox's directory."""
    sandbox = Sandbox.load(directory.absolute())
    killed = stop_processes(sandbox) if sandbox is not None else []
    if sandbox is not None:
        survivors = [p for p in killed if processes.alive(p)]
        listening = [f"{n['address']}:{n['port']}" for n in sandbox.nodes
                     if processes.port_open(n["address"], n["port"])]
        if survivors or listening:
            raise SandboxError(f"still alive after down: pids {survivors}, ports {listening}")
    if directory.exists():
        shutil.rmtree(directory)
    return killed


def status(directory: Path) -> dict[str, Any]:
    """`orch sandbox status --json`: at least cluster_file, api_url and nodes."""
    sandbox = Sandbox.load(directory.absolute())
    if sandbox is None:
        return {"up": False, "cluster_file": None, "api_url": None, "nodes": []}
    nodes = [{"name": n["name"], "address": n["address"], "port": n["port"],
              "alive": processes.port_open(n["address"], n["port"])} for n in sandbox.nodes]
    return {"up": all(n["alive"] for n in nodes) and processes.alive(sandbox.hub_pid),
            "cluster_file": str(sandbox.cluster_file), "api_url": sandbox.api_url,
            "hub": sandbox.hub_endpoint, "directory": str(sandbox.directory), "nodes": nodes}
