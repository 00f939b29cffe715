"""Which split serves the model: the pipeline (`choose.place`) or the tensor split (`tensor`).

``placement.parallelism`` asks for one (``pipeline``, ``tensor``) or lets orch choose
(``auto``). The result is one `Placement` whose ``parallelism`` says which it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from orchestrator.model.meta import ModelMeta
from orchestrator.placement.choose import Placement, place
from orchestrator.placement.policy import NodeSpec, PlacementPolicy
from orchestrator.placement.tensor import place_tensor

Requested = Literal["auto", "pipeline", "tensor"]


def place_model(meta: ModelMeta, inventory: Sequence[NodeSpec], policy: PlacementPolicy,
                requested: Sequence[str] | None = None,
                parallelism: Requested = "auto") -> Placement:
    """Place ``meta`` with the requested parallelism; ``auto`` picks pipeline for now."""
    if parallelism == "tensor":
        return place_tensor(meta, inventory, policy, requested)
    return place(meta, inventory, policy, requested)
