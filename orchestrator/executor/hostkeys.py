"""Host-key policy: strict by default, OpenSSH's `accept-new` on request, and messages that say
what to do.

asyncssh checks the key against known_hosts itself and asks the client only about keys it does
not trust. Here that question is answered the way ``StrictHostKeyChecking`` would: a host with
no recorded key is refused (or, with accept-new, recorded and allowed); a host whose recorded key
differs is always refused, because that is what a man-in-the-middle looks like.
"""

from __future__ import annotations

import os
import shlex
from enum import Enum
from pathlib import Path

import structlog

from orchestrator.errors import HostKeyRejected

from ._asyncssh import asyncssh

__all__ = ["HostKeyPolicy", "Rejection", "rejection_error"]

log = structlog.get_logger(__name__)


class Rejection(Enum):
    UNKNOWN = "unknown"  # no key recorded for this host
    CHANGED = "changed"  # a different key is recorded


def _host_pattern(host: str, port: int) -> str:
    """How OpenSSH writes a host in known_hosts (bracketed when the port is not 22)."""
    return host if port == 22 else f"[{host}]:{port}"


def _has_entry(files: list[Path], host: str, addr: str, port: int) -> bool:
    existing = [str(f) for f in files if f.is_file()]
    if not existing:
        return False
    for path in existing:
        keys, ca_keys, *_ = asyncssh.match_known_hosts(
            path, host, addr, None if port == 22 else port
        )
        if keys or ca_keys:
            return True
    return False


class HostKeyPolicy(asyncssh.SSHClient):
    """One per connection attempt; remembers why a key was refused, for the error message."""

    def __init__(self, files: list[Path], accept_new: bool) -> None:
        self.files = files
        self.accept_new = accept_new
        self.rejection: Rejection | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        """Called by asyncssh only for a key that known_hosts does not already trust."""
        if _has_entry(self.files, host, addr, port):
            self.rejection = Rejection.CHANGED
            return False
        if not self.accept_new or not self.files:
            self.rejection = Rejection.UNKNOWN
            return False
        record_key(self.files[0], host, port, key)
        return True


def record_key(path: Path, host: str, port: int, key: asyncssh.SSHKey) -> None:
    """Append `host key` to known_hosts the way `ssh -o StrictHostKeyChecking=accept-new` does."""
    kind_and_data = " ".join(key.export_public_key("openssh").decode().split()[:2])
    line = f"{_host_pattern(host, port)} {kind_and_data}\n"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # One O_APPEND write per line: concurrent connections never interleave inside a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    log.info("host_key_recorded", host=host, port=port, known_hosts=str(path),
             fingerprint=key.get_fingerprint())  # fmt: skip


def rejection_error(
    name: str, host: str, port: int, files: list[Path], rejection: Rejection | None, detail: str
) -> HostKeyRejected:
    """HostKeyRejected whose message says how to fix it (and, for a changed key, why to care)."""
    path = str(files[0]) if files else "~/.ssh/known_hosts"
    shown = shlex.quote(path)
    if rejection is Rejection.CHANGED:
        return HostKeyRejected(
            name,
            f"host key for {_host_pattern(host, port)} does not match the one in {path}: the host "
            "was reinstalled, or someone is intercepting the connection. If the change is "
            "expected, remove the old key with "
            f"`ssh-keygen -R {shlex.quote(_host_pattern(host, port))} -f {shown}` and verify "
            "the new one before accepting it",
        )
    if rejection is Rejection.UNKNOWN:
        return HostKeyRejected(
            name,
            f"host key for {_host_pattern(host, port)} not in known_hosts ({path}); verify it, "
            f"then add it with `ssh-keyscan -p {port} {shlex.quote(host)} >> {shown}` "
            "or re-run with --accept-new-host-keys",
        )
    return HostKeyRejected(name, f"host key for {_host_pattern(host, port)} refused: {detail}")
