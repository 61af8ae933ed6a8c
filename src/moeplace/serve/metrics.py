"""The HTTP server's counters (Stats: handler threads count refusals, rank 0's main thread its
batches) and their Prometheus text (metrics_text, GET /metrics; docs/runtime.md, "Counters and
metrics"). Apart from the server: the exposition is a format of its own, read and tested without
a socket.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from moeplace.serve.counters import KINDS


@dataclass
class Stats:
    """Server counters. Handler threads count rejections while rank 0's main thread records
    batches: both update under `lock`, and /metrics reads a `snapshot`, never a half-updated set."""

    generated_tokens: int = 0
    decode_seconds: float = 0.0
    last_tokens_per_s: float = 0.0
    requests: int = 0
    rejected: int = 0
    abandoned: int = 0  # requests whose client left before its answer (handler threads count them)
    counters: dict[str, Any] = field(default_factory=dict)  # replaced whole, never mutated
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def reject(self) -> None:
        with self.lock:
            self.rejected += 1

    def abandon(self) -> None:
        with self.lock:
            self.abandoned += 1

    def record_batch(self, requests: int, generated: int, seconds: float, counters: dict[str, Any]) -> None:
        with self.lock:
            self.requests += requests
            self.generated_tokens += generated
            self.decode_seconds += seconds
            self.last_tokens_per_s = generated / seconds if seconds > 0 else 0.0
            self.counters = counters

    def snapshot(self) -> Stats:
        """A consistent copy (with a lock of its own)."""
        with self.lock:
            return dataclasses.replace(self)


def label_value(value: Any) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped (a path may hold them)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(stats: Stats, mode: str, world: int, placement: dict[str, str | None]) -> str:
    """Prometheus text exposition of the server's counters: each metric family one contiguous
    group (HELP, TYPE, then its samples). `placement`: cli.placement_name's {placement, placement_sha256}."""
    c = stats.counters
    phases = [(phase, c[phase]) for phase in ("prefill", "decode") if phase in c]
    info = (f'mode="{mode}",world="{world}",placement="{label_value(placement["placement"])}",'
            f'placement_sha256="{label_value(placement["placement_sha256"] or "")}"')
    families: list[tuple[str, str, str, list[tuple[str, Any]]]] = [  # name, type, help, [(labels, value)]
        ("moeplace_info", "gauge", "Constant 1; the labels describe the server (placement_sha256: first 12 hex "
         "digits of the placement file's sha256, empty without --placement).", [(info, 1)]),
        ("moeplace_generated_tokens_total", "counter", "Tokens generated (a sequence ended early counts up "
         "to its last token kept).", [("", stats.generated_tokens)]),
        ("moeplace_tokens_per_second", "gauge", "Decode throughput of the last batch.",
         [("", f"{stats.last_tokens_per_s:.3f}")]),
        ("moeplace_decode_seconds_total", "counter", "Wall time of generation, summed over batches.",
         [("", f"{stats.decode_seconds:.6f}")]),
        ("moeplace_requests_total", "counter", "Requests served (completions and chat completions together).", [("", stats.requests)]),
        ("moeplace_rejected_requests_total", "counter",
         "Requests answered with an error (a 4xx or 5xx status).", [("", stats.rejected)]),
        ("moeplace_abandoned_requests_total", "counter", "Requests whose client left before their answer was "
         "complete: their sequences ended early (counted in moeplace_requests_total too), or, still queued, "
         "never ran.", [("", stats.abandoned)]),
        ("moeplace_collective_bytes_total", "counter", "Bytes sent to other ranks by kind of collective, "
         "summed over ranks.",
         [(f'phase="{phase}",kind="{kind}"', s[kind]["bytes"]) for phase, s in phases for kind in KINDS if kind in s]),
        ("moeplace_collectives_total", "counter", "Collectives issued by kind (the same count on every rank).",
         [(f'phase="{phase}",kind="{kind}"', s[kind]["collectives"])
          for phase, s in phases for kind in KINDS if kind in s]),
        ("moeplace_alltoall_bytes_total", "counter", "Bytes of the dispatch and combine Alltoalls (the traffic "
         "the placement decides), summed over ranks.",
         [(f'phase="{phase}"', s["alltoall_bytes"]) for phase, s in phases if "alltoall_bytes" in s]),
        ("moeplace_cross_rank_tokens_total", "counter", "Token rows sent to another rank by the dispatch and "
         "combine Alltoalls, per MoE layer.",
         [(f'phase="{phase}",layer="{layer}"', rows) for phase, s in phases
          for layer, rows in enumerate(s.get("cross_rank_rows_per_layer", []))]),
        ("moeplace_expert_tokens_total", "counter", "Token-expert choices each rank's experts ran, summed over "
         "MoE layers (the load the placement balances; a token with two experts on a rank counts 2).",
         [(f'phase="{phase}",rank="{rank}"', n) for phase, s in phases
          for rank, n in enumerate(s.get("rank_expert_tokens", []))]),
    ]
    lines = []
    for name, metric_type, help_text, samples in families:
        if not samples:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {metric_type}"]
        lines += [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"
