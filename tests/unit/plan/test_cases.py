"""Table tests: a cluster file and each host's facts (the agent's JSON) in, the plan JSON out.

As pyinfra's operation tests do, each case in ``cases/`` pins the exact steps a plan holds for
given facts, with no SSH: the same pure path the engine takes (`desired_state`, the strict
`parse_facts` against each host's request, `plan_cluster`). A case file is JSON with exactly
these keys (any other is an error, so a typo cannot silently test nothing):

- ``doc``: what the case shows;
- ``cluster``: the cluster file's text (hosts inline); ``files``: other files it names
  (templates), by name;
- ``facts``: per host, the agent's ``facts`` answer (it must answer that host's request);
- ``plan``: the expected ``Plan.to_json()``, without ``cluster_file``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import load_cluster
from orchestrator.facts import HostFacts, parse_facts
from orchestrator.placement.intent import Intent
from orchestrator.plan.build import host_requests, plan_cluster
from orchestrator.plan.desired import desired_state, serving_nodes

CASES = sorted((Path(__file__).parent / "cases").glob("*.json"))
KEYS = {"doc", "cluster", "files", "facts", "plan"}


def plan_of(case: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    unknown = set(case) - KEYS
    assert not unknown, f"unknown case keys: {sorted(unknown)}"
    for name, text in case.get("files", {}).items():
        (tmp_path / name).write_text(text)
    (tmp_path / "cluster.yml").write_text(case["cluster"])
    cluster = load_cluster(tmp_path / "cluster.yml")
    intent = Intent()
    desired = desired_state(cluster, intent, serving_nodes(cluster, intent))
    requests = host_requests(cluster, intent, desired)
    assert set(case["facts"]) == set(cluster.hosts), "facts for every host, and only them"
    facts: dict[str, HostFacts] = {name: parse_facts(name, raw, requests[name])
                                   for name, raw in case["facts"].items()}
    result = plan_cluster(cluster, intent, desired, dict(facts)).to_json()
    del result["cluster_file"]
    return result


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case(path: Path, tmp_path: Path) -> None:
    case = json.loads(path.read_text())
    assert plan_of(case, tmp_path) == case["plan"], case["doc"]


def test_there_are_cases() -> None:
    assert len(CASES) >= 4
