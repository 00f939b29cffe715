"""host.json's values for the stand-ins, without importing json (TEST STAND-IN support, not a
command; installed beside them like standin_cpu.py).

Why: every stand-in is a Python start where a Mac runs a native binary in 1-2 ms of CPU, and
`import json` alone (it pulls in `re`, `enum`, `functools`, `collections`) was ~8 ms of a ~20 ms
`sysctl`. host.json stays the one source of the host's identity (hosts.py writes it, tests
rewrite it); the stand-ins read it through <root>/run/host.marshal, a copy in `marshal` (built
into the interpreter: nothing to import), made by the first stand-in that needs it and trusted
only while host.json's (mtime, size, inode) are the ones it was made from. As in git's "racily
clean" rule, a host.json written within the last RACY_SECONDS is not copied: two writes of the
same size within one timestamp tick would look alike. run/ is wiped at every boot, the copy
with it.
"""

# os.path on purpose: no pathlib import (~9 ms a start), as in the stand-ins; no contextlib
# either (SIM105). S302: the marshal copy is one this simulation wrote, in the host's own run/.
# ruff: noqa: PTH105, PTH108, PTH116, PTH118, PTH123, S302, SIM105
import marshal
import os
import time

RACY_SECONDS = 2.0


def host_values(root):
    """The dict in <root>/host.json. Raises OSError when there is none (not a simulated Mac)."""
    path = os.path.join(root, "host.json")
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size, st.st_ino)
    copy = os.path.join(root, "run", "host.marshal")
    try:
        with open(copy, "rb") as f:
            made_from, values = marshal.load(f)
        if made_from == key:
            return values
    except (OSError, EOFError, ValueError, TypeError):
        pass
    import json  # the first read after boot or after a change: the slow path, once

    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    if time.time() - st.st_mtime > RACY_SECONDS:
        tmp = f"{copy}.{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                marshal.dump((key, values), f)
            os.replace(tmp, copy)
        except OSError:  # no run/ (a bare root in a unit test): every read is the slow path
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return values


def flat_json(text):
    """A JSON object of plain names to numbers, the shape this simulation writes its volatile
    state in (run/sysctl.json: {"iogpu.wired_limit_mb": 49152}; run/boot.json: {"boot_time":
    1764571234.5}), read without importing json. Any other text goes to json, which parses it
    or raises ValueError exactly as before."""
    body = text.strip()
    if body.startswith("{") and body.endswith("}"):
        inner = body[1:-1].strip()
        values = {}
        for item in inner.split(",") if inner else ():
            name, colon, number = item.partition(":")
            name, number = name.strip(), number.strip()
            quoted = len(name) >= 2 and name[0] == name[-1] == '"'
            if not (colon and quoted and '"' not in name[1:-1] and "\\" not in name
                    and number[:1] in set("-0123456789") and set(number) <= set("0123456789.-+eE")):
                break
            try:
                values[name[1:-1]] = int(number) if number.lstrip("-").isdigit() else float(number)
            except ValueError:
                break
        else:
            return values
    import json

    return json.loads(text)
