"""The split solver: exact feasibility, optimal balance, mlx-lm's conventions."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.placement import (
    PlacementPolicy,
    SplitProblem,
    even_split,
    has_split,
    layer_ranges,
    solve,
)
from orchestrator.placement.split import evaluate
from tests.fixtures.groups import FakeGroup

PLAIN = PlacementPolicy(reserve_bytes=0, kv_cache_bytes=0, overhead=Fraction(0))


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write `total` as `parts` positive integers, in order."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(bounds[i + 1] - bounds[i] for i in range(parts))


def brute_force(problem: SplitProblem) -> tuple[bool, Fraction]:
    """(a split fits, the smallest maximum fill ratio) by trying every split."""
    results = [evaluate(problem, counts)
               for counts in compositions(len(problem.layer_bytes), len(problem.usable))]
    best = min(r.max_ratio for r in results)
    return any(r.fits for r in results), best


def test_greedy_fill_is_not_exact_but_the_solver_is() -> None:
    # Layers [1, 1, 3, 1]; stage capacities in layer order [2, 1, 4] = rank order [4, 1, 2].
    # Filling stage 0 greedily with [1, 1] strands the 3 on a stage that holds 1.
    problem = SplitProblem((1, 1, 3, 1), 0, (4, 1, 2), PLAIN)
    assert has_split(problem)
    result = solve(problem)
    assert result is not None and result.fits
    assert result.counts == (2, 1, 1)  # rank 0: layers 2-3, rank 1: layer 1, rank 2: layer 0
    assert layer_ranges(result.counts) == ((2, 4), (1, 2), (0, 1))


@settings(max_examples=300, deadline=None)
@given(
    layers=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    usable=st.lists(st.integers(0, 200), min_size=1, max_size=4),
    shared=st.integers(0, 10),
    kv=st.integers(0, 10),
    overhead=st.sampled_from([Fraction(0), Fraction(1, 10), Fraction(1, 3)]),
)
def test_solver_matches_brute_force(layers: list[int], usable: list[int], shared: int, kv: int,
                                    overhead: Fraction) -> None:
    problem = SplitProblem(tuple(layers), shared, tuple(usable),
                           PlacementPolicy(reserve_bytes=0, kv_cache_bytes=kv, overhead=overhead))
    result = solve(problem)
    if len(usable) > len(layers):
        assert result is None and not has_split(problem)
        return
    exists, best = brute_force(problem)
    assert has_split(problem) == exists
    assert result is not None
    assert result.max_ratio == best  # exactly optimal, not approximately
    assert result.fits == exists
    assert sum(result.counts) == len(layers) and all(c > 0 for c in result.counts)
    assert result.node_bytes == evaluate(problem, result.counts).node_bytes


def test_uneven_layers_get_uneven_counts() -> None:
    # Three cheap dense layers then big MoE-like layers, on two equal nodes: the node with the
    # dense layers takes more layers, and both stay within their memory.
    layers = (1, 1, 1, *([20] * 9))
    problem = SplitProblem(layers, 0, (100, 100), PLAIN)
    result = solve(problem)
    assert result is not None and result.fits
    assert result.counts == (5, 7)  # rank 0 (last layers): 5 × 20; rank 1: 3 × 1 + 4 × 20
    assert result.node_bytes == (100, 83)


def test_balanced_by_usable_memory() -> None:
    # A node with twice the memory gets about twice the layers.
    problem = SplitProblem((10,) * 30, 0, (400, 200), PLAIN)
    result = solve(problem)
    assert result is not None
    assert result.counts == (20, 10)
    assert result.max_ratio == Fraction(1, 2)


def test_a_node_too_small_for_one_layer_means_no_split() -> None:
    problem = SplitProblem((10, 10, 10), 5, (100, 12), PLAIN)  # 5 shared + 10 > 12
    assert not has_split(problem)
    result = solve(problem)
    assert result is not None and not result.fits
    assert result.node_bytes[1] > 12


def test_one_node() -> None:
    problem = SplitProblem((3, 4, 5), 2, (14,), PLAIN)
    result = solve(problem)
    assert result is not None and result.fits and result.counts == (3,)
    assert result.node_bytes == (14,)
    assert not has_split(SplitProblem((3, 4, 5), 2, (13,), PLAIN))
    assert layer_ranges((3,)) == ((0, 3),)


def test_ten_nodes() -> None:
    layers = (5,) * 3 + (70,) * 58
    usable = (500,) * 10
    problem = SplitProblem(layers, 11, usable, PLAIN)
    result = solve(problem)
    assert result is not None and result.fits
    assert len(result.counts) == 10 and all(c > 0 for c in result.counts)
    assert sum(result.counts) == 61
    assert max(result.node_bytes) <= 500
    # every range is contiguous and together they cover 0..61 once, rank 0 the last layers
    ranges = layer_ranges(result.counts)
    assert ranges[0][1] == 61 and ranges[-1][0] == 0
    assert all(ranges[r][0] == ranges[r + 1][1] for r in range(9))


def test_more_nodes_than_layers() -> None:
    problem = SplitProblem((1, 1), 0, (10, 10, 10), PLAIN)
    assert solve(problem) is None
    assert not has_split(problem)


def test_ties_give_a_deterministic_split() -> None:
    problem = SplitProblem((10,) * 7, 0, (100, 100), PLAIN)
    first = solve(problem)
    assert first is not None
    assert first == solve(problem)
    assert sorted(first.counts) == [3, 4]


def test_even_split_is_mlx_lms() -> None:
    assert even_split(61, 3) == (21, 20, 20)
    assert even_split(7, 7) == (1,) * 7
    assert even_split(10, 4) == (3, 3, 2, 2)


@pytest.mark.parametrize(("num_layers", "split"), [
    (61, None), (61, (22, 22, 17)), (7, None), (7, (1, 2, 4)), (10, None), (5, (5,)),
])
def test_layer_ranges_match_mlx_lm_pipeline(num_layers: int, split: tuple[int, ...] | None) -> None:
    """Run mlx-lm's own PipelineMixin.pipeline and compare its start_idx/end_idx per rank."""
    from mlx_lm.models import pipeline

    mixin: Any = pipeline.PipelineMixin  # mlx-lm is untyped
    counts = split or even_split(num_layers, 3)
    expected = layer_ranges(counts)
    for rank in range(len(counts)):
        stage = mixin()
        stage.layers = list(range(num_layers))
        stage.pipeline(FakeGroup(rank, len(counts)), split=list(split) if split else None)
        assert (stage.start_idx, stage.end_idx) == expected[rank]
