"""Is the service ready? Every rank serving, the ring of the right size, and a real completion.

Why a completion and not ``/health``: mlx-lm's server answers ``/health`` as soon as rank 0's
HTTP is up, before any rank has loaded; and a ring with a dead peer still answers HTTP. Only a
chat completion proves the whole pipeline ran. `wait_ready` polls ``/health`` until it is 200,
then sends one greedy chat completion (a request queues until the model has loaded, so its
timeout is the time left), retrying until one succeeds or the timeout passes.

When it does not become ready, `explain_not_ready` names the rank to look at — the first one
that is dead or failed, else the first not yet serving, else rank 0 — with the end of its log.

HTTP goes through a one-function `Transport` (stdlib ``urllib`` in a thread by default), the seam
unit tests replace. Nothing here imports mlx.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from orchestrator.errors import ServiceError
from orchestrator.plan.ring import RankSnapshot
from orchestrator.worker.status import WorkerState

# (url, JSON body or None for GET, timeout seconds) -> (HTTP status, body). Raises OSError when
# no HTTP answer came (refused, reset, timed out).
Transport = Callable[[str, bytes | None, float], tuple[int, bytes]]

LOG_TAIL_LINES = 30


def urllib_transport(url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """The default transport: one blocking urllib request; HTTP errors are answers too."""
    request = urllib.request.Request(  # noqa: S310 - the URL is the cluster's own API
        url, data=body, method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except http.client.HTTPException as exc:  # a malformed or cut answer: no answer
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc


class ReadyStage(Enum):
    """How far the last attempt got."""

    UNREACHABLE = "unreachable"  # no HTTP answer from rank 0
    UNHEALTHY = "unhealthy"  # /health answered, not 200 (e.g. 503: a rank or the generator died)
    NO_COMPLETION = "no_completion"  # /health 200, but the chat completion failed or timed out
    READY = "ready"


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]  # from the response's logprobs
    logprobs: tuple[float, ...]  # of each chosen token
    finish_reason: str | None


@dataclass(frozen=True)
class ReadyResult:
    stage: ReadyStage
    elapsed: float  # seconds
    attempts: int
    detail: str  # the last failure, or "ready"
    completion: Completion | None

    @property
    def ready(self) -> bool:
        return self.stage is ReadyStage.READY


class CompletionError(ServiceError):
    """A chat completion came back without a usable answer, or no answer came."""


async def chat_completion(api_url: str, prompt: str, *, model: str = "default_model",
                          max_tokens: int = 4, timeout: float = 60.0,
                          transport: Transport = urllib_transport) -> Completion:
    """One greedy chat completion (temperature 0) with token ids, or CompletionError (also when
    no HTTP answer came: refused, reset, timed out).

    ``model`` stays ``"default_model"`` unless you know better: a name other than the loaded
    model makes mlx-lm reload on every rank (orch's worker pins it, plain mlx-lm does not).
    """
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "logprobs": True,
    }).encode()
    url = api_url.rstrip("/") + "/v1/chat/completions"
    try:
        status, raw = await asyncio.to_thread(transport, url, body, timeout)
    except OSError as exc:
        raise CompletionError(f"no answer from {url}: {type(exc).__name__}: {exc}") from exc
    if status != 200:
        raise CompletionError(f"/v1/chat/completions answered {status}: {_snippet(raw)}")
    return parse_completion(raw)


def parse_completion(raw: bytes) -> Completion:
    """The text, token ids and finish reason of a non-streamed chat completion response."""
    try:
        choice = json.loads(raw)["choices"][0]
        text = choice["message"]["content"]
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        token_ids = tuple(int(item["id"]) for item in logprobs)
        token_logprobs = tuple(float(item["logprob"]) for item in logprobs)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CompletionError(f"not a chat completion ({exc!r}): {_snippet(raw)}") from exc
    if not isinstance(text, str):
        raise CompletionError(f"completion content is not text: {_snippet(raw)}")
    reason = choice.get("finish_reason")
    return Completion(text, token_ids, token_logprobs,
                      reason if isinstance(reason, str) else None)


FIRST_POLL = 0.1  # seconds between wait_ready's first two polls


async def wait_ready(api_url: str, model: str = "default_model", timeout: float = 600.0, *,
                     prompt: str = "Say OK.", max_tokens: int = 4, poll_interval: float = 1.0,
                     transport: Transport = urllib_transport) -> ReadyResult:
    """Poll until rank 0 answers a real chat completion, or ``timeout`` seconds pass.

    The first polls come FIRST_POLL apart, doubling up to ``poll_interval``: a ring that is
    up (a no-op apply) or about to be is seen within a fraction of a second instead of at the
    next whole interval, and one that takes a minute to load is not asked more often."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    attempts = 0
    delay = min(FIRST_POLL, poll_interval)
    stage, detail = ReadyStage.UNREACHABLE, "no attempt made"  # timeout <= 0
    while (remaining := deadline - loop.time()) > 0:
        attempts += 1
        stage = ReadyStage.UNREACHABLE
        try:
            status, raw = await asyncio.to_thread(
                transport, api_url.rstrip("/") + "/health", None, min(10.0, remaining))
            if status != 200:
                stage = ReadyStage.UNHEALTHY
                detail = f"/health answered {status}: {_snippet(raw)}"
            else:
                stage = ReadyStage.NO_COMPLETION
                completion = await chat_completion(
                    api_url, prompt, model=model, max_tokens=max_tokens,
                    timeout=max(0.1, deadline - loop.time()), transport=transport)
                return ReadyResult(ReadyStage.READY, loop.time() - started, attempts,
                                   "ready", completion)
        except CompletionError as exc:
            detail = str(exc)
        except OSError as exc:
            detail = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(max(0.0, min(delay, deadline - loop.time())))
        delay = min(delay * 2, poll_interval)
    return ReadyResult(stage, loop.time() - started, attempts,
                       f"not ready after {timeout:g} s: {detail}", None)


# ------------------------------------------------------------------------- ranks and failures


def rank_problems(ranks: Sequence[RankSnapshot], expected_world_size: int) -> tuple[str, ...]:
    """Everything that stops the ring from serving, one line per problem, rank order."""
    problems = []
    by_rank = {r.rank: r for r in ranks}
    for rank in range(expected_world_size):
        snap = by_rank.get(rank)
        if snap is None:
            problems.append(f"rank {rank}: unknown (no node reported it)")
            continue
        problems += [f"rank {rank} ({snap.host}): {p}"
                     for p in _problems(snap, expected_world_size)]
    return tuple(problems)


def _problems(snap: RankSnapshot, expected_world_size: int) -> list[str]:
    status = snap.status
    problems = []
    if snap.running is False:
        code = "" if snap.exit_code is None else f" (last exit {snap.exit_code})"
        problems.append(f"not running{code}")
    if status is None:
        problems.append("no status file")
        return problems
    if status.state is WorkerState.FAILED:
        problems.append(f"failed: {status.error}")
    elif status.state is not WorkerState.SERVING:
        problems.append(f"still {status.state.value}")
    if status.world_size != expected_world_size:
        problems.append(f"ring size {status.world_size}, expected {expected_world_size}")
    if status.rank != snap.rank:
        problems.append(f"status file is rank {status.rank}'s")
    return problems


def culprit(ranks: Sequence[RankSnapshot]) -> RankSnapshot | None:
    """The rank to show: dead or failed first, else not serving, else rank 0."""
    ordered = sorted(ranks, key=lambda r: r.rank)

    def broken(r: RankSnapshot) -> bool:
        return r.running is False or (r.status is not None
                                      and r.status.state is WorkerState.FAILED)

    def waiting(r: RankSnapshot) -> bool:
        return r.status is None or r.status.state is not WorkerState.SERVING

    for test in (broken, waiting):
        found = next((r for r in ordered if test(r)), None)
        if found is not None:
            return found
    return ordered[0] if ordered else None


def explain_not_ready(result: ReadyResult, ranks: Sequence[RankSnapshot],
                      expected_world_size: int, tail_lines: int = LOG_TAIL_LINES) -> str:
    """The message a user reads when readiness fails: what, which rank, and its log's end."""
    lines = [f"the service is not ready ({result.stage.value}, {result.attempts} attempts): "
             f"{result.detail}"]
    lines += [f"  {p}" for p in rank_problems(ranks, expected_world_size)]
    suspect = culprit(ranks)
    if suspect is not None:
        tail = suspect.log_tail.rstrip("\n").splitlines()[-tail_lines:]
        lines.append(f"last {len(tail)} log lines of rank {suspect.rank} ({suspect.host}):")
        lines += [f"  | {line}" for line in tail] or ["  | (empty log)"]
    return "\n".join(lines)


def _snippet(raw: bytes, limit: int = 300) -> str:
    text = raw.decode("utf-8", "replace").strip()
    return text if len(text) <= limit else text[:limit] + "…"
