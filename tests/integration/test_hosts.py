"""The simulated Macs behave like the Macs orch drives, through real SSH clients.

Commands go through the real OpenSSH ``ssh`` client or asyncssh, never a shortcut, so these
tests also pin what orch can rely on: where a session lands, what the macOS stand-ins
print, how the launchd supervisor treats jobs (KeepAlive, ThrottleInterval, asynchronous
bootout, kickstart -k), that root means sudo, and that stopping a host leaves nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import plistlib
import re
import shlex
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from orchestrator.model.cache import cache_dir
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, reboot, running_hosts


def ssh(host: RunningHost, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``command`` (a shell string, as sshd receives it) with the real ssh client."""
    return subprocess.run(
        host.ssh_argv(command), capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(host: RunningHost, command: str) -> str:
    done = ssh(host, command)
    assert done.returncode == 0, f"{command!r} -> {done.returncode}: {done.stderr}"
    return done.stdout


def connect(host: RunningHost) -> Any:
    return asyncssh.connect(
        host.address,
        port=host.port,
        username=host.user,
        client_keys=[str(host.identity_file)],
        known_hosts=str(host.known_hosts_file),
    )


def uid_of(host: RunningHost) -> str:
    return ok(host, "id -u").strip()


def write_plist(path: Path, label: str, arguments: list[str], **keys: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(plistlib.dumps({"Label": label, "ProgramArguments": arguments, **keys}))
    path.chmod(0o644)
    return path


def service(host: RunningHost, label: str) -> dict[str, str]:
    """``launchctl print user/<uid>/<label>`` as {field: value} (top-level ``a = b`` lines)."""
    done = ssh(host, f"launchctl print user/$(id -u)/{label}")
    if done.returncode == 113:
        return {}
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"^\t(\w[\w ]*?) = (.*)$", done.stdout, flags=re.M))


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {predicate}")


@pytest.fixture
def agent(test_hosts: list[RunningHost]) -> Iterator[tuple[RunningHost, str]]:
    """A fresh label on the first host, booted out again after the test."""
    host = test_hosts[0]
    label = f"com.orch.test.{os.getpid()}.{time.monotonic_ns()}"
    yield host, label
    ssh(host, f"launchctl bootout user/$(id -u)/{label}")


def sleeper(host: RunningHost, label: str, **keys: Any) -> Path:
    """A KeepAlive-able agent: a python process that just sleeps (a stand-in for a worker)."""
    return write_plist(
        host.launch_agents_dir / f"{label}.plist",
        label,
        [str(host.python3), "-c", "import time; time.sleep(600)"],
        **keys,
    )


# -- sessions, facts, files ----------------------------------------------------------------


def test_login_lands_in_home_with_standins_first(test_hosts: list[RunningHost]) -> None:
    host = test_hosts[1]
    lines = ok(
        host,
        "pwd; echo $HOME; for c in sysctl launchctl sudo python3; do command -v $c; done; "
        "python3 -c 'import sys; print(sys.prefix == sys.base_prefix)'",
    ).split()
    assert lines[0] == lines[1] == str(host.home)
    bin_dir = host.root.parent / "bin"
    assert lines[2:5] == [str(bin_dir / c) for c in ("sysctl", "launchctl", "sudo")]
    assert lines[5] == str(host.python3)
    assert lines[6] == "True"  # the host's python3 is a base interpreter, not a venv


def test_session_environment_is_the_hosts_own(test_hosts: list[RunningHost]) -> None:
    """The login wrapper passes on what a Mac's sshd gives a session and the host's own
    values; the Linux account's (MAIL, sshd_config's SHLVL, anything its rc files export)
    stays out."""
    host = test_hosts[0]
    env = dict(line.partition("=")[::2] for line in ok(host, "env").splitlines())
    env.pop("PWD", None)  # the shell's own
    assert set(env) == {"HOME", "PATH", "ORCH_HOST_ROOT", "SHELL", "TMPDIR", "USER", "LOGNAME",
                        "SSH_CLIENT", "SSH_CONNECTION"}
    assert (env["HOME"], env["ORCH_HOST_ROOT"], env["TMPDIR"], env["SHELL"]) == (
        str(host.home), str(host.root), f"{host.root}/tmp/", "/bin/sh")
    assert env["PATH"].startswith(f"{host.root.parent / 'bin'}:")


