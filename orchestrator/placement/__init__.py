"""Placement: will the model fit, on which Macs, how many layers each — before touching a host.

Data flows one way: `load_model_meta` measures the model through `orchestrator.model` (config,
index, safetensors headers; local or Hub, never the weights), `plan_placement` chooses nodes
and an exact memory-weighted layer split, and `render_table` / `to_json` show the result.
`require_fit` turns a placement that does not fit into a `PlacementError` carrying the numbers.

Modules: `policy` (the memory model and its calibrated defaults), `chips` (bandwidth
table), `split` (the exact solver), `choose` (node choice, refusals), `estimate` (the guide's
formula and the decode-speed bound), `render` (views), `adapter` (cluster file → inputs),
`intent` (placement and the manifest together: what the cluster asks for).
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
