"""From the cluster file to placement inputs: inventory RAM first, facts when they exist."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import load_cluster
from orchestrator.model.meta import ModelMeta
from orchestrator.placement import (
    GB,
    nodes_from_cluster,
    plan_placement,
    policy_from_cluster,
)
from tests.fixtures import clusters
from tests.unit.placement.conftest import GIB, LAB


def write_cluster(tmp_path: Path, model: Path, placement: str = "  nodes: auto\n") -> Path:
    return clusters.write_cluster(tmp_path, "lab",
                                  f"model:\n  path: {model}\nplacement:\n{placement}")


def test_the_lab_inventory_becomes_the_guides_macs(tmp_path: Path, deepseek_dir: Path) -> None:
    cluster = load_cluster(write_cluster(tmp_path, deepseek_dir))
    nodes = {n.name: n for n in nodes_from_cluster(cluster)}
    assert nodes == {n.name: n for n in LAB}
    assert nodes["studio-1"].memory_bytes == 206_158_430_208  # hw.memsize of a 192 GB Studio


def test_placement_settings_reach_the_policy(tmp_path: Path, deepseek_dir: Path,
                                             deepseek_meta: ModelMeta) -> None:
    settings = "  nodes: [studio-1, studio-2, mbp-m4]\n  reserve_gb: 6\n  kv_cache_gb: 2\n" \
               "  overhead: 0.05\n"
    cluster = load_cluster(write_cluster(tmp_path, deepseek_dir, settings))
    policy = policy_from_cluster(cluster)
    assert policy.reserve(192 * GIB) == 6 * GB
    assert policy.kv_cache_bytes == 2 * GB
    assert float(policy.overhead) == 0.05
    placement = plan_placement(cluster, deepseek_meta)
    assert placement.fits
    assert [n.name for n in placement.nodes] == ["studio-1", "studio-2", "mbp-m4"]


def test_the_link_follows_the_backend_unless_set(tmp_path: Path, deepseek_dir: Path) -> None:
    """jaccl runs over RDMA: its estimates use the rdma link without `placement.link`."""
    def link(placement: str, runtime: str) -> str:
        path = clusters.write_cluster(tmp_path / f"{len(list(tmp_path.iterdir()))}", "lab",
                                      f"model:\n  path: {deepseek_dir}\nplacement:\n"
                                      f"{placement}runtime:\n{runtime}")
        return policy_from_cluster(load_cluster(path)).link.name

    assert link("  nodes: auto\n", "  backend: ring\n") == "ethernet"
    assert link("  nodes: auto\n", "  backend: jaccl\n") == "rdma"
    assert link("  nodes: auto\n", "  backend: jaccl-ring\n") == "rdma"
    assert link("  link: thunderbolt\n", "  backend: jaccl\n") == "thunderbolt"
    assert link("  link: rdma\n", "  backend: ring\n") == "rdma"
