"""Real MLX ranks (CPU ring, 127.0.0.71-73, free ports) with rank 0 the last to be ready: with the
worker's rendezvous rank 2's first connect (to rank 0) is never refused; mlx alone makes rank 2
back off for a second or more (FACTS.md), which a ring restart paid about every other time.
It spawns processes and binds loopback addresses: run it under the network lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.simulator.processes import free_port
from orchestrator.worker.hostfile import render_hostfile

IPS = ("127.0.0.71", "127.0.0.72", "127.0.0.73")
RANK_0_LATE = 0.5  # seconds rank 0 waits once the others are ready (in mlx's connect or accept)

RANK_SCRIPT = """
import json, os, sys, time
import mlx.core as mx
from orchestrator.worker import mlx_worker
endpoints = mlx_worker.hostfile_endpoints(os.environ["MLX_HOSTFILE"])
rank = int(os.environ["MLX_RANK"])
flags = sys.argv[3]
if rank == 0:  # the last: once the others have announced they are ready, and a moment more
    while len(os.listdir(flags)) < len(endpoints) - 1:
        time.sleep(0.01)
    time.sleep(float(sys.argv[2]))
ready_at = time.monotonic()
if rank > 0:
    open(os.path.join(flags, str(rank)), "w").close()
if sys.argv[1] != "mlx alone":
    mlx_worker.rendezvous(mlx_worker.parse_endpoint(sys.argv[1]), endpoints, rank)
group = mlx_worker.init_ring(len(endpoints), rank)
total = mx.distributed.all_sum(mx.array([rank + 1.0]), group=group).item()  # the ring works
print(json.dumps({"rank": group.rank(), "ready_at": ready_at, "sum": total}))
"""


def form_ring(tmp_path: Path, how: str) -> tuple[list[dict[str, float]], list[str]]:
    """Every rank's report and stderr (mlx's verbose ring log), by rank."""
    hostfile = tmp_path / f"hostfile-{how}.json"
    hostfile.write_text(render_hostfile([(ip, free_port(ip)) for ip in IPS]))
    # rank 0's ring IP, on a port of its own (runtime.rendezvous_port)
    meet = how if how == "mlx alone" else f"{IPS[0]}:{free_port(IPS[0])}"
    flags = tmp_path / f"ready-{how}"
    flags.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, meet, str(RANK_0_LATE),
                               str(flags)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile),
                                   "MLX_RING_VERBOSE": "1"})
             for rank in range(len(IPS))]
    reports, logs = [], []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            reports.append(json.loads(out.strip().splitlines()[-1]))
            logs.append(err)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    return reports, logs


@pytest.mark.parametrize("how", ["rendezvous", "mlx alone"])
def test_the_last_rank_to_be_ready_costs_no_back_off_with_the_rendezvous(
    tmp_path: Path, how: str,
) -> None:
    reports, logs = form_ring(tmp_path, how)
    assert [r["rank"] for r in reports] == [0, 1, 2]
    assert all(r["sum"] == 6 for r in reports), reports
    rank_0_ready = reports[0]["ready_at"]
    assert all(r["ready_at"] < rank_0_ready for r in reports[1:]), "rank 0 was not the last"
    # Rank 2 connects to rank 0 first (the others accept first). Rank 1's later connect to
    # rank 2 can still be refused now and then on one busy machine: rank 2 listens only once
    # its own connect returned, a race inside mlx's init that no start order avoids (between
    # Macs rank 2 wins it by two network round trips).
    if how == "rendezvous":
        assert "Attempt" not in logs[2], logs
    else:  # the control: the same start order without it backs off (so the test can fail)
        assert "Attempt 0 waiting 1000 ms" in logs[2], logs
