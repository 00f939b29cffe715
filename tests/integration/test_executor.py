"""The SSH executor against real sshd hosts (the simulated Macs of tests/integration/conftest.py).

Pins the executor's promises: round trips are counted and a converged agent call costs one;
unknown host keys are refused with a message that says how to accept them, and accept-new
records them; an unreachable host is reported for that host only; and no value (argv, path,
file content, environment) is ever interpreted by the remote shell.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import subprocess
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.agent import agent_file_id
from orchestrator.errors import ActionFailed, ExitCode, HostError, HostKeyRejected, HostUnreachable
from orchestrator.executor import (
    Connection,
    SSHExecutor,
    SSHOptions,
    Target,
    for_each_host,
)
from orchestrator.executor.fake import LocalConnection
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, start_hosts, stop_hosts

T = TypeVar("T")


def target(host: RunningHost) -> Target:
    return Target(host.name, host.address, host.port, host.user, host.identity_file)


def options(host: RunningHost, **kw: Any) -> SSHOptions:
    return SSHOptions(known_hosts=host.known_hosts_file, **kw)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def connect(host: RunningHost, **kw: Any) -> Connection:
    return await SSHExecutor(options(host, **kw)).open(target(host))


# ------------------------------------------------------------------------------ round trips


def test_converged_agent_call_is_one_round_trip(test_hosts: list[RunningHost]) -> None:
    async def scenario() -> dict[str, int]:
        executor = SSHExecutor(options(test_hosts[0]))
        conns = await executor.connect_all(target(h) for h in test_hosts)
        live = {n: c for n, c in conns.items() if not isinstance(c, HostError)}
        assert len(live) == 3, conns
        await for_each_host(live, lambda c: c.agent("facts", {}), limit=3)  # ship if needed
        for live_conn in live.values():
            await live_conn.close()
        # A new run against converged hosts: connect, facts, nothing else.
        conns = await executor.connect_all(target(h) for h in test_hosts)
        answers = await for_each_host(conns, lambda c: c.agent("facts", {"files": ["~/x"]}), 3)
        trips = {n: c.round_trips for n, c in conns.items() if not isinstance(c, HostError)}
        for conn in conns.values():
            if not isinstance(conn, HostError):
                await conn.close()
        assert all(isinstance(a, dict) for a in answers.values()), answers
        return trips

    assert run(scenario()) == {"mac1": 1, "mac2": 1, "mac3": 1}


def test_agent_is_shipped_once_over_ssh(test_hosts: list[RunningHost]) -> None:
    host = test_hosts[1]
    cached = host.home / ".orch" / "agent" / f"{agent_file_id()}.pyz"
    cached.unlink(missing_ok=True)

    async def scenario() -> None:
        conn = await connect(host)
        try:
            data = bytes(range(256)) * 8192  # 2 MiB on stdin, before the agent is there
            sha = hashlib.sha256(data).hexdigest()
            request = {"path": "~/shipped/blob", "mode": 0o600, "sha256": sha}
            assert await conn.agent("write", request, stdin=data) == {
                "sha256": sha,
                "changed": True,
            }
            assert conn.round_trips == 3  # tried, uploaded, ran the session
            await conn.agent("facts", {})
            assert conn.round_trips == 3  # the same session
        finally:
            await conn.close()

    run(scenario())
    assert (host.home / "shipped" / "blob").stat().st_size == 2 * 1024 * 1024
    assert cached.stat().st_mode & 0o777 == 0o600


def test_commands_share_one_connection_and_keep_order(test_hosts: list[RunningHost]) -> None:
    async def scenario() -> list[str]:
        conn = await connect(test_hosts[0])
        try:
            out = []
            for i in range(5):
                result = await conn.run(["sh", "-c", 'echo "$PPID $1"', "sh", str(i)])
                out.append(result.stdout.decode())
            assert conn.round_trips == 5
            return out
        finally:
            await conn.close()

    lines = run(scenario())
    assert [line.split()[1] for line in lines] == ["0", "1", "2", "3", "4"]


def test_exit_status_stdout_stderr_and_timeout(test_hosts: list[RunningHost]) -> None:
    async def scenario() -> None:
        conn = await connect(test_hosts[0])
        try:
            result = await conn.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
            assert (result.exit_status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
            assert (await conn.run(["cat"], stdin=b"\x00\xffbytes")).stdout == b"\x00\xffbytes"
            started = time.monotonic()
            with pytest.raises(ActionFailed, match=r"timed out after 0\.5s"):
                await conn.run(["sleep", "30"], timeout=0.5)
            assert time.monotonic() - started < 5
            assert (await conn.run(["true"])).exit_status == 0  # the connection survived
            assert (await conn.run(["no-such-command-xyz"])).exit_status == 127
        finally:
            await conn.close()

    run(scenario())


# -------------------------------------------------------------------------------- host keys


def test_unknown_host_key_is_refused_with_how_to(
    test_hosts: list[RunningHost], tmp_path: Path
) -> None:
    host = test_hosts[0]
    known = tmp_path / "known_hosts"
    known.write_text("")
    executor = SSHExecutor(SSHOptions(known_hosts=known, connect_retries=0))
    with pytest.raises(HostKeyRejected) as info:
        run(executor.open(target(host)))
    message = str(info.value)
    assert info.value.host == host.name
    assert info.value.exit_code == ExitCode.UNREACHABLE
    assert f"host key for [{host.address}]:{host.port} not in known_hosts" in message
    assert "--accept-new-host-keys" in message
    assert known.read_text() == ""  # refusing records nothing
    # The advice works as written: run the suggested command, then the host is accepted.
    command = re.search(r"`(ssh-keyscan [^`]+)`", message)
    assert command is not None, message
    assert command.group(1) == f"ssh-keyscan -p {host.port} {host.address} >> {known}"
    subprocess.run(["sh", "-c", command.group(1)], check=True, capture_output=True, timeout=30)

    async def works() -> None:
        conn = await executor.open(target(host))
        await conn.close()

    run(works())


def test_accept_new_records_the_key(test_hosts: list[RunningHost], tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "known_hosts"  # neither the file nor its directory exist yet
    accepting = SSHExecutor(SSHOptions(known_hosts=known, accept_new_host_keys=True))

    async def scenario() -> None:
        conns = await accepting.connect_all(target(h) for h in test_hosts)
        for conn in conns.values():
            assert not isinstance(conn, HostError), conn
            await conn.close()
        strict = SSHExecutor(SSHOptions(known_hosts=known))  # now known: strict mode connects
        conn = await strict.open(target(test_hosts[2]))
        await conn.close()

    run(scenario())
    assert sorted(known.read_text().splitlines()) == sorted(h.known_hosts_line for h in test_hosts)


def test_known_hosts_is_parsed_once_per_run_and_again_when_it_changes(
    test_hosts: list[RunningHost], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncssh given paths parses the file for every connection (N² key decodes per run);
    the executor parses it once, and again only after a key was recorded in it."""
    parsed: list[list[str]] = []
    read = asyncssh.read_known_hosts

    def counting(files: list[str]) -> asyncssh.SSHKnownHosts:
        parsed.append(files)
        return read(files)

    monkeypatch.setattr(asyncssh, "read_known_hosts", counting)
    known = tmp_path / "known_hosts"
    known.write_text("".join(h.known_hosts_line + "\n" for h in test_hosts[1:]))
    executor = SSHExecutor(SSHOptions(known_hosts=known, accept_new_host_keys=True))

    async def scenario() -> None:
        conns = await executor.connect_all(target(h) for h in test_hosts[1:])
        assert not [c for c in conns.values() if isinstance(c, HostError)], conns
        assert parsed == [[str(known)]]
        for conn in conns.values():
            await conn.close()
        first = await executor.open(target(test_hosts[0]))  # unknown: recorded (accept-new)
        await first.close()
        again = await executor.open(target(test_hosts[0]))  # now known, from the new file
        await again.close()

    run(scenario())
    assert len(parsed) == 2  # once for every connection before the record, once after it
    assert known.read_text().count("\n") == len(test_hosts)


