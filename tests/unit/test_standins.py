"""The hot macOS stand-ins (sysctl, launchctl, sudo) stay cheap and print what they printed.

Each one is a Python start where a Mac runs a native binary, so on their common paths they
import neither json (re, enum, ...) nor socket: host.json is read through a marshal copy
(standin_host.py) and launchctl speaks marshal to the host's launchd. These run the installed
stand-ins (the shebang hosts.py writes) against a host root and a real launchd stand-in over its
unix socket; no sshd is needed. tests/integration/test_hosts.py runs them on simulated Macs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.simulator.hosts import MACOS_DIR, STANDIN_SUPPORT

HOT = ("sysctl", "launchctl", "sudo")
HEAVY = ("json", "re", "enum", "socket", "pathlib", "shutil")  # what the hot paths avoid
OLD = 1e9  # an mtime far outside standin_host's "racily clean" window
sys.path.insert(0, str(MACOS_DIR))
from standin_host import flat_json, host_values  # noqa: E402 (the stand-ins' own module)


@pytest.fixture
def mac(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(bin dir, host root) with the stand-ins installed as hosts.py installs them, and the
    root's launchd running."""
    bin_dir, root = tmp_path / "bin", tmp_path / "m1"
    for directory in (bin_dir, root / "run", root / "log", root / "home", root / "tmp"):
        directory.mkdir(parents=True)
    for name in (*HOT, "launchd"):
        text = (MACOS_DIR / name).read_text()
        (bin_dir / name).write_text(f"#!{sys.executable} -IS\n" + text.split("\n", 1)[1])
        (bin_dir / name).chmod(0o755)
    for support in STANDIN_SUPPORT:
        (bin_dir / support).write_text((MACOS_DIR / support).read_text())
    host = {"name": "m1", "memory_bytes": 64 << 30, "chip": "Apple M2 Ultra",
            "macos_version": "14.5", "build_version": "23F79", "machine_model": "Mac14,14",
            "cpu_count": 24, "uid": os.getuid(), "user": "u", "home": str(root / "home"),
            "path": f"{bin_dir}:/usr/bin:/bin", "python3": sys.executable,
            "bin_dir": str(bin_dir), "sudo_nopasswd": True}
    (root / "host.json").write_text(json.dumps(host, indent=2) + "\n")
    os.utime(root / "host.json", (OLD, OLD))
    (root / "run" / "boot.json").write_text(json.dumps({"boot_time": 1764567890.25}))
    launchd = subprocess.Popen([sys.executable, "-I", "-S", str(bin_dir / "launchd"), str(root)],
                               env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while not (root / "run" / "launchd.pid").exists():
            assert launchd.poll() is None, "launchd stand-in died"
            time.sleep(0.02)
        yield bin_dir, root
    finally:
        launchd.send_signal(signal.SIGTERM)
        launchd.wait(timeout=30)


def run(mac: tuple[Path, Path], *argv: str, sudo: bool = False) -> tuple[int, str, str, set[str]]:
    """(exit status, stdout, stderr, modules the first interpreter imported)."""
    bin_dir, root = mac
    command = [str(bin_dir / "sudo"), "-n", str(bin_dir / argv[0]), *argv[1:]] if sudo \
        else [str(bin_dir / argv[0]), *argv[1:]]
    proc = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", *command],
                          env={"ORCH_HOST_ROOT": str(root), "PATH": f"{bin_dir}:/usr/bin:/bin"},
                          cwd=root / "home", capture_output=True, text=True, check=False)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    stderr = "".join(line + "\n" for line in proc.stderr.splitlines()
                     if not line.startswith("import time:"))
    return proc.returncode, proc.stdout, stderr, imported


