"""`orch place` end to end: cluster file + the guide's lab inventory + a DeepSeek-R1-shaped model.

The model is the sparse 88-file checkpoint (real safetensors headers, ~420 GB apparent, ~1 MB
on disk); the inventory is the repository's own `inventories/lab.yml`. No host is touched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import orch
from tests.fixtures.clusters import write_cluster
from tests.fixtures.deepseek_like import make_deepseek_like
from tests.fixtures.tensor_bytes import independent_rank_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_deepseek_like(tmp_path_factory.mktemp("models") / "DeepSeek-R1-4bit")


def cluster_file(tmp_path: Path, model: Path, nodes: str = "auto") -> Path:
    return write_cluster(tmp_path, "deepseek-r1",
                         f"model:\n  path: {model}\nplacement:\n  nodes: {nodes}\n")


def place(*args: str) -> tuple[int, str, str]:
    ran = orch("place", *args)
    return ran.returncode, ran.stdout, ran.stderr


def test_auto_picks_the_guides_three_macs(tmp_path: Path, model_dir: Path) -> None:
    code, out, err = place(str(cluster_file(tmp_path, model_dir)), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["fits"] is True
    assert [n["name"] for n in doc["nodes"]] == ["studio-1", "studio-2", "mbp-m4"]
    # over the default (Ethernet) link the pipeline wins even against a tensor split that fits
    assert doc["parallelism"] == "pipeline" and doc["splits"]["tensor"]["fits"] is True
    assert doc["reason"].startswith("estimated ≤ ") and doc["reason"].endswith("(ethernet link)")
    assert all(n["bytes"] <= n["usable_bytes"] for n in doc["nodes"])
    assert doc["even_split_fits"] is False
    covered = sorted(layer for n in doc["nodes"] for layer in range(*n["layers"]))
    assert covered == list(range(61))
    assert doc["required_bytes"] <= doc["available_bytes"]
    assert all(n["files"] for n in doc["nodes"])


def test_the_table(tmp_path: Path, model_dir: Path) -> None:
    code, out, _ = place(str(cluster_file(tmp_path, model_dir)))
    assert code == 0
    for text in ("studio-1", "studio-2", "mbp-m4", "GB = 10^9 bytes", "Fits on 3 nodes"):
        assert text in out


def test_two_studios_are_refused_with_the_shortfall(tmp_path: Path, model_dir: Path) -> None:
    cluster = cluster_file(tmp_path, model_dir, "[studio-1, studio-2]")
    code, out, _ = place(str(cluster))
    assert code == 1
    assert "short 84.5 GB" in out
    code, out, _ = place(str(cluster), "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["fits"] is False
    assert doc["required_bytes"] - doc["available_bytes"] == pytest.approx(84.5e9, abs=0.1e9)


def test_a_missing_weight_file_is_named(tmp_path: Path) -> None:
    model = make_deepseek_like(tmp_path / "broken")
    (model / "model-00013-of-00088.safetensors").unlink()
    code, out, err = place(str(cluster_file(tmp_path, model)))
    assert code == 1
    assert "model-00013-of-00088.safetensors" in err
    assert "Traceback" not in out + err


def test_the_guides_estimate_from_a_parameter_count(tmp_path: Path, model_dir: Path) -> None:
    cluster = str(cluster_file(tmp_path, model_dir))
    code, out, _ = place(cluster, "--json", "--params", "671e9", "--bits", "4", "--layers", "61")
    assert code == 0
    doc = json.loads(out)
    assert doc["model"]["estimated"] is True
    assert doc["policy"]["overhead"] == 0.2
    code, _, err = place(cluster, "--params", "671e9")
    assert code != 0 and "go together" in err


def test_the_installed_entry_point(tmp_path: Path, model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "place", str(cluster_file(tmp_path, model_dir)),
         "--json"], capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["fits"] is True


FOUR_STUDIOS = """\
groups:
  studios:
    hosts: [studio-1, studio-2, studio-3, studio-4]
    vars: {chip: M2 Ultra, memory_gb: 192}
hosts:
""" + "".join(f"  studio-{i}: {{address: studio-{i}.local, ring_ip: 10.0.0.{i}}}\n"
              for i in range(1, 5))


def test_the_guides_three_macs_serve_a_pipeline_and_tensor_is_refused_for_the_macbook(
        tmp_path: Path, model_dir: Path) -> None:
    cluster = cluster_file(tmp_path, model_dir, "[studio-1, studio-2, mbp-m4]")
    code, out, err = place(str(cluster))
    assert code == 0, err
    assert "Pipeline split (chosen):" in out and "Tensor split (not chosen):" in out
    assert "tensor does not fit: mbp-m4 needs 160.2 GB of 128.8 GB" in out
    assert "Chosen: pipeline — tensor cannot split into 3 ranks" in out
    # Both splits drawn as bars (issue #17): the MacBook's tensor bar overflows its memory.
    bars = out[out.index("memory per node, over usable"):].splitlines()
    assert bars[1] == "pipeline split (chosen):" and bars[5] == "tensor split (not chosen):"
    assert [b.split()[0] for b in bars[2:5] + bars[6:9]] == ["studio-1", "studio-2",
                                                             "mbp-m4"] * 2
    assert bars[4].endswith("117.3 of 128.8 GB (91%)") and "!" not in bars[4]
    assert bars[8].endswith("160.2 of 128.8 GB (124%)") and "!!" in bars[8]
    code, out, _ = place(str(cluster), "--json")
    doc = json.loads(out)
    assert doc["parallelism"] == "pipeline" and doc["split"] == [22, 22, 17]
    tensor = doc["splits"]["tensor"]
    assert tensor["fits"] is False and tensor["parallelism"] == "tensor"
    assert "tensor does not fit: mbp-m4 needs 160.2 GB of 128.8 GB" in tensor["problems"]
    assert doc["splits"]["pipeline"]["nodes"] == doc["nodes"]


def test_four_studios_on_rdma_choose_tensor_with_exact_bytes(tmp_path: Path,
                                                            model_dir: Path) -> None:
    (tmp_path / "studios.yml").write_text(FOUR_STUDIOS)
    cluster = write_cluster(tmp_path, "studios", f"model:\n  path: {model_dir}\n"
                            "placement:\n  link: rdma\n", inventory=Path("studios.yml"))
    code, out, err = place(str(cluster), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["parallelism"] == "tensor" and doc["fits"] is True
    exact = independent_rank_bytes(model_dir, 4)
    assert [n["weight_bytes"] for n in doc["nodes"]] == [exact] * 4
    assert exact == 106_560_520_192  # the README's figure
    assert all(len(n["files"]) == 88 for n in doc["nodes"])
    pipeline = doc["splits"]["pipeline"]
    assert pipeline["fits"] is True
    assert (doc["decode_estimate"]["tokens_per_second"]
            > pipeline["decode_estimate"]["tokens_per_second"])
    assert doc["decode_estimate"]["estimate"] is True
    assert doc["reason"].startswith("estimated ≤ ")
    code, out, _ = place(str(cluster))
    assert "Tensor split (chosen):" in out and "Chosen: tensor — estimated ≤ " in out
    # runtime.backend jaccl implies the RDMA link: the same choice without placement.link
    jaccl = write_cluster(tmp_path / "jaccl", "studios", f"model:\n  path: {model_dir}\n"
                          "runtime:\n  backend: jaccl\n", inventory=Path("../studios.yml"))
    code, out, err = place(str(jaccl), "--json")
    assert code == 0, err
    assert json.loads(out)["reason"] == doc["reason"]
