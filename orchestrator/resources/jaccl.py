"""What MLX's RDMA backends (``jaccl``, ``jaccl-ring``) read, rendered exactly as ``mlx.launch``.

``mlx.launch --backend jaccl`` (mlx ``python/mlx/_distributed_utils/launch.py``,
``launch_jaccl``) starts every rank with:

- ``MLX_IBV_DEVICES``: the path of a JSON file, the same on every rank: one entry per rank,
  each a list with one entry per rank: the RDMA device (``ibv_devices``' name, ``rdma_en3``)
  through which that rank reaches that peer, ``null`` for itself — and, for ``jaccl-ring``,
  ``null`` for every rank but its two ring neighbours (what ``mlx.distributed_config`` writes
  for a ring of cables);
- ``MLX_JACCL_COORDINATOR=<rank 0's IP>:<port>``: where the ranks meet to exchange their queue
  pairs (orch: rank 0's ``ring_ip`` and ``runtime.ring_port``);
- ``MLX_JACCL_RING=1`` for ``jaccl-ring`` only.

The devices come from the inventory (each host's ``rdma: {peer: device}``); whether the cables
are really there is checked against facts before anything changes (`cable_pairs`, used by
``plan/backend.py``). Rendering is deterministic, so the file resource stays idempotent.
"""

from __future__ import annotations

import json

from orchestrator.config import Cluster
from orchestrator.placement.choose import Placement

__all__ = ["cable_pairs", "ibv_devices", "jaccl_env", "render_ibv_devices"]


def cable_pairs(backend: str, ranks: int) -> list[tuple[int, int]]:
    """The rank pairs (i < j) that need a cable: every pair for ``jaccl`` (a full mesh), ring
    neighbours for ``jaccl-ring``."""
    if backend == "jaccl-ring":
        ring = {(min(i, (i + 1) % ranks), max(i, (i + 1) % ranks)) for i in range(ranks)}
        return sorted(p for p in ring if p[0] != p[1])
    return [(i, j) for i in range(ranks) for j in range(i + 1, ranks)]


def ibv_devices(cluster: Cluster, placement: Placement) -> list[list[str | None]]:
    """Per rank, the device reaching each rank (rank order); null for itself and where the
    backend needs no cable (or the inventory declares none: planning refuses that first)."""
    names = [n.name for n in placement.nodes]
    needed = set(cable_pairs(cluster.runtime.backend, len(names)))
    rows: list[list[str | None]] = []
    for i, name in enumerate(names):
        declared = dict(cluster.hosts[name].rdma)
        rows.append([declared.get(peer) if (min(i, j), max(i, j)) in needed else None
                     for j, peer in enumerate(names)])
    return rows


def render_ibv_devices(cluster: Cluster, placement: Placement) -> str:
    """The ``MLX_IBV_DEVICES`` file's text."""
    return json.dumps(ibv_devices(cluster, placement)) + "\n"


def jaccl_env(cluster: Cluster, placement: Placement, devices_path: str) -> dict[str, str]:
    """The environment ``mlx.launch`` gives a jaccl rank, besides ``MLX_RANK``."""
    rank0 = cluster.hosts[placement.nodes[0].name]
    env = {"MLX_IBV_DEVICES": devices_path,
           "MLX_JACCL_COORDINATOR": f"{rank0.ring_ip}:{cluster.runtime.ring_port}"}
    if cluster.runtime.backend == "jaccl-ring":
        env["MLX_JACCL_RING"] = "1"
    return env
