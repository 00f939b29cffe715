"""The manifest: which files a node needs, and loading it from the test hub or a local dir."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from orchestrator.errors import ModelError
from orchestrator.model import cache as cache_mod
from orchestrator.model.hub import HubClient
from orchestrator.model.manifest import (
    Entry,
    HubOrigin,
    LocalOrigin,
    Manifest,
    hub_manifest,
    local_manifest,
    needed_files,
)
from orchestrator.model.token import hub_token, redact
from orchestrator.simulator.hub import TestHub

TOKEN = "hf_manifest_secret_0123456789"


def entries(*names: str) -> dict[str, Entry]:
    return {n: Entry(1, hashlib.sha256(n.encode()).hexdigest()) for n in names}


def test_a_node_needs_its_weights_and_what_mlx_lm_reads_besides() -> None:
    man = Manifest(HubOrigin("http://h", "o/m", "0" * 40), entries(
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "config.json", "tokenizer.json", "tokenizer.model",
        "chat_template.jinja", "merges.txt", "generation_config.json", "sub/extra.json",
        "README.md", ".gitattributes", "pytorch_model.bin", "original/consolidated.pth"))
    assert needed_files(man, ["model-00002-of-00002.safetensors"]) == {
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "config.json",
        "tokenizer.json", "tokenizer.model", "chat_template.jinja", "merges.txt",
        "generation_config.json", "sub/extra.json"}
    with pytest.raises(ModelError, match="does not have: model-00003"):
        needed_files(man, ["model-00003-of-00002.safetensors"])


def test_manifest_paths_stay_inside_the_model_directory() -> None:
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(ValueError, match="outside"):
            Manifest(LocalOrigin(Path("/m")), {bad: Entry(1, "0" * 64)})


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for i in range(1, 4):
        (root / f"model-0000{i}-of-00003.safetensors").write_bytes(os.urandom(20_000 + i))
    (root / "config.json").write_text('{"model_type": "tiny"}\n')
    (root / "tokenizer.json").write_text('{"version": "1.0"}\n')
    (root / "README.md").write_text("# tiny\n")
    (root / "sub").mkdir()
    (root / "sub" / "weights.bin").write_bytes(os.urandom(100))
    return root


def test_hub_manifest_pins_the_commit_and_hashes_every_needed_file(
    repo_dir: Path, tmp_path: Path
) -> None:
    with TestHub({"org/tiny": repo_dir}, tree_page_size=2) as hub:
        commit = hub.repo("org/tiny").commit
        client = HubClient(endpoint=hub.endpoint)
        man = hub_manifest(client, "org/tiny", "main", cache=tmp_path / "cache")
        assert man.origin == HubOrigin(hub.endpoint, "org/tiny", commit)
        assert set(man.files) == {p.relative_to(repo_dir).as_posix()
                                  for p in repo_dir.rglob("*") if p.is_file()}
        for rel, entry in man.files.items():
            content = (repo_dir / rel).read_bytes()
            assert entry.size == len(content)
            if rel == "README.md":  # kept in git and needed by no node: never fetched
                assert entry.sha256 is None
            else:  # LFS files (*.bin too) have it in the tree; config, tokenizer: hashed here
                assert entry.sha256 == hashlib.sha256(content).hexdigest()
        assert set(man.controller_copies) == {"config.json", "tokenizer.json"}
        assert man.seed_kind("config.json") == "local"
        assert man.seed_kind("model-00001-of-00003.safetensors") == "hub"
        assert man.files["config.json"].git_sha1 == hub.repo("org/tiny").files[
            "config.json"].git_oid
        served = hub.stats().bytes_served
        assert set(served) == {"org/tiny/config.json", "org/tiny/tokenizer.json"}
        hub.reset_stats()
        again = hub_manifest(client, "org/tiny", commit, cache=tmp_path / "cache")
        assert again == man
        assert hub.stats().total_bytes_served == 0  # small files cached by their blob id


def test_gated_repo_needs_the_token_and_never_shows_it(repo_dir: Path, tmp_path: Path) -> None:
    with TestHub({"org/tiny": repo_dir}, token=TOKEN) as hub:
        with pytest.raises(ModelError, match="HF_TOKEN") as info:
            hub_manifest(HubClient(endpoint=hub.endpoint), "org/tiny", None, cache=tmp_path)
        wrong = HubClient(endpoint=hub.endpoint, token=TOKEN[::-1])
        with pytest.raises(ModelError) as refused:
            hub_manifest(wrong, "org/tiny", None, cache=tmp_path)
        assert TOKEN[::-1] not in str(refused.value) and TOKEN not in str(info.value)
        man = hub_manifest(HubClient(endpoint=hub.endpoint, token=TOKEN), "org/tiny", None,
                           cache=tmp_path)
        assert len(man.files) == 7


def test_local_manifest_hashes_each_file_once(repo_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (repo_dir / ".orch-verified").mkdir()
    (repo_dir / ".orch-verified" / "stamp").write_text("{}")
    for path in repo_dir.rglob("*"):
        os.utime(path, (1e9, 1e9))  # old: outside the "racily clean" window
    hashed: list[Path] = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: hashed.append(p) or real(p))
    man = local_manifest(repo_dir, cache=tmp_path / "cache")
    assert man.origin == LocalOrigin(repo_dir)
    assert ".orch-verified/stamp" not in man.files and len(man.files) == 7
    assert man.controller_copies["config.json"] == repo_dir / "config.json"
    assert len(hashed) == 7
    hashed.clear()
    assert local_manifest(repo_dir, cache=tmp_path / "cache") == man
    assert hashed == []
    (repo_dir / "config.json").write_text('{"model_type": "changed"}\n')
    changed = local_manifest(repo_dir, cache=tmp_path / "cache")
    assert hashed == [repo_dir / "config.json"]
    assert changed.files["config.json"].sha256 != man.files["config.json"].sha256
    with pytest.raises(ModelError, match="does not exist"):
        local_manifest(tmp_path / "nowhere", cache=tmp_path / "cache")


def test_token_sources_in_order(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(" from-file \n")
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    (hf_home / "token").write_text("from-hf-home\n")
    assert hub_token({"HF_TOKEN": "from-env"}, token_file) == "from-env"
    assert hub_token({}, token_file) == "from-file"
    assert hub_token({"HF_HOME": str(hf_home)}) == "from-hf-home"
    assert hub_token({"HOME": str(tmp_path)}) is None
    assert redact("a Bearer s3cret-token b", "s3cret-token", None) == "a Bearer [redacted] b"
