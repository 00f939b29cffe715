"""`orch validate` on broken files: exit 1, the exact FILE:LINE:COL, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.config import json_schemas, load_cluster
from tests.fixtures.cli import orch
from tests.unit.config.cases import CASES, CLUSTER, INVENTORY, Case

MARK = "»"
REPO = Path(__file__).resolve().parents[3]


def write_case(tmp_path: Path, files: dict[str, str]) -> tuple[Path, int, int] | None:
    """Write the files; return where the `»` marker was (file, line, column), 1-based."""
    where = None
    for name, text in files.items():
        if MARK in text:
            before = text[: text.index(MARK)]
            where = (tmp_path / name, before.count("\n") + 1, len(before.rsplit("\n", 1)[-1]) + 1)
        (tmp_path / name).write_text(text.replace(MARK, ""))
    (tmp_path / "models").mkdir()
    return where


def run_validate(cluster: Path) -> tuple[int, str]:
    ran = orch("validate", cluster)
    return ran.returncode, ran.output


def test_there_are_at_least_twenty_classes_of_mistake() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_broken_file_points_at_the_mistake(tmp_path: Path, case: Case) -> None:
    where = write_case(tmp_path, case.files)
    assert where is not None, "every case marks where its error is"
    code, output = run_validate(tmp_path / "cluster.yml")
    assert code == 1, output
    assert "Traceback" not in output
    file, line, column = where
    expected_prefix = f"{file}:{line}:{column}: "
    lines = [x for x in output.splitlines() if x.startswith(expected_prefix)]
    assert lines, f"no diagnostic at {expected_prefix}\n{output}"
    assert any(case.message in x for x in lines), output
    assert "nothing was changed on any host" in output


def test_every_mistake_is_reported_in_one_run(tmp_path: Path) -> None:
    cluster = CLUSTER.replace("  revision", "  revison") + "placement:\n  reserve_gb: -1\n"
    inventory = INVENTORY + "    colour: red\n" + "    port: '22'\n"
    write_case(tmp_path, {"cluster.yml": cluster, "inv.yml": inventory})
    code, output = run_validate(tmp_path / "cluster.yml")
    assert code == 1
    assert "4 errors" in output, output


def test_valid_example_passes_and_unpinned_revision_warns() -> None:
    code, output = run_validate(REPO / "playbooks" / "deepseek-r1.yml")
    assert code == 0, output
    assert "5 hosts" in output
    assert "deepseek-r1.yml:9:13: warning: revision 'main' is not a commit sha" in output


def test_precedence_host_over_group_over_vars(tmp_path: Path) -> None:
    inventory = """\
vars: {user: everyone, port: 2200, memory_gb: 16}
groups:
  big: {hosts: [a], vars: {user: group, memory_gb: 192}}
hosts:
  a: {address: 10.0.0.1, ring_ip: 10.1.0.1, user: own}
  b: {address: 10.0.0.2, ring_ip: 10.1.0.2}
"""
    write_case(tmp_path, {"cluster.yml": CLUSTER, "inv.yml": inventory})
    cluster = load_cluster(tmp_path / "cluster.yml")
    a, b = cluster.hosts["a"], cluster.hosts["b"]
    assert (a.user, a.port, a.memory_gb, a.groups) == ("own", 2200, 192.0, ("big",))
    assert (b.user, b.port, b.memory_gb) == ("everyone", 2200, 16.0)


def test_a_cluster_without_a_model_needs_no_ring_ip_nor_memory(tmp_path: Path) -> None:
    """Only a served model needs a ring rank and RAM to place layers by; tasks need neither."""
    inventory = "hosts:\n  a: {address: 10.0.0.1}\n  b: {address: 10.0.0.2, ring_ip: 10.1.0.2}\n"
    tasks_only = CLUSTER.split("model:")[0] + "tasks:\n  - {name: d, directory: {path: /x}}\n"
    write_case(tmp_path, {"cluster.yml": tasks_only, "inv.yml": inventory})
    cluster = load_cluster(tmp_path / "cluster.yml")
    a, b = cluster.hosts["a"], cluster.hosts["b"]
    assert (a.ring_ip, a.memory_gb, b.ring_ip, b.memory_gb) == (None, None, "10.1.0.2", None)
    code, output = run_validate(tmp_path / "cluster.yml")
    assert code == 0, output


def test_serving_a_model_requires_ring_ip_and_memory_on_every_host(tmp_path: Path) -> None:
    """The same inventory with `model:` is refused, each host named at its line."""
    inventory = "hosts:\n  a: {address: 10.0.0.1}\n  b: {address: 10.0.0.2, memory_gb: 8}\n"
    write_case(tmp_path, {"cluster.yml": CLUSTER, "inv.yml": inventory})
    code, output = run_validate(tmp_path / "cluster.yml")
    assert code == 1
    inv = tmp_path / "inv.yml"
    assert f"{inv}:2:3: host 'a' has no `memory_gb`" in output, output
    assert f"{inv}:3:3: host 'b' has no `ring_ip`" in output, output


def test_cli_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    write_case(tmp_path, {"cluster.yml": CLUSTER + "bogus: 1\n", "inv.yml": INVENTORY})
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "validate",
                           str(tmp_path / "cluster.yml")], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 1
    assert f"{tmp_path / 'cluster.yml'}:6:1: unknown key 'bogus'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# --- JSON Schema -------------------------------------------------------------------------------

def schema_validator(which: str) -> jsonschema.protocols.Validator:
    schemas = json.loads(orch("schema").stdout)
    schema = schemas[which]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)  # type: ignore[no-any-return]


def test_schema_is_valid_and_accepts_the_examples() -> None:
    cluster = yaml.safe_load((REPO / "playbooks" / "deepseek-r1.yml").read_text())
    inventory = yaml.safe_load((REPO / "inventories" / "lab.yml").read_text())
    assert list(schema_validator("cluster").iter_errors(cluster)) == []
    assert list(schema_validator("inventory").iter_errors(inventory)) == []


@pytest.mark.parametrize("case", [c for c in CASES if c.schema], ids=lambda c: c.id)
def test_schema_rejects_broken_shapes(case: Case) -> None:
    validators = {"cluster.yml": schema_validator("cluster"),
                  "inv.yml": schema_validator("inventory")}
    rejected = False
    for name, text in case.files.items():
        if name in validators and MARK in text:
            data = yaml.safe_load(text.replace(MARK, ""))
            rejected = bool(list(validators[name].iter_errors(data)))
    assert rejected, f"the schema accepted {case.id}"


def test_schema_command_prints_one_file(tmp_path: Path) -> None:
    out = orch("schema", "--file", "cluster").stdout
    assert json.loads(out)["title"] == "ClusterFile"
    assert set(json_schemas()) == {"cluster", "inventory", "playbook"}
