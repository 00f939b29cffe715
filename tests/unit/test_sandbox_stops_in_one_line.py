"""Issue #17: on a plain install, `orch sandbox up` serves, or stops with one clear line that
says what to install; never a traceback. The serving half is the e2e fresh-clone test
(tests/e2e/test_sandbox.py, which also checks mlx is absent from the controller); this is the
stopping half, for the one thing the sandbox needs that pip cannot install: OpenSSH's sshd.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.simulator import hosts


def test_without_sshd_sandbox_up_stops_with_one_line_naming_the_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(hosts.shutil, "which",
                        lambda name, *a, **k: None if name == "sshd" else real_which(name, *a, **k))
    result = CliRunner().invoke(main, ["sandbox", "up", "--dir", str(tmp_path / "sbx")])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        "error: sshd not found: the simulated Macs need OpenSSH's server "
        "(Debian/Ubuntu: apt-get install openssh-server)"], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "sbx" / "state.json").exists()  # nothing left that claims to be up
