"""`orch place`'s memory bars: weights | overhead | KV cache | headroom over usable memory."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.placebars import bar, cells

REPO = Path(__file__).parents[3]
GUIDE = ["place", str(REPO / "playbooks" / "deepseek-r1.yml"), "--params", "671e9", "--bits",
         "4", "--layers", "61"]


def test_cells_cover_the_parts_exactly_and_never_hide_a_small_one() -> None:
    assert cells([50, 25, 25, 0], 100, 20) == [10, 5, 5, 0]
    assert sum(cells([7, 3, 1, 89], 100, 60)) == 60
    assert cells([99, 1, 0, 0], 100, 10)[1] == 1  # 0.1 cell still shows


def test_a_node_that_fits_fills_its_bar_with_headroom() -> None:
    text = bar(60, 10, 10, 100, 20).plain
    assert text == "█" * 12 + "▓" * 2 + "▒" * 2 + "░" * 4


def test_a_node_that_does_not_fit_marks_what_is_beyond_usable() -> None:
    text = bar(100, 20, 30, 120, 30).plain  # need 150 of 120 usable: 30/150 of the bar is over
    assert len(text) == 30 and text.endswith("!" * 6) and "░" not in text
    assert text.startswith("█" * 20)


def test_place_draws_one_bar_per_node_and_json_is_unchanged() -> None:
    table = CliRunner().invoke(main, GUIDE)
    assert table.exit_code == 0, table.output
    rows = [line for line in table.stdout.splitlines() if "█" in line and " GB (" in line]
    assert [r.split()[0] for r in rows] == ["studio-1", "studio-2", "mbp-m4"]
    assert "155.8 of 193.3 GB (81%)" in rows[0]
    as_json = CliRunner().invoke(main, [*GUIDE, "--json"])
    assert as_json.exit_code == 0
    assert "█" not in as_json.stdout and json.loads(as_json.stdout)["fits"] is True


def test_the_readme_shows_the_bars_this_command_draws() -> None:
    """The README's picture (issue #17: "show it in the README, as text") is the real output,
    line for line, so it cannot drift from what `orch place` draws."""
    drawn = CliRunner().invoke(main, GUIDE).stdout.splitlines()
    bars = drawn[next(i for i, line in enumerate(drawn) if line.startswith("memory per node")):]
    readme = (REPO / "README.md").read_text()
    assert "orch place playbooks/deepseek-r1.yml\n--params 671e9 --bits 4 --layers 61" in readme
    assert "```\n" + "\n".join(bars) + "\n```\n" in readme, "\n".join(bars)
