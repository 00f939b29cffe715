"""The agent's `launchctl print` parser on output captured from real Macs.

``tests/fixtures/macos/print_*`` are copies of /work/shared/macos (each ``.src`` names where
it was published). Real output nests blocks with their own ``state = active`` (resource and
jetsam coalitions), has ``inherited``/``default environment`` blocks beside ``environment``,
and after a signal shows ``last terminating signal`` with no ``last exit code``: the job's
top-level state, pid and exit must come out right anyway.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.agent import launchd as agent_launchd

CAPTURES = Path(__file__).parents[1] / "fixtures" / "macos"

EXPECTED = {
    "print_gui_running_brokkr_ci.txt": ("running", 48630, None),
    "print_gui_running_sigterm_mattstack_chat.txt": ("running", 17594, 128 + 15),
    "print_gui_not_running_exit0_motherboard.txt": ("waiting", None, 0),
    "print_gui_spawn_scheduled_exit1_macos14_gha.txt": ("waiting", None, 1),
    "print_not_found_gui_mattstack.txt": ("not_loaded", None, None),
}


def test_every_capture_is_covered_and_has_its_source() -> None:
    captures = {p.name for p in CAPTURES.glob("print_*.txt")}
    assert captures == set(EXPECTED)
    assert all((CAPTURES / f"{name}.src").read_text().startswith("SOURCE: ") for name in captures)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_top_level_state_pid_and_exit_of_a_real_capture(name: str) -> None:
    job = agent_launchd.launchd_job((CAPTURES / name).read_text())
    assert (job["state"], job["pid"], job["last_exit"]) == EXPECTED[name]


def test_nested_blocks_and_other_environments_do_not_leak() -> None:
    text = (CAPTURES / "print_gui_running_sigterm_mattstack_chat.txt").read_text()
    parsed = agent_launchd.parse_launchctl_print(text)
    assert parsed["scalars"]["state"] == "running"  # not the coalitions' "active"
    assert "ID" not in parsed["scalars"] and "name" not in parsed["scalars"]
    env = agent_launchd.launchd_job(text)["env"]
    assert env["PORT"] == "11002" and "SSH_AUTH_SOCK" not in env  # inherited, not the job's
    assert "PATH" in env and env["PATH"].startswith("/Applications/")  # the job's, not default
