"""Choose the nodes, split the layers, and say — with numbers — why it does not fit when it doesn't.

Node choice (``placement.nodes: auto``): among the hosts that are not drained, the fewest that
fit. Candidates are ordered by usable memory (largest first), then memory bandwidth (faster
first, `chips.py`), then inventory order, and for k = 1, 2, … the first k are tried. That is
exact, not a heuristic:

* the ring order of any chosen set is the same rule (largest usable memory = rank 0), so the
  first k candidates dominate any other k-subset rank by rank — each rank has at least as much
  usable memory — and every split that fits the other subset fits them: if any k nodes fit,
  the first k do;
* with k fixed, required bytes are the same for every subset (all layers, plus k copies of the
  shared tensors and k KV budgets), so headroom = Σ usable − Σ required is largest for the k
  largest nodes; among equal memory, the faster chips come first.

Rank 0 serves the HTTP API, samples tokens and holds the last layers (mlx-lm's convention); it
goes to the node with the most usable memory, which also has the most room for the server.
An explicit ``placement.nodes`` list is used as written, in that ring order (rank 0 first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from orchestrator.errors import PlacementError
from orchestrator.model.meta import ModelMeta, files_for_layers, requantized
from orchestrator.placement.chips import bandwidth_gbps
from orchestrator.placement.estimate import DecodeEstimate, decode_estimate
from orchestrator.placement.policy import GB, GIB, NodeSpec, PlacementPolicy, wired_limit_mb
from orchestrator.placement.split import (
    SplitProblem,
    SplitResult,
    evaluate,
    even_split,
    has_split,
    layer_ranges,
    solve,
)

# Bit widths MLX's affine quantization supports, for the "fewer bits" suggestion.
MLX_BITS = (8, 6, 5, 4, 3, 2)

Parallelism = Literal["pipeline", "tensor"]


@dataclass(frozen=True)
class NodePlacement:
    """One rank: which node, which layers, what it costs and what it must download."""

    name: str
    rank: int
    chip: str | None
    memory_bytes: int
    usable_bytes: int
    layers: tuple[int, int]  # start, end (exclusive), as mlx-lm's start_idx / end_idx; tensor: all
    weight_bytes: int  # pipeline: its layers + the tensors every rank holds; tensor: its slice
    overhead_bytes: int
    kv_cache_bytes: int
    files: tuple[str, ...]
    download_bytes: int
    bandwidth_gbps: float | None

    @property
    def bytes(self) -> int:
        """What the node needs: weights + overhead + KV cache."""
        return self.weight_bytes + self.overhead_bytes + self.kv_cache_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.bytes

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def wired_limit_mb(self) -> int:
        """The ``iogpu.wired_limit_mb`` orch sets on this node."""
        return wired_limit_mb(self.usable_bytes)


@dataclass(frozen=True)
class Placement:
    """The answer to "will it fit, where, how": pure data for the renderers and the planner."""

    meta: ModelMeta
    policy: PlacementPolicy
    nodes: tuple[NodePlacement, ...]  # rank order; the least-overloaded split when not fitting
    fits: bool
    even_split_fits: bool
    even_split_bytes: tuple[int, ...]  # node_bytes per rank under mlx-lm's even split
    decode: DecodeEstimate | None
    not_chosen: tuple[str, ...] = ()  # candidates left out because fewer nodes fit
    drained: tuple[str, ...] = ()  # hosts left out because they are drained
    problems: tuple[str, ...] = ()  # why it does not fit, with numbers
    suggestions: tuple[str, ...] = ()  # smallest changes that would make it fit
    # How the model is split: "pipeline" (each rank a range of layers, `split`) or "tensor"
    # (every rank 1/N of every sharded tensor, all layers, every weight file on disk).
    parallelism: Parallelism = "pipeline"
    alternative: Placement | None = None  # the other split, as computed, for the views
    reason: str | None = None  # why this split and not the alternative

    @property
    def required_bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    @property
    def available_bytes(self) -> int:
        return sum(n.usable_bytes for n in self.nodes)

    @property
    def split(self) -> tuple[int, ...]:
        """Layers per rank, rank 0 first: the ``split`` argument of mlx-lm's ``pipeline``."""
        return tuple(n.num_layers for n in self.nodes)

    @property
    def split_text(self) -> str:
        """The split in a few words: a tensor split's `split` would read as every layer on
        every rank ([61, 61, 61]), which looks like a pipeline of 183 layers."""
        if self.parallelism == "tensor":
            return f"tensor-parallel over {len(self.nodes)} ranks"
        return f"split {list(self.split)}"


