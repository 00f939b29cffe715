"""Simulated Macs: one real OpenSSH ``sshd`` per host, with macOS stand-ins on its PATH.

No Mac is available to tests or to ``orch sandbox up``, so a host is the closest thing that
still exercises every real part of orch: a real ``sshd`` (key auth, sessions, SFTP, host
keys) listening on its own loopback address, a filesystem root of its own, and small
stand-ins for the macOS commands orch calls (``launchctl`` with a real supervising
``launchd``, ``sysctl``, ``sw_vers``, ``system_profiler``, ``sudo``; see ``macos/``).

Layout under ``base_dir`` (shared by the hosts of one sandbox)::

    bin/                 the macOS command stand-ins (first on every host's PATH)
    libexec/             launchd (the supervisor) and orch-login (sshd's ForceCommand)
    python/python3       symlink to the controller's base interpreter (not its venv)
    client_key[.pub]     the client keypair every host authorizes
    known_hosts          one line per host: ``[address]:port ssh-ed25519 ...``
    ssh_config           ``ssh -F base/ssh_config <name>`` for debugging
    <name>/              one host's root:
        host.json        identity read by the stand-ins (memory, chip, macOS version, uid)
        home/            the session user's HOME
        Library/LaunchDaemons/   the system domain's plists, loaded at every boot
        etc/             sshd_config, host key, authorized_keys
        var/root/        HOME of system-domain jobs ("root" on the simulated Mac)
        run/             volatile state (pids, launchd socket, sysctl values, the stand-ins'
                         marshal copy of host.json): wiped at boot
        tmp/             TMPDIR, wiped at boot; its ``mlx/`` links to the kernel cache below
        log/             sshd.log, launchd.log

MLX's CPU backend (the only one on Linux) compiles each fused kernel with ``g++`` the
first time a process runs it, into ``$TMPDIR/mlx/<version>/cpu`` (about a second each, five
for the sandbox's model), so every fresh or rebooted host compiled the same kernels again
before its first answer. A Mac runs Metal kernels that ship compiled, so that cost is the
simulation's, not orch's: every host's ``tmp/mlx`` links to one kernel directory per user
(``~/.cache/orch/simulator/mlx``), which mlx fills safely from many processes at once (it
compiles to a temporary name and renames into place).

``stop()`` kills every process the host started, found by its environment marker and as
descendants of its daemons (see ``processes``), and checks that none is left and the port
is closed. Linux only: it relies on ``/proc`` and on all of 127.0.0.0/8 being local.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from orchestrator.model.cache import cache_dir
from orchestrator.simulator import processes
from orchestrator.simulator.processes import SandboxError

__all__ = [
    "CLT_STUB",
    "GIB",
    "HostSpec",
    "RunningHost",
    "SandboxError",
    "default_specs",
    "reboot",
    "running_hosts",
    "start_hosts",
    "stop_hosts",
]

MACOS_DIR = Path(__file__).parent / "macos"
# Not commands: modules the stand-ins import from their own directory (bench CPU bookkeeping;
# host.json read without json).
STANDIN_SUPPORT = ("standin_cpu.py", "standin_host.py")
COMMANDS = ("ibv_devices", "launchctl", "sudo", "sw_vers", "sysctl", "system_profiler",
            "xcode-select")
CLT_STUB = "clt-stub"  # HostSpec.python3: /usr/bin/python3 of a Mac without Command Line Tools
# What that stub prints (on stderr) and its exit status: ../shared/macos/python_stock_macos.txt
_CLT_STUB_SCRIPT = """#!/bin/sh
# TEST STAND-IN: /usr/bin/python3 on a Mac without the Command Line Tools (orch simulator).
cat >&2 <<'EOF'
xcode-select: note: No developer tools were found, requesting install.
If developer tools are located at a non-default location on disk, use `sudo xcode-select \
--switch path/to/Xcode.app` to specify the Xcode that you wish to use for command line \
developer tools, and cancel the installation dialog.
See `man xcode-select` for more details.
EOF
exit 1
"""
SERVICES = ("launchd", "orch-login")
_SHARED_NAMES = frozenset({"bin", "libexec", "python"})
_SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",  # Debian, Ubuntu
    "/usr/libexec/openssh/sftp-server",  # Fedora, RHEL
    "/usr/lib/ssh/sftp-server",  # Arch
    "/usr/libexec/sftp-server",  # macOS, BSD
)
_SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
GIB = 1024**3

_UNKNOWN_CHIP = ("Mac", "Mac0,0", 8, "proc 8:4:4")
# chip -> (machine_name, machine_model, cores, number_processors); cosmetic, for
# system_profiler and hw.ncpu. Unknown chips get a generic Mac.
_CHIPS: dict[str, tuple[str, str, int, str]] = {
    "Apple M1 Ultra": ("Mac Studio", "Mac13,2", 20, "proc 20:16:4"),
    "Apple M2 Ultra": ("Mac Studio", "Mac14,14", 24, "proc 24:16:8"),
    "Apple M3 Ultra": ("Mac Studio", "Mac15,14", 32, "proc 32:24:8"),
    "Apple M2 Max": ("Mac Studio", "Mac14,13", 12, "proc 12:8:4"),
    "Apple M3 Max": ("MacBook Pro", "Mac15,9", 16, "proc 16:12:4"),
    "Apple M4 Max": ("MacBook Pro", "Mac16,5", 16, "proc 16:12:4"),
    "Apple M4 Pro": ("Mac mini", "Mac16,11", 14, "proc 14:10:4"),
    "Apple M4": ("Mac mini", "Mac16,10", 10, "proc 10:4:6"),
}


@dataclass(frozen=True)
class HostSpec:
    """What one simulated Mac is: its identity, and where its sshd listens.

    Any 127.x.y.z address works on Linux without root; give each host its own so that
    services (the MLX ring) can use the same port on every host, as on a real LAN.
    """

    name: str
    memory_bytes: int
    chip: str = "Apple M2 Ultra"
    address: str = "127.0.0.1"
    ssh_port: int = 0  # 0: pick a free port
    macos_version: str = "14.5"
    build_version: str = "23F79"
    sudo_nopasswd: bool = True  # False: `sudo -n` fails like a Mac without a NOPASSWD rule
    rdma_devices: tuple[str, ...] | None = None  # ibv_devices; None: no tool (macOS < 26.2)
    # An existing network namespace to run the host in (``ip netns``; needs root): its
    # daemons start under ``ip netns exec``, so its links can be shaped with ``tc`` like a
    # real LAN's (bench/sync_bound.py). ``address`` is then one of that namespace's, not
    # loopback, and sshd listens on port 22 unless ``ssh_port`` says otherwise.
    netns: str | None = None
    # What `python3` on the session's PATH is, as /usr/bin/python3 on a Mac: None, the
    # sandbox's interpreter (the default); CLT_STUB, the Command Line Tools' stub; or a path
    # to a real interpreter linked there (a Python 3.9 makes a stock Mac's /usr/bin/python3).
    python3: str | None = None
    developer_tools: bool = True  # `xcode-select -p` succeeds (Command Line Tools installed)
    # More interpreters: (where on the Mac, the real interpreter linked there), e.g.
    # ("/opt/homebrew/bin/python3.11", "/usr/bin/python3.11"); "~/" paths are in HOME.
    pythons: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class _Shared:
    """The files every host of one sandbox uses."""

    base: Path
    bin_dir: Path
    libexec_dir: Path
    python3: Path
    identity_file: Path
    known_hosts_file: Path
    sshd: Path
    sftp_server: Path
    user: str
    mlx_kernels: Path  # MLX's compiled CPU kernels, shared by every host (module docstring)


class RunningHost:
    """A started simulated Mac. Mutable only because ``reboot`` restarts its daemons."""

    def __init__(self, spec: HostSpec, shared: _Shared, port: int, host_key: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.address = spec.address
        self.port = port
        self.user = shared.user
        self.root = shared.base / spec.name
        self.home = self.root / "home"
        self.identity_file = shared.identity_file
        self.known_hosts_file = shared.known_hosts_file
        self.host_key = host_key  # "ssh-ed25519 AAAA..."
        self.python3 = shared.python3  # `python3` on the host, and /usr/bin/python3 in jobs
        self._shared = shared
        self._sshd: subprocess.Popen[bytes] | None = None
        self._launchd: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"RunningHost({self.name!r}, {self.address}:{self.port}, root={str(self.root)!r})"

    @property
    def known_hosts_line(self) -> str:
        """This host's line for a known_hosts file (non-default port form)."""
        # OpenSSH writes (and looks up) port 22 as the bare address, any other as [addr]:port.
        where = self.address if self.port == 22 else f"[{self.address}]:{self.port}"
        return f"{where} {self.host_key}"

    @property
    def launch_agents_dir(self) -> Path:
        """Where a Mac keeps per-user agents (``~/Library/LaunchAgents``)."""
        return self.home / "Library" / "LaunchAgents"

    @property
    def launch_daemons_dir(self) -> Path:
        """The simulated ``/Library/LaunchDaemons`` (system domain, loaded at boot)."""
        return self.root / "Library" / "LaunchDaemons"

    @property
    def sshd_pid(self) -> int | None:
        return self._sshd.pid if self._sshd else None

    @property
    def launchd_pid(self) -> int | None:
        return self._launchd.pid if self._launchd else None

    def ssh_argv(self, *command: str) -> list[str]:
        """The real ``ssh`` client's argv to run ``command`` on this host (for debugging).

        Like ssh itself, the words of ``command`` are joined with spaces and parsed again by
        the remote shell: quote them (``shlex.join``) when they hold spaces or quotes.
        """
        return [
            "ssh", "-F", "/dev/null", "-i", str(self.identity_file), "-p", str(self.port),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts_file}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
            "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
            # The default post-quantum key exchange costs ~50 ms a connection; tests connect
            # a lot. The server keeps OpenSSH's defaults, as on a Mac.
            "-o", "KexAlgorithms=curve25519-sha256",
            "-l", self.user, self.address, *command,
        ]  # fmt: skip

    def processes(self) -> list[int]:
        """Pids of every live process this host started (sshd, sessions, launchd, jobs)."""
        daemons = [p.pid for p in (self._sshd, self._launchd) if p is not None]
        return processes.host_pids(self.root, daemons)

    def stop(self) -> None:
        """Kill sshd, the supervisor and everything they started; verify nothing is left."""
        processes.kill_all(self.root, self._launchd, self._sshd)
        self._sshd = self._launchd = None
        leftover = processes.host_pids(self.root)
        if leftover:
            raise SandboxError(f"{self.name}: processes survived stop: {leftover}")
        if processes.port_open(self.address, self.port):
            raise SandboxError(f"{self.name}: {self.address}:{self.port} still accepts connections")

    def _boot(self, timeout: float) -> None:
        """Start this host's daemons the way a Mac boots: volatile state gone, launchd first."""
        processes.kill_stale(self.root)  # a no-op, unless a crashed run left processes
        for volatile in ("run", "tmp"):
            shutil.rmtree(self.root / volatile, ignore_errors=True)
            (self.root / volatile).mkdir(mode=0o700)
        (self.root / "tmp" / "mlx").symlink_to(self._shared.mlx_kernels, target_is_directory=True)
        (self.root / "run" / "boot.json").write_text(json.dumps({"boot_time": time.time()}))
        env = {
            "PATH": _SYSTEM_PATH,
            "ORCH_HOST_ROOT": str(self.root),
            "LANG": "C.UTF-8",
        }
        netns = ["ip", "netns", "exec", self.spec.netns] if self.spec.netns else []
        log = (self.root / "log" / "launchd.log").open("ab")
        with log:
            self._launchd = subprocess.Popen(
                [*netns, str(self._shared.python3), "-I", "-S",
                 str(self._shared.libexec_dir / "launchd"), str(self.root)],
                cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        self._sshd = subprocess.Popen(
            [*netns, str(self._shared.sshd), "-D", "-f", str(self.root / "etc" / "sshd_config"),
             "-E", str(self.root / "log" / "sshd.log")],
            # Never the caller's stdout: `orch sandbox up | tail` must end when orch does.
            cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        logs = self.root / "log"
        processes.wait_for(
            lambda: (self.root / "run" / "launchd.pid").exists(),
            self._launchd,
            deadline,
            f"{self.name}: launchd did not start",
            logs / "launchd.log",
        )
        processes.wait_for(
            lambda: processes.port_open(self.address, self.port),
            self._sshd,
            deadline,
            f"{self.name}: sshd did not listen on {self.address}:{self.port}",
            logs / "sshd.log",
        )

    def _check_login(self) -> None:
        """One real ``ssh ... true``: proves keys, known_hosts and the login wrapper work."""
        done = subprocess.run(self.ssh_argv("true"), capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise SandboxError(
                f"{self.name}: ssh login failed ({done.returncode}): {done.stderr.strip()}\n"
                + processes.tail(self.root / "log" / "sshd.log")
            )


def start_hosts(
    base_dir: Path, specs: Sequence[HostSpec], *, python: Path | None = None, timeout: float = 20.0
) -> list[RunningHost]:
    """Create (or reuse) each host's root under ``base_dir`` and boot it; wait until
    every host accepts an SSH login. On any failure, stops what was started and raises.

    Reusing a ``base_dir`` keeps keys, homes and LaunchDaemons (the "disk"), so a
    sandbox can be stopped and started again like machines that were powered off.
    ``python`` is the interpreter hosts see as ``python3`` (default: the base interpreter
    of the running Python, never a venv, as a fresh Mac has no venv either).
    """
    _check_specs(specs)
    shared = _prepare_shared(Path(base_dir).resolve(), python)
    hosts: list[RunningHost] = []
    try:
        for spec in specs:
            hosts.append(_prepare_host(shared, spec))
        _write_client_files(shared, hosts)
        for host in hosts:
            host._boot(timeout)
        for host in hosts:
            host._check_login()
    except BaseException:
        stop_hosts(hosts)
        raise
    return hosts


def stop_hosts(hosts: Sequence[RunningHost]) -> None:
    """Stop every host, even if some fail to stop; raise the failures afterwards.

    The hosts stop at once, one thread each, as Macs shut down side by side: a stop mostly
    waits (for launchd to stop its jobs, then for the stragglers' grace periods), and one
    after another those waits added up (the e2e tests' shared sandbox's teardown took 3 s on
    a quiet machine, 19 s on a busy one)."""

    def stop(host: RunningHost) -> SandboxError | None:
        try:
            host.stop()
        except SandboxError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max(1, len(hosts))) as pool:
        errors = [e for e in pool.map(stop, hosts) if e is not None]
    if errors:
        raise SandboxError("; ".join(str(e) for e in errors))


@contextlib.contextmanager
def running_hosts(
    base_dir: Path, specs: Sequence[HostSpec], *, python: Path | None = None
) -> Iterator[list[RunningHost]]:
    """``start_hosts`` / ``stop_hosts`` as a context manager."""
    hosts = start_hosts(base_dir, specs, python=python)
    try:
        yield hosts
    finally:
        stop_hosts(hosts)


def reboot(host: RunningHost, *, timeout: float = 20.0) -> None:
    """Simulate a reboot: every process dies (SSH connections drop), volatile state (sysctl
    values such as ``iogpu.wired_limit_mb``, /tmp) is lost, then launchd starts again and
    loads the system domain from ``Library/LaunchDaemons`` (RunAtLoad / KeepAlive jobs run),
    and sshd comes back on the same address, port and host key.

    Per-user agents are not reloaded: on a real Mac they come back only with a login
    session, which is why what must survive a reboot belongs in a LaunchDaemon.
    """
    host.stop()
    host._boot(timeout)
    host._check_login()


def default_specs(count: int = 3) -> list[HostSpec]:
    """The guide's lab: 2x Mac Studio M2 Ultra 192 GB + a MacBook Pro M4 Max 128 GB, then
    more M2 Ultras; each on its own loopback address (127.0.0.11, .12, ...)."""
    specs = []
    for i in range(count):
        chip, memory = ("Apple M4 Max", 128 * GIB) if i == 2 else ("Apple M2 Ultra", 192 * GIB)
        specs.append(HostSpec(f"mac{i + 1}", memory, chip, address=f"127.0.0.{11 + i}"))
    return specs


# -- preparing files ---------------------------------------------------------------------


def _check_specs(specs: Sequence[HostSpec]) -> None:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SandboxError(f"host names must be unique: {names}")
    for spec in specs:
        if spec.memory_bytes <= 0:
            raise SandboxError(f"{spec.name}: memory_bytes must be positive")
        if not spec.name.replace("-", "").replace("_", "").isalnum() or spec.name.startswith("-"):
            raise SandboxError(f"host name {spec.name!r}: use letters, digits, '-' and '_'")
        if spec.name in _SHARED_NAMES:
            raise SandboxError(f"host name {spec.name!r} is reserved for the sandbox's files")
        if spec.netns is None and not spec.address.startswith("127."):
            raise SandboxError(f"{spec.name}: address {spec.address} is not a loopback address")
        if spec.netns is not None and not spec.netns.replace("-", "").isalnum():
            raise SandboxError(f"{spec.name}: netns {spec.netns!r}: use letters, digits, '-'")
    fixed = [(s.address, s.ssh_port) for s in specs if s.ssh_port]
    if len(set(fixed)) != len(fixed):
        raise SandboxError(f"two hosts share an address and port: {fixed}")


def _prepare_shared(base: Path, python: Path | None) -> _Shared:
    sshd = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    if sshd is None:
        raise SandboxError(
            "sshd not found: the simulated Macs need OpenSSH's server "
            "(Debian/Ubuntu: apt-get install openssh-server)"
        )
    sftp_server = next((Path(p) for p in _SFTP_SERVERS if Path(p).exists()), None)
    if sftp_server is None:
        raise SandboxError(f"no sftp-server found in {_SFTP_SERVERS}; install openssh-server")
    for ch in ('"', "%", "\n", "'"):
        if ch in str(base):
            raise SandboxError(f"sandbox directory {base} must not contain {ch!r}")
    if os.geteuid() == 0:
        # sshd started by root insists on its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    base.mkdir(parents=True, exist_ok=True)
    bin_dir, libexec_dir, python_dir = base / "bin", base / "libexec", base / "python"
    interpreter = python or _base_python()
    # The stand-ins run on the sandbox's interpreter, whatever `python3` a host has on PATH
    # (a Python 3.9, or the Command Line Tools' stub, which runs nothing), isolated and without
    # `site` (-IS: stdlib only, they need neither): a Mac runs these commands as native
    # binaries in a few ms, and site alone was ~13 ms of each start's ~20 ms of CPU here.
    shebang = f"#!{interpreter} -IS\n" if not any(c.isspace() for c in str(interpreter)) else None
    for directory, names in ((bin_dir, COMMANDS), (libexec_dir, SERVICES)):
        directory.mkdir(exist_ok=True)
        for name in names:
            target = directory / name
            text = (MACOS_DIR / name).read_text(encoding="utf-8")
            if shebang and text.startswith("#!/usr/bin/env python3\n"):
                text = shebang + text.split("\n", 1)[1]
            target.write_text(text, encoding="utf-8")
            target.chmod(0o755)
    for support in STANDIN_SUPPORT:
        (bin_dir / support).write_text((MACOS_DIR / support).read_text("utf-8"), encoding="utf-8")
    python_dir.mkdir(exist_ok=True)
    python3 = python_dir / "python3"
    python3.unlink(missing_ok=True)
    python3.symlink_to(interpreter)
    identity = base / "client_key"
    if not identity.exists():
        _keygen(identity, "orch-sandbox-client")
    mlx_kernels = cache_dir() / "simulator" / "mlx"
    mlx_kernels.mkdir(parents=True, exist_ok=True)
    return _Shared(
        base=base,
        bin_dir=bin_dir,
        libexec_dir=libexec_dir,
        python3=python3,
        identity_file=identity,
        known_hosts_file=base / "known_hosts",
        sshd=Path(sshd),
        sftp_server=sftp_server,
        user=pwd.getpwuid(os.getuid()).pw_name,
        mlx_kernels=mlx_kernels,
    )


def _base_python() -> Path:
    """The interpreter behind the running one: a venv's ``python`` is only a link to it."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    candidate = Path(exe).resolve()
    if sys.prefix != sys.base_prefix and candidate.is_relative_to(Path(sys.prefix).resolve()):
        candidate = Path(sys.base_prefix) / "bin" / "python3"
    return candidate.resolve()


def _prepare_host(shared: _Shared, spec: HostSpec) -> RunningHost:
    root = shared.base / spec.name
    processes.kill_stale(root)  # before choosing the port, which a stale sshd may still hold
    for sub in ("home/Library/LaunchAgents", "home/Library/Logs", "Library/LaunchDaemons",
                "etc", "var/root", "log", "run", "tmp"):  # fmt: skip
        (root / sub).mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    key = root / "etc" / "ssh_host_ed25519_key"
    if not key.exists():
        _keygen(key, f"orch-sandbox-{spec.name}")
    host_key = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    port = (
        spec.ssh_port
        or (22 if spec.netns is not None else 0)  # its own namespace: the usual port is free
        or processes.previous_port(root, spec.address)
        or processes.free_port(spec.address)
    )
    host = RunningHost(spec, shared, port, host_key)
    machine_name, model, cores, processors = _CHIPS.get(spec.chip, _UNKNOWN_CHIP)
    identity = {
        "name": spec.name,
        "memory_bytes": spec.memory_bytes,
        "chip": spec.chip,
        "macos_version": spec.macos_version,
        "build_version": spec.build_version,
        "rdma_devices": None if spec.rdma_devices is None else list(spec.rdma_devices),
        "machine_name": machine_name,
        "machine_model": model,
        "cpu_count": cores,
        "number_processors": processors,
        "serial_number": f"SIM{zlib.crc32(spec.name.encode()) % 10**8:08d}",
        "uid": os.getuid(),
        "user": shared.user,
        "home": str(host.home),
        "path": f"{shared.bin_dir}:{shared.python3.parent}:{_SYSTEM_PATH}",
        "python3": str(shared.python3),
        "bin_dir": str(shared.bin_dir),
        "sftp_server": str(shared.sftp_server),
        "sudo_nopasswd": spec.sudo_nopasswd,
    }
    identity["developer_tools"] = spec.developer_tools
    path = f"{shared.bin_dir}:{_install_pythons(host, spec)}:{_SYSTEM_PATH}"
    identity["path"] = path
    (root / "host.json").write_text(json.dumps(identity, indent=2) + "\n")
    (root / "etc" / "authorized_keys").write_text(
        shared.identity_file.with_suffix(".pub").read_text()
    )
    (root / "etc" / "sshd_config").write_text(_sshd_config(shared, host, path))
    return host


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def _install_pythons(host: RunningHost, spec: HostSpec) -> Path:
    """The host's interpreters (see `HostSpec.python3` and `.pythons`); returns the
    directory of its `python3`, for PATH. Absolute Mac paths live under the host root,
    where the agent looks for them on a simulated Mac (the agent's `expand`)."""
    for mac_path, real in spec.pythons:
        where = (host.home / mac_path[2:] if mac_path.startswith("~/")
                 else host.root / mac_path.lstrip("/"))
        _link(where, real)
    if spec.python3 is None:
        return host.python3.parent
    usr_bin = host.root / "usr" / "bin"
    stock = usr_bin / "python3"
    if spec.python3 == CLT_STUB:
        stock.unlink(missing_ok=True)
        stock.parent.mkdir(parents=True, exist_ok=True)
        stock.write_text(_CLT_STUB_SCRIPT)
        stock.chmod(0o755)
    else:
        _link(stock, spec.python3)
    return usr_bin


def _sshd_config(shared: _Shared, host: RunningHost, path: str) -> str:
    """Key-only, unprivileged-friendly sshd whose every session goes through orch-login."""
    etc, run = host.root / "etc", host.root / "run"
    login = shlex.join(["/bin/sh", str(shared.libexec_dir / "orch-login"), str(host.root),
                        str(host.home), path, host.name,
                        str(shared.sftp_server)])  # fmt: skip
    return f"""\
# Simulated Mac {host.name} (written by orchestrator.simulator.hosts; regenerated at start)
ListenAddress {host.address}:{host.port}
HostKey "{etc}/ssh_host_ed25519_key"
PidFile "{run}/sshd.pid"
AuthorizedKeysFile "{etc}/authorized_keys"
AllowUsers {shared.user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
# Unprivileged sshd cannot use PAM; the host dirs live under /tmp, which StrictModes rejects.
UsePAM no
StrictModes no
PermitUserRC no
PermitUserEnvironment no
UseDNS no
PrintMotd no
PrintLastLog no
X11Forwarding no
# orch multiplexes many channels on one connection, and tests connect in bursts.
MaxSessions 100
MaxStartups 100:30:200
# VERBOSE logs "Starting session: ..." for every exec channel: tests count channels by it.
LogLevel VERBOSE
# bash runs ~/.bashrc for ssh commands when SHLVL < 2: the Linux user's rc files belong to the
# controller, not to the simulated Mac (and can be slow or print into the SFTP stream).
SetEnv SHLVL=1
Subsystem sftp {shared.sftp_server}
ForceCommand exec {login}
"""


def _write_client_files(shared: _Shared, hosts: Sequence[RunningHost]) -> None:
    """known_hosts for the sandbox and an ssh_config for humans (``ssh -F ... <name>``)."""
    shared.known_hosts_file.write_text("".join(h.known_hosts_line + "\n" for h in hosts))
    blocks = [
        f"Host {h.name}\n  HostName {h.address}\n  Port {h.port}\n  User {h.user}\n"
        f"  IdentityFile {h.identity_file}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {h.known_hosts_file}\n  StrictHostKeyChecking yes\n"
        for h in hosts
    ]
    (shared.base / "ssh_config").write_text("\n".join(blocks))


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
