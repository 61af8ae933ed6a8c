#!/usr/bin/env python
"""Throughput and peak memory of `moeplace trace` as the token count grows.

    nice python scripts/bench_trace.py --model checkpoints/tiny-moe --tokens 10000 50000 200000

Runs `moeplace trace` in a fresh process per size (ascending) on ../shared/data/text and prints
tokens, wall seconds, tokens/s (from the wall time, model loading included) and the child's
peak RSS. Routing is spooled to disk per batch, so peak RSS should grow only by the final trace
arrays (~T x L x k x 12 bytes), not with router logits or activations of earlier batches.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "checkpoints" / "tiny-moe"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "text"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[10000, 50000, 200000])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="passed to `moeplace trace --threads`")
    args = ap.parse_args()
    print(f"{'tokens':>8} {'wall s':>8} {'tokens/s':>9} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.tokens):
            cmd = [sys.executable, "-m", "moeplace", "trace", "--model", args.model, "--data", args.data,
                   "--max-tokens", str(n), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                   "--dtype", args.dtype, "-q", "-o", os.path.join(tmp, f"t{n}.npz")]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            start = time.monotonic()
            subprocess.run(cmd, check=True)
            wall = time.monotonic() - start
            # ru_maxrss is the largest over all runs so far (ascending sizes: growth shows)
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(f"{n:>8} {wall:>8.1f} {n / wall:>9,.0f} {rss:>13.0f}", flush=True)


if __name__ == "__main__":
    main()
