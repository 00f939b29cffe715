"""A controller file sent through the agent's ``write`` is streamed: neither side holds it.

The local ``model.path`` source sends each shard this way, so a 5 GB file must cost the
controller and the agent one chunk each. Measured in a child process (its own peak RSS, and
its agent's via RUSAGE_CHILDREN), with a file several times larger than the bound asserted,
so reading it whole on either side fails the test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import ActionFailed
from orchestrator.executor import FileStream
from orchestrator.executor.fake import LocalConnection

SIZE = 256 << 20
BOUND_KB = 96 << 10  # 96 MiB, well under the 256 MiB file (the agent peaks near 48 MiB)

SCRIPT = r"""
import asyncio, hashlib, json, os, resource, sys
from pathlib import Path
from orchestrator.executor import FileStream
from orchestrator.executor.fake import LocalConnection

src, home, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
digest = hashlib.sha256()
with src.open("wb") as f:  # incompressible, written a chunk at a time
    for _ in range(size >> 20):
        chunk = os.urandom(1 << 20)
        digest.update(chunk)
        f.write(chunk)

async def main():
    conn = LocalConnection(home)
    await conn.agent("facts", {})  # the session is up: its cost is in the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    answer = await conn.agent("write", {"path": "~/m/shard", "mode": 0o644,
                                        "sha256": digest.hexdigest(), "timeout": 600},
                              stdin=FileStream(src, size))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await conn.close()
    agent = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"answer": answer, "controller_growth_kb": after - before,
                      "agent_peak_kb": agent}))

asyncio.run(main())
"""


def test_a_large_controller_file_is_streamed_in_bounded_memory(tmp_path: Path) -> None:
    src, home = tmp_path / "shard", tmp_path / "home"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(src), str(home), str(SIZE)],
                         capture_output=True, check=True, timeout=300).stdout
    result = json.loads(out.splitlines()[-1])  # the last line: log events may precede it
    assert result["answer"]["changed"] is True
    assert (home / "m" / "shard").stat().st_size == SIZE
    assert result["controller_growth_kb"] < BOUND_KB, result
    assert result["agent_peak_kb"] < BOUND_KB, result


def test_a_file_that_shrank_fails_the_write_and_the_session_recovers(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x" * 1000)
    conn = LocalConnection(tmp_path / "home")

    async def main() -> None:
        with pytest.raises(ActionFailed, match="changed while it was being sent"):
            await conn.agent("write", {"path": "~/f", "mode": 0o644, "sha256": "0" * 64},
                             stdin=FileStream(src, 5000))
        assert (await conn.agent("facts", {}))["home"]  # a new session answers
        await conn.close()

    asyncio.run(main())
    assert not (tmp_path / "home" / "f").exists()
