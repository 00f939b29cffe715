"""The agent session and ``batch``, through LocalConnection (real agent processes, no SSH).

Pins: every call of a run shares one agent process; payload bytes cross the framing intact;
concurrent callers each get their own answer; a stuck op is cut, the session torn down and
the next call reopens it; a batch stops at its first failure and says what did not run; a
read-only connection streams the agent and writes nothing; and the raw frame protocol.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import AGENT_FILE, agent_source_hash
from orchestrator.errors import ActionFailed
from orchestrator.executor import agentcall
from orchestrator.executor import session as session_mod
from orchestrator.executor.base import AgentStep, StepState
from orchestrator.executor.fake import LocalConnection


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home dir"
    h.mkdir()
    return h


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_step(path: str, data: bytes, digest: str | None = None) -> AgentStep:
    return AgentStep("write", {"path": path, "mode": 0o600, "sha256": digest or sha(data)}, data)


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------------------ one session


def test_every_call_shares_one_agent_process(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home)
        try:
            await conn.agent("facts", {})  # uploads the agent: 3 round trips
            base, pid = conn.round_trips, conn.session.pid
            assert pid is not None
            answers = [
                await conn.agent("run", {"argv": ["sh", "-c", "echo $PPID"]}) for _ in range(3)
            ]
            # The command's parent is the agent: the same process answered every call.
            assert {a["stdout"].strip() for a in answers} == {str(pid)}
            assert conn.round_trips == base == 3
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_payload_bytes_cross_the_framing_intact(home: Path) -> None:
    """Frame-like bytes, newlines, every byte value, 3 MiB: stored exactly, and the next frame
    is still read where it starts."""
    payload = struct.pack(">II", 5, 5) + b"\n{}\n" + bytes(range(256)) * 12288
    empty = b""

    async def scenario() -> None:
        conn = LocalConnection(home)
        try:
            for name, data in (("big", payload), ("empty", empty)):
                answer = await conn.agent(
                    "write", {"path": f"~/{name}", "mode": 0o600, "sha256": sha(data)}, stdin=data
                )
                assert answer == {"sha256": sha(data), "changed": True}
            facts = await conn.agent("facts", {"files": ["~/big", "~/empty"]})
            assert facts["files"]["~/big"]["sha256"] == sha(payload)
            assert facts["files"]["~/empty"]["size"] == 0
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert (home / "big").read_bytes() == payload


def test_a_failed_op_keeps_the_session(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home, name="n7")
        try:
            await conn.agent("facts", {})
            trips = conn.round_trips
            with pytest.raises(ActionFailed, match="agent mkdir failed: missing request keys"):
                await conn.agent("mkdir", {"path": "~/x"})
            data = b"after"
            with pytest.raises(ActionFailed, match="sha256 mismatch"):  # payload unread by op
                await conn.agent("write", {"path": "~/w", "mode": 0o600, "sha256": "0" * 64},
                                 stdin=data)  # fmt: skip
            assert await conn.agent("mkdir", {"path": "~/x", "mode": 0o700}) == {"changed": True}
            assert conn.round_trips == trips
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_concurrent_callers_each_get_their_own_answer(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home)
        try:

            async def echo(i: int) -> str:
                await asyncio.sleep(0.001 * (i % 3))
                answer = await conn.agent("run", {"argv": ["echo", f"caller-{i}"]})
                return str(answer["stdout"]).strip()

            got = await asyncio.gather(*(echo(i) for i in range(24)))
            assert got == [f"caller-{i}" for i in range(24)]
            assert conn.round_trips == 3  # tried, uploaded, one session for all 24
        finally:
            await conn.close()

    asyncio.run(scenario())


async def _gone(pid: int, within: float = 10.0) -> bool:
    """Whether `pid` disappears within `within` seconds: a killed process lingers until it is
    reaped, which on a loaded machine can take longer than any fixed sleep."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.05)
    return False


def test_stuck_op_times_out_and_the_next_call_reopens(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_mod, "agent_timeout", lambda request, default: 1.0)

    async def scenario() -> None:
        conn = LocalConnection(home)
        try:
            await conn.agent("facts", {})
            trips, stuck_pid = conn.round_trips, conn.session.pid
            assert stuck_pid is not None
            with pytest.raises(ActionFailed, match="agent run timed out after 1s"):
                await conn.agent("run", {"argv": ["sleep", "30"]})
            facts = await conn.agent("facts", {})
            assert facts["uid"] == os.getuid()
            assert conn.round_trips == trips + 1
            assert conn.session.pid not in (None, stuck_pid)
            assert await _gone(stuck_pid)  # the stuck agent was killed (and reaped)
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_close_ends_the_agent_and_is_safe_twice(home: Path) -> None:
    async def scenario() -> int:
        conn = LocalConnection(home)
        await conn.agent("facts", {})
        pid = conn.session.pid
        assert pid is not None
        await conn.close()
        await conn.close()
        return pid

    pid = asyncio.run(scenario())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def agent_children(home: Path) -> list[int]:
    """This process's live children that run an agent session for `home` (its HOME: other
    tests' processes may run sessions of their own beside this one)."""
    found = []
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):
                continue
            if b"session" in argv and f"HOME={home}".encode() in env:
                found.append(int(pid))
    return found


