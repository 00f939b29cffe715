"""The preflight line per serving node (macOS, the chosen Python, `sudo -n`, disk for the
model files), from the agent's facts JSON to what `orch plan` and `orch status` print, text
and JSON. Pure: no SSH."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.facts import FactRequest, parse_facts
from orchestrator.model.manifest import Entry, LocalOrigin, Manifest
from orchestrator.plan import Plan
from orchestrator.plan.readiness import NodePreflight, node_preflight
from orchestrator.render import plan_json, plan_text
from orchestrator.resources.interpreter import choose_python
from orchestrator.resources.model_files import ModelFiles
from orchestrator.status import ClusterStatus, NodeStatus, status_json, status_text
from tests.unit.test_facts import raw_facts

MODELS = "~/.orch/models/r1"
SHA = {name: name[0] * 64 for name in ("a.safetensors", "b.safetensors", "c.safetensors")}
LINE = ("mac1: macOS 15.3.1 · Python 3.12.4 (/opt/homebrew/bin/python3.12) · sudo -n ok · "
        "disk 2.0 GB to fetch (3.0 GB placed), 250.0 GB free")


def model() -> ModelFiles:
    """A node that needs a and b (1 GB and 2 GB) of a model of three files."""
    files = {"a.safetensors": Entry(10**9, SHA["a.safetensors"]),
             "b.safetensors": Entry(2 * 10**9, SHA["b.safetensors"]),
             "c.safetensors": Entry(4 * 10**9, SHA["c.safetensors"])}
    return ModelFiles(MODELS, Manifest(LocalOrigin(Path("/m")), files),
                      frozenset({"a.safetensors", "b.safetensors"}))


def mac_json(**over: Any) -> dict[str, Any]:
    """A stock Mac's facts answer for its model files, Pythons, sudo and disk: it holds a
    verified, lacks b; /usr/bin/python3 is 3.9, Homebrew has 3.11 and 3.12."""
    raw = raw_facts()
    raw["os"]["product_version"] = "15.3.1"
    raw["files"] = {
        f"{MODELS}/a.safetensors": {"kind": "file", "size": 10**9, "mode": 0o644,
                                    "sha256": SHA["a.safetensors"]},
        f"{MODELS}/b.safetensors": {"kind": "missing", "size": None, "mode": None,
                                    "sha256": None},
        f"{MODELS}/c.safetensors": {"kind": "missing", "size": None, "mode": None,
                                    "sha256": None},
    }
    raw["pythons"] = {"developer_tools": True, "found": [
        {"path": "/usr/bin/python3", "version": "3.9.6", "stub": False},
        {"path": "/opt/homebrew/bin/python3.11", "version": "3.11.9", "stub": False},
        {"path": "/opt/homebrew/bin/python3.12", "version": "3.12.4", "stub": False}]}
    raw["sudo"] = True
    raw["disk"] = {MODELS: {"volume": "/System/Volumes/Data", "free_bytes": 250 * 10**9}}
    raw.update(over)
    return raw


def preflight_of(raw: dict[str, Any], wanted: str = "auto") -> NodePreflight:
    facts = parse_facts("mac1", raw)
    return node_preflight(facts, choose_python(facts, wanted), model())


def test_a_stock_mac_with_homebrew_pythons_in_one_line() -> None:
    assert preflight_of(mac_json()).line() == LINE
    assert preflight_of(mac_json(), "3.11").line() == LINE.replace(
        "3.12.4 (/opt/homebrew/bin/python3.12)", "3.11.9 (/opt/homebrew/bin/python3.11)")


def test_what_is_not_there_or_not_asked_says_so() -> None:
    raw = mac_json(sudo=False)
    del raw["disk"]
    facts = parse_facts("mac1", raw)
    line = node_preflight(facts, None, model()).line()
    assert line == "mac1: macOS 15.3.1 · Python - · sudo -n would prompt"
    del raw["sudo"]
    raw["os"]["product_version"] = None
    assert node_preflight(parse_facts("mac1", raw), None, None).line() == \
        "mac1: macOS - · Python - · sudo -n not needed"


def test_the_line_reads_the_facts_of_the_plans_own_request() -> None:
    """The request that asks for the model files, the Pythons, sudo and the disk is answered
    by exactly this JSON (strict parsing: nothing the line uses is read unasked)."""
    request = model().facts_needed().merge(FactRequest(pythons=frozenset(), sudo=True,
                                                       managed=False))
    raw = mac_json()
    raw["guards"] = {model().stray_guard.id: 1}
    raw.update(venvs={}, launchd={}, sysctl={}, trees={}, texts={}, managed={})
    facts = parse_facts("mac1", raw, request)
    assert node_preflight(facts, choose_python(facts, "auto"), model()).line() == LINE


def plan(*preflight: NodePreflight) -> Plan:
    return Plan("r1", "/c/r1.yml", (), {}, preflight)


def test_plan_text_and_json_show_a_line_per_serving_node() -> None:
    checked = preflight_of(mac_json())
    other = NodePreflight("mac2", "14.5", "/usr/local/bin/python3.12", "3.12.1", True,
                          0, 3 * 10**9, 10**12, "/")
    text = plan_text(plan(checked, other))
    assert text.splitlines()[:3] == ["Preflight:", f"  {LINE}",
                                     "  mac2: macOS 14.5 · Python 3.12.1 (/usr/local/bin/"
                                     "python3.12) · sudo -n ok · disk 0.0 MB to fetch "
                                     "(3.0 GB placed), 1000.0 GB free"]
    assert text.endswith("No changes. 0 hosts match the cluster file.")
    data = json.loads(plan_json(plan(checked)))
    assert data["preflight"] == {"mac1": {
        "macos": "15.3.1", "python": "/opt/homebrew/bin/python3.12", "python_version": "3.12.4",
        "sudo": True, "disk_needed": 2 * 10**9, "disk_placed": 3 * 10**9,
        "disk_free": 250 * 10**9, "volume": "/System/Volumes/Data"}}
    assert Plan.from_json(data) == plan(checked)  # a saved plan keeps it


def test_preflight_never_makes_a_saved_plan_stale_and_is_absent_without_nodes() -> None:
    checked = preflight_of(mac_json())
    assert plan(checked).comparable() == plan().comparable()
    assert "preflight" not in json.loads(plan_json(plan()))
    assert "Preflight" not in plan_text(plan())


def test_status_shows_the_same_line_per_node() -> None:
    node = NodeStatus("mac1", 0, True, worker="running", preflight=preflight_of(mac_json()))
    status = ClusterStatus("r1", "http://10.0.0.1:8080", 1, (node,), "serving", 1, 1)
    text = status_text(status)
    assert f"preflight:\n  {LINE}\n" in text
    data = status_json(status)
    assert data["nodes"][0]["preflight"]["sudo"] is True
    assert data["nodes"][0]["preflight"]["disk_free"] == 250 * 10**9
    bare = status_json(ClusterStatus("r1", "u", 1, (NodeStatus("mac1", 0, False),), "unknown",
                                     None, 0))
    assert bare["nodes"][0]["preflight"] is None
