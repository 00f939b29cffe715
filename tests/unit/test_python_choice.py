"""Which interpreter makes a node's venv: runtime.python × the interpreters found × the pins'
Requires-Python floor, as a table (`orchestrator.resources.interpreter`). Pure: facts in, the
chosen path (or the refusal's words) out."""

from __future__ import annotations

import pytest

from orchestrator.errors import PlanError
from orchestrator.facts import HostFacts, Interpreter, PythonsFact
from orchestrator.resources.interpreter import choose_python, chosen_pythons
from tests.fixtures.facts import HOME, host_facts

STOCK = Interpreter("/usr/bin/python3", "3.9.6")
STUB = Interpreter("/usr/bin/python3", None, stub=True)
BREW_311 = Interpreter("/opt/homebrew/bin/python3.11", "3.11.9")
BREW_312 = Interpreter("/opt/homebrew/bin/python3.12", "3.12.4")
LOCAL_312 = Interpreter(f"{HOME}/.local/bin/python3.12", "3.12.7")
UV_313 = Interpreter(f"{HOME}/.local/share/uv/python/cpython-3.13.1-macos-aarch64-none/bin/"
                     "python3.13", "3.13.1")
MUTE = Interpreter("/usr/local/bin/python3.12", None)  # found, but did not answer
FLOOR = (3, 11)  # mlx-lm 0.32's Requires-Python


def mac(*found: Interpreter, host: str = "mac1") -> HostFacts:
    return host_facts(host, python_version="3.9.6",
                      pythons=PythonsFact(developer_tools=STUB not in found, found=found))


CHOSEN = [
    # (runtime.python, found, Requires-Python floor) -> the venv's interpreter
    ("auto", (STOCK, BREW_311, BREW_312), FLOOR, BREW_312),
    ("auto", (STOCK, BREW_311), FLOOR, BREW_311),
    ("auto", (STOCK, BREW_312, LOCAL_312), FLOOR, LOCAL_312),  # the newest patch release
    ("auto", (STOCK, BREW_312, UV_313), FLOOR, UV_313),
    ("auto", (STOCK, BREW_311), (3, 9), BREW_311),  # a floor 3.9 accepts all: still the newest
    ("auto", (MUTE, BREW_311), FLOOR, BREW_311),  # one that did not run is never chosen
    ("3.11", (STOCK, BREW_311, BREW_312, UV_313), FLOOR, BREW_311),
    ("3.12", (STOCK, BREW_312, LOCAL_312, UV_313), FLOOR, LOCAL_312),
    ("/opt/homebrew/bin/python3.11", (BREW_311, BREW_312), FLOOR, BREW_311),
    ("~/.local/bin/python3.12", (BREW_312, LOCAL_312, UV_313), FLOOR, LOCAL_312),
    ("python3.12", (STOCK, BREW_312), FLOOR, BREW_312),  # a command name
]


@pytest.mark.parametrize(("wanted", "found", "floor", "chosen"), CHOSEN)
def test_the_chosen_interpreter(wanted: str, found: tuple[Interpreter, ...],
                                floor: tuple[int, int], chosen: Interpreter) -> None:
    assert choose_python(mac(*found), wanted, floor) == chosen


REFUSED = [
    # (runtime.python, found, floor) -> words the refusal must hold
    ("auto", (STOCK,), FLOOR,
     ["mac1: needs Python ≥ 3.11 (the pinned mlx-lm requires it) to create orch's venv",
      "found: /usr/bin/python3 3.9.6", "Fix: `brew install python@3.12` (or "
      "`uv python install 3.12`)"]),
    ("auto", (STUB,), FLOOR,
     ["found: the Command Line Tools stub (/usr/bin/python3: the Command Line Tools are not "
      "installed)"]),
    ("auto", (), FLOOR, ["found: no Python at all"]),
    ("auto", (STOCK, MUTE), FLOOR, ["/usr/local/bin/python3.12 (did not run)"]),
    ("auto", (STOCK, BREW_312), (3, 13), ["needs Python ≥ 3.13", "3.12.4"]),
    ("3.12", (STOCK, BREW_311), FLOOR,
     ["needs Python 3.12 (runtime.python), and the pins need ≥ 3.11",
      "`brew install python@3.12`"]),
    ("3.13", (BREW_311, BREW_312), FLOOR, ["`uv python install 3.13`"]),
    ("3.10", (Interpreter("/opt/homebrew/bin/python3.10", "3.10.14"),), FLOOR,
     ["needs Python 3.10 (runtime.python), and the pins need ≥ 3.11"]),  # below the floor
    ("/usr/bin/python3", (STOCK, BREW_312), FLOOR,
     ["runtime.python is '/usr/bin/python3', but no such Python ≥ 3.11",
      "set runtime.python: auto"]),
    ("/opt/local/bin/python3.12", (STOCK, BREW_312), FLOOR,
     ["runtime.python is '/opt/local/bin/python3.12'", "Fix: install it there"]),
]


@pytest.mark.parametrize(("wanted", "found", "floor", "words"), REFUSED)
def test_a_refusal_names_the_node_what_was_found_and_the_fix(
        wanted: str, found: tuple[Interpreter, ...], floor: tuple[int, int],
        words: list[str]) -> None:
    with pytest.raises(PlanError) as refused:
        choose_python(mac(*found), wanted, floor)
    for word in words:
        assert word in str(refused.value)


def test_facts_without_interpreters_keep_python3_at_the_agents_version() -> None:
    """Tables and tools that plan without asking for interpreters: `python3` on PATH."""
    facts = host_facts(python_version="3.11.7")
    assert choose_python(facts, "auto") == Interpreter("python3", "3.11.7")
    assert choose_python(facts, "/opt/x/python3") == Interpreter("/opt/x/python3", "3.11.7")


def test_auto_takes_the_newest_version_every_node_has() -> None:
    """One wheelhouse serves a ring only when its nodes share a Python version."""
    facts = {"mac1": mac(STOCK, BREW_311, BREW_312, host="mac1"),
             "mac2": mac(STOCK, BREW_311, host="mac2")}
    assert chosen_pythons(facts, ["mac1", "mac2"], "auto") == {"mac1": BREW_311,
                                                               "mac2": BREW_311}
    facts["mac2"] = mac(BREW_311, LOCAL_312, host="mac2")
    assert chosen_pythons(facts, ["mac1", "mac2"], "auto") == {"mac1": BREW_312,
                                                               "mac2": LOCAL_312}


def test_every_refused_node_is_named_at_once_before_any_change() -> None:
    facts = {"mac1": mac(STOCK, host="mac1"), "mac2": mac(STUB, host="mac2"),
             "mac3": mac(BREW_312, host="mac3")}
    with pytest.raises(PlanError) as refused:
        chosen_pythons(facts, ["mac1", "mac2", "mac3"], "auto")
    message = str(refused.value)
    assert message.startswith("nothing was changed: ")
    assert "mac1: needs Python ≥ 3.11" in message and "mac2: needs Python ≥ 3.11" in message
    assert "mac3" not in message
