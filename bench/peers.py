"""orch against the tools users would pick instead: pyinfra and Ansible, on the same hosts.

    .venv/bin/python -m bench.peers [--hosts 25] [--reps 3] [--tools orch,pyinfra,ansible]
    .venv/bin/python -m bench.peers --quick        # CI: 3 hosts, 1 repetition, no time asserted

N simulated Macs (real OpenSSH sshd on 127.0.1.x, the stand-in launchctl and sysctl), and one
converge written once per tool as its users write it (`bench/peers_workload/`: orch's
cluster.yml, pyinfra's deploy.py, Ansible's playbook.yml): 5 directories, 3 templates (one is
a launchd plist), the `iogpu.wired_limit_mb` sysctl through sudo, and the service bootstrapped
into launchd. No model. orch writes the last two as its `sysctl:` and `launchd:` tasks (read in
its one facts call, not persisted: the others do not persist the sysctl either). pyinfra and
Ansible keep guarded shell one-liners: pyinfra 3.10's `server.sysctl` works on these hosts (its
fact runs `sysctl NAME`, which the stand-in answers as macOS does), but with `_sudo=True` its
fact runs under sudo too, one more process per no-op, so the one-liner is the cheaper pyinfra;
its `launchd.service` starts and stops a loaded job but does not bootstrap a plist, and
ansible-core has neither (ansible.posix.sysctl writes /etc/sysctl.conf, community.general's
launchd is not in ansible-core). Each tool runs as its CLI, as a user runs it, every host in
parallel (orch --concurrency N, pyinfra --parallel N, Ansible forks = N). Ansible is tuned
the usual way: pipelining, ControlMaster/ControlPersist, gather_facts off; every tool's SSH
uses the same curve25519 key exchange (what the simulated Mac's own ssh_argv uses).

Each repetition, for every tool in turn (the order rotates, so no tool always goes first):
reset the hosts to bare (files, sysctl and the launchd job gone; orch's agent cache kept: the
"warm agent" of the issue: one unmeasured orch run before the first repetition uploads it),
time the first converge, snapshot the result, time a no-op run.
The snapshots must be identical across tools, else the bench fails: a faster tool that does
less proves nothing.

Measured per run: wall time; controller CPU (the tool's process tree, from getrusage of
reaped children, plus Ansible's persisted ssh masters read from /proc before they are
stopped); host CPU (growth of each sshd listener's cutime+cstime: every session, shell and
interpreter of the run, as in bench/agent_session.py), and how much of it the macOS stand-ins
spent (each Python `sysctl`, `launchctl`, `sudo`, ... appends its own CPU to
<root>/log/standins.cpu; a Mac runs native binaries there, a few ms each); SSH connections and
channels per host (sshd's "Accepted publickey" and "Starting session" lines, LogLevel
VERBOSE). Figures are medians over the repetitions; ratios are medians of the per-repetition
ratios (paired).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, running_hosts

WORKLOAD = Path(__file__).parent / "peers_workload"
TOOLS = ("orch", "pyinfra", "ansible")
TICKS = os.sysconf("SC_CLK_TCK")
LABEL = "com.example.peers"
KEX = "curve25519-sha256"


@dataclass(frozen=True)
class Run:
    tool: str
    phase: str  # "first" (from bare) or "noop"
    wall: float
    controller_cpu: float
    host_cpu: float  # summed over hosts
    standin_cpu: float  # the part of host_cpu the Python macOS stand-ins spent, summed
    connections: float  # per host
    channels: float  # per host


def proc_cpu(pid: int, children: bool) -> float:
    """utime+stime (or cutime+cstime) of a live process, in seconds, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    first = 13 if children else 11  # stat(5) fields 14/15 and 16/17, after pid and comm
    return (int(fields[first]) + int(fields[first + 1])) / TICKS


def hosts_cpu(hosts: list[RunningHost]) -> float:
    """What every host's sshd has reaped so far: all the CPU the hosts spent on SSH work."""
    total = 0.0
    for host in hosts:
        assert host.sshd_pid is not None
        total += proc_cpu(host.sshd_pid, children=True)
    return total


def settled_hosts_cpu(hosts: list[RunningHost], timeout: float = 15.0) -> float:
    """The listeners reap a connection's sshd a moment after the client leaves: wait for the
    sum to stop growing for 0.5 s."""
    deadline = time.monotonic() + timeout
    value = hosts_cpu(hosts)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = hosts_cpu(hosts)
        if again == value:
            return value
        value = again
    return value


