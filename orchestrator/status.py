"""`orch status`: what is true on every serving node and of the ring, read-only, now.

Per node: reachable, the venv's mlx / mlx-lm versions, model files verified (n/n, by the
agent's sha256 of each path), the worker's launchd state, pid, uptime (``ps etime``, the
node's own clock), rank, layers (from the worker's status file), and RSS (``ps rss``). For
the cluster: the ring (serving / forming / broken / down), its size against the node count, the
API URL, ``/health`` and the latency of one real probe completion.

`gather_status` does the reading (two agent calls per node, concurrently: facts with the job,
status file, venv and model files; then ``ps``; and two HTTP requests); `status_text` /
`status_json` are views over the same frozen data.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.config import Cluster
from orchestrator.errors import HostError, PlanError
from orchestrator.executor import Connection
from orchestrator.facts import FactRequest, FileKind, HostFacts, Interpreter, JobState
from orchestrator.placement.choose import Placement
from orchestrator.placement.intent import Intent, resolve_intent
from orchestrator.plan.readiness import NodePreflight, node_preflight
from orchestrator.plan.ring import FORMED, ring_restart_reasons
from orchestrator.resources.interpreter import choose_python, chosen_pythons, python_request
from orchestrator.resources.layout import WorkerLayout, api_url
from orchestrator.resources.model_files import ModelFiles, model_files_by_host
from orchestrator.resources.pyenv import normalize
from orchestrator.run.engine import RunOptions, connected
from orchestrator.verify.health import (
    CompletionError,
    Transport,
    chat_completion,
    urllib_transport,
)
from orchestrator.verify.observe import Observation, observe_ring
from orchestrator.worker.status import WorkerState

__all__ = [
    "ClusterStatus",
    "NodeStatus",
    "cluster_status",
    "gather_status",
    "model_file_list",
    "status_json",
    "status_text",
]

ModelFileList = Mapping[str, Mapping[str, str | None]]  # host -> {path: sha256 or None}


@dataclass(frozen=True)
class NodeStatus:
    host: str
    rank: int
    reachable: bool
    problem: str | None = None  # why something about the node could not be read
    mlx: str | None = None
    mlx_lm: str | None = None
    files_verified: int | None = None
    files_total: int | None = None
    worker: str = "unknown"  # launchd: running / waiting / not_loaded / unknown
    state: str | None = None  # the worker's own: verifying / ring / loading / serving / failed
    pid: int | None = None
    uptime_s: float | None = None
    layers: tuple[int, int] | None = None  # [start, end)
    rss_bytes: int | None = None
    last_exit: int | None = None
    error: str | None = None  # the worker's error, when it failed
    preflight: NodePreflight | None = None  # macOS, Python, sudo, disk (when asked)


@dataclass(frozen=True)
class ClusterStatus:
    cluster: str
    api_url: str
    expected_ranks: int
    nodes: tuple[NodeStatus, ...]
    ring: str  # serving / forming / broken / down / unknown
    ring_size: int | None  # the world size the ranks report, when they agree
    ranks_serving: int
    restart_reasons: Mapping[str, str] = field(default_factory=dict)
    health: int | None = None  # rank 0's /health status code (None: no answer)
    probe_latency_s: float | None = None
    probe_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.ring == "serving" and self.probe_latency_s is not None

    @property
    def unreachable(self) -> list[str]:
        return [n.host for n in self.nodes if not n.reachable]


async def gather_status(
    cluster: Cluster,
    conns: Mapping[str, Connection | HostError],
    placement: Placement,
    *,
    model_files: ModelFileList | None = None,
    probe: bool = True,
    prompt: str = "Say OK.",
    probe_timeout: float = 30.0,
    transport: Transport = urllib_transport,
    preflight: Mapping[str, ModelFiles] | None = None,
) -> ClusterStatus:
    """Read every serving node and probe the API. ``model_files`` lists, per host, the model
    file paths the shard sync declared (HOME-relative or absolute) with their sha256 (None:
    presence only). ``preflight``, each node's model files, asks the same facts call for the
    node's preflight facts too (`NodePreflight`: its Pythons, sudo, the model volume's disk)."""
    layout = WorkerLayout.of(cluster)
    files = model_files or {}
    extra = {n.name: FactRequest(venvs=frozenset({layout.venv}),
                                 files=frozenset(files.get(n.name, {})), managed=False)
             for n in placement.nodes}
    if preflight is not None:
        extra = {name: request.merge(_preflight_request(cluster, preflight.get(name)))
                 for name, request in extra.items()}
    observations = await observe_ring(placement, layout, conns, extra=extra)
    ps = await asyncio.gather(*(_ps(conns.get(o.view.host), o) for o in observations))
    nodes = tuple(_node(o, layout, files.get(o.view.host, {}), p, placement)
                  for o, p in zip(observations, ps, strict=True))
    if preflight is not None:
        pythons = _pythons(observations, cluster.runtime.python)
        nodes = tuple(replace(n, preflight=node_preflight(o.facts, pythons.get(n.host),
                                                          preflight.get(n.host)))
                      if o.facts is not None else n
                      for n, o in zip(nodes, observations, strict=True))
    url = api_url(cluster, placement)
    health = latency = None
    probe_error = None
    if probe:
        health, latency, probe_error = await _probe(url, prompt, probe_timeout, transport)
    views = [o.view for o in observations]
    reasons = ring_restart_reasons(views, len(placement.nodes), health_status=health)
    serving = [v for v in views if v.running and (s := v.current) is not None
               and s.state is WorkerState.SERVING and s.world_size == len(placement.nodes)]
    sizes = {s.world_size for v in views if v.running and (s := v.current) is not None
             and s.state in FORMED}
    return ClusterStatus(
        cluster=cluster.name, api_url=url, expected_ranks=len(placement.nodes), nodes=nodes,
        ring=_ring_state(nodes, len(serving), len(placement.nodes), reasons),
        ring_size=sizes.pop() if len(sizes) == 1 else None, ranks_serving=len(serving),
        restart_reasons=reasons, health=health, probe_latency_s=latency,
        probe_error=probe_error)


def _preflight_request(cluster: Cluster, model: ModelFiles | None) -> FactRequest:
    """What a node's preflight line reads: the Pythons, ``sudo -n`` (asked only where the
    workers are LaunchDaemons: the probe runs a command) and the model volume's free disk."""
    return FactRequest(pythons=python_request(cluster.runtime.python), managed=False,
                       sudo=cluster.runtime.launchd_domain == "system",
                       disk=frozenset({model.directory}) if model is not None else frozenset())


