"""The `orch` command: parse arguments, call one function, map errors to exit codes.

This layer stays thin on purpose. Every command's work lives in a module that can be tested
without click. A command returns the `ExitCode` its outcome calls for (or raises); `OrchGroup`
is the one place that turns a return value, an `OrchError` or a click usage error into a
message on stderr and the exit code README promises (0 ok, 1 error, 2 changes pending,
3 unreachable, 4 lock held). Nothing else in this module calls `sys.exit`.

Each command imports what it runs when it runs: `orch --help` needs only click, and a run
pays only for its own stack (`validate` no asyncssh, `apply` of a cluster without a model no
Hub client or placement solver). Startup is a serial cost of every run, on the controller's
one core, before the first host is dialled.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, TypeVar, overload

import click

from orchestrator import __version__
from orchestrator.errors import (
    ConfigError,
    ExitCode,
    HostUnreachable,
    LockHeld,
    OrchError,
    PlanError,
)

if TYPE_CHECKING:
    from orchestrator.config import Cluster
    from orchestrator.plan import Plan
    from orchestrator.run.apply import ApplyReport
    from orchestrator.run.engine import RunOptions

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

CLUSTER_ARG = click.argument(
    "cluster_file", metavar="CLUSTER", type=click.Path(dir_okay=False, path_type=Path))

INTERRUPTED: Final = 130  # the shell's code for SIGINT, so a script can tell ^C from failure

#: Every exception the CLI turns into an exit code, most specific first; the first match wins.
#: Click's usage errors are 1 here, not click's 2: 2 is "changes pending", and a CI drift
#: check must never read a typo as drift. `OrchError.exit_code` must agree (a test checks).
EXIT_CODES: Final[tuple[tuple[type[BaseException], int], ...]] = (
    (LockHeld, ExitCode.LOCK_HELD),
    (HostUnreachable, ExitCode.UNREACHABLE),
    (OrchError, ExitCode.ERROR),
    (click.ClickException, ExitCode.ERROR),
    (click.Abort, ExitCode.ERROR),
    (KeyboardInterrupt, INTERRUPTED),
)


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception that ended a command (see `EXIT_CODES`)."""
    exc = _unwrap_interrupt(exc)
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return int(code)
    raise TypeError(f"no exit code for {type(exc).__name__}") from exc


def _unwrap_interrupt(exc: BaseException) -> BaseException:
    """Click turns ^C into `Abort` (from the KeyboardInterrupt); ^C is not a declined prompt."""
    if isinstance(exc, click.Abort) and isinstance(exc.__cause__, KeyboardInterrupt):
        return exc.__cause__
    return exc


def error_lines(exc: BaseException) -> list[str]:
    """What the user reads on stderr for an exception that ended a command (no traceback)."""
    exc = _unwrap_interrupt(exc)
    if isinstance(exc, ConfigError):
        n = sum(d.severity == "error" for d in exc.diagnostics)
        return [*map(str, exc.diagnostics),
                f"{n} error{'s' if n != 1 else ''}; nothing was changed on any host."]
    if isinstance(exc, click.UsageError):
        return [_usage_line(exc)]
    if isinstance(exc, click.ClickException):
        return [f"error: {_one_line(exc.format_message())}"]
    if isinstance(exc, KeyboardInterrupt):
        return ["interrupted"]
    if isinstance(exc, click.Abort):
        return ["aborted"]
    return [f"error: {exc}"]


def _usage_line(exc: click.UsageError) -> str:
    """One line naming the command, what was wrong and where to read what was expected."""
    ctx = exc.ctx
    where = ctx.command_path if ctx is not None else "orch"
    if isinstance(exc, click.exceptions.NoArgsIsHelpError) or (
            ctx is not None and isinstance(ctx.command, click.Group)
            and exc.message == "Missing command."):
        assert ctx is not None and isinstance(ctx.command, click.Group)
        message = f"missing command; expected one of: {', '.join(ctx.command.list_commands(ctx))}"
    else:
        message = _one_line(exc.format_message())
    return f"error: {where}: {message} (see '{where} --help')"


def _one_line(text: str) -> str:
    return " ".join(text.split())


