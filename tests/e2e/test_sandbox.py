"""Issue 7, as a person meets it: the README's first command, in a fresh clone, as a non-root user.

One test, three claims, each checked on the real thing (``git clone``, ``pip install``, the
simulated Macs, the hub, ``orch apply``, the MLX ring), nothing mocked:

* From a fresh clone, the README's first command ends with a reply from the 3-node ring.
* Running ``orch sandbox up`` a second time changes nothing (the apply reports no changes).
* After ``orch sandbox down`` no process the sandbox started is alive and no port it opened
  is listening.

Run as root (as CI is), the test creates a throwaway user (``useradd -m``), clones into its home
and runs everything through ``runuser``: then "every process it started" is every process of that
user, and "every port it opened" every listening socket that user owns (``/proc/net/tcp``). Run as
a normal user, it uses that user with a temporary HOME, and counts only what is new and belongs to
the sandbox. The command is read from the README, so the README cannot drift from what is tested.

pip downloads from the package registry into the user's own cache (``~/.cache/pip``), which the
sandbox's wheelhouse download then reuses; the throwaway home, cache included, goes at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from orchestrator.simulator.processes import port_open

REPO = Path(__file__).parents[2]
USER = "orchsbx"
MARKER = ".orch-e2e-sandbox"  # in the throwaway user's home: a leftover with it may be removed
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How this machine reaches the package registry (mirrors, CA bundles, proxies): the test user
# must install the way the person running the test would.
PASSED_ENV = ("LANG", "LC_ALL", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY",
              "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
              "CURL_CA_BUNDLE")
FIRST_TIMEOUT = 540.0  # venv + pip install + hosts + hub + wheelhouse + 3 node venvs + ring
AGAIN_TIMEOUT = 240.0  # the same, with everything already in place
STEP_TIMEOUT = 120.0

pytestmark = pytest.mark.timeout(900)


def readme_first_command() -> str:
    """The first line of README.md's first code block: the command this test runs."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"^```[^\n]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block, "README.md has no code block"
    first = block.group(1).splitlines()[0]
    command = re.sub(r"\s+#.*$", "", first).strip()  # a trailing "# comment"
    assert command.endswith("orch sandbox up"), (
        f"README.md's first command is {command!r}: issue 7 wants it to end with "
        "`orch sandbox up` (a reply from the 3-node ring)")
    return command


@dataclass(frozen=True)
class Account:
    """Who runs the commands: a throwaway user (``created``) or the current one."""

    name: str
    uid: int
    home: Path
    created: bool

    @property
    def clone(self) -> Path:
        return self.home / "orch"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k in PASSED_ENV or k.startswith("PIP_")}
        env.update(HOME=str(self.home), USER=self.name, LOGNAME=self.name, PATH=STANDARD_PATH,
                   XDG_STATE_HOME=str(self.home / ".local" / "state"),
                   XDG_CACHE_HOME=str(self.home / ".cache"))
        env.setdefault("LANG", "C.UTF-8")
        return env

    def run(self, command: str, log: Path, timeout: float) -> tuple[int, str, float]:
        """``cd ~/orch && command`` in a login shell as this account, with a clean environment.

        Output goes to ``log`` (readable while it runs); returns (exit code, output, seconds).
        """
        argv = ["env", "-i", *(f"{k}={v}" for k, v in sorted(self.env().items())),
                "bash", "-lc", f"cd ~/orch && {command}"]
        if self.created:
            argv = ["runuser", "-u", self.name, "--", *argv]
        started = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                pytest.fail(f"`{command}` did not finish in {timeout:.0f} s:\n{tail(log)}")
        seconds = time.monotonic() - started
        output = log.read_text(errors="replace")
        print(f"[{seconds:6.1f} s] {command}  (exit {code})", flush=True)
        return code, output, seconds


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t, path=STANDARD_PATH) is None]
    if missing:
        pytest.fail(f"this test needs {', '.join(missing)} (util-linux / passwd / procps / git / "
                    "jq, as on Debian): it runs the README's command as a throwaway non-root user")


