"""`moeplace` command line: one sub-command per pipeline stage.

Each stage owns its command in its own module; this group imports a module only when its
command runs, so `moeplace --help` stays fast (no torch import) and a stage's heavy
dependencies never slow the others. Any MoeplaceError or bad option becomes one line on stderr
and its exit code (2 for bad input, 1 for a regression); anything else is a bug, reported in
one line with exit code 3 (MOEPLACE_TRACEBACK=1 re-raises it).
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import signal
import sys
import warnings
from typing import Any

import click

from moeplace import __version__
from moeplace.errors import AlreadyReported, MoeplaceError, MoeplaceWarning

# name -> (module, attribute, one-line help shown by `moeplace --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "trace": ("moeplace.trace.cli", "trace", "Record per-token routing of a Hugging Face MoE model into a trace."),
    "import": ("moeplace.trace.importers_cli", "import_", "Convert traces of other tools (CSV, ExFlow, SGLang, per-layer load JSON) to moeplace's format; merge traces."),
    "analyze": ("moeplace.analyze.cli", "analyze", "Report load skew, inter-layer affinity and its stability, with figures."),
    "solve": ("moeplace.solve.cli", "solve", "Place experts on GPUs so consecutive experts of a token share a GPU."),
    "eval": ("moeplace.eval.cli", "eval_", "Replay a trace against a placement: traffic, imbalance, cost vs baselines."),
    "check": ("moeplace.eval.check", "check", "CI gate: fail when placements regress past thresholds in a YAML file."),
    "serve": ("moeplace.serve.cli", "serve", "Expert-parallel inference under torchrun with the placement applied."),
    "export": ("moeplace.export.cli", "export", "Write a placement in the format SGLang, vLLM or DeepSeek EPLB reads."),
    "permute-checkpoint": ("moeplace.export.cli", "permute_checkpoint", "Renumber a checkpoint's experts so a contiguous layout realises a placement."),
}


# click >= 8.2 raises this usage error for a group given no command (older ones print the help)
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class SuggestingGroup(click.Group):
    """A command group whose "No such command" names the nearest command (`moeplace slove`)."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        name = args[0] if args else ""
        if args and self.get_command(ctx, name) is None and not name.startswith("-"):
            near = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.6)
            if near:
                raise click.UsageError(f"No such command {name!r}; did you mean {near[0]!r}?", ctx)
        return super().resolve_command(ctx, args)


class LazyGroup(SuggestingGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            reason = str(e)  # `e` is unbound once the except block ends: the closure keeps the text

            @click.command(name, help=f"{COMMANDS[name][2]} (unavailable: {reason})")
            def unavailable() -> None:
                raise MoeplaceError(f"'{name}' is unavailable in this install: {reason}")

            return unavailable

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_text) for name, (_, _, help_text) in COMMANDS.items()]
        with formatter.section("Commands (the pipeline: trace -> analyze -> solve -> eval -> serve/export)"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="moeplace")
def main() -> None:
    """moeplace: place Mixture-of-Experts experts on GPUs using inter-layer expert affinity.

    \b
    Typical use:
      moeplace solve traces/flame-moe-290m-decoder.npz --gpus 8 -o placement.json
      moeplace eval placement.json traces/flame-moe-290m-decoder.npz
    Run `moeplace COMMAND --help` for each command's inputs, outputs and defaults.
    """