class OrchGroup(click.Group):
    """The root group: the one place where outcomes and errors become the process exit code.

    Click's standalone mode would print usage errors over several lines and exit 2; instead
    the command runs with standalone mode off and everything that ends it, returned or
    raised, parsing or running, goes through `exit_code_for` and `error_lines`.
    """

    @overload
    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: Literal[True] = True,
             **extra: Any) -> NoReturn: ...

    @overload
    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = ...,
             **extra: Any) -> Any: ...

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             windows_expand_args: bool = True, **extra: Any) -> Any:
        """Run the command line and exit with the code its outcome maps to."""
        run = super().main
        _no_final_collection()
        if not standalone_mode:  # an embedding caller handles exceptions itself
            return run(args, prog_name, complete_var, standalone_mode=False,
                       windows_expand_args=windows_expand_args, **extra)
        try:
            outcome = run(args, prog_name, complete_var, standalone_mode=False,
                          windows_expand_args=windows_expand_args, **extra)
        except tuple(kind for kind, _ in EXIT_CODES) as exc:
            for line in error_lines(exc):
                click.echo(line, err=True)
            sys.exit(exit_code_for(exc))
        sys.exit(int(outcome) if isinstance(outcome, ExitCode) else int(ExitCode.OK))


def _no_final_collection() -> None:
    """At interpreter exit, skip the cyclic GC's last pass over every object. A run's ~550
    modules (asyncssh, pydantic, the plan) made that pass 0.1 s of CPU after the report was
    printed, for memory the process is about to give back; atexit handlers, module teardown
    and the flush of stdout and stderr still run. Registered once, however often `main` is."""
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


@click.group("orch", cls=OrchGroup, context_settings={"help_option_names": ["-h", "--help"]})
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

    Exit codes: 0 ok / no changes, 1 error (bad input or usage, a failed action),
    2 changes pending, 3 hosts unreachable, 4 cluster lock held.
    """
    from orchestrator import log

    log.configure(-1 if quiet else verbose, log_format)  # type: ignore[arg-type]


@main.command()
@CLUSTER_ARG
def validate(cluster_file: Path) -> None:
    """Check CLUSTER, its inventory and playbooks, offline, reporting every problem at once."""
    cluster = load(cluster_file)
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


def ssh_options(fn: F) -> F:
    """The options every command that contacts hosts shares."""
    options = [
        click.option("--limit", "limit", multiple=True, metavar="HOST",
                     help="Only these hosts (repeatable, or comma-separated)."),
        click.option("--accept-new-host-keys", is_flag=True,
                     help="Record the key of a host not yet in known_hosts (like OpenSSH's "
                          "accept-new). A changed key is still refused."),
        click.option("--known-hosts", type=click.Path(dir_okay=False, path_type=Path),
                     help="known_hosts file (default: the inventory's ssh.known_hosts, else "
                          "~/.ssh/known_hosts or ~/.ssh/config's)."),
        click.option("--concurrency", type=click.IntRange(min=1), default=10, show_default=True,
                     help="Hosts worked on at once."),
        click.option("--connect-timeout", type=click.FloatRange(min=0.1), default=None,
                     help="Seconds to wait for each SSH connection (default: the inventory's "
                          "ssh.connect_timeout, else 10)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def run_options(limit: tuple[str, ...], accept_new_host_keys: bool, known_hosts: Path | None,
                concurrency: int, connect_timeout: float | None) -> RunOptions:
    from orchestrator.executor import SSHOptions
    from orchestrator.run.engine import RunOptions

    hosts = tuple(h for item in limit for h in item.split(",") if h)
    return RunOptions(
        ssh=SSHOptions(connect_timeout=connect_timeout, known_hosts=known_hosts,
                       accept_new_host_keys=accept_new_host_keys, concurrency=concurrency),
        limit=hosts or None,
    )


def load_cluster(cluster_file: Path) -> Cluster:
    """The cluster file, validated (pydantic, yaml and jinja2 load with it, not at startup)."""
    from orchestrator.config import load_cluster as load_file

    return load_file(cluster_file)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, imported by the commands that reach hosts (asyncio is not small)."""
    import asyncio

    return asyncio.run(main)


