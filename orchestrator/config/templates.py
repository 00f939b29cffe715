"""Users' jinja2 templates: compiled offline by `orch validate`, rendered per host by `plan`.

A template is code the user wrote, so its mistakes are reported like the YAML's: at
TEMPLATE:LINE:COL with what was expected, plus the task that uses it. Two checks, because
what can be known differs:

- offline (`check_template`): the file is UTF-8 text within the size bound and parses, and so
  does every template it includes by a constant name. A syntax error never reaches a host.
- per host (`render_template`): a name the template uses but was not given can only be found
  with the host's variables. jinja2's UndefinedError carries no line, but jinja rewrites the
  traceback so the template's own frames carry template line numbers (as its debug
  tracebacks show); the innermost such frame is where the name is used.
"""

from __future__ import annotations

import functools
import re
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.loaders import split_template_path

from orchestrator.config.yamlsrc import read_text_bounded
from orchestrator.errors import ConfigError, Diagnostic

WHAT = "a jinja2 template"
GIVEN = "cluster, host, hosts and the task's vars"


class _Loader(jinja2.BaseLoader):
    """Like FileSystemLoader (same path rules) but bounded and UTF-8 checked, and it remembers
    which files it loaded so an error's traceback frame can be matched to one of them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.loaded: dict[str, Path] = {}

    def get_source(self, environment: jinja2.Environment,
                   template: str) -> tuple[str, str, Callable[[], bool]]:
        file = self.directory.joinpath(*split_template_path(template))
        if not file.is_file():
            raise jinja2.TemplateNotFound(template)
        text = read_text_bounded(file, WHAT)
        self.loaded[str(file)] = file
        return text, str(file), lambda: _unchanged(file, text)


def _unchanged(file: Path, text: str) -> bool:
    """Whether a compiled template is still current: the file still holds the text it was
    compiled from (templates are small; reading one costs far less than compiling it)."""
    try:
        return read_text_bounded(file, WHAT) == text
    except ConfigError:
        return False


def _environment(directory: Path) -> tuple[jinja2.Environment, _Loader]:
    loader = _Loader(directory)
    env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True,
                             autoescape=False)  # noqa: S701 - config files, not HTML
    return env, loader


def check_template(src: Path, origin: str) -> list[Diagnostic]:
    """Every problem `orch validate` can find in `src` and what it includes, without a host."""
    env, loader = _environment(src.parent)
    pending: list[str] = [src.name]
    seen: set[str] = set()
    problems: list[Diagnostic] = []
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            source, filename, _ = loader.get_source(env, name)
            tree = env.parse(source, name, filename)
        except ConfigError as exc:  # not UTF-8 text, or too big
            problems += [_for_task(d, origin) for d in exc.diagnostics]
            continue
        except jinja2.TemplateNotFound:
            continue  # the includer is reported below, at its line
        except jinja2.TemplateSyntaxError as exc:
            problems.append(_syntax(exc, Path(filename), origin))
            continue
        for included in jinja2.meta.find_referenced_templates(tree):
            if included is None:
                continue  # a computed name: only rendering can tell
            if not _exists(src.parent, included):
                problems.append(Diagnostic(
                    Path(filename), *_find(source, included),
                    f"template {included!r} is not found; expected a file beside {src.name} "
                    f"(task at {origin})"))
            pending.append(included)
    return problems


@functools.lru_cache(maxsize=32)
def _rendering_environment(directory: Path) -> tuple[jinja2.Environment, _Loader]:
    """One environment per template directory for the process, so jinja's cache keeps each
    template compiled: a plan renders every template once per host, and twice per run (the
    sketch before facts, the desired state after); compiling each time was most of a 25-host
    no-op's template work. A template whose file changed is compiled again (`_unchanged`)."""
    return _environment(directory)


def render_template(src: Path, variables: Mapping[str, Any], origin: str) -> str:
    """Render with StrictUndefined: a missing variable is an error, never an empty string.

    Any exception the template raises (an undefined name, `1/0`, a bad filter argument) is
    the user's mistake, not orch's, so it becomes a diagnostic at the template's line.
    """
    env, loader = _rendering_environment(src.parent)
    try:
        return env.get_template(src.name).render(**variables)
    except ConfigError as exc:
        raise ConfigError([_for_task(d, origin) for d in exc.diagnostics]) from None
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError([_syntax(exc, Path(exc.filename or src), origin)]) from None
    except Exception as exc:  # the template's own code failed: see the docstring
        file, line = _template_frame(exc, loader.loaded) or (src, 1)
        raise ConfigError([_at_use(exc, file, line, origin)]) from None


def _exists(directory: Path, name: str) -> bool:
    """Whether the loader would find `name` (jinja refuses names that climb out with `..`)."""
    try:
        return directory.joinpath(*split_template_path(name)).is_file()
    except jinja2.TemplateNotFound:
        return False


def _syntax(exc: jinja2.TemplateSyntaxError, file: Path, origin: str) -> Diagnostic:
    return Diagnostic(file, exc.lineno or 1, 1,
                      f"template syntax error: {exc.message}; expected jinja2 syntax "
                      f"(task at {origin})")


def _template_frame(exc: BaseException, loaded: Mapping[str, Path]) -> tuple[Path, int] | None:
    """The innermost traceback frame that is template code: the file and its line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename in loaded]
    if not frames or frames[-1].lineno is None:
        return None
    return loaded[frames[-1].filename], frames[-1].lineno


UNDEFINED = re.compile(r"^'([^']+)' is undefined$|has no attribute '([^']+)'$")


def _at_use(exc: Exception, file: Path, line: int, origin: str) -> Diagnostic:
    """Point at the name on its line when the error names one, else at the line."""
    text = _line(file, line)
    if isinstance(exc, jinja2.UndefinedError):
        match = UNDEFINED.search(str(exc))
        name = next((g for g in match.groups() if g), "") if match else ""
        col = _column(text, name)
        return Diagnostic(file, line, col, f"undefined: {exc}; expected a name the template is "
                                           f"given ({GIVEN}) (task at {origin})")
    if isinstance(exc, jinja2.TemplateNotFound):
        return Diagnostic(file, line, _column(text, str(exc.name or "")),
                          f"template {exc.name!r} is not found; expected a file beside "
                          f"{file.name} (task at {origin})")
    return Diagnostic(file, line, 1, f"template error: {type(exc).__name__}: {exc} "
                                     f"(task at {origin})")


def _line(file: Path, line: int) -> str:
    try:
        lines = read_text_bounded(file, WHAT).splitlines()
    except ConfigError:
        return ""
    return lines[line - 1] if 0 < line <= len(lines) else ""


def _column(text: str, name: str) -> int:
    if not name:
        return 1
    found = re.search(rf"(?<![\w.]){re.escape(name)}\b|\.{re.escape(name)}\b", text)
    if found is None:
        return 1
    return found.start() + 1 + (text[found.start()] == ".")


def _find(source: str, needle: str) -> tuple[int, int]:
    at = source.find(needle)
    if at < 0:
        return 1, 1
    return source.count("\n", 0, at) + 1, at - (source.rfind("\n", 0, at) + 1) + 1


def _for_task(diagnostic: Diagnostic, origin: str) -> Diagnostic:
    return Diagnostic(diagnostic.file, diagnostic.line, diagnostic.column,
                      f"{diagnostic.message} (task at {origin})", diagnostic.severity)
