"""`worker_resources`: what one serving node holds, for one node and for a ring of three."""

from __future__ import annotations

import json
import plistlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from orchestrator.config import Cluster, Runtime
from orchestrator.facts import FileFact, FileKind, HostFacts, JobState, LaunchdJob
from orchestrator.placement.choose import Placement
from orchestrator.placement.policy import GIB
from orchestrator.resources.base import Resource
from orchestrator.resources.files import File
from orchestrator.resources.launchd import HASH_ENV, LaunchdService
from orchestrator.resources.layout import WorkerLayout, api_url
from orchestrator.resources.pyenv import PythonEnv
from orchestrator.resources.sysctl import Sysctl
from orchestrator.resources.wheelhouse import NodePlatform, Wheel, Wheelhouse, WheelhouseFiles
from orchestrator.resources.wired import default_wired_limit_mb, wired_limit
from orchestrator.resources.worker import (
    FileDigest,
    ModelInputs,
    WorkerSettings,
    model_inputs,
    worker_resources,
    worker_services,
)
from orchestrator.worker import worker_script
from orchestrator.worker.hostfile import parse_hostfile
from tests.fixtures.facts import HOME
from tests.unit.serving.helpers import cluster, placement
from tests.unit.serving.helpers import files as rank_files

MODEL = "~/.orch/models/tiny"


def resources(n: int = 3, rank: int = 0, *, c: Cluster | None = None,
              p: Placement | None = None, home: str = HOME, system: str = "Darwin",
              user: str = "orch",
              files: Mapping[str, FileDigest] | None = None, model_files_id: str | None = None,
              inputs_digest: str = "", wheelhouse: Wheelhouse | None = None,
              settings: WorkerSettings | None = None) -> list[Resource]:
    c = c or cluster(n)
    p = p or placement(c)
    return worker_resources(c, p, p.nodes[rank], home=home, system=system, user=user,
                            model_dir=MODEL,
                            files=rank_files() if files is None else files,
                            model_files_id=model_files_id, inputs_digest=inputs_digest,
                            wheelhouse=wheelhouse, settings=settings)


R = TypeVar("R")


def by_type(items: list[Resource], kind: type[R]) -> list[R]:
    return [r for r in items if isinstance(r, kind)]


def service(items: list[Resource]) -> LaunchdService:
    [svc] = by_type(items, LaunchdService)
    return svc


def plist(items: list[Resource]) -> dict[str, Any]:
    loaded: dict[str, Any] = plistlib.loads(service(items).plist.encode())
    return loaded


def file(items: list[Resource], suffix: str) -> File:
    [found] = [r for r in by_type(items, File) if r.path.endswith(suffix)]
    return found


def test_three_nodes_in_apply_order_with_the_job_last() -> None:
    ids = [r.id for r in resources(3)]
    assert ids == [
        "python_env:~/.orch/serve/lab/venv",
        "directory:~/.orch/serve/lab",
        "directory:~/.orch/serve/lab/hf-cache",
        "file:~/.orch/serve/lab/mlx_worker.py",
        "file:~/.orch/serve/lab/hostfile.json",
        "file:~/.orch/serve/lab/worker.json",
        "launchd:system/com.orch.lab.worker",
    ]
    assert WorkerLayout(cluster=(c := cluster(3)).name).service_id == ids[-1]
    assert c.name == "lab"


def test_one_node_has_no_hostfile_and_no_mlx_hostfile() -> None:
    """A one-entry hostfile makes mlx wait forever: a single node runs without a ring."""
    items = resources(1)
    assert not [r for r in items if isinstance(r, File) and r.path.endswith("hostfile.json")]
    env = plist(items)["EnvironmentVariables"]
    assert isinstance(env, dict)
    assert "MLX_HOSTFILE" not in env and env["MLX_RANK"] == "0"
    config = json.loads(file(items, "worker.json").content)
    assert config["expected_world_size"] == 1 and config["split"] == [6]


def test_hostfile_lists_each_rank_ring_ip_and_port_in_rank_order() -> None:
    c = cluster(3, runtime=Runtime(ring_port=47100))
    p = placement(c)
    hostfile = file(resources(c=c, p=p), "hostfile.json")
    assert parse_hostfile(hostfile.content) == (("10.0.1.1", 47100), ("10.0.1.2", 47101),
                                                ("10.0.1.3", 47102))
    # every rank gets the same file
    assert all(file(resources(c=c, p=p, rank=r), "hostfile.json") == hostfile
               for r in range(3))