def load(cluster_file: Path) -> Cluster:
    cluster = load_cluster(cluster_file)
    for warning in cluster.warnings:
        click.echo(str(warning), err=True)
    return cluster


def _in_a_directory(_ctx: click.Context, param: click.Parameter, value: Path | None
                    ) -> Path | None:
    """Refuse an output path whose directory is missing before any host is contacted."""
    if value is not None and not value.absolute().parent.is_dir():
        raise click.BadParameter(f"directory {str(value.parent)!r} does not exist; expected a "
                                 "file in an existing directory", param=param)
    return value


def plan_exit_code(result: Plan, detailed: bool) -> ExitCode:
    """A plan's outcome: unreachable hosts first, then drift only when it was asked about."""
    if result.unreachable:
        return ExitCode.UNREACHABLE
    if detailed and result.has_changes:
        return ExitCode.CHANGES_PENDING
    return ExitCode.OK


def report_exit_code(report: ApplyReport, *, healthy: bool = True) -> ExitCode:
    """An apply's outcome: a failed host (or an unhealthy ring) outranks an unreachable one,
    which still leaves the others applied."""
    from orchestrator.run.apply import HostStatus

    if report.by_status(HostStatus.FAILED) or not healthy:
        return ExitCode.ERROR
    if report.by_status(HostStatus.UNREACHABLE):
        return ExitCode.UNREACHABLE
    return ExitCode.OK


@main.command("plan")
@CLUSTER_ARG
@click.option("--detailed-exitcode", is_flag=True,
              help="Exit 2 when there are changes (for drift checks): 0 none, 1 error, "
                   "3 unreachable.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), callback=_in_a_directory,
              help="Save the plan as JSON, for `orch apply FILE`.")
@click.option("--diff", "show_diff", is_flag=True, help="Show file content changes.")
@ssh_options
def plan_command(cluster_file: Path, detailed_exitcode: bool, as_json: bool, out: Path | None,
                 show_diff: bool, **ssh: Any) -> ExitCode:
    """Show what `orch apply` would change, touching nothing (read-only on every host)."""
    from orchestrator import render
    from orchestrator.run import engine

    cluster = load(cluster_file)
    result, _ = run_async(engine.plan(cluster, run_options(**ssh), with_diff=show_diff))
    if out is not None:
        try:
            out.write_text(render.plan_json(result) + "\n")
        except OSError as exc:
            raise PlanError(f"{out}: cannot save the plan: {exc.strerror or exc}; expected a "
                            "writable file") from None
    click.echo(render.plan_json(result) if as_json else render.plan_text(result,
                                                                        show_diff=show_diff))
    return plan_exit_code(result, detailed_exitcode)


