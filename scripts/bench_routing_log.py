"""Host memory and write time of `moeplace serve --routing-out` (rank 0's RoutingLog), per decode
token held, on batches of DeepSeek-V3's routing shape (58 MoE layers, top-8 of 256 experts).

No model runs: each batch is what Runtime.generate returns with record_routing (the gathered
routing rows [rows, 3 + k] int64 and their gate weights [rows, k] float32), built with numpy,
fed to RoutingLog.add as serve_forever feeds it. Memory is tracemalloc's count of what the log
holds after the batches (the batches themselves are dropped), so it is what a long-running server
keeps on rank 0's host; the write is one atomic save of the held tokens.

    python scripts/bench_routing_log.py                     # keep first and last, 8 batches of 2,048
    python scripts/bench_routing_log.py --batches 20 --window 10000
    python scripts/bench_routing_log.py --prefill           # serve --routing-prefill: prompts' rows too
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from moeplace.serve.engine import Request, RoutingLog
from moeplace.serve.generate import Result


def fake_batch(rng: np.random.Generator, sequences: int, new_tokens: int, layers: int, k: int, experts: int,
               prompt: int = 16, prefill: bool = False) -> tuple[Request, Result]:
    """A batch of `sequences` prompts of `prompt` tokens, each decoding `new_tokens` (so
    new_tokens - 1 decode steps are routed; with prefill, the prompt's positions too), rows sorted
    (slot, position, layer) as the gather sorts them."""
    steps = new_tokens - 1
    first = 0 if prefill else prompt
    slot, position, moe = np.meshgrid(np.arange(sequences), first + np.arange(prompt + steps - first),
                                      np.arange(layers), indexing="ij")
    ids = np.argsort(rng.random((slot.size, experts)), axis=1)[:, :k]  # distinct ids per row
    rows = np.column_stack([slot.ravel(), position.ravel(), moe.ravel(), ids]).astype(np.int64)
    weights = np.sort(rng.random((slot.size, k), dtype=np.float32), axis=1)[:, ::-1].copy()
    req = Request([[7] * prompt for _ in range(sequences)], [new_tokens] * sequences, record_routing=True)
    tokens = [list(range(new_tokens)) for _ in range(sequences)]
    return req, Result(tokens=tokens, seconds=0.0, routing=rows, routing_weights=weights)


def measure(keep: str, window: int, batches: int, sequences: int, new_tokens: int, layers: int, k: int,
            experts: int, out: Path, prefill: bool = False) -> tuple[int, float, float]:
    """(tokens held, bytes held per token, seconds of the final write) for one RoutingLog."""
    spec = SimpleNamespace(num_experts=experts, moe_layers=list(range(1, layers + 1)), path="deepseek-v3-shape")
    rt = SimpleNamespace(model=SimpleNamespace(spec=spec), comm=SimpleNamespace(world=8))
    rng = np.random.default_rng(0)
    gc.collect()
    tracemalloc.start()
    log = RoutingLog(str(out), rt, max_tokens=window, every_s=1e9, keep=keep, prefill=prefill)  # type: ignore[arg-type]
    for _ in range(batches):
        req, result = fake_batch(rng, sequences, new_tokens, layers, k, experts, prefill=prefill)
        log.add(req, result)
        del req, result
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    start = time.perf_counter()
    log.close()
    return log.tokens, held / max(log.tokens, 1), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=64, help="sequences per batch")
    parser.add_argument("--new-tokens", type=int, default=33, help="tokens each sequence decodes (32 routed steps)")
    parser.add_argument("--window", type=int, default=6000, help="--routing-max-tokens")
    parser.add_argument("--prefill", action="store_true",
                        help="serve --routing-prefill: each sequence's 16 prompt tokens are recorded too")
    args = parser.parse_args()
    layers, k, experts = 58, 8, 256
    per_batch = args.sequences * (args.new_tokens - 1 + 16 * args.prefill)
    # int16 ids + float32 weights; sequence, position, token int64; with prefill an int32 prompt length
    own = layers * k * (2 + 4) + 3 * 8 + 4 * args.prefill
    kind = "prompt and decode" if args.prefill else "decode"
    print(f"DeepSeek-V3 routing shape: {layers} MoE layers x top-{k} of {experts}; {args.batches} batches of "
          f"{per_batch} {kind} tokens; --routing-max-tokens {args.window}; a token's own arrays ~{own} B")
    print(f"{'keep':>6} {'tokens held':>12} {'bytes/token held':>17} {'final write s':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for keep in ("first", "last"):
            tokens, per_token, seconds = measure(keep, args.window, args.batches, args.sequences, args.new_tokens,
                                                 layers, k, experts, Path(tmp) / f"{keep}.npz", args.prefill)
            print(f"{keep:>6} {tokens:>12,} {per_token:>17,.0f} {seconds:>14.2f}")


if __name__ == "__main__":
    main()
