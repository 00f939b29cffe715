"""Hostile or broken YAML is refused early, at a FILE:LINE:COL, in bounded time and memory.

Each test bounds the loader's work itself (nodes built, bytes handed to pyyaml) with a spy
that fails as soon as the bound is crossed, so a loader without the limits fails the test
quickly instead of hanging it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.config import load_cluster, yamlsrc
from orchestrator.config.yamlsrc import MAX_ALIAS_NODES, MAX_DEPTH, MAX_FILE_BYTES, load_document
from orchestrator.errors import ConfigError
from tests.unit.config.cases import CLUSTER, INVENTORY


def billion_laughs(levels: int = 9) -> str:
    """The classic: 9 strings, then 9 aliases to the level below, 9 times over (9^9 strings)."""
    lines = ['lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]']
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the nodes the loader turns into data; fail once it is far past the alias bound."""
    count = [0]
    original = yamlsrc._Builder.build

    def build(self: Any, node: yaml.Node, path: yamlsrc.DataPath) -> Any:
        count[0] += 1
        assert count[0] <= 2 * MAX_ALIAS_NODES, "the loader is expanding an alias bomb"
        return original(self, node, path)

    monkeypatch.setattr(yamlsrc._Builder, "build", build)
    return count


def error_at(exc: pytest.ExceptionInfo[ConfigError]) -> tuple[Path, int, int, str]:
    [diagnostic] = exc.value.diagnostics
    return diagnostic.file, diagnostic.line, diagnostic.column, diagnostic.message


def test_billion_laughs_is_refused_at_the_alias_that_crosses_the_bound(
        tmp_path: Path, builds: list[int]) -> None:
    file = tmp_path / "cluster.yml"
    file.write_text(billion_laughs())
    with pytest.raises(ConfigError) as exc:
        load_document(file)
    # lol1..lol3 add 90 + 819 + 7,380 nodes; the first *lol3 (7,381 more) crosses 10,000.
    assert error_at(exc) == (file, 5, 14, "aliases expand to more than 10,000 nodes (*lol3 "
                             "alone to 7,381); expected aliases that add at most 10,000 nodes "
                             "to the document")
    assert builds == [0]  # refused while composing: not one node of data was built


def test_alias_bomb_in_an_inventory_fails_validate_with_exit_1(tmp_path: Path,
                                                               builds: list[int]) -> None:
    (tmp_path / "cluster.yml").write_text(CLUSTER)
    (tmp_path / "inv.yml").write_text(INVENTORY + billion_laughs())
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "cluster.yml")])
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'inv.yml'}:14:14: aliases expand to more than" in result.stderr
    assert builds[0] < 100  # only the cluster file's few nodes


def test_aliases_within_the_bound_load_as_before(tmp_path: Path, builds: list[int]) -> None:
    file = tmp_path / "cluster.yml"
    shared = ", ".join(f"k{i}: {i}" for i in range(20))
    file.write_text(f"base: &base {{{shared}}}\n"
                    + "".join(f"h{i}: *base\n" for i in range(100)))
    data = load_document(file).data
    assert data["h99"] == data["base"] == {f"k{i}": i for i in range(20)}
    assert builds[0] == 1 + 101 * (1 + 1 + 20 * 2)  # each alias is expanded: key, mapping, 20 pairs


def test_alias_to_the_node_that_contains_it_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yml"
    file.write_text("name: lab\nloop: &a [1, [2, *a]]\n")
    with pytest.raises(ConfigError) as exc:
        load_document(file)
    assert error_at(exc) == (file, 2, 18, "alias *a is inside the node it names, a cycle; "
                             "expected an alias to a node defined before it")


def test_deep_nesting_is_refused_where_it_crosses_the_bound(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yml"
    file.write_text("name: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError) as exc:
        load_document(file)
    # The root mapping is level 1, so the bracket at level MAX_DEPTH + 1 is the MAX_DEPTH-th.
    assert error_at(exc) == (file, 1, 7 + MAX_DEPTH - 1, "nesting deeper than 64 levels; "
                             "expected a file nested at most 64 deep")


def test_nesting_built_from_aliases_is_bounded_too(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yml"
    deep = "[" * 40 + "]" * 40
    file.write_text(f"a: &a {deep}\nb: &b [[[[[[[[[[[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]]]]]]]]]]\n")
    with pytest.raises(ConfigError) as exc:
        load_document(file)
    assert error_at(exc)[1:] == (2, 32, "alias *a nests deeper than 64 levels; expected a "
                                 "file nested at most 64 deep")


def test_a_50_mb_file_is_refused_without_being_parsed(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[int] = []
    original = yaml.reader.Reader.__init__

    def reader(self: Any, stream: Any) -> None:
        handed.append(len(stream))
        assert len(stream) <= MAX_FILE_BYTES, "the whole file went to the YAML parser"
        original(self, stream)

    monkeypatch.setattr(yaml.reader.Reader, "__init__", reader)
    file = tmp_path / "cluster.yml"
    line = "# " + "x" * 77 + "\n"
    with file.open("w") as out:
        out.write("name: lab\n")
        for _ in range(50 * 2**20 // len(line)):
            out.write(line)
    size = file.stat().st_size
    try:
        result = CliRunner().invoke(main, ["validate", str(file)])
    finally:
        file.unlink()
    assert result.exit_code == 1, result.output
    # 8 MiB = 10 bytes of the first line + 104,857 lines of 80 bytes + 38 bytes of the next.
    assert result.stderr.splitlines()[0] == (
        f"{file}:104859:39: the file goes past 8 MiB here ({size:,} bytes in all); expected a "
        "cluster, inventory or playbook file of at most 8,388,608 bytes")
    assert handed == []


def test_a_file_just_under_the_bound_is_read(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yml"
    file.write_text("name: lab\n" + "#" * (MAX_FILE_BYTES - 11) + "\n")
    assert file.stat().st_size == MAX_FILE_BYTES
    assert load_document(file).data == {"name": "lab"}


def test_a_control_character_is_an_error_at_its_place(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yml"
    file.write_text("name: lab\ninventory: in\x01v.yml\n")
    with pytest.raises(ConfigError) as exc:
        load_cluster(file)
    assert error_at(exc) == (file, 2, 14, "control character U+0001 is not allowed in YAML; "
                             "expected printable text")


def test_a_binary_cluster_file_is_an_error_at_the_first_bad_byte(tmp_path: Path) -> None:
    file = tmp_path / "cluster.yml"
    file.write_bytes(b"name: lab\nmodel: \xff\xfe\n")
    with pytest.raises(ConfigError) as exc:
        load_cluster(file)
    assert error_at(exc) == (file, 2, 8, "byte 0xff is not UTF-8 text; expected a cluster, "
                             "inventory or playbook file in UTF-8 (is it a binary file?)")