def test_worker_is_a_launchdaemon_running_as_the_ssh_user_with_its_own_environment() -> None:
    """TN3179: a launchd agent's LAN connections fail; a daemon's do not, and it loads at boot.
    launchd gives a daemon a minimal environment: the plist names the user and HOME itself."""
    items = resources(3, rank=1, user="alice")
    body = plist(items)
    assert body["UserName"] == "alice"
    assert "LimitLoadToSessionType" not in body  # an agents-only key
    assert body["KeepAlive"] is True and body["RunAtLoad"] is True
    assert body["ProgramArguments"][0] == f"{HOME}/.orch/serve/lab/venv/bin/python"
    env = body["EnvironmentVariables"]
    assert {k: env[k] for k in ("HOME", "USER", "LOGNAME", "MLX_RANK")} == \
        {"HOME": HOME, "USER": "alice", "LOGNAME": "alice", "MLX_RANK": "1"}
    svc = service(items)
    assert svc.domain == "system" and svc.id == "launchd:system/com.orch.lab.worker"
    assert svc.plist_path == "/Library/LaunchDaemons/com.orch.lab.worker.plist"
    assert svc.staged == "~/.orch/system/com.orch.lab.worker.plist"
    assert svc.facts_needed().sudo  # the plan asks whether sudo -n works
    [change] = [c for c in [svc.diff(_bare_facts())] if c is not None]
    assert [(s.op, s.request().get("path") or s.request().get("dest")) for s in change.steps] == [
        ("write", "~/.orch/system/com.orch.lab.worker.plist"),
        ("install_system", "/Library/LaunchDaemons/com.orch.lab.worker.plist"),
        ("launchd_bootstrap", None)]
    assert change.steps[-1].request()["domain"] == "system"
    assert [s.op for s in svc.cleanup()] == ["launchd_bootout", "remove_system", "remove"]


def _bare_facts() -> HostFacts:
    """A Mac with nothing of orch's: the plist missing, the job not loaded."""
    missing = FileFact(FileKind.MISSING, None, None, None)
    return HostFacts("mac2", "Darwin", "15.5", "alice", 501, HOME, "3.12.0", None, None,
                     files={"/Library/LaunchDaemons/com.orch.lab.worker.plist": missing},
                     launchd={"system/com.orch.lab.worker":
                              LaunchdJob(JobState.NOT_LOADED, None, None, {})})


def test_plist_runs_the_worker_in_the_user_domain_when_asked() -> None:
    items = resources(c=cluster(3, runtime=Runtime(launchd_domain="user")), rank=1)
    body = plist(items)
    assert "UserName" not in body and "HOME" not in body["EnvironmentVariables"]
    assert body["Label"] == "com.orch.lab.worker"
    assert body["ProgramArguments"] == [f"{HOME}/.orch/serve/lab/venv/bin/python",
                                        f"{HOME}/.orch/serve/lab/mlx_worker.py",
                                        f"{HOME}/.orch/serve/lab/worker.json"]
    assert body["LimitLoadToSessionType"] == "Background"
    assert body["ProcessType"] == "Interactive"
    assert body["KeepAlive"] is True and body["ThrottleInterval"] == 10
    assert body["StandardOutPath"] == body["StandardErrorPath"] == \
        f"{HOME}/.orch/serve/lab/worker.log"
    assert body["WorkingDirectory"] == f"{HOME}/.orch/serve/lab"
    env = body["EnvironmentVariables"]
    assert isinstance(env, dict)
    assert {k: env[k] for k in ("MLX_RANK", "MLX_HOSTFILE", "HF_HUB_OFFLINE", "HF_HUB_CACHE")} \
        == {"MLX_RANK": "1", "MLX_HOSTFILE": f"{HOME}/.orch/serve/lab/hostfile.json",
            "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": f"{HOME}/.orch/serve/lab/hf-cache"}
    svc = service(items)
    assert svc.plist_path == "~/Library/LaunchAgents/com.orch.lab.worker.plist"
    assert svc.domain == "user"


def test_worker_config_has_what_the_worker_reads() -> None:
    c = cluster(3)
    p = placement(c)
    config = json.loads(file(resources(c=c, p=p, rank=2), "worker.json").content)
    assert config == {
        "model_dir": f"{HOME}/.orch/models/tiny",
        "split": list(p.split),
        "host": "10.0.0.1",  # rank 0's address: the controller reaches the API there
        "port": 8080,
        "expected_world_size": 3,
        "files": {"f0.safetensors": {"sha256": "0" * 64, "size": 100},
                  "f1.safetensors": {"sha256": "1" * 64, "size": 101},
                  "f2.safetensors": {"sha256": "2" * 64, "size": 102},
                  "model.safetensors.index.json": "a" * 64},
        "status_path": f"{HOME}/.orch/serve/lab/status.json",
        "rendezvous": "10.0.1.1:47200",  # rank 0's ring IP, runtime.rendezvous_port
    }
    assert api_url(c, p) == "http://10.0.0.1:8080"


