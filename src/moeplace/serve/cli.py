"""`moeplace serve`: expert-parallel generation (greedy or sampled) under torchrun, batch or HTTP."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import click

from moeplace.errors import AlreadyReported, MoeplaceError, warn
from moeplace.io import loads_json, not_a_file
from moeplace.serve.engine import ROUTING_EVERY_S, ROUTING_KEEP, ROUTING_MAX_TOKENS
from moeplace.serve.generate import StepCallback, TokenLogprobs
from moeplace.serve.openai import (
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TEMPERATURE,
    PENALTIES,
    SAMPLING,
    BadRequest,
    Job,
    check_options,
    check_text,
    completion_logprobs,
    job_choices,
    parse_logprobs,
    parse_stop,
    prompt_sampling,
)
from moeplace.serve.sampling import Sampling, int64
from moeplace.serve.text import StopWatch
from moeplace.options import (
    NPZ_OUTPUT,
    DtypeChoice,
    FiniteFloat,
    check_distinct_outputs,
    check_outside,
    check_writable,
    plural,
    writing,
)
from moeplace.trace.cli import TOKENIZER_FILES  # one list: a directory `trace` reads a tokenizer from, serve does too

# --timeout's ceiling (11.6 days): "wait for ever" in effect, far below what datetime.timedelta
# and the collectives' millisecond timeouts overflow at (1e20 seconds would fail deep in torch)
MAX_TIMEOUT_S = 1e6

EPILOG = """\b
Examples (4 ranks: gloo on CPU; on GPUs the same command uses NCCL, one GPU per rank):
  moeplace serve --nproc-per-node 4 --model checkpoints/tiny-moe \\
      --placement placement.json --prompts prompts.txt --out out.jsonl --max-new-tokens 32
  moeplace serve --nproc-per-node 4 --model checkpoints/tiny-moe \\
      --placement placement.json --port 8000 --routing-out live.npz   # records the served routing
  # add --routing-prefill to record the prompts' routing too: most of a server's tokens, data sooner
  curl -s localhost:8000/v1/completions -d '{"prompt": "Hello", "max_tokens": 16}'
  curl -sN localhost:8000/v1/completions -d '{"prompt": "Hello", "stream": true}'   # token by token
  moeplace solve live.npz --gpus 4 --from placement.json --max-moves 2 -o new.json   # re-place for it
