"""Which split serves the model: the pipeline (`choose.place`) or the tensor split (`tensor`).

Both are always computed, so the views can show them side by side. ``placement.parallelism``
asks for one (``pipeline``, ``tensor``) or lets orch choose (``auto``): the tensor split when
it fits and its decode estimate is faster (or the pipeline does not fit), else the pipeline.
When neither fits, the pipeline's refusal is the one reported first (its suggestions are the
useful ones). The result is the chosen `Placement`, carrying the other as ``alternative`` and
the reason, with numbers, as ``reason``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

from orchestrator.model.meta import ModelMeta
from orchestrator.placement.choose import Placement, place
from orchestrator.placement.policy import NodeSpec, PlacementPolicy
from orchestrator.placement.tensor import place_tensor

Requested = Literal["auto", "pipeline", "tensor"]


def place_model(meta: ModelMeta, inventory: Sequence[NodeSpec], policy: PlacementPolicy,
                requested: Sequence[str] | None = None,
                parallelism: Requested = "auto") -> Placement:
    """Place ``meta`` both ways and pick one as ``parallelism`` asks; pure, like `place`."""
    pipeline = place(meta, inventory, policy, requested)
    tensor = place_tensor(meta, inventory, policy, requested)
    if parallelism != "auto":
        chosen, other = (tensor, pipeline) if parallelism == "tensor" else (pipeline, tensor)
        if other.fits and not chosen.fits:
            chosen = replace(chosen, suggestions=(
                *chosen.suggestions, f"placement.parallelism: {other.parallelism} (or auto): "
                                     f"the {other.parallelism} split fits"))
            return _pick(chosen, other, f"placement.parallelism is {parallelism}; the "
                                        f"{other.parallelism} split would fit")
        return _pick(chosen, other, f"placement.parallelism is {parallelism}")
    if not tensor.fits:
        why = "; ".join(tensor.problems) or "tensor does not fit"
        return _pick(pipeline, tensor, why)
    if not pipeline.fits:
        return _pick(tensor, pipeline, "the pipeline does not fit")
    if tensor.decode is None or pipeline.decode is None:
        return _pick(pipeline, tensor, "the decode estimates need every chip's memory "
                                       "bandwidth (set `chip` in the inventory)")
    t, p = tensor.decode.tokens_per_second, pipeline.decode.tokens_per_second
    if t > p:
        return _pick(tensor, pipeline, f"estimated ≤ {t:.1f} tokens/s on "
                                       f"{len(tensor.nodes)} ranks vs the pipeline's ≤ {p:.1f}")
    return _pick(pipeline, tensor, f"estimated ≤ {p:.1f} tokens/s vs tensor's "
                                   f"≤ {t:.1f} on {len(tensor.nodes)} ranks "
                                   f"({policy.link.name} link)")


def _pick(chosen: Placement, other: Placement, reason: str) -> Placement:
    return replace(chosen, alternative=other, reason=reason)
