"""Layer ranges and files per rank equal what mlx-lm's own `sharded_load` selects.

These tests run mlx-lm — `mlx_lm.utils.sharded_load` on a tiny real deepseek_v3 model — with
the split forced through mlx-lm's `PipelineMixin.pipeline(group, split)`, and record the file
set it passes to its downloader. Nothing of mlx-lm's selection logic is copied here.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.model.meta import files_for_layers, load_local_meta
from orchestrator.placement import layer_ranges
from tests.fixtures.groups import FakeGroup
from tests.fixtures.mlx_lm import declared_split, mlx_lm_rank_files
from tests.fixtures.tiny_model import make_tiny_deepseek

mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")
pipeline_module = pytest.importorskip("mlx_lm.models.pipeline")

SPLITS = [(6,), (3, 3), (1, 5), (5, 1), (1, 2, 3), (3, 2, 1), (2, 1, 1, 2), (1,) * 6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 layers (layer 0 dense, the rest MoE) in 5 files that straddle layer boundaries."""
    return make_tiny_deepseek(tmp_path_factory.mktemp("tiny") / "model", n_layers=6, n_files=5)


@pytest.fixture
def mlx_lm_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """sharded_load(path, rank, split) -> (model, files mlx-lm chose to fetch)."""
    forced: dict[str, list[int]] = {}
    chosen: list[set[str]] = []
    original_pipeline = pipeline_module.PipelineMixin.pipeline
    original_download = mlx_utils._download

    def pipeline(self: Any, group: Any, split: Any = None) -> Any:
        return original_pipeline(self, group, split=forced["split"])

    def download(repo: str, revision: Any = None, allow_patterns: Any = None) -> Path:
        if isinstance(allow_patterns, set):  # the rank's weight files
            chosen.append(set(allow_patterns))
        return Path(original_download(repo, revision=revision, allow_patterns=allow_patterns))

    monkeypatch.setattr(pipeline_module.PipelineMixin, "pipeline", pipeline)
    monkeypatch.setattr(mlx_utils, "_download", download)

    def load(path: Path, rank: int, split: tuple[int, ...]) -> tuple[Any, set[str]]:
        forced["split"] = list(split)
        chosen.clear()
        model, _tokenizer = mlx_utils.sharded_load(str(path), pipeline_group=FakeGroup(rank,
                                                                                   len(split)))
        assert len(chosen) == 1
        return model, chosen[0]

    yield load


@pytest.mark.parametrize("split", SPLITS, ids=[str(list(s)) for s in SPLITS])
def test_ranges_and_files_equal_mlx_lms(tiny: Path, mlx_lm_load: Any,
                                        split: tuple[int, ...]) -> None:
    meta = load_local_meta(tiny)
    for rank, (start, end) in enumerate(layer_ranges(split)):
        model, files = mlx_lm_load(tiny, rank, split)
        assert (model.model.start_idx, model.model.end_idx) == (start, end)
        assert set(files_for_layers(meta, start, end)) == files


def test_a_directory_with_only_the_ranks_files_loads_the_right_weights(
        tiny: Path, mlx_lm_load: Any, tmp_path: Path) -> None:
    """The file list is sufficient, not just equal: every weight of the rank's layers loads
    from it (mlx-lm's strict=False would otherwise leave random weights, silently)."""
    from mlx.utils import tree_flatten

    meta = load_local_meta(tiny)
    split = (3, 3)
    rank = 0  # layers 3-5: not every file
    start, end = layer_ranges(split)[rank]
    assert len(files_for_layers(meta, start, end)) < len(meta.files)
    node_dir = tmp_path / "node"
    node_dir.mkdir()
    for item in tiny.iterdir():  # a real (small, non-sparse) model: copying is fine
        if not item.name.endswith(".safetensors") or item.name in files_for_layers(meta, start,
                                                                                   end):
            shutil.copy(item, node_dir / item.name)
    model, _ = mlx_lm_load(node_dir, rank, split)
    reference: dict[str, Any] = {}
    for f in tiny.glob("*.safetensors"):
        reference.update(mx.load(str(f)))
    loaded = dict(tree_flatten(model.parameters()))
    expected = {k for k in reference
                if not k.startswith("model.layers.")
                or start <= int(k.split(".")[2]) < end}
    assert expected <= set(loaded)
    for name in expected:
        assert mx.array_equal(loaded[name], reference[name]).item(), name


@pytest.fixture(scope="module")
def six_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The e2e ring's model: 6 layers in 6 files."""
    return make_tiny_deepseek(tmp_path_factory.mktemp("six") / "full", n_layers=6, n_files=6)


def test_placement_picks_the_files_mlx_lm_loads(six_files: Path) -> None:
    """orch's per-node file list is exactly what mlx-lm reads for that rank, split applied."""
    split = declared_split(six_files)
    meta = load_local_meta(six_files)
    for rank, (start, end) in enumerate(layer_ranges(split)):
        assert set(files_for_layers(meta, start, end)) == mlx_lm_rank_files(six_files, split, rank)
