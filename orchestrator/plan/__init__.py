"""The plan: what apply would change on each host, as plain data.

Modules: `desired` (the cluster's intent as concrete resources per host), `core` (`diff_host`:
desired resources against facts; `Plan`, `HostPlan` and their JSON), the cluster-wide passes,
each a function from a plan to a plan — `sources` (which host each model-file copy comes from)
and `ring` (the ranks of a ring restart together) — and `build` (`plan_cluster`: the one place
they are put together, in order).
"""

from orchestrator.plan.core import (
    PLAN_FORMAT,
    RECORD_ID,
    HostPlan,
    Plan,
    diff_host,
    fact_request,
    record_for,
)

__all__ = ["PLAN_FORMAT", "RECORD_ID", "HostPlan", "Plan", "diff_host", "fact_request",
           "record_for"]
