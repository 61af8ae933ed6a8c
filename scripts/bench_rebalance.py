"""Rebalancing with a move limit on the real Mixtral-8x7B loads (issue 5's load-only ground).

CURRENT = the balance solve of subject A's loads (8 GPUs, 8 redundant experts); the traffic then
becomes subject B's. Rebalanced for B with `--max-moves N` (balance_moves_placement) for several
N, beside the plain balance solve of B and DeepSeek's EPLB run from scratch on B, whose moves are
counted after the renaming that keeps the most copies in place. A move: an (expert, GPU) copy
the layer's CURRENT does not hold.

    python scripts/bench_rebalance.py international_law high_school_mathematics --time-limit 30
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moeplace.solve import eplb
from moeplace.solve.balance import balance_moves_placement, balance_placement, copy_moves, expected_gpu_loads
from moeplace.solve.migrate import best_copy_relabeling

DATA = Path(__file__).resolve().parents[1] / "../shared/data/mixtral-8x7b-expert-loads/mixtral_8x7b_instruct"


def subject_loads(subject: str) -> np.ndarray:
    """float [32, 8]: top-2 selections of each expert per layer."""
    return np.array(json.loads((DATA / f"expert_popularity_{subject}.json").read_text())["expert_popularity"], float)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("current_subject")
    ap.add_argument("new_subject")
    ap.add_argument("--time-limit", type=float, default=30.0, help="seconds per solve")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--redundant", type=int, default=8)
    args = ap.parse_args()
    a, b = subject_loads(args.current_subject), subject_loads(args.new_subject)
    gpus, redundant, limit = args.gpus, args.redundant, args.time_limit
    current = balance_placement(a, gpus, gpus, redundant, limit)
    held = [current.holders(layer) for layer in range(a.shape[0])]
    mean = b.sum(1) / gpus
    print(f"CURRENT as is on {args.new_subject}: imbalance {(expected_gpu_loads(current, b).max(1) / mean).mean():.4f}")
    plain = None
    for n in (0, 1, 2, 4, None):
        p = balance_moves_placement(b, gpus, gpus, redundant, limit, None, current, 10**6 if n is None else n)
        moved = p.objective["max_moves"]
        plain = moved["plain"]
        print(f"--max-moves {'unlimited' if n is None else n}: imbalance {p.objective['value']:.4f}, moves per layer "
              f"{np.mean(moved['moved_per_layer']):.2f} (max {max(moved['moved_per_layer'])}), bound {p.bound:.4f}, "
              f"{p.solver['seconds']:.1f} s, cut: {p.solver['cut_steps'] or 'none'}")
    assert plain is not None
    print(f"plain balance solve: imbalance {plain['value']:.4f}, moves per layer {np.mean(plain['moved_per_layer']):.2f}")
    e, own = eplb.eplb_placement(b, gpus, gpus, redundant)
    new = [e.holders(layer) for layer in range(b.shape[0])]
    rename = best_copy_relabeling(new, held, gpus, gpus)
    moves = [copy_moves([[int(rename[g]) for g in copies] for copies in new[layer]], held[layer])
             for layer in range(b.shape[0])]
    served = (expected_gpu_loads(e, b).max(1) / mean).mean()
    print(f"EPLB from scratch ({e.solver['name']}): imbalance {served:.4f} served as moeplace serves, "
          f"{(own.max(1) / mean).mean():.4f} under its own model; moves per layer {np.mean(moves):.2f} (max {max(moves)})")


if __name__ == "__main__":
    main()
