"""Change one key of a host in the user's inventory file, keeping every comment and the layout.

`orch drain` declares its result in the inventory (`drained: true`), so a later `orch apply` and
the CI drift check agree with what the drain did. The file is the user's: it is edited
round-trip (ruamel.yaml), written atomically, and an undrain that follows a drain gives back
the file byte for byte.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from orchestrator.errors import ConfigError, Diagnostic


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the user's long lines
    return yaml


def set_drained(inventory: Path, host: str, drained: bool, *, inherited: bool = False) -> bool:
    """Make `host` drained (or not) in `inventory`; returns whether the file changed.

    `inherited` is whether the host would be drained without a key of its own (a group or
    `vars` says so): undraining such a host needs an explicit `drained: false`, otherwise the
    host's own key is removed so the file returns to what it was before the drain.
    """
    yaml = _yaml()
    text = inventory.read_text(encoding="utf-8")
    data: Any = yaml.load(text)
    hosts = data.get("hosts") if isinstance(data, CommentedMap) else None
    entry = hosts.get(host) if isinstance(hosts, CommentedMap) else None
    if not isinstance(entry, CommentedMap):
        raise ConfigError([Diagnostic(inventory, 1, 1,
                                      f"host {host!r} is not a mapping under `hosts`")])
    if drained:
        if entry.get("drained") is True:
            return False
        entry["drained"] = True
    elif inherited:
        if entry.get("drained") is False:
            return False
        entry["drained"] = False
    else:
        if "drained" not in entry:
            return False
        del entry["drained"]
    out = io.StringIO()
    yaml.dump(data, out)
    _write_atomically(inventory, out.getvalue())
    return True


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).chmod(path.stat().st_mode & 0o7777)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
