"""`sysctl:` and `launchd:` tasks as resources: what each asks of the facts call, and where the
job's label comes from (the plans they make are table cases: tests/unit/plan/cases/)."""

from __future__ import annotations

import plistlib
from pathlib import Path

import pytest

from orchestrator.config import SysctlTask, Task, load_cluster
from orchestrator.errors import ConfigError
from orchestrator.facts import LaunchdRef
from orchestrator.placement.intent import Intent
from orchestrator.plan.core import fact_request
from orchestrator.plan.desired import check_not_orchs, desired_state
from orchestrator.resources.loaded_job import LoadedJob
from orchestrator.resources.sysctl_setting import SysctlSetting

HOSTS = "name: m\nhosts:\n  a: {address: 127.0.0.1}\ntasks:\n"
PLIST = "~/Library/LaunchAgents/com.example.job.plist"


def plist(label: str) -> bytes:
    return plistlib.dumps({"Label": label, "ProgramArguments": ["/bin/sleep", "60"]})


def resources(tmp_path: Path, tasks: str) -> list[object]:
    (tmp_path / "cluster.yml").write_text(HOSTS + tasks)
    cluster = load_cluster(tmp_path / "cluster.yml")
    return list(desired_state(cluster, Intent(), ["a"])["a"])


def test_a_setting_and_a_job_ask_the_facts_call_for_no_command(tmp_path: Path) -> None:
    """The value joins the facts call's one sysctl run and the job its launchctl print: no
    guard command, no sudo probe (the sudo fact runs a process; a non-persisted setting needs
    only its own `sudo -n sysctl -w` rule, which apply uses)."""
    (tmp_path / "job.plist").write_bytes(plist("com.example.job"))
    found = resources(tmp_path, f"  - name: plist\n    copy: {{src: job.plist, dest: {PLIST}}}\n"
                                f"  - name: job\n    launchd: {{plist: {PLIST}}}\n"
                                "  - name: wired\n    sysctl: {name: iogpu.wired_limit_mb, "
                                "value: 49152}\n")
    request = fact_request(found, "m")  # type: ignore[arg-type]
    assert request.guards == frozenset()
    assert request.sysctl == {"iogpu.wired_limit_mb"}
    assert request.launchd == {LaunchdRef("user", "com.example.job")}
    assert request.files == {PLIST}
    assert request.sudo is False


def test_the_label_is_read_from_the_plist_a_copy_task_writes(tmp_path: Path) -> None:
    (tmp_path / "job.plist").write_bytes(plistlib.dumps({"Label": "com.example.binary"},
                                                        fmt=plistlib.FMT_BINARY))
    found = resources(tmp_path, f"  - name: plist\n    copy: {{src: job.plist, dest: {PLIST}}}\n"
                                f"  - name: job\n    launchd: {{plist: {PLIST}}}\n")
    job = found[1]
    assert isinstance(job, LoadedJob)
    assert job.label == "com.example.binary"
    assert job.written_sha256 is not None


def test_a_label_the_plist_contradicts_is_an_error_at_the_task(tmp_path: Path) -> None:
    (tmp_path / "job.plist").write_bytes(plist("com.example.job"))
    with pytest.raises(ConfigError) as caught:
        resources(tmp_path, f"  - name: plist\n    copy: {{src: job.plist, dest: {PLIST}}}\n"
                            f"  - name: job\n    launchd: {{plist: {PLIST}, label: other}}\n")
    assert f"{tmp_path / 'cluster.yml'}:7:1: task 'job': label 'other', but {PLIST} says " \
           "Label 'com.example.job'" in str(caught.value)


def test_a_plist_written_elsewhere_needs_its_label_and_is_not_read(tmp_path: Path) -> None:
    found = resources(tmp_path, "  - name: job\n    launchd: {plist: /Library/LaunchDaemons/"
                                "x.plist, label: com.example.x, domain: system}\n")
    assert found == [LoadedJob("com.example.x", "/Library/LaunchDaemons/x.plist", "system")]
    assert found[0].facts_needed().files == frozenset()  # type: ignore[attr-defined]


def test_persist_is_another_resource_so_switching_it_removes_the_daemon(tmp_path: Path) -> None:
    off = resources(tmp_path, "  - name: w\n    sysctl: {name: kern.maxfiles, value: 1}\n")
    on = resources(tmp_path, "  - name: w\n    sysctl: {name: kern.maxfiles, value: 1, "
                             "persist: true}\n")
    assert off == [SysctlSetting("kern.maxfiles", "1", False, "~/.orch/system")]
    assert on == [SysctlSetting("kern.maxfiles", "1", True, "~/.orch/system")]
    assert [r.id for r in off + on] == [  # type: ignore[attr-defined]
        "sysctl:kern.maxfiles", "sysctl-persisted:kern.maxfiles"]


def test_a_task_for_the_wired_limit_orch_sets_itself_is_refused() -> None:
    task = Task("wired", SysctlTask("iogpu.wired_limit_mb", "49152"), origin="/c.yml:9")
    setting = SysctlSetting("iogpu.wired_limit_mb", "49152")
    check_not_orchs(task, setting, set(), "mac1")  # nothing of orch's: fine
    check_not_orchs(task, setting, {"kern.maxfiles"}, "mac1")
    with pytest.raises(ConfigError) as caught:
        check_not_orchs(task, setting, {"iogpu.wired_limit_mb"}, "mac1")
    assert str(caught.value).startswith(
        "/c.yml:9:1: task 'wired': orch sets iogpu.wired_limit_mb itself on mac1")
