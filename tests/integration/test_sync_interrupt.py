"""A sync interrupted at every stage, then run again: every file verified, little fetched twice
(issue #16's Must-show), and a copy relayed from a file still arriving (cut-through).

Every node needs every file (as with tensor parallelism), so each file leaves the Hub once
and reaches the other two nodes from a peer that is still receiving it. The controller is
the real ``orch apply`` in a process of its own (tests/fixtures/files_apply.py), so a test
can kill it; the three sshd test hosts run the real agent and peer servers; the test hub is
throttled, so every transfer lasts long enough to be interrupted mid-body. Each interruption
is triggered by what a node holds (the size of its ``.partial``) or by the controller's own
log events, never after a sleep, so it lands mid-body however loaded the machine is.

The measure of waste: the bytes that reached a node twice (the report's ``refetched``,
summed over the runs that reported) and the bytes the Hub sent beyond one copy of the model
(its own counters, over every run: this also counts bytes lost in flight when a run dies,
which no report can). Both must stay under one file's size per interruption.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import agent_file_id
from orchestrator.placement.intent import Intent
from orchestrator.run import engine
from orchestrator.simulator import files_only, processes
from orchestrator.simulator.faults import Faults
from orchestrator.simulator.hosts import RunningHost
from orchestrator.simulator.hub import TestHub
from tests.fixtures import clusters
from tests.fixtures.cli import orch

REPO = "org/interrupt"
TOKEN = "hf_interrupt_secret_0badc0ffee42"
FILE_BYTES = 6_000_000
FILES = 3
HUB_BYTES_PER_S = 6_000_000  # the model leaves the Hub in about 3 s: time to interrupt it
HUB_ADDRESS, CDN_ADDRESS = "127.0.0.121", "127.0.0.122"  # this module's own addresses
SYNC_PORT = 47391
GUARD_S = 180.0  # how long to wait for a state before failing (a hang guard, not a timing)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random (incompressible) files; no safetensors header is needed, nothing is placed."""
    directory = tmp_path_factory.mktemp("interrupt") / "model"
    directory.mkdir()
    for i in range(FILES):
        (directory / f"model-{i + 1:05d}-of-{FILES:05d}.safetensors").write_bytes(
            os.urandom(FILE_BYTES))
    return directory


@pytest.fixture(scope="module")
def hub(model_dir: Path) -> Iterator[TestHub]:
    with TestHub({REPO: model_dir}, token=TOKEN, host=HUB_ADDRESS, cdn_host=CDN_ADDRESS,
                 faults=Faults(bytes_per_second=HUB_BYTES_PER_S)) as running:
        yield running


def weights(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.iterdir())


def model_root(host: RunningHost) -> Path:
    return host.home / ".orch" / "models" / REPO.replace("/", "--")