def test_start_opens_the_channel_the_first_call_uses(home: Path) -> None:
    """`start` spawns the agent without waiting for it; the first call reads its hello and
    uses that process: still one channel per run, on a cached agent and on a missing one."""

    async def scenario() -> tuple[int, int, int]:
        conn = LocalConnection(home)
        try:
            await conn.session.start()
            await conn.session.start()  # already started: nothing more
            started = conn.round_trips
            assert conn.session.pid is None  # its hello is the first call's to read
            answer = await conn.agent("run", {"argv": ["sh", "-c", "echo $PPID"]})
            assert answer["stdout"].strip() == str(conn.session.pid)
            await conn.agent("facts", {})
            return started, conn.round_trips, len(agent_children(home))
        finally:
            await conn.close()

    # no agent cached yet: the started shell finds none, the call uploads it and reopens
    assert asyncio.run(scenario()) == (1, 3, 1)  # started, uploaded, the session
    assert asyncio.run(scenario()) == (1, 1, 1)  # cached: the started channel is the session
    assert agent_children(home) == []


def test_a_started_agent_never_called_ends_at_close(home: Path) -> None:
    async def scenario() -> int:
        conn = LocalConnection(home)
        await conn.agent("facts", {})  # caches the agent
        await conn.close()
        conn = LocalConnection(home)
        await conn.session.start()
        # started, not waited for: its exec (argv, environment) may come a moment later
        assert await agents_settle(home, 1) == 1
        await conn.close()
        await conn.close()
        return conn.round_trips

    assert asyncio.run(scenario()) == 1
    assert asyncio.run(agents_settle(home, 0)) == 0


async def agents_settle(home: Path, expected: int) -> int:
    """How many agents run for `home` once that is `expected`, or after 10 s: a process
    appears in /proc as itself only once it has exec'd, and leaves it once reaped."""
    await eventually(lambda: len(agent_children(home)) == expected)
    return len(agent_children(home))


async def eventually(check: Callable[[], bool], within: float = 10.0) -> None:
    """Return once `check()` holds, or after `within` seconds (the caller asserts)."""
    deadline = asyncio.get_running_loop().time() + within
    while not check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)


