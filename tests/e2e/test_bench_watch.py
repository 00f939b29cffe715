"""`orch bench` and `orch status --watch` on the shared ``serving`` sandbox (see conftest).

- bench measures the real 3-rank MLX ring through its API: every number positive, the ratio
  to the placement's estimate reported (never judged: speeds are not asserted);
- a watch of three refreshes opens one SSH connection per node and one exec channel on it
  (the agent session), and every frame shows every node;
- ^C ends a watch with exit 0 and no traceback.

Both only read: the sandbox stays converged and serving.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from rich.console import Console

from orchestrator.config import load_cluster
from orchestrator.executor import SSHOptions
from orchestrator.run.engine import RunOptions
from orchestrator.watch import watch
from tests.e2e.conftest import Serving

NODES = ("mac1", "mac2", "mac3")
# One row of `orch bench`'s table: PROMPT TOKENS TTFT ms (min-max) DECODE tok/s (min-max) RATIO.
ROW = re.compile(r"^(?P<words>\d+) words +(?P<tokens>\d+) +(?P<ttft>\d+) \(\d+-\d+\) +"
                 r"(?P<decode>[\d.]+) \([\d.]+-[\d.]+\) +(?P<ratio>[\d.]+)$", re.MULTILINE)


def test_bench_reports_ttft_decode_speed_and_the_ratio_to_the_estimate(
        serving: Serving, tmp_path: Path) -> None:
    saved = tmp_path / "bench.json"
    ran = serving.orch("bench", "--prompt-words", "8,64", "--repeat", "2", "--max-tokens", "12",
                       "--out", saved)
    assert ran.returncode == 0, ran.output
    assert "TTFT ms" in ran.stdout and "DECODE tok/s" in ran.stdout, ran.stdout
    assert "8 words" in ran.stdout and "64 words" in ran.stdout
    assert "MEASURED/ESTIMATE" in ran.stdout and "tok/s (the placement's upper bound" in \
        ran.stdout
    result = json.loads(saved.read_text())
    assert result["api_url"] == serving.api_url
    assert result["estimate"]["decode_tokens_per_s"] > 0
    short, long = result["lengths"]
    assert short["prompt_tokens"] < long["prompt_tokens"]
    for length in result["lengths"]:
        assert length["ttft_s"]["median"] > 0 and length["ttft_s"]["n"] == 2
        assert length["decode_tokens_per_s"]["median"] > 0
        assert length["decode_vs_estimate"] > 0
        for sample in length["samples"]:
            assert sample["ttft_s"] > 0 and sample["first"]["completion_tokens"] == 1
            assert sample["long"]["completion_tokens"] >= 2
            for stream in (sample["first"], sample["long"]):
                # each prompt is new to the prompt cache: at most the chat template's start
                assert (stream["cached_tokens"] or 0) < stream["prompt_tokens"] // 2, sample
    # What the user reads is those numbers: per length a row with the TTFT, the decode speed
    # and their ratio to the estimate, which is printed beside them.
    rows = {int(m["words"]): m for m in ROW.finditer(ran.stdout)}
    assert sorted(rows) == [8, 64], ran.stdout
    for length in result["lengths"]:
        row = rows[length["prompt_words"]]
        assert int(row["tokens"]) == length["prompt_tokens"]
        assert int(row["ttft"]) == round(length["ttft_s"]["median"] * 1000) > 0
        assert float(row["decode"]) == round(length["decode_tokens_per_s"]["median"], 1) > 0
        assert row["ratio"] == f"{length['decode_vs_estimate']:.3f}"
    assert f"estimate: {result['estimate']['decode_tokens_per_s']:,.1f} tok/s" in ran.stdout
    print(ran.stdout)  # the numbers, for the record (-s)


def test_watch_refreshes_over_one_connection_and_one_channel_per_node(
        serving: Serving, monkeypatch: pytest.MonkeyPatch) -> None:
    connects: Counter[str] = Counter()
    real_connect = asyncssh.connect

    def counting(host: str, *args: Any, **kwargs: Any) -> Any:
        connects[host] += 1
        return real_connect(host, *args, **kwargs)

    monkeypatch.setattr(asyncssh, "connect", counting)
    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False)
    options = RunOptions(ssh=SSHOptions(known_hosts=serving.known_hosts))
    result = asyncio.run(watch(load_cluster(serving.cluster_file), options, interval=0.2,
                               count=3, console=console))
    assert result.refreshes == 3
    addresses = sorted(node["address"] for node in serving.sandbox.nodes)
    assert sorted(connects) == addresses and set(connects.values()) == {1}, connects
    assert result.round_trips == dict.fromkeys(NODES, 1), result.round_trips  # the session
    assert result.last is not None and result.last.healthy
    frames = out.getvalue().split("ring: ")
    assert len(frames) == 4, out.getvalue()  # three frames, each ending with the ring line
    for drawn in frames[:3]:
        rows = [line for line in drawn.splitlines() if line.startswith("│")]
        assert [row.split("│")[1].strip() for row in rows] == list(NODES), drawn
        assert all("serving" in row and " / " in row for row in rows), drawn
    assert out.getvalue().count("probe completion") == 3


def test_ctrl_c_ends_a_watch_with_exit_0(serving: Serving) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--log-format", "json", "status",
         str(serving.cluster_file), "--known-hosts", str(serving.known_hosts), "--watch",
         "--interval", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"})
    seen: list[str] = []
    drawn = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            seen.append(line)
            if line.startswith("api:"):
                drawn.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert drawn.wait(120), "".join(seen)  # a hang guard, not a speed
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        process.kill()
    reader.join(10)
    assert process.stderr is not None
    stderr = process.stderr.read()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert all(any(f"│ {node} " in line for line in seen) for node in NODES), "".join(seen)
