"""Draining edits the inventory without losing a comment; undrain gives the file back."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config.edit import set_drained
from orchestrator.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]


def test_drain_then_undrain_restores_the_file_byte_for_byte(tmp_path: Path) -> None:
    inventory = tmp_path / "lab.yml"
    original = (REPO / "inventories" / "lab.yml").read_text()
    inventory.write_text(original)
    assert set_drained(inventory, "mbp-m4", True)
    drained = inventory.read_text()
    assert drained != original
    for line in original.splitlines():
        if line.strip().startswith("#") or "#" in line:
            assert line in drained, f"comment lost: {line!r}"
    assert "  mbp-m4:\n    address: mbp-m4.local\n    ring_ip: 10.0.0.5\n    chip: M4 Max\n" \
           "    drained: true\n" in drained
    assert not set_drained(inventory, "mbp-m4", True), "a second drain changes nothing"
    assert set_drained(inventory, "mbp-m4", False)
    assert inventory.read_text() == original


def test_undrain_of_a_host_drained_by_its_group_writes_false(tmp_path: Path) -> None:
    inventory = tmp_path / "inv.yml"
    inventory.write_text("groups:\n  old: {hosts: [a], vars: {drained: true}}\n"
                         "hosts:\n  a:  # the old one\n    address: x\n    ring_ip: 10.0.0.1\n")
    assert set_drained(inventory, "a", False, inherited=True)
    assert "  a:  # the old one\n    address: x\n    ring_ip: 10.0.0.1\n    drained: false\n" \
        in inventory.read_text()


def test_unknown_host_is_an_error(tmp_path: Path) -> None:
    inventory = tmp_path / "inv.yml"
    inventory.write_text("hosts:\n  a: {address: x, ring_ip: 10.0.0.1}\n")
    with pytest.raises(ConfigError, match="'b' is not a mapping"):
        set_drained(inventory, "b", True)