def test_an_agent_that_never_says_hello_is_killed_when_the_call_gives_up(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A started (or spawned) agent whose hello never comes is killed at the call's timeout,
    not left running until the connection closes."""
    monkeypatch.setattr(agentcall, "AGENT_GRACE", 0.0)  # the call gives up after 0.5 s

    async def cache_agent() -> None:
        conn = LocalConnection(home)
        try:
            await conn.agent("facts", {})
        finally:
            await conn.close()

    asyncio.run(cache_agent())
    pid_file = tmp_path / "mute.pid"
    mute = tmp_path / "mute-python"
    mute.write_text(f"#!/bin/sh\necho $$ > '{pid_file}'\nexec sleep 60\n")
    mute.chmod(0o755)

    async def scenario() -> None:
        conn = LocalConnection(home, agent_python=str(mute), command_timeout=0.5)
        try:
            await conn.session.start()
            with pytest.raises(ActionFailed, match="timed out"):
                await conn.agent("facts", {})
            pid = int(pid_file.read_text())
            await eventually(lambda: not _alive(pid))
            assert not _alive(pid), "the mute agent outlived the call that gave up on it"
        finally:
            await conn.close()

    asyncio.run(scenario())


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# ------------------------------------------------------------------------------------ batch


def test_batch_stops_at_the_first_failure(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home)
        try:
            steps = [
                AgentStep("mkdir", {"path": "~/d", "mode": 0o755}),
                write_step("~/d/a", b"first"),
                write_step("~/d/b", b"second", digest="0" * 64),  # fails: wrong sha256
                write_step("~/d/c", b"third"),
                AgentStep("mkdir", {"path": "~/e", "mode": 0o755}),
            ]
            outcomes = await conn.agent_batch(steps)
            assert [o.state for o in outcomes] == [
                StepState.OK,
                StepState.OK,
                StepState.FAILED,
                StepState.NOT_RUN,
                StepState.NOT_RUN,
            ]
            assert [o.step for o in outcomes] == steps
            assert outcomes[0].response == {"changed": True}
            assert outcomes[1].response == {"sha256": sha(b"first"), "changed": True}
            assert outcomes[2].response is None
            assert "sha256 mismatch writing ~/d/b" in str(outcomes[2].error)
            assert outcomes[3].response is None and outcomes[3].error is None
            # The session is still in step after the payloads that were never read.
            read = await conn.agent("read", {"paths": ["~/d/a"]})
            assert read["contents"] == {"~/d/a": "first"}
            assert conn.round_trips == 3
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert sorted(p.name for p in (home / "d").iterdir()) == ["a"]
    assert not (home / "e").exists()


def test_batch_all_ok_one_request(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home)
        try:
            await conn.agent("facts", {})
            trips = conn.round_trips
            files = {f"~/f{i}": os.urandom(1000 + i) for i in range(20)}
            outcomes = await conn.agent_batch([write_step(p, d) for p, d in files.items()])
            assert all(o.state is StepState.OK for o in outcomes)
            assert [o.response for o in outcomes] == [
                {"sha256": sha(d), "changed": True} for d in files.values()
            ]
            assert conn.round_trips == trips
            assert await conn.agent_batch([]) == []
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert (home / "f7").read_bytes() != b""


def test_a_checked_command_failing_stops_the_batch_an_unchecked_one_does_not(
        home: Path) -> None:
    """`check` makes a non-zero exit the step's failure, as apply's command steps need; without
    it the exit status is an answer, as status and verify read it."""
    async def scenario() -> None:
        conn = LocalConnection(home)
        try:
            steps = [
                AgentStep("run", {"argv": ["sh", "-c", "exit 3"]}),
                AgentStep("run", {"argv": ["sh", "-c", "echo oops >&2; exit 4"], "check": True}),
                AgentStep("mkdir", {"path": "~/after", "mode": 0o755}),
            ]
            outcomes = await conn.agent_batch(steps)
            assert [o.state for o in outcomes] == [
                StepState.OK, StepState.FAILED, StepState.NOT_RUN]
            assert outcomes[0].response is not None
            assert outcomes[0].response["exit_status"] == 3
            assert outcomes[1].error == "`sh -c echo oops >&2; exit 4` exited 4: oops"
            skipped = await conn.agent(
                "run", {"argv": ["false"], "creates": "~", "check": True})
            assert skipped["skipped"] is True  # a guarded-out command never fails
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert not (home / "after").exists()


def test_malformed_batch_runs_nothing(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home)
        try:
            steps = [AgentStep("mkdir", {"path": "~/d", "mode": 0o755}), AgentStep("nope", {})]
            with pytest.raises(ActionFailed, match="step 1: op 'nope' cannot run in a batch"):
                await conn.agent_batch(steps)
            for op in ("serve", "fetch", "batch"):
                with pytest.raises(ValueError, match="cannot run in a batch"):
                    await conn.agent_batch([AgentStep(op, {})])
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert not (home / "d").exists()


# ------------------------------------------------------------------------------- read-only


def test_read_only_connection_streams_the_agent_and_writes_nothing(home: Path) -> None:
    (home / "data").write_bytes(b"x" * 5000)
    os.utime(home / "data", (1e9, 1e9))  # old enough that a normal facts call would cache it
    before = snapshot(home)

    async def scenario() -> None:
        conn = LocalConnection(home, install_agent=False)
        try:
            facts = await conn.agent("facts", {"files": ["~/data"], "read_only": True})
            assert facts["agent"]["version"] == agent_source_hash()
            assert facts["files"]["~/data"]["sha256"] == sha(b"x" * 5000)
            assert (await conn.agent("sizes", {"paths": ["~/data"]}))["sizes"] == {"~/data": 5000}
            assert conn.round_trips == 2  # found no cached agent, streamed one session
            with pytest.raises(ActionFailed, match="needs the installed agent"):
                await conn.agent("fetch", {"path": "~/f", "size": 1, "sha256": "0" * 64,
                                           "url": "http://127.0.0.1:9/f"})  # fmt: skip
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert snapshot(home) == before


# ------------------------------------------------------------------------ the raw protocol


def frame(op: str, request: Any, payload: bytes = b"") -> bytes:
    header = json.dumps({"op": op, "request": request}).encode()
    return struct.pack(">II", len(header), len(payload)) + header + payload


def responses(stdout: bytes) -> list[dict[str, Any]]:
    out = []
    while stdout:
        (size,) = struct.unpack(">I", stdout[:4])
        out.append(json.loads(stdout[4 : 4 + size]))
        stdout = stdout[4 + size :]
    return out


def test_raw_session_frames(home: Path) -> None:
    """Hello first; answers in order; serve refused; unknown ops and bad frames are errors;
    a stray write to fd 1 by a child cannot reach the stream; clean EOF exits 0."""
    data = b"payload\n"
    stream = (
        frame("mkdir", {"path": "~/d", "mode": 0o700})
        + frame("serve", {})
        + frame("nope", {})
        + frame("write", {"path": "~/w", "mode": 0o600, "sha256": sha(data)}, data)
        + frame("run", {"argv": ["sh", "-c", "echo stray >/proc/$PPID/fd/1; echo ok"]})
    )
    proc = subprocess.run(
        [sys.executable, str(AGENT_FILE), "session"],
        input=stream,
        capture_output=True,
        env={**os.environ, "HOME": str(home)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    hello, *answers = responses(proc.stdout)
    assert hello["hello"] == "orch-agent" and hello["pid"] > 0
    assert answers[0] == {"changed": True}
    assert answers[1] == {"error": "serve runs on a channel of its own, not in a session"}
    assert answers[2]["error"].startswith("unknown op 'nope'")
    assert answers[3] == {"sha256": sha(data), "changed": True}
    assert answers[4]["stdout"] == "ok\n"
    assert len(answers) == 5
    assert b"stray" in proc.stderr  # fd 1 of the agent is its stderr during a session


def test_a_batch_stops_between_steps_once_the_controller_is_gone(home: Path) -> None:
    """A killed run: the controller's end closes while a step runs. The agent finishes that
    step (as a single call would) but starts no other, so the node is left as a run killed
    between two calls leaves it, not converged behind the user's back."""
    batch = {"steps": [
        {"op": "run", "request": {"argv": ["sh", "-c", "touch started; "
                                           "until [ -e closed ]; do sleep 0.05; done"],
                                  "check": True}},
        {"op": "write", "request": {"path": "~/late", "mode": 0o600, "sha256": sha(b"x")},
         "stdin": 1},
    ]}
    proc = subprocess.Popen([sys.executable, str(AGENT_FILE), "session"], cwd=home,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "HOME": str(home)})
    assert proc.stdin is not None
    proc.stdin.write(frame("batch", batch, b"x"))
    proc.stdin.close()  # gone while the first step runs: it ends only once this is done
    (home / "closed").touch()
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err
    assert (home / "started").exists()
    assert not (home / "late").exists()
    _hello, answer = responses(out)
    assert answer["failed"] == 1, answer
    assert "controller went away" in answer["steps"][1]["error"]


