"""GPU wired memory: raise ``iogpu.wired_limit_mb`` only on nodes whose share needs it.

macOS lets the GPU wire (lock) only part of unified memory unless ``iogpu.wired_limit_mb`` says
otherwise (0 = the kernel's default). The default is what Metal reports as a device's
``recommendedMaxWorkingSetSize``; public measurements put it at about two thirds of RAM on Macs
with up to 36 GB and about three quarters above:

* 16 GB M3: 11.84 GB GPU-available (AlexsJones/llmfit#754), ≈ 0.69 of 16 GiB;
* 64 GB M1/M2 Max: models above ~47–48 GB fail to load on the GPU (ggml-org/llama.cpp#1870),
  ≈ 0.75 of 64 GB (the often-quoted ~48 GB on 64 GB Macs);
* "75% of total RAM" as the recommended max working set on large Macs (gpustack/gpustack#1375);
* macOS 26 on 128 GiB (M5 Max, M3 Ultra): 107.52 GiB stock, i.e. 0.84 (antirez/ds4#893) —
  newer macOS allows more, so the two-thirds / three-quarters rule is a lower bound.

orch uses that lower bound: when a node's share (weights + overhead + KV cache, from placement)
exceeds it, orch sets the limit to the node's usable memory (RAM − reserve) and persists it with
a root LaunchDaemon (`Sysctl`). A node whose share fits the conservative default is left alone,
so a small model never needs sudo. The sysctl name is macOS 14's (``iogpu.wired_limit_mb``);
macOS 13 used ``debug.iogpu.wired_limit`` and is not supported.
"""

from __future__ import annotations

from orchestrator.placement.choose import NodePlacement
from orchestrator.resources.sysctl import Sysctl

__all__ = ["SYSCTL", "WIRED_LIMIT_LABEL", "default_wired_limit_mb", "wired_limit"]

SYSCTL = "iogpu.wired_limit_mb"
WIRED_LIMIT_LABEL = "com.orch.wired-limit"  # one per Mac: the limit is machine-wide
MIB = 2**20
GIB = 2**30
SMALL_MAC_BYTES = 36 * GIB  # at or below: about 2/3 of RAM is wireable by default


def default_wired_limit_mb(memory_bytes: int) -> int:
    """The conservative default GPU wired limit of a Mac with this much RAM, in MiB."""
    fraction_num, fraction_den = (2, 3) if memory_bytes <= SMALL_MAC_BYTES else (3, 4)
    return memory_bytes * fraction_num // fraction_den // MIB


def needed_mb(node: NodePlacement) -> int:
    """What the node's share must be able to wire, in MiB (rounded up)."""
    return -(-node.bytes // MIB)


def wired_limit(node: NodePlacement, runtime_root: str = "~/.orch") -> Sysctl | None:
    """The `Sysctl` raising the node's wired limit, or None when the default already fits.

    `runtime_root` is orch's directory on the node (`runtime.dir`), where the daemon's plist
    is staged before root installs it."""
    if needed_mb(node) <= default_wired_limit_mb(node.memory_bytes):
        return None
    return Sysctl(SYSCTL, node.wired_limit_mb, WIRED_LIMIT_LABEL,
                  staging_dir=f"{runtime_root}/system")
