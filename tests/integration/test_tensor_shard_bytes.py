"""The tensor split's bytes per rank equal what real ``model.shard(group)`` leaves on each rank.

Two (then three) real processes form an MLX ring (CPU, 127.0.0.71-73, free ports), each loads
the sandbox's tiny deepseek_v3 model (for three ranks, a 6-head variant) with mlx-lm's own
loader, calls ``model.shard(group)``, evaluates, and reports the sum of ``nbytes`` over its
parameters, plus each parameter's bytes. orch's number
comes from the safetensors headers alone (`placement.shard.tensor_split`). It spawns processes
and binds loopback addresses: run it under the network lock.

The third case is the tiny model stored as DeepSeek-R1-4bit is (`quantize_like_r1`): 4-bit
linears with their ``scales``/``biases``, and MLA's ``kv_b_proj`` that mlx-lm's ``sanitize``
unfolds into per-head ``embed_q``/``unembed_out`` at load — the two rules orch applies to the
real checkpoint's headers that a float model in mlx-lm's own layout would not exercise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.model.meta import load_local_meta
from orchestrator.placement.shard import kind_of, tensor_split
from orchestrator.simulator.tiny_model import TENSOR_3_OVERRIDES, make_tiny_deepseek
from orchestrator.worker.hostfile import render_hostfile
from tests.fixtures.tensor_bytes import QUANTIZED_2_OVERRIDES, quantize_like_r1

IPS = ("127.0.0.71", "127.0.0.72", "127.0.0.73")

RANK_SCRIPT = """
import json, sys
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model
group = mx.distributed.init(backend="ring", strict=True)
model, _ = load_model(__import__("pathlib").Path(sys.argv[1]), lazy=True, strict=False)
model.shard(group)
params = dict(tree_flatten(model.parameters()))
mx.eval(list(params.values()))
print(json.dumps({"rank": group.rank(), "size": group.size(),
                  "params": {k: v.nbytes for k, v in params.items()}}))
"""


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def shard_on_ring(model: Path, tmp_path: Path, ranks: int) -> list[dict[str, object]]:
    hostfile = tmp_path / "hostfile.json"
    hostfile.write_text(render_hostfile([(ip, free_port(ip)) for ip in IPS[:ranks]]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(model)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "MLX_RANK": str(rank),
                                   "MLX_HOSTFILE": str(hostfile)})
             for rank in range(ranks)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode(errors="replace")
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    return sorted(reports, key=lambda r: int(r["rank"]))  # type: ignore[call-overload]


def as_loaded(name: str) -> tuple[str, ...]:
    """The parameters a stored tensor becomes after mlx-lm's ``sanitize``."""
    if ".kv_b_proj." in name:
        attn, leaf = name.split(".kv_b_proj.")
        return f"{attn}.embed_q.{leaf}", f"{attn}.unembed_out.{leaf}"
    return (name,)


def tiny_model(tmp_path: Path, variant: str) -> Path:
    if variant == "float":
        return make_tiny_deepseek(tmp_path / "tiny", n_layers=4, n_files=3)
    if variant == "float-6-heads":
        return make_tiny_deepseek(tmp_path / "tiny", n_layers=4, n_files=3,
                                  overrides=TENSOR_3_OVERRIDES)
    source = make_tiny_deepseek(tmp_path / "float", n_layers=4, n_files=3,
                                overrides=QUANTIZED_2_OVERRIDES)
    return quantize_like_r1(source, tmp_path / "tiny-4bit")


@pytest.mark.parametrize(("ranks", "variant"),
                         [(2, "float"), (3, "float-6-heads"), (2, "4bit-kv_b_proj")],
                         ids=["2-ranks", "3-ranks-6-heads", "2-ranks-4bit-kv_b_proj"])
def test_each_ranks_bytes_equal_real_shard(tmp_path: Path, ranks: int, variant: str) -> None:
    tiny = tiny_model(tmp_path, variant)
    meta = load_local_meta(tiny)
    split = tensor_split(meta, ranks)
    assert split.possible, split.problem
    reports = shard_on_ring(tiny, tmp_path, ranks)
    assert [r["size"] for r in reports] == [ranks] * ranks
    measured = [sum(r["params"].values()) for r in reports]  # type: ignore[attr-defined]
    assert measured == list(split.rank_bytes)
    # and tensor by tensor, on every rank: what orch calls sharded holds exactly 1/N of its
    # bytes there, the rest is whole
    for report in reports:
        params: dict[str, int] = report["params"]  # type: ignore[assignment]
        assert set(params) == {n for t in meta.tensors for n in as_loaded(t.name)}
        held = {t.name: sum(params[n] for n in as_loaded(t.name)) for t in meta.tensors}
        wanted = {t.name: t.nbytes if kind_of(meta.model_type, t) == "replicated"
                  else t.nbytes // ranks for t in meta.tensors}
        assert held == wanted
    assert 0 < split.replicated_bytes < split.rank_bytes[0] < meta.weight_bytes
    if variant.startswith("4bit"):
        kinds = {kind_of(meta.model_type, t) for t in meta.tensors if ".kv_b_proj." in t.name}
        assert kinds == {"heads"}
        assert {t.name.rsplit(".", 1)[1] for t in meta.tensors
                if kind_of(meta.model_type, t) != "replicated"} == {"weight", "scales",
                                                                      "biases"}
