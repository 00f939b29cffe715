"""Which Pythons a node has, and how much disk the model directory's volume has free.

Both answer in the ``facts`` call (one round trip), and both are read-only.

Pythons: a stock Mac's ``python3`` is ``/usr/bin/python3`` from the Command Line Tools (3.9),
too old for mlx-lm; newer ones live where Homebrew (``/opt/homebrew/bin``, ``/usr/local/bin``)
and uv (``~/.local/bin``, ``~/.local/share/uv/python/*/bin``) put them, none of them on a
non-login SSH PATH. Each candidate is run once to read its version. Without the Command Line
Tools, ``/usr/bin/python3`` is a stub that asks for their installation with a dialog: it is
never run then (``developer_tools`` is checked first), and any other interpreter that
answers with the stub's note is reported as the stub too.
"""

from __future__ import annotations

# os.path on purpose: this file must run on any Python >= 3.9.
# ruff: noqa: PTH112, PTH113, PTH118, PTH120, PTH208
import os
import platform
import re
import subprocess

from .common import expand, run_status, which

TYPE_CHECKING = False  # typing's, without importing typing at run time (see common.py)
if TYPE_CHECKING:
    from typing import Any

PYTHON_DIRS = ("/opt/homebrew/bin", "/usr/local/bin", "~/.local/bin")
UV_PYTHONS = "~/.local/share/uv/python"  # uv's managed installs: <name>/bin/python3.X
SYSTEM_PYTHON = "/usr/bin/python3"
CLT_DIR = "/Library/Developer/CommandLineTools"
STUB_NOTE = "No developer tools were found"  # the stub's first line, after "xcode-select: note:"
VERSIONED = re.compile(r"^python3\.\d+$")
VERSION_PROBE = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
PROBE_TIMEOUT = 30.0


def developer_tools() -> bool:
    """Whether the Command Line Tools are installed: their directory, or ``xcode-select -p``."""
    if os.path.isdir(expand(CLT_DIR)):
        return True
    tool = which("xcode-select")
    return tool is not None and run_status([tool, "-p"], None, None, 30) == 0


def candidates(extra: list[str]) -> list[str]:
    """Every interpreter worth asking, in a fixed order, each real file once."""
    found: list[str] = []
    on_path = which("python3")
    if on_path:
        found.append(on_path)
    for directory in PYTHON_DIRS:
        full = expand(directory)
        try:
            names = sorted(os.listdir(full))
        except OSError:
            continue
        found.extend(os.path.join(full, n) for n in names if VERSIONED.match(n))
    uv = expand(UV_PYTHONS)
    try:
        installs = sorted(os.listdir(uv))
    except OSError:
        installs = []
    for install in installs:
        bindir = os.path.join(uv, install, "bin")
        try:
            names = sorted(os.listdir(bindir))
        except OSError:
            continue
        found.extend(os.path.join(bindir, n) for n in names if VERSIONED.match(n))
    found.extend(expand(p) for p in extra)
    unique: list[str] = []
    seen: set[str] = set()
    for path in found:
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(real) and os.access(real, os.X_OK):
            seen.add(real)
            unique.append(path)
    for path in extra:  # asked for by name: reported even when absent, so the plan can say so
        if expand(path) not in unique and not any(
                os.path.realpath(expand(path)) == os.path.realpath(u) for u in unique):
            unique.append(expand(path))
    return unique


def probe(path: str, tools: bool) -> dict[str, Any]:
    """One interpreter's version; ``stub`` when it is the Command Line Tools' stub."""
    entry: dict[str, Any] = {"path": path, "version": None, "stub": False}
    stock = os.path.realpath(path) == SYSTEM_PYTHON or path == expand(SYSTEM_PYTHON)
    if stock and not tools and platform.system() == "Darwin":
        entry["stub"] = True  # running it would open the install dialog on the Mac's screen
        return entry
    try:
        proc = subprocess.run([path, "-I", "-c", VERSION_PROBE], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=PROBE_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return entry
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    if proc.returncode == 0 and re.match(r"^\d+\.\d+\.\d+$", out.strip()):
        entry["version"] = out.strip()
    elif STUB_NOTE in out:
        entry["stub"] = True
    return entry


def pythons_fact(extra: list[str]) -> dict[str, Any]:
    tools = developer_tools()
    return {"developer_tools": tools, "found": [probe(p, tools) for p in candidates(extra)]}


def disk_fact(path: str) -> dict[str, Any]:
    """Free bytes (for an unprivileged user) on the volume that holds ``path``, read from
    its nearest existing parent, since the directory may not exist yet."""
    full = expand(path)
    volume = full
    while not os.path.isdir(volume):
        parent = os.path.dirname(volume)
        if parent == volume:
            break
        volume = parent
    st = os.statvfs(volume)
    return {"volume": volume, "free_bytes": st.f_bavail * st.f_frsize}