Several nodes: `torchrun --nnodes ... --nproc-per-node 8 -m moeplace serve ...` on each node
(the same options, without --nproc-per-node; on a failure torchrun adds its own traceback after
the ranks' one line and exits 1). Without either it runs as one rank holding every expert.
"""

# read as over HTTP (openai.parse_sampling); "logit_bias" has no option (a map is awkward on a command line)
SAMPLING_KEYS = ("temperature", *SAMPLING, "seed", *PENALTIES, "logit_bias")
# a line's keys that read as a /v1/completions body's (check_options, parse_stop, parse_logprobs)
CHOICE_KEYS = ("n", "best_of", "stop", "logprobs")
PROMPT_KEYS = {"prompt", "max_tokens", *SAMPLING_KEYS, *CHOICE_KEYS}  # what a JSONL prompt line may say


@click.command("serve", epilog=EPILOG, context_settings={"max_content_width": 100})
@click.option("--nproc-per-node", type=click.IntRange(1, 1024),
              help="Start this many ranks on this node (torchrun's launcher, a free local port), after "
                   "checking the model and placement once; a failed rank ends all with one line. "
                   "Leave it out under torchrun.")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="Checkpoint directory (save_pretrained: config.json + safetensors). Mixtral, Qwen3-MoE "
                   "and OLMoE families.")
@click.option("--placement", "placement_path", type=click.Path(dir_okay=False),
              help="Placement JSON from `moeplace solve`; its GPU count must equal the number of ranks. "
                   "Default: contiguous blocks of experts.")
@click.option("--mode", type=click.Choice(["coherent", "standard"]), default="coherent", show_default=True,
              help="coherent: ExFlow context-coherent decode (a token continues on its top-1 expert's rank, "
                   "one Alltoall per MoE layer for top-1). standard: classic dispatch + combine to a home rank.")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False, allow_dash=True),
              help="Batch input: one prompt per line (lines end at \\n only), or JSONL with {\"prompt\": "
                   "text or [token ids], \"max_tokens\": n} (and a /v1/completions body's sampling, "
                   "\"logit_bias\", \"n\", \"stop\" and \"logprobs\"). A .jsonl file is JSONL, a .txt file is text; "
                   "any other name is JSONL when its first non-blank line starts with '{'. "
                   "'-' reads standard input (e.g. a pipe).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Batch output JSONL: one {index, prompt, token_ids, text, finish_reason} per prompt "
                   "(default: stdout); with n > 1, one per choice, its \"choice\" added; \"logprobs\" where "
                   "asked for, \"seed\" where sampled. A `wrote FILE` line names each file written (on stderr "
                   "when the generations go to stdout).")
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(1, 1 << 16),
              help="Batch: new tokens per prompt (a JSONL max_tokens overrides it). HTTP: the most a "
                   "request's max_tokens may ask for (more is a 400); a request without max_tokens gets "
                   "16 or this, the smaller.")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1, 1 << 14),
              help="Sequences decoded together (batch: rounded down to a multiple of the number of ranks, "
                   "at least one per rank; HTTP: a request of more sequences, prompts x n, is refused).")
@click.option("--ignore-eos", is_flag=True, help="Batch: do not stop at the end-of-sequence token.")
@click.option("--temperature", type=FiniteFloat(0.0, MAX_TEMPERATURE),
              help="Batch: sample at this temperature (default 0: greedy); a JSONL line's \"temperature\", "
                   "\"top_p\", \"top_k\", \"min_p\", \"seed\" and penalties override these options. HTTP: per "
                   "request.")
@click.option("--top-p", type=FiniteFloat(0.0, 1.0, min_open=True),
              help="Batch: sample from the smallest set of tokens holding this much probability (needs --temperature).")
@click.option("--top-k", type=click.IntRange(-1), help="Batch: sample from the k likeliest tokens; 0 or -1: no "
                                                       "limit (needs --temperature).")
@click.option("--min-p", type=FiniteFloat(0.0, 1.0),
              help="Batch: sample from the tokens whose probability (after the temperature) is at least this "
                   "fraction of the likeliest's (needs --temperature).")
@click.option("--presence-penalty", type=FiniteFloat(*PENALTIES["presence_penalty"][:2]),
              help="Batch: subtract this from the logit of every token generated so far (default 0: off; "
                   "greedy or sampled).")
@click.option("--frequency-penalty", type=FiniteFloat(*PENALTIES["frequency_penalty"][:2]),
              help="Batch: subtract this from a token's logit once per time it was generated so far (default "
                   "0: off; greedy or sampled).")
@click.option("--repetition-penalty", type=FiniteFloat(*PENALTIES["repetition_penalty"][:2]),
              help="Batch: divide the positive logits (multiply the others) of the tokens of the prompt or "
                   "generated so far by this (default 1: off; greedy or sampled).")
@click.option("--seed", type=click.IntRange(-(1 << 63), (1 << 63) - 1),
              help="Batch: prompt i samples with seed + i (with n: sequence i of the run, prompt-major; a JSONL "
                   "\"seed\": that seed exactly, + j for choice j). Default: a random seed; each sampled output "
                   "line names its \"seed\", to replay it.")
@click.option("--choices", "-n", "n", type=click.IntRange(1, MAX_N), metavar="N",
              help="Batch: choices per prompt, the API's \"n\" (default 1; a JSONL \"n\" overrides it), one output "
                   "line each, prompt-major; choice j samples with its prompt's seed + j, and the prompts after it "
                   "count on from there (greedy: n equal choices). Not --n: torchrun's parser takes that for its "
                   "--nnodes/--nproc-per-node.")
@click.option("--stop", multiple=True, metavar="TEXT",
              help=f"Batch: end a choice's text right before the first of these strings in it (repeatable, up "
                   f"to {MAX_STOPS}; finish_reason \"stop\", token_ids up to the token completing it, and its sequence "
                   f"stops decoding at the next step; a JSONL \"stop\" replaces them). Needs a tokenizer.")
@click.option("--logprobs", type=click.IntRange(0, MAX_LOGPROBS), metavar="K",
              help="Batch: give each output line the \"logprobs\" of /v1/completions: every token's "
                   "log-probability and the K likeliest alternatives (a JSONL \"logprobs\" overrides it).")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Serve HTTP on rank 0: POST /v1/completions, POST /v1/chat/completions (both also "
                   "\"stream\": true, server-sent events), GET /v1/models, GET /health, GET /metrics. The batch "
                   "options (--out, --stats-out, --ignore-eos, sampling, --choices, --stop, --logprobs) do not apply; "
                   "--routing-out does.")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP bind address (loopback by default).")
@click.option("--chat-template", metavar="FILE",
              help="HTTP: the Jinja chat template /v1/chat/completions applies (vLLM's flag): a file, or the "
                   "template text itself (a value with '{', '}' or a newline that names no file), replacing the "
                   "tokenizer's own; for a checkpoint whose tokenizer has none. Checked at start-up by rendering "
                   "a one-message conversation.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA + NCCL when GPUs are visible, else CPU + gloo.")
@click.option("--dtype", type=DtypeChoice(),
              help="Weights and activations (fp32 = float32, bf16 = bfloat16, fp16 = float16). Default: float32 "
                   "on CPU, bfloat16 on CUDA.")
@click.option("--timeout", "timeout_s", default=60.0, show_default=True, type=FiniteFloat(1.0, MAX_TIMEOUT_S),
              help="Seconds a rank waits for a silent or dead peer before exiting with an error.")
@click.option("--strict-topology", is_flag=True,
              help="Refuse to run (exit 2, before any weight is read) when the ranks' nodes (torchrun's node "
                   "rank, else the hostname) are not the placement's (GPU g on node g // gpus_per_node); "
                   "without it, rank 0 warns and the run goes on.")
@click.option("--stats-out", type=click.Path(dir_okay=False),
              help="Batch: write counters JSON (collectives, tokens and bytes to other ranks, each rank's "
                   "expert load per MoE layer, tokens/s).")
@click.option("--routing-out", type=NPZ_OUTPUT, metavar="TRACE.npz",
              help="Write the decode routing (top-k ids and gate weights of every token a decode step runs; "
                   "--routing-prefill: every prompt token's too) as a moeplace trace (.npz), to predict traffic "
                   "or re-solve (`moeplace solve TRACE --from placement.json --max-moves N`). HTTP: the served "
                   "traffic's, written every --routing-every seconds and when the server stops.")
@click.option("--routing-prefill/--no-routing-prefill", default=False, show_default=True,
              help="With --routing-out: record every prompt token's routing too (prefill), each sequence's "
                   "prompt tokens before its decode tokens, in position order; the trace's meta says so "
                   "(\"phases\", \"prompt_lengths\"). Prompt tokens count in --routing-max-tokens.")
@click.option("--routing-every", type=FiniteFloat(0.0, MAX_TIMEOUT_S, min_open=True), default=ROUTING_EVERY_S,
              show_default=True,
              help="HTTP, with --routing-out: rewrite the file this often (seconds) while tokens come in, so a "
                   "killed server loses at most this much routing.")
@click.option("--routing-max-tokens", type=click.IntRange(1, 1 << 40), default=ROUTING_MAX_TOKENS, show_default=True,
              help="HTTP, with --routing-out: hold at most this many decode tokens (with --routing-prefill, "
                   "prompt and decode tokens; memory on rank 0: about 2.8 kB a token for DeepSeek-V3's 58 MoE "
                   "layers x top-8); --routing-keep says which.")
@click.option("--routing-keep", type=click.Choice(ROUTING_KEEP), default="first", show_default=True,
              help="HTTP, with --routing-out: first: the first --routing-max-tokens tokens, then recording "
                   "stops; last: record for the server's whole life, keeping the most recent --routing-max-tokens "
                   "(the oldest batches are dropped; the trace's meta says keep \"last\" and dropped_tokens), the "
                   "traffic as it is now, to re-place on.")
def serve(nproc_per_node: int | None, model_dir: str, placement_path: str | None, mode: str,
          prompts_path: str | None, out_path: str | None, max_new_tokens: int, max_batch: int, ignore_eos: bool,
          temperature: float | None, top_p: float | None, top_k: int | None, min_p: float | None,
          presence_penalty: float | None, frequency_penalty: float | None, repetition_penalty: float | None,
          seed: int | None, n: int | None, stop: tuple[str, ...], logprobs: int | None, port: int | None,
          host: str, chat_template: str | None, device: str, dtype: str | None, timeout_s: float,
          strict_topology: bool, stats_out: str | None, routing_out: str | None, routing_prefill: bool,
          routing_every: float, routing_max_tokens: int, routing_keep: str) -> None:
    """Expert-parallel inference with a placement applied: each rank holds the non-expert weights
    and only its own experts, read straight from the checkpoint's safetensors.

    \b
    Inputs:  --model checkpoint, --placement JSON, and --prompts FILE (batch) or --port (HTTP);
             --nproc-per-node N starts N ranks here (or launch it under torchrun).
    Outputs: --out JSONL generations; --stats-out counters; --routing-out decode routing trace
             (batch or HTTP; --routing-prefill: the prompts' routing too).
    A placement for another model or another world size is rejected before any weight is read,
    and one for other nodes than the ranks' is named (--strict-topology: rejected); a rank that
    dies makes the others exit with an error within --timeout.
    """
    from moeplace.serve.dist import world_from_env

    routing_out = None if routing_out is None else str(routing_out)  # (NPZ_OUTPUT gives a Path)
    if (prompts_path is None) == (port is None):
        raise MoeplaceError("give exactly one of --prompts FILE (batch) or --port N (HTTP server)")
    refuse_other_mode(click.get_current_context(), http=port is not None)
    for param in ("routing_prefill", "routing_every", "routing_max_tokens", "routing_keep"):  # moot without the file
        if routing_out is None and click.get_current_context().get_parameter_source(param) \
                != click.core.ParameterSource.DEFAULT:
            flag = param.replace("_", "-")
            if param == "routing_prefill" and not routing_prefill:  # named as given
                flag = "no-" + flag
            raise MoeplaceError(f"--{flag} shapes the --routing-out file: give --routing-out FILE")
    if temperature is None and (top_p is not None or top_k is not None):  # a filter on greedy: moot
        raise MoeplaceError("--top-p and --top-k shape sampling: give --temperature too (the default, 0, is greedy)")
    if temperature is None and min_p is not None:
        raise MoeplaceError("--min-p shapes sampling: give --temperature too (the default, 0, is greedy)")
    check_stop_option(stop)
    # what a JSONL line's own keys override (None: not given); a text line gets them as they are
    defaults = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p, "seed": seed,
                "presence_penalty": presence_penalty, "frequency_penalty": frequency_penalty,
                "repetition_penalty": repetition_penalty, "n": n, "stop": list(stop) or None, "logprobs": logprobs}
    outputs = [("--out", out_path), ("--stats-out", stats_out), ("--routing-out", routing_out)]
    check_distinct_outputs(outputs)
    for option, path in outputs:
        if path is not None:  # `--out CKPT/model.safetensors` would replace the weights the ranks read
            check_outside(Path(path), option, model_dir, "--model")
    if nproc_per_node is not None:
        from moeplace.serve import launch

        if launch.under_torchrun():
            raise MoeplaceError("--nproc-per-node starts the ranks itself; under torchrun leave it out")
        launch.precheck(model_dir, placement_path, mode, device, nproc_per_node)
        grace = launch.ROUTING_GRACE_S if port is not None and routing_out else launch.SHUTDOWN_GRACE_S
        with staged_chat_template(chat_template) as template:  # its file, once here rather than after N ranks have started
            if template is not None:
                click.get_current_context().params["chat_template"] = template
            argv = launch.command_line(click.get_current_context(), "nproc_per_node")
            launch.launch(nproc_per_node, argv, grace)
        return
    rank, world = world_from_env()
    try:
        _serve(model_dir, placement_path, mode, prompts_path, out_path, max_new_tokens, max_batch, ignore_eos,
               defaults, port, host, device, dtype, timeout_s, stats_out, routing_out,
               (routing_every, routing_max_tokens, routing_keep),
               chat_template, strict_topology, routing_prefill)
    except Terminated as e:  # the routing is written: now end as the signal would have
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)
        os._exit(128 + e.signum)  # (not reached: the default action ends the process)
    except (MoeplaceError, KeyboardInterrupt):
        if world == 1:
            raise
        exit_hard(sys.exc_info()[1])
    except RuntimeError as e:  # a collective failed (torch.distributed.DistError, gloo/NCCL errors)
        if world == 1:
            raise
        from moeplace.serve.dist import distributed_failure

        exit_hard(distributed_failure(rank, e))
    except Exception as e:  # a bug: still one line per rank, and no hang in a broken process group
        if world == 1:
            raise
        exit_hard(MoeplaceError(f"rank {rank}: internal error {type(e).__name__}: {e}"))


BATCH_ONLY = ("out_path", "stats_out", "ignore_eos", "temperature", "top_p", "top_k", "min_p", "seed", *PENALTIES,
              "n", "stop", "logprobs")
# batch runs have no chat path
HTTP_ONLY = ("host", "routing_every", "routing_max_tokens", "routing_keep", "chat_template")


class Terminated(BaseException):
    """SIGTERM (or a SIGINT whose default action would end the process) on rank 0 of an HTTP
    server recording routing: unwinds serve_forever, which writes the file, instead of dying on
    the spot; `serve` then ends the process by the same signal, as before (no line of its own)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def writes_routing_on_signals(routing: Any) -> Iterator[None]:
    """While serving with --routing-out (`routing`, an engine.RoutingLog; None: nothing to do):
    SIGTERM (torchrun's agent stops the ranks with it, and so do process managers) raises
    Terminated; so does SIGINT where it would kill outright (under --nproc-per-node,
    dist.tie_to_launcher), while Python's own SIGINT handling raises KeyboardInterrupt, which
    unwinds as well. Once the loop has ended (`routing.closing`: the server closes, then the last
    write) a signal waits for the write: the agent that SIGTERMs the ranks after one died would
    otherwise cut it short. Main thread only (signal handlers)."""
    if routing is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if routing.closing:
            pending.append(signum)
            return
        raise Terminated(signum)

    wanted = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) == signal.SIG_DFL else [])
    before = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if pending:  # the loop ended on its own, a signal came during the write: end by it now
        raise Terminated(pending[0])


