"""The agent, run for real as a subprocess with a temporary HOME (no SSH).

Covers every op's JSON contract, the hash cache's promise (an unchanged tree reads no file
data), the shipping protocol through `LocalConnection` (upload once, then one round trip per
call), and the launchd ops against a small fake `launchctl` whose bootout is asynchronous, as
on macOS.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import (
    AGENT_FILE,
    NODE_MODULES,
    STREAM_EXCLUDED,
    agent_file_id,
    agent_source,
    agent_source_hash,
    streamed_sources,
)
from orchestrator.agent import launchd as agent_launchd
from orchestrator.errors import ActionFailed
from orchestrator.executor.agentcall import STALE_UPLOAD, agent_timeout
from orchestrator.executor.fake import LocalConnection
from orchestrator.facts import FactRequest, JobState, parse_facts

FIXTURES = Path(__file__).parent / "fixtures" / "launchctl"
OLD = time.time() - 3600  # an mtime well outside the agent's "racily clean" window


def call(
    home: Path,
    op: str,
    request: dict[str, Any],
    data: bytes = b"",
    env: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run the agent file as the node would, returning (exit status, parsed stdout)."""
    proc = subprocess.run(
        [sys.executable, str(AGENT_FILE), op],
        input=json.dumps(request).encode() + b"\n" + data,
        capture_output=True,
        env={**os.environ, "HOME": str(home), **(env or {})},
        cwd=home,
        timeout=60,
        check=False,
    )
    return proc.returncode, json.loads(proc.stdout)


def ok(
    home: Path, op: str, request: dict[str, Any], data: bytes = b"", **kw: Any
) -> dict[str, Any]:
    status, answer = call(home, op, request, data, **kw)
    assert status == 0, answer
    return answer


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home dir"  # a space in HOME, on purpose
    h.mkdir()
    return h


def age(path: Path) -> None:
    os.utime(path, (OLD, OLD))


# ------------------------------------------------------------------------------ the file itself


@pytest.mark.parametrize("module", NODE_MODULES)
def test_agent_is_python39_syntax_and_stdlib_only(module: str) -> None:
    """Every node module parses as Python 3.9 and imports the stdlib or its siblings only
    (relative imports: level >= 1), never the controller."""
    source = (AGENT_FILE.parent / f"{module}.py").read_text()
    tree = ast.parse(source, feature_version=(3, 9))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in NODE_MODULES, node.module
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_agent_source_hash_names_the_file() -> None:
    assert agent_source_hash() == hashlib.sha256(agent_source()).hexdigest()
    assert agent_file_id() == agent_source_hash()[:16]