def place(meta: ModelMeta, inventory: Sequence[NodeSpec], policy: PlacementPolicy,
          requested: Sequence[str] | None = None) -> Placement:
    """The pipeline split of ``meta`` on ``inventory`` (in inventory order); ``requested`` = a
    fixed ring order. `parallel.place_model` chooses between this and the tensor split.

    Pure: never touches a host. Returns a `Placement` whether or not it fits (`fits`, and
    `problems` / `suggestions` when not); `require_fit` turns a refusal into a `PlacementError`.
    """
    candidates, drained = candidate_pool(inventory, policy, requested)
    if not candidates:
        return nothing(meta, policy, drained, "no nodes to place on"
                       + (f": every candidate is drained ({', '.join(drained)})" if drained
                          else ""))
    chosen = candidates
    if requested is None:
        chosen = next((candidates[:k] for k in range(1, len(candidates) + 1)
                       if has_split(_problem(meta, candidates[:k], policy))),
                      candidates[:meta.num_layers])
    if len(chosen) > meta.num_layers:
        return nothing(meta, policy, drained,
                        f"{len(chosen)} nodes but the model has {meta.num_layers} layers; "
                        "every rank needs at least one")
    problem = _problem(meta, chosen, policy)
    result = solve(problem)
    assert result is not None  # 0 < len(chosen) <= num_layers
    even = evaluate(problem, even_split(meta.num_layers, len(chosen)))
    nodes = _node_placements(meta, chosen, policy, result)
    placement = Placement(
        meta=meta, policy=policy, nodes=nodes, fits=result.fits,
        even_split_fits=even.fits, even_split_bytes=even.node_bytes,
        decode=None if meta.estimated else decode_estimate(
            meta, [n.layers for n in nodes], [n.bandwidth_gbps for n in nodes],
            policy.hop_latency_s),
        not_chosen=tuple(n.name for n in candidates if n not in chosen),
        drained=drained)
    if result.fits:
        return placement
    return _refusal(placement, meta, chosen, inventory, policy)


def candidate_pool(inventory: Sequence[NodeSpec], policy: PlacementPolicy,
                   requested: Sequence[str] | None) -> tuple[list[NodeSpec], tuple[str, ...]]:
    """The nodes that may serve, in the order they are tried, and the drained ones left out.

    ``requested`` (``placement.nodes``) is used as written; otherwise the preference order of
    the module doc. Unknown names are a `PlacementError`.
    """
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
    return candidates, drained


def require_fit(placement: Placement) -> Placement:
    """Return the placement if it fits; otherwise raise `PlacementError` with the numbers."""
    if placement.fits:
        return placement
    raise PlacementError(refusal_message(placement))


def refusal_message(placement: Placement) -> str:
    """The refusal as the user reads it: what is short, by how much, and what would fit."""
    lines = [f"{placement.meta.source} does not fit"
             + (f" on {', '.join(n.name for n in placement.nodes)}" if placement.nodes else "")
             + ":"]
    lines += [f"  {p}" for p in placement.problems]
    if placement.suggestions:
        lines.append("Smallest changes that would fit:")
        lines += [f"  - {s}" for s in placement.suggestions]
    return "\n".join(lines)


def gb(n: int | float) -> str:
    """Bytes as decimal GB with one decimal, the unit of every message."""
    return f"{n / GB:.1f} GB"


def by_preference(nodes: Sequence[NodeSpec], policy: PlacementPolicy) -> list[NodeSpec]:
    order = {node.name: i for i, node in enumerate(nodes)}
    return sorted(nodes, key=lambda n: (-policy.usable(n.memory_bytes),
                                        -(bandwidth_gbps(n.chip, n.memory_bytes) or 0.0),
                                        order[n.name]))


def _problem(meta: ModelMeta, nodes: Sequence[NodeSpec], policy: PlacementPolicy,
             usable: Sequence[int] | None = None) -> SplitProblem:
    return SplitProblem(
        layer_bytes=tuple(layer.total for layer in meta.layers),
        shared_bytes=meta.shared.total,
        usable=tuple(usable if usable is not None
                     else (policy.usable(n.memory_bytes) for n in nodes)),
        policy=policy)


def _node_placements(meta: ModelMeta, nodes: Sequence[NodeSpec], policy: PlacementPolicy,
                     result: SplitResult) -> tuple[NodePlacement, ...]:
    sizes = {f.name: f.size for f in meta.files}
    placements = []
    for rank, (node, (start, end)) in enumerate(zip(nodes, layer_ranges(result.counts),
                                                    strict=True)):
        weights = meta.shared.total + sum(layer.total for layer in meta.layers[start:end])
        files = files_for_layers(meta, start, end)
        placements.append(NodePlacement(
            name=node.name, rank=rank, chip=node.chip, memory_bytes=node.memory_bytes,
            usable_bytes=policy.usable(node.memory_bytes), layers=(start, end),
            weight_bytes=weights, overhead_bytes=policy.overhead_bytes(weights),
            kv_cache_bytes=policy.kv_cache_bytes, files=files,
            download_bytes=sum(sizes[f] for f in files),
            bandwidth_gbps=bandwidth_gbps(node.chip, node.memory_bytes)))
    return tuple(placements)