@pytest.fixture
def cluster(test_hosts: list[RunningHost], hub: TestHub, model_dir: Path, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty nodes, the hub's counters and log zeroed; the cluster file (every node needs
    every file) and its FILES.json beside it. In this process (for ``orch plan``) the
    engine declares the same files as the controller process does."""
    for host in test_hosts:
        with contextlib.suppress(FileNotFoundError):
            for path in model_root(host).iterdir():
                path.unlink()
    hub.reset_stats()
    hub.log.clear()
    files = {h.name: weights(model_dir) for h in test_hosts}
    (tmp_path / "files.json").write_text(json.dumps(files))
    monkeypatch.setattr(engine, "resolve_intent", lambda cluster: Intent())
    monkeypatch.setattr(engine, "desired_state",
                        files_only.desired_state(lambda cluster: files, holders=True))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return clusters.write_cluster(
        tmp_path, "interrupt",
        f"model:\n  repo: {REPO}\n  endpoint: {hub.endpoint}\n"
        f"placement:\n  nodes: [{', '.join(h.name for h in test_hosts)}]\n"
        f"runtime:\n  packages: []\n  sync_port: {SYNC_PORT}\n", hosts=test_hosts)


# ------------------------------------------------------------------------- the controller


class Controller:
    """``orch -v --log-format json apply`` in its own process; its log events as they come."""

    def __init__(self, cluster: Path, known_hosts: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stdout = (cluster.parent / f"apply-{time.monotonic_ns()}.out").open("w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fixtures.files_apply", str(cluster),
             str(cluster.parent / "files.json"), str(known_hosts), "-v", "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=subprocess.PIPE, cwd=ROOT,
            env=dict(os.environ))
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._changed:
                self.stderr.append(line)
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def started(self, host: str | None = None, file: str | None = None) -> list[dict[str, Any]]:
        """The ``sync_file_started`` events so far (of ``host``, of ``file``)."""
        with self._changed:
            return [e for e in self.events if e.get("event") == "sync_file_started"
                    and host in (None, e["host"]) and file in (None, e["file"])]

    def done(self, host: str, file: str) -> bool:
        with self._changed:
            return any(e.get("event") == "sync_file_done" and (e["host"], e["file"]) == (host, file)
                       for e in self.events)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def finish(self) -> tuple[int, dict[str, Any] | None]:
        """Wait for the process; (exit code, its ``--json`` report, None when it printed none)."""
        code = self.proc.wait(timeout=GUARD_S)
        self._reader.join(timeout=GUARD_S)
        self._stdout.seek(0)
        out = self._stdout.read().decode()
        self._stdout.close()
        assert TOKEN not in out and not any(TOKEN in line for line in self.stderr)
        return code, json.loads(out) if out.strip() else None


def until(condition: Callable[[], Any], what: str, controller: Controller | None = None) -> Any:
    """Poll ``condition`` until it is true (returning its value); fail if the controller
    exits first or nothing happens for `GUARD_S`."""
    deadline = time.monotonic() + GUARD_S
    while True:
        value = condition()
        if value:
            return value
        if controller is not None and controller.proc.poll() is not None:
            pytest.fail(f"the controller exited ({controller.proc.returncode}) before {what}:\n"
                        + "\n".join(controller.stderr[-20:]))
        if time.monotonic() > deadline:
            pytest.fail(f"never happened in {GUARD_S:.0f} s: {what}")
        time.sleep(0.01)


def partial_size(host: RunningHost, name: str) -> int:
    try:
        return (model_root(host) / f"{name}.partial").stat().st_size
    except FileNotFoundError:
        return 0


# ------------------------------------------------------------------------------- checks


def assert_verified(hosts: Sequence[RunningHost], hub: TestHub, model_dir: Path) -> None:
    """Every node holds every file, each matching the manifest's sha256; no partial is left."""
    manifest = {path: f.sha256 for path, f in hub.repo(REPO).files.items()}
    assert set(manifest) == set(weights(model_dir))
    for host in hosts:
        held = {p.name: p for p in model_root(host).iterdir()}
        assert set(held) == set(manifest), host.name
        for name, path in held.items():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest[name], (host, name)


def transfers(report: Mapping[str, Any] | None) -> dict[str, Any]:
    assert report is not None
    summary: dict[str, Any] = report["outcome"]["transfers"]
    return summary


def assert_little_fetched_twice(reports: Sequence[Mapping[str, Any] | None], hub: TestHub,
                                model_dir: Path, interruptions: int = 1) -> None:
    """Under one file's size per interruption: the bytes the runs' reports count as fetched
    twice, and the bytes the Hub sent beyond one copy of the model."""
    refetched = sum(transfers(r)["bytes"]["refetched"] for r in reports if r is not None)
    assert refetched < FILE_BYTES * interruptions, refetched
    model_bytes = sum(p.stat().st_size for p in model_dir.iterdir())
    surplus = hub.stats().total_bytes_served - model_bytes
    assert 0 <= surplus < FILE_BYTES * interruptions, (surplus, hub.stats().bytes_served, [
        (round(e.at, 2), e.path[-40:], e.range, e.status, e.body) for e in hub.log if e.file],
        [transfers(r)["fetches"] for r in reports if r is not None])
    print(f"fetched twice: {refetched} B by the reports; Hub bytes beyond the model: {surplus} B")


def assert_converged(cluster: Path, hosts: Sequence[RunningHost]) -> None:
    ran = orch("plan", cluster, "--detailed-exitcode", known_hosts=hosts[0].known_hosts_file)
    assert ran.returncode == 0 and "No changes." in ran.stdout, ran.output