@main.command("apply")
@click.argument("target", metavar="CLUSTER|PLAN",
                type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--check", is_flag=True, help="Only show what would change (like `orch plan`).")
@click.option("--detailed-exitcode", is_flag=True, help="With --check: exit 2 when changes.")
@click.option("--diff", "show_diff", is_flag=True, help="Show file content changes.")
@click.option("--serial", type=click.IntRange(min=1), help="Apply N hosts at a time, in order.")
@click.option("--fail-fast", is_flag=True, help="Stop starting hosts after the first failure.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan and outcome as JSON.")
@ssh_options
def apply_command(target: Path, check: bool, detailed_exitcode: bool, show_diff: bool,
                  serial: int | None, fail_fast: bool, yes: bool, as_json: bool,
                  **ssh: Any) -> ExitCode:
    """Converge every host to CLUSTER (or apply a plan saved with `orch plan --out`).

    A host that fails does not stop the others (unless --fail-fast). Exit 0 when every host
    converged, 1 when one failed, 3 when one was unreachable, 4 when the cluster is locked.
    """
    from orchestrator import render
    from orchestrator.plan import Plan
    from orchestrator.run import engine

    saved: Plan | None = None
    cluster_file = target
    if target.suffix == ".json":
        try:
            saved = Plan.from_json(json.loads(target.read_text()))
        except OSError as exc:
            raise PlanError(f"{target}: cannot read the plan: {exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{target}: not a plan saved by `orch plan --out`: {exc}") from None
        cluster_file = Path(saved.cluster_file)
    cluster = load(cluster_file)
    options = run_options(**ssh)
    if check:
        result, _ = run_async(engine.plan(cluster, options, with_diff=show_diff))
        click.echo(render.plan_json(result) if as_json
                   else render.plan_text(result, show_diff=show_diff))
        return plan_exit_code(result, detailed_exitcode)
    if not yes and saved is None:
        if not sys.stdin.isatty():
            raise PlanError("refusing to apply without confirmation: pass --yes, or review "
                            "`orch plan --out plan.json` and run `orch apply plan.json`")
        preview, _ = run_async(engine.plan(cluster, options, with_diff=show_diff))
        click.echo(render.plan_text(preview, show_diff=show_diff))
        if not preview.has_changes:
            return plan_exit_code(preview, False)
        click.confirm("Apply these changes?", abort=True)
        saved = preview
    result, report = run_async(engine.apply(cluster, options, saved=saved, serial=serial,
                                              fail_fast=fail_fast,
                                              command=" ".join(sys.argv[1:])[:200]))
    if as_json:
        click.echo(json.dumps({"plan": result.to_json(), "outcome": render.report_json(report)},
                              indent=2, sort_keys=True))
    else:
        if saved is None:
            click.echo(render.plan_text(result, show_diff=show_diff))
        click.echo(render.report_text(report))
    return report_exit_code(report)


@main.command("facts")
@CLUSTER_ARG
@click.argument("host", required=False)
@ssh_options
def facts_command(cluster_file: Path, host: str | None, **ssh: Any) -> ExitCode:
    """Print the facts the planner sees for every host (or HOST), as JSON."""
    from orchestrator.run import engine
    from orchestrator.run.engine import RunOptions

    cluster = load(cluster_file)
    options = run_options(**ssh)
    if host is not None:
        options = RunOptions(ssh=options.ssh, limit=(host,))
    facts = run_async(engine.facts(cluster, options))
    click.echo(json.dumps(facts, indent=2, sort_keys=True, default=str))
    unreachable = any("unreachable" in v for v in facts.values())
    return ExitCode.UNREACHABLE if unreachable else ExitCode.OK


@main.command("unlock")
@CLUSTER_ARG
@click.option("--force", "nonce", required=True, metavar="NONCE",
              help="The nonce of the lock to remove, as printed by the run that holds it.")
@ssh_options
def unlock_command(cluster_file: Path, nonce: str, **ssh: Any) -> None:
    """Remove a cluster lock left behind by a run that died."""
    from orchestrator.run import engine

    cluster = load(cluster_file)
    removed = run_async(engine.unlock(cluster, run_options(**ssh), nonce))
    if removed:
        click.echo(f"removed lock {nonce} on: {', '.join(removed)}")
    else:
        click.echo(f"no lock with nonce {nonce} on any reachable host")


@main.command()
@CLUSTER_ARG
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--params", type=float, default=None, metavar="N",
              help="Size the model from a parameter count (e.g. 671e9) instead of its files: "
                   "the guide's params × bits/8 × (1+O) estimate. Needs --bits and --layers.")
@click.option("--bits", type=float, default=None, help="Bits per parameter, with --params.")
@click.option("--layers", type=int, default=None, help="Number of layers, with --params.")
def place(cluster_file: Path, as_json: bool, params: float | None, bits: float | None,
          layers: int | None) -> ExitCode:
    """Offline: which Macs, how many layers each, bytes and files per node, and the verdict.

    Reads only the model's config, index and safetensors headers (local `model.path`, or the
    Hub with HF_TOKEN). Exit 0 when the model fits, 1 when it does not (with the numbers).
    """
    from orchestrator import placement

    cluster = load_cluster(cluster_file)
    if params is not None or bits is not None or layers is not None:
        if params is None or bits is None or layers is None:
            raise click.UsageError("--params, --bits and --layers go together")
        meta = placement.estimated_meta(params, bits, layers,
                                        source=f"{params:.3g} params × {bits:g} bits (estimate)")
    elif cluster.model is None:
        raise click.UsageError(f"{cluster_file} declares no `model:` to place "
                               "(or give --params, --bits and --layers)")
    else:
        meta = placement.load_model_meta(cluster.model)
    result = placement.plan_placement(cluster, meta)
    if as_json:
        click.echo(json.dumps(placement.to_json(result), indent=2))
    else:
        from orchestrator.placebars import render_bars

        click.echo(placement.render_table(result), nl=False)
        click.echo(render_bars(result), nl=False)
    return ExitCode.OK if result.fits else ExitCode.ERROR


