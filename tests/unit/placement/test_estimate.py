"""The guide's formula and the decode-speed bound, on numbers worked by hand."""

from __future__ import annotations

import pytest

from orchestrator.placement import (
    GB,
    NodeSpec,
    PlacementPolicy,
    decode_estimate,
    estimated_meta,
    guide_estimate_bytes,
    place,
)
from tests.unit.placement.conftest import GIB, LAB
from tests.unit.placement.helpers import synthetic_meta


def test_the_guides_formula() -> None:
    assert guide_estimate_bytes(671e9, 4) == 402_600_000_000  # 671B × 4/8 × 1.2
    assert guide_estimate_bytes(671e9, 4, overhead=0) == 335_500_000_000


def test_estimated_meta_is_equal_layers_and_marked() -> None:
    meta = estimated_meta(671e9, 4, 61)
    assert meta.estimated
    assert meta.weight_bytes == 335_500_000_000
    assert len({layer.total for layer in meta.layers[:-1]}) == 1
    with pytest.raises(ValueError):
        estimated_meta(0, 4, 61)


def test_an_estimate_places_with_the_guides_overhead() -> None:
    meta = estimated_meta(671e9, 4, 61)
    policy = PlacementPolicy.from_settings(overhead=0.2)
    placement = place(meta, LAB, policy)
    assert placement.fits
    assert placement.decode is None  # active bytes are unknown without headers
    # the guide's 402.6 GB, plus 4 GB of KV cache on each of the three nodes
    assert abs(placement.required_bytes - (402.6 + 12) * GB) < GB


def test_decode_estimate_formula() -> None:
    meta = synthetic_meta([100 * GB, 100 * GB], shared=10 * GB)
    estimate = decode_estimate(meta, [(1, 2), (0, 1)], [800.0, 400.0], hop_latency_s=0.001)
    assert estimate is not None
    assert estimate.rank_seconds == (0.125, 0.25)  # 100 GB / 800 GB/s, 100 GB / 400 GB/s
    assert estimate.head_seconds == 0.025  # the slower chip reads the 10 GB head
    assert estimate.hop_seconds == 0.002  # 2 × (2 − 1) hops
    assert estimate.seconds_per_token == pytest.approx(0.402)
    assert decode_estimate(meta, [(0, 2)], [None], 0.001) is None


def test_decode_estimate_in_a_placement(deepseek_meta: object) -> None:
    placement = place(deepseek_meta, LAB, PlacementPolicy())  # type: ignore[arg-type]
    assert placement.decode is not None
    assert 5 < placement.decode.tokens_per_second < 100
    unknown = [NodeSpec("x", 512 * GIB, None)]
    assert place(deepseek_meta, unknown, PlacementPolicy()).decode is None  # type: ignore[arg-type]
