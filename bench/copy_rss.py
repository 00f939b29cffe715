"""Peak memory of a `copy:` of a 1 GiB file to 3 simulated Macs, and what a second apply sends.

    flock /tmp/orch-net.lock .venv/bin/python -m bench.copy_rss [--mib 1024]

Three simulated Macs (real OpenSSH sshd on 127.0.0.96-98). The controller is a fresh `orch
apply` process (the CLI, as a user runs it); its peak RSS is the kernel's VmHWM, read from
/proc/self/status as it exits. On the hosts, every process of each host is sampled every 50 ms
and the highest VmHWM of each agent process (the one `agent.py session` per host that receives
and writes the file) and of each per-connection sshd is kept: VmHWM is the kernel's own
high-water mark, so sampling can miss only a process's last 50 ms, never a peak before it.
The second apply's plan must be "No changes.": no write step, so 0 bytes of the file sent.
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


def apply(cluster: Path, known: Path) -> tuple[int, int, float, str]:
    """`orch apply --yes` in a fresh process: (exit code, its VmHWM kB, seconds, stdout)."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "apply", str(cluster), "--yes",
                           "--known-hosts", str(known)], capture_output=True, text=True,
                          check=False)
    elapsed = time.perf_counter() - started
    marker = next(line for line in proc.stderr.splitlines() if line.startswith("ORCH_VMHWM_KB"))
    _, hwm, _, code = marker.split()
    return int(code), int(hwm), elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the copied file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch-copy-rss-") as tmp:
        base = Path(tmp)
        payload = base / "payload.bin"
        block = os.urandom(1 << 20)
        with payload.open("wb") as f:
            for i in range(args.mib):
                f.write(i.to_bytes(8, "big") + block[8:])  # every MiB distinct
        specs = [HostSpec(f"rss{i}", 64 * GIB, "Apple M4 Pro", address=f"127.0.0.{96 + i}")
                 for i in range(3)]
        with running_hosts(base / "hosts", specs) as hosts:
            (base / "inventory.yml").write_text(inventory_yaml(hosts))
            cluster = base / "cluster.yml"
            cluster.write_text(
                "name: copyrss\ninventory: inventory.yml\nruntime:\n  packages: []\n"
                f"tasks:\n  - name: big\n"
                f"    copy: {{src: {json.dumps(str(payload))}, dest: ~/big.bin}}\n")
            sampler = Sampler(hosts)
            sampler.start()
            code, controller_kb, seconds, _ = apply(cluster, hosts[0].known_hosts_file)
            sampler.done.set()
            sampler.join()
            assert code == 0, f"first apply exited {code}"
            for host in hosts:
                assert (host.home / "big.bin").stat().st_size == payload.stat().st_size
            code2, controller2_kb, seconds2, out2 = apply(cluster, hosts[0].known_hosts_file)
            assert code2 == 0, f"second apply exited {code2}"
        agents = [kb for _, kind, kb in sampler.peaks.values() if kind == "agent"]
        sshds = [kb for _, kind, kb in sampler.peaks.values() if kind == "sshd"]
        result = {
            "file_mib": args.mib, "hosts": 3,
            "first_apply_s": round(seconds, 1),
            "controller_peak_rss_mb": round(controller_kb / 1024, 1),
            "agent_peak_rss_mb": round(max(agents) / 1024, 1) if agents else None,
            "agents_sampled": len(agents),
            "sshd_peak_rss_mb": round(max(sshds) / 1024, 1) if sshds else None,
            "second_apply_s": round(seconds2, 1),
            "second_apply_no_changes": "No changes." in out2,
            "second_apply_controller_peak_rss_mb": round(controller2_kb / 1024, 1),
        }
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