def refuse_other_mode(ctx: click.Context, http: bool) -> None:
    """An option given for the other mode would be silently ignored (an --out that never
    appears): refuse it, naming it as the user spelled it."""
    for param in ctx.command.params:
        if param.name in (BATCH_ONLY if http else HTTP_ONLY) and \
                ctx.get_parameter_source(param.name) != click.core.ParameterSource.DEFAULT:
            flag = param.opts[0]
            raise MoeplaceError(f"{flag} applies to batch runs (--prompts), not to the HTTP server (--port)"
                                if http else f"{flag} applies to the HTTP server (--port), not to batch runs "
                                "(--prompts)")


def check_stop_option(stop: tuple[str, ...]) -> None:
    """--stop's strings, as parse_stop checks a JSONL "stop" but named as the option: up to
    MAX_STOPS, each of 1 to MAX_STOP_CHARS characters of Unicode text (an argument that is no
    UTF-8 reaches Python as lone surrogates). The tokenizer they need is checked with the prompts."""
    if len(stop) > MAX_STOPS:
        raise MoeplaceError(f"--stop: at most {MAX_STOPS} stop strings, got {len(stop)}")
    for text in stop:
        if not 1 <= len(text) <= MAX_STOP_CHARS:
            raise MoeplaceError(f"--stop: a stop string has 1 to {MAX_STOP_CHARS} characters, got {len(text)}")
        try:
            check_text(text, "--stop")
        except BadRequest as e:
            raise MoeplaceError(str(e)) from None


