"""Preflight for MLX's RDMA backends: refuse, before any change, a cluster that cannot form.

``jaccl`` and ``jaccl-ring`` fail late and obscurely on a Mac that cannot do RDMA: the ranks
start, then ``mx.distributed.init`` cannot open a device or a queue pair never connects. What
decides it is known at plan time, from the facts call the plan makes anyway (the agent's
``rdma`` answer is ``ibv_devices``' list) and the inventory's declared devices:

- macOS ≥ 26.2 on every node (RDMA over Thunderbolt 5 arrived in 26.2);
- RDMA enabled: ``ibv_devices`` lists at least one device (``rdma_ctl enable``, once, from
  Recovery; it cannot be done over SSH);
- a cable for every pair of ranks the backend talks over (every pair for ``jaccl``, ring
  neighbours for ``jaccl-ring``): both ends declare the device that reaches the other, and
  each declared device is one ``ibv_devices`` lists on that Mac.

Every problem is reported at once, one line each, as the user fixes them.
"""

from __future__ import annotations

from collections.abc import Mapping

from orchestrator.config import Cluster
from orchestrator.errors import HostError, PlanError
from orchestrator.facts import FactRequest, HostFacts
from orchestrator.placement.choose import Placement
from orchestrator.resources.jaccl import cable_pairs

__all__ = ["MIN_MACOS", "backend_problems", "backend_request", "check_backend"]

MIN_MACOS = (26, 2)


def backend_request(cluster: Cluster) -> FactRequest:
    """What a serving node's facts must also answer for the cluster's backend."""
    return FactRequest(rdma=cluster.runtime.backend != "ring")


def _version(text: str | None) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in (text or "").split("."))
    except ValueError:
        return None


def backend_problems(cluster: Cluster, placement: Placement,
                     facts: Mapping[str, HostFacts | HostError]) -> list[str]:
    """Why this placement cannot form its backend's group, one line per problem; empty when it
    can (or the backend is the ring, or a node did not answer: it is reported as unreachable)."""
    backend = cluster.runtime.backend
    names = [n.name for n in placement.nodes]
    if backend == "ring" or len(names) < 2:
        return []
    problems: list[str] = []
    able: dict[str, HostFacts] = {}
    for name in names:
        fact = facts.get(name)
        if not isinstance(fact, HostFacts):
            continue
        version = _version(fact.os_version)
        if version is None or version < MIN_MACOS:
            shown = f"macOS {fact.os_version}" if fact.os_version else "not macOS"
            problems.append(f"{name}: {shown} — {backend} needs macOS ≥ 26.2")
        elif not fact.rdma_devices:
            problems.append(f"{name}: RDMA disabled — run `rdma_ctl enable` from Recovery")
        else:
            able[name] = fact
    for i, j in cable_pairs(backend, len(names)):
        a, b = sorted((names[i], names[j]))
        ends = {a: dict(cluster.hosts[a].rdma).get(b), b: dict(cluster.hosts[b].rdma).get(a)}
        if None in ends.values():
            problems.append(f"no cable between {a} and {b}")
            continue
        for host, device in ends.items():
            listed = able[host].rdma_devices if host in able else None
            if listed is not None and device not in listed:
                peer = b if host == a else a
                problems.append(f"{host}: {device} (to {peer}) is not an RDMA device there; "
                                f"ibv_devices lists {', '.join(listed)}")
    return problems


def check_backend(cluster: Cluster, placement: Placement | None,
                  facts: Mapping[str, HostFacts | HostError]) -> None:
    """Raise PlanError with every reason the backend's group cannot form; else nothing."""
    if placement is None:
        return
    problems = backend_problems(cluster, placement, facts)
    if problems:
        raise PlanError(f"nothing was changed: runtime.backend {cluster.runtime.backend} "
                        "cannot form:\n  " + "\n  ".join(problems))
