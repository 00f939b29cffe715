"""The sandbox's tiny model written with no mlx (issue #17): `orch sandbox up` from a plain
``pip install -e .``. Same files as the mlx writer (tokenizer, config, index byte for byte;
every tensor's name, shape and dtype), loadable and servable by mlx-lm."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
from mlx_lm import generate, load

from orchestrator.simulator import tiny_model, tiny_plain

BLOCK_MLX = """\
import sys
for name in ("mlx", "mlx.core", "mlx_lm", "tokenizers", "numpy", "safetensors"):
    sys.modules[name] = None  # importing any of them now fails
from pathlib import Path
from orchestrator.simulator.tiny_plain import make_tiny_deepseek
from orchestrator.simulator.cluster import _pins
make_tiny_deepseek(Path(sys.argv[1]), n_layers=6, n_files=6, seed=7)
print(_pins())
"""


def test_written_without_mlx_it_matches_the_mlx_writer_and_serves(tmp_path: Path) -> None:
    plain, reference = tmp_path / "plain", tmp_path / "mlx"
    ran = subprocess.run([sys.executable, "-c", BLOCK_MLX, str(plain)], capture_output=True,
                         text=True, check=False)
    assert ran.returncode == 0, ran.stderr
    assert "mlx-lm==" in ran.stdout  # the pins need no mlx on the controller either
    tiny_model.make_tiny_deepseek(reference, n_layers=6, n_files=6, seed=7)

    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in plain.iterdir()) == names
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json",
                 "model.safetensors.index.json"):
        assert (plain / name).read_bytes() == (reference / name).read_bytes(), name
    for name in (n for n in names if n.endswith(".safetensors")):
        ours, theirs = mx.load(str(plain / name)), mx.load(str(reference / name))
        assert sorted(ours) == sorted(theirs)
        for key, value in theirs.items():
            assert (ours[key].shape, ours[key].dtype) == (value.shape, value.dtype), key
            assert bool(mx.isfinite(ours[key]).all())

    model, tokenizer = load(str(plain))  # mlx-lm loads strictly: every weight is present
    assert len(generate(model, tokenizer, "Name three colours.", max_tokens=4)) > 0


def test_the_alphabet_is_tokenizers_byte_level_alphabet() -> None:
    from tokenizers import pre_tokenizers

    assert tiny_plain.byte_level_alphabet() == sorted(pre_tokenizers.ByteLevel.alphabet())
