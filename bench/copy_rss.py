"""Peak memory of a `copy:` of a 1 GiB file to 3 simulated Macs, and what a second apply sends.

    flock /tmp/orch-net.lock .venv/bin/python -m bench.copy_rss [--mib 1024]

Three simulated Macs (real OpenSSH sshd on 127.0.0.96-98). The controller is a fresh `orch
apply` process (the CLI, as a user runs it); its peak RSS is the kernel's VmHWM, read from
/proc/self/status as it exits. On the hosts, every process of each host is sampled every 50 ms
and the highest VmHWM of each agent process (the one `agent.py session` per host that receives
and writes the file) and of each per-connection sshd is kept: VmHWM is the kernel's own
high-water mark, so sampling can miss only a process's last 50 ms, never a peak before it.
The bytes each apply sent are counted by the controller itself (its `file_streamed` events);
the second apply must say "No changes.", send 0 bytes and leave every copy's inode and mtime.
`measure` is also what tests/integration/test_copy_memory.py runs, on a smaller file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, running_hosts

CHILD = """\
import sys
from orchestrator.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
status = open("/proc/self/status").read()
hwm = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
print("ORCH_VMHWM_KB", hwm, "EXIT", code, file=sys.stderr)
"""


def status_kb(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Highest VmHWM (kB) per host process, by kind: agent or sshd."""

    def __init__(self, hosts: list[RunningHost]) -> None:
        super().__init__(daemon=True)
        self.hosts = hosts
        self.peaks: dict[int, tuple[str, str, int]] = {}  # pid -> (host, kind, kB)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for host in self.hosts:
                for pid in host.processes():
                    line = cmdline(pid)
                    kind = ("agent" if "session" in line and "python" in line
                            else "sshd" if "sshd" in line else None)
                    hwm = status_kb(pid, "VmHWM") if kind else None
                    if kind and hwm is not None:
                        old = self.peaks.get(pid, (host.name, kind, 0))[2]
                        self.peaks[pid] = (host.name, kind, max(old, hwm))
            time.sleep(0.05)


def apply(cluster: Path, known: Path) -> tuple[int, int, int, float, str]:
    """`orch apply --yes` in a fresh process: (exit code, its VmHWM kB, bytes it streamed from
    the controller's files, seconds, stdout). The bytes are the sum of its `file_streamed`
    events (one per file sent through an agent session), read from its JSON log."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "-v", "--log-format", "json", "apply",
                           str(cluster), "--yes", "--known-hosts", str(known)],
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    marker = next(line for line in proc.stderr.splitlines() if line.startswith("ORCH_VMHWM_KB"))
    _, hwm, _, code = marker.split()
    streamed = 0
    for line in proc.stderr.splitlines():
        if line.startswith("{") and '"file_streamed"' in line:
            streamed += int(json.loads(line)["bytes"])
    return int(code), int(hwm), streamed, elapsed, proc.stdout


def write_payload(path: Path, mib: int) -> None:
    """`mib` MiB of random bytes, written a MiB at a time (every MiB distinct)."""
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "big") + block[8:])


def measure(base: Path, mib: int, first_address: int = 96) -> dict[str, Any]:
    """Copy a `mib` MiB file to 3 simulated Macs (127.0.0.<first_address>..+2) twice: the
    controller's and each host's agent and sshd peak RSS during the first apply, the bytes each
    apply streamed, and whether the second left every copy as it was (same inode and mtime)."""
    payload = base / "payload.bin"
    write_payload(payload, mib)
    specs = [HostSpec(f"rss{i}", 64 * GIB, "Apple M4 Pro",
                      address=f"127.0.0.{first_address + i}") for i in range(3)]
    with running_hosts(base / "hosts", specs) as hosts:
        (base / "inventory.yml").write_text(inventory_yaml(hosts))
        cluster = base / "cluster.yml"
        cluster.write_text(
            "name: copyrss\ninventory: inventory.yml\nruntime:\n  packages: []\n"
            f"tasks:\n  - name: big\n"
            f"    copy: {{src: {json.dumps(str(payload))}, dest: ~/big.bin}}\n")
        sampler = Sampler(hosts)
        sampler.start()
        code, controller_kb, streamed, seconds, _ = apply(cluster, hosts[0].known_hosts_file)
        sampler.done.set()
        sampler.join()
        assert code == 0, f"first apply exited {code}"
        copies = [host.home / "big.bin" for host in hosts]
        for copy in copies:
            assert copy.stat().st_size == payload.stat().st_size
        identity = [(c.stat().st_ino, c.stat().st_mtime_ns) for c in copies]
        code2, controller2_kb, streamed2, seconds2, out2 = apply(cluster,
                                                                 hosts[0].known_hosts_file)
        assert code2 == 0, f"second apply exited {code2}"
        untouched = identity == [(c.stat().st_ino, c.stat().st_mtime_ns) for c in copies]
    agents: dict[str, int] = {}  # host -> its agents' highest VmHWM
    for host, kind, kb in sampler.peaks.values():
        if kind == "agent":
            agents[host] = max(kb, agents.get(host, 0))
    sshds = [kb for _, kind, kb in sampler.peaks.values() if kind == "sshd"]
    return {
        "file_mib": mib, "hosts": 3,
        "first_apply_s": round(seconds, 1),
        "first_apply_streamed_bytes": streamed,
        "controller_peak_rss_mb": round(controller_kb / 1024, 1),
        "agent_peak_rss_mb": round(max(agents.values()) / 1024, 1) if agents else None,
        "hosts_with_an_agent_sampled": len(agents),
        "sshd_peak_rss_mb": round(max(sshds) / 1024, 1) if sshds else None,
        "second_apply_s": round(seconds2, 1),
        "second_apply_streamed_bytes": streamed2,
        "second_apply_no_changes": "No changes." in out2,
        "second_apply_left_the_copies_untouched": untouched,
        "second_apply_controller_peak_rss_mb": round(controller2_kb / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the copied file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch-copy-rss-") as tmp:
        print(json.dumps(measure(Path(tmp), args.mib), indent=2))


if __name__ == "__main__":
    main()
