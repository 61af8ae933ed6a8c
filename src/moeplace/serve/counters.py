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

Expert load: each rank also counts the token-expert choices its own experts ran, per MoE layer
(`record_served`; a token with two of its k experts on a rank counts 2 there, as eval's
`gpu_loads` does). That is what a placement trades against traffic. The count stays on the
rank's device until `as_vector` (no host sync per layer) and rides in the all-reduce that
already merges the other counters: 2 x layers x world more integers per request, no collective.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

KINDS = ("dispatch", "combine", "counts", "kv_sync", "tokens", "routing", "logprobs")
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
    # phase -> choices this rank's experts ran per MoE layer [L]: a device tensor (or ints) until as_vector
    served: dict[str, Any] = field(default_factory=dict)
    # merged only (from_vector): phase -> [layer][rank] choices each rank's experts ran
    rank_loads: dict[str, list[list[int]]] = field(default_factory=dict)

    def record(self, kind: str, rows: int, nbytes: int, layer: int | None = None) -> None:
        """One collective of `kind` that sent `rows` rows / `nbytes` bytes to other ranks."""
        for key, table in (((self.phase, kind), self.totals), ((self.phase, kind, layer), self.per_layer)):
            if table is self.per_layer and layer is None:
                continue
            entry = table[key]  # type: ignore[index]
            entry[0] += 1
            entry[1] += rows
            entry[2] += nbytes

    def record_served(self, layer: int, choices: Any) -> None:
        """This rank's experts ran `choices` token-expert choices at MoE `layer` (an int, or a 0-d
        tensor that is added on its device: no host sync in the layer)."""
        acc = self.served.get(self.phase)
        if acc is None:
            acc = self.served[self.phase] = (choices.new_zeros(self.num_moe_layers) if hasattr(choices, "new_zeros")
                                             else [0] * self.num_moe_layers)
        acc[layer] += choices

    def as_vector(self, rank: int, world: int) -> list[int]:
        """Flat int vector (fixed layout) so ranks can sum counters with one all-reduce; this
        rank's expert load fills its own column of the [layer][rank] block, zeros elsewhere."""
        out: list[int] = []
        for phase in ("prefill", "decode"):
            for kind in KINDS:
                out += self.totals.get((phase, kind), [0, 0, 0])
                for layer in range(self.num_moe_layers):
                    out += self.per_layer.get((phase, kind, layer), [0, 0, 0])
            out += [self.steps.get(phase, 0), self.tokens.get(phase, 0)]
            served = self.served.get(phase, [0] * self.num_moe_layers)
            block = [0] * (self.num_moe_layers * world)
            # a device tensor: read once here, per request, not once per layer and step
            block[rank::world] = [int(x) for x in (served.tolist() if hasattr(served, "tolist") else served)]
            out += block
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
            c.rank_loads[phase] = [[next(it) for _ in range(world)] for _ in range(num_moe_layers)]
        if next(it, None) is not None:  # a layout mismatch must not pass as plausible figures
            raise ValueError("counter vector longer than its layout")
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
        if phase in self.rank_loads:  # merged counters: each rank's expert load (eval's gpu_loads)
            loads = self.rank_loads[phase]
            out["rank_expert_tokens_per_layer"] = loads
            out["rank_expert_tokens"] = [sum(col) for col in zip(*loads)]
            out["imbalance_per_layer"] = [max(row) / (sum(row) / len(row)) if sum(row) else 1.0 for row in loads]
        if per_token and (tokens := self.tokens.get(phase, 0)):
            out["alltoall_bytes_per_token"] = payload / tokens
            out["all_bytes_per_token"] = sum(self.totals.get((phase, k), [0, 0, 0])[2] for k in KINDS) / tokens
        return out