def test_facts_differ_per_host_as_specified(test_hosts: list[RunningHost]) -> None:
    async def facts(host: RunningHost) -> tuple[str, str, dict[str, Any]]:
        async with connect(host) as conn:
            memsize = await conn.run("sysctl -n hw.memsize", check=True)
            chip = await conn.run("sysctl -n machdep.cpu.brand_string", check=True)
            profile = await conn.run("system_profiler SPHardwareDataType -json", check=True)
            return memsize.stdout, chip.stdout, json.loads(profile.stdout)

    async def gather() -> list[tuple[str, str, dict[str, Any]]]:
        return await asyncio.gather(*(facts(h) for h in test_hosts))

    results = asyncio.run(gather())
    for host, (memsize, chip, profile) in zip(test_hosts, results, strict=True):
        assert int(memsize) == host.spec.memory_bytes
        assert chip.strip() == host.spec.chip
        hardware = profile["SPHardwareDataType"][0]
        assert hardware["chip_type"] == host.spec.chip
        assert hardware["physical_memory"] == f"{host.spec.memory_bytes // GIB} GB"
    assert [int(r[0]) for r in results] == [192 * GIB, 192 * GIB, 128 * GIB]
    assert ok(test_hosts[0], "sw_vers -productVersion").strip() == "14.5"
    assert ok(test_hosts[0], "sysctl hw.memsize") == f"hw.memsize: {192 * GIB}\n"


def test_sftp_relative_paths_resolve_in_home(test_hosts: list[RunningHost], tmp_path: Path) -> None:
    host = test_hosts[2]
    local = tmp_path / "payload.bin"
    local.write_bytes(os.urandom(4096))

    async def transfer() -> str:
        async with connect(host) as conn, conn.start_sftp_client() as sftp:
            await sftp.makedirs("models/tiny", exist_ok=True)
            await sftp.put(str(local), "models/tiny/payload.bin")
            return str(await sftp.realpath("."))

    assert asyncio.run(transfer()) == str(host.home)
    assert (host.home / "models/tiny/payload.bin").read_bytes() == local.read_bytes()
    ok(host, "rm -r models")


def test_tree_hash_sees_content_and_mode_changes(
    test_hosts: list[RunningHost], tree_hash: Any
) -> None:
    host = test_hosts[2]
    before = tree_hash(host, "home")
    ok(host, "mkdir -p t && echo a > t/f")
    changed = tree_hash(host, "home")
    assert changed != before
    ok(host, "chmod 600 t/f")
    assert tree_hash(host, "home") != changed
    ok(host, "rm -r t")
    assert tree_hash(host, "home") == before


# -- root, sysctl and reboot ----------------------------------------------------------------


def test_wired_limit_needs_sudo_and_survives_reboot_only_through_a_launchdaemon(
    tmp_path: Path,
) -> None:
    spec = HostSpec("rebooter", 64 * GIB, "Apple M4 Pro", address="127.0.0.25")
    with running_hosts(tmp_path, [spec]) as [host]:
        denied = ssh(host, "sysctl -w iogpu.wired_limit_mb=50000")
        assert denied.returncode == 1
        assert denied.stderr == "sysctl: iogpu.wired_limit_mb=50000: Operation not permitted\n"
        assert ssh(host, "sudo sysctl iogpu.wired_limit_mb=70000").returncode == 1  # >= RAM
        assert ok(host, "sudo -n sysctl -w iogpu.wired_limit_mb=50000") == (
            "iogpu.wired_limit_mb: 0 -> 50000\n"
        )
        assert ok(host, "sysctl -n iogpu.wired_limit_mb") == "50000\n"
        ok(host, 'touch "$TMPDIR/scratch"')

        reboot(host)
        assert ok(host, "sysctl -n iogpu.wired_limit_mb") == "0\n"  # volatile, like a Mac
        # TMPDIR is wiped too, except MLX's compiled CPU kernels: every boot links tmp/mlx to
        # the one kernel directory all simulated Macs share (see the simulator's docstring)
        assert ssh(host, 'test -e "$TMPDIR/scratch"').returncode == 1
        kernels = (cache_dir() / "simulator" / "mlx").resolve()
        assert ok(host, 'cd "$TMPDIR/mlx" && pwd -P') == f"{kernels}\n"

        daemon = write_plist(
            host.launch_daemons_dir / "com.orch.wired-limit.plist",
            "com.orch.wired-limit",
            ["/usr/sbin/sysctl", "iogpu.wired_limit_mb=50000"],  # the macOS path
            RunAtLoad=True,
        )
        no_root = ssh(host, f"launchctl bootstrap system {daemon}")
        assert no_root.returncode == 1 and "Bootstrap failed: 1:" in no_root.stderr
        ok(host, f"sudo launchctl bootstrap system {daemon}")
        wait_for(lambda: ok(host, "sysctl -n iogpu.wired_limit_mb") == "50000\n")

        reboot(host)
        wait_for(lambda: ok(host, "sysctl -n iogpu.wired_limit_mb") == "50000\n")
        printed = ok(host, "launchctl print system/com.orch.wired-limit")
        assert "\tlast exit code = 0\n" in printed and "\ttype = LaunchDaemon\n" in printed


