"""Every usage error of every command exits 1 with one line on stderr, never click's 2.

Exit 2 is "changes pending": a CI drift check (`orch plan --detailed-exitcode`) must not read
a typo in its own command line as drift. The cases are generated from the click group itself,
so a command or option added later is covered without touching this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from orchestrator import errors
from orchestrator.cli import EXIT_CODES, INTERRUPTED, exit_code_for, main
from orchestrator.errors import ExitCode

REPO = Path(__file__).resolve().parents[2]
FILE, DIRECTORY = "<a file>", "<a directory>"


@dataclass(frozen=True)
class Misuse:
    id: str
    command: str  # the command path the message must name, e.g. "orch sandbox up"
    argv: tuple[str, ...]
    expect: str  # a fragment the one-line message must contain


def all_commands(group: click.Group = main, path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """The root group and every command and subcommand under it."""
    yield path, group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from all_commands(command, (*path, name))
        else:
            yield (*path, name), command


def good_value(param: click.Parameter) -> str:
    """A value click accepts for `param`, so that the other argument is the only mistake."""
    kind = param.type
    if isinstance(kind, click.Path):
        return DIRECTORY if not kind.file_okay else FILE
    if isinstance(kind, click.Choice):
        return str(kind.choices[0])
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        return "5"
    return "x"


def as_argv(param: click.Parameter, value: str) -> tuple[str, ...]:
    if isinstance(param, click.Option):
        return (param.opts[0], value)
    return (value,)


def required_argv(command: click.Command, *, without: click.Parameter | None = None
                  ) -> tuple[str, ...]:
    """Good values for every required parameter but `without`, arguments in order."""
    argv: list[str] = []
    for param in command.params:
        if param.required and param is not without:
            argv += as_argv(param, good_value(param))
    return tuple(argv)


def bad_values(param: click.Parameter) -> Iterator[tuple[str, str, str]]:
    """(case id, bad value, message fragment) for each way `param`'s type can be misused."""
    kind = param.type
    if isinstance(kind, click.Path) and not kind.dir_okay:
        yield "directory-for-file", DIRECTORY, "is a directory"
    if isinstance(kind, click.Path) and not kind.file_okay:
        yield "file-for-directory", FILE, "is a file"
    if isinstance(kind, click.Choice):
        yield "bad-choice", "bogus", "is not one of"
    if isinstance(kind, (click.types.IntParamType, click.types.FloatParamType)):
        yield "not-a-number", "many", "Invalid value"
    if isinstance(kind, click.types._NumberRangeBase) and kind.min is not None:
        yield "below-range", str(kind.min - 1), "Invalid value"


def misuses() -> Iterator[Misuse]:
    for path, command in all_commands():
        name = " ".join(("orch", *path))
        case = name.removeprefix("orch").strip() or "orch"
        yield Misuse(f"{case}:unknown-option", name, (*path, "--no-such-option"),
                     "No such option")
        # A group's own options come before its subcommand; `schema` needs no argument.
        after = ("schema",) if isinstance(command, click.Group) else ()
        if isinstance(command, click.Group):
            yield Misuse(f"{case}:missing-command", name, path, "missing command; expected one of")
            yield Misuse(f"{case}:unknown-command", name, (*path, "no-such-command"),
                         "No such command")
        for param in command.params:
            rest = required_argv(command, without=param)
            if param.required:
                yield Misuse(f"{case}:missing-{param.name}", name, (*path, *rest), "Missing")
            if getattr(param, "is_flag", False) or getattr(param, "count", False):
                continue
            for kind, value, fragment in bad_values(param):
                yield Misuse(f"{case}:{param.name}:{kind}", name,
                             (*path, *as_argv(param, value), *rest, *after), fragment)


MISUSES = list(misuses())


def test_the_walk_covers_every_command_and_the_misuses_that_matter() -> None:
    commands = {" ".join(p) for p, _ in all_commands()}
    assert {"", "validate", "plan", "apply", "place", "sandbox", "sandbox up"} <= commands
    kinds = {m.id.split(":")[-1] for m in MISUSES}
    assert {"unknown-option", "missing-command", "missing-cluster_file", "directory-for-file",
            "file-for-directory", "bad-choice", "not-a-number", "below-range"} <= kinds