def standins_cpu(hosts: list[RunningHost]) -> float:
    """CPU seconds the hosts' macOS stand-ins reported so far (orchestrator/simulator/macos/
    standin_cpu.py)."""
    total = 0.0
    for host in hosts:
        for line in (host.root / "log" / "standins.cpu").read_text().splitlines():
            total += float(line.split()[1])
    return total


def log_counts(hosts: list[RunningHost]) -> tuple[int, int]:
    """(connections, session channels) sshd logged so far, over all hosts."""
    connections = channels = 0
    for host in hosts:
        text = (host.root / "log" / "sshd.log").read_bytes()
        connections += text.count(b"Accepted publickey")
        channels += text.count(b"Starting session: ")
    return connections, channels


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- each tool's files and command ------------------------------------------------------------


def write_orch(work: Path, hosts: list[RunningHost]) -> list[str]:
    directory = work / "orch"
    shutil.copytree(WORKLOAD / "templates", directory / "templates")
    shutil.copy(WORKLOAD / "cluster.yml", directory / "cluster.yml")
    lines = ["hosts:"]  # no ring_ip, no memory_gb: this cluster serves no model
    for h in hosts:
        lines += [f"  {h.name}:", f"    address: {h.address}", f"    port: {h.port}",
                  f"    user: {h.user}", f"    identity_file: {h.identity_file}"]
    (directory / "inventory.yml").write_text("\n".join(lines) + "\n")
    return [str(Path(sys.executable).parent / "orch"), "apply", str(directory / "cluster.yml"),
            "--yes", "--known-hosts", str(hosts[0].known_hosts_file),
            "--concurrency", str(len(hosts))]


def write_pyinfra(work: Path, hosts: list[RunningHost]) -> list[str]:
    directory = work / "pyinfra"
    shutil.copytree(WORKLOAD / "templates", directory / "templates")
    shutil.copy(WORKLOAD / "deploy.py", directory / "deploy.py")
    entries = [
        (h.address, {"ssh_port": h.port, "ssh_user": h.user, "ssh_key": str(h.identity_file),
                     "ssh_known_hosts_file": str(h.known_hosts_file),
                     "ssh_strict_host_key_checking": "yes"})
        for h in hosts]
    (directory / "inventory.py").write_text(f"hosts = {entries!r}\n")
    return [str(Path(sys.executable).parent / "pyinfra"), "inventory.py", "deploy.py", "-y",
            "--parallel", str(len(hosts))]


def write_ansible(work: Path, hosts: list[RunningHost]) -> list[str]:
    directory = work / "ansible"
    shutil.copytree(WORKLOAD / "templates", directory / "templates")
    shutil.copy(WORKLOAD / "playbook.yml", directory / "playbook.yml")
    lines = ["[all]"] + [
        f"{h.name} ansible_host={h.address} ansible_port={h.port} ansible_user={h.user} "
        f"ansible_ssh_private_key_file={h.identity_file} ansible_python_interpreter=python3 "
        f"home={h.home}"
        for h in hosts]
    (directory / "inventory.ini").write_text("\n".join(lines) + "\n")
    (directory / "cp").mkdir()
    ssh_args = (f"-o ControlMaster=auto -o ControlPersist=60s -o KexAlgorithms={KEX} "
                f"-o UserKnownHostsFile={hosts[0].known_hosts_file} "
                "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes")
    (directory / "ansible.cfg").write_text(f"""\
[defaults]
inventory = inventory.ini
forks = {len(hosts)}
gathering = explicit
host_key_checking = True
retry_files_enabled = False
local_tmp = {directory / "local-tmp"}
[ssh_connection]
pipelining = True
ssh_args = {ssh_args}
control_path_dir = {directory}/cp
control_path = %(directory)s/%%C
""")
    return [str(Path(sys.executable).parent / "ansible-playbook"), "playbook.yml"]


WRITERS = {"orch": write_orch, "pyinfra": write_pyinfra, "ansible": write_ansible}


