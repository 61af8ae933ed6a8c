"""`moeplace trace`: run a Hugging Face MoE model on text and record its routing as a v1 trace."""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import logging
import os
import pickle
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import click

from moeplace.errors import AlreadyReported, MoeplaceError, TraceError, warn
from moeplace.export.permute import permutation_record
from moeplace.io import read_json
from moeplace.models.config import config_size
from moeplace.options import (NPZ_OUTPUT, DtypeChoice, check_outside, check_writable, plural, same_directory,
                              same_file)
from moeplace.parallel import available_cpus

if TYPE_CHECKING:
    from moeplace.trace.format import Trace


@click.command("trace", context_settings={"show_default": True, "max_content_width": 100})
@click.option("--model", "model_ref", required=True, metavar="PATH_OR_ID",
              help="save_pretrained directory (or a hub id, fetched only when online).")
@click.option("--data", "data", required=True, multiple=True, type=click.Path(path_type=Path),
              metavar="FILE", help="Text: .txt (one document), .jsonl (a 'text' field per line) or a "
                                   "directory of them (recursively, hidden names and LICENSE*/NOTICE*/"
                                   "COPYING* files skipped). Repeat for several; a file given twice is "
                                   "refused.")
@click.option("-o", "--output", required=True, type=NPZ_OUTPUT, metavar="TRACE.npz",
              help="Trace file to write (moeplace trace v1); its name must end in .npz (a FIFO or device, "
                   "e.g. /dev/null, is written through whatever its name).")
@click.option("--seq-len", default=None, type=click.IntRange(min=1), show_default=False,
              help="Tokens per sequence (each document is cut into windows)  [default: 512, or the model's "
                   "max_position_embeddings when smaller]")
@click.option("--max-tokens", default=None, type=click.IntRange(min=1), help="Stop after this many tokens  [default: all text]")
@click.option("--batch-size", default=8, type=click.IntRange(min=1), help="Sequences per forward pass.")
@click.option("--dtype", default="auto", type=DtypeChoice(extra=("auto",)),
              help="Weights dtype (fp32 = float32, bf16 = bfloat16, fp16 = float16); auto = the checkpoint's.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), help="auto = cuda when available.")
@click.option("--threads", default=None, type=click.IntRange(min=1),
              help="CPU threads for torch, at most the CPUs this process may use  [default: torch's choice; 1 is "
                   "often faster on a busy machine]")
@click.option("--tokenizer", "tokenizer_ref", default=None, metavar="PATH_OR_ID",
              help="Tokenizer to use  [default: the model's]")
@click.option("--corpus", default=None,
              help="Corpus label stored in the trace meta  [default: the names of the data files read]")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the Python code a checkpoint ships (config.json auto_map) for a family transformers "
                   "lacks. Only for checkpoints you trust; without it such a model is refused in one line, "
                   "and never asked about.")
@click.option("--resume", "resume", default=None, type=click.Path(path_type=Path), metavar="PARTIAL.npz",
              help="Continue the trace an interrupted run wrote, given the same arguments: its windows are checked "
                   "against --data and skipped (the model does not run on them), the rest traced; the result "
                   "equals one uninterrupted run's. -o may be PARTIAL.npz itself; --max-tokens counts the whole trace. "
                   "The model is checked by path, config and router weights (meta router_sha256).")