def exit_hard(e: BaseException | None) -> None:
    """Print one line and leave at once: tearing down a broken process group can hang."""
    code = e.exit_code if isinstance(e, MoeplaceError) else 130
    if not isinstance(e, AlreadyReported):  # rank 0 printed the line (engine.agree)
        msg = " ".join(str(e).split()) if isinstance(e, MoeplaceError) else "interrupted"
        click.echo(f"moeplace: error: {msg}", err=True)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def _serve(model_dir: str, placement_path: str | None, mode: str, prompts_path: str | None, out_path: str | None,
           max_new_tokens: int, max_batch: int, ignore_eos: bool, defaults: dict[str, Any], port: int | None,
           host: str, device: str, dtype: str | None, timeout_s: float, stats_out: str | None,
           routing_out: str | None,
           routing_limits: tuple[float, int, str] = (ROUTING_EVERY_S, ROUTING_MAX_TOKENS, "first"),
           chat_template: str | None = None, strict_topology: bool = False,
           routing_prefill: bool = False) -> None:
    """defaults: what a batch JSONL line's keys override (read_prompts). routing_limits:
    (--routing-every, --routing-max-tokens, --routing-keep), for the HTTP server's --routing-out.
    chat_template: --chat-template's value (a file or the template), which rank 0 sets on its tokenizer.
    strict_topology: a placement whose nodes are not the ranks' is an error, not a warning.
    routing_prefill: --routing-out records the prompts' routing too (rank 0's setting: every
    command carries it to the other ranks, engine.send_command)."""
    import torch.distributed as dist

    from moeplace.export.permute import ep_size_note
    from moeplace.progress import Progress
    from moeplace.serve import engine
    from moeplace.serve.dist import node_key

    spec, placement = engine.prepare(model_dir, placement_path, mode)
    rank, world, dev = engine.init_distributed(timeout_s, device)
    # rank 0's own inputs, checked before any weight is read; the others learn the verdict
    tokenizer = prompts = server = None
    applied: dict[str, Any] = {}

    def check() -> None:
        nonlocal tokenizer, prompts, server, applied
        applied = placement_name(placement_path)
        for option, path in (("--out", out_path), ("--stats-out", stats_out), ("--routing-out", routing_out)):
            if path:
                check_writable(Path(path), option, inputs=[prompts_path, placement_path])  # before the run
        tokenizer = load_tokenizer(model_dir)
        if chat_template is not None:
            set_chat_template(tokenizer, chat_template, model_dir)
        if prompts_path:
            prompts = read_prompts(prompts_path, tokenizer, spec.vocab_size, spec.max_positions, max_new_tokens,
                                   defaults)
        else:
            server = bind_http(host, port or 0)

    heartbeat_s = max(0.5, timeout_s / 4)
    error = engine.check_inputs(rank, world, dev, check if rank == 0 else None, heartbeat_s)
    node, source = node_key()
    keys, strict = engine.agree(rank, world, dev, str(error) if error else None,
                                engine.fingerprint(spec, placement, mode, engine.resolve_dtype(dtype, dev)),
                                node, strict_topology)
    if error:
        raise error
    applied["nodes"] = max(engine.node_layout(keys)) + 1  # (rank 0's: /health and --stats-out)
    # every rank has the same keys and strictness (agree's all-reduce), so all decide alike: no hang
    if placement_path is not None and (problem := engine.topology_problem(placement, keys, placement_path, source)):
        if strict:
            raise MoeplaceError(f"{problem} (--strict-topology)") if rank == 0 else \
                AlreadyReported(MoeplaceError.exit_code)
        if rank == 0:
            warn(problem)
    if rank == 0 and placement_path is None and (note := ep_size_note(model_dir, world)):
        click.echo(f"moeplace serve: note: {note}", err=True)
    progress = Progress("serve: loading weights", enabled=rank == 0)
    rt = engine.load_runtime(spec, placement, mode, rank, world, dev, dtype)
    progress.close(f"rank {rank}: {held_experts(rt.model.local_experts, spec.num_experts)}")
    if rank > 0:
        engine.worker_loop(rt)
    elif server is not None:
        from moeplace.serve.httpserver import serve_forever

        click.echo(f"moeplace serve: http://{host}:{server.server_address[1]} ({plural(world, 'rank')}, {mode}); "
                   f"{describe_placement(applied)}", err=True)
        stop = True
        routing = None
        if routing_out:
            routing = engine.RoutingLog(routing_out, rt, max_tokens=routing_limits[1], every_s=routing_limits[0],
                                        keep=routing_limits[2], prefill=routing_prefill)
        try:
            with writes_routing_on_signals(routing):
                serve_forever(rt, server, tokenizer, max_batch, max_new_tokens, heartbeat_s=heartbeat_s,
                              model_name=Path(model_dir).name, placement=applied, routing=routing)
        except (MoeplaceError, Terminated):
            # a failed collective: one more broadcast on the broken group would only wait out the
            # timeout and replace the real error; the other ranks fail on their own. A signal:
            # rank 0 ends as it did before it caught it (the others get it too, or lose contact)
            stop = False
            raise
        finally:
            if stop:
                engine.send_command(rt, engine.STOP)
    else:
        assert prompts is not None
        sequences = sum(p.n for p in prompts)  # with n > 1: its choices each decode as a sequence
        size = plural(len(prompts), "prompt") + (f", {plural(sequences, 'sequence')}" if sequences > len(prompts) else "")
        click.echo(f"moeplace serve: batch of {size} ({plural(world, 'rank')}, {mode}); {describe_placement(applied)}",
                   err=True)
        rt.record_prefill = routing_prefill and routing_out is not None
        run_batch(rt, prompts, max_batch, ignore_eos, tokenizer, out_path, stats_out, routing_out, applied)
        engine.send_command(rt, engine.STOP)
    if world > 1:
        dist.destroy_process_group()