@pytest.mark.parametrize("misuse", MISUSES, ids=[m.id for m in MISUSES])
def test_usage_error_exits_1_with_one_line(tmp_path: Path, misuse: Misuse) -> None:
    (tmp_path / "file.yml").write_text("name: [unclosed\n")  # never loaded: parsing fails first
    (tmp_path / "dir").mkdir()
    argv = [{FILE: str(tmp_path / "file.yml"), DIRECTORY: str(tmp_path / "dir")}.get(a, a)
            for a in misuse.argv]
    result = CliRunner().invoke(main, argv)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.splitlines()
    assert (result.exit_code, len(lines)) == (1, 1), result.output
    assert lines[0].startswith(f"error: {misuse.command}: "), lines[0]
    assert misuse.expect in lines[0], lines[0]
    assert result.stdout == ""


def test_usage_error_raised_by_a_command_itself_exits_1() -> None:
    result = CliRunner().invoke(main, ["place", str(REPO / "playbooks" / "deepseek-r1.yml"),
                                       "--params", "671e9"])
    assert result.exit_code == 1, result.output
    assert result.stderr == ("error: orch place: --params, --bits and --layers go together "
                             "(see 'orch place --help')\n")


@pytest.mark.parametrize(("exc", "code"), [
    (errors.LockHeld("held by me"), ExitCode.LOCK_HELD),
    (errors.HostKeyRejected("a", "changed key"), ExitCode.UNREACHABLE),
    (errors.HostUnreachable("a", "refused"), ExitCode.UNREACHABLE),
    (errors.ActionFailed("a", "exit 3"), ExitCode.ERROR),
    (errors.ConfigError([]), ExitCode.ERROR),
    (click.BadParameter("no"), ExitCode.ERROR),
    (click.Abort(), ExitCode.ERROR),
    (KeyboardInterrupt(), INTERRUPTED),
])
def test_one_table_maps_exceptions_to_exit_codes(exc: BaseException, code: int) -> None:
    assert exit_code_for(exc) == code


def test_interrupt_that_click_wrapped_in_abort_is_still_an_interrupt() -> None:
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise click.Abort from interrupt
    except click.Abort as wrapped:
        assert exit_code_for(wrapped) == INTERRUPTED


def _subclasses(cls: type[errors.OrchError]) -> Iterator[type[errors.OrchError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_the_table_agrees_with_every_error_class_exit_code() -> None:
    """`OrchError.exit_code` is read by callers outside the CLI; it must not tell another story."""
    classes = list(_subclasses(errors.OrchError))
    assert len(classes) >= 9
    for cls in classes:
        assert exit_code_for(cls.__new__(cls)) == cls.exit_code, cls.__name__
    assert [kind for kind, _ in EXIT_CODES][-1] is KeyboardInterrupt


@pytest.mark.parametrize(("exc", "code", "line"), [
    (errors.LockHeld("locked by ci@runner (nonce 1a2b)"), 4,
     "error: locked by ci@runner (nonce 1a2b)"),
    (errors.HostUnreachable("a", "connection refused"), 3, "error: a: connection refused"),
    (errors.PlacementError("needs 420 GB, has 384 GB"), 1, "error: needs 420 GB, has 384 GB"),
    (KeyboardInterrupt(), INTERRUPTED, "interrupted"),
])
def test_an_error_raised_by_a_command_exits_through_the_one_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException, code: int,
        line: str) -> None:
    def fail(_: Path) -> None:
        raise exc

    monkeypatch.setattr("orchestrator.cli.load_cluster", fail)
    (tmp_path / "cluster.yml").write_text("name: lab\n")
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "cluster.yml")])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code
    assert result.stderr.strip().splitlines() == [line]


def test_plan_out_into_a_missing_directory_is_refused_before_any_host(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yml"
    cluster.write_text("name: lab\nhosts:\n  a: {address: 127.0.0.1, port: 1, ring_ip: 10.1.0.1, "
                       "memory_gb: 64}\n")
    result = CliRunner().invoke(main, ["plan", str(cluster), "--out",
                                       str(tmp_path / "missing" / "plan.json"),
                                       "--known-hosts", str(tmp_path / "known_hosts")])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert result.stderr == (f"error: orch plan: Invalid value for '--out': directory "
                             f"'{tmp_path / 'missing'}' does not exist; expected a file in an "
                             "existing directory (see 'orch plan --help')\n")
