"""Bench bookkeeping shared by the stand-ins (TEST STAND-IN support, not a command).

Installed beside them on a simulated host's PATH; each stand-in imports it last, from its own
directory (they run isolated, -I, so that directory is not on sys.path by itself).
"""

# os.path and %-format on purpose: no pathlib import (~9 ms a start), as in the stand-ins.
# ruff: noqa: PTH118, UP031
import os


def account(name):
    """When <root>/log/standins.cpu exists (bench/peers.py creates it), append this stand-in's
    own CPU seconds (and its children's) to it. A Mac runs a native binary here, so the bench
    can tell what the simulation costs from what orch does. Not counted: the interpreter's exit
    after this, so the figure errs low."""
    root = os.environ.get("ORCH_HOST_ROOT")
    if not root:
        return
    try:
        fd = os.open(os.path.join(root, "log", "standins.cpu"), os.O_WRONLY | os.O_APPEND)
    except OSError:
        return
    import resource

    cpu = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        cpu += usage.ru_utime + usage.ru_stime
    os.write(fd, ("%s %.6f\n" % (name, cpu)).encode())
    os.close(fd)
