"""The layer split: whole layers per rank so that every node's bytes fit its usable memory.

Conventions are mlx-lm's (``mlx_lm/models/pipeline.py``): ``split[r]`` is rank r's layer
count, ranks hold contiguous ranges, and **rank 0 holds the last layers** — rank r runs layers
``sum(split[r+1:]) .. sum(split[r:]) - 1``, rank N−1 the first ones. Every rank also holds the
tensors without a layer number (embeddings, final norm, lm_head).

The problem. Layers 0..L−1 with byte sizes b_i (uneven: DeepSeek-R1 has 0.36 GB dense and 7.2
GB MoE layers) must be cut into N non-empty contiguous stages, stage s going to the node with
usable memory u_s, so that cost_s = node_bytes(shared + Σ b_i over the stage) ≤ u_s. Among the
splits that fit, take the most balanced one: the smallest possible maximum *fill ratio*
cost_s / u_s, then, among those, the smallest Σ (cost_s / u_s)².

Why it is exact.

1. *Feasibility for given budgets* (`_stages`): let R_s be the set of positions q such that
   layers [0, q) can be covered by the first s+1 stages within their budgets. R_{-1} = {0};
   q ∈ R_s iff some p ∈ R_{s−1}, p < q, has Σ b[p:q] ≤ cap_s. Because b_i ≥ 0, Σ b[p:q]
   only shrinks as p grows, so it suffices to test the *largest* p ∈ R_{s−1} below q: one
   left-to-right sweep per stage decides R_s exactly, O(N·L) in all. A split exists iff
   L ∈ R_{N−1}. (A greedy "fill each stage as far as it goes" check is *not* exact once
   capacities differ: with layers [1, 1, 3, 1] and stage capacities [2, 1, 4], greedy fills
   stage 0 with [1, 1] and strands the 3, while [1], [1], [3, 1] fits.)
2. *The smallest maximum ratio* t*: budgets ⌊t·u_s⌋ grow with t, so "a split with every
   ratio ≤ t exists" is monotone in t, and t* is the maximum ratio of some split. A bisection
   on floats brackets t*, each feasible probe lowering the upper bound to the *exact*
   (rational) maximum ratio of the split it found. The result is then certified: when no
   split has every ratio strictly below that bound (budgets ⌈t·u_s⌉ − 1, integer exact), the
   bound is t*; otherwise the strictly better split found replaces it and the check repeats.
3. *Balance among the optimal splits*: a dynamic program over (stage, end position) with the
   budgets at t* minimises Σ ratio² — exhaustive over contiguous splits, O(N·L²).

The split fits iff t* ≤ 1. When it does not, the same split is the least-overloaded one, which
is what a refusal shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate

from orchestrator.placement.policy import PlacementPolicy


@dataclass(frozen=True)
class SplitProblem:
    """Layer sizes in layer order; nodes' usable bytes in rank order (rank 0 first)."""

    layer_bytes: tuple[int, ...]
    shared_bytes: int
    usable: tuple[int, ...]
    policy: PlacementPolicy


@dataclass(frozen=True)
class SplitResult:
    """A split in mlx-lm's form (layers per rank, rank 0 first) and what it costs each node."""

    counts: tuple[int, ...]
    node_bytes: tuple[int, ...]  # by rank: weights + overhead + KV cache
    max_ratio: Fraction  # max over ranks of node_bytes / usable

    @property
    def fits(self) -> bool:
        return self.max_ratio <= 1


def even_split(num_layers: int, nodes: int) -> tuple[int, ...]:
    """mlx-lm's default split: even by layer count, the low ranks get the extra layers."""
    base, extra = divmod(num_layers, nodes)
    return tuple(base + (1 if r < extra else 0) for r in range(nodes))