def stop_ssh_masters(control_dir: Path) -> float:
    """Stop Ansible's persisted ssh masters; return the CPU they used (they were daemonized,
    so getrusage never sees them). Their sshd sessions end, so host CPU is then reaped."""
    cpu = 0.0
    for sock in control_dir.iterdir():
        check = subprocess.run(["ssh", "-S", str(sock), "-O", "check", "x"],
                               capture_output=True, text=True, check=False)
        pid = check.stderr.partition("pid=")[2].partition(")")[0]
        if pid.isdigit():
            with contextlib.suppress(OSError):
                cpu += proc_cpu(int(pid), children=False) + proc_cpu(int(pid), children=True)
        subprocess.run(["ssh", "-S", str(sock), "-O", "exit", "x"], capture_output=True,
                       check=False)
    return cpu


def run_tool(tool: str, phase: str, argv: list[str], cwd: Path,
             hosts: list[RunningHost]) -> Run:
    env = dict(os.environ, ANSIBLE_CONFIG=str(cwd / "ansible.cfg"),
               ANSIBLE_HOME=str(cwd / "home"), ANSIBLE_NOCOLOR="1")
    host_before = settled_hosts_cpu(hosts)
    standin_before = standins_cpu(hosts)
    conns_before, chans_before = log_counts(hosts)
    cpu_before = children_cpu()
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    cpu = children_cpu() - cpu_before
    if tool == "ansible":
        cpu += stop_ssh_masters(cwd / "cp")
    if done.returncode != 0:
        sys.exit(f"{tool} {phase} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                 f"{done.stderr[-3000:]}")
    host_cpu = settled_hosts_cpu(hosts) - host_before
    standin_cpu = standins_cpu(hosts) - standin_before
    conns, chans = log_counts(hosts)
    n = len(hosts)
    return Run(tool, phase, wall, cpu, host_cpu, standin_cpu, (conns - conns_before) / n,
               (chans - chans_before) / n)


# -- the hosts' state -------------------------------------------------------------------------


def launchctl(host: RunningHost, *args: str) -> subprocess.CompletedProcess[str]:
    """The host's own launchctl stand-in, run here: how the bench resets and reads the job."""
    env = {"PATH": "/usr/bin:/bin", "ORCH_HOST_ROOT": str(host.root)}
    return subprocess.run([str(host.root.parent / "bin" / "launchctl"), *args], env=env,
                          capture_output=True, text=True, check=False)


def reset(hosts: list[RunningHost]) -> None:
    """Back to bare: no files, no job, no sysctl value; orch's agent cache stays (warm)."""
    for host in hosts:
        launchctl(host, "bootout", f"user/{os.getuid()}/{LABEL}")
        shutil.rmtree(host.home / "peers", ignore_errors=True)
        (host.home / "Library" / "LaunchAgents" / f"{LABEL}.plist").unlink(missing_ok=True)
        (host.root / "run" / "sysctl.json").unlink(missing_ok=True)
        shutil.rmtree(host.home / ".ansible", ignore_errors=True)
        shutil.rmtree(host.home / ".orch" / "managed", ignore_errors=True)


def snapshot(host: RunningHost) -> dict[str, str]:
    """What the converge left: each file's mode and content hash, the sysctl, the job."""
    found: dict[str, str] = {}
    roots = [host.home / "peers", host.home / "Library" / "LaunchAgents" / f"{LABEL}.plist"]
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            mode = oct(path.stat().st_mode & 0o7777)
            digest = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            found[str(path.relative_to(host.home))] = f"{mode} {digest}"
    state = host.root / "run" / "sysctl.json"
    found["sysctl"] = state.read_text() if state.exists() else "unset"
    printed = launchctl(host, "print", f"user/{os.getuid()}/{LABEL}")
    found["launchd"] = "running" if "state = running" in printed.stdout else printed.stdout
    return found


# -- the run ----------------------------------------------------------------------------------


@contextlib.contextmanager
def bench_hosts(count: int, base: Path) -> Iterator[list[RunningHost]]:
    if not 1 <= count <= 254:
        sys.exit("--hosts: 1 to 254 (127.0.1.1-254, the addresses reserved for this bench)")
    specs = [HostSpec(f"p{i + 1}", 64 * GIB, address=f"127.0.1.{i + 1}") for i in range(count)]
    with running_hosts(base, specs) as hosts:
        for host in hosts:  # the stand-ins account their CPU only where this file exists
            (host.root / "log" / "standins.cpu").write_text("")
        yield hosts


def measure(hosts: list[RunningHost], work: Path, tools: list[str], reps: int) -> list[Run]:
    argvs = {tool: WRITERS[tool](work, hosts) for tool in tools}
    runs: list[Run] = []
    expected: dict[str, dict[str, str]] | None = None
    if "orch" in argvs:  # the "warm agent": this orch's agent is on every host first
        subprocess.run(argvs["orch"], cwd=work / "orch", stdout=subprocess.DEVNULL, check=True)
    for rep in range(reps):
        order = tools[rep % len(tools):] + tools[:rep % len(tools)]
        for tool in order:
            reset(hosts)
            runs.append(run_tool(tool, "first", argvs[tool], work / tool, hosts))
            result = {h.name: snapshot(h) for h in hosts}
            if expected is None:
                expected = result
            elif result != expected:
                sys.exit(f"{tool} left different state from {order[0]}:\n"
                         + json.dumps({"expected": expected, "got": result}, indent=1))
            runs.append(run_tool(tool, "noop", argvs[tool], work / tool, hosts))
            print(f"rep {rep + 1} {tool}: first {runs[-2].wall:.2f} s, "
                  f"no-op {runs[-1].wall:.2f} s", file=sys.stderr)
    assert expected is not None
    bare = next(iter(expected.values()))
    assert bare["launchd"] == "running" and "49152" in bare["sysctl"], bare
    return runs


def table(runs: list[Run], tools: list[str], reps: int, n: int) -> str:
    def med(tool: str, phase: str, field: str) -> float:
        return float(statistics.median(getattr(r, field) for r in runs
                                       if r.tool == tool and r.phase == phase))

    def without(tool: str, phase: str) -> float:
        """Median over repetitions of host CPU minus the stand-ins' share, run by run."""
        return float(statistics.median(r.host_cpu - r.standin_cpu for r in runs
                                       if r.tool == tool and r.phase == phase))

    def ratio(tool: str, other: str, phase: str) -> str:
        mine = [r.wall for r in runs if r.tool == tool and r.phase == phase]
        theirs = [r.wall for r in runs if r.tool == other and r.phase == phase]
        return f"{statistics.median(a / b for a, b in zip(mine, theirs, strict=True)):.2f}"

    load = os.getloadavg()
    lines = [f"{n} hosts, median of {reps} paired repetitions "
             f"(load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})", "",
             "| tool | run | wall s | controller CPU s | host CPU s/host | "
             "of which macOS stand-ins | host CPU without them | "
             "SSH conns/host | SSH channels/host |", "|---|---|---|---|---|---|---|---|---|"]
    for phase in ("noop", "first"):
        for tool in tools:
            lines.append(
                f"| {tool} | {'no-op' if phase == 'noop' else 'first converge'} | "
                f"{med(tool, phase, 'wall'):.2f} | {med(tool, phase, 'controller_cpu'):.2f} | "
                f"{med(tool, phase, 'host_cpu') / n:.3f} | "
                f"{med(tool, phase, 'standin_cpu') / n:.3f} | {without(tool, phase) / n:.3f} | "
                f"{med(tool, phase, 'connections'):.0f}"
                f" | {med(tool, phase, 'channels'):.0f} |")
    if "orch" in tools:
        lines.append("")
        for other in (t for t in tools if t != "orch"):
            lines.append(f"orch/{other} wall (paired median): no-op {ratio('orch', other, 'noop')}"
                         f", first converge {ratio('orch', other, 'first')}")
    return "\n".join(lines)


def compile_orch() -> None:
    """Give orch its bytecode, as pip gives every installed package (pyinfra's and Ansible's
    here): an editable orch run with PYTHONDONTWRITEBYTECODE set (as in CI) would otherwise
    compile its own modules from source at every run, a cost no installed orch pays."""
    import orchestrator

    compileall.compile_dir(Path(orchestrator.__file__).parent, quiet=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=25)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--quick", action="store_true", help="CI: 3 hosts, 1 repetition")
    parser.add_argument("--json", type=Path, help="also write every run as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.hosts, args.reps = 3, 1
    tools = [t for t in args.tools.split(",") if t]
    if not tools or set(tools) - set(TOOLS):
        sys.exit(f"--tools: a comma-separated subset of {','.join(TOOLS)}")
    compile_orch()
    with tempfile.TemporaryDirectory(prefix="orch-peers-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        with bench_hosts(args.hosts, Path(tmp) / "hosts") as hosts:
            runs = measure(hosts, work, tools, args.reps)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in runs], indent=1))
    print(table(runs, tools, args.reps, args.hosts))


if __name__ == "__main__":
    main()