SANDBOX_DIR = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where the sandbox keeps its hosts, hub, model and state "
         "(default: $XDG_STATE_HOME/orch/sandbox).")


@main.group()
def sandbox() -> None:
    """A real MLX cluster of simulated Macs on this machine (no root needed)."""


@sandbox.command("up")
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True,
              help="How many simulated Macs (each runs one rank).")
@SANDBOX_DIR
def sandbox_up(nodes: int, directory: Path | None) -> ExitCode:
    """Start N simulated Macs and a local hub, apply the sandbox cluster, ask it a question."""
    from orchestrator.simulator import cluster as sandbox_cluster
    from orchestrator.simulator import session

    started = sandbox_cluster.up(directory or sandbox_cluster.default_dir(), nodes)
    click.echo(f"sandbox: {len(started.nodes)} simulated Macs, hub {started.hub_endpoint}, "
               f"cluster file {started.cluster_file}")
    return run_async(session.apply_and_ask(started, echo=click.echo))


@sandbox.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@SANDBOX_DIR
def sandbox_status(as_json: bool, directory: Path | None) -> None:
    """Is the sandbox up: its cluster file, API URL and simulated Macs."""
    from orchestrator.simulator import cluster as sandbox_cluster

    report = sandbox_cluster.status(directory or sandbox_cluster.default_dir())
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    if not report["up"]:
        click.echo("sandbox: down")
        return
    click.echo(f"sandbox: up, cluster file {report['cluster_file']}, API {report['api_url']}")
    for node in report["nodes"]:
        state = "up" if node["alive"] else "DOWN"
        click.echo(f"  {node['name']}: {state} ssh {node['address']}:{node['port']}")


@sandbox.command("down")
@SANDBOX_DIR
def sandbox_down(directory: Path | None) -> None:
    """Stop every process the sandbox started and remove its state."""
    from orchestrator.simulator import cluster as sandbox_cluster

    killed = sandbox_cluster.down(directory or sandbox_cluster.default_dir())
    click.echo(f"sandbox: down ({len(killed)} processes stopped)")


