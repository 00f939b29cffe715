"""How close shard sync comes to the time its links allow: ``python -m bench.sync_bound``.

Runs as root (network namespaces and ``tc``). N simulated Macs (real sshd, the real agent)
each in a namespace of its own with a 1 Gbit/s link, a Hub (the test hub) in another behind
400 Mbit/s, 1 ms round trips (see bench/netns.py); the controller is a separate process in
the root namespace running the real ``orch apply`` (bench/sync_apply.py). The model is
random (incompressible) bytes in files of a few hundred MB. Three scenarios per N:

* ``pipeline``: each node needs a contiguous share of the files plus the first file of the
  next node's share (a pipeline's boundary layers), from empty nodes;
* ``tensor``: every node needs every file, from empty nodes;
* ``join``: N-1 nodes already hold every file (converged, not timed); node N joins and
  needs every file: all from peers, none from the Hub.

**The bound** for a scenario is the largest of: the bytes no node held over the Hub link;
for each node, the bytes it lacked over its link; for each node, the bytes it actually
sent to peers over its link. The time is the sync's own (peer servers up to stopped, from
apply's transfer summary); apply's whole wall time is printed beside it.

Also per scenario: Hub bytes / the bytes no node held (1.00 = each file left the Hub once),
the controller's peak RSS (``wait4``) and each node's agents' (sampled from ``/proc`` every
0.2 s: the largest agent process, and the largest sum of a node's agent processes at once),
bytes resumed and re-fetched. ``--quick`` is a smoke run for CI: small files, N = 3, no
figure asserted. Hold ``flock /tmp/orch-net.lock`` while running it (other runs' CPU use
ruins the timings, and the tests use the same machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.netns import BRIDGE_ADDRESS, NETEM, Lan
from orchestrator.simulator import processes
from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, start_hosts, stop_hosts

REPO = "org/bench"
HUB_ADDRESS = "10.77.0.2"
HUB_MBIT, LAN_MBIT, DELAY_MS = 400, 1000, 1.0
SCENARIOS = ("pipeline", "tensor", "join")
SAMPLE_S = 0.2


def node_address(i: int) -> str:
    return f"10.77.1.{i + 1}"


# ----------------------------------------------------------------------------------- model


def make_model(directory: Path, total_bytes: int, file_bytes: int) -> list[tuple[str, int]]:
    """Random files (reused when a previous run made the same ones): [(name, size)]."""
    count = max(1, -(-total_bytes // file_bytes))
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    sizes = [min(file_bytes, total_bytes - i * file_bytes) for i in range(count)]
    stamp = directory / ".complete"
    if stamp.exists() and stamp.read_text() == json.dumps(list(zip(names, sizes, strict=True))):
        return list(zip(names, sizes, strict=True))
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for name, size in zip(names, sizes, strict=True):
        with (directory / name).open("wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 4 << 20))
                f.write(chunk)
                left -= len(chunk)
    stamp.write_text(json.dumps(list(zip(names, sizes, strict=True))))
    return list(zip(names, sizes, strict=True))


def pipeline_files(names: Sequence[str], nodes: int) -> list[list[str]]:
    """Contiguous shares, each with the next share's first file (a shared boundary layer)."""
    shares = [list(names[i * len(names) // nodes:(i + 1) * len(names) // nodes])
              for i in range(nodes)]
    for i in range(nodes - 1):
        if shares[i + 1]:
            shares[i].append(shares[i + 1][0])
    return shares


# ------------------------------------------------------------------------------ processes


@contextlib.contextmanager
def running_hub(lan_ns: str, model: Path, work: Path) -> Iterator[str]:
    """The test hub in its namespace; yields its endpoint."""
    ready = work / "hub.json"
    ready.unlink(missing_ok=True)
    log = (work / "hub.log").open("wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lan_ns, sys.executable, "-m", "orchestrator.simulator.hubd",
         "--host", HUB_ADDRESS, "--repo", f"{REPO}={model}", "--ready-file", str(ready)],
        stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # it hashes the model first
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the hub did not start: {(work / 'hub.log').read_text()}")
            time.sleep(0.2)
        yield str(json.loads(ready.read_text())["endpoint"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class AgentSampler:
    """Peak RSS of each host's agent processes (python under the host, launchd excluded)."""

    def __init__(self, hosts: Sequence[RunningHost]) -> None:
        self.hosts = hosts
        self.peak_process: dict[str, int] = {h.name: 0 for h in hosts}  # kB
        self.peak_sum: dict[str, int] = {h.name: 0 for h in hosts}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AgentSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for host in self.hosts:
                total = 0
                for pid in processes.host_pids(host.root):
                    rss = _agent_rss(pid)
                    total += rss
                    self.peak_process[host.name] = max(self.peak_process[host.name], rss)
                self.peak_sum[host.name] = max(self.peak_sum[host.name], total)


def _agent_rss(pid: int) -> int:
    """VmRSS (kB) of an agent process; 0 for anything else (sshd, shells, launchd)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if not Path(argv[0].decode()).name.startswith("python") or \
                any(b"launchd" in a or b"orch-login" in a for a in argv):
            return 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


# ------------------------------------------------------------------------------ one run


@dataclass
class Run:
    summary: dict[str, Any]
    controller_kb: int
    wall_s: float


def apply(work: Path, hosts: Sequence[RunningHost], endpoint: str,
          files: Mapping[str, list[str]], *, relay: bool = True) -> Run:
    """One real ``orch apply`` (its own process) with these file lists; its summary and RSS."""
    (work / "inventory.yml").write_text(inventory_yaml(hosts))
    cluster = work / "cluster.yml"
    names = ", ".join(h.name for h in hosts)
    cluster.write_text(f"name: syncbench\ninventory: inventory.yml\nmodel:\n  repo: {REPO}\n"
                       f"  endpoint: {endpoint}\nplacement:\n  nodes: [{names}]\n"
                       f"runtime:\n  packages: []\n  sync_port: 47300\n")
    (work / "files.json").write_text(json.dumps(files))
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache"), "HF_TOKEN": "",
           "HOME": str(work), **({} if relay else {"ORCH_BENCH_STORE_AND_FORWARD": "1"})}
    out = (work / "apply.out").open("wb")
    err = (work / "apply.err").open("wb")
    started = time.monotonic()
    with out, err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sync_apply", str(cluster), str(work / "files.json"),
             str(hosts[0].known_hosts_file)],
            stdout=out, stderr=err, env=env, cwd=Path(__file__).parents[1])
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    text = (work / "apply.out").read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"apply exited {proc.returncode}:\n{text[-3000:]}\n"
                           f"{(work / 'apply.err').read_text()[-3000:]}")
    summary = json.loads(text)["outcome"]["transfers"]
    return Run(summary, usage.ru_maxrss, wall)


def wipe(hosts: Sequence[RunningHost]) -> None:
    for host in hosts:
        shutil.rmtree(host.home / ".orch" / "models", ignore_errors=True)


def scenario(name: str, work: Path, hosts: Sequence[RunningHost], endpoint: str,
             model: Sequence[tuple[str, int]], *, relay: bool = True) -> dict[str, Any]:
    """Run one scenario; its row of figures."""
    names = [n for n, _ in model]
    size = dict(model)
    wipe(hosts)
    held: dict[str, list[str]] = {h.name: [] for h in hosts}
    if name == "pipeline":
        files = dict(zip([h.name for h in hosts], pipeline_files(names, len(hosts)),
                         strict=True))
    elif name == "tensor":
        files = {h.name: list(names) for h in hosts}
    else:  # join: the others converge first (not timed), then the last host joins
        apply(work, hosts[:-1], endpoint, {h.name: list(names) for h in hosts[:-1]})
        held = {h.name: list(names) for h in hosts[:-1]} | {hosts[-1].name: []}
        files = {h.name: list(names) for h in hosts}
    with AgentSampler(hosts) as sampler:
        run = apply(work, hosts, endpoint, files, relay=relay)
    s = run.summary
    held_anywhere = set().union(*map(set, held.values()))
    needed = set().union(*map(set, files.values()))
    unheld = sum(size[f] for f in needed - held_anywhere)
    lacked = {h: sum(size[f] for f in set(fs) - set(held[h])) for h, fs in files.items()}
    sent = {h: int(b) for h, b in s["served"].items()}
    hub_rate, lan_rate = HUB_MBIT * 1e6 / 8, LAN_MBIT * 1e6 / 8
    terms = {"hub": unheld / hub_rate,
             "receive": max(lacked.values()) / lan_rate,
             "send": max(sent.values(), default=0) / lan_rate}
    bound = max(terms.values())
    took = float(s["finished_at"]) - float(s["started_at"])
    model_bytes = sum(size.values())
    return {
        "scenario": name if relay else f"{name} (store-and-forward)", "nodes": len(hosts),
        "model_bytes": model_bytes,
        "files": len(names), "seconds": round(took, 2), "apply_seconds": round(run.wall_s, 2),
        "bound_seconds": round(bound, 2), "bound_terms": {k: round(v, 2) for k, v in
                                                          terms.items()},
        "ratio": round(took / bound, 3) if bound else None,
        "hub_bytes": s["bytes"]["hub"], "lan_bytes": s["bytes"]["lan"],
        "hub_per_unheld": round(s["bytes"]["hub"] / unheld, 3) if unheld else None,
        "hub_per_model": round(s["bytes"]["hub"] / model_bytes, 3),
        "controller_peak_mb": round(run.controller_kb / 1024, 1),
        "agent_peak_mb": {h: round(kb / 1024, 1) for h, kb in sampler.peak_process.items()},
        "agents_sum_peak_mb": {h: round(kb / 1024, 1) for h, kb in sampler.peak_sum.items()},
        "resumed": s["bytes"]["resumed"], "refetched": s["bytes"]["refetched"],
        "failed": s["failed"],
    }


def row(r: Mapping[str, Any]) -> str:
    hub = "—" if r["hub_per_unheld"] is None else f"{r['hub_per_unheld']:.2f}"
    return (f"| {r['scenario']} | {r['nodes']} | {r['model_bytes'] / 1e9:.2f} GB / "
            f"{r['files']} | {r['seconds']:.1f} s | {r['bound_seconds']:.1f} s | "
            f"**{r['ratio']:.2f}** | {hub} | {r['controller_peak_mb']:.0f} MB | "
            f"{max(r['agent_peak_mb'].values()):.0f} MB | "
            f"{r['resumed'] / 1e6:.0f} / {r['refetched'] / 1e6:.0f} MB |")


HEADER = ("| scenario | N | model / files | sync time | bound | time/bound | Hub / unheld "
          "| controller RSS | agent RSS (max) | resumed / re-fetched |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="3,5", help="comma-separated N (default 3,5)")
    parser.add_argument("--model-gb", type=float, default=2.0)
    parser.add_argument("--file-mb", type=int, default=256)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/orch-sync-bench"),  # noqa: S108
                        help="scratch: hosts, and the generated model (reused between runs)")
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: N=3, 192 MB in files of 64 MB; nothing asserted on time")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--store-and-forward", action="store_true",
                        help="baseline: peers serve only whole files (no relaying)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root (ip netns, tc)")
    nodes = [3] if args.quick else [int(n) for n in args.nodes.split(",")]
    total = int((0.192 if args.quick else args.model_gb) * 1e9)
    file_bytes = (64 if args.quick else args.file_mb) * 1_000_000
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"model-{total}-{file_bytes}"
    model = make_model(model_dir, total, file_bytes)
    lan = Lan()
    rows: list[dict[str, Any]] = []
    try:
        members = lan.up([("hub", [HUB_ADDRESS], HUB_MBIT, DELAY_MS)]
                         + [(f"n{i + 1}", [node_address(i)], LAN_MBIT, DELAY_MS)
                            for i in range(max(nodes))])
        print(f"LAN up: bridge {BRIDGE_ADDRESS}, Hub {HUB_ADDRESS} at {HUB_MBIT} Mbit/s, "
              f"{max(nodes)} nodes at {LAN_MBIT} Mbit/s, "
              + (f"{DELAY_MS} ms" if NETEM else "no added delay (no sch_netem)"), file=sys.stderr)
        with running_hub(members[0].netns, model_dir, work) as endpoint:
            for n in nodes:
                specs = [HostSpec(f"mac{i + 1}", 192 * GIB, address=node_address(i),
                                  netns=members[i + 1].netns) for i in range(n)]
                hosts = start_hosts(work / f"hosts-{n}", specs)
                try:
                    for name in args.scenarios.split(","):
                        result = scenario(name, work, hosts, endpoint, model,
                                          relay=not args.store_and_forward)
                        rows.append(result)
                        print(json.dumps(result), file=sys.stderr)
                finally:
                    wipe(hosts)
                    stop_hosts(hosts)
    finally:
        lan.down()
    print(HEADER)
    for r in rows:
        print(row(r))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    failed = [r for r in rows if r["failed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
