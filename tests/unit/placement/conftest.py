"""Shared fixtures: the DeepSeek-R1-4bit-shaped sparse checkpoint and the guide's Mac lab."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.model.meta import ModelMeta, load_local_meta
from orchestrator.placement import NodeSpec
from tests.fixtures.deepseek_like import make_deepseek_like

GIB = 2**30

# The guide's five Macs, as inventories/lab.yml describes them (memory_gb is Apple's GiB).
LAB = (
    NodeSpec("studio-1", 192 * GIB, "M2 Ultra"),
    NodeSpec("studio-2", 192 * GIB, "M2 Ultra"),
    NodeSpec("mini-m4", 64 * GIB, "M4 Pro"),
    NodeSpec("mbp-m3", 128 * GIB, "M3 Max"),
    NodeSpec("mbp-m4", 128 * GIB, "M4 Max"),
)


@pytest.fixture(scope="session")
def deepseek_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """88 sparse files, ~420 GB apparent, well under 1 MB on disk."""
    return make_deepseek_like(tmp_path_factory.mktemp("models") / "DeepSeek-R1-4bit")


@pytest.fixture(scope="session")
def deepseek_meta(deepseek_dir: Path) -> ModelMeta:
    return load_local_meta(deepseek_dir)
