"""structlog, configured once per process by the CLI.

Events are names plus fields (`log.info("action_applied", host=h)`); what the user reads as
output comes from renderers, never from logs. Logs go to stderr so `--json` output on stdout
stays machine-readable.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Literal


@contextlib.contextmanager
def _hidden(module: str) -> Iterator[None]:
    """Inside the block `import module` fails, as if it were not installed (unless it is
    loaded already): a None entry in sys.modules is how the import system spells that."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        del sys.modules[module]


# structlog imports rich when it can (its dev and tracebacks modules, eagerly, from its
# __init__), only to draw exception tracebacks, which orch's events never carry; with pygments
# and attrs that was ~60 ms of every run's startup. The CLI imports this module before any
# other that logs, so the one structlog of the process comes without it. rich stays usable:
# the live views import it themselves.
with _hidden("rich"):
    import structlog

LogFormat = Literal["console", "json"]


def configure(verbosity: int, log_format: LogFormat | None) -> None:
    """verbosity: -1 quiet (errors), 0 warnings, 1 info, 2+ debug."""
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    if log_format is None:
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
