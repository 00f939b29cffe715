"""asyncssh is imported without ctypes' liboqs search (ldconfig, gcc, ld) only when that search
would come back empty: the shortcut may never hide a liboqs the real search finds."""

from __future__ import annotations

import ctypes.util
import sys
from pathlib import Path

import pytest

from orchestrator.executor import _asyncssh
from orchestrator.executor._asyncssh import liboqs_may_exist, quick_oqs_search


def test_the_shortcut_never_hides_a_liboqs_the_real_search_finds() -> None:
    assert liboqs_may_exist() or ctypes.util.find_library("oqs") is None
    assert liboqs_may_exist() or ctypes.util.find_library("liboqs") is None


def test_a_liboqs_where_the_linker_looks_takes_the_real_search(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "liboqs.so").write_bytes(b"")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/nonexistent:{tmp_path}")
    assert liboqs_may_exist()
    search = ctypes.util.find_library
    with quick_oqs_search():
        assert ctypes.util.find_library is search


def test_without_liboqs_only_its_names_are_answered_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(_asyncssh, "liboqs_may_exist", lambda: False)
    search = ctypes.util.find_library
    with quick_oqs_search():
        assert ctypes.util.find_library("oqs") is None
        assert ctypes.util.find_library("liboqs") is None
        assert ctypes.util.find_library("c") == search("c")
    assert ctypes.util.find_library is search
