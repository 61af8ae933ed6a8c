"""`moeplace serve --nproc-per-node N`: torchrun's launcher on one node, with one-line failures.

Under plain `torchrun`, a rank that rejects its input prints its one-line error and exits 2, and
then torchrun itself raises ChildFailedError: a Python traceback and a failure table. This runs
the same elastic agent in-process (torch.distributed.run, `--standalone`: a free local port), so
that:
    1. the model and placement are checked once here, before N ranks start and import torch;
    2. a rank that exits 2 has already said why in one line: nothing is added;
    3. a rank that crashes or is killed gives one line naming it, and a non-zero exit; a rank
       killed by a signal is named before the ranks that lost contact with it;
    4. Ctrl-C or SIGTERM stops the ranks with one line (exit 128 + the signal: 130, 143); a
       SIGKILLed launcher takes them with it;
    5. ranks that do not stop on SIGTERM (a stopped or hung process) are SIGKILLed after
       SHUTDOWN_GRACE_S seconds, not torch's 30 (`_short_grace`).
Several nodes: run `torchrun ... -m moeplace serve` on each (its own failure report applies).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from typing import Any

import click

from moeplace.errors import AlreadyReported, MoeplaceError

SHUTDOWN_GRACE_S = 3  # SIGTERM -> SIGKILL; the ranks hold nothing that needs a clean exit
# ... unless rank 0 records live routing (--port --routing-out): its last write of up to
# --routing-max-tokens tokens takes seconds (docs/runtime.md, "Recording live routing")
ROUTING_GRACE_S = 30


def command_line(ctx: click.Context, drop: str) -> list[str]:
    """The options of the running click command as argv, minus `drop`; defaults are not repeated.
    Values go as `--option=value`, one per value of a repeated option (--stop): a value that
    starts with "-" then stays a value for torchrun's parser and for click."""
    argv: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name == drop or param.name is None:
            continue
        if ctx.get_parameter_source(param.name) == click.core.ParameterSource.DEFAULT:
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if value:
                argv.append(param.opts[0])
        elif value is not None:
            argv += [f"{param.opts[0]}={v}" for v in (value if param.multiple else (value,))]
    return argv


def precheck(model_dir: str, placement_path: str | None, mode: str, device: str, nproc: int) -> None:
    """Every rank's step 1 (engine.prepare), once for the world size about to start, and one
    GPU per rank."""
    import torch

    from moeplace.serve.dist import wants_cuda
    from moeplace.serve.engine import prepare

    prepare(model_dir, placement_path, mode, world=nproc)
    if wants_cuda(device) and nproc > torch.cuda.device_count():
        raise MoeplaceError(f"--nproc-per-node {nproc}, but {torch.cuda.device_count()} CUDA device(s) are "
                            f"visible (one rank per GPU; --device cpu runs ranks on the CPU)")


def launch(nproc: int, serve_argv: list[str], grace_s: int = SHUTDOWN_GRACE_S) -> None:
    """Run `moeplace serve SERVE_ARGV` on `nproc` local ranks; raises when one fails. grace_s:
    the ranks' SIGTERM -> SIGKILL grace when the run stops (_short_grace)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from moeplace.serve.dist import LAUNCHER_ENV

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning banner
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the ranks die with this process (dist.tie_to_launcher)
    _quiet_torch_launcher()
    _short_grace(grace_s)
    # torch's default log dir is a fresh /tmp/torchelastic_* per run that nothing removes; the ranks
    # write no logs there (no --redirects), so a temporary one that goes with the run is enough
    logs = tempfile.TemporaryDirectory(prefix="moeplace-serve-", ignore_cleanup_errors=True)
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "--log-dir", logs.name, "--module",
                       "moeplace", "serve", *serve_argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, code = first_failure(e.failures)
        if code == MoeplaceError.exit_code:
            raise AlreadyReported(code) from None  # the rank printed its one-line reason
        if code < 0:
            raise MoeplaceError(f"rank {rank} of {nproc} was killed by {_signal_name(-code)}") from None
        raise MoeplaceError(f"rank {rank} of {nproc} failed with exit code {code} (its output is above)") from None
    except SignalException as e:  # SIGINT/SIGTERM to the launcher: the agent has stopped the ranks
        click.echo(f"moeplace: interrupted ({_signal_name(int(e.sigval))}); ranks stopped", err=True)
        # (a KeyboardInterrupt here would be click's "Aborted!")
        raise AlreadyReported(128 + int(e.sigval)) from None
    except Exception as e:  # rendezvous or agent errors: torch's message, on one line
        raise MoeplaceError(f"cannot start {nproc} ranks ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from None
    finally:
        logs.cleanup()


def _short_grace(grace_s: int = SHUTDOWN_GRACE_S) -> None:
    """SIGTERM -> SIGKILL grace of `grace_s` seconds for the ranks, in this launcher process.

    When one rank fails, the agent's process context SIGTERMs the others and waits up to 30 s
    before SIGKILL. A rank that cannot take SIGTERM (stopped, or stuck in the kernel) kept the
    command 30 s past its error line. That wait is `PContext.close(timeout=30)` called with its
    default from the agent's poll, which neither torchrun's --shutdown-timeout nor
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT reach (they set the agent's own shutdown only), so the
    default is capped here; the ranks hold nothing that needs longer to exit cleanly."""
    import inspect

    try:
        from torch.distributed.elastic.multiprocessing.api import PContext
    except ImportError:  # a torch that moved it: keep its own grace rather than fail the launch
        return
    close = PContext.close
    if getattr(close, "moeplace_grace", False):
        return
    if list(inspect.signature(close).parameters)[:3] != ["self", "death_sig", "timeout"]:
        return  # a private method whose signature changed: patching it blind could break shutdown

    def close_soon(self: Any, death_sig: Any = None, timeout: int = grace_s) -> None:
        close(self, death_sig, min(timeout, grace_s))

    close_soon.moeplace_grace = True  # type: ignore[attr-defined]
    PContext.close = close_soon  # type: ignore[method-assign]
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(grace_s))  # the agent's own shutdown


def first_failure(failures: dict[int, Any]) -> tuple[int, int]:
    """(rank, exit code) of the failure to name.

    torch's get_first_failure takes the earliest timestamp (whole seconds), ties to the lowest
    rank: a rank 1 SIGKILLed mid-batch and rank 0 exiting 2 for lost contact in the same second
    named rank 0, and rank 1's death went unsaid. The failures also hold the ranks the agent
    itself stopped afterwards (SIGTERM, or SIGKILL after the grace). So: among the failures of
    the first second or so (the agent's first poll), a rank killed by a signal other than
    SIGTERM, then one that exited with a code, then one that got SIGTERM; ties to the lowest rank."""
    first = min(f.timestamp for f in failures.values())

    def order(rank: int) -> tuple[int, int]:
        code = failures[rank].exitcode
        return (0 if code < 0 and -code != signal.SIGTERM else 1 if code >= 0 else 2), rank

    rank = min((r for r, f in failures.items() if f.timestamp <= first + 1), key=order)
    return rank, failures[rank].exitcode


def _quiet_torch_launcher() -> None:
    """The agent logs each failure itself (and the OMP banner); the ranks' lines and ours suffice."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
