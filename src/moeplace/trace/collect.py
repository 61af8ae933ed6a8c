"""Record what a transformers MoE model's own routers select, token by token.

A forward hook on each router found by `find_moe_layers` keeps the router's output
(topk_weights [T, k], topk_ids [T, k]): exactly the experts the block then runs, with the
family's routing (softmax or sigmoid, groups, correction bias, renormalisation, scaling)
applied by the model itself, never re-implemented here. Router logits [T, E] are dropped in
the hook, so memory per batch is O(T * L * k).

Per batch the rows are re-ordered highest weight first (DeepSeek's top-k is unsorted), padding
positions are dropped, and the result is spooled to an `.npz` part file; `collect` assembles the
parts into one Trace at the end (or at Ctrl-C, with whatever batches completed).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moeplace.errors import MoeplaceError
from moeplace.models.discovery import MoELayer
from moeplace.progress import Progress
from moeplace.trace.format import Trace, make_trace
from moeplace.trace.text import Batch


class RouterRecorder:
    """Forward hooks on every MoE router; `take()` returns and clears the routing of the last forward.

    Use as a context manager so the hooks are always removed.
    """

    def __init__(self, layers: list[MoELayer]) -> None:
        self.layers = layers
        self._ids: list[torch.Tensor | None] = [None] * len(layers)
        self._weights: list[torch.Tensor | None] = [None] * len(layers)
        self._handles: list[Any] = []

    def __enter__(self) -> "RouterRecorder":
        for layer in self.layers:
            self._handles.append(layer.router.register_forward_hook(self._hook(layer.moe_index)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, moe_index: int) -> Any:
        path = self.layers[moe_index].router_path

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) == 3 and not output[2].is_floating_point()):
                raise MoeplaceError(
                    f"router {path} ({type(module).__name__}) does not return (logits, topk_weights, topk_ids); "
                    f"this model's routing is not supported"
                )
            _, weights, ids = output
            self._ids[moe_index] = ids.detach().reshape(-1, ids.shape[-1])
            self._weights[moe_index] = weights.detach().reshape(-1, weights.shape[-1])

        return hook

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(topk_ids int64 [T, L, k], topk_weights float32 [T, L, k]) of the last forward,
        each row sorted by weight, highest first (ties keep the router's order)."""
        missing = [self.layers[i].router_path for i, t in enumerate(self._ids) if t is None]
        if missing:
            raise MoeplaceError(f"routers did not run in the forward pass: {', '.join(missing)}")
        ids = torch.stack(self._ids, dim=1).cpu()  # type: ignore[arg-type]
        weights = torch.stack(self._weights, dim=1).float().cpu()  # type: ignore[arg-type]
        order = torch.sort(weights, dim=-1, descending=True, stable=True).indices
        self._ids = [None] * len(self.layers)
        self._weights = [None] * len(self.layers)
        return ids.gather(-1, order).numpy().astype(np.int64), weights.gather(-1, order).numpy()


