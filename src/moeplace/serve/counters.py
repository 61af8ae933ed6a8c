"""Communication counters: collectives issued, rows (tokens) and bytes sent to other ranks.

Kinds of collective:
    dispatch   Alltoall of token rows to the ranks of their experts           (per MoE layer)
    combine    Alltoall of expert partial sums back to one rank per token     (per MoE layer, k > 1
               or standard mode)
    counts     Alltoall of the N row counts that precede a dispatch or KV sync (receivers cannot
               know them); tiny, reported apart from the payload bytes
    kv_sync    Alltoall replicating each step's new K/V entries on every rank (context-coherent)
    tokens     all-reduce of the step's sampled token ids (every rank learns every sequence's state)
    routing    all-reduce of a MoE layer's routing table, only for layers with replicated experts
               (every rank picks the same copies, replicas.py)

Each rank counts what it sends to other ranks (never to itself); `merge` sums ranks. Collective
counts are the same on every rank (they are collectives), so merged counts take one rank's.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

KINDS = ("dispatch", "combine", "counts", "kv_sync", "tokens", "routing")
PAYLOAD = ("dispatch", "combine")  # the Alltoalls whose bytes the placement decides


@dataclass
class Counters:
    num_moe_layers: int
    phase: str = "decode"
    # (phase, kind) -> [collectives, rows, bytes]; (phase, kind, moe layer) -> [collectives, rows, bytes]
    totals: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))
    per_layer: dict[tuple[str, str, int], list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0, 0]))
    steps: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # tokens processed per phase

    def record(self, kind: str, rows: int, nbytes: int, layer: int | None = None) -> None:
        """One collective of `kind` that sent `rows` rows / `nbytes` bytes to other ranks."""
        for key, table in (((self.phase, kind), self.totals), ((self.phase, kind, layer), self.per_layer)):
            if table is self.per_layer and layer is None:
                continue
            entry = table[key]  # type: ignore[index]
            entry[0] += 1
            entry[1] += rows
            entry[2] += nbytes

    def as_vector(self) -> list[int]:
        """Flat int vector (fixed layout) so ranks can sum counters with one all-reduce."""
        out: list[int] = []
        for phase in ("prefill", "decode"):
            for kind in KINDS:
                out += self.totals.get((phase, kind), [0, 0, 0])
                for layer in range(self.num_moe_layers):
                    out += self.per_layer.get((phase, kind, layer), [0, 0, 0])
            out += [self.steps.get(phase, 0), self.tokens.get(phase, 0)]
        return out

    @classmethod
    def from_vector(cls, num_moe_layers: int, vec: list[int], world: int) -> "Counters":
        """Inverse of as_vector on a rank-summed vector: collectives and steps divided by `world`."""
        c = cls(num_moe_layers)
        it = iter(vec)
        for phase in ("prefill", "decode"):
            for kind in KINDS:
                n, rows, nbytes = next(it), next(it), next(it)
                if n:
                    c.totals[(phase, kind)] = [n // world, rows, nbytes]
                for layer in range(num_moe_layers):
                    n, rows, nbytes = next(it), next(it), next(it)
                    if n:
                        c.per_layer[(phase, kind, layer)] = [n // world, rows, nbytes]
            c.steps[phase] = next(it) // world
            c.tokens[phase] = next(it) // world
        return c

    def summary(self, phase: str = "decode", per_token: bool = False) -> dict[str, Any]:
        """Totals of one phase; with `per_token`, also bytes per token the phase processed.

        Per token means per token routed in that phase (`tokens_processed`): in decode, each
        sequence's last generated token is never fed back, so 2 prompts x 16 new tokens decode
        30 tokens, not 32. That is the denominator `moeplace eval` uses for the routing trace
        (`--routing-out`) of the same run, so the two per-token figures agree.
        """
        steps = max(self.steps.get(phase, 0), 1)
        out: dict[str, Any] = {"phase": phase, "steps": self.steps.get(phase, 0),
                               "tokens_processed": self.tokens.get(phase, 0)}
        for kind in KINDS:
            n, rows, nbytes = self.totals.get((phase, kind), [0, 0, 0])
            out[kind] = {"collectives": n, "rows": rows, "bytes": nbytes}
        payload = sum(self.totals.get((phase, k), [0, 0, 0])[2] for k in PAYLOAD)
        out["alltoall_bytes"] = payload
        out["alltoalls_per_layer_step"] = sum(self.totals.get((phase, k), [0, 0, 0])[0] for k in PAYLOAD) / (
            steps * max(self.num_moe_layers, 1))
        out["collectives_per_step"] = sum(self.totals.get((phase, k), [0, 0, 0])[0] for k in KINDS) / steps
        out["alltoall_bytes_per_step"] = payload / steps
        out["cross_rank_rows_per_layer"] = [
            sum(self.per_layer.get((phase, k, m), [0, 0, 0])[1] for k in PAYLOAD) for m in range(self.num_moe_layers)
        ]
        if per_token and (tokens := self.tokens.get(phase, 0)):
            out["alltoall_bytes_per_token"] = payload / tokens
            out["all_bytes_per_token"] = sum(self.totals.get((phase, k), [0, 0, 0])[2] for k in KINDS) / tokens
        return out
