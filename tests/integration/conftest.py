"""Fixtures for integration tests: real OpenSSH sshd hosts that look like Macs.

``test_hosts`` starts three simulated Macs once per session (see
``orchestrator.simulator.hosts``): two Mac Studio M2 Ultra 192 GiB and a MacBook Pro M4 Max
128 GiB, on 127.0.0.11-13. Override ``test_host_specs`` in a nested conftest to change them.
Nothing is skipped: without sshd the fixture fails and says what to install.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from orchestrator.simulator.hosts import (
    HostSpec,
    RunningHost,
    SandboxError,
    default_specs,
    start_hosts,
    stop_hosts,
)

TreeHash = Callable[..., str]


def sshd_log(host: RunningHost) -> Path:
    return host.root / "log" / "sshd.log"


def exec_channels_logged(host: RunningHost, offset: int) -> int:
    """Exec channels the host's sshd started since `offset` (a byte offset into its log): it
    logs "Starting session: ..." for every exec request at LogLevel VERBOSE (hosts.py sets
    it), so a channel the executor forgot to count is still seen here."""
    with sshd_log(host).open("rb") as f:
        f.seek(offset)
        return sum(1 for line in f if b"Starting session: " in line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration needs the sshd hosts: mark it so ``-m`` works."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def test_host_specs() -> list[HostSpec]:
    """The hosts ``test_hosts`` starts; override to test other machines."""
    return default_specs(3)


@pytest.fixture(scope="session")
def test_hosts(
    tmp_path_factory: pytest.TempPathFactory, test_host_specs: list[HostSpec]
) -> Iterator[list[RunningHost]]:
    """Three running simulated Macs for the whole session; stopped (and checked for
    leftover processes and ports) at the end."""
    base = tmp_path_factory.mktemp("hosts")
    try:
        hosts = start_hosts(base, test_host_specs)
    except SandboxError as exc:
        pytest.fail(f"cannot start the simulated Macs: {exc}", pytrace=False)
    try:
        yield hosts
    finally:
        stop_hosts(hosts)


@pytest.fixture
def tree_hash() -> TreeHash:
    """``tree_hash(host, "home")`` (or any path) -> sha256 over the tree's relative paths,
    file types, permission bits, file contents and symlink targets. Equal hashes before
    and after a command prove it changed nothing (idempotence tests)."""

    def digest(where: RunningHost | Path, sub: str = "", *, exclude: tuple[str, ...] = ()) -> str:
        top = (where.root if isinstance(where, RunningHost) else Path(where)) / sub
        h = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted([*dirnames, *filenames]):
                path = Path(dirpath, name)
                rel = path.relative_to(top).as_posix()
                if any(rel == e or rel.startswith(e + "/") for e in exclude):
                    continue
                st = path.lstat()
                h.update(f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{st.st_mode & 0o7777:o}\0".encode())
                if stat.S_ISLNK(st.st_mode):
                    h.update(os.readlink(path).encode())
                elif stat.S_ISREG(st.st_mode):
                    h.update(hashlib.sha256(path.read_bytes()).digest())
                h.update(b"\n")
        return h.hexdigest()

    return digest