@click.option("-q", "--quiet", is_flag=True, help="No progress (stderr) and no summary line (stdout); errors only.")
def trace(model_ref: str, data: tuple[Path, ...], output: Path, seq_len: int | None, max_tokens: int | None,
          batch_size: int, dtype: str, device: str, threads: int | None, tokenizer_ref: str | None,
          corpus: str | None, trust_remote_code: bool, resume: Path | None, quiet: bool) -> None:
    """Record, for every token, the top-k experts and gate weights the model's own routers pick.

    \b
    Hooks the router of every sparse MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE,
    DeepSeek-V2/V3 with grouped and bias-corrected routing, GPT-OSS, and any transformers
    model built the same way); dense decoder layers are skipped and the MoE layers' decoder
    indices are stored in the trace meta ("moe_layers"). Text is tokenised without special
    tokens and cut into --seq-len windows, each window one sequence of the trace.
    \b
    Output: TRACE.npz with topk_ids / topk_weights [tokens, moe_layers, k] (highest weight
    first), token_ids, sequence_ids, positions and meta (model, moe_layers, dtype, corpus...).
    Routing is spooled to disk per batch; Ctrl-C (or SIGTERM: `kill`, Slurm preemption, a
    cancelled CI job) writes the batches completed so far as a valid, shorter trace (exit code
    130, or 143), to -o when it does not exist yet, else beside it as STEM.interrupted.npz (an
    existing trace is never replaced by a partial one). The output file is replaced atomically.
    --resume PARTIAL.npz continues such a trace: the same arguments again, plus --resume; a
    different model, --data file, --seq-len, --batch-size, --dtype, --device or text is refused,
    and so are other router weights at the same --model path (meta router_sha256 hashes every MoE
    router's tensors, not the other weights: a fine-tune that froze the routers passes).
    \b
    Example:
      moeplace trace --model checkpoints/tiny-moe --data ../shared/data/text/c4_texts.txt \\
          --max-tokens 20000 --seq-len 256 --dtype float32 -o c4.npz
      # after Ctrl-C (or preemption) wrote c4.npz with the batches done:
      moeplace trace --model checkpoints/tiny-moe --data ../shared/data/text/c4_texts.txt \\
          --max-tokens 20000 --seq-len 256 --dtype float32 -o c4.npz --resume c4.npz
    """
    import torch

    from moeplace.models.discovery import find_moe_layers, num_decoder_layers
    from moeplace.trace.collect import InputShare, collect, router_fingerprint
    from moeplace.trace.format import save_trace
    from moeplace.trace.text import expand_paths, iter_batches, iter_windows, skip_windows, validate

    if threads is not None and threads > available_cpus():  # 100000 threads crashed torch's OpenMP pool
        raise MoeplaceError(f"--threads {threads}: this process may use {available_cpus()} CPUs")
    skipped: list[Path] = []
    try:
        files = expand_paths(data, skipped)
    except MoeplaceError as e:  # name the flag, as solve's --from and --cluster do
        raise MoeplaceError(str(e) if str(e).startswith("--data ") else f"--data {e}") from None
    if skipped and not quiet:  # said, since a directory's file list is otherwise silent
        click.echo(f"trace: skipped {plural(len(skipped), 'licence/notice file')} in --data directories: "
                   f"{', '.join(map(str, skipped))} (give a file as --data itself to read it)", err=True)
    check_writable(output, inputs=files)  # fail before the model loads, not after the run
    partial = _load_partial(resume, files, seq_len, batch_size, max_tokens) if resume is not None else None
    check_outside(output, "-o", model_ref, "--model")
    if tokenizer_ref is not None:
        check_outside(output, "-o", tokenizer_ref, "--tokenizer")
    validate(files)  # bad data found after an hour of tracing would throw the hour away
    if threads is not None:
        torch.set_num_threads(threads)
    dev = _device(device, torch)
    with _warnings_held():  # a failed load is one line; its warnings are shown only when it succeeds
        # config.json first (cheap, no weights): the tokenizer reads it too, and would take the blame
        _check_config(model_ref, trust_remote_code)
        # then the tokenizer: a bad --tokenizer must not wait for a model of tens of GB to load
        tokenizer = _load_tokenizer(tokenizer_ref or model_ref, given=tokenizer_ref is not None,
                                    trust_remote_code=trust_remote_code)
        model = _load_model(model_ref, dtype, dev, trust_remote_code)
    layers = find_moe_layers(model)
    bad_k = next((m for m in layers if not 1 <= m.top_k <= m.num_experts), None)
    if bad_k is not None:
        raise MoeplaceError(f"{model_ref}: config routes each token to {bad_k.top_k} of {bad_k.num_experts} experts "
                            f"(decoder layer {bad_k.layer_index}): top-k must be in [1, experts]")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(max_positions, int) or max_positions < 1:
        max_positions = None
    if seq_len is None:
        seq_len = min(512, max_positions or 512)
    elif max_positions is not None and seq_len > max_positions:
        raise MoeplaceError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}")
    vocab = model.get_input_embeddings().weight.shape[0]
    # progress as the share of the --data text read: their sizes are known up front, the token count is not
    sizes = [f.stat().st_size for f in files]
    share = InputShare(sizes) if sum(sizes) > 0 else None  # a size-less file (procfs) gives no share

    def tokenize(text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and max(ids) >= vocab:
            raise MoeplaceError(f"tokenizer produced id {max(ids)} >= the model's vocabulary size {vocab}")
        if share is not None:
            share.tokenized(text, len(ids))
        return ids

    n_dec = num_decoder_layers(model)
    moe_idx = [m.layer_index for m in layers]
    meta: dict[str, Any] = {
        "source": "moeplace trace",
        "model": model_ref,
        "model_type": getattr(model.config, "model_type", None),
        "architecture": type(model).__name__,
        "moe_layers": moe_idx,
        "dense_layers": [i for i in range(n_dec) if i not in moe_idx],
        "num_decoder_layers": n_dec,
        "num_experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "num_groups": layers[0].num_groups,
        "corpus": corpus,  # set below from the files actually read
        "data": [],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(dev),
        "seq_len": seq_len,
        "batch_size": batch_size,  # batches decide padding, hence the exact floats: a resumed run keeps them
        "tokenizer": tokenizer_ref or model_ref,
    }
    if (hidden := _hidden_size(model.config)) is not None:  # a cost model's hidden_size is checked against it
        meta["hidden_size"] = hidden
    if os.path.isdir(model_ref) and (record := permutation_record(model_ref)) is not None:
        # a checkpoint `permute-checkpoint` renumbered: its expert ids are not the original's, and a
        # placement of the original must not be scored on them unawares (eval warns)
        meta["renumbered_from"] = str(record.get("source", "unknown"))
    # last: a field checked before it (--model, --dtype, renumbered_from) names a difference better
    meta["router_sha256"] = router_fingerprint(layers)  # a checkpoint replaced at the same path
    # padded positions are dropped, and no real token sees them (causal, right-padded): any id of the
    # embedding will do. A pad token added to a tokenizer may lie past the model's vocabulary.
    pad = tokenizer.pad_token_id
    pad_id = pad if isinstance(pad, int) and 0 <= pad < vocab else 0
    sources: list[tuple[Path, int]] = []  # (file, its first window): which files the trace read
    walked = share.files(files) if share is not None else files  # marks where each file starts
    windows = iter_windows(walked, tokenize, seq_len, max_tokens, sources)
    held = 0  # windows (sequences) the partial trace holds
    if partial is not None:
        assert resume is not None and partial.token_ids is not None  # _load_partial checked these
        assert partial.sequence_ids is not None and partial.positions is not None
        if problem := _resume_difference(partial.meta, meta):
            raise MoeplaceError(f"--resume {resume}: {problem}")
        if "router_sha256" not in partial.meta:  # written before moeplace recorded it
            warn(f"--resume {resume}: its meta has no router_sha256 (an older moeplace wrote it): the model's weights "
                 "cannot be checked against the ones it was traced with; the resumed trace records none")
            del meta["router_sha256"]  # it would vouch for the partial trace's tokens too
        if not quiet:
            click.echo(f"trace: checking the {partial.num_tokens} tokens of {resume} against --data", err=True)
        held = skip_windows(windows, partial.token_ids, partial.sequence_ids, partial.positions, f"--resume {resume}")
        nxt = next(windows, None)
        if nxt is not None and held % batch_size:  # whole batches unless the text ended: other batches
            raise MoeplaceError(f"--resume {resume}: holds {held} sequences, not whole batches of --batch-size "
                                f"{batch_size}: it was traced with another --batch-size")
        windows = itertools.chain([] if nxt is None else [nxt], windows)
    batches = iter_batches(windows, batch_size, pad_id, first_seq=held)
    result = collect(model, layers, batches, device=dev, meta=meta, spool_dir=output.parent,
                     max_tokens=max_tokens, share=share.at if share is not None else None, progress=not quiet,
                     done_before=partial.num_tokens if partial is not None else 0)
    if result.trace is None:
        if result.interrupted:
            what = f"{resume} left as it was" if partial is not None else "no trace written"
            raise MoeplaceError(f"{_stopped(result.interrupted)} before the first batch completed: {what}",
                                exit_code=_exit_code(result.interrupted))
        if partial is None:
            raise MoeplaceError(f"no tokens in {', '.join(map(str, files))}")
    if partial is not None:
        assert resume is not None
        t = _resumed(partial, result.trace, meta, resume)
    else:
        assert result.trace is not None  # raised above otherwise
        t = result.trace
    assert t.sequence_ids is not None  # collect always records them
    num_windows = int(t.sequence_ids.max()) + 1
    read = [f for f, first in sources if first < num_windows]  # --max-tokens or Ctrl-C may stop early
    t.meta["data"] = [str(f) for f in read]
    t.meta["data_bytes"] = [sizes[files.index(f)] for f in read]  # what a resumed run checks its --data by
    t.meta["corpus"] = corpus or ",".join(f.stem for f in read)
    if partial is not None and result.trace is None:  # the text ended where the partial trace did
        assert resume is not None
        _finish_complete(t, partial, output, resume, _summary(t, moe_idx, read), quiet)
        return
    resumed = f"resumed from {resume} at {plural(partial.num_tokens, 'token')}" if partial is not None else ""
    target = output
    if result.interrupted:
        t.meta["interrupted"] = True
        # a complete trace may be there: a partial run must not replace it (the partial trace resumed may be)
        if output.exists() and not (resume is not None and same_file(output, resume)):
            target = output.with_name(output.stem + ".interrupted.npz")
    save_trace(t, target)
    if result.interrupted:
        kept = f"; {output} left as it was" if target != output else ""
        click.echo(f"wrote {target}: {_summary(t, moe_idx, read)} ({_stopped(result.interrupted)}: a valid shorter "
                   f"trace{kept}{'; ' + resumed if resumed else ''})", err=True)
        raise AlreadyReported(_exit_code(result.interrupted))  # the line above says what was written, also with -q
    if not quiet:  # the summary goes to stdout, like solve's, import's and export's; progress stays on stderr
        click.echo(f"wrote {output}: {_summary(t, moe_idx, read)}{f' ({resumed})' if resumed else ''}")


# meta a resumed run may differ in from its partial trace: what was read so far, and the resume's own record
_RESUME_FREE = ("corpus", "data", "data_bytes", "interrupted", "resumed", "format")
# fields an older partial trace may lack (added since): not checked when absent
_RESUME_NEWER = ("batch_size", "data_bytes", "router_sha256")
_OPTION = {"model": "--model", "tokenizer": "--tokenizer", "seq_len": "--seq-len", "batch_size": "--batch-size",
           "dtype": "--dtype", "device": "--device"}


def _load_partial(resume: Path, files: list[Path], seq_len: int | None, batch_size: int,
                  max_tokens: int | None) -> Trace:
    """The trace --resume names, checked against what is known before the model loads (the data
    files by name and size, --seq-len when given, --batch-size, --max-tokens), one line otherwise."""
    from moeplace.trace.format import load_trace

    if resume.suffix.lower() != ".npz":
        raise MoeplaceError(f"--resume {resume}: not a trace `moeplace trace` wrote (.npz)")
    try:
        partial = load_trace(resume)
    except TraceError as e:
        raise TraceError(f"--resume {e}") from None
    name = f"--resume {resume}"
    source = partial.meta.get("source")
    if source != "moeplace trace":
        raise MoeplaceError(f"{name}: not a trace `moeplace trace` wrote (meta source {json.dumps(source)}): "
                            "only such a trace can be resumed")
    lacking = [key for key in ("token_ids", "sequence_ids", "positions") if getattr(partial, key) is None]
    if lacking:  # its source says `moeplace trace`, but an edit or a tool dropped what resuming reads
        raise MoeplaceError(f"{name}: has no {' or '.join(lacking)}, which every `moeplace trace` output holds and "
                            "resuming needs (to skip the text already traced): trace anew")
    early = {"batch_size": batch_size, **({"seq_len": seq_len} if seq_len is not None else {})}
    if problem := _resume_difference(partial.meta, early, only=tuple(early)):
        raise MoeplaceError(f"{name}: {problem}")
    if max_tokens is not None and max_tokens < partial.num_tokens:
        raise MoeplaceError(f"{name}: holds {partial.num_tokens} tokens, more than --max-tokens {max_tokens} "
                            "(which counts the whole trace, the partial one included)")
    read, sizes = partial.meta.get("data"), partial.meta.get("data_bytes")
    if not isinstance(read, list):
        raise MoeplaceError(f"{name}: its meta lists no data files (meta.data)")
    for i, recorded in enumerate(read):
        now = next((f for f in files if str(f) == recorded or same_file(f, Path(str(recorded)))), None)
        if now is None:
            raise MoeplaceError(f"{name}: it read {recorded}, which this run's --data does not give")
        if isinstance(sizes, list) and i < len(sizes) and now.stat().st_size != sizes[i]:
            raise MoeplaceError(f"{name}: {recorded} held {sizes[i]} bytes when traced, {now} holds "
                                f"{now.stat().st_size} now")
    return partial


def _resume_difference(old: dict[str, Any], new: dict[str, Any], only: tuple[str, ...] = ()) -> str | None:
    """The first field (in `new`'s order, then `old`'s) where a partial trace's meta and this run's
    differ, as one phrase; None when they agree. `only`: compare those fields alone."""
    keys = list(only) or [*new, *(k for k in old if k not in new)]
    for key in keys:
        if key in _RESUME_FREE or (key in _RESUME_NEWER and key not in old):
            continue
        was, now = old.get(key), new.get(key)
        if was == now or (key in ("model", "tokenizer") and same_directory(was, now)):
            continue
        if key == "router_sha256" and key in old and key in new:
            return (f"it was traced with router weights router_sha256 {json.dumps(was)}, --model's are "
                    f"{json.dumps(now)} now: the checkpoint was replaced or changed since; trace it anew")
        what = _OPTION.get(key, f"the model's {key}")
        return (f"it was traced with {what} {json.dumps(was)}, this run has {json.dumps(now)}"
                if key in old and key in new else
                f"{'its meta has no' if key not in old else 'this run has no'} {key}"
                f" ({json.dumps(now if key not in old else was)} {'here' if key not in old else 'there'})")
    return None


def _resumed(partial: Trace, new: Trace | None, meta: dict[str, Any], resume: Path) -> Trace:
    """The partial trace followed by the tokens traced since (None: none were), with this run's meta
    plus meta.resumed (the partial traces it went on from: file, sha256, tokens)."""
    import numpy as np

    from moeplace.trace.format import make_trace

    parts = [partial] if new is None else [partial, new]
    joined = {key: np.concatenate([getattr(p, key) for p in parts])
              for key in ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions")}
    meta = dict(meta)
    earlier = partial.meta.get("resumed")
    if new is not None:  # a trace nothing was added to was not resumed
        record = {"file": str(resume), "sha256": partial.sha256, "tokens": partial.num_tokens}
        meta["resumed"] = [*(earlier if isinstance(earlier, list) else []), record]
    elif isinstance(earlier, list):
        meta["resumed"] = earlier
    return make_trace(joined["topk_ids"], joined["topk_weights"], partial.num_experts, token_ids=joined["token_ids"],
                      sequence_ids=joined["sequence_ids"], positions=joined["positions"], meta=meta)


def _finish_complete(t: Trace, partial: Trace, output: Path, resume: Path, summary: str, quiet: bool) -> None:
    """A partial trace that already holds every window --data gives: left as it is when -o is that
    file and nothing in it would change, else written (meta.interrupted dropped)."""
    from moeplace.trace.format import save_trace

    said = f"{resume} already holds every window of --data: nothing left to trace"
    unchanged = {k: v for k, v in partial.meta.items() if k != "format"} == t.meta
    if same_file(output, resume) and unchanged:
        if not quiet:
            click.echo(f"{said}; {output} left as it is")
        return
    save_trace(t, output)
    if not quiet:
        click.echo(f"wrote {output}: {summary} ({said})")


def _stopped(signal_name: str) -> str:
    return "interrupted" if signal_name == "SIGINT" else f"terminated ({signal_name})"


def _exit_code(signal_name: str) -> int:
    import signal

    return 128 + int(signal.Signals[signal_name])  # the shell's code for a run a signal ended: 130, 143


def _summary(t: Any, moe_idx: list[int], read: list[Path]) -> str:
    return (f"{plural(t.num_tokens, 'token')} x {plural(t.num_layers, 'MoE layer')} x top-{t.top_k} "
            f"over {plural(t.num_experts, 'expert')}, decoder layer{'s' if len(moe_idx) != 1 else ''} {moe_idx}, "
            f"from {_files_read(read)}")


def _hidden_size(config: Any) -> int | None:
    """The width of the hidden states the routers see: `hidden_size` of the model's (text) config,
    as Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3 and GPT-OSS configs all name it; None if absent."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "hidden_size", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _files_read(read: list[Path]) -> str:
    """The files a trace read, by name, or their count when many (meta 'data' lists them all)."""
    return ", ".join(f.name for f in read) if len(read) <= 3 else f"{len(read)} files"


def _device(choice: str, torch: Any) -> Any:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MoeplaceError("--device cuda: no CUDA device available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _load_model(ref: str, dtype: str, device: Any, trust_remote_code: bool = False) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # moeplace reports its own progress
    local = _resolve(ref, "model", "config.json")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report: the problems are raised below, in one line
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            ref, dtype="auto" if dtype == "auto" else getattr(torch, dtype), local_files_only=local,
            output_loading_info=True, trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,  # else it raises, pointing at a report hidden above; refused below, by name
            weights_only=True,  # pickled weights (.bin) give tensors only, never arbitrary objects (its default, said)
        )
        model, info = loaded
    except Exception as e:  # corrupt files raise library-specific types (SafetensorError, ...)
        if isinstance(e, pickle.UnpicklingError):  # a .bin that needs more than tensors: never unpickled
            from moeplace.trace.importers import pickled_object
            raise MoeplaceError(f"cannot load model {ref!r}: refused: its pickled weights need unpickling of arbitrary "
                                f"Python objects{pickled_object(e)}; moeplace reads tensors only (weights_only=True): "
                                "convert them to safetensors") from None
        if local and _has_safetensors(Path(ref)):  # transformers' message may point at a report it did not print
            from moeplace.models.checkpoint import CheckpointError, moe_blocks, open_checkpoint
            try:
                moe_blocks(open_checkpoint(ref))
            except CheckpointError as reason:
                raise MoeplaceError(f"cannot load model: {reason}") from None
        raise MoeplaceError(f"cannot load model {ref!r}: {_first_line(e)}{_remote_code_advice(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers initialises missing or mis-shaped weights at random and carries on: routing
    # recorded from them would look real and be noise
    for key, what in (("missing_keys", "missing from the checkpoint"), ("mismatched_keys", "of the wrong shape")):
        bad = sorted((k,) if isinstance(k, str) else tuple(k) for k in info.get(key) or [])
        if bad:
            shapes = f" (checkpoint {list(bad[0][1])}, config.json makes {list(bad[0][2])})" if len(bad[0]) == 3 else ""
            raise MoeplaceError(f"cannot load model {ref!r}: {len(bad)} weight(s) {what}, e.g. {bad[0][0]}{shapes}")
    return model.to(device).eval()


def _has_safetensors(root: Path) -> bool:
    """Whether a model directory holds safetensors weights, which moeplace's own reader can check
    (a checkpoint of pickled .bin weights only is transformers' to read: it says what is wrong)."""
    from moeplace.models.checkpoint import INDEX_NAME

    return (root / INDEX_NAME).is_file() or any(root.glob("*.safetensors"))


def _check_config(ref: str, trust_remote_code: bool = False) -> None:
    """Refuse a local model directory whose config.json transformers cannot use, naming the file and
    what is wrong with it. Parses the JSON and builds the config object only: no weights are read."""
    if not Path(ref).is_dir():
        return  # a hub id: transformers fetches and reports on its own config
    path = Path(ref) / "config.json"
    if not path.is_file():
        raise MoeplaceError(f"{path}: no such file (a save_pretrained model directory holds one)")
    config = read_json(path, MoeplaceError)
    if not isinstance(config, dict):
        raise MoeplaceError(f"{path}: not a JSON object")
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    family = config.get("model_type")
    auto_map = config.get("auto_map")
    custom = isinstance(auto_map, dict) and "AutoConfig" in auto_map
    if custom and not (isinstance(family, str) and family in CONFIG_MAPPING):  # no built-in class to fall back on
        if not trust_remote_code:
            raise MoeplaceError(f"{path}: model_type {family!r} is defined by Python code in {ref} (auto_map), not by "
                                f"transformers {transformers.__version__}: pass --trust-remote-code to run that code "
                                "(only for a checkpoint you trust)")
        return  # its own config class: transformers builds it when the model loads
    if "model_type" in config and not isinstance(family, str):
        raise MoeplaceError(f"{path}: model_type {json.dumps(family)} is not a string naming a model family")
    if isinstance(family, str) and family not in CONFIG_MAPPING:
        near = difflib.get_close_matches(family, list(CONFIG_MAPPING.keys()), n=1, cutoff=0.8)
        hint = f"; did you mean {near[0]!r}?" if near else " (a newer transformers may know it)"
        raise MoeplaceError(f"{path}: model_type {family!r} is no model family transformers "
                            f"{transformers.__version__} knows{hint}")
    try:
        transformers.AutoConfig.from_pretrained(ref, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # a field of the wrong type or value: any error building the config is the file's
        if "model_type" not in config:  # (transformers 4 guessed the family from the path's name)
            raise MoeplaceError(f"{path} has no model_type (the transformers model family, e.g. 'mixtral')") from None
        raise MoeplaceError(f"{path}: transformers cannot build a config from it ({_first_line(e)})") from None
    for where, fields in ((f"{path}:", config), (f"{path}: text_config", config.get("text_config"))):
        if isinstance(fields, dict):
            for key in _SIZE_FIELDS:  # absent or null: the class default applies
                config_size(fields, where, key, default=1)


# Sizes transformers takes as they are (no sign check): -4 became torch's "negative dimension" in the load
_SIZE_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "num_local_experts",
                "num_experts", "num_experts_per_tok")


class _Held(logging.Handler):
    """Keeps log records instead of writing them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _warnings_held() -> Iterator[None]:
    """Hold back transformers' log lines and Python warnings while the block runs: shown, as they
    would have been, when it succeeds (a user may need them); dropped when it raises, since the
    error then says in one line what is wrong, and lines above it (a tokenizer falling back to
    another reader, a config field it cannot validate) only bury it."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger()  # the library's root logger: its handler writes to stderr
    handlers, held = list(logger.handlers), _Held()
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(held)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    finally:
        logger.removeHandler(held)
        for handler in handlers:
            logger.addHandler(handler)
    for record in held.records:  # reached only when the block succeeded
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


# what a Hugging Face tokenizer directory holds (one of them at least); serve.cli.load_tokenizer uses it too
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def _load_tokenizer(ref: str, given: bool, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `ref`; `given`: it came from --tokenizer (so do not advise passing it)."""
    from transformers import AutoTokenizer

    # without --tokenizer, `ref` is --model: a mistyped path is the model's problem, so say so
    local = _resolve(ref, "tokenizer" if given else "model", "tokenizer_config.json")
    advice = "; it is not a tokenizer directory" if given else "; pass --tokenizer PATH"
    if local and not any((Path(ref) / f).exists() for f in TOKENIZER_FILES):
        raise MoeplaceError(f"cannot load a tokenizer from {ref!r}: it holds none of {', '.join(TOKENIZER_FILES)}"
                            + advice)
    try:
        return AutoTokenizer.from_pretrained(ref, local_files_only=local, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if remote := _remote_code_advice(e):
            raise MoeplaceError(f"cannot load a tokenizer from {ref!r}{remote}") from None
        raise MoeplaceError(f"cannot load a tokenizer from {ref!r} ({_first_line(e)})"
                            + ("" if given else advice)) from None


def _remote_code_advice(e: BaseException) -> str:
    """What to do when transformers refused to run a checkpoint's own code (its message names
    trust_remote_code), else "": transformers' own text says to pass a Python argument."""
    if "trust_remote_code" not in str(e):
        return ""
    return (": it needs Python code shipped with the checkpoint (auto_map); pass --trust-remote-code to run it "
            "(only for a checkpoint you trust)")


def _resolve(ref: str, what: str, probe_file: str) -> bool:
    """True when `ref` is a local directory; for a hub id, fail fast when the hub is unreachable."""
    if Path(ref).is_dir():
        return True
    if Path(ref).exists():
        raise MoeplaceError(f"{what} {ref!r}: not a directory")
    if _is_path(ref) and not _cached(ref, probe_file):
        raise MoeplaceError(f"{what} {ref!r}: no such directory{_did_you_mean(ref)}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not _hub_reachable():
        if _cached(ref, probe_file):
            return True
        raise MoeplaceError(f"{what} {ref!r} is neither a local directory nor in the Hugging Face cache, "
                            f"and the hub is unreachable (offline); pass a save_pretrained directory")
    return False


def _is_path(ref: str) -> bool:
    """A reference that is no hub id (NAME or ORG/NAME, never starting with '.'), or whose ORG is
    a directory here (`models/mixtrl`, a typo): a path, refused at once, not probed on the hub."""
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep in ref.replace("/", ""):
        return True
    return "/" in ref and Path(ref.split("/")[0]).is_dir()


def _did_you_mean(ref: str) -> str:
    """'; did you mean PATH?' naming the closest directory beside where `ref` points, if any."""
    path = Path(ref).expanduser()
    try:
        near = [p.name for p in path.parent.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return ""
    match = difflib.get_close_matches(path.name, near, n=1)
    head = ref.rstrip("/")[: len(ref.rstrip("/")) - len(path.name)]  # as the user spelled it: './', '~/'
    return f"; did you mean {head + match[0]!r}?" if match and path.name else ""


def _cached(ref: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(ref, filename), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    """The first line of an error's message, or all of it joined when that line ends in ':' (it
    introduces the rest: "Validation error for field 'x':" alone says nothing)."""
    lines = (str(e).strip() or type(e).__name__).splitlines()
    line = " ".join(" ".join(lines).split()) if lines[0].rstrip().endswith(":") else lines[0]
    # a KeyError's text is the key alone ('weird'): name the kind of error with it
    return f"{type(e).__name__}: {line}" if isinstance(e, LookupError) else line