def test_sudo_without_nopasswd_fails_like_sudo(tmp_path: Path) -> None:
    spec = HostSpec("locked", 32 * GIB, "Apple M4", address="127.0.0.26", sudo_nopasswd=False)
    with running_hosts(tmp_path, [spec]) as [host]:
        done = ssh(host, "sudo -n sysctl -w iogpu.wired_limit_mb=1000")
        assert (done.returncode, done.stderr) == (1, "sudo: a password is required\n")


# -- launchd ------------------------------------------------------------------------------


def test_bootstrap_runs_the_job_and_print_shows_it(agent: tuple[RunningHost, str]) -> None:
    host, label = agent
    plist = sleeper(host, label, EnvironmentVariables={"ORCH_ROLE": "rank 0"})
    ok(host, f"launchctl bootstrap user/$(id -u) {shlex.quote(str(plist))}")  # no RunAtLoad...
    assert service(host, label)["state"] == "not running"  # ...so it waits for a kickstart
    ok(host, f"launchctl kickstart user/$(id -u)/{label}")
    info = service(host, label)
    assert info["state"] == "running" and info["runs"] == "1"
    assert info["path"] == str(plist) and info["program"] == str(host.python3)
    assert info["last exit code"] == "(never exited)"
    ok(host, f"kill -0 {info['pid']}")  # a real, live process
    printed = ok(host, f"launchctl print user/$(id -u)/{label}")
    assert printed.startswith(f"user/{uid_of(host)}/{label} = {{\n")
    assert "\t\tORCH_ROLE => rank 0\n" in printed
    listing = ok(host, "launchctl print user/$(id -u)")
    assert re.search(rf"^\t\t\s*{info['pid']}\s+-\s+\t{re.escape(label)}$", listing, re.M)


def test_keepalive_restarts_after_a_kill_no_sooner_than_throttle(
    agent: tuple[RunningHost, str],
) -> None:
    host, label = agent
    log = host.home / "Library" / "Logs" / f"{label}.log"  # one start time per line
    code = "import time; print(time.time(), flush=True); time.sleep(600)"
    plist = write_plist(
        host.launch_agents_dir / f"{label}.plist", label, [str(host.python3), "-c", code],
        KeepAlive=True, ThrottleInterval=2, StandardOutPath=str(log),
    )  # fmt: skip
    target = f"user/$(id -u)/{label}"
    # One session, so the kill lands well within a second of the start.
    printed = ok(
        host,
        f"launchctl bootstrap user/$(id -u) {plist} && sleep 0.2 && "
        f"kill -9 $(launchctl print {target} | sed -n 's/^\tpid = //p') && sleep 0.1 && "
        f"launchctl print {target}",
    )
    assert "\tstate = spawn scheduled\n" in printed  # throttled, not yet respawned
    assert "\tlast terminating signal = Killed: 9\n" in printed
    info = wait_for(lambda: (i := service(host, label)).get("state") == "running" and i)
    assert info["runs"] == "2"
    ok(host, f"kill -0 {info['pid']}")
    starts = [
        float(t)
        for t in wait_for(lambda: len(log.read_text().split()) >= 2 and log.read_text().split())
    ]
    # ThrottleInterval is measured from the previous spawn; the processes stamp themselves
    # after interpreter start-up, which on a loaded CI machine varies by more than 0.1 s
    # (a 1 s throttle once measured 0.875 s). Unthrottled, the gap would be ~0.3 s (the
    # kill came 0.2 s after the start), so a 2 s throttle and a 1.5 s bound keep both apart.
    assert starts[1] - starts[0] >= 1.5
    log.unlink()


