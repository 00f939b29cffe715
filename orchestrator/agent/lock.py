"""The cluster lock on one host: an atomic ``mkdir`` with a holder file, released by nonce.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# ruff: noqa: PTH102, PTH103, PTH106, PTH108, PTH112
# ruff: noqa: PTH118, PTH120
import os
import time

from .common import AgentError, dump_json_atomic, expand, fields, json_file

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import IO

    from .common import Request, Response


def op_lock_acquire(req: Request, _stdin: IO[bytes]) -> Response:
    """Take the cluster lock on this host: mkdir is atomic, so of two runs exactly one wins."""
    path, holder = fields(req, ("path", "holder"), {})
    if not isinstance(holder, dict) or not isinstance(holder.get("nonce"), str):
        raise AgentError("holder must be an object with a nonce")
    full = expand(str(path))
    try:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        os.mkdir(full, 0o700)
    except FileExistsError as exc:
        if exc.filename != full:  # a file where a parent directory should be
            raise AgentError(f"cannot create the lock directory {exc.filename}: it exists "
                             "and is not a directory") from None
        # The winner writes holder.json right after its mkdir; wait briefly for it.
        for _ in range(50):
            current = json_file(os.path.join(full, "holder.json"), None)
            if current is not None:
                return {"acquired": False, "holder": current}
            time.sleep(0.02)
        return {"acquired": False, "holder": {"who": "unknown (no holder.json)", "nonce": "?"}}
    except OSError as exc:  # read-only, permissions, disk full: a message, not a traceback
        where = exc.filename or full
        raise AgentError(f"cannot create the lock directory {where}: {exc.strerror or exc}") \
            from None
    try:
        dump_json_atomic(os.path.join(full, "holder.json"), holder)
    except OSError as exc:  # an empty lock would refuse every run, naming no one: undo it
        import shutil

        shutil.rmtree(full, ignore_errors=True)
        where = os.path.join(full, "holder.json")
        raise AgentError(f"cannot write {where}: {exc.strerror or exc}") from None
    return {"acquired": True, "holder": holder}


def op_lock_release(req: Request, _stdin: IO[bytes]) -> Response:
    """Release the lock only if `nonce` is its holder's: a run never frees another's lock."""
    path, nonce = fields(req, ("path", "nonce"), {})
    full = expand(str(path))
    if not os.path.isdir(full):  # first: a file where a parent should be is "no lock" too
        return {"released": False}
    current = json_file(os.path.join(full, "holder.json"), None)
    if not isinstance(current, dict) or current.get("nonce") != nonce:
        return {"released": False}
    remove_lock_dir(full)
    return {"released": True}


def remove_lock_dir(full: str) -> None:
    """``shutil.rmtree(full)`` for what acquire made (the directory and its holder.json), with
    os calls: importing shutil is ~2 ms of a no-op run's session. Anything else inside goes to
    rmtree."""
    try:
        os.unlink(os.path.join(full, "holder.json"))
        os.rmdir(full)
    except OSError:
        import shutil

        shutil.rmtree(full)
