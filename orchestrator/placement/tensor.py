"""The tensor-parallel split: every rank holds 1/N of each sharded tensor and all replicated ones.

mlx-lm serves tensor-parallel by default when the group has more than one rank
(``sharded_load`` calls ``model.shard(group)``; ``--pipeline`` selects the pipeline instead).
Every rank then runs every layer, so every rank needs every weight file on disk, and the
smallest Mac bounds the split: the ranks hold (almost) the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.errors import PlacementError
from orchestrator.model.meta import ModelMeta
from orchestrator.placement.chips import bandwidth_gbps
from orchestrator.placement.choose import NodePlacement, Placement, by_preference, gb
from orchestrator.placement.policy import NodeSpec, PlacementPolicy


def tensor_rank_bytes(meta: ModelMeta, ranks: int) -> tuple[int, ...]:
    """Weight bytes each rank holds after ``model.shard(group)`` on ``ranks`` ranks."""
    sharded = sum(layer.total for layer in meta.layers)
    return tuple(meta.shared.total + sharded // ranks for _ in range(ranks))


def place_tensor(meta: ModelMeta, inventory: Sequence[NodeSpec], policy: PlacementPolicy,
                 requested: Sequence[str] | None = None) -> Placement:
    """The tensor split on ``requested`` (as written) or the fewest preferred nodes that fit."""
    by_name = {node.name: node for node in inventory}
    if requested is not None:
        unknown = [name for name in requested if name not in by_name]
        if unknown:
            raise PlacementError(f"placement.nodes names host(s) not in the inventory: "
                                 f"{', '.join(unknown)}")
        pool = [by_name[name] for name in requested]
    else:
        pool = list(inventory)
    drained = tuple(n.name for n in pool if n.drained)
    candidates = [n for n in pool if not n.drained]
    if requested is None:
        candidates = by_preference(candidates, policy)
    if not candidates:
        return Placement(meta=meta, policy=policy, nodes=(), fits=False, even_split_fits=False,
                         even_split_bytes=(), decode=None, drained=drained,
                         problems=("no nodes to place on",), parallelism="tensor")
    chosen = candidates
    if requested is None:
        chosen = next((candidates[:k] for k in range(1, len(candidates) + 1)
                       if _fits(_nodes(meta, candidates[:k], policy))), candidates)
    nodes = _nodes(meta, chosen, policy)
    problems = tuple(f"tensor does not fit: {n.name} needs {gb(n.bytes)} of "
                     f"{gb(n.usable_bytes)}" for n in nodes if n.bytes > n.usable_bytes)
    return Placement(meta=meta, policy=policy, nodes=nodes, fits=not problems,
                     even_split_fits=False, even_split_bytes=(), decode=None,
                     not_chosen=tuple(n.name for n in candidates if n not in chosen),
                     drained=drained, problems=problems, parallelism="tensor")


def _fits(nodes: Sequence[NodePlacement]) -> bool:
    return all(n.bytes <= n.usable_bytes for n in nodes)


def _nodes(meta: ModelMeta, chosen: Sequence[NodeSpec],
           policy: PlacementPolicy) -> tuple[NodePlacement, ...]:
    files = tuple(f.name for f in meta.files)
    download = sum(f.size for f in meta.files)
    weights = tensor_rank_bytes(meta, len(chosen))
    return tuple(
        NodePlacement(
            name=node.name, rank=rank, chip=node.chip, memory_bytes=node.memory_bytes,
            usable_bytes=policy.usable(node.memory_bytes), layers=(0, meta.num_layers),
            weight_bytes=w, overhead_bytes=policy.overhead_bytes(w),
            kv_cache_bytes=policy.kv_cache_bytes, files=files, download_bytes=download,
            bandwidth_gbps=bandwidth_gbps(node.chip, node.memory_bytes))
        for rank, (node, w) in enumerate(zip(chosen, weights, strict=True)))