CONTIGUOUS = "contiguous (no --placement)"


def placement_name(placement_path: str | None) -> dict[str, str | None]:
    """Which placement the run applies, for its start line, /health, /metrics and --stats-out:
    the path as given and the first 12 hex digits of the file's sha256 (placement.json solved
    again under the same name is another placement), or contiguous blocks without --placement."""
    if placement_path is None:
        return {"placement": CONTIGUOUS, "placement_sha256": None}
    try:
        digest = hashlib.sha256(Path(placement_path).read_bytes()).hexdigest()[:12]
    except OSError as e:
        raise MoeplaceError(f"{placement_path}: cannot read it ({e.strerror or e})") from None
    return {"placement": placement_path, "placement_sha256": digest}


def describe_placement(applied: dict[str, Any]) -> str:
    """`placement p.json (sha256 1a2b3c4d5e6f)`, or `placement contiguous (no --placement)`."""
    sha = applied.get("placement_sha256")
    return f"placement {applied.get('placement')}" + (f" (sha256 {sha})" if sha else "")


def held_experts(local_experts: list[list[int]], num_experts: int) -> str:
    """What a rank loaded, counted per MoE layer: a bare sum over layers ("32 experts" on a
    16-expert model) read as more experts than the model has."""
    counts = [len(e) for e in local_experts]
    total = f"({plural(sum(counts), 'expert FFN')}, replicas included)"
    if min(counts) == max(counts):
        layers = "the MoE layer" if len(counts) == 1 else f"each of {len(counts)} MoE layers"
        return f"{counts[0]} of {num_experts} experts in {layers} {total}"
    return f"{min(counts)}-{max(counts)} of {num_experts} experts per MoE layer over {len(counts)} layers {total}"


def load_tokenizer(model_dir: str) -> Any:
    """The checkpoint's tokenizer, or None when it ships none (prompts must then be token ids)."""
    d = Path(model_dir)
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        # never run or ask about a tokenizer's own code: a rank waiting on a terminal prompt hangs the run
        return AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
    except Exception as e:
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise MoeplaceError(f"{d}: cannot load its tokenizer ({type(e).__name__}: {first})") from None


MAX_TEMPLATE_BYTES = 1 << 20  # 1 MiB: real chat templates are a few kB


def read_chat_template(value: str) -> tuple[str, str]:
    """--chat-template's (text, name for messages): the file `value` names, else `value` itself
    when it holds Jinja's '{' or '}' or a newline (vLLM's rule; a value without them is a path
    that does not exist). os.path, not Path: template text longer than a path may be raises
    ENAMETOOLONG from Path.exists on some Pythons."""
    if os.path.isdir(value):
        raise MoeplaceError(f"--chat-template {value}: is a directory (give a file holding a Jinja chat template)")
    if os.path.exists(value):
        try:
            with open(value, "rb") as f:
                data = f.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as e:
            raise MoeplaceError(f"--chat-template {value}: cannot read it ({e.strerror or e})") from None
        if len(data) > MAX_TEMPLATE_BYTES:
            raise MoeplaceError(f"--chat-template {value}: more than {MAX_TEMPLATE_BYTES >> 20} MiB, not a chat "
                                "template")
        try:
            text, name = data.decode("utf-8-sig"), value
        except UnicodeDecodeError:
            raise MoeplaceError(f"--chat-template {value}: not UTF-8 text") from None
    elif any(c in value for c in "{}\n"):
        text, name = value, "(the template text)"
    else:
        raise MoeplaceError(f"--chat-template {value}: no such file (give a file holding a Jinja chat template, "
                            "or the template text)")
    if not text.strip():
        raise MoeplaceError(f"--chat-template {name}: the template is empty")
    return text, name