def test_script_is_the_packaged_worker() -> None:
    assert file(resources(3), "mlx_worker.py").content == worker_script().decode()


def test_any_input_change_changes_the_plist_hash_and_nothing_else_does() -> None:
    def config_hash(items: list[Resource]) -> str:
        return str(plist(items)["EnvironmentVariables"][HASH_ENV])

    base = config_hash(resources(3))
    assert config_hash(resources(3)) == base  # deterministic
    other_files = rank_files() | {"f0.safetensors": ("f" * 64, 100)}
    assert config_hash(resources(3, files=other_files)) != base  # a model file, via the config
    assert config_hash(resources(3, inputs_digest="x")) != base
    assert config_hash(resources(3, settings=WorkerSettings(throttle_interval=5))) != base
    assert config_hash(resources(3, settings=WorkerSettings(env={"MLX_RING_VERBOSE": "1"}))) \
        != base
    assert config_hash(resources(3, home="/Users/other")) != base


def test_worker_services_finds_each_host_job() -> None:
    c = cluster(3)
    p = placement(c)
    desired = {n.name: resources(c=c, p=p, rank=n.rank) for n in p.nodes} | {"idle": []}
    services = worker_services(c, desired)
    assert sorted(services) == ["mac1", "mac2", "mac3"]
    assert all(s is desired[h][-1] for h, s in services.items())


def test_the_job_needs_its_files_env_and_the_model_files() -> None:
    items = resources(3, model_files_id="model_files:~/.orch/models/tiny")
    needs = service(items).needs
    assert "model_files:~/.orch/models/tiny" in needs
    assert {r.id for r in items[:-1]} <= set(needs)


# ------------------------------------------------------------------------------ wired limit


def test_default_wired_limit_is_two_thirds_up_to_36_gb_then_three_quarters() -> None:
    assert default_wired_limit_mb(16 * GIB) == 16 * 1024 * 2 // 3
    assert default_wired_limit_mb(36 * GIB) == 36 * 1024 * 2 // 3
    assert default_wired_limit_mb(64 * GIB) == 48 * 1024
    assert default_wired_limit_mb(192 * GIB) == 144 * 1024


def test_wired_limit_only_on_nodes_whose_share_exceeds_the_default() -> None:
    """The guide's cluster: 61 layers of DeepSeek-R1 need more than 3/4 of every node."""
    c = cluster(3)
    big = placement(c, layer_bytes=[7_200_000_000] * 58, shared=1_160_000_000)
    small = placement(c)
    for node in big.nodes:
        sysctl = wired_limit(node)
        assert isinstance(sysctl, Sysctl) and sysctl.name == "iogpu.wired_limit_mb"
        assert sysctl.value == node.wired_limit_mb > default_wired_limit_mb(node.memory_bytes)
        assert sysctl.label == "com.orch.wired-limit"
    assert all(wired_limit(node) is None for node in small.nodes)
    items = resources(c=c, p=big, rank=2)
    assert [r.id for r in by_type(items, Sysctl)] == ["sysctl:iogpu.wired_limit_mb"]
    assert "sysctl:iogpu.wired_limit_mb" in service(items).needs
    assert not by_type(resources(c=c, p=small), Sysctl)


def test_the_boundary_is_the_share_against_the_default() -> None:
    node = placement(cluster(1, memory_gb=(64,))).nodes[0]
    limit_bytes = default_wired_limit_mb(node.memory_bytes) * 2**20
    fixed = node.overhead_bytes + node.kv_cache_bytes
    at = replace(node, weight_bytes=limit_bytes - fixed)
    over = replace(node, weight_bytes=limit_bytes - fixed + 2**20)
    assert at.bytes == limit_bytes and wired_limit(at) is None
    sysctl = wired_limit(over)
    assert sysctl is not None and sysctl.value == node.usable_bytes // 2**20


# ------------------------------------------------------------------------------ packages


