"""A fake node that answers the agent ops `verify_ring` and `gather_status` use, and a fake API."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.executor import CommandResult
from orchestrator.worker.status import WorkerStatus
from tests.fixtures.facts import HOME

LAYOUT_STATUS = "~/.orch/serve/lab/status.json"


def status_text(s: WorkerStatus) -> str:
    return json.dumps({"rank": s.rank, "world_size": s.world_size, "split": list(s.split),
                       "layers": list(s.layers), "state": s.state.value, "pid": s.pid,
                       "started_at": s.started_at, "updated_at": s.updated_at,
                       "error": s.error, "param_bytes": s.param_bytes})


@dataclass
class FakeNode:
    """`Connection` of one node whose job, status file, log, ps and venv the test sets."""

    name: str
    job: dict[str, Any] = field(default_factory=lambda: {
        "state": "running", "pid": 100, "last_exit": None, "env": {}})
    status: WorkerStatus | None = None
    log: str = ""
    ps: str = "  204800   01:02:03\n"
    packages: Mapping[str, str] = field(default_factory=lambda: {"mlx": "0.32.4",
                                                                 "mlx-lm": "0.32.2"})
    files: Mapping[str, str] = field(default_factory=dict)  # path -> sha256
    file_size: int = 1  # the size of every file in `files`
    # answered only when asked, as the agent does: the Pythons found, `sudo -n`, free disk
    pythons: Sequence[tuple[str, str]] = (("/usr/bin/python3", "3.9.6"),)
    sudo: bool = True
    disk_free: int = 10**12
    round_trips: int = 0
    calls: list[tuple[str, Any]] = field(default_factory=list)

    async def run(self, argv: Sequence[str], *, stdin: bytes | None = None,
                  timeout: float | None = None) -> CommandResult:
        raise AssertionError(f"unexpected run {argv}")

    async def agent(self, op: str, request: Mapping[str, Any], *,
                    stdin: bytes | None = None) -> dict[str, Any]:
        self.round_trips += 1
        self.calls.append((op, dict(request)))
        if op == "facts":
            return self._facts(request)
        if op == "read":
            return {"contents": {p: (status_text(self.status) if self.status and
                                     p == LAYOUT_STATUS else None) for p in request["paths"]}}
        if op == "run":
            argv = request["argv"]
            if argv[0] == "tail":
                return {"exit_status": 0, "stdout": self.log, "stderr": "", "skipped": False}
            if argv[0] == "ps":
                ok = self.job["state"] == "running" and argv[-1] == str(self.job["pid"])
                return {"exit_status": 0 if ok else 1, "stdout": self.ps if ok else "",
                        "stderr": "", "skipped": False}
        raise AssertionError(f"unexpected agent op {op} {request}")

    def _facts(self, request: Mapping[str, Any]) -> dict[str, Any]:
        asked: dict[str, Any] = {}
        if "pythons" in request:
            asked["pythons"] = {"developer_tools": True, "found": [
                {"path": path, "version": version, "stub": False}
                for path, version in self.pythons]}
        if request.get("sudo"):
            asked["sudo"] = self.sudo
        if request.get("disk"):
            asked["disk"] = {d: {"volume": "/", "free_bytes": self.disk_free}
                             for d in request["disk"]}
        return asked | {
            "agent": {"version": "test"},
            "os": {"system": "Darwin", "product_version": "14.5"},
            "user": "orch", "uid": 501, "home": HOME,
            "python": {"executable": "/usr/bin/python3", "version": "3.11.7"},
            "memory_bytes": 2**37, "chip": "Apple M2 Ultra",
            "files": {p: ({"kind": "file", "size": self.file_size, "mode": 0o644,
                           "sha256": self.files[p]}
                          if p in self.files else
                          {"kind": "missing", "size": None, "mode": None, "sha256": None})
                      for p in request["files"]},
            "venvs": {v: {"exists": True, "python_version": "3.11.7",
                          "packages": dict(self.packages)} for v in request["venvs"]},
            "launchd": {f"{j['domain']}/{j['label']}": self.job for j in request["launchd"]},
            "sysctl": {}, "guards": {}, "managed": {},
            "trees": {t: {} for t in request.get("trees", [])},
            "texts": {p: (status_text(self.status) if self.status and p == LAYOUT_STATUS
                          else None) for p in request.get("texts", [])},
            "counters": {"files_hashed": 0, "bytes_hashed": 0, "hash_cache_hits": 0},
        }

    async def close(self) -> None:
        return None


COMPLETION = json.dumps({"choices": [{
    "message": {"content": "OK"}, "finish_reason": "length",
    "logprobs": {"content": [{"id": 7, "logprob": -0.5}, {"id": 9, "logprob": -0.25}]}}]})


@dataclass
class FakeAPI:
    """A `Transport` for rank 0's API: /health answers `health`; chat answers or raises."""

    health: int = 200
    chat: bool = True
    requests: list[str] = field(default_factory=list)

    def __call__(self, url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
        self.requests.append(url)
        if url.endswith("/health"):
            return self.health, b"{}"
        if not self.chat:
            raise ConnectionRefusedError("connection refused")
        return 200, COMPLETION.encode()