def test_bootout_is_asynchronous(agent: tuple[RunningHost, str]) -> None:
    host, label = agent
    # A job that takes 0.3 s to exit after SIGTERM, like a server finishing requests.
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.3), sys.exit(0)))\n"
        "time.sleep(600)\n"
    )
    plist = write_plist(
        host.launch_agents_dir / f"{label}.plist", label, [str(host.python3), "-c", code],
        RunAtLoad=True,
    )  # fmt: skip
    ok(host, f"launchctl bootstrap user/$(id -u) {plist}")
    pid = service(host, label)["pid"]
    again = ssh(
        host,
        f"launchctl bootout user/$(id -u)/{label} && launchctl bootstrap user/$(id -u) {plist}",
    )
    assert again.returncode == 5
    assert again.stderr.startswith("Bootstrap failed: 5: Input/output error\n")
    wait_for(lambda: service(host, label) == {})  # poll print until gone, as orch must
    assert ssh(host, f"kill -0 {pid}").returncode != 0
    ok(host, f"launchctl bootstrap user/$(id -u) {plist}")
    assert service(host, label)["state"] == "running"
    gone = ssh(host, "launchctl bootout user/$(id -u)/com.orch.never-loaded")
    assert gone.returncode == 3
    assert gone.stderr.startswith("Boot-out failed: 3: No such process\n")


def test_kickstart_k_restarts_with_a_new_pid(agent: tuple[RunningHost, str]) -> None:
    host, label = agent
    ok(host, f"launchctl bootstrap user/$(id -u) {sleeper(host, label, RunAtLoad=True)}")
    before = service(host, label)
    ok(host, f"launchctl kickstart -k user/$(id -u)/{label}")  # synchronous: new pid on return
    after = service(host, label)
    assert after["state"] == "running" and after["pid"] != before["pid"]
    assert after["runs"] == "2"
    assert ssh(host, f"kill -0 {before['pid']}").returncode != 0


def test_gui_domain_is_not_available_over_ssh(agent: tuple[RunningHost, str]) -> None:
    host, label = agent
    done = ssh(host, f"launchctl bootstrap gui/$(id -u) {sleeper(host, label)}")
    assert done.returncode == 125
    assert done.stderr.startswith("Bootstrap failed: 125: Domain does not support specified action")
    missing = ssh(host, f"launchctl print user/$(id -u)/{label}")
    assert missing.returncode == 113 and 'Could not find service "' in missing.stderr


def test_arguments_and_environment_reach_the_process_literally(
    agent: tuple[RunningHost, str],
) -> None:
    host, label = agent
    args = ["two words", 'double "quoted"', "single 'quoted'", "$HOME `id` \\ ;|&", ""]
    out = host.home / "Library" / "Logs" / f"{label}.log"
    code = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['ODD'], os.getcwd()]))"
    write_plist(
        host.launch_agents_dir / f"{label}.plist",
        label,
        [str(host.python3), "-c", code, *args],
        EnvironmentVariables={"ODD": "a b 'c' \"d\" $e"},
        WorkingDirectory=str(host.home),
        StandardOutPath=str(out),
        RunAtLoad=True,
    )
    ok(host, f"launchctl bootstrap user/$(id -u) Library/LaunchAgents/{label}.plist")
    wait_for(lambda: service(host, label).get("last exit code") == "0")
    assert json.loads(out.read_text()) == [args, "a b 'c' \"d\" $e", str(host.home)]
    out.unlink()


def test_launchd_refuses_what_a_mac_refuses(agent: tuple[RunningHost, str]) -> None:
    host, label = agent
    writable = sleeper(host, label)
    writable.chmod(0o664)
    done = ssh(host, f"launchctl bootstrap user/$(id -u) {writable}")
    assert done.returncode == 5  # group-writable plist
    relative = write_plist(writable, label, ["python3", "-c", "pass"], RunAtLoad=True)
    ok(host, f"launchctl bootstrap user/$(id -u) {relative}")  # loads, then cannot spawn
    assert wait_for(lambda: service(host, label)).get("last exit code") == "78: EX_CONFIG"


# -- stopping -----------------------------------------------------------------------------


def test_stop_leaves_no_process_and_no_listening_port(tmp_path: Path) -> None:
    spec = HostSpec("stopper", 16 * GIB, "Apple M4", address="127.0.0.27")
    with running_hosts(tmp_path, [spec]) as [host]:
        plist = sleeper(host, "com.orch.stop", KeepAlive=True)
        ok(host, f"launchctl bootstrap user/$(id -u) {plist}")
        ok(host, "nohup setsid sleep 600 >/dev/null 2>&1 &")  # escapes its session and group
        session = subprocess.Popen(host.ssh_argv("sleep 600"), stderr=subprocess.DEVNULL)
        wait_for(lambda: len(host.processes()) >= 6)  # launchd, job, sshd, conn, sh, 2 sleeps
        pids = host.processes()
    # running_hosts' exit called stop(), which verifies; check independently too.
    assert session.wait(timeout=10) != 0
    assert not [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) not in "ZX"]
    with pytest.raises(OSError):
        import socket

        socket.create_connection((host.address, host.port), timeout=1).close()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "X"