def remove_user(name: str) -> None:
    """Kill whatever the throwaway user still runs, then delete it and its home."""
    for _ in range(50):
        if subprocess.run(["pkill", "-KILL", "-u", name], check=False).returncode != 0:
            break  # nothing left to kill
        time.sleep(0.1)
    subprocess.run(["userdel", "-r", name], check=False, capture_output=True)


def leftover_home(name: str) -> Path | None:
    try:
        return Path(pwd.getpwnam(name).pw_dir)
    except KeyError:
        return None


@pytest.fixture
def account(tmp_path: Path) -> Iterator[Account]:
    need("git", "pgrep", "bash", "env", "jq")
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.getuid())
        home = tmp_path / "home"
        home.mkdir()
        yield Account(entry.pw_name, entry.pw_uid, home, created=False)
        return
    need("useradd", "userdel", "runuser", "pkill")
    leftover = leftover_home(USER)
    if leftover is not None:
        if not (leftover / MARKER).exists():
            pytest.fail(f"user {USER} exists and is not this test's: remove it or rename USER")
        remove_user(USER)  # left by an earlier run that was killed
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", USER], check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(USER)
        home = Path(entry.pw_dir)
        (home / MARKER).touch()
        yield Account(USER, entry.pw_uid, home, created=True)
    finally:
        remove_user(USER)
        assert leftover_home(USER) is None, f"userdel -r {USER} failed"


def clone_repo(account: Account) -> float:
    """A fresh clone of the checkout under test (its committed content), owned by the user."""
    started = time.monotonic()
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(account.clone)],
                   check=True, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if account.created:
        subprocess.run(["chown", "-R", f"{account.name}:", str(account.home)], check=True)
    return time.monotonic() - started


