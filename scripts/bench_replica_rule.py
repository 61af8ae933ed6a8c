"""Host time of the replica rule (`eval.metrics.serve_layer`) per call, on decode-sized batches.

With replicas the runtime runs this rule once per replicated MoE layer and decode step, on every
rank, after the routing all-reduce (serve/replicas.py); eval's traffic prediction and the
replication search call it per batch and layer too. Shapes are SYNTHETIC: uniform random top-k
ids (no affinity), primaries round-robin, R extra copies of R distinct experts on random other
GPUs, tokens' current GPUs round-robin. Prints the best of `--repeats` timings per shape.

    python scripts/bench_replica_rule.py
    PYTHONPATH=/path/to/other/checkout/src python scripts/bench_replica_rule.py   # another version
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np

from moeplace.eval.metrics import serve_layer

# name: (experts, GPUs, GPUs per node, top-k, redundant experts per layer)
SHAPES = {
    "DeepSeek-V3 (256 experts, 64 GPUs in 8 nodes, top-8, R = 32)": (256, 64, 8, 8, 32),
    "FLAME (64 experts, 8 GPUs, top-6, R = 8)": (64, 8, 8, 6, 8),
}


def layer_copies(num_experts: int, num_gpus: int, redundant: int, rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]]]:
    """Primary GPU of each expert, int64 [E], and every expert's copies (primary first)."""
    primary = np.arange(num_experts) % num_gpus
    holders = [[int(g)] for g in primary]
    for expert in rng.choice(num_experts, min(redundant, num_experts), replace=False).tolist():
        others = [g for g in range(num_gpus) if g != primary[expert]]
        if others:
            holders[expert].append(int(rng.choice(others)))
    return primary, holders


def time_call(fn: Callable[[], object], repeats: int, calls: int) -> float:
    """Best over `repeats` of the mean seconds per call over `calls` calls."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 512, 4096], help="tokens per call (decode batch)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    print("| shape | tokens | us per call |\n|---|---|---|")
    for name, (experts, gpus, per_node, k, redundant) in SHAPES.items():
        primary, holders = layer_copies(experts, gpus, redundant, rng)
        for tokens in args.batch:
            ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)])
            home = np.arange(tokens) % gpus
            seconds = time_call(lambda: serve_layer(holders, ids, primary[ids], home, per_node, gpus),
                                args.repeats, max(3, 20_000 // tokens))
            print(f"| {name} | {tokens} | {seconds * 1e6:.0f} |")


if __name__ == "__main__":
    main()