def test_an_unreadable_known_hosts_is_that_host_unreachable(tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("@bogus-marker host ssh-ed25519 AAAA\n")
    executor = SSHExecutor(SSHOptions(known_hosts=known, connect_retries=0))
    with pytest.raises(HostUnreachable, match="cannot read known_hosts: Invalid known hosts"):
        run(executor.open(Target("a", "127.0.0.1", 1, "u", None)))


def test_changed_key_is_refused_even_with_accept_new(
    test_hosts: list[RunningHost], tmp_path: Path
) -> None:
    impostor, victim = test_hosts[0], test_hosts[1]
    known = tmp_path / "known_hosts"
    known.write_text(f"[{victim.address}]:{victim.port} {impostor.host_key}\n")
    executor = SSHExecutor(SSHOptions(known_hosts=known, accept_new_host_keys=True))
    with pytest.raises(HostKeyRejected) as info:
        run(executor.open(target(victim)))
    assert "does not match" in str(info.value)
    assert "ssh-keygen -R" in str(info.value)
    assert known.read_text().count("\n") == 1  # nothing appended


def test_ssh_config_is_honoured(test_hosts: list[RunningHost], tmp_path: Path) -> None:
    host = test_hosts[2]
    config = tmp_path / "config"
    config.write_text(
        f"Host lab-mac\n  HostName {host.address}\n  Port {host.port}\n  User {host.user}\n"
        f"  IdentityFile {host.identity_file}\n  UserKnownHostsFile {host.known_hosts_file}\n"
    )

    async def scenario() -> bytes:
        executor = SSHExecutor(SSHOptions(ssh_config=config))  # no known_hosts option: config's
        async with executor.connect(Target("m", "lab-mac")) as conn:
            return (await conn.run(["sysctl", "-n", "hw.memsize"])).stdout

    assert run(scenario()).strip() == str(128 * GIB).encode()


# ----------------------------------------------------------------------------- unreachable


@pytest.fixture
def spare_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHost]:
    """A host of its own, so stopping its sshd cannot disturb the session's hosts."""
    base = tmp_path_factory.mktemp("spare")
    hosts = start_hosts(base, [HostSpec("spare", 64 * GIB, "Apple M4 Pro", address="127.0.0.31")])
    try:
        yield hosts[0]
    finally:
        stop_hosts(hosts)