@contextlib.contextmanager
def staged_chat_template(value: str | None) -> Iterator[str | None]:
    """--chat-template as `--nproc-per-node`'s ranks are to be given it, read (and checked) once by
    the launcher: `value` itself, unless it names a file that is not a regular one (a pipe:
    `/dev/stdin` fed by `cat`, bash's `<(...)`), which this read empties or the ranks cannot
    open; then a private copy of what it held, removed when the ranks are done."""
    if value is None:
        yield None
        return
    text, _ = read_chat_template(value)
    if not os.path.exists(value) or os.path.isfile(value):  # template text, or a file the ranks re-read
        yield value
        return
    # named after the original: a rank's error line names this copy
    fd, copy = tempfile.mkstemp(prefix=f"moeplace-copy-of-{Path(value).name}-", suffix=".jinja")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        yield copy
    finally:
        os.unlink(copy)


CHECK_MESSAGES = [{"role": "user", "content": "Hello"}]  # what a chat template must render at start-up


def set_chat_template(tokenizer: Any, value: str, model_dir: str) -> None:
    """Rank 0's tokenizer takes --chat-template's template (the chat route, parse_chat, reads
    `tokenizer.chat_template`), after rendering a one-message conversation with it: transformers
    compiles a template only when a request applies it, so a syntax error would otherwise be a
    400 on every chat request instead of one line at start-up."""
    text, name = read_chat_template(value)
    if tokenizer is None:
        raise MoeplaceError(f"--chat-template {name}: model {model_dir} has no tokenizer to apply it with "
                            "(without one the server takes token ids on /v1/completions only)")
    tokenizer.chat_template = text
    try:
        rendered = tokenizer.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, tokenize=False)
    except Exception as e:
        try:
            from jinja2 import TemplateSyntaxError
        except ImportError:  # transformers renders templates with jinja2: without it, e says so
            TemplateSyntaxError = ()  # type: ignore[assignment,misc]

        first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        if isinstance(e, TemplateSyntaxError):
            raise MoeplaceError(f"--chat-template {name}: not a valid Jinja template ({type(e).__name__}: {first}, "
                                f"line {e.lineno})") from None
        raise MoeplaceError(f"--chat-template {name}: rendering a one-message conversation ({CHECK_MESSAGES}) "
                            f"fails ({type(e).__name__}: {first})") from None
    if not isinstance(rendered, str) or not rendered:
        raise MoeplaceError(f"--chat-template {name}: renders a one-message conversation ({CHECK_MESSAGES}) "
                            "as no text")


def bind_http(host: str, port: int) -> Any:
    from moeplace.serve.httpserver import make_server

    try:
        return make_server(host, port)
    except OSError as e:
        raise MoeplaceError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


class BatchPrompt(NamedTuple):
    """One prompt of a batch run, as read_prompts checked it."""

    prompt: Any  # as the file gives it: text or token ids
    ids: list[int]
    max_tokens: int
    sampling: Sampling  # its first choice's; choice j samples with seed + j (openai.prompt_sampling)
    n: int = 1  # choices (sequences) of this prompt
    stop: tuple[str, ...] = ()  # stop strings (text.StopText)
    logprobs: int | None = None  # alternatives per token in its "logprobs"; None: no log-probabilities