def router_fingerprint(layers: list[MoELayer]) -> str:
    """The first 16 hex digits of sha256 over every MoE router's tensors as loaded, in MoE-layer
    order: per router, each state_dict tensor (weight [E, hidden]; GPT-OSS's bias [E], DeepSeek-V3's
    e_score_correction_bias [E]) in name order, as the line "NAME DTYPE SHAPE" (e.g. "weight float32
    [8, 32]") and a newline, then its bytes. Identifies the routing weights, not the checkpoint:
    the dtype is in it (a bf16 load differs from fp32), the path is not (a copy hashes alike), and
    the other weights, which shape the hidden states the routers see, are not either."""
    h = hashlib.sha256()
    for layer in layers:
        state = layer.router.state_dict()
        for name in sorted(state):
            t = state[name].detach()
            h.update(f"{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}\n".encode())
            # the bytes themselves: bfloat16 has no numpy dtype, a uint8 view of any dtype does
            h.update(t.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()[:16]


@torch.inference_mode()
def route_batch(model: nn.Module, recorder: RouterRecorder, input_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` on input_ids [B, S]; (topk_ids [B*S, L, k], topk_weights [B*S, L, k]), row-major."""
    model(input_ids=input_ids, use_cache=False)
    return recorder.take()


@dataclass
class Collected:
    trace: Trace | None  # None when no batch completed
    interrupted: str = ""  # "SIGINT" (Ctrl-C) or "SIGTERM" stopped the run: `trace` holds the completed batches
    num_batches: int = 0
    seconds: float = 0.0


def collect(
    model: nn.Module,
    layers: list[MoELayer],
    batches: Iterable[Batch],
    *,
    device: torch.device,
    meta: dict[str, Any],
    spool_dir: str | Path | None = None,
    max_tokens: int | None = None,
    share: Callable[[int], float] | None = None,
    progress: bool = False,
    done_before: int = 0,
) -> Collected:
    """Route every batch through `model`; return the trace of all completed batches.

    Progress shows the share done: of `max_tokens`, or of the input by `share(tokens routed)`
    (0..1, e.g. `InputShare.at`), whichever is further; neither given, no share. `done_before`:
    tokens a partial trace already holds (`trace --resume`), counted in the share, not the rate.

    Ctrl-C or SIGTERM (`kill`, Slurm preemption, a cancelled CI job) stops between or inside a
    batch: the batches already spooled form the trace and `interrupted` names the signal (trace
    is None when no batch completed).
    """
    num_experts = layers[0].num_experts
    if any(m.num_experts != num_experts or m.top_k != layers[0].top_k for m in layers):
        raise MoeplaceError("MoE layers differ in num_experts or top_k; one trace needs them equal")
    bar = Progress("trace", total=1.0 if max_tokens or share else None, enabled=progress)
    start = time.monotonic()
    done_tokens = 0
    warm: tuple[int, float] | None = None  # (tokens, time) after the first batch, which pays the warm-up
    interrupted = ""
    parts: list[Path] = []
    with _spool(spool_dir) as spool, RouterRecorder(layers) as recorder, _sigterm_stops():
        try:
            for n, batch in enumerate(batches):
                ids, weights = route_batch(model, recorder, torch.from_numpy(batch.input_ids).to(device))
                keep = batch.valid_mask().reshape(-1)
                part = spool / f"{n:06d}.npz"
                np.savez(part, ids=ids[keep].astype(np.int32), weights=weights[keep], tokens=_token_columns(batch))
                parts.append(part)  # only complete parts: Ctrl-C inside savez leaves this one out
                done_tokens += batch.num_tokens
                now = time.monotonic()
                since = warm or (0, start)  # from the second batch on, the rate leaves the warm-up out
                rate = (done_tokens - since[0]) / max(now - since[1], 1e-9)
                warm = warm or (done_tokens, now)
                total = done_before + done_tokens
                done = max(total / max_tokens if max_tokens else 0.0, share(total) if share else 0.0)
                bar.update(done, f"{total} tokens, {rate:,.0f} tokens/s")
        except KeyboardInterrupt:
            interrupted = "SIGINT"
        except _Terminated:
            interrupted = "SIGTERM"
        seconds = time.monotonic() - start
        # Progress adds the elapsed time; with no batch done the run failed: no "done" line
        bar.close(f"{done_before + done_tokens} tokens" + (" (interrupted)" if interrupted else "") if parts else "")
        trace = _assemble(parts, num_experts, meta) if parts else None
    return Collected(trace, interrupted, len(parts), seconds)


class InputShare:
    """How far through the input text files the first N tokens reach, as a share of the files' total size.

    The tokenizer sees the text in order, a piece at a time: `tokenized` marks (tokens so far,
    bytes so far) after each piece, and `at` interpolates between the marks, so the share moves
    within a piece too (a .txt block is ~256K characters: tens of thousands of tokens). Bytes are
    the UTF-8 size of the text tokenised: a .txt file's own size, bar CRs of CRLF line ends; a
    .jsonl file's text fields leave its JSON syntax out, so the share lags there and catches up
    when the next file starts or the input ends (`files` marks both).
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self._starts = list(itertools.accumulate(sizes, initial=0))  # byte offset of each file in the input
        self.total = self._starts[-1]
        self._file = 0
        self._tokens = 0
        self._bytes = 0
        self._marks: deque[tuple[int, int]] = deque([(0, 0)])  # (tokens, bytes) where each piece ends, in order

    def files(self, files: Sequence[Path]) -> list[Path]:
        """`files`, as a list whose iteration marks where each file starts (iter_windows walks it once)."""
        return _Walked(files, self._reach)

    def _reach(self, i: int) -> None:
        """File i starts (i = the number of files: the input is all read)."""
        self._file, self._bytes = i, self._starts[i]  # all before it is read, whatever its JSON syntax
        self._marks.append((self._tokens, self._bytes))

    def tokenized(self, text: str, num_tokens: int) -> None:
        """The tokenizer turned the next `text` of the input into `num_tokens` tokens."""
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        self._tokens += num_tokens
        self._bytes = min(self._bytes + size, self._starts[self._file + 1])  # a file grown since: no share past it
        self._marks.append((self._tokens, self._bytes))

    def at(self, tokens: int) -> float:
        """The share (0..1) of the input read to make the first `tokens` tokens; asked for rising counts."""
        marks = self._marks
        while len(marks) > 1 and marks[1][0] <= tokens:  # marks behind `tokens` are no longer needed
            marks.popleft()
        t0, b0 = marks[0]
        if not self.total:
            return 0.0
        if len(marks) == 1:
            return b0 / self.total
        t1, b1 = marks[1]
        return (b0 + (b1 - b0) * (tokens - t0) / (t1 - t0)) / self.total


class _Walked(list[Path]):
    """A list of files that calls `reach(i)` as an iteration over it reaches file i, and
    `reach(len)` at its end."""

    def __init__(self, files: Iterable[Path], reach: Callable[[int], None]) -> None:
        super().__init__(files)
        self._reach = reach

    def __iter__(self) -> Iterator[Path]:
        i = -1
        for i, f in enumerate(super().__iter__()):
            self._reach(i)
            yield f
        self._reach(i + 1)


class _Terminated(Exception):
    """SIGTERM while batches are routed: stop as Ctrl-C does."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While batches are routed, SIGTERM stops the run with the batches done kept (as Ctrl-C);
    outside, the CLI's handler unwinds and writes nothing. Signal handlers live in the main
    thread only: elsewhere SIGTERM is left as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _token_columns(batch: Batch) -> np.ndarray:
    """int64 [T_real, 3]: token id, sequence id, position of each real token, row-major."""
    mask = batch.valid_mask()
    positions = np.broadcast_to(np.arange(batch.input_ids.shape[1])[None, :], mask.shape)
    seq = np.broadcast_to(batch.sequence_ids[:, None], mask.shape)
    return np.stack([batch.input_ids[mask], seq[mask], positions[mask]], axis=1)


def _assemble(parts: list[Path], num_experts: int, meta: dict[str, Any]) -> Trace:
    loaded = []
    for p in parts:
        with np.load(p) as z:
            loaded.append({key: z[key] for key in z.files})
    ids, weights, cols = (np.concatenate([z[key] for z in loaded]) for key in ("ids", "weights", "tokens"))
    return make_trace(ids, weights, num_experts, token_ids=cols[:, 0], sequence_ids=cols[:, 1],
                      positions=cols[:, 2], meta=meta)


@contextlib.contextmanager
def _spool(spool_dir: str | Path | None) -> Iterator[Path]:
    """A temp directory for per-batch parts, removed afterwards (even on Ctrl-C)."""
    if spool_dir is not None:
        Path(spool_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".moeplace-trace-", dir=spool_dir) as d:
        yield Path(d)
