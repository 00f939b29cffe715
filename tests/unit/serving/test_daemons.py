"""Workers as LaunchDaemons: migrating a node from the user agent, and the sudo preflight.

A node converged by an older orch holds the worker as a user agent (``user/<uid>``); its
managed record names it ``launchd:user/com.orch.lab.worker``. The daemon is another resource
(``launchd:system/…``), so the agent becomes a removal, and the order on the host is what keeps
the ports free: the agent is booted out (and gone) before the daemon is bootstrapped.
"""

from __future__ import annotations

from types import MappingProxyType

import pytest

from orchestrator.config import Runtime
from orchestrator.errors import PlanError
from orchestrator.facts import (
    FactRequest,
    FileFact,
    FileKind,
    HostFacts,
    JobState,
    LaunchdJob,
    VenvFact,
)
from orchestrator.plan import Plan, diff_host, fact_request, record_for
from orchestrator.plan.preflight import check_sudo, sudoers_line
from orchestrator.resources.base import Action, Resource
from orchestrator.resources.launchd import LaunchdService
from orchestrator.resources.worker import worker_resources
from tests.fixtures.facts import HOME
from tests.unit.serving.helpers import cluster, placement
from tests.unit.serving.helpers import files as rank_files

MISSING = FileFact(FileKind.MISSING, None, None, None)
AGENT = "launchd:user/com.orch.lab.worker"
DAEMON = "launchd:system/com.orch.lab.worker"


def node_resources(domain: str = "system") -> list[Resource]:
    c = cluster(3, runtime=Runtime(launchd_domain=domain))  # type: ignore[arg-type]
    p = placement(c)
    return worker_resources(c, p, p.nodes[1], home=HOME, system="Darwin", user="orch",
                            model_dir="~/.orch/models/tiny", files=rank_files())


def facts_for(request: FactRequest, *, managed: dict[str, object], sudo: bool | None,
              jobs: dict[str, LaunchdJob] | None = None) -> HostFacts:
    """A Mac answering `request` with nothing of orch's on it but `jobs` and `managed`."""
    launchd = {ref.key: LaunchdJob(JobState.NOT_LOADED, None, None, {})
               for ref in request.launchd}
    launchd.update(jobs or {})
    return HostFacts(
        "mac2", "Darwin", "15.5", "orch", 501, HOME, "3.12.0", 192 * 2**30, "Apple M2 Ultra",
        files=dict.fromkeys(request.files, MISSING),
        venvs={v: VenvFact(exists=False, python_version=None, packages=MappingProxyType({}))
               for v in request.venvs},
        launchd=launchd, sysctl=dict.fromkeys(request.sysctl, "0"),
        trees={t: {} for t in request.trees}, texts=dict.fromkeys(request.texts),
        managed=MappingProxyType(managed), sudo=sudo)


def converged_by_user_agent_orch() -> dict[str, object]:
    """The managed record an orch with user-agent workers left on the node."""
    return record_for("lab", node_resources("user"))


def test_migration_removes_the_user_agent_before_the_daemon_is_bootstrapped() -> None:
    resources = node_resources("system")
    running_agent = LaunchdJob(JobState.RUNNING, 4242, None, {})
    facts = facts_for(fact_request(resources, "lab").merge(node_resources("user")[-1]
                                                           .facts_needed()),
                      managed=converged_by_user_agent_orch(), sudo=True,
                      jobs={"user/com.orch.lab.worker": running_agent})
    plan = diff_host("lab", resources, facts)
    ids = [c.resource for c in plan.changes]
    assert AGENT in ids and DAEMON in ids
    removal = plan.changes[ids.index(AGENT)]
    assert removal.action is Action.DELETE
    assert [(s.op, s.request().get("domain"), s.request().get("path")) for s in removal.steps] == [
        ("launchd_bootout", "user", None),
        ("remove", None, "~/Library/LaunchAgents/com.orch.lab.worker.plist")]
    # The op order on the host: the agent's bootout before any daemon step, then the daemon's
    # plist installed by root and bootstrapped into the system domain.
    ops = [(c.resource, s.op) for c in plan.changes for s in c.steps]
    bootout = ops.index((AGENT, "launchd_bootout"))
    bootstrap = ops.index((DAEMON, "launchd_bootstrap"))
    assert bootout < ops.index((DAEMON, "install_system")) < bootstrap
    assert [c.resource for c in plan.changes].count(AGENT) == 1
    # and the record the node keeps afterwards names the daemon, not the agent
    assert [r["id"] for r in plan.record["resources"]][-1] == DAEMON  # type: ignore[index]


def test_a_node_without_nopasswd_sudo_is_refused_with_the_sudoers_line() -> None:
    resources = node_resources("system")
    facts = facts_for(fact_request(resources, "lab"), managed={}, sudo=False)
    plan = Plan("lab", "lab.yml", (diff_host("lab", resources, facts),))
    with pytest.raises(PlanError) as caught:
        check_sudo(plan, {"mac2": resources}, {"mac2": facts})
    message = str(caught.value)
    assert message.startswith("nothing was changed: mac2: `sudo -n` would ask orch")
    line = sudoers_line("orch", HOME)
    assert line in message
    assert line == (
        "orch ALL=(root) NOPASSWD: "
        "/bin/cp /Users/orch/.orch/system/com.orch.* /Library/LaunchDaemons/com.orch.*, "
        "/bin/chmod 644 /Library/LaunchDaemons/com.orch.*, "
        "/bin/rm -f /Library/LaunchDaemons/com.orch.*, "
        "/bin/launchctl bootstrap system /Library/LaunchDaemons/com.orch.*, "
        "/bin/launchctl bootout system/com.orch.*, "
        "/bin/launchctl kickstart -k system/com.orch.*, "
        "/usr/sbin/sysctl -w iogpu.wired_limit_mb=*")


def test_sudo_is_asked_and_required_only_where_root_is_needed() -> None:
    daemon = node_resources("system")
    agent = node_resources("user")
    assert fact_request(daemon, "lab").sudo and not fact_request(agent, "lab").sudo
    assert FactRequest(sudo=True).to_json()["sudo"] is True
    assert "sudo" not in FactRequest().to_json()  # not asked: the agent runs no probe
    facts = facts_for(fact_request(agent, "lab"), managed={}, sudo=False)
    plan = Plan("lab", "lab.yml", (diff_host("lab", agent, facts),))
    check_sudo(plan, {"mac2": agent}, {"mac2": facts})  # user agents: no root, no refusal
    ready = facts_for(fact_request(daemon, "lab"), managed={}, sudo=True)
    plan = Plan("lab", "lab.yml", (diff_host("lab", daemon, ready),))
    check_sudo(plan, {"mac2": daemon}, {"mac2": ready})
    assert isinstance(daemon[-1], LaunchdService)
