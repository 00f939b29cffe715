"""The memory model's arithmetic and the bandwidth table."""

from __future__ import annotations

from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from orchestrator.placement import GB, PlacementPolicy, bandwidth_gbps, normalize_chip
from orchestrator.placement.policy import wired_limit_mb

GIB = 2**30


def test_reserve_scales_with_ram_within_bounds() -> None:
    policy = PlacementPolicy()
    assert policy.reserve(192 * GIB) == 192 * GIB // 16  # 12.9 GB on a Studio
    assert policy.reserve(128 * GIB) == 128 * GIB // 16  # 8.6 GB on the MacBook
    assert policy.reserve(16 * GIB) == 4 * GB  # never below 4 GB
    assert policy.reserve(512 * GIB) == 16 * GB  # never above 16 GB
    assert policy.usable(192 * GIB) == 192 * GIB - 192 * GIB // 16
    assert PlacementPolicy(reserve_bytes=10 * GB).usable(8 * GB) == 0


def test_settings_override_defaults() -> None:
    policy = PlacementPolicy.from_settings(reserve_gb=6, overhead=0.2, kv_cache_gb=1.5)
    assert policy.reserve(192 * GIB) == 6 * GB
    assert policy.overhead == Fraction(1, 5)
    assert policy.kv_cache_bytes == 1_500_000_000
    assert policy.node_bytes(10 * GB) == 12 * GB + 1_500_000_000
    defaults = PlacementPolicy.from_settings()
    assert defaults == PlacementPolicy()


@given(budget=st.integers(-10, 10**13), kv=st.integers(0, 10**10),
       overhead=st.fractions(min_value=0, max_value=2, max_denominator=1000))
def test_max_weight_bytes_inverts_node_bytes_exactly(budget: int, kv: int,
                                                     overhead: Fraction) -> None:
    policy = PlacementPolicy(reserve_bytes=0, kv_cache_bytes=kv, overhead=overhead)
    w = policy.max_weight_bytes(budget)
    if w < 0:
        assert budget < kv
    else:
        assert policy.node_bytes(w) <= budget < policy.node_bytes(w + 1)


def test_wired_limit_is_usable_memory_in_mib() -> None:
    assert wired_limit_mb(200 * GIB) == 200 * 1024


def test_chip_names_normalize() -> None:
    assert normalize_chip("Apple M2 Ultra") == "M2 Ultra"
    assert normalize_chip("m4-max") == "M4 Max"
    assert normalize_chip("M4Pro") == "M4 Pro"
    assert normalize_chip("M3") == "M3"
    assert normalize_chip("Intel Core i9") is None
    assert normalize_chip(None) is None


def test_bandwidth_table_and_bins() -> None:
    assert bandwidth_gbps("M2 Ultra") == 800
    assert bandwidth_gbps("Apple M4 Max", 128 * GIB) == 546
    assert bandwidth_gbps("M4 Max", 36 * GIB) == 410  # the 14-core bin
    assert bandwidth_gbps("M3 Max", 128 * GIB) == 400
    assert bandwidth_gbps("M3 Max", 36 * GIB) == 300
    assert bandwidth_gbps("M4 Pro") == 273
    assert bandwidth_gbps("M1") == 68.25
    assert bandwidth_gbps("M9 Hyper") is None
