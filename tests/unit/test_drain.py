"""`orch drain` refuses, before touching any host, when the other nodes cannot hold the model.

Offline: the guide's lab inventory (which no test can reach) and a sparse DeepSeek-R1-shaped
checkpoint; the refusal comes from placement, so no host is contacted and the inventory is left
as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.fixtures.cli import orch
from tests.fixtures.clusters import LAB_INVENTORY, write_cluster
from tests.fixtures.deepseek_like import make_deepseek_like


def test_a_drain_the_others_cannot_hold_changes_nothing(tmp_path: Path) -> None:
    model = make_deepseek_like(tmp_path / "r1")
    inventory = tmp_path / "lab.yml"
    shutil.copy(LAB_INVENTORY, inventory)
    before = inventory.read_text()
    cluster = write_cluster(tmp_path, "r1", f"model:\n  path: {model}\n"
                            "placement:\n  nodes: [studio-1, studio-2, mbp-m4]\n",
                            inventory=Path("lab.yml"), file="r1.yml")
    proc = orch("drain", cluster, "studio-1")
    assert proc.returncode == 1, proc.output
    assert "GB short" in proc.stderr or "short" in proc.stderr, proc.stderr
    assert inventory.read_text() == before