def read_prompts(path: str, tokenizer: Any, vocab: int, max_positions: int, max_new_tokens: int,
                 defaults: dict[str, Any] | None = None) -> list[BatchPrompt]:
    """Each prompt of a batch file; plain lines or JSONL (see prompts_are_jsonl). Lines end at
    "\n" (a "\r" before it is dropped) and at nothing else: str.splitlines would also split at
    U+2028, form feeds, \x1c-\x1e and \x85 inside a prompt. A JSONL line's keys are read as a
    /v1/completions body's (the same checks and messages, prefixed FILE:LINE; "logit_bias" too,
    its token ids in [0, vocab)). defaults: the options' values of those keys ("temperature",
    "top_p", "top_k", "min_p", "seed", the penalties, "n", "stop", "logprobs"; None: not given),
    which a JSONL line's own keys override. Sequences are numbered
    over the file, prompt-major (prompt i's n choices, then prompt i + 1's); sequence k without a
    "seed" of its line samples with seed + k (without n, prompt i with seed + i)."""
    p = Path(path)
    name = STDIN_NAME if path == "-" else str(p)
    try:  # utf-8-sig: a BOM (Windows editors write one) is no part of the first line
        lines = [ln.removesuffix("\r") for ln in prompt_bytes(path).decode("utf-8-sig").split("\n")]
    except UnicodeDecodeError:
        raise MoeplaceError(f"{name}: not UTF-8 text") from None
    jsonl = prompts_are_jsonl(p, lines)
    out: list[BatchPrompt] = []
    ignored = ""  # the first line with keys read by nothing (a typo of max_tokens ran the default)
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    if defaults.get("stop") and tokenizer is None:  # before any line: no line can use them
        raise MoeplaceError("--stop: this model has no tokenizer, so its generations have no text to look for a "
                            "stop string in")
    base_seed = defaults.get("seed", secrets.randbits(63))  # drawn once: the run's seeds are base + k
    sequences = 0  # the choices of the prompts before this one
    for num, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{name}:{num}"
        limit = max_new_tokens
        doc: dict[str, Any] = {}  # a text line: the options' values
        if jsonl:
            try:
                doc = loads_json(line)
            except ValueError as e:
                raise MoeplaceError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(doc, dict) or "prompt" not in doc:
                raise MoeplaceError(f"{where}: expected an object with a \"prompt\"")
            if (unknown := sorted(set(doc) - PROMPT_KEYS)) and not ignored:
                ignored = f"{where}: keys {unknown} ignored (a line reads \"prompt\" and \"max_tokens\")"
            prompt, limit = doc["prompt"], doc.get("max_tokens", max_new_tokens)
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise MoeplaceError(f"{where}: max_tokens must be a positive integer")
        else:
            prompt = line
        given = {**defaults, **{k: doc[k] for k in (*SAMPLING_KEYS, *CHOICE_KEYS) if k in doc}}
        try:  # as over HTTP: a filter without a temperature is refused, not answered greedily
            params, n = check_options(given, {}, "batch runs", vocab)
            stop, logprobs = parse_stop(given, tokenizer), parse_logprobs(given)
        except BadRequest as e:
            raise MoeplaceError(f"{where}: {e}") from None
        if not params.greedy and doc.get("seed") is None:
            params = dataclasses.replace(params, seed=int64(base_seed + sequences))
        if isinstance(prompt, str):
            if tokenizer is None:
                raise MoeplaceError(f"{where}: text prompt, but the model has no tokenizer (give token ids in JSONL)")
            try:  # a JSONL "\ud800" is valid JSON but no text: the tokenizer would raise a TypeError
                check_text(prompt, "prompt")
            except BadRequest as e:
                raise MoeplaceError(f"{where}: {e}") from None
            ids = list(tokenizer.encode(prompt, add_special_tokens=False))
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = prompt
        else:
            raise MoeplaceError(f"{where}: prompt must be text or a list of token ids")
        if not ids:
            raise MoeplaceError(f"{where}: empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise MoeplaceError(f"{where}: token id out of range [0, {vocab})")
        if len(ids) + limit > max_positions:
            raise MoeplaceError(f"{where}: {len(ids)} prompt tokens + {limit} new exceed the model's "
                                f"{max_positions} positions")
        out.append(BatchPrompt(prompt, ids, limit, params, n, stop, logprobs))
        sequences += n
    if not out:
        raise MoeplaceError(f"{name}: no prompts")
    if ignored:
        warn(ignored)
    return out


STDIN_NAME = "<stdin>"


MAX_PROMPT_BYTES = 1 << 28  # 256 MiB, far past any batch run; a stream with no end (/dev/zero) is refused, not read forever


def prompt_bytes(path: str) -> bytes:
    """The prompts file's bytes; "-" is standard input. Only rank 0 calls this (serve's input
    check), so piped prompts are read once; under --nproc-per-node the ranks inherit the
    launcher's stdin (torch's elastic agent passes it on), so rank 0 reads the pipe there too.
    Anything that reads is accepted: a pipe, /dev/stdin or a FIFO is no regular file, and an
    is_file() check refused them as "no such file"."""
    name = STDIN_NAME if path == "-" else path
    if path != "-":
        p = Path(path)
        if not p.exists():  # (a pipe or FIFO exists and is read below)
            raise MoeplaceError(f"{p}: {not_a_file(p)}")
        if p.is_dir():
            raise MoeplaceError(f"{p}: is a directory")
    try:
        with contextlib.nullcontext(sys.stdin.buffer) if path == "-" else open(path, "rb") as f:
            data = f.read(MAX_PROMPT_BYTES + 1)
    except OSError as e:
        raise MoeplaceError(f"{name}: cannot read it ({e.strerror or e})") from None
    if len(data) > MAX_PROMPT_BYTES:
        raise MoeplaceError(f"{name}: more than {MAX_PROMPT_BYTES >> 20} MiB of prompts; split them over several runs")
    return data


def prompts_are_jsonl(path: Path, lines: list[str]) -> bool:
    """The prompts file's format: `.jsonl` is JSONL and `.txt` is text, whatever they hold;
    another name is JSONL when its first non-blank line starts with "{"."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".txt"):
        return suffix == ".jsonl"
    return next((ln.lstrip().startswith("{") for ln in lines if ln.strip()), False)


def batch_records(prompts: list[BatchPrompt], tokens: list[list[int]], logprobs: list[list[TokenLogprobs] | None],
                  tokenizer: Any, eos_token_ids: tuple[int, ...]) -> list[str]:
    """The output lines (JSON) of a run: one per sequence, prompt-major, from every sequence's
    `tokens` and `logprobs` (None where its batch computed none) as decoded. Each is
    {"index" (its prompt's), "choice" (j, only in a run where some prompt has n > 1), "prompt",
    "token_ids", "text" (null without a tokenizer), "finish_reason", "logprobs" (where its
    prompt asked for them), "seed" (where it was sampled)}; without these options, the lines
    of the runs before them byte for byte. A choice's tokens, text, finish_reason and
    log-probabilities are /v1/completions': openai.job_choices cuts them at a stop string
    and completion_logprobs shapes them (every token's string decoded, also for a token-id prompt).
    eos_token_ids: () with --ignore-eos (a last token that is EOS by chance ended nothing)."""
    choices = any(p.n > 1 for p in prompts)
    lines = []
    first = 0  # the prompt's first sequence
    for i, p in enumerate(prompts):
        job = Job([p.ids] * p.n, p.max_tokens, tokenizer is not None, p.sampling, logprobs=p.logprobs, n=p.n,
                  stop=p.stop)
        job.result = tokens[first:first + p.n]
        if p.logprobs is not None:  # its batches computed them: the largest N of the batch, its N shown
            job.result_logprobs = [lp for lp in logprobs[first:first + p.n] if lp is not None]
            assert len(job.result_logprobs) == p.n
        first += p.n
        for j, (a, params) in enumerate(zip(job_choices(job, tokenizer, eos_token_ids),
                                             prompt_sampling(p.sampling, p.n))):
            line: dict[str, Any] = {"index": i, **({"choice": j} if choices else {}), "prompt": p.prompt,
                                    "token_ids": a.tokens, "text": a.text if tokenizer is not None else None,
                                    "finish_reason": a.finish_reason}
            if p.logprobs is not None and a.logprobs is not None:
                line["logprobs"] = completion_logprobs(a.tokens, a.logprobs, p.logprobs, tokenizer)[0]
            lines.append(json.dumps(line if params.greedy else {**line, "seed": params.seed}))
    return lines


def stop_hook(tokenizer: Any, stops: list[tuple[str, ...]]) -> StepCallback | None:
    """Runtime.generate's on_step for a batch run's batch (`stops`: each sequence's stop strings):
    the slots whose stop string a token completed end at the next step (text.StopWatch),
    their records unchanged (batch_records cuts them there). None when no sequence has any: a
    run without stop strings pays nothing."""
    watch = StopWatch(tokenizer, [(s, False) for s in stops])
    if not watch.watching:
        return None
    return lambda step: [slot for slot, token, finished, _ in step if watch.completed(slot, token, finished)]


def run_batch(rt: Any, prompts: list[BatchPrompt], max_batch: int, ignore_eos: bool, tokenizer: Any,
              out_path: str | None, stats_out: str | None, routing_out: str | None,
              applied: dict[str, Any]) -> None:
    """Rank 0: drive the batches, then write generations, counters and routing (atomically).
    Each prompt runs as its n sequences (choices), prompt-major; a batch is any max_batch of them.
    Each file written gets a `wrote FILE: ...` line as every other command prints, on stdout, or
    on stderr when the generations themselves go to stdout (no --out): that stays pure JSONL."""
    import numpy as np

    from moeplace.io import write_json_atomic, write_text_atomic
    from moeplace.progress import Progress
    from moeplace.serve import engine
    from moeplace.serve.generate import routing_arrays
    from moeplace.trace.format import make_trace, save_trace

    spec = rt.model.spec
    # batches start at multiples of the world size, so a sequence's home rank is its index % world
    world = rt.comm.world
    if (batch := max(max_batch - max_batch % world, world)) != max_batch:
        click.echo(f"moeplace serve: note: --max-batch {max_batch} runs as {batch}, a multiple of the {world} "
                   f"ranks (a prompt's home rank is its index % {world})", err=True)
    max_batch = batch
    # (prompt, its choice's sampling) per sequence: choice j of a prompt samples with its seed + j
    sequences = [(p, params) for p in prompts for params in prompt_sampling(p.sampling, p.n)]
    results: list[list[int]] = []
    logprobs: list[list[TokenLogprobs] | None] = []  # per sequence, where its batch computed them
    routing: list[dict[str, np.ndarray]] = []  # routing_arrays' per batch (prompt tokens too: rt.record_prefill)
    seconds = 0.0
    progress = Progress("serve: generating", total=len(sequences))
    for start in range(0, len(sequences), max_batch):
        chunk = sequences[start:start + max_batch]
        asked = [p.logprobs for p, _ in chunk if p.logprobs is not None]  # the batch computes the most asked for
        req = engine.Request([p.ids for p, _ in chunk], [p.max_tokens for p, _ in chunk], ignore_eos,
                             routing_out is not None, [params for _, params in chunk],
                             logprobs=max(asked) if asked else None)
        engine.send_command(rt, engine.GENERATE, req)
        res = engine.run_request(rt, req, stop_hook(tokenizer, [p.stop for p, _ in chunk]))
        counters = engine.merged_counters(rt)  # the other ranks all-reduce after every request
        results += res.tokens
        logprobs += res.logprobs if res.logprobs is not None else [None] * len(chunk)
        seconds += res.seconds
        if res.routing is not None:  # sequence id: the sequence's index (slot + start)
            routing.append(routing_arrays(res.routing, res.routing_weights, req.prompts, res.tokens,
                                          len(spec.moe_layers), start))
        progress.update(start + len(chunk))
    generated = sum(len(t) for t in results)
    progress.close(f"{generated} tokens")
    lines = batch_records(prompts, results, logprobs, tokenizer, () if ignore_eos else spec.eos_token_ids)
    to_stderr = not out_path
    if out_path:
        with writing(out_path):
            write_text_atomic(out_path, "\n".join(lines) + "\n")
        click.echo(f"wrote {out_path}: {plural(len(lines), 'generation')}, {plural(generated, 'token')}")
    else:
        click.echo("\n".join(lines))
    if stats_out:
        with writing(stats_out):
            write_json_atomic(stats_out, {
            "mode": rt.mode, "world": rt.comm.world, "model": str(spec.path), **applied,
            "top_k": spec.top_k, "hidden_size": spec.hidden_size, "dtype": str(rt.model.dtype).removeprefix("torch."),
            "prompts": len(prompts), "generated_tokens": generated, "decode_seconds": seconds,
            "tokens_per_s": generated / seconds if seconds > 0 else None,
            "decode": counters.summary("decode", per_token=True), "prefill": counters.summary("prefill"),
        })
        click.echo(f"wrote {stats_out}: counters of {plural(rt.comm.world, 'rank')} ({rt.mode})", err=to_stderr)
    if routing_out:
        layers = len(spec.moe_layers)
        arrays = {key: np.concatenate([r[key] for r in routing]) for key in routing[0]}
        if not len(arrays["positions"]):  # a trace holds at least one token: said as the HTTP server says it
            click.echo(f"moeplace serve: note: no decode step ran (every sequence ended at its first token), so "
                       f"{routing_out} was not written", err=True)
            return
        prefill = rt.record_prefill
        meta = engine.routing_meta(spec, rt.comm.world, prefill, http=False)
        if prefill:
            meta.update(engine.phase_meta(arrays["sequence_ids"], arrays["prompt_lengths"]))
        trace = make_trace(arrays["topk_ids"], arrays.get("topk_weights"), spec.num_experts,
                           sequence_ids=arrays["sequence_ids"], positions=arrays["positions"],
                           token_ids=arrays["token_ids"], name=routing_out, meta=meta)
        with writing(routing_out):
            save_trace(trace, routing_out)
        prompt = engine.prompt_token_count(arrays["positions"], arrays["prompt_lengths"])
        click.echo(f"wrote {routing_out}: {engine.routing_summary(trace.num_tokens, layers, prefill, prompt)}",
                   err=to_stderr)