def test_shipped_zip_is_deterministic_and_holds_every_node_module() -> None:
    agent_source.cache_clear()
    again = agent_source()
    assert again == agent_source()
    with zipfile.ZipFile(io.BytesIO(again)) as archive:
        assert archive.namelist() == sorted(["__main__.py", *(f"{m}.py" for m in NODE_MODULES)])
        assert archive.read("__main__.py") == AGENT_FILE.read_bytes()
        for module in NODE_MODULES:
            assert archive.read(f"{module}.py") == (AGENT_FILE.parent / f"{module}.py").read_bytes()
        assert {i.date_time for i in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_every_node_module_is_shipped() -> None:
    """A new module beside agent.py that is not in NODE_MODULES would be missing on nodes."""
    here = {p.stem for p in AGENT_FILE.parent.glob("*.py")} - {"__init__"}
    assert set(NODE_MODULES) == here


def test_streamed_sources_leave_out_transfer_only() -> None:
    assert set(streamed_sources()) == set(NODE_MODULES) - set(STREAM_EXCLUDED) == (
        set(NODE_MODULES) - {"transfer"}
    )


def test_shipped_zip_reports_its_own_hash(home: Path, tmp_path: Path) -> None:
    shipped = tmp_path / f"{agent_file_id()}.pyz"
    shipped.write_bytes(agent_source())
    proc = subprocess.run(
        [sys.executable, "-I", str(shipped), "facts"],
        input=b'{"files": ["~/x"]}\n',
        capture_output=True,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["agent"]["version"] == agent_source_hash()


@pytest.mark.parametrize("version", ["3.9", "3.10"])
def test_facts_run_on_old_pythons(home: Path, version: str) -> None:
    found = [*Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python")]
    on_path = shutil.which(f"python{version}")
    if on_path and "shims" not in on_path:  # a pyenv shim is not an interpreter
        found.append(Path(on_path))
    if not found:
        pytest.skip(f"no python{version} on this machine")
    python = str(found[0])
    proc = subprocess.run(
        [python, str(AGENT_FILE), "facts"],
        input=b'{"files": ["~/x"]}\n',
        capture_output=True,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["python"]["version"].startswith(version)
    parse_facts("n", answer)


# ------------------------------------------------------------------------------------- facts


def test_facts_shape_parses_strictly(home: Path) -> None:
    request = FactRequest(files=frozenset({"~/a"}), sysctl=frozenset({"kernel.ostype"}))
    answer = ok(home, "facts", request.to_json())
    facts = parse_facts("n1", answer, request)
    assert facts.home == str(home)
    assert facts.uid == os.getuid()
    assert facts.python_version == ".".join(map(str, sys.version_info[:3]))
    assert facts.memory_bytes and facts.memory_bytes > 0
    # Run as a plain file (tests, debugging) the agent reports that file's hash; shipped, the
    # zip's (test_shipped_zip_reports_its_own_hash).
    assert answer["agent"]["version"] == hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest()


def test_file_kinds_modes_and_hashes(home: Path) -> None:
    (home / "f").write_bytes(b"hello")
    (home / "f").chmod(0o640)
    (home / "d").mkdir(mode=0o750)
    (home / "d").chmod(0o750)
    (home / "dangling").symlink_to(home / "nowhere")
    (home / "link").symlink_to(home / "f")
    paths = ["~/f", "~/d", "~/missing", "~/dangling", "~/link", str(home / "f")]
    files = ok(home, "facts", {"files": paths})["files"]
    sha = hashlib.sha256(b"hello").hexdigest()
    assert files["~/f"] == {"kind": "file", "size": 5, "mode": 0o640, "sha256": sha}
    assert files["~/d"] == {"kind": "dir", "size": None, "mode": 0o750, "sha256": None}
    assert files["~/missing"] == {"kind": "missing", "size": None, "mode": None, "sha256": None}
    assert files["~/dangling"]["kind"] == "other"
    assert files["~/link"]["sha256"] == sha  # links are followed
    assert files[str(home / "f")] == files["~/f"]


def test_hash_cache_reads_nothing_the_second_time(home: Path) -> None:
    big = home / "model.safetensors"
    big.write_bytes(os.urandom(3 * (1 << 20) + 17))  # several chunks and a partial one
    age(big)
    small = home / "config.json"
    small.write_text("{}")
    age(small)
    request = {"files": ["~/model.safetensors", "~/config.json"]}
    first = ok(home, "facts", request)
    assert first["counters"] == {
        "files_hashed": 2,
        "bytes_hashed": big.stat().st_size + 2,
        "hash_cache_hits": 0,
    }
    assert (
        first["files"]["~/model.safetensors"]["sha256"]
        == hashlib.sha256(big.read_bytes()).hexdigest()
    )
    second = ok(home, "facts", request)
    assert second["counters"] == {"files_hashed": 0, "bytes_hashed": 0, "hash_cache_hits": 2}
    assert second["files"] == first["files"]


def test_hash_cache_notices_same_size_rewrite(home: Path) -> None:
    f = home / "f"
    f.write_bytes(b"aaaa")
    age(f)
    ok(home, "facts", {"files": ["~/f"]})
    f.write_bytes(b"bbbb")  # same size, new mtime
    os.utime(f, (OLD + 10, OLD + 10))
    answer = ok(home, "facts", {"files": ["~/f"]})
    assert answer["files"]["~/f"]["sha256"] == hashlib.sha256(b"bbbb").hexdigest()
    assert answer["counters"]["files_hashed"] == 1


def test_freshly_modified_file_is_not_cached(home: Path) -> None:
    (home / "f").write_bytes(b"new")  # mtime == now: could still change within the same tick
    ok(home, "facts", {"files": ["~/f"]})
    again = ok(home, "facts", {"files": ["~/f"]})
    assert again["counters"]["files_hashed"] == 1


def test_corrupt_hash_cache_only_costs_rehashing(home: Path) -> None:
    (home / "f").write_bytes(b"x")
    (home / ".orch").mkdir()
    (home / ".orch" / "hashcache.json").write_text("{not json")
    answer = ok(home, "facts", {"files": ["~/f"]})
    assert answer["files"]["~/f"]["sha256"] == hashlib.sha256(b"x").hexdigest()


def make_venv(root: Path, packages: dict[str, str], version_key: str = "version") -> None:
    site = root / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (root / "pyvenv.cfg").write_text(f"home = /usr/bin\n{version_key} = 3.11.7\n")
    for name, version in packages.items():
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        body = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\nVersion: 0.0\n"
        (info / "METADATA").write_text(body)
    (site / "broken-1.0.dist-info").mkdir()  # no METADATA: ignored


def test_venv_packages_from_metadata(home: Path) -> None:
    make_venv(home / "venv", {"MLX_LM": "0.32.2", "mlx": "0.32.4", "Zope.Interface": "7.0"})
    make_venv(home / "uvenv", {}, version_key="version_info")
    answer = ok(home, "facts", {"venvs": ["~/venv", "~/uvenv", "~/none"]})["venvs"]
    assert answer["~/venv"] == {
        "exists": True,
        "python_version": "3.11.7",
        "packages": {"mlx-lm": "0.32.2", "mlx": "0.32.4", "zope-interface": "7.0"},
    }
    assert answer["~/uvenv"]["python_version"] == "3.11.7"
    assert answer["~/none"] == {"exists": False, "python_version": None, "packages": {}}


def test_sysctl_and_guards(home: Path) -> None:
    request = {
        "sysctl": ["kernel.ostype", "no.such.key"],
        "guards": [
            {"id": "yes", "argv": ["true"]},
            {"id": "no", "argv": ["false"]},
            {"id": "absent", "argv": ["/no/such/program"]},
            {"id": "quoted", "argv": ["test", "$(false)", "=", "$(false)"]},
        ],
    }
    answer = ok(home, "facts", request)
    assert answer["sysctl"]["no.such.key"] is None
    if Path("/proc/sys/kernel/ostype").exists():
        assert answer["sysctl"]["kernel.ostype"] == "Linux"
    assert answer["guards"] == {"yes": 0, "no": 1, "absent": 127, "quoted": 0}


# A macOS-like sysctl that logs each run: every value after its name, an unknown name on
# stderr (the others still printed), a value that spans two lines.
FAKE_SYSCTL = """#!/bin/sh
echo "$*" >> "$HOME/sysctl.log"
status=0
for name in "$@"; do
  case "$name" in
    hw.memsize) echo "hw.memsize: 206158430208" ;;
    machdep.cpu.brand_string) echo "machdep.cpu.brand_string: Apple M2 Ultra" ;;
    kern.osproductversion) echo "kern.osproductversion: 15.3.1" ;;
    two.lines) printf 'two.lines: first\\nsecond\\n' ;;
    iogpu.wired_limit_mb) echo "iogpu.wired_limit_mb: 0" ;;
    *) echo "sysctl: unknown oid '$name'" >&2; status=1 ;;
  esac
done
exit $status
"""


def test_facts_read_every_sysctl_in_one_run(home: Path, tmp_path: Path) -> None:
    """Memory, chip, macOS version and the requested names come from ONE sysctl process (each
    process is a fork and exec on the node); an unknown name is None and shifts nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sysctl").write_text(FAKE_SYSCTL)
    (bin_dir / "sysctl").chmod(0o755)
    (bin_dir / "sw_vers").write_text('#!/bin/sh\necho sw_vers >> "$HOME/sysctl.log"\n')
    (bin_dir / "sw_vers").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    request = {"sysctl": ["no.such.oid", "two.lines", "iogpu.wired_limit_mb", "hw.memsize"]}
    answer = ok(home, "facts", request, env=env)
    assert answer["memory_bytes"] == 206158430208
    assert answer["chip"] == "Apple M2 Ultra"
    assert answer["os"]["product_version"] == "15.3.1"
    assert answer["sysctl"] == {"no.such.oid": None, "two.lines": "first\nsecond",
                                "iogpu.wired_limit_mb": "0", "hw.memsize": "206158430208"}
    assert (home / "sysctl.log").read_text().splitlines() == [
        "hw.memsize machdep.cpu.brand_string kern.osproductversion no.such.oid two.lines "
        "iogpu.wired_limit_mb"]


def test_facts_ask_sw_vers_when_sysctl_has_no_product_version(home: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sysctl").write_text(FAKE_SYSCTL.replace("kern.osproductversion)", "no.match)"))
    (bin_dir / "sw_vers").write_text('#!/bin/sh\n[ "$1" = -productVersion ] && echo 14.5\n')
    for tool in ("sysctl", "sw_vers"):
        (bin_dir / tool).chmod(0o755)
    answer = ok(home, "facts", {}, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    assert answer["os"]["product_version"] == "14.5"
    assert answer["memory_bytes"] == 206158430208


def test_facts_never_pass_a_sysctl_write_or_option(home: Path) -> None:
    for bad in ("iogpu.wired_limit_mb=1", "-w", "a b", ""):
        status, answer = call(home, "facts", {"sysctl": [bad]})
        assert status == 1 and "bad sysctl name" in answer["error"], bad


def test_managed_record_roundtrip(home: Path) -> None:
    assert ok(home, "facts", {})["managed"] == {}
    record = {"resources": ["file:~/a"], "cluster": "c"}
    assert ok(home, "managed_write", {"record": record}) == {"changed": True}
    assert ok(home, "managed_write", {"record": record}) == {"changed": False}
    assert ok(home, "facts", {"managed": True})["managed"] == record
    assert ok(home, "facts", {"managed": False})["managed"] == {}
    assert (home / ".orch" / "managed" / "default.json").stat().st_mode & 0o777 == 0o600


def test_corrupt_managed_record_is_an_error(home: Path) -> None:
    (home / ".orch").mkdir()
    (home / ".orch" / "managed").mkdir(parents=True)
    (home / ".orch" / "managed" / "default.json").write_text("{oops")
    status, answer = call(home, "facts", {})
    assert status == 1
    assert "default.json" in answer["error"]


# ----------------------------------------------------------------------------- changing ops


def test_write_is_verified_atomic_and_idempotent(home: Path) -> None:
    data = b"line 1\n\x00binary\xff" * 1000
    sha = hashlib.sha256(data).hexdigest()
    request = {"path": "~/deep/er/file name", "mode": 0o640, "sha256": sha}
    assert ok(home, "write", request, data) == {"sha256": sha, "changed": True}
    target = home / "deep" / "er" / "file name"
    assert target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o640
    assert ok(home, "write", request, data) == {"sha256": sha, "changed": False}
    assert ok(home, "write", {**request, "mode": 0o600}, data)["changed"] is True
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["file name"]  # no temp files left
    # The write recorded the hash: facts read no bytes.
    assert ok(home, "facts", {"files": ["~/deep/er/file name"]})["counters"]["bytes_hashed"] == 0


def test_write_with_wrong_hash_leaves_the_target_alone(home: Path) -> None:
    (home / "f").write_bytes(b"old")
    status, answer = call(home, "write", {"path": "~/f", "mode": 0o644, "sha256": "0" * 64}, b"new")
    assert status == 1
    assert "sha256 mismatch" in answer["error"]
    assert (home / "f").read_bytes() == b"old"
    assert [p.name for p in home.iterdir()] == ["f"]


def test_write_empty_file(home: Path) -> None:
    sha = hashlib.sha256(b"").hexdigest()
    assert ok(home, "write", {"path": "~/e", "mode": 0o644, "sha256": sha})["changed"] is True
    assert (home / "e").read_bytes() == b""


def test_mkdir_and_remove(home: Path) -> None:
    assert ok(home, "mkdir", {"path": "~/a/b", "mode": 0o700}) == {"changed": True}
    assert ok(home, "mkdir", {"path": "~/a/b", "mode": 0o700}) == {"changed": False}
    assert ok(home, "mkdir", {"path": "~/a/b", "mode": 0o755}) == {"changed": True}
    assert (home / "a" / "b").stat().st_mode & 0o777 == 0o755
    (home / "a" / "b" / "f").write_text("x")
    assert ok(home, "remove", {"path": "~/a"}) == {"changed": True}
    assert not (home / "a").exists()
    assert ok(home, "remove", {"path": "~/a"}) == {"changed": False}
    (home / "file").write_text("x")
    status, answer = call(home, "mkdir", {"path": "~/file", "mode": 0o755})
    assert status == 1 and "not a directory" in answer["error"]


def test_rmdir_only_removes_empty_directories(home: Path) -> None:
    (home / "empty").mkdir()
    (home / "full").mkdir()
    (home / "full" / "user-file").write_text("mine")
    (home / "file").write_text("x")
    assert ok(home, "rmdir", {"path": "~/empty"}) == {"changed": True, "kept": None}
    assert ok(home, "rmdir", {"path": "~/empty"}) == {"changed": False, "kept": None}
    assert ok(home, "rmdir", {"path": "~/full"}) == {"changed": False, "kept": "not empty"}
    assert ok(home, "rmdir", {"path": "~/file"}) == {"changed": False, "kept": "not a directory"}
    assert (home / "full" / "user-file").read_text() == "mine"
    assert (home / "file").exists()


@pytest.mark.parametrize("path", ["~", "~/", "/", "~/."])
def test_remove_refuses_home_and_root(home: Path, path: str) -> None:
    status, answer = call(home, "remove", {"path": path})
    assert status == 1
    assert "refusing" in answer["error"]
    assert home.exists()


def test_run_creates_unless_env_cwd(home: Path) -> None:
    (home / "work").mkdir()
    argv = ["sh", "-c", 'pwd; echo "$GREETING"; echo err >&2; exit 3']
    answer = ok(home, "run", {"argv": argv, "cwd": "~/work", "env": {"GREETING": "a b $(c)"}})
    assert answer == {
        "skipped": False,
        "exit_status": 3,
        "stdout": f"{home / 'work'}\na b $(c)\n",
        "stderr": "err\n",
    }
    (home / "marker").write_text("")
    skipped = {"skipped": True, "exit_status": None, "stdout": "", "stderr": ""}
    assert ok(home, "run", {"argv": ["false"], "creates": "~/marker"}) == skipped
    assert ok(home, "run", {"argv": ["false"], "unless": ["true"]}) == skipped
    assert ok(home, "run", {"argv": ["true"], "unless": ["false"]})["exit_status"] == 0
    assert ok(home, "run", {"argv": ["/no/such"]})["exit_status"] == 127


def test_run_output_is_tail_truncated(home: Path) -> None:
    argv = [sys.executable, "-c", "print('x' * 200000 + 'THE END')"]
    out = ok(home, "run", {"argv": argv})["stdout"]
    assert out.endswith("THE END\n")
    assert len(out) < 70000


def test_run_timeout(home: Path) -> None:
    answer = ok(home, "run", {"argv": ["sleep", "5"], "timeout": 0.2})
    assert answer["exit_status"] == 124
    assert "timed out" in answer["stderr"]


@pytest.mark.parametrize(
    ("op", "request_", "message"),
    [
        ("facts", {"filez": []}, "unknown request keys: filez"),
        ("write", {"path": "~/x"}, "missing request keys: mode, sha256"),
        ("run", {"argv": "ls -l"}, "argv must be a non-empty list of strings"),
        ("mkdir", {"path": "~/x", "mode": True}, "mode must be an int"),
        ("facts", {"launchd": [{"domain": "gui", "label": "x"}]}, "launchd domain"),
    ],
)
def test_bad_requests_are_json_errors(
    home: Path, op: str, request_: dict[str, Any], message: str
) -> None:
    status, answer = call(home, op, request_)
    assert status == 1
    assert message in answer["error"]


def test_unknown_op(home: Path) -> None:
    status, answer = call(home, "explode", {})
    assert status == 2
    assert "usage" in answer["error"]


# ------------------------------------------------------------------- launchctl print parsing


@pytest.mark.parametrize(
    ("fixture", "state", "pid", "last_exit", "env"),
    [
        (
            "running.txt",
            "running",
            4242,
            1,
            {
                "MLX_RANK": "0",
                "MLX_HOSTFILE": "/Users/alice/.orch/hostfile.json",
                "HF_HUB_CACHE": "/Users/alice/.cache/huggingface/hub",
                "XPC_SERVICE_NAME": "com.orch.mlx-worker",
            },
        ),
        (
            "not_running.txt",
            "waiting",
            None,
            78,
            {"MLX_RANK": "1", "XPC_SERVICE_NAME": "com.orch.mlx-worker"},
        ),
        ("never_exited.txt", "waiting", None, None, {"XPC_SERVICE_NAME": "com.orch.wired-memory"}),
        ("killed.txt", "waiting", None, 137, {"XPC_SERVICE_NAME": "com.orch.mlx-worker"}),
    ],
)
def test_launchctl_print_fixtures(
    fixture: str, state: str, pid: int | None, last_exit: int | None, env: dict[str, str]
) -> None:
    job = agent_launchd.launchd_job((FIXTURES / fixture).read_text())
    assert job == {"state": state, "pid": pid, "last_exit": last_exit, "env": env}


def test_launchctl_print_ignores_nested_keys() -> None:
    text = (FIXTURES / "running.txt").read_text()
    parsed = agent_launchd.parse_launchctl_print(text)
    assert parsed["scalars"]["state"] == "running"
    assert "active" not in parsed["scalars"]  # only inside event channels
    assert "keepalive" not in parsed["scalars"]  # only inside event triggers
    assert parsed["blocks"]["arguments"][-1] == "8080"
    assert parsed["blocks"]["inherited environment"] == [
        "SSH_AUTH_SOCK => /private/tmp/com.apple.launchd.AbCdEf1234/Listeners"
    ]


FAKE_LAUNCHCTL = """\
#!{python}
# Fake launchctl for unit tests: bootout is asynchronous (the job lingers for LINGER seconds,
# and bootstrap fails with "5: Input/output error" for LAG seconds more), as on macOS.
import os, sys, time
state = os.environ["FAKE_LAUNCHD"]
linger, lag = float(os.environ.get("LINGER", "0.5")), float(os.environ.get("LAG", "0"))
cmd, args = sys.argv[1], sys.argv[2:]
with open(os.path.join(state, "calls.log"), "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
def job(target):
    return os.path.join(state, target.replace("/", "_"))
def loaded(target, extra=0.0):
    p = job(target)
    if not os.path.exists(p):
        return False
    gone = p + ".gone_at"
    return not os.path.exists(gone) or time.time() < float(open(gone).read()) + extra
if cmd == "print":
    if not loaded(args[0]):
        print('Could not find service "x" in domain for user gui: 501', file=sys.stderr)
        sys.exit(113)
    print(open(job(args[0])).read())
elif cmd == "bootout":
    if not loaded(args[0]):
        sys.exit(113)
    open(job(args[0]) + ".gone_at", "w").write(str(time.time() + linger))
elif cmd == "bootstrap":
    label = os.path.basename(args[1])[: -len(".plist")]
    target = args[0] + "/" + label
    if loaded(target, lag):
        print("Bootstrap failed: 5: Input/output error", file=sys.stderr)
        sys.exit(5)
    for p in (job(target), job(target) + ".gone_at"):
        if os.path.exists(p):
            os.unlink(p)
    open(job(target), "w").write(
        target + " = {{\\n\\tstate = running\\n\\tpid = 99\\n\\tlast exit code = 0\\n}}\\n"
    )
elif cmd == "kickstart":
    sys.exit(0 if loaded(args[-1]) else 113)
"""


@pytest.fixture
def fake_launchd(tmp_path: Path) -> dict[str, str]:
    bin_dir, state = tmp_path / "bin", tmp_path / "launchd"
    bin_dir.mkdir()
    state.mkdir()
    tool = bin_dir / "launchctl"
    tool.write_text(FAKE_LAUNCHCTL.format(python=sys.executable))
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LAUNCHD": str(state)}


def test_bootstrap_waits_for_the_asynchronous_bootout(
    home: Path, fake_launchd: dict[str, str]
) -> None:
    plist = {"domain": "user", "label": "com.orch.w", "plist": "~/com.orch.w.plist"}
    first = ok(home, "launchd_bootstrap", plist, env=fake_launchd)
    assert first == {"changed": True, "was_loaded": False}
    started = time.monotonic()
    second = ok(home, "launchd_bootstrap", plist, env={**fake_launchd, "LINGER": "0.6"})
    assert second == {"changed": True, "was_loaded": True}
    assert time.monotonic() - started >= 0.6
    facts = ok(
        home, "facts", {"launchd": [{"domain": "user", "label": "com.orch.w"}]}, env=fake_launchd
    )
    job = parse_facts("n", facts).launchd["user/com.orch.w"]
    assert job.state is JobState.RUNNING and job.pid == 99


def test_bootstrap_retries_input_output_error(home: Path, fake_launchd: dict[str, str]) -> None:
    plist = {"domain": "user", "label": "com.orch.w", "plist": "~/com.orch.w.plist"}
    ok(home, "launchd_bootstrap", plist, env=fake_launchd)
    # A lag long enough that the first bootstrap lands inside it even when each fake launchctl
    # start takes a few hundred ms on a loaded machine (0.5 s once let it succeed first time).
    env = {**fake_launchd, "LINGER": "0.2", "LAG": "3"}
    assert ok(home, "launchd_bootstrap", plist, env=env)["was_loaded"] is True
    calls = Path(fake_launchd["FAKE_LAUNCHD"], "calls.log").read_text().splitlines()
    assert sum(c.startswith("bootstrap") for c in calls) >= 3  # failed at least once, then ok


def test_bootstrap_gives_up_after_timeout(home: Path, fake_launchd: dict[str, str]) -> None:
    plist = {"domain": "user", "label": "com.orch.w", "plist": "~/com.orch.w.plist", "timeout": 0.3}
    ok(home, "launchd_bootstrap", plist, env=fake_launchd)
    status, answer = call(home, "launchd_bootstrap", plist, env={**fake_launchd, "LINGER": "5"})
    assert status == 1
    assert "still loaded" in answer["error"]


def test_bootout_and_kickstart(home: Path, fake_launchd: dict[str, str]) -> None:
    job = {"domain": "user", "label": "com.orch.w"}
    assert ok(home, "launchd_bootout", job, env=fake_launchd) == {"changed": False}
    status, answer = call(home, "launchd_kickstart", job, env=fake_launchd)
    assert status == 1 and "kickstart" in answer["error"]
    ok(home, "launchd_bootstrap", {**job, "plist": "~/com.orch.w.plist"}, env=fake_launchd)
    assert ok(home, "launchd_kickstart", job, env=fake_launchd) == {"changed": True}
    assert ok(home, "launchd_bootout", job, env={**fake_launchd, "LINGER": "0.3"}) == {
        "changed": True
    }
    facts = ok(home, "facts", {"launchd": [job]}, env=fake_launchd)
    assert facts["launchd"]["user/com.orch.w"]["state"] == "not_loaded"
    uid = os.getuid()
    calls = Path(fake_launchd["FAKE_LAUNCHD"], "calls.log").read_text()
    assert f"kickstart -k user/{uid}/com.orch.w" in calls


# ------------------------------------------------------- shipping, through LocalConnection


def test_agent_is_uploaded_once_then_one_session(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home, name="n1")
        first = await conn.agent("facts", {"files": ["~/x"]})
        assert first["files"]["~/x"]["kind"] == "missing"
        assert conn.round_trips == 3  # tried, uploaded, ran the session
        cached = home / ".orch" / "agent" / f"{agent_file_id()}.pyz"
        assert cached.read_bytes() == agent_source()
        assert cached.stat().st_mode & 0o777 == 0o600
        before = conn.round_trips
        await conn.agent("facts", {})
        await conn.agent("mkdir", {"path": "~/d", "mode": 0o700})
        assert conn.round_trips == before  # the same session answered both
        await conn.close()
        await conn.agent("facts", {})  # a closed session reopens at the next call
        assert conn.round_trips == before + 1
        await conn.close()
        fresh = LocalConnection(home, name="n1")  # a new run against a converged host
        await fresh.agent("facts", {})
        assert fresh.round_trips == 1
        await fresh.close()

    asyncio.run(scenario())


def test_an_upload_removes_what_a_killed_upload_left_once_it_is_an_hour_old(home: Path) -> None:
    cache = home / ".orch" / "agent"
    (cache / ".unpack-killed").mkdir(parents=True)
    (cache / ".unpack-killed" / "facts.py").write_text("partial")
    (cache / ".upload-killed").write_bytes(b"partial zip")
    (cache / ".unpack-running").mkdir()  # another run's, in progress
    an_hour_ago = time.time() - STALE_UPLOAD - 1
    for left in (".unpack-killed", ".upload-killed"):
        os.utime(cache / left, (an_hour_ago, an_hour_ago))

    async def scenario() -> None:
        conn = LocalConnection(home, name="n1")
        try:
            await conn.agent("facts", {})
            assert conn.round_trips == 3  # tried, uploaded, ran the session
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [".unpack-running", agent_file_id(), f"{agent_file_id()}.pyz"])


@pytest.mark.parametrize("version", ["3.9", "this"])
def test_uploaded_agent_runs_from_bytecode_compiled_once(home: Path, version: str) -> None:
    """The upload unpacks the zip beside it and compiles it with the node's Python; every
    later start runs that bytecode (zipimport would compile every module at every start)
    and writes none itself. 3.9: a stock Mac's /usr/bin/python3."""
    python = sys.executable
    if version != "this":
        found = sorted(Path("~/.pyenv/versions").expanduser().glob(f"{version}.*/bin/python"))
        python = str(found[0]) if found else shutil.which(f"python{version}") or ""
        assert python, f"no python{version} on this machine (a stock Mac runs the agent on 3.9)"

    async def facts() -> dict[str, Any]:
        conn = LocalConnection(home, name="n1", agent_python=python)
        try:
            return await conn.agent("facts", {})
        finally:
            await conn.close()

    assert asyncio.run(facts())["agent"]["version"] == agent_source_hash()
    unpacked = home / ".orch" / "agent" / agent_file_id()
    compiled = sorted(p.name.split(".")[0] for p in (unpacked / "__pycache__").iterdir())
    assert compiled == sorted(["__main__", *NODE_MODULES])
    # A source changed behind its bytecode's back (same size and mtime): the bytecode runs.
    source = unpacked / "facts.py"
    stat = source.stat()
    source.write_text(source.read_text().replace("def op_facts(", "def op_fxcts("))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert asyncio.run(facts())["agent"]["version"] == agent_source_hash()
    # Without that bytecode the changed source is what runs: the directory, not the zip.
    for pyc in (unpacked / "__pycache__").glob("facts.*"):
        pyc.unlink()
    with pytest.raises(ActionFailed, match="op_facts"):
        asyncio.run(facts())
    assert not [*(unpacked / "__pycache__").glob("facts.*")]  # -B: a run writes none


def test_write_through_connection_before_the_agent_is_cached(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home)
        data = os.urandom(300_000)
        sha = hashlib.sha256(data).hexdigest()
        try:
            answer = await conn.agent(
                "write", {"path": "~/w", "mode": 0o600, "sha256": sha}, stdin=data
            )
        finally:
            await conn.close()
        assert answer == {"sha256": sha, "changed": True}
        assert (home / "w").read_bytes() == data

    asyncio.run(scenario())


def test_agent_errors_become_action_failed(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home, name="n7")
        with pytest.raises(ActionFailed) as info:
            try:
                await conn.agent("mkdir", {"path": "~/x"})
            finally:
                await conn.close()
        assert info.value.host == "n7"
        assert "agent mkdir failed: missing request keys: mode" in str(info.value)

    asyncio.run(scenario())


def test_missing_python_says_so(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home, agent_python="no-such-python3")
        with pytest.raises(ActionFailed, match="'no-such-python3' was not found"):
            await conn.agent("facts", {})

    asyncio.run(scenario())


def test_agent_timeout_leaves_room_for_the_node_to_answer() -> None:
    assert agent_timeout({}, 600) == 630
    assert agent_timeout({"timeout": 3600}, 600) == 3630
    assert agent_timeout({"timeout": 5}, 600) == 630
    assert agent_timeout({"timeout": True}, 10) == 40  # not a number, whatever JSON says


def test_local_run_timeout(home: Path) -> None:
    async def scenario() -> None:
        conn = LocalConnection(home)
        with pytest.raises(ActionFailed, match="timed out"):
            await conn.run(["sleep", "5"], timeout=0.2)
        result = await conn.run(["sh", "-c", "kill -TERM $$"])
        assert result.exit_status == 128 + 15

    asyncio.run(scenario())
