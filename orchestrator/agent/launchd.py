"""launchd: ``launchctl print`` parsed into a job state, and bootstrap / bootout / kickstart.

``launchctl bootout`` returns before the job is gone (as on macOS), so every op that unloads
a job waits until ``print`` no longer finds it before it answers.
"""

from __future__ import annotations

# os.path on purpose: paths travel as JSON strings, and this file must run on any Python >= 3.9.
# No `re` and no `subprocess` at import: every facts call that asks for a job imports this
# module to read one `launchctl print`, and those two imports were ~4 ms of that call's CPU
# on each host (spawn.py says why `print` runs with posix_spawn); only the ops that change
# a job import subprocess.
import os
import time

from .common import AgentError, expand, fields, which

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    import subprocess
    from typing import IO, Any

    from .common import Request, Response


def parse_launchctl_print(text: str) -> dict[str, Any]:
    """Parse ``launchctl print <service>`` (not a stable format) into scalars and blocks.

    Only the service's own (depth-1) keys count: nested blocks such as ``endpoints`` carry their
    own ``state``/``active`` keys that must not leak. ``environment = { K => V }`` is kept.
    """
    scalars: dict[str, str] = {}
    blocks: dict[str, list[str]] = {}
    depth = 0
    current: list[str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.endswith("{"):
            depth += 1
            if depth == 2:
                current = blocks.setdefault(line[:-1].rstrip(" =").strip(), [])
            continue
        if line == "}":
            depth -= 1
            if depth < 2:
                current = None
            continue
        if depth == 1 and " = " in line:
            key, _, value = line.partition(" = ")
            scalars.setdefault(key.strip(), value.strip())
        elif depth == 2 and current is not None:
            current.append(line)
    return {"scalars": scalars, "blocks": blocks}


def launchd_job(text: str) -> dict[str, Any]:
    """A loaded job's state from its ``launchctl print`` text (``not_loaded`` when the text
    holds no service block: "Bad request. Could not find service ...")."""
    parsed = parse_launchctl_print(text)
    scalars: dict[str, str] = parsed["scalars"]
    if not scalars:
        return dict(NOT_LOADED)
    state = "running" if scalars.get("state") == "running" else "waiting"
    pid_text = scalars.get("pid", "")
    pid = int(pid_text) if pid_text.isdigit() else None
    last_exit = _leading_int(scalars.get("last exit code", ""))
    # "last terminating signal = Killed: 9": report it the way a shell would, 128 + N.
    signal = scalars.get("last terminating signal", "").rpartition(":")
    if signal[1] and signal[2].strip().isdigit():
        last_exit = 128 + int(signal[2].strip())
    env: dict[str, str] = {}
    for line in parsed["blocks"].get("environment", []):
        key, sep, value = line.partition(" => ")
        if sep:
            env[key.strip()] = value.strip()
    return {
        "state": state,
        "pid": pid if state == "running" else None,
        "last_exit": last_exit,
        "env": env,
    }


def _leading_int(text: str) -> int | None:
    """The integer `text` starts with ("1", "-15", "78: Function not implemented"), or None
    ("(never exited)")."""
    sign = "-" if text.startswith("-") else ""
    digits = text[len(sign):]
    end = len(digits) - len(digits.lstrip("0123456789"))
    return int(sign + digits[:end]) if end else None


NOT_LOADED: Response = {"state": "not_loaded", "pid": None, "last_exit": None, "env": {}}


def domain_target(domain: Any) -> str:
    if domain == "user":
        return f"user/{os.getuid()}"
    if domain == "system":
        return "system"
    raise AgentError(f"launchd domain must be 'user' or 'system', not {domain!r}")


def service_target(domain: Any, label: Any) -> str:
    if not isinstance(label, str) or not label or "/" in label:
        raise AgentError("launchd label must be a non-empty string without '/'")
    return domain_target(domain) + "/" + label


def launchctl(
    args: list[str], *, privileged: bool = False, timeout: float = 60.0
) -> subprocess.CompletedProcess[bytes]:
    """Run launchctl. System-domain changes always go through ``sudo -n``: it never prompts
    (a missing NOPASSWD rule fails instead of hanging), and it is harmless when already root."""
    import subprocess

    argv = [_launchctl_path(), *args]
    if privileged:
        argv = ["sudo", "-n", *argv]
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
    )


def _launchctl_path() -> str:
    tool = which("launchctl")
    if tool is None:
        raise AgentError("launchctl not found on this host")
    return tool


def launchd_print(target: str, timeout: float = 60.0) -> str | None:
    """``launchctl print TARGET``'s text; None when launchd has no such service (or domain)."""
    from .spawn import TimedOut, run

    try:
        returncode, out = run([_launchctl_path(), "print", target], timeout, capture=True)
    except TimedOut:
        raise AgentError(f"launchctl print {target} did not answer in {timeout:g}s") from None
    return out.decode("utf-8", "replace") if returncode == 0 else None


def wait_gone(target: str, timeout: float) -> bool:
    """bootout returns before the job is gone; poll ``print`` until it is (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        if launchd_print(target) is None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def bootout(domain: Any, label: Any, timeout: float) -> bool:
    """Unload a job and wait until launchd has forgotten it; False when it was not loaded."""
    target = service_target(domain, label)
    if launchd_print(target) is None:
        return False
    proc = launchctl(["bootout", target], privileged=domain == "system")
    if not wait_gone(target, timeout):
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise AgentError(f"{target} still loaded {timeout}s after bootout: {err}")
    return True


def op_launchd_bootout(req: Request, _stdin: IO[bytes]) -> Response:
    domain, label, timeout = fields(req, ("domain", "label"), {"timeout": 30})
    return {"changed": bootout(domain, label, float(timeout))}


def op_launchd_bootstrap(req: Request, _stdin: IO[bytes]) -> Response:
    """(Re)load a job from its plist: bootout and wait first, then bootstrap."""
    domain, label, plist, timeout = fields(req, ("domain", "label", "plist"), {"timeout": 30})
    was_loaded = bootout(domain, label, float(timeout))
    deadline = time.monotonic() + float(timeout)
    while True:
        argv = ["bootstrap", domain_target(domain), expand(str(plist))]
        proc = launchctl(argv, privileged=domain == "system")
        if proc.returncode == 0:
            return {"changed": True, "was_loaded": was_loaded}
        err = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
        # 5: Input/output error also means "the previous instance is still being torn down".
        if "Input/output error" not in err or time.monotonic() >= deadline:
            raise AgentError(f"launchctl bootstrap {label} failed: {err}")
        time.sleep(0.2)


def op_launchd_kickstart(req: Request, _stdin: IO[bytes]) -> Response:
    domain, label = fields(req, ("domain", "label"), {})
    target = service_target(domain, label)
    proc = launchctl(["kickstart", "-k", target], privileged=domain == "system")
    if proc.returncode != 0:
        err = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
        raise AgentError(f"launchctl kickstart {label} failed: {err}")
    return {"changed": True}
