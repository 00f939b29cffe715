"""Inventory user variables: `host.vars.KEY` in templates, with the inventory's precedence
(shared `vars` < group `vars`, in file order < the host's own `vars`)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.config import load_cluster
from orchestrator.plan.desired import task_resource
from orchestrator.resources.files import File

INVENTORY = """\
vars:
  user: admin
  greeting: hello
  ntp: pool.ntp.org
groups:
  studios:
    hosts: [a, b]
    vars: {greeting: hi studio, shelf: top}
  late:
    hosts: [b]
    vars: {shelf: bottom}
hosts:
  a:
    address: 127.0.0.1
    port: 1
    ring_ip: 10.1.0.1
    memory_gb: 64
    vars: {ntp: 10.0.0.9}
  b:
    address: 127.0.0.1
    port: 2
    ring_ip: 10.1.0.2
    memory_gb: 64
"""

TEMPLATE = "{{ host.vars.greeting }} from {{ host.name }}\nntp {{ host.vars.ntp }}\n" \
           "shelf {{ host.vars.shelf }}\n"


def write(tmp_path: Path, template: str, inventory: str = INVENTORY) -> Path:
    (tmp_path / "cluster.yml").write_text(
        "name: lab\ninventory: inv.yml\n"
        "tasks:\n  - name: motd\n    template: {src: motd.j2, dest: /etc/motd}\n")
    (tmp_path / "inv.yml").write_text(inventory)
    (tmp_path / "motd.j2").write_text(template)
    return tmp_path / "cluster.yml"


def test_a_host_var_renders_per_host_with_the_inventory_precedence(tmp_path: Path) -> None:
    cluster = load_cluster(write(tmp_path, TEMPLATE))
    rendered = {}
    for name, host in cluster.hosts.items():
        resource = task_resource(cluster.tasks[0], cluster, host)
        assert isinstance(resource, File)
        rendered[name] = resource.content
    assert rendered == {
        "a": "hi studio from a\nntp 10.0.0.9\nshelf top\n",  # host's own ntp wins
        "b": "hi studio from b\nntp pool.ntp.org\nshelf bottom\n",  # the later group wins
    }
    assert cluster.hosts["a"].user == "admin"  # connection keys still typed and shared


def test_a_missing_var_fails_the_plan_at_the_template_line(tmp_path: Path) -> None:
    cluster = write(tmp_path, "first line\n  {{ host.vars.greeting }} {{ host.vars.colour }}\n")
    result = CliRunner().invoke(main, ["plan", str(cluster), "--known-hosts",
                                       str(tmp_path / "known_hosts"), "--connect-timeout", "2"])
    assert result.exit_code == 1, result.output
    assert (f"{tmp_path / 'motd.j2'}:2:41: undefined: 'dict object' has no attribute "
            f"'colour'; expected a name the template is given") in result.stderr


def test_a_near_miss_of_a_connection_key_is_an_error_not_a_variable(tmp_path: Path) -> None:
    cluster = write(tmp_path, "x\n", INVENTORY.replace("  ntp: pool", "  prot: 22\n  ntp: pool"))
    result = CliRunner().invoke(main, ["validate", str(cluster)])
    assert result.exit_code == 1, result.output
    assert (f"{tmp_path / 'inv.yml'}:4:3: unknown key 'prot' (did you mean 'port'?)"
            in result.stderr)


def test_a_host_only_key_cannot_be_shared(tmp_path: Path) -> None:
    cluster = write(tmp_path, "x\n", INVENTORY.replace("  ntp: pool", "  ring_ip: 10.9.9.9\n"
                                                                     "  ntp: pool"))
    result = CliRunner().invoke(main, ["validate", str(cluster)])
    assert result.exit_code == 1, result.output
    assert "'ring_ip' cannot be shared through `vars`" in result.stderr
