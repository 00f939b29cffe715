"""The ring hostfile that ``MLX_HOSTFILE`` points at.

Format (mlx ``python/mlx/_distributed_utils/launch.py``, ``launch_ring``): a JSON list with one
entry per rank, in rank order; entry r lists the ``"ip:port"`` addresses rank r listens on —
one here, since orch gives each node one ring IP::

    [["10.0.0.1:47100"], ["10.0.0.2:47101"], ["10.0.0.3:47102"]]

Every rank gets the same file. A one-node service has no hostfile at all: with a one-entry
file, ``mx.distributed.init()`` waits forever (checked with mlx 0.32.4). The ring needs IP
literals (it does not resolve names), and only IPv4 ones are rendered: mlx's ``"ip:port"``
strings have no bracket syntax for IPv6. The rendering is deterministic (same input, same
bytes) so the file resource stays idempotent.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence

Endpoint = tuple[str, int]  # (ring IPv4 address, port)


def render_hostfile(endpoints: Sequence[Endpoint]) -> str:
    """The hostfile text for ``endpoints`` in rank order (rank 0 first).

    Raises ValueError on anything mlx would misread: a name instead of an IP, a port out of
    range, two ranks on one address. Config validation should have caught these first.
    """
    if len(endpoints) < 2:
        # mlx's ring waits forever on a one-entry hostfile (mlx's launcher writes none then).
        raise ValueError(f"a ring needs at least two ranks, got {len(endpoints)}; a single "
                         "node runs without MLX_HOSTFILE")
    entries = [_address(ip, port) for ip, port in endpoints]
    seen: set[str] = set()
    for rank, address in enumerate(entries):
        if address in seen:
            raise ValueError(f"rank {rank} repeats ring address {address}")
        seen.add(address)
    return json.dumps([[address] for address in entries]) + "\n"


def parse_hostfile(text: str) -> tuple[Endpoint, ...]:
    """The endpoints of a rendered hostfile, rank order; ValueError when it is not one."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"hostfile is not JSON: {exc}") from exc
    if not isinstance(raw, list) or not raw:
        raise ValueError("hostfile must be a non-empty JSON list")
    endpoints = []
    for rank, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 1 and isinstance(entry[0], str)):
            raise ValueError(f"rank {rank}: expected one \"ip:port\" string, got {entry!r}")
        ip, _, port = entry[0].rpartition(":")
        if not port.isdigit():
            raise ValueError(f"rank {rank}: {entry[0]!r} has no port")
        _address(ip, int(port))
        endpoints.append((ip, int(port)))
    return tuple(endpoints)


def _address(ip: str, port: int) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise ValueError(f"ring address {ip!r} is not an IP address (the ring needs IPs, "
                         "not host names)") from exc
    if address.version != 4:
        raise ValueError(f"ring address {ip} is IPv6; mlx's ring hostfile takes IPv4")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"ring port {port!r} is not in 1..65535")
    return f"{address}:{port}"
