"""The two views: the JSON contract of `orch place --json`, and the table people read."""

from __future__ import annotations

import json

from orchestrator.model.meta import ModelMeta
from orchestrator.placement import PlacementPolicy, place, render_table, to_json
from tests.unit.placement.conftest import LAB

GUIDE = ["studio-1", "studio-2", "mbp-m4"]


def test_json_has_the_promised_shape(deepseek_meta: ModelMeta) -> None:
    doc = to_json(place(deepseek_meta, LAB, PlacementPolicy()))
    json.dumps(doc)  # serialisable as is
    assert isinstance(doc["fits"], bool) and doc["fits"]
    assert isinstance(doc["required_bytes"], int) and isinstance(doc["available_bytes"], int)
    assert doc["even_split_fits"] is False
    assert [n["name"] for n in doc["nodes"]] == GUIDE
    for rank, node in enumerate(doc["nodes"]):
        assert node["rank"] == rank
        assert isinstance(node["layers"], list) and len(node["layers"]) == 2
        assert isinstance(node["bytes"], int) and isinstance(node["usable_bytes"], int)
        assert node["bytes"] <= node["usable_bytes"]
        assert node["files"] and all(isinstance(f, str) for f in node["files"])
    assert doc["nodes"][0]["layers"] == [39, 61]  # end exclusive, like mlx-lm's end_idx
    assert doc["split"] == [22, 22, 17]
    assert doc["required_bytes"] == sum(n["bytes"] for n in doc["nodes"])
    assert doc["model"]["num_files"] == 88


def test_table_names_nodes_units_and_verdict(deepseek_meta: ModelMeta) -> None:
    text = render_table(place(deepseek_meta, LAB, PlacementPolicy()))
    for name in GUIDE:
        assert name in text
    assert "GB = 10^9 bytes" in text
    assert "39–60 (22)" in text  # inclusive ranges for people
    assert "Fits on 3 nodes" in text
    assert "even split [21, 20, 20] would not fit" in text
    assert "Decode ≤" in text


def test_refusal_table_says_why(deepseek_meta: ModelMeta) -> None:
    placement = place(deepseek_meta, LAB, PlacementPolicy(), ["studio-1", "studio-2"])
    text = render_table(placement)
    assert "does not fit on studio-1, studio-2" in text
    assert "short 84.5 GB" in text
    assert "Smallest changes that would fit" in text
    doc = to_json(placement)
    assert doc["fits"] is False and doc["problems"] and doc["suggestions"]