def _pythons(observations: Sequence[Observation], wanted: str) -> dict[str, Interpreter]:
    """Each node's venv interpreter as the plan chooses it (auto: a version every node has);
    where some node has none, each of the others' own choice, and none for that node."""
    facts = {o.view.host: o.facts for o in observations if o.facts is not None}
    try:
        return chosen_pythons(facts, list(facts), wanted)
    except PlanError:
        pass
    result = {}
    for host, fact in facts.items():
        try:
            result[host] = choose_python(fact, wanted)
        except PlanError:
            continue
    return result


def _ring_state(nodes: tuple[NodeStatus, ...], serving: int, expected: int,
                reasons: Mapping[str, str]) -> str:
    if reasons:
        return "broken"
    if serving == expected:
        return "serving"
    if any(not n.reachable for n in nodes):
        return "unknown"
    if any(n.worker != "running" for n in nodes):
        return "down"
    return "forming"


PS_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s*$")


async def _ps(conn: Connection | HostError | None,
              observation: Observation) -> tuple[int | None, float | None]:
    """(RSS bytes, uptime seconds) of the worker's process, from the node's ``ps``."""
    job = observation.view.job
    if conn is None or isinstance(conn, HostError) or job is None or job.pid is None:
        return None, None
    try:
        done = await conn.agent("run", {"argv": ["ps", "-o", "rss=,etime=", "-p",
                                                 str(job.pid)]})
    except HostError:
        return None, None
    match = PS_LINE.match(str(done.get("stdout", "")).strip())
    if done.get("exit_status") != 0 or match is None:
        return None, None
    return int(match[1]) * 1024, parse_etime(match[2])


def parse_etime(text: str) -> float | None:
    """``ps -o etime`` (``[[dd-]hh:]mm:ss``, on macOS and Linux alike) as seconds."""
    days, _, rest = text.rpartition("-")
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or \
            (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + (int(days) * 86400 if days else 0))


def _node(observation: Observation, layout: WorkerLayout, files: Mapping[str, str | None],
          ps: tuple[int | None, float | None], placement: Placement) -> NodeStatus:
    view, facts = observation.view, observation.facts
    placed = next(n for n in placement.nodes if n.name == view.host)
    if facts is None:
        return NodeStatus(view.host, view.rank, view.reachable, view.problem,
                          layers=placed.layers)
    venv = facts.venvs.get(layout.venv)
    packages = venv.packages if venv is not None else {}
    job = view.job
    status = view.current
    rss, uptime = ps
    return NodeStatus(
        host=view.host, rank=view.rank, reachable=True,
        problem=view.problem if job is not None and job.state is JobState.RUNNING else None,
        mlx=packages.get(normalize("mlx")), mlx_lm=packages.get(normalize("mlx-lm")),
        files_verified=_verified(facts, files) if files else None,
        files_total=len(files) if files else None,
        worker=job.state.value if job is not None else "unknown",
        state=status.state.value if status is not None else None,
        pid=job.pid if job is not None else None,
        uptime_s=uptime,
        layers=status.layers if status is not None else placed.layers,
        rss_bytes=rss,
        last_exit=job.last_exit if job is not None else None,
        error=status.error if status is not None else None,
    )


def _verified(facts: HostFacts, files: Mapping[str, str | None]) -> int:
    count = 0
    for path, sha in files.items():
        fact = facts.files.get(path)
        if fact is not None and fact.kind is FileKind.FILE and (sha is None or
                                                                fact.sha256 == sha):
            count += 1
    return count