def test_stopped_sshd_is_unreachable_for_that_host_only(
    test_hosts: list[RunningHost], spare_host: RunningHost
) -> None:
    spare_host.stop()
    known = spare_host.known_hosts_file.read_text() + test_hosts[0].known_hosts_file.read_text()
    known_file = spare_host.root.parent / "all_known_hosts"
    known_file.write_text(known)
    executor = SSHExecutor(SSHOptions(known_hosts=known_file, connect_retries=1))

    async def scenario() -> dict[str, Any]:
        conns = await executor.connect_all([target(spare_host), *(target(h) for h in test_hosts)])
        facts = await for_each_host(conns, lambda c: c.agent("facts", {}), limit=10)
        for conn in conns.values():
            if not isinstance(conn, HostError):
                await conn.close()
        return facts

    started = time.monotonic()
    results = run(scenario())
    assert list(results) == ["spare", "mac1", "mac2", "mac3"]
    failure = results["spare"]
    assert isinstance(failure, HostUnreachable) and not isinstance(failure, HostKeyRejected)
    assert failure.exit_code == ExitCode.UNREACHABLE
    assert f"cannot connect to {spare_host.address}:{spare_host.port}" in str(failure)
    assert isinstance(failure.__cause__, OSError)  # translated at the edge, cause kept
    assert all(isinstance(results[h.name], dict) for h in test_hosts)
    assert time.monotonic() - started < 10  # one retry with a short backoff, not a hang


def test_connection_lost_mid_run_is_unreachable(spare_host: RunningHost) -> None:
    async def scenario() -> None:
        conn = await connect(spare_host)
        assert (await conn.run(["true"])).exit_status == 0
        await asyncio.to_thread(spare_host.stop)
        with pytest.raises(HostUnreachable, match="connection lost"):
            await conn.run(["true"])
        await conn.close()

    run(scenario())


def test_silent_server_times_out(tmp_path: Path) -> None:
    async def scenario() -> HostError:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        executor = SSHExecutor(
            SSHOptions(known_hosts=tmp_path / "kh", connect_timeout=0.5, connect_retries=0)
        )
        try:
            result = await executor.connect_all([Target("mute", "127.0.0.1", port)])
        finally:
            server.close()
        error = result["mute"]
        assert isinstance(error, HostError)
        return error

    started = time.monotonic()
    error = run(scenario())
    assert isinstance(error, HostUnreachable)
    assert "timed out" in str(error)
    assert time.monotonic() - started < 5


def test_wrong_key_is_an_authentication_failure_not_retried(
    test_hosts: list[RunningHost], tmp_path: Path
) -> None:
    host = test_hosts[0]
    key = tmp_path / "other_key"
    key.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    key.chmod(0o600)
    executor = SSHExecutor(options(host, connect_retries=3))
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match="authentication failed") as info:
        run(executor.open(Target(host.name, host.address, host.port, host.user, key)))
    assert not isinstance(info.value, HostKeyRejected)
    assert time.monotonic() - started < 2  # no retries with backoff


# ------------------------------------------------------------------- values stay literal

NASTY = [
    "a b",
    "'",
    '"',
    "$(touch {canary})",
    "`touch {canary}`",
    "; touch {canary}",
    "&& touch {canary} #",
    "| touch {canary}",
    "> {canary}",
    "$HOME",
    "${{HOME}}",
    "~",
    "*",
    "-n",
    "--",
    "\\",
    "line1\nline2",
    "tab\there",
    "héllo wörld ☃ 日本",
    "%s%n",
    "",
]

texts = st.one_of(
    st.sampled_from(NASTY),
    st.text(
        alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        max_size=30,
    ),
)
file_names = texts.filter(lambda s: s not in ("", ".", "..") and "/" not in s)