def test_without_a_wheelhouse_the_pins_get_the_node_backend() -> None:
    mac = by_type(resources(3, system="Darwin"), PythonEnv)[0]
    linux = by_type(resources(3, system="Linux"), PythonEnv)[0]
    assert isinstance(mac, PythonEnv) and isinstance(linux, PythonEnv)
    assert mac.packages == ("mlx==0.32.4", "mlx-lm==0.32.2", "mlx-metal==0.32.4")
    assert linux.packages == ("mlx[cpu]==0.32.4", "mlx-lm==0.32.2", "mlx-cpu==0.32.4")
    assert mac.pip_args == ("--no-compile",)


def test_with_a_wheelhouse_it_is_pushed_first_and_the_venv_is_locked_to_it() -> None:
    wheels = (Wheel("mlx-0.32.4-cp311-cp311-macosx_14_0_arm64.whl", "1" * 64, 10),
              Wheel("mlx_lm-0.32.2-py3-none-any.whl", "2" * 64, 20),
              Wheel("numpy-2.4.6-cp311-cp311-macosx_14_0_arm64.whl", "3" * 64, 30))
    house = Wheelhouse(Path("/cache/w"), NodePlatform("Darwin", "arm64", "3.11", "14.5"),
                       ("mlx==0.32.4", "mlx-lm==0.32.2"), wheels)
    items = resources(3, wheelhouse=house)
    push, env = items[0], items[1]
    assert isinstance(push, WheelhouseFiles) and isinstance(env, PythonEnv)
    assert push.path == f"~/.orch/serve/lab/wheelhouse/{house.key}" and push.source == "/cache/w"
    assert env.packages == ("mlx-lm==0.32.2", "mlx==0.32.4", "numpy==2.4.6")
    assert env.pip_args == ("--no-compile", "--no-index", "--find-links",
                            f".orch/serve/lab/wheelhouse/{house.key}")
    other = replace(house, wheels=(*wheels[:2], Wheel(wheels[2].filename, "4" * 64, 30)))
    assert other.key != house.key  # content-addressed: a changed wheel is a new directory


def test_model_inputs_from_the_shard_sync() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Entry:
        size: int
        sha256: str | None

    @dataclass(frozen=True)
    class Manifest:
        files: Mapping[str, Entry]

    @dataclass(frozen=True)
    class Files:
        directory: str
        needed: frozenset[str]
        manifest: Manifest

        @property
        def id(self) -> str:
            return f"model_files:{self.directory}"

    manifest = Manifest({"a.safetensors": Entry(10, "a" * 64),
                         "b.safetensors": Entry(20, "b" * 64), "README.md": Entry(1, None)})
    inputs = model_inputs(Files("~/.orch/models/m", frozenset({"a.safetensors"}), manifest))
    assert inputs == ModelInputs("~/.orch/models/m", {"a.safetensors": ("a" * 64, 10)},
                                 "model_files:~/.orch/models/m")
    with pytest.raises(ValueError, match="no sha256"):
        model_inputs(Files("~/m", frozenset({"README.md"}), manifest))


def test_a_venv_made_by_another_python_than_the_wheelhouses_is_made_again() -> None:
    """The wheelhouse is for the chosen interpreter's version; a venv an older orch (or
    another runtime.python) made with another one would get wheels it cannot install."""
    from orchestrator.facts import VenvFact
    from orchestrator.resources.steps import Run
    from tests.fixtures.facts import host_facts

    house = Wheelhouse(Path("/cache/w"), NodePlatform("Darwin", "arm64", "3.12", "15.3"),
                       ("mlx==0.32.4",), (Wheel("mlx-0.32.4-cp312-cp312-macosx_15_0_arm64.whl",
                                                "1" * 64, 10),))
    env = by_type(resources(3, wheelhouse=house), PythonEnv)[0]
    assert isinstance(env, PythonEnv) and env.python_version == "3.12"
    pinned = {"mlx": "0.32.4"}

    def venv_of(version: str | None) -> object:
        return env.diff(host_facts(venvs={env.path: VenvFact(True, version, pinned)}))

    assert venv_of("3.12.1") is None  # a patch release is the same interpreter for wheels
    assert venv_of(None) is None  # a pyvenv.cfg without a version: no opinion
    change = venv_of("3.11.7")
    assert change is not None
    assert [(f.name, f.before, f.after) for f in change.fields] == [("python", "3.11", "3.12")]
    remake, install = change.steps
    assert isinstance(remake, Run) and isinstance(install, Run)
    assert remake.argv == (env.python, "-m", "venv", "--clear", ".orch/serve/lab/venv")
    assert install.argv[:3] == (".orch/serve/lab/venv/bin/python", "-m", "pip")
