"""Issue #17's copy claim, asserted: a file far larger than the memory bound goes to 3
simulated Macs with the controller's, each agent's and each sshd's peak RSS under 100 MB, and
a second apply sends 0 bytes and rewrites nothing.

It runs `bench.copy_rss.measure` (the README's 1 GiB figure comes from the same code) on a
128 MiB file: more than the 100 MB bound on its own, so a controller or agent that held the
file whole would fail here. Hosts 127.0.0.190-192 (this test's own).
"""

from __future__ import annotations

from pathlib import Path

from bench.copy_rss import measure

MIB = 128
BOUND_MB = 100
BOUND_MIB = BOUND_MB * 1e6 / (1 << 20)  # measure() reports RSS in MiB (VmHWM kB / 1024)


def test_a_128_mib_copy_to_3_hosts_stays_under_100_mb_and_a_second_apply_sends_0_bytes(
        tmp_path: Path) -> None:
    result = measure(tmp_path, MIB, first_address=190)
    print(result)  # the figures, for the record (-s)
    assert MIB > BOUND_MIB * 1.3  # the file alone would break the bound
    assert result["first_apply_streamed_bytes"] == 3 * MIB * (1 << 20), result
    assert result["hosts_with_an_agent_sampled"] == 3, result  # every host's agent was seen
    assert result["controller_peak_rss_mb"] < BOUND_MIB, result
    assert result["agent_peak_rss_mb"] < BOUND_MIB, result
    assert result["sshd_peak_rss_mb"] < BOUND_MIB, result
    assert result["second_apply_no_changes"] is True, result
    assert result["second_apply_streamed_bytes"] == 0, result
    assert result["second_apply_left_the_copies_untouched"] is True, result
