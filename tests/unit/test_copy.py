"""The `copy:` resource against a real agent (LocalConnection: the agent session on this
machine): facts -> diff -> steps streamed through the session -> facts again is converged."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from orchestrator.executor import FileStream
from orchestrator.executor.fake import LocalConnection
from orchestrator.facts import HostFacts, parse_facts
from orchestrator.resources.base import Action
from orchestrator.resources.copy import Copy
from orchestrator.resources.steps import ControllerFile, Remove, Rmdir, Write
from orchestrator.run.apply import run_step


async def facts_of(conn: LocalConnection, resource: Copy) -> HostFacts:
    request = resource.facts_needed()
    return parse_facts(conn.name, await conn.agent("facts", request.to_json()), request)


def test_a_copied_tree_converges_and_only_changed_files_are_sent(tmp_path: Path) -> None:
    home, src = tmp_path / "home", tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    home.mkdir()
    big = os.urandom(3 * FileStream.CHUNK + 1)  # several chunks, the last one short
    (src / "big.bin").write_bytes(big)
    (src / "deep" / "er" / "small.txt").write_text("small\n")

    async def scenario() -> None:
        conn = LocalConnection(home, name="n1")
        try:
            copy = Copy.of(src, "~/dest", 0o640)
            change = copy.diff(await facts_of(conn, copy))
            assert change is not None and change.action is Action.CREATE
            assert [s.path for s in change.steps if isinstance(s, Write)] == [
                "~/dest/big.bin", "~/dest/deep/er/small.txt"]
            assert all(isinstance(s, Write) and isinstance(s.payload, ControllerFile)
                       for s in change.steps)  # the plan holds paths and hashes, not bytes
            for step in change.steps:
                await run_step(conn, step)
            assert (home / "dest" / "big.bin").read_bytes() == big
            assert (home / "dest" / "big.bin").stat().st_mode & 0o777 == 0o640
            assert copy.diff(await facts_of(conn, copy)) is None  # converged: nothing to send

            (src / "deep" / "er" / "small.txt").write_text("changed\n")
            again = Copy.of(src, "~/dest", 0o640)
            change = again.diff(await facts_of(conn, again))
            assert change is not None and change.action is Action.UPDATE
            assert [s.path for s in change.steps if isinstance(s, Write)] == [
                "~/dest/deep/er/small.txt"]
            assert change.fields[0].before == "1 of 2 match"
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_cleanup_removes_the_copied_files_then_their_directories_deepest_first(
        tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("x")
    (tmp_path / "a" / "g").write_text("y")
    copy = Copy.of(tmp_path / "a", "/opt/x/", 0o644)
    assert copy.id == "copy:/opt/x"
    assert copy.cleanup() == (Remove("/opt/x/b/f"), Remove("/opt/x/g"), Rmdir("/opt/x/b"),
                              Rmdir("/opt/x"))
    single = Copy.of(tmp_path / "a" / "g", "~/g", 0o600)
    assert single.cleanup() == (Remove("~/g"),)