def layer_ranges(counts: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(start, end) per rank, end exclusive — mlx-lm's ``start_idx``/``end_idx``."""
    ranges = []
    for r, count in enumerate(counts):
        start = sum(counts[r + 1:])
        ranges.append((start, start + count))
    return tuple(ranges)


def split_costs(problem: SplitProblem, counts: Sequence[int]) -> tuple[int, ...]:
    """Each rank's node_bytes for a given split."""
    return tuple(
        problem.policy.node_bytes(problem.shared_bytes + sum(problem.layer_bytes[a:b]))
        for a, b in layer_ranges(counts))


def evaluate(problem: SplitProblem, counts: Sequence[int]) -> SplitResult:
    """Cost and fill ratio of a given split (e.g. mlx-lm's even split)."""
    _check_counts(problem, counts)
    costs = split_costs(problem, counts)
    return SplitResult(tuple(counts), costs, _max_ratio(costs, problem.usable))


def has_split(problem: SplitProblem) -> bool:
    """Whether any split fits every node's usable memory; O(N·L), for search loops."""
    if not 0 < len(problem.usable) <= len(problem.layer_bytes):
        return False
    return _stages(problem, problem.usable) is not None


def solve(problem: SplitProblem) -> SplitResult | None:
    """The most balanced split (see module doc); None only when N = 0 or N > L.

    The result may not fit (``max_ratio > 1``): then it is the least-overloaded split.
    """
    n, num_layers = len(problem.usable), len(problem.layer_bytes)
    if not 0 < n <= num_layers:
        return None
    best = evaluate(problem, even_split(num_layers, n))
    lo = 0.0
    for _ in range(200):
        hi = float(best.max_ratio)
        if hi - lo <= hi * 1e-12:
            break
        mid = (lo + hi) / 2
        found = _stages(problem, [math.floor(mid * float(_eff(u))) for u in problem.usable])
        if found is None:
            lo = mid
        else:
            best = evaluate(problem, found)
    while True:  # certify: is any split strictly better than `best`?
        t = best.max_ratio
        strict = [math.ceil(t * _eff(u)) - 1 for u in problem.usable]
        found = _stages(problem, strict)
        if found is None:
            break
        best = evaluate(problem, found)
    return evaluate(problem, _balanced(problem, best.max_ratio))


def _eff(usable: int) -> Fraction:
    """Usable bytes as a ratio denominator. A node with none gets a tiny positive one, so any
    cost there has a huge (finite, comparable) ratio and only a zero cost has ratio ≤ 1."""
    return Fraction(usable) if usable > 0 else Fraction(1, 2**64)


def _max_ratio(costs: Sequence[int], usable: Sequence[int]) -> Fraction:
    return max(c / _eff(u) for c, u in zip(costs, usable, strict=True))


def _check_counts(problem: SplitProblem, counts: Sequence[int]) -> None:
    if (len(counts) != len(problem.usable) or any(c <= 0 for c in counts)
            or sum(counts) != len(problem.layer_bytes)):
        raise ValueError(f"split {list(counts)} must have {len(problem.usable)} positive "
                         f"entries summing to {len(problem.layer_bytes)}")


def _caps(problem: SplitProblem, budgets: Sequence[int]) -> list[int]:
    """Per stage (layer order), the most layer bytes that fit its rank's budget; -1: none."""
    caps = []
    for budget in reversed(budgets):  # stage s is rank N-1-s
        weights = problem.policy.max_weight_bytes(budget)
        caps.append(weights - problem.shared_bytes if weights >= problem.shared_bytes else -1)
    return caps


def _stages(problem: SplitProblem, budgets: Sequence[int]) -> tuple[int, ...] | None:
    """A split with every rank's node_bytes ≤ its budget, or None if none exists (exact)."""
    caps = _caps(problem, budgets)
    prefix = [0, *accumulate(problem.layer_bytes)]
    total = len(problem.layer_bytes)
    reach = [True] + [False] * total
    parents: list[list[int]] = []
    for cap in caps:
        nxt = [False] * (total + 1)
        parent = [-1] * (total + 1)
        last = -1
        if cap >= 0:
            for q in range(1, total + 1):
                if reach[q - 1]:
                    last = q - 1
                if last >= 0 and prefix[q] - prefix[last] <= cap:
                    nxt[q] = True
                    parent[q] = last
        parents.append(parent)
        reach = nxt
    if not reach[total]:
        return None
    counts_by_stage = []
    q = total
    for parent in reversed(parents):
        p = parent[q]
        counts_by_stage.append(q - p)
        q = p
    return tuple(counts_by_stage)  # walked from the last stage back = rank 0 first


def _balanced(problem: SplitProblem, t: Fraction) -> tuple[int, ...]:
    """Among splits with every ratio ≤ t, one minimising Σ ratio² (exhaustive DP)."""
    usable = problem.usable
    n, total = len(usable), len(problem.layer_bytes)
    budgets = [math.floor(t * _eff(u)) for u in usable]
    caps = _caps(problem, budgets)
    prefix = [0, *accumulate(problem.layer_bytes)]
    inf = math.inf
    score = [0.0] + [inf] * total
    parents: list[list[int]] = []
    for s, cap in enumerate(caps):
        u = float(_eff(usable[n - 1 - s]))
        nxt = [inf] * (total + 1)
        parent = [-1] * (total + 1)
        for q in range(s + 1, total - (n - 1 - s) + 1):
            for p in range(q - 1, s - 1, -1):
                layer_sum = prefix[q] - prefix[p]
                if layer_sum > cap:
                    break
                if score[p] == inf:
                    continue
                ratio = problem.policy.node_bytes(problem.shared_bytes + layer_sum) / u
                candidate = score[p] + ratio * ratio
                if candidate < nxt[q]:
                    nxt[q] = candidate
                    parent[q] = p
        parents.append(parent)
        score = nxt
    if score[total] == inf:  # cannot happen: t is attained by a split
        raise AssertionError("no split within the optimal ratio")
    counts = []
    q = total
    for parent in reversed(parents):
        counts.append(q - parent[q])
        q = parent[q]
    return tuple(counts)
