"""Estimates, labelled as such: the guide's size formula and a decode-speed bound.

Both are here, apart from the exact machinery, so nothing exact ever quietly depends on them.

Size, when only a parameter count is known (the guide's formula)::

    bytes ≈ params × bits / 8 × (1 + O),   O ≈ 0.2

671e9 × 4/8 × 1.2 ≈ 402.6 GB for DeepSeek-R1-4bit, whose files are 419.75 GB: the formula is
for planning before a model is chosen; with the model's headers orch uses exact bytes.

Decode speed, for one sequence through the pipeline::

    s/token ≈ Σ_r A_r / BW_r  +  max_r S / BW_r  +  2 (N − 1) × hop_latency

A_r are the bytes rank r reads per token in its layers (for MoE layers only the routed share,
top_k / n_experts of the expert weights), S the tensors every rank reads (final norm and
lm_head: each rank computes the head on the gathered state, concurrently), BW_r the chip's
memory bandwidth (`chips.py`), and the 2 (N − 1) hops are the activations passed down the ring
plus the all-gather that follows. Peak bandwidth is never reached, so the estimate is an upper
bound on tokens per second, not a promise.

Decode speed for the tensor split (every rank runs every layer on its 1/N slice)::

    s/token ≈ max_r A_r / BW_r  +  2 L × all_reduce(M)
    all_reduce(M) = 2 (N − 1) × (latency + M / (N × link_bandwidth))

A_r are the bytes rank r reads per token — its slice of the sharded tensors plus the whole of
the replicated ones (`shard.tensor_split`) — read concurrently by all ranks; L layers each end
two all-reduces (attention's ``o_proj`` and the MLP's ``down_proj`` / the MoE's sum) of one
token's activations, M = hidden_size × 2 bytes (bf16), done as a ring all-reduce: 2 (N − 1)
steps, each one message of M / N bytes. Latency and bandwidth are the link's
(`policy.LINKS`: ethernet, thunderbolt, rdma), so the tensor split wins on RDMA and loses on
TCP, where 2 L × 2 (N − 1) message latencies dominate. Also an upper bound, and an estimate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.model.meta import Footprint, ModelMeta
from orchestrator.placement.policy import GB, GUIDE_OVERHEAD, Link

DECODE_FORMULA = "s/token ≈ Σ active_bytes_r / bandwidth_r + max_r head_bytes / bandwidth_r " \
                 "+ 2 (N − 1) × hop_latency"
TENSOR_DECODE_FORMULA = ("s/token ≈ max_r active_bytes_r / bandwidth_r + 2 layers × "
                         "2 (N − 1) × (link_latency + activation_bytes / (N × link_bandwidth))")
ACTIVATION_BYTES = 2  # bf16 activations, what the all-reduces carry


def guide_estimate_bytes(num_parameters: float, bits: float,
                         overhead: float = GUIDE_OVERHEAD) -> int:
    """The guide's ``params × bits/8 × (1 + O)``, in bytes."""
    return round(num_parameters * bits / 8 * (1 + overhead))


def estimated_meta(num_parameters: float, bits: float, num_layers: int,
                   source: str = "estimate") -> ModelMeta:
    """A `ModelMeta` for a model known only by its size: ``params × bits/8``, equal layers.

    This is the one place layers are assumed equal, and the result says so (``estimated``).
    The guide's (1 + O) is not folded in here: place it with ``overhead=GUIDE_OVERHEAD`` so the
    policy applies it once.
    """
    if num_parameters <= 0 or bits <= 0 or num_layers <= 0:
        raise ValueError("parameters, bits and layers must be positive")
    total = round(num_parameters * bits / 8)
    per_layer = total // num_layers
    sizes = [per_layer] * num_layers
    sizes[-1] += total - per_layer * num_layers
    return ModelMeta(
        source=source, model_type=None, num_layers=num_layers,
        layers=tuple(Footprint(s, s, 0) for s in sizes), shared=Footprint(),
        unused_bytes=0, files=(), num_parameters=round(num_parameters),
        bits=round(bits), estimated=True)


@dataclass(frozen=True)
class DecodeEstimate:
    """An upper bound on single-stream decode speed; see the module doc for the formula."""

    seconds_per_token: float
    rank_seconds: tuple[float, ...]  # per rank: its layers' active bytes / its bandwidth
    head_seconds: float
    hop_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else float("inf")


def decode_estimate(meta: ModelMeta, ranges: Sequence[tuple[int, int]],
                    bandwidths_gbps: Sequence[float | None],
                    hop_latency_s: float) -> DecodeEstimate | None:
    """The estimate for a placement; None when some node's chip bandwidth is unknown."""
    if not ranges or any(bw is None or bw <= 0 for bw in bandwidths_gbps):
        return None
    rates = [bw * GB for bw in bandwidths_gbps if bw is not None]
    rank_seconds = tuple(
        sum(meta.layers[n].active for n in range(start, end)) / rate
        for (start, end), rate in zip(ranges, rates, strict=True))
    head_seconds = max(meta.shared.active / rate for rate in rates)
    hop_seconds = 2 * (len(ranges) - 1) * hop_latency_s
    return DecodeEstimate(
        seconds_per_token=sum(rank_seconds) + head_seconds + hop_seconds,
        rank_seconds=rank_seconds, head_seconds=head_seconds, hop_seconds=hop_seconds)


def tensor_decode_estimate(num_layers: int, hidden_size: int | None,
                           rank_active: Sequence[int],
                           bandwidths_gbps: Sequence[float | None],
                           link: Link) -> DecodeEstimate | None:
    """The tensor split's estimate; None when a chip's bandwidth or the hidden size is unknown."""
    if (not rank_active or hidden_size is None
            or any(bw is None or bw <= 0 for bw in bandwidths_gbps)):
        return None
    rates = [bw * GB for bw in bandwidths_gbps if bw is not None]
    rank_seconds = tuple(a / rate for a, rate in zip(rank_active, rates, strict=True))
    n = len(rank_active)
    message = hidden_size * ACTIVATION_BYTES
    all_reduce = 2 * (n - 1) * (link.latency_s + message / (n * link.bandwidth_bytes_s))
    comm = 2 * num_layers * all_reduce
    return DecodeEstimate(seconds_per_token=max(rank_seconds) + comm,
                          rank_seconds=rank_seconds, head_seconds=0.0, hop_seconds=comm)
