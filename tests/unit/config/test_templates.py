"""Users' templates: mistakes at TEMPLATE:LINE:COL with the task that uses them, never a traceback.

Syntax and encoding are checked offline by `orch validate`; names the template uses but was
not given need the host's variables, so `plan` reports those, at the line that uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest
from click.testing import CliRunner, Result

from orchestrator.cli import main
from orchestrator.errors import ConfigError, Diagnostic
from orchestrator.plan.desired import render_template
from tests.unit.config.cases import INVENTORY

ORIGIN = "cluster.yml:7"
HOST = {"host": {"name": "a", "groups": []}, "cluster": "lab"}


def render_error(src: Path) -> Diagnostic:
    with pytest.raises(ConfigError) as exc:
        render_template(src, HOST, ORIGIN)
    [diagnostic] = exc.value.diagnostics
    return diagnostic


def test_undefined_name_is_reported_at_its_line_and_column(tmp_path: Path) -> None:
    src = tmp_path / "motd.j2"
    src.write_text("hello {{ host.name }}\nserving {{ model_name }} here\n")
    assert render_error(src) == Diagnostic(
        src, 2, 12, "undefined: 'model_name' is undefined; expected a name the template is "
        "given (cluster, host, hosts and the task's vars) (task at cluster.yml:7)")


def test_undefined_attribute_in_an_included_template_points_into_that_file(
        tmp_path: Path) -> None:
    (tmp_path / "motd.j2").write_text("top\n\n{% include 'part.j2' %}\n")
    (tmp_path / "part.j2").write_text("part\n  at {{ host.nmae }}\n")
    found = render_error(tmp_path / "motd.j2")
    assert (found.file, found.line, found.column) == (tmp_path / "part.j2", 2, 14)
    assert found.message.startswith("undefined: 'dict object' has no attribute 'nmae'")


def test_an_exception_in_template_code_is_a_diagnostic_at_its_line(tmp_path: Path) -> None:
    src = tmp_path / "motd.j2"
    src.write_text("a\nb\n{{ 1 / 0 }}\n")
    assert render_error(src) == Diagnostic(
        src, 3, 1, "template error: ZeroDivisionError: division by zero (task at cluster.yml:7)")


def test_a_binary_template_is_a_diagnostic_when_rendered(tmp_path: Path) -> None:
    src = tmp_path / "logo.j2"
    src.write_bytes(b"GIF89a\x01\x00\x01\x00\x80\xff\x00")
    assert render_error(src) == Diagnostic(
        src, 1, 11, "byte 0x80 is not UTF-8 text; expected a jinja2 template in UTF-8 (is it "
        "a binary file?) (task at cluster.yml:7)")


def test_a_binary_include_is_a_diagnostic_in_the_included_file(tmp_path: Path) -> None:
    (tmp_path / "motd.j2").write_text("{% include 'logo.png' %}\n")
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    found = render_error(tmp_path / "motd.j2")
    assert (found.file, found.line, found.column) == (tmp_path / "logo.png", 1, 1)


def write_cluster(tmp_path: Path, template: bytes) -> Path:
    (tmp_path / "cluster.yml").write_text(
        "name: lab\ninventory: inv.yml\n"
        "tasks:\n  - name: motd\n    template: {src: motd.j2, dest: /etc/motd}\n")
    (tmp_path / "inv.yml").write_text(INVENTORY)
    (tmp_path / "motd.j2").write_bytes(template)
    return tmp_path / "cluster.yml"


def test_validate_refuses_a_binary_template(tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path, b"\x00\x01 ok\n\xc3\x28\n")
    result = CliRunner().invoke(main, ["validate", str(cluster)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == (
        f"{tmp_path / 'motd.j2'}:2:1: byte 0xc3 is not UTF-8 text; expected a jinja2 template "
        f"in UTF-8 (is it a binary file?) (task at {cluster}:4)")


def test_validate_reports_a_template_syntax_error_with_its_task(tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path, b"line {{ host.name }}\n{% for x in %}\n{% endfor %}\n")
    result = CliRunner().invoke(main, ["validate", str(cluster)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines()[0] == (
        f"{tmp_path / 'motd.j2'}:2:1: template syntax error: Expected an expression, got "
        f"'end of statement block'; expected jinja2 syntax (task at {cluster}:4)")


def test_validate_accepts_a_template_whose_names_only_a_host_can_tell(tmp_path: Path) -> None:
    cluster = write_cluster(tmp_path, b"{{ host.name }} {{ not_known_offline }}\n")
    result = CliRunner().invoke(main, ["validate", str(cluster)])
    assert result.exit_code == 0, result.output


def plan_against_closed_ports(tmp_path: Path, template: bytes) -> tuple[Path, Result]:
    """`orch plan` renders templates for every host, reachable or not: ports 1 and 2 refuse."""
    cluster = write_cluster(tmp_path, template)
    (tmp_path / "inv.yml").write_text(INVENTORY.replace("10.0.0.1", "127.0.0.1")
                                      .replace("10.0.0.2", "127.0.0.1")
                                      .replace("    ring_ip: 10.1.0.1\n",
                                               "    ring_ip: 10.1.0.1\n    port: 1\n")
                                      .replace("    ring_ip: 10.1.0.2\n",
                                               "    ring_ip: 10.1.0.2\n    port: 2\n"))
    return cluster, CliRunner().invoke(main, [
        "plan", str(cluster), "--known-hosts", str(tmp_path / "known_hosts"),
        "--connect-timeout", "2"])


def test_plan_reports_an_undefined_name_at_the_template_line(tmp_path: Path) -> None:
    cluster, result = plan_against_closed_ports(
        tmp_path, b"{{ host.name }}\n  {{ host.address }} {{ hostname }}\n")
    assert result.exit_code == 1, result.output
    assert (f"{tmp_path / 'motd.j2'}:2:25: undefined: 'hostname' is undefined; expected a name "
            f"the template is given (cluster, host, hosts and the task's vars) "
            f"(task at {cluster}:4)") in result.stderr.splitlines()


def test_plan_of_a_binary_template_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    _, result = plan_against_closed_ports(tmp_path, b"\x89PNG\r\n\x1a\n")
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert f"{tmp_path / 'motd.j2'}:1:1: byte 0x89 is not UTF-8 text" in result.stderr


def test_a_template_is_compiled_once_per_run_and_again_when_its_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan renders each template once per host, twice per run: compiled once, it is jinja's
    cache that renders the rest; an edited file (or an edited include) is compiled again."""
    compiled: list[str | None] = []
    compile_source = jinja2.Environment.compile

    def counting(self: jinja2.Environment, source: str, name: str | None = None,
                 *args: Any, **kwargs: Any) -> Any:
        compiled.append(name)
        return compile_source(self, source, name, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "compile", counting)
    src = tmp_path / "motd.j2"
    src.write_text("hello {{ host.name }}\n{% include 'part.j2' %}")
    (tmp_path / "part.j2").write_text("part 1\n")
    for name in ("a", "b", "c"):
        host = {**HOST, "host": {"name": name, "groups": []}}
        assert render_template(src, host, ORIGIN) == f"hello {name}\npart 1\n"
    assert sorted(map(str, compiled)) == ["motd.j2", "part.j2"]
    (tmp_path / "part.j2").write_text("part 2\n")  # same size: only the content tells
    assert render_template(src, HOST, ORIGIN) == "hello a\npart 2\n"
    src.write_text("bye {{ host.name }}\n")
    assert render_template(src, HOST, ORIGIN) == "bye a\n"
    assert sorted(map(str, compiled)) == ["motd.j2", "motd.j2", "part.j2", "part.j2"]