@pytest.fixture(scope="module")
def literal_conn(
    test_hosts: list[RunningHost],
) -> Iterator[tuple[asyncio.AbstractEventLoop, Connection, RunningHost]]:
    """One connection for every hypothesis example (a new one each time would be slow)."""
    host = test_hosts[0]
    loop = asyncio.new_event_loop()
    conn = loop.run_until_complete(connect(host))
    try:
        yield loop, conn, host
    finally:
        loop.run_until_complete(conn.close())
        loop.close()
        canary = host.root / "tmp" / "pwned"
        assert not canary.exists(), "a value was executed by the remote shell"


def fill(value: str, host: RunningHost) -> str:
    return (
        value.replace("{canary}", str(host.root / "tmp" / "pwned"))
        .replace("{{", "{")
        .replace("}}", "}")
    )


ECHO_ARGV = "import json, sys; sys.stdout.write(json.dumps(sys.argv[1:]))"


@settings(
    database=None,  # no .hypothesis/ directory in the checkout
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(args=st.lists(texts, min_size=1, max_size=5))
def test_argv_reaches_the_host_literally(
    literal_conn: tuple[asyncio.AbstractEventLoop, Connection, RunningHost], args: list[str]
) -> None:
    loop, conn, host = literal_conn
    args = [fill(a, host) for a in args]
    result = loop.run_until_complete(conn.run(["python3", "-c", ECHO_ARGV, *args]))
    assert result.exit_status == 0, result.stderr
    assert json.loads(result.stdout) == args


@settings(
    database=None,  # no .hypothesis/ directory in the checkout
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=file_names, content=st.one_of(st.binary(max_size=2000), texts.map(str.encode)))
def test_agent_write_path_and_content_reach_the_host_literally(
    literal_conn: tuple[asyncio.AbstractEventLoop, Connection, RunningHost],
    name: str,
    content: bytes,
) -> None:
    loop, conn, host = literal_conn
    name = fill(name, host)
    sha = hashlib.sha256(content).hexdigest()
    path = f"~/literal/{name}"
    request = {"path": path, "mode": 0o644, "sha256": sha}
    answer = loop.run_until_complete(conn.agent("write", request, stdin=content))
    assert answer["sha256"] == sha
    assert (host.home / "literal" / name).read_bytes() == content


@settings(
    database=None,  # no .hypothesis/ directory in the checkout
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(value=texts, argv_tail=st.lists(texts, max_size=3))
def test_agent_run_env_and_argv_are_literal(
    literal_conn: tuple[asyncio.AbstractEventLoop, Connection, RunningHost],
    value: str,
    argv_tail: list[str],
) -> None:
    loop, conn, host = literal_conn
    value, argv_tail = fill(value, host), [fill(a, host) for a in argv_tail]
    script = "import json, os, sys; sys.stdout.write(json.dumps([os.environ['V'], sys.argv[1:]]))"
    request = {"argv": ["python3", "-c", script, *argv_tail], "env": {"V": value}}
    answer = loop.run_until_complete(conn.agent("run", request))
    assert answer["exit_status"] == 0, answer
    assert json.loads(answer["stdout"]) == [value, argv_tail]


def test_shlex_join_is_what_the_host_parses() -> None:
    """The promise behind `run`: the remote shell splits shlex.join(argv) back into argv."""
    argv = ["echo", "$(id)", "a;b", "it's"]
    assert shlex.split(shlex.join(argv)) == argv


# ------------------------------------------------------------------------- for_each_host


def test_for_each_host_limits_concurrency_and_keeps_failures(tmp_path: Path) -> None:
    running, peak = 0, 0

    async def work(conn: Connection) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        if conn.name == "bad":
            raise ActionFailed("bad", "boom")
        return conn.name.upper()

    conns: dict[str, Connection | HostError] = {
        name: LocalConnection(tmp_path, name=name) for name in ("a", "b", "bad", "c", "d")
    }
    conns["gone"] = HostUnreachable("gone", "refused")
    results = run(for_each_host(conns, work, limit=2))
    assert peak == 2
    assert list(results) == ["a", "b", "bad", "c", "d", "gone"]
    assert results["a"] == "A" and results["d"] == "D"
    assert isinstance(results["bad"], ActionFailed)
    assert results["gone"] is conns["gone"]


def test_for_each_host_raises_bugs_after_the_others_finish(tmp_path: Path) -> None:
    finished: list[str] = []

    async def work(conn: Connection) -> None:
        if conn.name == "buggy":
            raise KeyError("programming error")
        await asyncio.sleep(0.05)
        finished.append(conn.name)

    conns: dict[str, Connection | HostError] = {
        n: LocalConnection(tmp_path, name=n) for n in ("buggy", "x", "y")
    }
    with pytest.raises(KeyError):
        run(for_each_host(conns, work, limit=5))
    assert sorted(finished) == ["x", "y"]


def test_for_each_host_rejects_a_zero_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        run(for_each_host({}, lambda c: asyncio.sleep(0), limit=0))
