#!/usr/bin/env python
"""Benchmark the serve runtime's attention: time and peak RSS of Runtime.generate by prompt length.

One rank, standard mode, CPU float32, 1 thread, 4 prompts of P tokens each, N new tokens
(ignore EOS). Each case runs in its own process, so each peak RSS is that case's. The model is
a copy of --model whose config allows 2048 positions (weights symlinked): tiny-moe has 512.

    python scripts/bench_attention.py --model checkpoints/tiny-moe --prompt-len 128 512 1024 --new 16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_case(model: str, prompt_len: int, new: int) -> dict[str, float]:
    import torch

    from moeplace.serve.engine import build_runtime

    torch.set_num_threads(1)
    rt = build_runtime(model, None, "standard", 60.0, device="cpu")
    prompts = [[(7 * i + j) % 200 + 1 for j in range(prompt_len)] for i in range(4)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    result = rt.generate(prompts, [new] * 4, ignore_eos=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"prompt_len": prompt_len, "new": new, "seconds": seconds, "decode_seconds": result.seconds,
            "peak_rss_mb": peak, "rss_before_mb": before, "token_sum": sum(map(sum, result.tokens))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="checkpoints/tiny-moe")
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--case", nargs=3, help=argparse.SUPPRESS)  # MODEL P N: one case, in this process
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), int(args.case[2]))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        model.mkdir()
        for f in Path(args.model).resolve().iterdir():
            (model / f.name).symlink_to(f)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").unlink()
        (model / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 2048}))
        print("| prompt tokens (x4) | new | total s | decode s | peak RSS MB | token sum |")
        print("|---|---|---|---|---|---|")
        for p in args.prompt_len:
            out = subprocess.run([sys.executable, __file__, "--case", str(model), str(p), str(args.new)],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {p} | {args.new} | {r['seconds']:.2f} | {r['decode_seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['token_sum']} |", flush=True)


if __name__ == "__main__":
    main()
