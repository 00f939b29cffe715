"""The `orch` command: parse arguments, call one function, map errors to exit codes.

This layer stays thin on purpose. Every command's work lives in a module that can be tested
without click; here we only translate `OrchError`s into a message on stderr and the exit code
DESIGN.md promises (0 ok, 1 error, 2 changes pending, 3 unreachable, 4 lock held).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from orchestrator import __version__, log
from orchestrator.config import load_cluster
from orchestrator.errors import ConfigError, ExitCode, OrchError

F = TypeVar("F", bound=Callable[..., Any])

CLUSTER_ARG = click.argument(
    "cluster_file", metavar="CLUSTER", type=click.Path(dir_okay=False, path_type=Path))


def reports_errors(fn: F) -> F:
    """Print an OrchError as its message (never a traceback) and exit with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OrchError as exc:
            if isinstance(exc, ConfigError):
                for diagnostic in exc.diagnostics:
                    click.echo(str(diagnostic), err=True)
                n = sum(d.severity == "error" for d in exc.diagnostics)
                click.echo(f"{n} error{'s' if n != 1 else ''}; nothing was changed on any host.",
                           err=True)
            else:
                click.echo(f"error: {exc}", err=True)
            sys.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="orch")
@click.option("-v", "--verbose", count=True, help="More log events on stderr (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors on stderr.")
@click.option("--log-format", type=click.Choice(["console", "json"]), default=None,
              help="Log event format on stderr (default: console on a TTY, else json).")
def main(verbose: int, quiet: bool, log_format: str | None) -> None:
    """Converge a cluster of Apple-silicon Macs to a running MLX inference service.

    \b
    Typical use:
      orch validate cluster.yml      check the files, offline
      orch place cluster.yml         will the model fit? which Macs, how many layers each
      orch plan cluster.yml          what apply would change (read-only)
      orch apply cluster.yml         make it so

    Exit codes: 0 ok / no changes, 1 error, 2 changes pending, 3 hosts unreachable,
    4 cluster lock held.
    """
    log.configure(-1 if quiet else verbose, log_format)  # type: ignore[arg-type]


@main.command()
@CLUSTER_ARG
@reports_errors
def validate(cluster_file: Path) -> None:
    """Check CLUSTER, its inventory and playbooks, offline, reporting every problem at once."""
    cluster = load_cluster(cluster_file)
    for warning in cluster.warnings:
        click.echo(str(warning), err=True)
    nodes = ", ".join(cluster.hosts)
    click.echo(f"{cluster.file.name}: ok ({len(cluster.hosts)} hosts: {nodes})")


@main.command()
@click.option("--file", "which", type=click.Choice(["cluster", "inventory", "playbook", "all"]),
              default="all", show_default=True, help="Which file's schema to print.")
def schema(which: str) -> None:
    """Print the JSON Schema of the cluster, inventory and playbook files (for editors)."""
    from orchestrator.config import json_schemas

    schemas = json_schemas()
    document = schemas if which == "all" else schemas[which]
    click.echo(json.dumps(document, indent=2, sort_keys=True))


def exit_with(code: ExitCode) -> None:
    sys.exit(int(code))
