"""How much memory a node has for the model, and how much a share of the model costs it.

    usable(node)        = RAM − reserve(RAM)       (orch sets iogpu.wired_limit_mb to it)
    node_bytes(weights) = weights + ⌈overhead × weights⌉ + kv_cache

where ``weights`` is the node's layers plus the tensors every rank loads (embeddings, final
norm, lm_head). A node fits when ``node_bytes ≤ usable``. All sizes are integer bytes; the
overhead is an exact fraction, so "fits" never depends on float rounding.

Calibration. The defaults are set on what the guide's author actually ran: DeepSeek-R1-4bit
(419.75 GB of weights, 61 layers: 3 dense of 0.36 GB, 58 MoE of 7.2 GB, 1.16 GB on every rank)
served on 2 × Mac Studio M2 Ultra 192 GB + MacBook Pro M4 Max 128 GB. With

* reserve   = RAM / 16, kept within 4..16 GB  (12.9 GB on a 192 GiB Studio, 8.6 GB on a 128 GiB
  MacBook, 4.3 GB on a 64 GiB mini) — macOS, its services and the non-wired rest;
* kv_cache  = 4 GB per node — DeepSeek's MLA cache is 1,152 B per token per layer, so 4 GB holds
  ~150 k tokens of context on a node with 23 layers; a GQA model gets less, set it per cluster;
* overhead  = 0.10 of the node's weights — the low end of the guide's 0.1–0.3. The guide's 0.2
  also covers quantization scales and biases, which exact header bytes already include;

the guide's cluster fits — 476.3 GB required of 515.4 GB usable; split [22, 22, 17], each Studio
at 179.5 of 193.3 GB, the MacBook at 117.3 of 128.8 GB — and the 64 GB Mac mini in the
MacBook's place does not: 476.3 GB required vs 451.0 GB usable, 25.3 GB short. mlx-lm's even
split does not fit the guide's cluster either: it gives the MacBook 20 layers (141.1 GB against
128.8 GB usable), which is why orch computes a memory-weighted split.

GB in this package means 10^9 bytes, as the Hub reports sizes; Apple's "192 GB" of RAM is
192 GiB (hw.memsize 206158430208 = 206.2 GB).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

GB = 10**9
GIB = 2**30
MIB = 2**20

DEFAULT_RESERVE_FRACTION = Fraction(1, 16)
DEFAULT_RESERVE_MIN_GB = 4.0
DEFAULT_RESERVE_MAX_GB = 16.0
DEFAULT_KV_CACHE_GB = 4.0
DEFAULT_OVERHEAD = 0.10
# The guide's O, for the params × bits/8 × (1+O) estimate when only a parameter count is known.
GUIDE_OVERHEAD = 0.20
# Per-hop latency of one ring message (activations are ~14 KB per token for DeepSeek: latency,
# not bandwidth, dominates). TCP over 10 GbE or a Thunderbolt bridge: ~0.1–0.5 ms.
DEFAULT_HOP_LATENCY_S = 0.0005


@dataclass(frozen=True)
class Link:
    """The network between ranks, as the decode estimates see it: one message's latency and
    the bytes per second one rank can send. Defaults are assumptions, not measurements."""

    name: str
    latency_s: float
    bandwidth_bytes_s: float


# `placement.link` defaults (override with link_latency_ms / link_bandwidth_gb_s):
# * ethernet    — MLX's ring backend (TCP) over 10 GbE: 0.5 ms per message, 1.25 GB/s;
# * thunderbolt — the ring backend over IP on a Thunderbolt bridge: 0.25 ms, 2.5 GB/s (TCP
#   through the kernel; the cable's 40–80 Gb/s are not what a socket sees);
# * rdma        — the jaccl backends, RDMA over Thunderbolt 5 (macOS ≥ 26.2): 0.02 ms, 8 GB/s
#   (an order of magnitude below TCP's latency, Apple's TN3205 and MLX's docs).
LINKS: dict[str, Link] = {
    "ethernet": Link("ethernet", DEFAULT_HOP_LATENCY_S, 1.25 * 10**9),
    "thunderbolt": Link("thunderbolt", 0.00025, 2.5 * 10**9),
    "rdma": Link("rdma", 0.00002, 8 * 10**9),
}
DEFAULT_LINK = "ethernet"


@dataclass(frozen=True)
class NodeSpec:
    """A Mac as placement sees it: a name, its RAM, its chip, whether it is rolled out."""

    name: str
    memory_bytes: int
    chip: str | None = None
    drained: bool = False


@dataclass(frozen=True)
class PlacementPolicy:
    """The knobs of the memory model; `None` reserve means "by RAM size" (see module doc)."""

    reserve_bytes: int | None = None
    kv_cache_bytes: int = int(DEFAULT_KV_CACHE_GB * GB)
    overhead: Fraction = Fraction(str(DEFAULT_OVERHEAD))
    hop_latency_s: float = DEFAULT_HOP_LATENCY_S
    link: Link = LINKS[DEFAULT_LINK]  # hop_latency_s is its latency when built from settings

    @classmethod
    def from_settings(cls, reserve_gb: float | None = None, overhead: float | None = None,
                      kv_cache_gb: float | None = None, link: str | None = None,
                      link_latency_ms: float | None = None,
                      link_bandwidth_gb_s: float | None = None) -> PlacementPolicy:
        """Build from the cluster file's `placement:` keys; None keeps the calibrated default."""
        base = LINKS[link or DEFAULT_LINK]
        chosen = Link(base.name,
                      base.latency_s if link_latency_ms is None else link_latency_ms / 1000,
                      base.bandwidth_bytes_s if link_bandwidth_gb_s is None
                      else link_bandwidth_gb_s * GB)
        return cls(
            reserve_bytes=None if reserve_gb is None else round(reserve_gb * GB),
            kv_cache_bytes=round((DEFAULT_KV_CACHE_GB if kv_cache_gb is None else kv_cache_gb)
                                 * GB),
            overhead=Fraction(str(DEFAULT_OVERHEAD if overhead is None else overhead)),
            hop_latency_s=chosen.latency_s, link=chosen,
        )

    def reserve(self, memory_bytes: int) -> int:
        """Memory left to macOS on a node with this much RAM."""
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        by_size = int(memory_bytes * DEFAULT_RESERVE_FRACTION)
        return min(max(by_size, int(DEFAULT_RESERVE_MIN_GB * GB)),
                   int(DEFAULT_RESERVE_MAX_GB * GB))

    def usable(self, memory_bytes: int) -> int:
        """Memory the model may use on a node: RAM − reserve, never negative."""
        return max(0, memory_bytes - self.reserve(memory_bytes))

    def node_bytes(self, weight_bytes: int) -> int:
        """What holding ``weight_bytes`` of weights costs a node, KV cache and overhead included."""
        return weight_bytes + self.overhead_bytes(weight_bytes) + self.kv_cache_bytes

    def overhead_bytes(self, weight_bytes: int) -> int:
        """⌈overhead × weights⌉, exactly."""
        return -(-weight_bytes * self.overhead.numerator // self.overhead.denominator)

    def max_weight_bytes(self, budget: int) -> int:
        """The most weight bytes a node with ``budget`` bytes can hold; -1 if not even none.

        Exact inverse of `node_bytes`: for integer w, w + ⌈w·n/d⌉ = ⌈w·(d+n)/d⌉, which is
        ≤ R = budget − kv_cache exactly when w ≤ R·d/(d+n).
        """
        room = budget - self.kv_cache_bytes
        if room < 0:
            return -1
        n, d = self.overhead.numerator, self.overhead.denominator
        return room * d // (d + n)


def wired_limit_mb(usable_bytes: int) -> int:
    """The ``iogpu.wired_limit_mb`` value that lets the GPU wire a node's usable memory."""
    return usable_bytes // MIB
