"""How much the one-call facts design saves: `orch plan` vs one SSH command per fact.

Three simulated Macs (real sshd), each with N managed files already converged. The baseline
asks each host about each file with its own command (`stat` + `sha256sum`, what a tool that
fetches facts lazily per resource does); orch asks for everything in one agent call. Both run
in this process over the same kind of asyncssh connections, so the ratio is what matters.

    .venv/bin/python -m bench.plan_round_trips [--files 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from orchestrator.executor import Connection, SSHExecutor, SSHOptions, Target
from orchestrator.facts import parse_facts
from orchestrator.log import configure
from orchestrator.plan import diff_host, fact_request
from orchestrator.resources.base import Resource
from orchestrator.resources.files import File
from orchestrator.run.apply import apply_host
from orchestrator.simulator.hosts import GIB, HostSpec, running_hosts


async def orch_plan(conns: list[Connection], resources: list[Resource]) -> int:
    async def one(conn: Connection) -> int:
        request = fact_request(resources, "bench")
        facts = parse_facts(conn.name, await conn.agent("facts", request.to_json()), request)
        return len(diff_host("bench", resources, facts).changes)
    return sum(await asyncio.gather(*(one(c) for c in conns)))


async def per_fact(conns: list[Connection], paths: list[str]) -> int:
    async def one(conn: Connection) -> int:
        for path in paths:
            await conn.run(["sh", "-c", 'stat -c %s:%a "$HOME/$1" && sha256sum "$HOME/$1"',
                            "sh", path.removeprefix("~/")])
        return 0
    return sum(await asyncio.gather(*(one(c) for c in conns)))


async def main(files: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, running_hosts(Path(tmp), [
            HostSpec(f"b{i}", 64 * GIB, address=f"127.0.0.{61 + i}") for i in range(3)]) as hosts:
        options = SSHOptions(known_hosts=hosts[0].known_hosts_file)
        executor = SSHExecutor(options)
        conns = [await executor.open(Target(h.name, h.address, h.port, h.user, h.identity_file))
                 for h in hosts]
        resources: list[Resource] = [File(f"~/bench/f{i}.conf", f"value {i}\n" * 50)
                                     for i in range(files)]
        for conn in conns:  # converge first: both sides then read an unchanged tree
            request = fact_request(resources, "bench")
            facts = parse_facts(conn.name, await conn.agent("facts", request.to_json()), request)
            await apply_host(conn, diff_host("bench", resources, facts))
        await orch_plan(conns, resources)  # warm the hash cache, as any converged cluster has
        timings: dict[str, list[float]] = {"orch plan (1 call/host)": [],
                                           "one command per fact": []}
        trips_before = [c.round_trips for c in conns]
        for _ in range(repeat):
            t = time.perf_counter()
            assert await orch_plan(conns, resources) == 0
            timings["orch plan (1 call/host)"].append(time.perf_counter() - t)
        orch_trips = (sum(c.round_trips for c in conns) - sum(trips_before)) / repeat / 3
        trips_before = [c.round_trips for c in conns]
        for _ in range(repeat):
            t = time.perf_counter()
            await per_fact(conns, [r.path for r in resources if isinstance(r, File)])
            timings["one command per fact"].append(time.perf_counter() - t)
        base_trips = (sum(c.round_trips for c in conns) - sum(trips_before)) / repeat / 3
        for conn in conns:
            await conn.close()
    orch = statistics.median(timings["orch plan (1 call/host)"])
    base = statistics.median(timings["one command per fact"])
    print(f"{files} files x 3 hosts, median of {repeat}:")
    print(f"  orch plan:            {orch:7.3f} s, {orch_trips:.0f} round trips/host")
    print(f"  one command per fact: {base:7.3f} s, {base_trips:.0f} round trips/host")
    print(f"  ratio: orch plan is {base / orch:.1f}x faster")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    configure(-1, "console")  # the figures, not the executor's debug events
    asyncio.run(main(args.files, args.repeat))