def relaying(controller: Controller, hosts: Sequence[RunningHost], share: float
             ) -> tuple[RunningHost, RunningHost, str] | None:
    """(seed, receiver, file): a node taking a file from a peer that is still receiving it
    from the Hub, with ``share`` of the file already relayed; None while there is none."""
    by_name = {h.name: h for h in hosts}
    for event in controller.started():
        source, receiver, name = event["source"], by_name[event["host"]], event["file"]
        if source not in by_name or controller.done(source, name):
            continue
        if any(e["source"] == "hub" for e in controller.started(source, name)) and \
                partial_size(receiver, name) >= share * FILE_BYTES and \
                not (model_root(by_name[source]) / name).exists():
            return by_name[source], receiver, name
    return None


# -------------------------------------------------------------------------------- tests


def test_a_copy_is_relayed_from_a_file_still_arriving_and_each_file_leaves_the_hub_once(
    test_hosts: list[RunningHost], hub: TestHub, model_dir: Path, cluster: Path
) -> None:
    """Cut-through: for every file, the other nodes' copies start from its seed before the
    seed has the whole file, every copy verifies, and the Hub sends each file once."""
    code, report = Controller(cluster, test_hosts[0].known_hosts_file).finish()
    assert code == 0
    summary = transfers(report)
    assert_verified(test_hosts, hub, model_dir)
    assert summary["failed"] == 0 and summary["bytes"]["refetched"] == 0
    assert summary["bytes"]["hub"] == FILES * FILE_BYTES
    assert summary["bytes"]["lan"] == (len(test_hosts) - 1) * FILES * FILE_BYTES
    stats = hub.stats()
    assert stats.complete_serves == {f"{REPO}/{n}": 1 for n in weights(model_dir)}
    assert stats.total_bytes_served == FILES * FILE_BYTES
    for name in weights(model_dir):
        fetches = [f for f in summary["fetches"] if f["file"] == name]
        [seed] = [f for f in fetches if f["kind"] == "hub"]
        copies = [f for f in fetches if f["kind"] == "lan"]
        assert len(copies) == len(test_hosts) - 1, fetches
        for copy in copies:  # relayed by the seed (or a node relaying it), begun mid-file
            assert copy["started_at"] < seed["finished_at"], (seed, copy)
        assert any(c["source"] == seed["host"] for c in copies), fetches
    assert_converged(cluster, test_hosts)


Report = dict[str, Any] | None


def cut_the_hub_mid_body(controller: Controller, hosts: Sequence[RunningHost], hub: TestHub,
                         model_dir: Path) -> list[Report]:
    """The Hub drops a file's body a third of the way in: the node resumes it with Range from
    the byte it had, within the same run."""
    name = weights(model_dir)[0]
    had = until(lambda: max(partial_size(h, name) for h in hosts) >= FILE_BYTES // 3,
                f"a third of {name} on a node", controller)
    assert hub.cut(name) == 1  # mid-body: the Hub was still sending it
    code, report = controller.finish()
    assert code == 0, "\n".join(controller.stderr[-20:])
    ranges = [e.range for e in hub.log if e.file == name and e.path.startswith("/cdn/")]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed = re.fullmatch(r"bytes=(\d+)-", ranges[1] or "")
    assert resumed is not None and had <= int(resumed[1]) < FILE_BYTES, (had, ranges)
    assert transfers(report)["retries"] >= 1
    return [report]


def kill_a_peer_server_mid_relay(controller: Controller, hosts: Sequence[RunningHost],
                                 hub: TestHub, model_dir: Path) -> list[Report]:
    """The node relaying a file it is still receiving loses its server (its ``serve``
    process is killed) while another node is a quarter into the copy: that node keeps its
    quarter and takes the rest from another source, in the same run."""
    seed, receiver, name = until(lambda: relaying(controller, hosts, 0.25),
                                 "a copy a quarter relayed from a file still arriving",
                                 controller)
    [record] = (seed.home / ".orch" / "sync").glob("serve-*.json")
    os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
    code, report = controller.finish()
    assert code == 0, "\n".join(controller.stderr[-20:])
    summary = transfers(report)
    assert seed.name in summary["serve_errors"]
    copies = [f for f in summary["fetches"] if (f["host"], f["file"]) == (receiver.name, name)]
    assert (copies[0]["source"], copies[0]["ok"]) == (seed.name, False), copies
    assert copies[-1]["ok"] and copies[-1]["bytes_resumed"] >= 0.25 * FILE_BYTES, copies
    return [report]


