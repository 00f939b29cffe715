"""The status file each worker writes (``worker-status-<rank>.json``), as a typed value.

``mlx_worker.py`` rewrites it atomically at each step, so a reader sees a whole file or the
previous one. The agent reads it on the node and the controller parses it here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class WorkerState(Enum):
    """Where a rank is; a healthy rank ends in SERVING, a refused one in FAILED."""

    VERIFYING = "verifying"  # checking its files' sha256
    RING = "ring"  # waiting for its peers to form the ring
    LOADING = "loading"  # ring formed; mlx-lm is loading its layers
    SERVING = "serving"  # its layers are loaded (rank 0 also answers HTTP)
    FAILED = "failed"  # refused to start or failed to load; see error


@dataclass(frozen=True)
class WorkerStatus:
    rank: int
    world_size: int
    split: tuple[int, ...]
    layers: tuple[int, int]  # [start, end) — rank 0 holds the last layers
    state: WorkerState
    pid: int
    started_at: float
    updated_at: float
    error: str | None
    param_bytes: int | None  # bytes of parameters held, once loaded

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


def parse_status(text: str) -> WorkerStatus:
    """Parse a status file; ValueError names the first field that is missing or wrong."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"worker status is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("worker status must be a JSON object")
    layers = _field(raw, "layers", list)
    if len(layers) != 2 or not all(_is_int(n) for n in layers):
        raise ValueError(f"worker status: layers must be [start, end], got {layers!r}")
    split = _field(raw, "split", list)
    if not all(_is_int(n) for n in split):
        raise ValueError(f"worker status: split must be integers, got {split!r}")
    try:
        state = WorkerState(_field(raw, "state", str))
    except ValueError as exc:
        raise ValueError(f"worker status: unknown state {raw['state']!r}") from exc
    error = raw.get("error")
    param_bytes = raw.get("param_bytes")
    if error is not None and not isinstance(error, str):
        raise ValueError("worker status: error must be a string")
    if param_bytes is not None and not _is_int(param_bytes):
        raise ValueError("worker status: param_bytes must be an integer")
    return WorkerStatus(
        rank=_field(raw, "rank", int),
        world_size=_field(raw, "world_size", int),
        split=tuple(split),
        layers=(layers[0], layers[1]),
        state=state,
        pid=_field(raw, "pid", int),
        started_at=float(_field(raw, "started_at", (int, float))),
        updated_at=float(_field(raw, "updated_at", (int, float))),
        error=error,
        param_bytes=param_bytes,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(raw: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"worker status: {key!r} is missing or not {kind}")
    return value
