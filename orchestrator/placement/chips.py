"""Unified-memory bandwidth of Apple-silicon chips, in GB/s (10^9 bytes per second).

Decoding one token reads every active weight once, so memory bandwidth — not compute — bounds
tokens per second on these machines. Placement uses it to break ties between nodes with equal
headroom and to estimate decode speed.

Values are Apple's published specifications. Where one chip name covers two bins with different
bandwidth, the bin is told apart by RAM, because Apple sells the larger memory sizes only with
the faster bin:

========== ======== ===============================================================
chip        GB/s     note
========== ======== ===============================================================
M1           68.25
M1 Pro      200
M1 Max      400
M1 Ultra    800
M2          100
M2 Pro      200
M2 Max      400
M2 Ultra    800
M3          100
M3 Pro      150
M3 Max      300     14-core CPU bin, sold with 36 GB at most
M3 Max      400     16-core CPU bin: 48, 64 or 128 GB
M3 Ultra    819
M4          120
M4 Pro      273
M4 Max      410     14-core CPU bin, sold with 36 GB at most
M4 Max      546     16-core CPU bin: 48, 64 or 128 GB
========== ======== ===============================================================
"""

from __future__ import annotations

import re

GIB = 2**30

# name -> ((largest RAM of the slower bin in GiB, its GB/s) or None, GB/s)
_TABLE: dict[str, tuple[tuple[int, float] | None, float]] = {
    "M1": (None, 68.25),
    "M1 Pro": (None, 200.0),
    "M1 Max": (None, 400.0),
    "M1 Ultra": (None, 800.0),
    "M2": (None, 100.0),
    "M2 Pro": (None, 200.0),
    "M2 Max": (None, 400.0),
    "M2 Ultra": (None, 800.0),
    "M3": (None, 100.0),
    "M3 Pro": (None, 150.0),
    "M3 Max": ((36, 300.0), 400.0),
    "M3 Ultra": (None, 819.0),
    "M4": (None, 120.0),
    "M4 Pro": (None, 273.0),
    "M4 Max": ((36, 410.0), 546.0),
}

_NAME = re.compile(r"^(?:apple\s+)?m\s*([1-9])(?:[\s_-]*(pro|max|ultra))?$", re.IGNORECASE)


def normalize_chip(chip: str | None) -> str | None:
    """"Apple M2 Ultra", "m2-ultra", "M2Ultra" -> "M2 Ultra"; None if it is not an M chip."""
    if not chip:
        return None
    match = _NAME.match(chip.strip())
    if not match:
        return None
    family = f"M{match.group(1)}"
    tier = match.group(2)
    return f"{family} {tier.capitalize()}" if tier else family


def bandwidth_gbps(chip: str | None, memory_bytes: int | None = None) -> float | None:
    """The chip's memory bandwidth in GB/s, or None when the chip is unknown.

    ``memory_bytes`` picks the bin for chips sold in two (M3 Max, M4 Max); without it the
    faster bin is assumed, as large-memory cluster nodes are.
    """
    name = normalize_chip(chip)
    if name is None or name not in _TABLE:
        return None
    slow_bin, fast = _TABLE[name]
    if slow_bin is not None and memory_bytes is not None:
        max_gib, slow = slow_bin
        if memory_bytes <= max_gib * GIB:
            return slow
    return fast


def known_chips() -> tuple[str, ...]:
    """The chip names the table knows, for messages."""
    return tuple(_TABLE)