def _warning_line(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """MoeplaceWarning as `moeplace: warning: ...` (one line, like the errors); others as Python shows them."""
    if issubclass(category, MoeplaceWarning):
        click.echo(f"moeplace: warning: {' '.join(str(message).split())}", err=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def run(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning moeplace errors into one line and an exit code."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", MoeplaceWarning)  # each one, not once per code line
            warnings.showwarning = _warning_line
            main.main(args=argv, prog_name="moeplace", standalone_mode=False)
    except MoeplaceError as e:  # one line even when it quotes a library's multi-line message
        if isinstance(e, AlreadyReported):
            return e.exit_code
        click.echo(f"moeplace: error: {' '.join(str(e).split())}", err=True)
        return e.exit_code
    except click.exceptions.Abort as e:  # click's form of Ctrl-C (after a newline closing the terminal's ^C)
        cause = "interrupted (SIGINT)" if isinstance(e.__cause__, KeyboardInterrupt) else "aborted"
        click.echo(f"moeplace: {cause}", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("moeplace: interrupted", err=True)
        return 130
    except _NO_ARGS_IS_HELP as e:  # a bare `moeplace` or `moeplace import`: the help, as --help gives it
        click.echo(e.ctx.get_help())  # click raises it with the group's context
        return 0
    except click.UsageError as e:  # a bad option or argument: one line, not click's usage block
        where = e.ctx.command_path if e.ctx is not None else "moeplace"
        message = " ".join(e.format_message().split())
        click.echo(f"moeplace: error: {message} (see '{where} --help')", err=True)
        return e.exit_code
    except click.ClickException as e:
        click.echo(f"moeplace: error: {' '.join(e.format_message().split())}", err=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except MemoryError:
        files = _file_arguments(sys.argv[1:] if argv is None else argv)
        what = f" reading or processing {files}" if files else ""
        click.echo(f"moeplace: error: out of memory{what} (is the input far larger than intended?)", err=True)
        return 2
    except RecursionError:  # a safety net: readers turn deep nesting into their own one-line error
        if os.environ.get("MOEPLACE_TRACEBACK"):
            raise
        files = _file_arguments(sys.argv[1:] if argv is None else argv)
        what = f" in {files}" if files else ""
        click.echo(f"moeplace: error: input nested too deeply{what}", err=True)
        return 2
    except OSError as e:
        if e.errno not in _STORAGE_ERRNOS or os.environ.get("MOEPLACE_TRACEBACK"):
            return _internal_error(e)
        # a full disk or a read-only file system (also under stdout: `--json > /dev/full`): the
        # machine's state, not a bug; files moeplace writes are renamed into place only when whole
        where = f" writing {e.filename}" if e.filename else " writing the output"
        click.echo(f"moeplace: error: {e.strerror or os.strerror(e.errno or 0)}{where}", err=True)
        return 2
    except Exception as e:  # a bug, not bad input: still one line; the traceback on request
        return _internal_error(e)
    return 0


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _internal_error(e: Exception) -> int:
    """A bug, not bad input: one line, exit 3; with MOEPLACE_TRACEBACK set, the traceback."""
    if os.environ.get("MOEPLACE_TRACEBACK"):
        raise e
    click.echo(f"moeplace: internal error: {type(e).__name__}: {' '.join(str(e).split())} "
               "(a bug: please report it; MOEPLACE_TRACEBACK=1 shows the traceback)", err=True)
    return 3


def _file_arguments(argv: list[str]) -> str:
    """The arguments (or `--option=value` values) that name existing files, for an error that
    cannot tell which input was at fault ("" when none): the first three, then how many more."""
    files: list[str] = []
    for i, arg in enumerate(argv):
        option, _, v = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if _is_output(option) or (i and _is_output(argv[i - 1])):  # a file written, not read
            continue
        try:
            if v and v not in files and os.path.isfile(v):
                files.append(v)
        except (OSError, ValueError):  # a name with a NUL byte, too long a name
            continue
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return ", ".join(files[:3]) + more


def _is_output(option: str) -> bool:
    """Whether `option` names an output file (-o/--output, --out, --stats-out, --routing-out)."""
    return option in ("-o", "--output") or (option.startswith("--") and option.endswith("-out"))


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM (`kill`, `timeout`, a cancelled CI job): unwind like an error, so that temporary
    files and trace spools are removed on the way out (Python's default for SIGTERM is to die
    on the spot, leaving them behind)."""
    click.echo(f"moeplace: terminated ({signal.Signals(signum).name})", err=True)
    raise SystemExit(128 + signum)


def entry() -> Any:
    # not in a rank under torchrun: its agent stops ranks with SIGTERM and handles that itself
    if "LOCAL_RANK" not in os.environ:
        signal.signal(signal.SIGTERM, _terminated)
    sys.exit(run())
