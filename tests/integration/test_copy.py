"""`copy:` tasks on real sshd hosts (issue #17): checksum-compared, streamed, atomic, removed
when undeclared.

Three simulated Macs of their own (127.0.0.93-95). A file (8 MiB, several of the 1 MiB chunks
it travels in) and a directory with a nested file are copied; a second apply sends nothing;
a changed source file is the only one sent again; dropping the tasks removes exactly what
was copied. The same hosts also show inventory variables rendered per host by a template.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.simulator.cluster import inventory_yaml
from orchestrator.simulator.hosts import GIB, HostSpec, RunningHost, start_hosts, stop_hosts
from tests.fixtures import clusters
from tests.fixtures.cli import orch

COPY_TASKS = """\
tasks:
  - name: blob
    copy: {src: payload/blob.bin, dest: ~/data/blob.bin, mode: "0600"}
  - name: tree
    copy: {src: payload/tree, dest: ~/tree}
"""


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningHost]]:
    running = start_hosts(tmp_path_factory.mktemp("copy-hosts"), [
        HostSpec(f"copy{i}", 64 * GIB, "Apple M4 Pro", address=f"127.0.0.{93 + i}")
        for i in range(3)])
    try:
        yield running
    finally:
        stop_hosts(running)


def write(directory: Path, hosts: list[RunningHost], tasks: str) -> Path:
    return clusters.write_cluster(directory, "copytest", f"runtime:\n  packages: []\n{tasks}",
                                  hosts=hosts)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_copy_converges_sends_nothing_twice_and_is_removed(
        tmp_path: Path, hosts: list[RunningHost]) -> None:
    known = hosts[0].known_hosts_file
    payload = tmp_path / "payload"
    (payload / "tree" / "sub").mkdir(parents=True)
    (payload / "blob.bin").write_bytes(os.urandom(8 * 1024 * 1024 + 5))
    (payload / "tree" / "a.txt").write_text("alpha\n")
    (payload / "tree" / "sub" / "b.bin").write_bytes(bytes(range(256)) * 10)
    cluster = write(tmp_path, hosts, COPY_TASKS)

    first = orch("apply", cluster, "--yes", known_hosts=known)
    assert first.returncode == 0, first.output
    for host in hosts:
        blob = host.home / "data" / "blob.bin"
        assert sha(blob) == sha(payload / "blob.bin")
        assert blob.stat().st_mode & 0o777 == 0o600
        assert (host.home / "tree" / "a.txt").read_text() == "alpha\n"
        nested = Path("tree") / "sub" / "b.bin"
        assert sha(host.home / nested) == sha(payload / nested)
        assert not list(host.home.rglob(".orch-*.tmp"))  # atomic: no temp file left

    again = orch("plan", cluster, "--detailed-exitcode", known_hosts=known)
    assert again.returncode == 0, again.output  # converged: nothing to send
    second = orch("apply", cluster, "--yes", known_hosts=known)
    assert second.returncode == 0, second.output
    assert "No changes." in second.stdout

    (payload / "tree" / "a.txt").write_text("alpha, changed\n")
    changed = orch("plan", cluster, "--detailed-exitcode", "--diff", known_hosts=known)
    assert changed.returncode == 2, changed.output
    assert changed.stdout.count("~ copy:~/tree") == 3, changed.stdout
    assert "files: 1 of 2 match → 2 match (send 1, 15 B)" in changed.stdout
    assert "1 file(s) sent as bytes (content not shown):" in changed.stdout
    assert "blob.bin" not in changed.stdout  # the unchanged copy is not planned
    assert orch("apply", cluster, "--yes", known_hosts=known).returncode == 0
    assert (hosts[1].home / "tree" / "a.txt").read_text() == "alpha, changed\n"

    dropped = write(tmp_path, hosts, "")
    removal = orch("apply", dropped, "--yes", known_hosts=known)
    assert removal.returncode == 0, removal.output
    for host in hosts:
        assert not (host.home / "data" / "blob.bin").exists()
        assert (host.home / "data").is_dir()  # not made by the copy's own cleanup list
        assert not (host.home / "tree").exists()


def test_a_host_var_renders_per_host_and_a_missing_one_fails_the_plan_at_its_line(
        tmp_path: Path, hosts: list[RunningHost]) -> None:
    """Issue #17's other claim, on the hosts: `host.vars.KEY` with the inventory's precedence
    (shared < group < the host's own) lands per host; a variable one host lacks fails the plan
    at the template's FILE:LINE:COL, before anything is changed."""
    known = hosts[0].known_hosts_file
    inventory = inventory_yaml(hosts).replace(
        f"  {hosts[0].name}:\n", f"  {hosts[0].name}:\n    vars: {{colour: red, shade: dark}}\n")
    (tmp_path / "inventory.yml").write_text(
        "vars:\n  colour: grey\ngroups:\n  pair:\n"
        f"    hosts: [{hosts[0].name}, {hosts[1].name}]\n    vars: {{colour: green}}\n"
        + inventory)
    (tmp_path / "colour.j2").write_text("{{ host.name }} is {{ host.vars.colour }}\n")
    cluster = tmp_path / "cluster.yml"
    cluster.write_text("name: varstest\ninventory: inventory.yml\nruntime:\n  packages: []\n"
                       "tasks:\n  - name: colour\n"
                       "    template: {src: colour.j2, dest: ~/colour.txt}\n")
    applied = orch("apply", cluster, "--yes", known_hosts=known)
    assert applied.returncode == 0, applied.output
    assert [(h.home / "colour.txt").read_text() for h in hosts] == [
        f"{hosts[0].name} is red\n", f"{hosts[1].name} is green\n", f"{hosts[2].name} is grey\n"]

    (tmp_path / "colour.j2").write_text("{{ host.name }} is {{ host.vars.colour }}\n"
                                        "in {{ host.vars.shade }}\n")  # only hosts[0] has it
    refused = orch("plan", cluster, known_hosts=known)
    assert refused.returncode == 1, refused.output
    assert f"{tmp_path / 'colour.j2'}:2:" in refused.stderr, refused.stderr
    assert "'shade'" in refused.stderr, refused.stderr
    assert (hosts[1].home / "colour.txt").read_text() == f"{hosts[1].name} is green\n"
