"""The tensor split on the DeepSeek-R1-4bit-shaped checkpoint: exact bytes, refusals, the choice.

orch's bytes per rank must equal, to the byte, `tests.fixtures.tensor_bytes`'s independent
computation from the same headers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.errors import PlacementError
from orchestrator.model.meta import ModelMeta
from orchestrator.placement import GB, NodeSpec, PlacementPolicy, place_model, require_fit
from orchestrator.placement.estimate import tensor_decode_estimate
from orchestrator.placement.policy import LINKS, Link
from orchestrator.placement.shard import tensor_split
from tests.fixtures.tensor_bytes import independent_rank_bytes
from tests.unit.placement.conftest import GIB, LAB
from tests.unit.placement.helpers import synthetic_meta

GUIDE = ["studio-1", "studio-2", "mbp-m4"]
STUDIOS = tuple(NodeSpec(f"studio-{i}", 192 * GIB, "M2 Ultra") for i in range(1, 5))
@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_rank_bytes_are_exact_against_the_headers(deepseek_dir: Path, deepseek_meta: ModelMeta,
                                                  ranks: int) -> None:
    split = tensor_split(deepseek_meta, ranks)
    assert split.possible, split.problem
    assert split.rank_bytes == (independent_rank_bytes(deepseek_dir, ranks),) * ranks


def test_four_studios_take_the_tensor_split_on_rdma(deepseek_dir: Path,
                                                   deepseek_meta: ModelMeta) -> None:
    placement = place_model(deepseek_meta, STUDIOS, PlacementPolicy.from_settings(link="rdma"))
    assert placement.parallelism == "tensor" and placement.fits
    assert [n.name for n in placement.nodes] == [s.name for s in STUDIOS]
    exact = independent_rank_bytes(deepseek_dir, 4)
    assert [n.weight_bytes for n in placement.nodes] == [exact] * 4
    assert exact == 106_560_520_192  # 106.6 GB a rank, of 419.8 GB
    assert placement.split_text == "tensor-parallel over 4 ranks"  # what `orch drain` prints
    assert placement.alternative is not None
    assert placement.alternative.split_text == f"split {list(placement.alternative.split)}"
    assert all(n.files == tuple(f.name for f in deepseek_meta.files) for n in placement.nodes)
    assert placement.decode is not None and placement.alternative is not None
    pipeline = placement.alternative
    assert pipeline.parallelism == "pipeline" and pipeline.fits and pipeline.decode is not None
    assert placement.decode.tokens_per_second > pipeline.decode.tokens_per_second
    assert placement.reason is not None and "4 ranks" in placement.reason


def test_over_tcp_the_pipeline_is_faster_and_chosen(deepseek_meta: ModelMeta) -> None:
    placement = place_model(deepseek_meta, STUDIOS, PlacementPolicy.from_settings())
    assert placement.parallelism == "pipeline"
    assert placement.alternative is not None and placement.alternative.fits
    assert placement.reason is not None and "(ethernet link)" in placement.reason


def test_the_guides_three_macs_refuse_tensor_for_the_macbook(deepseek_meta: ModelMeta) -> None:
    placement = place_model(deepseek_meta, LAB, PlacementPolicy(), GUIDE)
    assert placement.parallelism == "pipeline" and placement.fits
    tensor = placement.alternative
    assert tensor is not None and not tensor.fits
    assert "tensor does not fit: mbp-m4 needs 160.2 GB of 128.8 GB" in tensor.problems
    assert ("tensor cannot split into 3 ranks: num_attention_heads 128 is not divisible by 3"
            in tensor.problems)
    assert placement.reason is not None and "mbp-m4 needs 160.2 GB of 128.8 GB" in placement.reason


def test_two_ranks_refuse_with_each_studios_shortfall(deepseek_meta: ModelMeta) -> None:
    placement = place_model(deepseek_meta, LAB, PlacementPolicy(), ["studio-1", "studio-2"],
                            "tensor")
    assert placement.parallelism == "tensor" and not placement.fits
    assert placement.problems == ("tensor does not fit: studio-1 needs 236.1 GB of 193.3 GB",
                                  "tensor does not fit: studio-2 needs 236.1 GB of 193.3 GB")


def test_mlx_split_rules_refuse_indivisible_rank_counts(deepseek_meta: ModelMeta) -> None:
    assert [n for n in range(1, 9) if tensor_split(deepseek_meta, n).possible] == [1, 2, 4, 8]
    five = tensor_split(deepseek_meta, 5)
    assert five.problem == "num_attention_heads 128 is not divisible by 5"


def test_an_unknown_architecture_is_not_split(deepseek_meta: ModelMeta) -> None:
    synthetic = synthetic_meta([10 * GB] * 4, 1 * GB)
    split = tensor_split(synthetic, 2)
    assert not split.possible and split.rank_bytes == ()
    placement = place_model(synthetic, STUDIOS, PlacementPolicy())
    assert placement.parallelism == "pipeline"
    assert placement.alternative is not None and not placement.alternative.fits


def test_tensor_decode_estimate_formula() -> None:
    link = Link("test", latency_s=0.001, bandwidth_bytes_s=1e9)
    est = tensor_decode_estimate(10, 1000, [4 * GB, 4 * GB], [800.0, 400.0], link)
    assert est is not None
    # slowest rank 4 GB / 400 GB/s = 10 ms; 2 × 10 layers × 2 (2−1) × (1 ms + 2000 B / 2 GB/s)
    assert est.rank_seconds == (0.005, 0.01)
    assert est.hop_seconds == pytest.approx(20 * 2 * (0.001 + 1e-6))
    assert est.seconds_per_token == pytest.approx(0.01 + 20 * 2 * 0.001001)
    assert tensor_decode_estimate(10, None, [1], [800.0], link) is None
    assert tensor_decode_estimate(10, 1000, [1], [None], link) is None


def test_link_settings_override_the_defaults() -> None:
    policy = PlacementPolicy.from_settings(link="thunderbolt", link_latency_ms=0.1)
    assert policy.link == Link("thunderbolt", 0.0001, LINKS["thunderbolt"].bandwidth_bytes_s)
    assert policy.hop_latency_s == 0.0001
    assert PlacementPolicy.from_settings().link == LINKS["ethernet"]


def test_an_explicit_split_that_does_not_fit_points_at_the_one_that_would(
        deepseek_meta: ModelMeta) -> None:
    placement = place_model(deepseek_meta, LAB, PlacementPolicy(), GUIDE, "tensor")
    assert placement.parallelism == "tensor" and not placement.fits
    assert placement.reason == "placement.parallelism is tensor; the pipeline split would fit"
    with pytest.raises(PlacementError) as refused:
        require_fit(placement)
    assert "mbp-m4 needs 160.2 GB of 128.8 GB" in str(refused.value)
    assert ("placement.parallelism: pipeline (or auto): the pipeline split fits"
            in str(refused.value))
    pipeline = place_model(deepseek_meta, LAB, PlacementPolicy(), GUIDE, "pipeline")
    assert pipeline.fits and pipeline.reason == "placement.parallelism is pipeline"
