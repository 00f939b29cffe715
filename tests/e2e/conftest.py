"""End-to-end tests: real MLX workers forming a real ring on loopback aliases (127.0.0.21-23).

Everything is real except the Macs: ``mlx[cpu]``, ``mlx_lm.server --pipeline`` and the ring
backend run as local processes, each with ``MLX_RANK`` and ``MLX_HOSTFILE`` as launchd would set
them. Nothing is skipped: without mlx and mlx-lm installed (``pip install -e '.[mlx,test]'``)
these tests fail at import.

Converging a sandbox from bare hosts (a venv per node, a ring that compiles its kernels) is the
slowest thing the suite does, so the tests that need "a converged, serving sandbox" share one:
the ``serving`` fixture. It is applied once, from bare hosts (the output of that first apply is
kept for the test that checks it), and stopped right after the last test that uses it.
Contract: a test may change the cluster, but leaves it converged (``orch plan
--detailed-exitcode`` exits 0) and serving on all three nodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.simulator import cluster as sandbox
from orchestrator.simulator.cluster import Sandbox
from orchestrator.simulator.hosts import RunningHost, stop_hosts
from tests.e2e.ring import reference
from tests.fixtures.cli import Ran, orch

PROMPT = "Say OK."
MAX_TOKENS = 8

_LAST_USER = pytest.StashKey[str]()
_STOPS = pytest.StashKey[list[Callable[[], None]]]()


@dataclass(frozen=True)
class Serving:
    """The shared sandbox: what `orch sandbox up` started, and the first apply's output."""

    sandbox: Sandbox
    hosts: tuple[RunningHost, ...]  # the simulated Macs, for a test that reboots one
    first_apply: Ran  # `orch apply` on the bare hosts
    expected: tuple[int, ...]  # greedy tokens for PROMPT from one process holding the model

    @property
    def directory(self) -> Path:
        return self.sandbox.directory

    @property
    def cluster_file(self) -> Path:
        return self.sandbox.cluster_file

    @property
    def known_hosts(self) -> Path:
        return self.sandbox.known_hosts

    @property
    def api_url(self) -> str:
        return self.sandbox.api_url

    def orch(self, *args: str | Path) -> Ran:
        """`orch COMMAND cluster_file ARGS` against this sandbox."""
        command, *rest = args
        return orch(command, self.cluster_file, *rest, known_hosts=self.known_hosts)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/e2e runs real MLX workers: mark it so ``-m e2e`` selects them.

    The tests that use ``serving`` run first, one after another, and the sandbox stops after
    the last of them. Ordering matters for time, not correctness: the README's sandbox test
    needs the same addresses, and a shared ring left up would compete with it (mlx's ring
    polls a core per rank while a collective waits; the worker's idle wait keeps ranks other
    than 0 out of that between requests, but not while a request is served)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)
    users = [item for item in items if "serving" in getattr(item, "fixturenames", ())]
    if users:
        others = [item for item in items if item not in users]
        first = min(items.index(item) for item in users)
        items[first:] = users + [item for item in others if items.index(item) >= first]
        config.stash[_LAST_USER] = users[-1].nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop the shared sandbox once its last user is done, not at the end of the session: the
    tests after it need the CPU (and the README test the same addresses)."""
    if item.config.stash.get(_LAST_USER, None) == item.nodeid:
        for stop in item.config.stash.get(_STOPS, []):
            stop()


@pytest.fixture(scope="session")
def serving(tmp_path_factory: pytest.TempPathFactory,
            pytestconfig: pytest.Config) -> Iterator[Serving]:
    directory = tmp_path_factory.mktemp("serving") / "sandbox"
    hosts: list[RunningHost] = []

    def stop() -> None:
        """The hosts first, through their handles: a rebooted one has pids `down` never saw."""
        stop_hosts(hosts)
        sandbox.down(directory)

    pytestconfig.stash.setdefault(_STOPS, []).append(stop)
    try:
        started, booted = sandbox.boot(directory, 3)
        hosts.extend(booted)
        applied = orch("apply", started.cluster_file, "--yes", known_hosts=started.known_hosts)
        assert applied.returncode == 0, applied.output
        expected, _ = reference(directory / "model", PROMPT, MAX_TOKENS)
        yield Serving(started, tuple(hosts), applied, tuple(expected))
    finally:
        stop()  # a no-op when it stopped after its last user