async def _probe(url: str, prompt: str, timeout: float,
                 transport: Transport) -> tuple[int | None, float | None, str | None]:
    """(/health status, latency of one completion, error)."""
    try:
        health, _ = await asyncio.to_thread(transport, url + "/health", None, min(timeout, 10))
    except OSError as exc:
        return None, None, f"no answer from {url}: {exc}"
    if health != 200:
        return health, None, f"/health answered {health}"
    started = time.monotonic()
    try:
        await chat_completion(url, prompt, max_tokens=4, timeout=timeout, transport=transport)
    except (CompletionError, OSError) as exc:
        return health, None, f"probe completion failed: {exc}"
    return health, time.monotonic() - started, None


# ---------------------------------------------------------------------------------- views


def status_json(status: ClusterStatus) -> dict[str, Any]:
    return {
        "cluster": status.cluster,
        "healthy": status.healthy,
        "ring": {"state": status.ring, "size": status.ring_size,
                 "expected": status.expected_ranks, "serving": status.ranks_serving,
                 "restart_reasons": dict(sorted(status.restart_reasons.items()))},
        "api": {"url": status.api_url, "health": status.health,
                "probe_latency_s": status.probe_latency_s, "probe_error": status.probe_error},
        "nodes": [{**{k: v for k, v in vars(n).items() if k not in ("layers", "preflight")},
                   "layers": list(n.layers) if n.layers else None,
                   "preflight": n.preflight.to_json() if n.preflight else None}
                  for n in status.nodes],
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def status_text(status: ClusterStatus) -> str:
    """A table per node, then the ring and the API, then the reasons when something is off."""
    header = ("HOST", "RANK", "REACHABLE", "MLX", "MLX-LM", "FILES", "WORKER", "STATE",
              "PID", "UPTIME", "LAYERS", "RSS")
    rows = [header]
    for n in status.nodes:
        files = (f"{n.files_verified}/{n.files_total}" if n.files_total is not None else "-")
        layers = "-" if not n.layers else (f"{n.layers[0]}-{n.layers[1] - 1}"
                                           if n.layers[1] - n.layers[0] > 1 else str(n.layers[0]))
        rows.append((n.host, str(n.rank), "yes" if n.reachable else "NO", n.mlx or "-",
                     n.mlx_lm or "-", files, n.worker, n.state or "-",
                     str(n.pid) if n.pid else "-", _duration(n.uptime_s), layers,
                     _size(n.rss_bytes)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    size = "?" if status.ring_size is None else str(status.ring_size)
    checked = [n.preflight.line() for n in status.nodes if n.preflight is not None]
    if checked:
        lines += ["", "preflight:", *(f"  {line}" for line in checked)]
    lines.append("")
    lines.append(f"ring: {status.ring} — {status.ranks_serving}/{status.expected_ranks} ranks "
                 f"serving, size {size} of {status.expected_ranks} nodes")
    api = f"api: {status.api_url}"
    if status.probe_latency_s is not None:
        api += f" — probe completion {status.probe_latency_s * 1000:.0f} ms"
    elif status.probe_error:
        api += f" — {status.probe_error}"
    lines.append(api)
    for host, why in sorted(status.restart_reasons.items()):
        lines.append(f"restart needed ({host}): {why}")
    for n in status.nodes:
        if not n.reachable:
            lines.append(f"{n.host}: unreachable: {n.problem}")
        elif n.error:
            lines.append(f"{n.host}: rank {n.rank} failed: {n.error}")
        elif n.problem:
            lines.append(f"{n.host}: {n.problem}")
    return "\n".join(lines) + "\n"


def model_file_list(intent: Intent) -> ModelFileList:
    """Per serving host, the model files its rank needs (path -> sha256), as the sync declares
    them: what "files verified n/n" counts."""
    return _file_list(_model_files(intent))


def _file_list(by_host: Mapping[str, ModelFiles]) -> ModelFileList:
    return {host: {files.path(rel): files.manifest.files[rel].sha256
                   for rel in sorted(files.needed)}
            for host, files in by_host.items()}


async def cluster_status(cluster: Cluster, options: RunOptions, **gather: Any) -> ClusterStatus:
    """Place the model, connect to its nodes (read-only: the agent is never installed), gather.

    Placement refuses with numbers (PlacementError) when the model does not fit.
    """
    intent = await asyncio.to_thread(resolve_intent, cluster)
    assert intent.placement is not None
    hosts = [n.name for n in intent.placement.nodes]
    async with connected(cluster, hosts, replace(options.ssh, install_agent=False)) as conns:
        by_host = _model_files(intent)
        return await gather_status(cluster, conns, intent.placement,
                                   model_files=_file_list(by_host), preflight=by_host,
                                   **gather)


def _model_files(intent: Intent) -> dict[str, ModelFiles]:
    """Each serving node's model files (directory, and the files its placement needs)."""
    if intent.placement is None or intent.manifest is None or intent.model_dir is None:
        return {}
    return model_files_by_host(intent.manifest, intent.model_dir,
                               {n.name: n.files for n in intent.placement.nodes})
