"""`moeplace serve --nproc-per-node N`: torchrun's launcher on one node, with one-line failures.

Under plain `torchrun`, a rank that rejects its input prints its one-line error and exits 2, and
then torchrun itself raises ChildFailedError: a Python traceback and a failure table. This runs
the same elastic agent in-process (torch.distributed.run, `--standalone`: a free local port), so
that:
    1. the model and placement are checked once here, before N ranks start and import torch;
    2. a rank that exits 2 has already said why in one line: nothing is added;
    3. a rank that crashes or is killed gives one line naming it, and a non-zero exit;
    4. Ctrl-C or SIGTERM stops the ranks with one line; a SIGKILLed launcher takes them with it.
Several nodes: run `torchrun ... -m moeplace serve` on each (its own failure report applies).
"""

from __future__ import annotations

import logging
import os
import signal

import click

from moeplace.errors import AlreadyReported, MoeplaceError


def command_line(ctx: click.Context, drop: str) -> list[str]:
    """The options of the running click command as argv, minus `drop`; defaults are not repeated."""
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
            argv += [param.opts[0], str(value)]
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


def launch(nproc: int, serve_argv: list[str]) -> None:
    """Run `moeplace serve SERVE_ARGV` on `nproc` local ranks; raises when one fails."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from moeplace.serve.dist import LAUNCHER_ENV

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its warning banner
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # the ranks die with this process (dist.tie_to_launcher)
    _quiet_torch_launcher()
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "moeplace", "serve",
                       *serve_argv])
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code == MoeplaceError.exit_code:
            raise AlreadyReported(code) from None  # the rank printed its one-line reason
        if code < 0:
            raise MoeplaceError(f"rank {rank} of {nproc} was killed by {_signal_name(-code)}") from None
        raise MoeplaceError(f"rank {rank} of {nproc} failed with exit code {code} (its output is above)") from None
    except SignalException as e:  # SIGINT/SIGTERM to the launcher: the agent has stopped the ranks
        click.echo(f"moeplace: interrupted ({_signal_name(int(e.sigval))}); ranks stopped", err=True)
        raise AlreadyReported(130) from None  # (a KeyboardInterrupt here would be click's "Aborted!")
    except Exception as e:  # rendezvous or agent errors: torch's message, on one line
        raise MoeplaceError(f"cannot start {nproc} ranks ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]})") from None


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
