"""What `orch sandbox up` does after the simulated Macs are up: the real `orch apply`, then a
question to the ring, and the `curl` line to ask another."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable

from orchestrator import render
from orchestrator.config import load_cluster
from orchestrator.errors import ExitCode
from orchestrator.executor import SSHOptions
from orchestrator.run import engine
from orchestrator.run.apply import HostStatus
from orchestrator.run.engine import RunOptions
from orchestrator.simulator.cluster import Sandbox
from orchestrator.verify.health import chat_completion

PROMPT = "Name three colours."


def curl_line(api_url: str, prompt: str) -> str:
    body = json.dumps({"model": "default_model", "max_tokens": 32,
                       "messages": [{"role": "user", "content": prompt}]})
    return (f"curl -s {api_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(body)}")


async def apply_and_ask(sandbox: Sandbox, *, echo: Callable[[str], None]) -> ExitCode:
    cluster = load_cluster(sandbox.cluster_file)
    options = RunOptions(ssh=SSHOptions(known_hosts=sandbox.known_hosts))
    result, report = await engine.apply(cluster, options, command="orch sandbox up")
    echo(render.plan_text(result))
    echo(render.report_text(report))
    if report.by_status(HostStatus.FAILED) or report.by_status(HostStatus.UNREACHABLE):
        return ExitCode.ERROR
    completion = await chat_completion(sandbox.api_url, PROMPT, max_tokens=24, timeout=300)
    echo(f"\nQ: {PROMPT}\nA from the {len(sandbox.nodes)}-node ring "
         f"({len(completion.token_ids)} tokens; the sandbox model has random weights, so the "
         f"words are noise): {completion.text!r}\n   token ids: {list(completion.token_ids)}")
    echo("\nAsk it yourself:\n  " + curl_line(sandbox.api_url, "Hello!"))
    echo(f"Plan it again (no flags: the inventory names its known_hosts):\n"
         f"  orch plan {sandbox.cluster_file}")
    return ExitCode.OK
