"""ModelFiles: facts in, the change (or none) out; and the stray-weight guard run for real."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.drain import prestaged
from orchestrator.facts import FileFact, FileKind
from orchestrator.model.manifest import model_directory
from orchestrator.plan import HostPlan, Plan
from orchestrator.plan.ring import restart_change
from orchestrator.resources.base import Action, Change, FieldChange
from orchestrator.resources.files import File
from orchestrator.resources.launchd import LaunchdService
from orchestrator.resources.model_files import (
    ModelFiles,
    model_files_by_host,
    model_files_in,
)
from orchestrator.resources.steps import Fetch, Prune, Remove, Text, Write
from tests.unit.sync.helpers import DIRECTORY, META, WEIGHTS, facts, manifest, node, sha


def test_converged_host_has_no_change() -> None:
    model = node(WEIGHTS[:2])
    assert model.diff(facts("a", model, [*WEIGHTS[:2], *META])) is None


def test_holding_more_than_needed_is_converged() -> None:
    model = node(WEIGHTS[:2])  # the others' files are kept: other layers, and a LAN source
    assert model.diff(facts("a", model, [*WEIGHTS, *META])) is None


def test_fresh_host_fetches_each_needed_file_once_in_order() -> None:
    model = node(WEIGHTS[:2])
    change = model.diff(facts("a", model))
    assert change is not None and change.action is Action.CREATE
    wanted = sorted([*WEIGHTS[:2], *META])
    assert change.fetches == change.steps
    assert [s.file for s in change.fetches] == wanted
    entry = model.manifest.files[WEIGHTS[0]]
    assert entry.sha256 is not None
    assert change.steps[1] == Fetch(f"{DIRECTORY}/{WEIGHTS[0]}", WEIGHTS[0], entry.size,
                                    entry.sha256, git_sha1=None, source=None)
    assert change.fields[0].name == "verified"
    assert (change.fields[0].before, change.fields[0].after) == ("0 of 5 files", "5 of 5 files")
    assert change.cleanup == ()


def test_one_changed_file_is_named_with_both_hashes() -> None:
    model = node(WEIGHTS[:2])
    bad = WEIGHTS[1]
    held = {*WEIGHTS[:2], *META} - {bad}
    change = model.diff(facts("a", model, held, wrong={bad: "f" * 64}))
    assert change is not None and change.action is Action.UPDATE
    assert [(f.name, f.before, f.after) for f in change.fields[1:]] == [(bad, "f" * 64, sha(bad))]
    assert [s.file for s in change.fetches] == [bad] and change.fetches == change.steps


def test_facts_ask_for_every_hashed_file_of_the_revision_and_the_guard() -> None:
    model = node(WEIGHTS[:1])
    request = model.facts_needed()
    assert request.files == {f"{DIRECTORY}/{rel}" for rel in (*WEIGHTS, *META)}  # no README
    assert request.guards == {model.stray_guard}


def test_stray_weights_are_pruned_before_fetching() -> None:
    model = node(WEIGHTS[:1])
    change = model.diff(facts("a", model, [*WEIGHTS[:1], *META], strays=True))
    assert change is not None and change.action is Action.UPDATE
    assert [(f.name, f.before, f.after) for f in change.fields[1:]] == [
        ("stray_weight_files", "present", "none")]
    assert change.steps == (Prune(DIRECTORY, tuple(sorted(WEIGHTS)), "model*.safetensors"),)


def test_something_else_in_a_files_place_is_removed_first() -> None:
    model = node([])
    held = facts("a", model, META[1:])
    path = f"{DIRECTORY}/{META[0]}"
    files = {**held.files, path: FileFact(FileKind.DIR, None, 0o755, None)}
    change = model.diff(type(held)(**{**held.__dict__, "files": files}))
    assert change is not None
    [remove, fetch] = change.steps
    assert remove == Remove(path) and isinstance(fetch, Fetch) and fetch.path == path
    assert change.fields[1].before == "dir"


def test_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="under HOME"):
        ModelFiles("/opt/models/x", manifest(), frozenset())
    with pytest.raises(ValueError, match="not in the manifest"):
        ModelFiles(DIRECTORY, manifest(), frozenset({"nope.safetensors"}))
    with pytest.raises(ValueError, match="without sha256"):
        ModelFiles(DIRECTORY, manifest(), frozenset({"README.md"}))
    assert model_directory(".orch", "mlx-community/DeepSeek-R1-4bit") == \
        "~/.orch/models/mlx-community--DeepSeek-R1-4bit"
    with pytest.raises(ValueError):
        model_directory(".orch", "..")


def test_models_by_host_and_the_one_model_of_a_cluster() -> None:
    man = manifest()
    by_host = model_files_by_host(man, DIRECTORY, {"a": WEIGHTS[:3], "b": WEIGHTS[3:]},
                                  holders=["d"])
    assert by_host["a"].needed == {*WEIGHTS[:3], *META}
    assert by_host["d"].needed == frozenset()
    assert model_files_in({h: [m] for h, m in by_host.items()}) is not None
    assert model_files_in({"a": []}) is None
    other = ModelFiles("~/.orch/models/other", man, frozenset())
    with pytest.raises(ValueError, match="different model directories"):
        model_files_in({"a": [by_host["a"]], "b": [other]})


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


def guard_status(home: Path, model: ModelFiles) -> int:
    return subprocess.run(list(model.stray_guard.argv), env={**os.environ, "HOME": str(home)},
                          check=False).returncode


def test_stray_guard_finds_only_undeclared_model_weights(home: Path) -> None:
    model = node(WEIGHTS[:1])
    assert guard_status(home, model) == 1  # no directory yet
    directory = home / ".orch" / "models" / "org--tiny"
    directory.mkdir(parents=True)
    for rel in (WEIGHTS[0], WEIGHTS[4], "config.json", "notes.safetensors"):
        (directory / rel).write_bytes(b"x")
    (directory / "model-00001-of-00006.safetensors.partial").write_bytes(b"x")
    (directory / "model-dir.safetensors").mkdir()
    (directory / ".orch-verified").mkdir()
    assert guard_status(home, model) == 1  # declared, unrelated, partial, dir: no stray
    (directory / "model-00001-of-00009.safetensors").symlink_to(directory / WEIGHTS[0])
    assert guard_status(home, model) == 0


def test_drain_pre_stages_the_changes_that_copy_model_files_and_nothing_else() -> None:
    """`orch drain` copies files while the old ring serves: it keeps the changes carrying
    `Fetch` steps (found by type, not by a resource id's prefix); a restart must wait. A node
    coming back (outside the old ring) also gets everything but its worker's start then, so
    an undrain's cut-over only restarts ranks (issue #13 item 12)."""
    model = node(WEIGHTS[:2])
    fetching = model.diff(facts("a", model))
    assert fetching is not None
    hostfile = File("~/.orch/serve/lab/hostfile.json", "[]\n")
    written = Change(hostfile.id, Action.CREATE, (FieldChange("sha256", None, hostfile.sha256),),
                     (Write(hostfile.path, hostfile.mode, Text(hostfile.content)),))
    worker = LaunchdService("com.orch.w", "~/Library/LaunchAgents/com.orch.w.plist", "<plist/>")
    restart = restart_change(worker, "x")
    gone = Change("directory:~/old", Action.DELETE, (), ())
    plan = Plan("t", "t.yml", (HostPlan("a", (written, fetching, restart), {}),
                               HostPlan("b", (written, fetching, restart, gone), {})))
    keep = prestaged(["a"], worker.id)
    assert plan.only(keep).changes == [("a", fetching), ("b", written), ("b", fetching)]
