"""A local ring of real MLX workers, started the way launchd starts them on the Macs.

Each rank gets what orch would give its node: a model directory holding only the files that
rank needs (chosen by mlx-lm's own rule, with the worker's split hook applied), a worker config
listing those files with their sha256, the shared ring hostfile, and ``MLX_RANK``. Processes run
in their own process group so `stop_workers` can end them and anything they started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.worker import WORKER_SCRIPT
from orchestrator.worker.hostfile import render_hostfile
from orchestrator.worker.status import WorkerStatus, parse_status
from tests.fixtures.mlx_lm import mlx_lm_rank_files

INDEX = "model.safetensors.index.json"


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_rank_dir(full: Path, dest: Path, weight_files: set[str]) -> dict[str, str]:
    """Copy the non-weight files and ``weight_files`` into ``dest``; {relative path: sha256}."""
    dest.mkdir(parents=True)
    files = {}
    for path in sorted(full.iterdir()):
        if path.is_file() and (not path.name.endswith(".safetensors")
                               or path.name in weight_files):
            shutil.copy2(path, dest / path.name)
            files[path.name] = sha256_file(path)
    return files


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


@dataclass
class Worker:
    rank: int
    config_path: Path
    status_path: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> WorkerStatus | None:
        try:
            return parse_status(self.status_path.read_text())
        except (OSError, ValueError):
            return None


def write_config(path: Path, *, model_dir: Path, split: Sequence[int], host: str, port: int,
                 files: dict[str, Any], status_path: Path) -> Path:
    path.write_text(json.dumps({
        "model_dir": str(model_dir), "split": list(split), "host": host, "port": port,
        "expected_world_size": len(split), "files": files, "status_path": str(status_path),
    }, indent=2))
    return path


def start_worker(rank: int, config_path: Path, hostfile: Path | None, status_path: Path,
                 log_path: Path, hub_cache: Path) -> Worker:
    """Run the worker script as launchd would: its own session, env, stdout+stderr to a log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_", "HF_"))}
    env.update(MLX_RANK=str(rank), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if hostfile is not None:
        env["MLX_HOSTFILE"] = str(hostfile)
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, str(WORKER_SCRIPT), str(config_path)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True, cwd=config_path.parent)
    return Worker(rank, config_path, status_path, log_path, process)


def stop_workers(workers: Sequence[Worker], grace: float = 5.0) -> None:
    """SIGTERM each worker's process group, then SIGKILL what is left after ``grace``."""
    for w in workers:
        _signal_group(w.process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in workers:
        try:
            w.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(w.process, signal.SIGKILL)
            w.process.wait(timeout=10)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the worker's group while the worker is alive (its pid is the group id, and is
    not reused before we reap it)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)


@dataclass
class Ring:
    workers: list[Worker]
    api_url: str
    rank_files: list[dict[str, str]]  # per rank: {relative path: sha256}


def start_ring(full: Path, root: Path, split: Sequence[int], ips: Sequence[str],
               corrupt: dict[int, str] | None = None) -> Ring:
    """One worker per rank on ``ips`` (rank order), each with only its own files.

    ``corrupt`` maps a rank to a file whose copy in that rank's directory gets one byte
    flipped after its checksum is recorded, as a damaged transfer would leave it.
    """
    endpoints = [(ip, free_port(ip)) for ip in ips]
    hostfile = root / "hostfile.json"
    hostfile.write_text(render_hostfile(endpoints))
    api_port = free_port(ips[0])
    workers, rank_files = [], []
    try:
        for rank in range(len(split)):
            node = root / f"node{rank}"
            files = make_rank_dir(full, node / "model", mlx_lm_rank_files(full, split, rank))
            if corrupt and rank in corrupt:
                damaged = node / "model" / corrupt[rank]
                data = bytearray(damaged.read_bytes())
                data[len(data) // 2] ^= 0xFF
                damaged.write_bytes(bytes(data))
            status = node / "worker-status.json"
            config = write_config(node / "worker.json", model_dir=node / "model", split=split,
                                  host=ips[0], port=api_port, files=files, status_path=status)
            rank_files.append(files)
            workers.append(start_worker(rank, config, hostfile, status, node / "worker.log",
                                        root / "hf-cache"))
    except BaseException:
        stop_workers(workers)
        raise
    return Ring(workers, f"http://{ips[0]}:{api_port}", rank_files)


def generate(mlx_model: Any, tokenizer: Any, prompt: str,
             max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs, from the prompt tokens mlx_lm.server builds for a
    chat request without tools."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tools=None, tokenize=True)
    tokens, logprobs = [], []
    for r in stream_generate(mlx_model, tokenizer, ids, max_tokens=max_tokens,
                             sampler=make_sampler(0.0)):
        tokens.append(int(r.token))
        logprobs.append(float(r.logprobs[r.token].item()))
    return tokens, logprobs


def reference(model: Path, prompt: str, max_tokens: int) -> tuple[list[int], list[float]]:
    """What one process holding the whole model generates."""
    from mlx_lm import load

    return generate(*load(str(model)), prompt, max_tokens)