def nothing(meta: ModelMeta, policy: PlacementPolicy, drained: tuple[str, ...],
            problem: str, parallelism: Parallelism = "pipeline") -> Placement:
    """A placement on no node, refused for ``problem``."""
    return Placement(meta=meta, policy=policy, nodes=(), fits=False, even_split_fits=False,
                     even_split_bytes=(), decode=None, drained=drained, problems=(problem,),
                     parallelism=parallelism)


def _refusal(placement: Placement, meta: ModelMeta, chosen: Sequence[NodeSpec],
             inventory: Sequence[NodeSpec], policy: PlacementPolicy) -> Placement:
    """Fill in why it does not fit and the smallest changes that would."""
    required, available = placement.required_bytes, placement.available_bytes
    problems = []
    if required > available:
        problems.append(f"needs {gb(required)}, {len(chosen)} node"
                        f"{'s' if len(chosen) != 1 else ''} have {gb(available)} usable: "
                        f"short {gb(required - available)}")
    else:
        problems.append(f"{gb(required)} of {gb(available)} usable would fit in total, but no "
                        "split into whole layers does")
    smallest_layer = min(layer.total for layer in meta.layers)
    floor = policy.node_bytes(meta.shared.total + smallest_layer)
    for node in placement.nodes:
        if node.usable_bytes < floor:
            problems.append(f"{node.name} cannot hold even one layer: that needs "
                            f"{gb(floor)} (the tensors every rank holds, the smallest layer, "
                            f"KV cache and overhead), it has {gb(node.usable_bytes)} usable")
        elif node.bytes > node.usable_bytes:
            problems.append(f"{node.name}: layers {node.layers[0]}–{node.layers[1] - 1} need "
                            f"{gb(node.bytes)}, {gb(node.usable_bytes)} usable "
                            f"(short {gb(node.bytes - node.usable_bytes)})")
    return replace(placement, problems=tuple(problems),
                   suggestions=_suggestions(meta, chosen, inventory, policy))


def _suggestions(meta: ModelMeta, chosen: Sequence[NodeSpec], inventory: Sequence[NodeSpec],
                 policy: PlacementPolicy) -> tuple[str, ...]:
    suggestions = []
    more = _more_memory(meta, chosen, policy)
    if more is not None:
        node, needed = more
        suggestions.append(f"more memory: {node.name} with at least {gb(needed)} of RAM "
                           f"({needed / GIB:.1f} GiB in Apple's units; it has "
                           f"{node.memory_bytes / GIB:.0f})")
    if meta.bits:
        for bits in (b for b in MLX_BITS if b < meta.bits):
            smaller = requantized(meta, bits)
            if has_split(_problem(smaller, chosen, policy)):
                suggestions.append(f"fewer bits: {bits}-bit quantization (≈ "
                                   f"{gb(smaller.weight_bytes)} of weights) fits these nodes")
                break
    chosen_names = {n.name for n in chosen}
    extra = sorted((n for n in inventory if n.name not in chosen_names),
                   key=lambda n: (n.memory_bytes, -(bandwidth_gbps(n.chip, n.memory_bytes) or 0)))
    swap = next(((old, new) for new in extra if not new.drained for old in chosen
                 if has_split(_problem(meta, [new if n is old else n for n in chosen], policy))),
                None)
    if swap is not None:
        old, new = swap
        suggestions.append(f"another node: {new.name} ({gb(policy.usable(new.memory_bytes))} "
                           f"usable) in place of {old.name} in placement.nodes")
    for node in extra:
        if has_split(_problem(meta, [*chosen, node], policy)):
            verb = "undrain" if node.drained else "add"
            suggestions.append(f"another node: {verb} {node.name} "
                               f"({gb(policy.usable(node.memory_bytes))} usable)"
                               + ("" if node.drained else " to placement.nodes"))
            break
    return tuple(suggestions)


def _more_memory(meta: ModelMeta, chosen: Sequence[NodeSpec],
                 policy: PlacementPolicy) -> tuple[NodeSpec, int] | None:
    """The node whose RAM, alone increased, fixes the fit with the smallest increase."""
    if len(chosen) > meta.num_layers:
        return None
    best: tuple[int, NodeSpec, int] | None = None
    ceiling = 2 * policy.node_bytes(meta.weight_bytes) + 64 * GB
    for i, node in enumerate(chosen):
        def fits_with(memory: int, i: int = i) -> bool:
            usable = [policy.usable(n.memory_bytes) for n in chosen]
            usable[i] = policy.usable(memory)
            return has_split(_problem(meta, chosen, policy, usable))

        lo, hi = node.memory_bytes, node.memory_bytes + ceiling
        if not fits_with(hi):
            continue
        while hi - lo > GB // 10:
            mid = (lo + hi) // 2
            if fits_with(mid):
                hi = mid
            else:
                lo = mid
        if best is None or hi - node.memory_bytes < best[0]:
            best = (hi - node.memory_bytes, node, hi)
    return None if best is None else (best[1], best[2])
