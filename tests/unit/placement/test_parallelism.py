"""`placement.parallelism`: the config field, and what a tensor placement hands the planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_cluster
from orchestrator.errors import ConfigError
from orchestrator.model.meta import ModelMeta
from orchestrator.placement import PlacementPolicy, place_model
from tests.fixtures.clusters import write_cluster
from tests.unit.placement.conftest import LAB

DEFAULTS = PlacementPolicy()


def test_parallelism_defaults_to_auto_and_reads_tensor(tmp_path: Path) -> None:
    model = f"model:\n  path: {tmp_path}\n"
    default = load_cluster(write_cluster(tmp_path / "a", "c", model))
    assert default.placement.parallelism == "auto"
    tensor = load_cluster(write_cluster(tmp_path / "b", "c", model
                                        + "placement:\n  parallelism: tensor\n"))
    assert tensor.placement.parallelism == "tensor"


def test_a_tensor_placement_gives_every_rank_every_layer_and_file(
        deepseek_meta: ModelMeta) -> None:
    studios = [n for n in LAB if n.name.startswith("studio")]
    placement = place_model(deepseek_meta, LAB, DEFAULTS, [n.name for n in studios], "tensor")
    assert placement.parallelism == "tensor"
    every_file = tuple(f.name for f in deepseek_meta.files)
    assert len(every_file) == 88
    for node in placement.nodes:
        assert node.files == every_file
        assert node.layers == (0, 61)
        assert node.download_bytes == deepseek_meta.total_bytes


def test_pipeline_placement_says_pipeline(deepseek_meta: ModelMeta) -> None:
    assert place_model(deepseek_meta, LAB, DEFAULTS, None, "pipeline").parallelism == "pipeline"


def test_an_unknown_parallelism_or_link_is_refused_at_its_line(tmp_path: Path) -> None:
    for key, value in (("parallelism", "fast"), ("link", "wifi")):
        cluster = write_cluster(tmp_path / key, "c", f"model:\n  path: {tmp_path}\n"
                                f"placement:\n  {key}: {value}\n")
        with pytest.raises(ConfigError) as failure:
            load_cluster(cluster)
        assert "cluster.yml:6:" in str(failure.value) and value in str(failure.value)
