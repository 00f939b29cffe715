"""asyncssh, imported once for the executor, without its costly search for a liboqs that is
not there.

At import, ``asyncssh.crypto.pq`` asks ``ctypes.util.find_library`` for ``oqs`` and
``liboqs`` (for the sntrup761 key exchange). On Linux each question runs ``ldconfig -p``,
then ``gcc`` and ``ld`` when the library is absent: ~55 ms of every run's startup here, ~40 ms
of it CPU, before any host is dialled. While asyncssh is imported, those two names are
answered "absent" at once when no ``liboqs.so*`` is in the loader's cache or in the
directories the linker searches; otherwise (a liboqs is installed) the real search runs as
before. Other platforms search without running programs and are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["asyncssh"]

OQS_NAMES = ("oqs", "liboqs")
LINKER_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/local/lib64")


def liboqs_may_exist() -> bool:
    """False only when find_library would find no liboqs: none in the loader's cache (what
    ``ldconfig -p`` prints) and none where ``gcc``/``ld`` look (LIBRARY_PATH, LD_LIBRARY_PATH,
    the default library directories)."""
    try:
        if b"liboqs.so" in Path("/etc/ld.so.cache").read_bytes():
            return True
    except OSError:
        return True  # no cache to read: let the real search decide
    dirs = [Path(d) for d in LINKER_DIRS]
    arch = getattr(sys.implementation, "_multiarch", None)  # e.g. x86_64-linux-gnu
    if arch:
        dirs += [Path("/lib", arch), Path("/usr/lib", arch)]
    for variable in ("LD_LIBRARY_PATH", "LIBRARY_PATH"):
        dirs += [Path(d) for d in os.environ.get(variable, "").split(os.pathsep) if d]
    # gcc's and ld's `-loqs` find exactly liboqs.so (or .a): a versioned name alone is the
    # loader's business, and the loader's cache was read above.
    return any((d / name).exists() for d in dirs for name in ("liboqs.so", "liboqs.a"))


@contextlib.contextmanager
def quick_oqs_search() -> Iterator[None]:
    """Inside the block, find_library answers None for liboqs at once when it is surely absent
    (Linux only; see the module's docstring)."""
    if not sys.platform.startswith("linux") or liboqs_may_exist():
        yield
        return
    search = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return None if name in OQS_NAMES else search(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = search


with quick_oqs_search():
    import asyncssh
