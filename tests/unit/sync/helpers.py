"""Building blocks for the sync's table tests: a manifest, facts that hold some of its files."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from orchestrator.facts import FileFact, FileKind, HostFacts
from orchestrator.model.manifest import Entry, HubOrigin, Manifest
from orchestrator.plan import HostPlan, diff_host
from orchestrator.resources.model_files import ModelFiles
from orchestrator.resources.steps import Source
from tests.fixtures.facts import host_facts

DIRECTORY = "~/.orch/models/org--tiny"
WEIGHTS = tuple(f"model-0000{i}-of-00006.safetensors" for i in range(1, 7))
META = ("config.json", "model.safetensors.index.json", "tokenizer.json")
COMMIT = "c0ffee" + "0" * 34


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def manifest(extra: Mapping[str, Entry] | None = None) -> Manifest:
    files = {rel: Entry(1000 + i, sha(rel)) for i, rel in enumerate(WEIGHTS)}
    files |= {rel: Entry(10, sha(rel), "a" * 40) for rel in META}
    files["README.md"] = Entry(5, None, "b" * 40)
    files |= dict(extra or {})
    return Manifest(HubOrigin("http://hub", "org/tiny", COMMIT), files,
                    {rel: Path("/cache") / rel for rel in META})


def facts(host: str, model: ModelFiles, held: Iterable[str] = (), *,
          wrong: Mapping[str, str] | None = None, strays: bool = False) -> HostFacts:
    """Facts for `model`'s request: `held` verified, `wrong` present with another hash."""
    files: dict[str, FileFact] = {}
    for path in model.facts_needed().files:
        rel = path.removeprefix(model.directory + "/")
        entry = model.manifest.files[rel]
        if rel in held:
            files[path] = FileFact(FileKind.FILE, entry.size, 0o644, entry.sha256)
        elif wrong and rel in wrong:
            files[path] = FileFact(FileKind.FILE, entry.size + 1, 0o644, wrong[rel])
        else:
            files[path] = FileFact(FileKind.MISSING, None, None, None)
    return host_facts(host, user="u", home=f"/Users/{host}", python_version="3.9.6",
                      memory_bytes=1 << 37, files=files,
                      guards={model.stray_guard.id: 0 if strays else 1})


def node(weights: Iterable[str], man: Manifest | None = None) -> ModelFiles:
    man = man or manifest()
    return ModelFiles(DIRECTORY, man, frozenset(weights) | set(META))


def plans(models: Mapping[str, ModelFiles], all_facts: Mapping[str, HostFacts]) -> list[HostPlan]:
    return [diff_host("t", [models[h]], all_facts[h]) for h in sorted(models)]


def sources(host_plans: Iterable[HostPlan]) -> dict[tuple[str, str], Source]:
    """(host, file) -> the planned source of every fetch (each has one once planned)."""
    found: dict[tuple[str, str], Source] = {}
    for h in host_plans:
        for c in h.changes:
            for s in c.fetches:
                assert s.source is not None, (h.host, s.file)
                found[(h.host, s.file)] = s.source
    return found