def _end_watch(_signum: int, _frame: object) -> NoReturn:
    """^C ends a watch at once, exit 0. A watch only reads: nothing on a host needs cleaning up
    (each agent exits when its SSH channel closes). Unwinding instead would make asyncio.run
    join the thread of an in-flight probe completion, up to its timeout, after the user asked
    to stop (seen: over a minute on a busy machine)."""
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[?25h")  # the live view hides the cursor
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(ExitCode.OK)


@main.command("status")
@CLUSTER_ARG
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--no-probe", is_flag=True, help="Do not send the probe chat completion.")
@click.option("--watch", is_flag=True,
              help="Redraw every --interval seconds over connections held open; ^C ends it.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds between refreshes, with --watch.")
@click.option("--count", type=click.IntRange(min=1), default=None, hidden=True,
              help="Stop --watch after N refreshes (for tests and scripts).")
@ssh_options
def status_command(cluster_file: Path, as_json: bool, no_probe: bool, watch: bool,
                   interval: float, count: int | None, **ssh: Any) -> ExitCode:
    """Per node: reachable, mlx / mlx-lm, worker state, pid, uptime, rank, layers, RSS; and the
    ring, the API URL and the latency of a probe completion. Read-only.

    Exit 0 when the ring serves and answers, 1 when it does not, 3 when a node is unreachable.
    With --watch: a live view until ^C (exit 0), one SSH connection per node for all refreshes.
    """
    from orchestrator.status import cluster_status, status_json, status_text

    cluster = load(cluster_file)
    if cluster.model is None:
        raise PlanError(f"{cluster_file} declares no model: there is no service to report on")
    if watch:
        if as_json:
            raise click.UsageError("--watch draws a live view; --json reads once")
        from orchestrator.watch import watch as watch_status

        previous = signal.signal(signal.SIGINT, _end_watch)  # ^C is how a watch ends: exit 0
        try:
            run_async(watch_status(cluster, run_options(**ssh), interval=interval,
                                     count=count, probe=not no_probe))
        finally:
            signal.signal(signal.SIGINT, previous)
        return ExitCode.OK
    result = run_async(cluster_status(cluster, run_options(**ssh), probe=not no_probe))
    if as_json:
        click.echo(json.dumps(status_json(result), indent=2, sort_keys=True))
    else:
        click.echo(status_text(result), nl=False)
    if result.unreachable:
        return ExitCode.UNREACHABLE
    return (ExitCode.OK if result.healthy or (no_probe and result.ring == "serving")
            else ExitCode.ERROR)


def _positive_ints(_ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"{value!r}; expected positive integers separated by commas",
                                 param=param)
    return numbers


@main.command("bench")
@CLUSTER_ARG
@click.option("--prompt-words", default="8,64,256", show_default=True, metavar="N,N,...",
              callback=_positive_ints, help="Prompt lengths to measure, in words.")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measured completions per prompt length.")
@click.option("--max-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="Tokens to generate per completion.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds each completion may take.")
@click.option("--json", "as_json", is_flag=True, help="Print every sample as JSON instead.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), callback=_in_a_directory,
              help="Also save the JSON to this file.")
def bench_command(cluster_file: Path, prompt_words: tuple[int, ...], repeat: int,
                  max_tokens: int, timeout: float, as_json: bool, out: Path | None) -> None:
    """Measure the serving ring through its API: time to first token and decode tokens/s
    (streamed, one request at a time), per prompt length, beside the placement's estimate.

    Talks only HTTP to rank 0's API (no SSH). Exit 1 when a completion fails.
    """
    from orchestrator.verify.bench import bench_cluster, bench_json, bench_text

    cluster = load(cluster_file)
    if cluster.model is None:
        raise PlanError(f"{cluster_file} declares no model: there is no service to measure")
    result = run_async(bench_cluster(cluster, words=prompt_words, repeat=repeat,
                                       max_tokens=max_tokens, timeout=timeout))
    document = json.dumps(bench_json(result), indent=2, sort_keys=True)
    if out is not None:
        try:
            out.write_text(document + "\n")
        except OSError as exc:
            raise PlanError(f"{out}: cannot save the results: {exc.strerror or exc}") from None
    click.echo(document if as_json else bench_text(result), nl=as_json)


def _roll(cluster_file: Path, node: str, drain: bool, as_json: bool, ssh: Any) -> ExitCode:
    from orchestrator import render
    from orchestrator.drain import roll

    report = run_async(roll(cluster_file, node, run_options(**ssh), drain=drain,
                              echo=lambda line: click.echo(line, err=as_json)))
    health = report.cutover.health
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        click.echo(render.plan_text(report.cutover_plan))
        click.echo(render.report_text(report.cutover))
        outage = report.outage_s
        click.echo("Outage: " + ("none observed" if outage == 0 else
                                 f"{outage:.1f} s (last answer of the old ring → first of the "
                                 "new)" if outage is not None else "unknown (no answer seen)"))
    return report_exit_code(report.cutover, healthy=health is not None and health.ok)


@main.command("drain")
@CLUSTER_ARG
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@ssh_options
def drain_command(cluster_file: Path, node: str, as_json: bool, **ssh: Any) -> ExitCode:
    """Roll NODE out of the running cluster with the shortest outage.

    Refuses (exit 1, nothing changed) if the other nodes cannot hold the model. Otherwise
    copies what the new placement needs from peers while the old ring serves, records
    `drained: true` in the inventory (comments kept), restarts the ring without NODE and
    reports the outage. NODE keeps its model files.
    """
    return _roll(cluster_file, node, True, as_json, ssh)


@main.command("undrain")
@CLUSTER_ARG
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@ssh_options
def undrain_command(cluster_file: Path, node: str, as_json: bool, **ssh: Any) -> ExitCode:
    """Bring NODE back into the cluster: the reverse of `orch drain`."""
    return _roll(cluster_file, node, False, as_json, ssh)
