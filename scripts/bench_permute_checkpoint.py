"""Peak memory and throughput of `moeplace permute-checkpoint` on synthetic checkpoints.

Writes bf16-sized (2-byte) random checkpoints of the requested sizes, in per-expert (hub) and
fused layouts, sharded at --shard-gb, then runs the CLI in a child process and reports its peak
RSS (the child's VmHWM, Linux) and MB/s. Streaming means peak RSS stays flat as size grows.

    nice python scripts/bench_permute_checkpoint.py --sizes-gb 1 4 --workdir /tmp/bench_permute
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from moeplace.placement import Placement
from moeplace.solve.baselines import random_balanced

HIDDEN, INTER, EXPERTS, GPUS = 1024, 512, 64, 8
# The CLI in a child process that prints its own peak RSS (KiB) as the last stderr line. VmHWM,
# not getrusage: Linux carries ru_maxrss across exec, so it would count this parent's pages.
_CHILD = ("import re, sys; from pathlib import Path; from moeplace.cli import run; rc = run(sys.argv[1:]); "
          "print(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text())[1], file=sys.stderr); sys.exit(rc)")


def write_checkpoint(root: Path, size_gb: float, fused: bool, shard_gb: float) -> int:
    """MoE layers of EXPERTS experts (3 matrices each) until `size_gb`; returns the layer count."""
    root.mkdir(parents=True)
    layer_bytes = EXPERTS * 3 * HIDDEN * INTER * 2
    num_layers = max(1, int(size_gb * 2**30 // layer_bytes))
    rng = np.random.default_rng(0)
    weight_map, shard, shard_bytes, shard_id = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, shard_id
        name = f"model-{shard_id:05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, shard_bytes, shard_id = {}, 0, shard_id + 1

    for layer in range(num_layers):
        block = f"model.layers.{layer}.mlp"
        tensors = {f"{block}.gate.weight": rng.integers(0, 2**16, (EXPERTS, HIDDEN), dtype=np.uint16)}
        if fused:
            tensors[f"{block}.experts.gate_up_proj"] = rng.integers(0, 2**16, (EXPERTS, 2 * INTER, HIDDEN), dtype=np.uint16)
            tensors[f"{block}.experts.down_proj"] = rng.integers(0, 2**16, (EXPERTS, HIDDEN, INTER), dtype=np.uint16)
        else:
            for e in range(EXPERTS):
                for proj, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)), ("down_proj", (HIDDEN, INTER))):
                    tensors[f"{block}.experts.{e}.{proj}.weight"] = rng.integers(0, 2**16, shape, dtype=np.uint16)
        shard.update(tensors)
        shard_bytes += sum(t.nbytes for t in tensors.values())
        if shard_bytes >= shard_gb * 2**30:
            flush()
    if shard:
        flush()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"num_hidden_layers": num_layers}))
    return num_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 4.0])
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_permute"))
    args = ap.parse_args()
    print(f"{'layout':10} {'size GiB':>8} {'shards':>6} {'seconds':>8} {'MB/s':>7} {'peak RSS MiB':>12}")
    for fused in (False, True):
        for size in args.sizes_gb:
            shutil.rmtree(args.workdir, ignore_errors=True)
            src, out = args.workdir / "src", args.workdir / "out"
            num_layers = write_checkpoint(src, size, fused, args.shard_gb)
            placement = args.workdir / "placement.json"
            Placement(expert_to_gpu=random_balanced(num_layers, EXPERTS, GPUS, seed=0), num_gpus=GPUS,
                      gpus_per_node=GPUS).save(placement)
            nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _CHILD, "permute-checkpoint", str(src), str(placement),
                                   "-o", str(out), "--quiet"], check=True, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            peak_kib = int(done.stderr.strip().splitlines()[-1])
            print(f"{'fused' if fused else 'per-expert':10} {nbytes / 2**30:8.2f} {len(list(src.glob('*.safetensors'))):6d} "
                  f"{seconds:8.1f} {nbytes / 2**20 / seconds:7.0f} {peak_kib / 1024:12.0f}", flush=True)
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
