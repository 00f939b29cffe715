"""The tensor-parallel split: every rank holds 1/N of each sharded tensor and all replicated ones.

mlx-lm serves tensor-parallel by default when the group has more than one rank
(``sharded_load`` calls ``model.shard(group)``; ``--pipeline`` selects the pipeline instead).
Every rank then runs every layer, so every rank needs every weight file on disk (``sharded_load``
downloads them all), and since `shard.tensor_split` gives every rank the same bytes, the
smallest Mac bounds the split.

Node choice (``placement.nodes: auto``): among the preferred nodes (`choose`'s order), the
first k for each k ≥ 2 that ``shard()`` can split the model into (DeepSeek's 128 heads: 2, 4,
8 …); of those that fit, the one with the fastest decode estimate (ties: fewer nodes). When
none fits, the largest possible k is shown with its numbers, since it needs the least per Mac.
An explicit ``placement.nodes`` list is used as written.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.model.meta import ModelMeta
from orchestrator.placement.chips import bandwidth_gbps
from orchestrator.placement.choose import (
    NodePlacement,
    Placement,
    candidate_pool,
    gb,
    nothing,
)
from orchestrator.placement.estimate import tensor_decode_estimate
from orchestrator.placement.policy import NodeSpec, PlacementPolicy
from orchestrator.placement.shard import TensorSplit, tensor_split


def tensor_rank_bytes(meta: ModelMeta, ranks: int) -> tuple[int, ...]:
    """Weight bytes each rank holds after ``model.shard(group)`` on ``ranks`` ranks."""
    return tensor_split(meta, ranks).rank_bytes


def place_tensor(meta: ModelMeta, inventory: Sequence[NodeSpec], policy: PlacementPolicy,
                 requested: Sequence[str] | None = None) -> Placement:
    """The tensor split on ``requested`` (as written) or the fastest preferred k that fits."""
    candidates, drained = candidate_pool(inventory, policy, requested)
    if not candidates:
        return nothing(meta, policy, drained, "no nodes to place on", "tensor")
    if requested is not None or len(candidates) == 1:
        sizes = [len(candidates)]
    else:
        sizes = list(range(2, len(candidates) + 1))
    options = [_option(meta, candidates, k, policy, drained) for k in sizes]
    fitting = [o for o in options if o.fits]
    if fitting:
        return min(fitting, key=lambda o: (o.decode.seconds_per_token if o.decode else 0.0,
                                           len(o.nodes)))
    possible = [o for o in options if o.nodes and not _split_problem(o)]
    return (possible or [o for o in options if o.nodes] or options)[-1]


def _split_problem(placement: Placement) -> bool:
    return any(p.startswith("tensor cannot split") for p in placement.problems)


def _option(meta: ModelMeta, candidates: Sequence[NodeSpec], k: int, policy: PlacementPolicy,
            drained: tuple[str, ...]) -> Placement:
    chosen = candidates[:k]
    split = tensor_split(meta, k)
    if not split.rank_bytes:
        return nothing(meta, policy, drained, f"tensor: {split.problem}", "tensor")
    nodes = _nodes(meta, chosen, policy, split)
    problems = [] if split.possible else [f"tensor cannot split into {k} ranks: "
                                          f"{split.problem}"]
    problems += [f"tensor does not fit: {n.name} needs {gb(n.bytes)} of {gb(n.usable_bytes)}"
                 for n in nodes if n.bytes > n.usable_bytes]
    return Placement(
        meta=meta, policy=policy, nodes=nodes, fits=not problems, even_split_fits=False,
        even_split_bytes=(), parallelism="tensor",
        decode=tensor_decode_estimate(meta.num_layers, meta.hidden_size, split.rank_active,
                                      [n.bandwidth_gbps for n in nodes], policy.link),
        not_chosen=tuple(n.name for n in candidates[k:]), drained=drained,
        problems=tuple(problems))


def _nodes(meta: ModelMeta, chosen: Sequence[NodeSpec], policy: PlacementPolicy,
           split: TensorSplit) -> tuple[NodePlacement, ...]:
    files = tuple(f.name for f in meta.files)
    download = sum(f.size for f in meta.files)
    return tuple(
        NodePlacement(
            name=node.name, rank=rank, chip=node.chip, memory_bytes=node.memory_bytes,
            usable_bytes=policy.usable(node.memory_bytes), layers=(0, meta.num_layers),
            weight_bytes=w, overhead_bytes=policy.overhead_bytes(w),
            kv_cache_bytes=policy.kv_cache_bytes, files=files, download_bytes=download,
            bandwidth_gbps=bandwidth_gbps(node.chip, node.memory_bytes))
        for rank, (node, w) in enumerate(zip(chosen, split.rank_bytes, strict=True)))