def user_pids(uid: int) -> set[int]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            status = (entry / "status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields["Uid"].split()[0]) == uid and fields["State"].strip()[0] not in "ZX":
                pids.add(int(entry.name))
    return pids


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def mentions(pid: int, text: str) -> bool:
    needle = text.encode()
    with contextlib.suppress(OSError):
        return any(needle in Path(f"/proc/{pid}/{name}").read_bytes()
                   for name in ("environ", "cmdline"))
    return False


def listening(uid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket owned by ``uid``, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, owner = fields[1], fields[3], int(fields[7])
                if state != "0A" or owner != uid:  # 0A: LISTEN
                    continue
                address, _, port = local.partition(":")
                if len(address) == 8:
                    address = ".".join(str(b) for b in bytes.fromhex(address)[::-1])
                found.add((address, int(port, 16)))
    return found


def status_ports(status: dict[str, Any]) -> set[tuple[str, int]]:
    """What `orch sandbox status --json` lists: every ssh port, the API and the hub."""
    ports = {(n["address"], int(n["port"])) for n in status["nodes"]}
    for url in (status["api_url"], status["hub"]):
        parts = urlsplit(url)
        assert parts.hostname and parts.port, url
        ports.add((parts.hostname, parts.port))
    return ports


def test_readme_sandbox_from_a_fresh_clone_as_a_normal_user(account: Account,
                                                            tmp_path: Path) -> None:
    command = readme_first_command()
    orch = ".venv/bin/orch"
    timings: dict[str, float] = {"clone": clone_repo(account)}
    sandbox_dir = account.home / ".local" / "state" / "orch" / "sandbox"
    before_pids = user_pids(account.uid) if not account.created else set()
    before_ports = listening(account.uid) if not account.created else set()
    up = False
    try:
        # 1. The README's first command, as written, in the fresh clone.
        up = True
        code, output, timings["readme command"] = account.run(
            command, tmp_path / "first.log", FIRST_TIMEOUT)
        assert code == 0, f"the README's command exited {code}:\n{tail(tmp_path / 'first.log')}"
        assert "Traceback" not in output, output[-4000:]
        assert "from the 3-node ring" in output, output[-4000:]
        assert f"cluster file {sandbox_dir / 'sandbox.yml'}" in output, output[-4000:]
        # The controller never needs mlx (issue #17): the README's install has no [mlx] extra.
        code, found, _ = account.run(
            ".venv/bin/python -c \"import importlib.util as u; print(u.find_spec('mlx'))\"",
            tmp_path / "mlx.log", STEP_TIMEOUT)
        assert code == 0 and found.strip() == "None", f"mlx is in the controller's venv: {found}"

        code, raw, _ = account.run(f"{orch} sandbox status --json", tmp_path / "status.log",
                                   STEP_TIMEOUT)
        assert code == 0, raw
        status = json.loads(raw)
        assert status["up"] is True, status
        assert status["cluster_file"] == str(sandbox_dir / "sandbox.yml"), status
        assert status["api_url"].startswith("http://127.0.0.41:"), status
        assert [n["name"] for n in status["nodes"]] == ["mac1", "mac2", "mac3"], status
        assert all(n["alive"] for n in status["nodes"]), status

        # Issue #17: the sandbox's cluster file is self-contained, the command exactly as the
        # issue writes it (no --known-hosts: the inventory's ssh block names its known_hosts).
        plan = f"{orch} plan $({orch} sandbox status --json | jq -r .cluster_file)"
        code, planned, _ = account.run(plan, tmp_path / "plan.log", STEP_TIMEOUT)
        assert code == 0, f"`{plan}` exited {code}:\n{planned[-4000:]}"
        assert "No changes." in planned and "UNREACHABLE" not in planned, planned[-4000:]

        # 2. Again: the same sandbox, and an apply with nothing to do.
        code, again, timings["second up"] = account.run(
            f"{orch} sandbox up", tmp_path / "second.log", AGAIN_TIMEOUT)
        assert code == 0, f"`orch sandbox up` again exited {code}:\n{tail(tmp_path / 'second.log')}"
        assert "No changes. 3 hosts match the cluster file." in again, again[-4000:]
        assert "Apply: 3 ok, 0 changed, 0 failed, 0 unreachable." in again, again[-4000:]
        assert "from the 3-node ring" in again, again[-4000:]
        code, raw, _ = account.run(f"{orch} sandbox status --json", tmp_path / "status2.log",
                                   STEP_TIMEOUT)
        assert code == 0 and json.loads(raw) == status, raw  # same hosts, ports, API, hub

        # What the sandbox opened: everything the throwaway user listens on now (ssh, hub, API,
        # ring); as the current user, what is new on the simulated Macs' addresses.
        opened = listening(account.uid) - before_ports
        if not account.created:
            addresses = {n["address"] for n in status["nodes"]}
            opened = {p for p in opened if p[0] in addresses} | status_ports(status)
        assert status_ports(status) <= opened, (status_ports(status), opened)
        started = user_pids(account.uid) - before_pids
        assert started, "no process of the sandbox found"

        # 3. Down: nothing left running, nothing listening.
        code, output, timings["down"] = account.run(f"{orch} sandbox down",
                                                    tmp_path / "down.log", STEP_TIMEOUT)
        up = False
        assert code == 0, output
        if account.created:
            survivors = user_pids(account.uid)
            pgrep = subprocess.run(["pgrep", "-a", "-u", account.name], capture_output=True,
                                   text=True, check=False)
            assert not survivors, f"still running as {account.name}:\n{pgrep.stdout}"
        else:
            ours = descendants(os.getpid())
            survivors = {p for p in user_pids(account.uid) - before_pids - ours
                         if mentions(p, str(account.home))}
            assert not survivors, f"still running after down: {sorted(survivors)}"
        still = listening(account.uid) & opened
        assert not still, f"still listening after down: {sorted(still)}"
        accepting = [p for p in sorted(status_ports(status)) if port_open(*p)]
        assert not accepting, f"still accepting connections after down: {accepting}"
        assert not sandbox_dir.exists(), f"{sandbox_dir} is still there after down"
    finally:
        if up and (account.clone / orch).exists():  # a failure above: do not leak the sandbox
            with contextlib.suppress(Exception):
                account.run(f"{orch} sandbox down", tmp_path / "cleanup.log", STEP_TIMEOUT)
        total = sum(timings.values())
        print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
              + f"; total {total:.1f} s", flush=True)
