"""The MLX worker each node runs, and the controller-side pieces that start and check it.

- ``mlx_worker.py`` — the node-side script (stdlib + mlx + mlx_lm only); orch copies it to each
  node like a rendered config. Never imported by the controller: it is read as a file.
- `hostfile` — the ring hostfile mlx reads from ``MLX_HOSTFILE``.
- `status` — the status file each worker writes, parsed into a typed value.
- `health` — readiness: every rank serving, the ring of the right size, rank 0 answering a
  real chat completion.
"""

from __future__ import annotations

from pathlib import Path

WORKER_SCRIPT = Path(__file__).with_name("mlx_worker.py")


def worker_script() -> bytes:
    """The bytes orch installs on each node as the worker entry point."""
    return WORKER_SCRIPT.read_bytes()


__all__ = ["WORKER_SCRIPT", "worker_script"]