def kill_the_controller(controller: Controller, hosts: Sequence[RunningHost], hub: TestHub,
                        model_dir: Path) -> list[Report]:
    """``orch apply`` is SIGKILLed while files arrive from the Hub and are relayed: it
    reports nothing, and leaves partials on the nodes and its lock."""
    until(lambda: relaying(controller, hosts, 0.25),
          "a copy a quarter relayed from a file still arriving", controller)
    seeds = {(e["host"], e["file"]) for e in controller.started() if e["source"] == "hub"}
    controller.kill()
    # Slowed, so that a fetch left running would hold its partial (and its lock) long after
    # the next apply starts; once none runs, every file it was fetching is still partial.
    hub.set_faults(Faults(bytes_per_second=HUB_BYTES_PER_S / 50))
    try:
        until(lambda: not any(agent_ops(h) for h in hosts),
              "every fetch and server of the dead run ended (their channels are gone)")
        by_name = {h.name: h for h in hosts}
        for host, name in seeds:
            assert not (model_root(by_name[host]) / name).exists(), (host, name)
        until(lambda: hub.sending() == 0, "the Hub sending nothing more to the dead run")
    finally:
        hub.set_faults(Faults(bytes_per_second=HUB_BYTES_PER_S))
    kept = sum(partial_size(h, n) for h in hosts for n in weights(model_dir))
    assert kept > 0
    return [None]


def agent_ops(host: RunningHost) -> list[str]:
    """The one-shot agent ops (``fetch``, ``serve``) running on ``host`` now."""
    found = []
    for pid in processes.host_pids(host.root):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            ran = argv[-2] if len(argv) >= 2 else b""  # the cached zip, or its compiled dir
            if ran.rstrip(b"/").endswith((b".pyz", agent_file_id().encode())) and argv[-1] in (
                    b"fetch", b"serve"):
                found.append(argv[-1].decode())
    return found


def unlock(cluster: Path, refused: Controller, known: Path) -> None:
    """A run that died holds the cluster lock: the next apply exits 4 naming its nonce, and
    ``orch unlock --force NONCE`` (the command the message gives) frees it."""
    said = "\n".join(refused.stderr)
    nonce = re.search(r"unlock --force (\w+)", said)
    assert nonce is not None, said
    ran = orch("unlock", cluster, "--force", nonce[1], known_hosts=known)
    assert ran.returncode == 0, ran.output


STAGES = {"hub mid-body": cut_the_hub_mid_body, "peer mid-relay": kill_a_peer_server_mid_relay,
          "controller killed": kill_the_controller}


@pytest.mark.parametrize("stage", list(STAGES))
def test_an_interrupted_sync_ends_on_rerun_verified_with_under_a_file_fetched_twice(
    stage: str, test_hosts: list[RunningHost], hub: TestHub, model_dir: Path, cluster: Path
) -> None:
    """Interrupted at one stage, then ``orch apply`` again (after ``orch unlock`` when the
    interrupted run died holding the lock): every node's files match the manifest, under
    one file's size was fetched twice, and ``orch plan`` finds nothing to do."""
    known = test_hosts[0].known_hosts_file
    reports = STAGES[stage](Controller(cluster, known), test_hosts, hub, model_dir)
    again = Controller(cluster, known)
    code, rerun = again.finish()
    if stage == "controller killed":
        assert code == 4, "\n".join(again.stderr[-20:])
        unlock(cluster, again, known)
        again = Controller(cluster, known)
        code, rerun = again.finish()
    assert code == 0, "\n".join(again.stderr[-20:])
    if stage == "controller killed":  # the dead run's partials were continued
        assert transfers(rerun)["bytes"]["resumed"] > 0
    else:  # the interrupted run recovered by itself
        assert transfers(rerun)["files"] == 0
    assert_verified(test_hosts, hub, model_dir)
    assert_little_fetched_twice([*reports, rerun], hub, model_dir)
    assert_converged(cluster, test_hosts)
