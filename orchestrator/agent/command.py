"""``run``: a user's command as an argv (never through a shell), with creates/unless guards.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
import os
import subprocess

from .common import RUN_TIMEOUT, AgentError, check_argv, expand, fields, run_status, status_of, tail

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import IO

    from .common import Request, Response


def op_run(req: Request, stdin: IO[bytes]) -> Response:
    """Run argv (never through a shell) unless `creates` exists or `unless` succeeds.

    A non-zero exit is an answer (`exit_status`), unless `check` is set: then it is the op's
    error, which is what stops a ``batch`` at a failed command, as a failed write stops it.
    """
    check = req.get("check", False)
    if not isinstance(check, bool):
        raise AgentError("check must be true or false")
    answer = _run({k: v for k, v in req.items() if k != "check"}, stdin)
    status = answer["exit_status"]
    if check and not answer["skipped"] and status != 0:
        stderr = str(answer["stderr"]).strip()[-2000:]
        raise AgentError("`{}` exited {}: {}".format(" ".join(req["argv"]), status, stderr))
    return answer


def _run(req: Request, _stdin: IO[bytes]) -> Response:
    argv, creates, unless, cwd, env, timeout = fields(
        req,
        ("argv",),
        {"creates": None, "unless": None, "cwd": None, "env": {}, "timeout": RUN_TIMEOUT},
    )
    argv = check_argv(argv, "argv")
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env.items()
    ):
        raise AgentError("env must map strings to strings")
    workdir = expand(cwd) if isinstance(cwd, str) else None
    full_env = dict(os.environ)
    full_env.update(env)
    skipped = {"skipped": True, "exit_status": None, "stdout": "", "stderr": ""}
    if isinstance(creates, str) and os.path.lexists(expand(creates)):
        return skipped
    if unless is not None:
        check = check_argv(unless, "unless")
        if run_status(check, workdir, full_env, timeout) == 0:
            return skipped
    try:
        proc = subprocess.run(
            argv,
            cwd=workdir,
            env=full_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        return {"skipped": False, "exit_status": 127, "stdout": "", "stderr": str(exc)}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, bytes) else b""
        err = exc.stderr if isinstance(exc.stderr, bytes) else b""
        err += (f"\n[orch agent: timed out after {timeout}s]").encode()
        return {"skipped": False, "exit_status": 124, "stdout": tail(out), "stderr": tail(err)}
    return {
        "skipped": False,
        "exit_status": status_of(proc.returncode),
        "stdout": tail(proc.stdout),
        "stderr": tail(proc.stderr),
    }