def test_hot_standins_print_as_before_and_import_nothing_heavy(mac: tuple[Path, Path]) -> None:
    uid = os.getuid()
    run(mac, "sysctl", "hw.ncpu")  # the first read after boot makes the marshal copy
    assert (mac[1] / "run" / "host.marshal").exists()
    cases = [
        (("sysctl", "hw.memsize", "machdep.cpu.brand_string", "kern.osproductversion"),
         (0, "hw.memsize: 68719476736\nmachdep.cpu.brand_string: Apple M2 Ultra\n"
             "kern.osproductversion: 14.5\n", "")),
        (("sysctl", "-n", "iogpu.wired_limit_mb"), (0, "0\n", "")),
        (("sysctl", "no.such"), (1, "", "sysctl: unknown oid 'no.such'\n")),
        (("sysctl", "iogpu.wired_limit_mb=1024"),
         (1, "", "sysctl: iogpu.wired_limit_mb=1024: Operation not permitted\n")),
        (("launchctl", "print", f"user/{uid}/com.example.none"),
         (113, "", 'Bad request.\nCould not find service "com.example.none" in domain for '
                   f"user: {uid}\n")),
        (("launchctl", "list"), (0, "PID\tStatus\tLabel\n", "")),
        (("launchctl", "bootstrap", "system", "/x.plist"),
         (1, "", "Bootstrap failed: 1: Operation not permitted\n"
                 "Try re-running the command as root for richer errors.\n")),
    ]
    for argv, expected in cases:
        status, out, err, imported = run(mac, *argv)
        assert (status, out, err) == expected, argv
        assert "posix" in imported  # -X importtime did list this run's imports
        assert sorted(imported & set(HEAVY)) == [], argv
    # Through sudo: the write (which writes JSON, so imports json), then reads again without it.
    status, out, err, _ = run(mac, "sysctl", "-w", "iogpu.wired_limit_mb=1024", sudo=True)
    assert (status, out, err) == (0, "iogpu.wired_limit_mb: 0 -> 1024\n", "")
    assert json.loads((mac[1] / "run" / "sysctl.json").read_text()) == \
        {"iogpu.wired_limit_mb": 1024}
    status, out, err, imported = run(mac, "sysctl", "-n", "iogpu.wired_limit_mb", sudo=True)
    assert (status, out, err) == (0, "1024\n", "")
    assert sorted(imported & set(HEAVY)) == []
    status, out, _, _ = run(mac, "sysctl", "kern.boottime")
    assert out == f"kern.boottime: {{ sec = 1764567890, usec = 0 }} {time.ctime(1764567890)}\n"


def test_launchctl_without_launchd_fails_as_before(mac: tuple[Path, Path]) -> None:
    (mac[1] / "run" / "launchd.sock").unlink()
    status, out, err, _ = run(mac, "launchctl", "list")
    assert (status, out) == (5, "")
    assert err == "Could not connect to launchd: No such file or directory\n"


@pytest.mark.parametrize("text", [
    "{}", " {} \n", '{"iogpu.wired_limit_mb": 49152}', '{"boot_time": 1764567890.123456}',
    '{"a": 1, "b": -2.5e3}', '{"a": "text"}', "[]", "{,}", '{"a": 1,}', '{"a": +5}',
    '{"a": 1.2.3}', '{"a\\"b": 1}', "", "{"])
def test_flat_json_reads_what_json_reads(text: str) -> None:
    try:
        expected: object = json.loads(text)
    except ValueError:
        expected = ValueError
    try:
        found: object = flat_json(text)
    except ValueError:
        found = ValueError
    assert found == expected


def test_host_values_copy_follows_host_json(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    path, copy = tmp_path / "host.json", tmp_path / "run" / "host.marshal"
    path.write_text('{"name": "m1"}')
    assert host_values(str(tmp_path)) == {"name": "m1"}
    assert not copy.exists()  # just written: it could change again within the same tick
    os.utime(path, (OLD, OLD))
    assert host_values(str(tmp_path)) == {"name": "m1"}
    assert copy.exists()
    path.write_text('{"name": "m2"}')  # same size, same inode, a new mtime
    assert host_values(str(tmp_path)) == {"name": "m2"}
    os.utime(path, (OLD + 1, OLD + 1))
    assert host_values(str(tmp_path)) == {"name": "m2"}
    copy.write_bytes(b"not marshal")
    assert host_values(str(tmp_path)) == {"name": "m2"}
    path.unlink()
    with pytest.raises(FileNotFoundError):
        host_values(str(tmp_path))
