"""Placement: will the model fit, on which Macs, how split — before touching a host.

Data flows one way: `load_model_meta` measures the model through `orchestrator.model` (config,
index, safetensors headers; local or Hub, never the weights), `plan_placement` computes the
pipeline split (nodes and an exact memory-weighted layer split) and the tensor split (exact
bytes per rank), picks one by ``placement.parallelism``, and `render_table` / `to_json` show
both. `require_fit` turns a placement that does not fit into a `PlacementError` with numbers.

Modules: `policy` (the memory model, its calibrated defaults, the link), `chips` (bandwidth
table), `split` (the exact solver), `choose` (pipeline node choice, refusals), `shard`
(mlx-lm's ``shard()`` rule over the headers), `tensor` (the tensor split), `parallel` (which
split), `estimate` (the guide's formula and both decode-speed bounds), `render` (views),
`adapter` (cluster file → inputs), `intent` (placement and the manifest together).
"""

from orchestrator.placement.adapter import (
    load_model_meta,
    nodes_from_cluster,
    plan_placement,
    policy_from_cluster,
)
from orchestrator.placement.chips import bandwidth_gbps, normalize_chip
from orchestrator.placement.choose import (
    NodePlacement,
    Parallelism,
    Placement,
    place,
    refusal_message,
    require_fit,
)
from orchestrator.placement.estimate import (
    DecodeEstimate,
    decode_estimate,
    estimated_meta,
    guide_estimate_bytes,
)
from orchestrator.placement.parallel import Requested, place_model
from orchestrator.placement.policy import (
    DEFAULT_KV_CACHE_GB,
    DEFAULT_OVERHEAD,
    DEFAULT_RESERVE_FRACTION,
    DEFAULT_RESERVE_MAX_GB,
    DEFAULT_RESERVE_MIN_GB,
    GB,
    GUIDE_OVERHEAD,
    NodeSpec,
    PlacementPolicy,
    wired_limit_mb,
)
from orchestrator.placement.render import render_table, to_json
from orchestrator.placement.split import (
    SplitProblem,
    SplitResult,
    even_split,
    has_split,
    layer_ranges,
    solve,
)
from orchestrator.placement.tensor import place_tensor, tensor_rank_bytes

__all__ = [
    "DEFAULT_KV_CACHE_GB",
    "DEFAULT_OVERHEAD",
    "DEFAULT_RESERVE_FRACTION",
    "DEFAULT_RESERVE_MAX_GB",
    "DEFAULT_RESERVE_MIN_GB",
    "GB",
    "GUIDE_OVERHEAD",
    "DecodeEstimate",
    "NodePlacement",
    "NodeSpec",
    "Parallelism",
    "Placement",
    "PlacementPolicy",
    "Requested",
    "SplitProblem",
    "SplitResult",
    "bandwidth_gbps",
    "decode_estimate",
    "estimated_meta",
    "even_split",
    "guide_estimate_bytes",
    "has_split",
    "layer_ranges",
    "load_model_meta",
    "nodes_from_cluster",
    "normalize_chip",
    "place",
    "place_model",
    "place_tensor",
    "plan_placement",
    "policy_from_cluster",
    "refusal_message",
    "render_table",
    "require_fit",
    "solve",
    "tensor_rank_bytes",
    "to_json",
    "wired_limit_mb",
]