def test_raw_session_truncated_frame_exits_1(home: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(AGENT_FILE), "session"],
        input=frame("facts", {})[:-3],
        capture_output=True,
        env={**os.environ, "HOME": str(home)},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert b"ended inside a request header" in proc.stderr
    assert len(responses(proc.stdout)) == 1  # the hello only


def test_a_connection_used_from_a_second_event_loop_reopens(home: Path) -> None:
    """Tests drive one LocalConnection from several asyncio.run calls: the first loop's agent
    is killed and the second loop gets its own session, instead of hanging on the old one."""
    conn = LocalConnection(home)

    async def facts() -> int | None:
        await conn.agent("facts", {})
        return conn.session.pid

    first = asyncio.run(facts())
    second = asyncio.run(facts())
    assert first is not None and second is not None and first != second
    assert conn.round_trips == 4  # tried, uploaded, session; then a new session
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)
    asyncio.run(conn.close())


@pytest.mark.parametrize("install", [True, False])
def test_session_runs_on_python39(home: Path, install: bool) -> None:
    """Nodes run whatever Python they have (>= 3.9): the session, the zip's package import
    and the streamed in-memory import all work there."""
    found = sorted(Path("~/.pyenv/versions").expanduser().glob("3.9.*/bin/python"))
    assert found, "the test machine provides Python 3.9 under ~/.pyenv/versions"
    data = b"old python\n"

    async def scenario() -> None:
        conn = LocalConnection(home, agent_python=str(found[0]), install_agent=install)
        try:
            facts = await conn.agent("facts", {"read_only": not install})
            assert facts["python"]["version"].startswith("3.9.")
            assert facts["agent"]["version"] == agent_source_hash()
            written = await conn.agent(
                "write", {"path": "~/w", "mode": 0o600, "sha256": sha(data)}, stdin=data
            )
            assert written["changed"] is True
            assert conn.round_trips == (3 if install else 2)
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert (home / "w").read_bytes() == data
    assert (home / ".orch" / "agent").exists() is install
