"""Node choice and refusals, on the DeepSeek-R1-4bit-shaped checkpoint and the guide's lab."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.errors import PlacementError
from orchestrator.model.meta import ModelMeta
from orchestrator.placement import GB, NodeSpec, PlacementPolicy, place, require_fit
from tests.unit.placement.conftest import GIB, LAB
from tests.unit.placement.helpers import synthetic_meta

DEFAULTS = PlacementPolicy()


def names(placement: object) -> list[str]:
    return [n.name for n in placement.nodes]  # type: ignore[attr-defined]


def test_the_guides_cluster_is_chosen_and_fits(deepseek_meta: ModelMeta) -> None:
    placement = place(deepseek_meta, LAB, DEFAULTS)
    assert placement.fits
    assert names(placement) == ["studio-1", "studio-2", "mbp-m4"]  # M4 Max beats M3 Max on a tie
    assert all(n.bytes <= n.usable_bytes for n in placement.nodes)
    assert not placement.even_split_fits
    assert placement.split == (22, 22, 17)
    assert [n.layers for n in placement.nodes] == [(39, 61), (17, 39), (0, 17)]
    assert round(placement.required_bytes / GB, 1) == 476.3
    assert round(placement.available_bytes / GB, 1) == 515.4
    assert placement.not_chosen == ("mbp-m3", "mini-m4")
    # mlx-lm's even split [21, 20, 20] overloads the MacBook: 141.1 GB against 128.8 usable
    mbp = placement.nodes[2]
    assert round(placement.even_split_bytes[2] / GB, 1) == 141.1
    assert placement.even_split_bytes[2] > mbp.usable_bytes


def test_every_rank_gets_its_files_and_the_shared_ones(deepseek_meta: ModelMeta) -> None:
    placement = place(deepseek_meta, LAB, DEFAULTS)
    first, last = deepseek_meta.files[0].name, deepseek_meta.files[-1].name
    for node in placement.nodes:
        assert first in node.files and last in node.files  # embeddings; norm + lm_head
    union = set().union(*(n.files for n in placement.nodes))
    assert union == {f.name for f in deepseek_meta.files}
    assert sum(n.download_bytes for n in placement.nodes) > deepseek_meta.total_bytes


def test_the_mini_in_place_of_the_macbook_is_refused_with_numbers(
        deepseek_meta: ModelMeta) -> None:
    placement = place(deepseek_meta, LAB, DEFAULTS, ["studio-1", "studio-2", "mini-m4"])
    assert not placement.fits
    assert names(placement) == ["studio-1", "studio-2", "mini-m4"]
    assert placement.problems[0] == ("needs 476.3 GB, 3 nodes have 451.0 GB usable: "
                                     "short 25.3 GB")
    assert any(p.startswith("mini-m4: layers") for p in placement.problems)
    # the guide's own choice, and the faster of the two 128 GB MacBooks
    assert "another node: mbp-m4 (128.8 GB usable) in place of mini-m4 in placement.nodes" \
        in placement.suggestions
    with pytest.raises(PlacementError, match=r"short 25\.3 GB"):
        require_fit(placement)


def test_two_studios_alone_are_short(deepseek_meta: ModelMeta) -> None:
    placement = place(deepseek_meta, LAB, DEFAULTS, ["studio-1", "studio-2"])
    assert not placement.fits
    assert "short 84.5 GB" in placement.problems[0]
    assert any(s.startswith("fewer bits: 3-bit") for s in placement.suggestions)
    assert any(s.startswith("another node: add mbp-m4") for s in placement.suggestions)


def test_the_suggested_memory_really_fits(deepseek_meta: ModelMeta) -> None:
    placement = place(deepseek_meta, LAB, DEFAULTS, ["studio-1", "studio-2", "mini-m4"])
    more = next(s for s in placement.suggestions if s.startswith("more memory"))
    name = more.split()[2]
    needed = float(more.split("at least ")[1].split(" GB")[0]) * GB
    grown = [dataclasses.replace(n, memory_bytes=int(needed) + GB // 10)
             if n.name == name else n for n in LAB]
    assert place(deepseek_meta, grown, DEFAULTS, ["studio-1", "studio-2", "mini-m4"]).fits
    shrunk = [dataclasses.replace(n, memory_bytes=int(needed) - GB) if n.name == name else n
              for n in LAB]
    assert not place(deepseek_meta, shrunk, DEFAULTS, ["studio-1", "studio-2", "mini-m4"]).fits


def test_drained_hosts_are_left_out(deepseek_meta: ModelMeta) -> None:
    lab = [dataclasses.replace(n, drained=n.name == "mbp-m4") for n in LAB]
    placement = place(deepseek_meta, lab, DEFAULTS)
    assert placement.fits
    assert names(placement) == ["studio-1", "studio-2", "mbp-m3"]
    assert placement.drained == ("mbp-m4",)


def test_undrain_is_suggested_when_it_would_fit(deepseek_meta: ModelMeta) -> None:
    lab = [dataclasses.replace(n, drained=n.name in ("mbp-m3", "mbp-m4")) for n in LAB]
    placement = place(deepseek_meta, lab, DEFAULTS)
    assert not placement.fits
    assert names(placement) == ["studio-1", "studio-2", "mini-m4"]
    assert any("undrain mbp-m4" in s for s in placement.suggestions)


def test_fewest_nodes_and_the_largest_is_rank_0() -> None:
    meta = synthetic_meta([10 * GB] * 8, shared=GB)
    placement = place(meta, LAB, DEFAULTS)
    assert placement.fits
    assert names(placement) == ["studio-1"]
    assert placement.split == (8,)
    assert placement.not_chosen == ("studio-2", "mbp-m4", "mbp-m3", "mini-m4")


def test_ties_equal_memory_faster_chip_then_inventory_order() -> None:
    meta = synthetic_meta([60 * GB] * 4, shared=GB)  # needs two 192 GiB-class nodes
    lab = [NodeSpec("a", 192 * GIB, "M2 Max"), NodeSpec("b", 192 * GIB, "M2 Ultra"),
           NodeSpec("c", 192 * GIB, "M2 Ultra"), NodeSpec("d", 192 * GIB, None)]
    assert names(place(meta, lab, DEFAULTS)) == ["b", "c"]
    same = [NodeSpec(name, 192 * GIB, "M2 Ultra") for name in "wxyz"]
    assert names(place(meta, same, DEFAULTS)) == ["w", "x"]


def test_a_listed_ring_order_is_kept(deepseek_meta: ModelMeta) -> None:
    order = ["mbp-m4", "studio-2", "studio-1"]
    placement = place(deepseek_meta, LAB, DEFAULTS, order)
    assert placement.fits
    assert names(placement) == order
    assert placement.nodes[0].layers[1] == 61  # rank 0 holds the last layers


def test_a_node_too_small_for_one_layer_is_named() -> None:
    meta = synthetic_meta([30 * GB] * 4, shared=GB)
    lab = [NodeSpec("big", 192 * GIB, "M2 Ultra"), NodeSpec("tiny", 16 * GIB, "M1")]
    placement = place(meta, lab, DEFAULTS, ["big", "tiny"])
    assert not placement.fits
    assert any(p.startswith("tiny cannot hold even one layer") for p in placement.problems)


def test_ten_nodes() -> None:
    # Each 192 GiB node holds at most five 32 GB layers, the dense ones all sit on the first
    # stage: nine nodes are one layer short, so auto needs all ten.
    meta = synthetic_meta([9 * GB] * 3 + [32 * GB] * 45, shared=2 * GB)
    lab = [NodeSpec(f"m{i}", 192 * GIB, "M2 Ultra") for i in range(12)]
    placement = place(meta, lab, DEFAULTS)
    assert placement.fits
    assert names(placement) == [f"m{i}" for i in range(10)]
    assert all(n.bytes <= n.usable_bytes for n in placement.nodes)
    assert sum(placement.split) == 48 and min(placement.split) >= 1
    assert not place(meta, lab[:9], DEFAULTS).fits


def test_more_nodes_than_layers_is_a_problem_not_a_crash() -> None:
    meta = synthetic_meta([GB] * 2)
    lab = [NodeSpec(f"m{i}", 64 * GIB, "M4 Pro") for i in range(3)]
    placement = place(meta, lab, DEFAULTS, ["m0", "m1", "m2"])
    assert not placement.fits
    assert "every rank needs at least one" in placement.problems[0]


def test_everything_drained() -> None:
    lab = [dataclasses.replace(n, drained=True) for n in LAB]
    placement = place(synthetic_meta([GB]), lab, DEFAULTS)
    assert not placement.fits and not placement.nodes
    assert "every candidate is drained" in placement.problems[0]


def test_unknown_listed_host() -> None:
    with pytest.raises(PlacementError, match="not in the inventory: nope"):
        place(synthetic_meta([GB]), LAB, DEFAULTS, ["studio-1", "nope"])


def test_nothing_fits_in_auto_uses_every_node_for_the_report(deepseek_meta: ModelMeta) -> None:
    small = [NodeSpec(f"mini-{i}", 64 * GIB, "M4 Pro") for i in range(3)]
    placement = place(deepseek_meta, small, DEFAULTS)
    assert not placement.fits
    assert len(placement.nodes) == 3
    assert placement.required_bytes > placement.available_bytes
    assert placement.suggestions  # at least one way out


def test_overrides_change_the_verdict(deepseek_meta: ModelMeta) -> None:
    guide = ["studio-1", "studio-2", "mbp-m4"]
    strict = PlacementPolicy.from_settings(overhead=0.2)  # the guide's O on exact bytes
    assert not place(deepseek_meta, LAB, strict, guide).fits
    roomy = PlacementPolicy.from_settings(reserve_gb=4, kv_cache_gb=1, overhead=0.05)
    assert place(deepseek_meta, LAB, roomy, ["studio-1", "studio-2", "mini-m4"]).fits
