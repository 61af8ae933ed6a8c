"""Batched decoding over the expert-parallel ranks (SPMD: every rank runs this loop).

Sequences get slots 0..B-1; slot s is homed on rank s % world. Per call:

    prefill   standard path: each rank runs the prompts of its home slots (all positions at
              once); context-coherent mode then replicates the prompts' K/V on every rank
              (one kv_sync Alltoall)
    decode    one token per unfinished sequence per step; a token starts the step on the rank
              where its previous token ended (home in standard mode, the top-1 expert's rank of
              the last MoE layer in coherent mode); after the last layer:
                - tokens all-reduce: every rank learns every sequence's next token
                - coherent only: kv_sync Alltoall of the step's new K/V entries (all layers)

A forward's global batch (the rows of every rank, ordered by (slot, position)) numbers its rows
`first[slot] + position`; MoE layers with replicated experts choose copies on it (replicas.py).

Greedy argmax by default; a sequence with sampling parameters (sampling.py) draws its token on
the rank that holds its logits, and the same tokens all-reduce carries it, so sampling adds no
collective (the parameters travel with the request: engine.send_command). A sequence stops at its
max_new_tokens or at an EOS id (unless ignore_eos).

Penalties (presence, frequency, repetition: sampling.apply_penalties) need each sequence's
generated tokens, and the repetition penalty its prompt's: every rank keeps, for the sequences
that have a penalty only, an int32 [P, V] count of their generated tokens (updated each step from
the tokens all-reduce every rank runs anyway) and, when some has a repetition penalty, a bool
[P, V] mask of their prompt tokens, so whichever rank holds a sequence's logits penalises them
(greedy rows too: their token is the argmax of the penalised logits). A call in which no
sequence has a penalty allocates none of it and does no penalty work.

A logit bias (sampling.apply_logit_bias: OpenAI's `logit_bias`) is added to the raw logits
before the penalties, greedy rows' too: every rank keeps a float32 [Q, V] row of biases for the
Q sequences that have one (LogitBiases; the request's broadcast carries the biases, bit for bit),
built once per call; a call in which no sequence has a bias allocates none and does no bias work.

Log-probabilities (`generate(logprobs=N)`): the rank that holds a sequence's logits computes its
token's log-probability and the N largest (sampling.token_logprobs), and one more all-reduce per
step, kind "logprobs" ([B, 1 + 2N] float64, -inf where a rank has no row), gives them to every
rank; a call without logprobs issues none.

Streaming (rank 0 only): `generate(on_step=...)` calls back after each decode step with the
token every unfinished sequence just got (and its log-probabilities when asked for), already on
the host for the loop's own bookkeeping, so a caller that streams costs no extra collective or
device read; without it nothing is done.

Ending early (rank 0 only): on_step may return slots that must end now (a stop string completed,
a streaming client left). Rank 0 puts END in those slots of the next step's tokens all-reduce,
which the max lets win over any rank's token, so every rank learns it from the collective it
runs anyway: no extra collective, no extra byte. Every rank then marks those slots done and
drops the token they got at that step (not in tokens, logprobs or logits: the answer is what it
would have been had they decoded on, cut after the token rank 0 last saw). So a sequence asked to
end after step t computes one more step, t + 1, whose token is discarded; its recorded routing
(record_routing) keeps that step's rows, as it records what was computed: its last kept token
was fed to the model there (routing_arrays).

Recording routing (record_routing; serve --routing-out): each MoE layer call copies its rows'
(slot, position, layer, top-k ids, gate weights) to the host, and the call ends with one
all-gather of every rank's rows (_gather_routing). Decode steps are recorded; with
record_prefill the prefill's too, on the home rank that ran each prompt, so a sequence's rows
cover positions 0.. in order: its prompt, then each token a decode step ran.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from moeplace.errors import MoeplaceError
from moeplace.serve.coherent import moe_coherent
from moeplace.serve.dist import Comm, meta_scale, pack, unpack
from moeplace.serve.model import KVCache, RankModel
from moeplace.serve.replicas import ExpertMap
from moeplace.serve.sampling import (GREEDY, Sampling, apply_penalties, logit_bias_rows, read_logprobs, sample,
                                     token_logprobs)
from moeplace.serve.standard import moe_standard

MODES = ("coherent", "standard")
# a generated token's log-probability and the N likeliest tokens' [(id, log-probability)],
# highest first, under the raw model distribution (sampling.token_logprobs)
TokenLogprobs = tuple[float, list[tuple[int, float]]]
# after each decode step: [(slot, new token, finished, its TokenLogprobs or None when the call
# asked for none)] for every sequence that got a token, in slot order; returns the slots (of
# unfinished sequences; others are ignored) that must end now, or None: they end at the next
# step, whose token for them is dropped (module docstring, "Ending early"). Runs inside the
# decode loop, so it must be quick and must not raise (the other ranks would wait at the step's
# collectives until the timeout)
StepCallback = Callable[[list[tuple[int, int, bool, TokenLogprobs | None]]], Iterable[int] | None]
# a slot's value in the tokens all-reduce that ends it: above every token id, so the max keeps it
END = 1 << 62


@dataclass
class Result:
    tokens: list[list[int]]  # generated ids per prompt
    seconds: float  # wall time of decode (prefill excluded)
    logits: list[torch.Tensor] | None = None  # [steps, vocab] per prompt when collected
    # recorded routing (decode steps; prefill too with Runtime.record_prefill), gathered on every
    # rank: (slot, position, moe layer) -> top-k ids, sorted by (slot, position, moe layer)
    routing: np.ndarray | None = None  # int64 [rows, 3 + k]
    routing_weights: np.ndarray | None = None  # float32 [rows, k]: the gate weights of those ids, row for row
    logprobs: list[list[TokenLogprobs]] | None = None  # per prompt, per generated token, when asked for


def slot_rows(wanted: list[bool]) -> list[int]:
    """Per slot, its row in a table of the wanted slots only (in slot order), or -1."""
    rows, row = [-1] * len(wanted), 0
    for s, w in enumerate(wanted):
        if w:
            rows[s], row = row, row + 1
    return rows


def picked_rows(rows: list[int], slots: list[int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Of a step's logits rows (their sequences `slots`, host list, row for row), those whose
    sequence has a table row (`rows`: slot_rows'): (their positions in the logits, their table
    rows), int64 on `dev`; None when none of them has one."""
    picked = [i for i, s in enumerate(slots) if rows[s] >= 0]
    if not picked:
        return None
    return (torch.tensor(picked, dtype=torch.int64, device=dev),
            torch.tensor([rows[slots[i]] for i in picked], dtype=torch.int64, device=dev))


@dataclass
class LogitBiases:
    """This rank's logit bias rows of the sequences with a bias (sampling.apply_logit_bias) in one
    generate call."""

    rows: list[int]  # per slot: its row of `table`, or -1 for a sequence without a bias
    table: torch.Tensor  # float32 [Q, V]: the biases at their token ids, 0 elsewhere

    @classmethod
    def start(cls, params: list[Sampling], vocab: int, dev: torch.device) -> LogitBiases | None:
        """The bias rows of a call with these per-slot parameters, or None (nothing allocated)
        when no sequence has a bias."""
        if not any(p.biased for p in params):
            return None
        return cls(slot_rows([p.biased for p in params]), logit_bias_rows([p for p in params if p.biased], vocab, dev))

    def apply(self, logits: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """logits [n, V] of the sequences in `slots` (host list, row for row) with the biased ones'
        biases added (a float32 copy), or `logits` itself when none of them is here."""
        if (picked := picked_rows(self.rows, slots, logits.device)) is None:
            return logits
        at, rows = picked
        out = logits.to(torch.float32, copy=True)
        out[at] += self.table[rows]
        return out


@dataclass
class Penalties:
    """This rank's state of the sequences with a penalty (sampling.apply_penalties) in one
    generate call: their generated tokens' counts and, for repetition penalties, prompt tokens."""

    rows: list[int]  # per slot: its row of counts and prompt, or -1 for a sequence without penalties
    counts: torch.Tensor  # int32 [P, V]: how often each token was generated so far
    prompt: torch.Tensor | None  # bool [P, V]: the prompt's tokens; None when no repetition penalty

    @classmethod
    def start(cls, params: list[Sampling], prompts: list[list[int]], vocab: int,
              dev: torch.device) -> Penalties | None:
        """The state of a call with these per-slot parameters, or None (nothing allocated) when no
        sequence has a penalty."""
        slots = [s for s, p in enumerate(params) if p.penalised]
        if not slots:
            return None
        rows = slot_rows([p.penalised for p in params])
        prompt = None
        if any(params[s].repetition_penalty != 1 for s in slots):
            prompt = torch.zeros((len(slots), vocab), dtype=torch.bool, device=dev)
            at = torch.tensor([rows[s] for s in slots for _ in prompts[s]], dtype=torch.int64, device=dev)
            prompt[at, torch.tensor([t for s in slots for t in prompts[s]], dtype=torch.int64, device=dev)] = True
        return cls(rows, torch.zeros((len(slots), vocab), dtype=torch.int32, device=dev), prompt)

    def apply(self, logits: torch.Tensor, slots: list[int], params: list[Sampling]) -> torch.Tensor:
        """logits [n, V] of the sequences in `slots` (host list, row for row) with the penalised
        ones' rows penalised (a float32 copy), or `logits` itself when none of them is here."""
        if (picked := picked_rows(self.rows, slots, logits.device)) is None:
            return logits
        at, rows = picked
        out = logits.to(torch.float32, copy=True)
        out[at] = apply_penalties(out[at], self.counts[rows], None if self.prompt is None else self.prompt[rows],
                                  [params[s] for s in slots if self.rows[s] >= 0])  # the picked rows' (host)
        return out

    def count(self, slots: list[int], tokens: list[int]) -> None:
        """Slot s generated tokens[s], for each s in `slots` (the step's, as every rank learned them)."""
        pairs = [(self.rows[s], tokens[s]) for s in slots if self.rows[s] >= 0]
        if pairs:
            at = torch.tensor(pairs, dtype=torch.int64, device=self.counts.device)
            self.counts[at[:, 0], at[:, 1]] += 1  # one token per sequence per step: no repeated index


@dataclass
class Runtime:
    model: RankModel
    comm: Comm
    experts: ExpertMap  # which rank serves each token-expert choice
    mode: str = "coherent"
    record_routing: bool = False
    # with record_routing, the prefill's routing too (serve --routing-prefill): every prompt
    # token's, recorded on its home rank. Rank 0's travels to the others in each command (engine)
    record_prefill: bool = False
    _routing: list[torch.Tensor] = field(default_factory=list)  # int64 [n, 3 + k] per MoE layer call
    _routing_weights: list[torch.Tensor] = field(default_factory=list)  # int64 [n, k]: float32 bits

    def moe(self, moe: int, h: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
            batch: tuple[torch.Tensor, int], coherent: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights = self.model.route(moe, h)
        first, size = batch
        gpus = self.experts.serving(self.comm, moe, ids, first[slots] + positions, size)
        phase = self.comm.counters.phase
        if self.record_routing and (phase == "decode" or (phase == "prefill" and self.record_prefill)):
            # the gate weights ride along as their float32 bits: one host copy per call, one gather
            meta = torch.stack([slots, positions, torch.full_like(slots, moe)], dim=1)
            bits = weights.float().contiguous().view(torch.int32).long()
            row = torch.cat([meta, ids, bits], dim=1).cpu()
            self._routing.append(row[:, :-bits.shape[1]])
            self._routing_weights.append(row[:, -bits.shape[1]:])
        if coherent:
            return moe_coherent(self.model, self.comm, moe, h, slots, ids, weights, gpus)
        return moe_standard(self.model, self.comm, moe, h, slots, ids, weights, gpus), slots

    def forward(self, h: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor, positions: torch.Tensor,
                batch: tuple[torch.Tensor, int], cache: KVCache,
                coherent: bool, context: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """All decoder layers for the rows here. Returns (h, slots) of the rows that end here and
        the K/V rows this rank computed, [slot, position, layer | k | v] packed, for kv_sync.

        batch: (first [B], size): the global batch's row of (slot, position) is first[slot] + position.
        context: a decode step (one row per sequence: attention then needs no device sync), every
        position < context (a host-side bound: attention reads only that much of the cache).
        """
        spec = self.model.spec
        kv_rows = []
        for layer in range(spec.num_layers):
            h, k, v = self.model.attention(layer, h, slots, positions, cache, one_per_slot=context is not None,
                                           context=context)
            if coherent:
                meta = torch.stack([slots, positions, torch.full_like(slots, layer)], dim=1)
                kv_rows.append(pack(torch.cat([k.flatten(1), v.flatten(1)], dim=1), meta))
            if layer in spec.moe_layers:
                h, slots = self.moe(spec.moe_layers.index(layer), h, slots, positions, batch, coherent)
                positions = lengths[slots] if coherent else positions
            else:
                h = self.model.dense_mlp(layer, h)
        return h, slots, kv_rows

    def sync_kv(self, kv_rows: list[torch.Tensor], cache: KVCache) -> None:
        """Replicate this rank's new K/V entries on every rank and write the others' into the cache."""
        spec = self.model.spec
        width = 2 * spec.num_kv_heads * spec.head_dim
        rows = torch.cat(kv_rows) if kv_rows else cache.k.new_empty((0, width + 3 * meta_scale(cache.k.dtype)))
        got = self.comm.replicate(rows, "kv_sync")
        kv, meta = unpack(got, width, [(3, torch.int32)])
        meta = meta.long()
        k, v = kv.view(-1, 2, spec.num_kv_heads, spec.head_dim).unbind(1)
        for layer in range(spec.num_layers):
            sel = meta[:, 2] == layer
            cache.write(layer, meta[sel, 0], meta[sel, 1], k[sel], v[sel])

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: list[int], ignore_eos: bool = False,
                 collect_logits: bool = False, sampling: list[Sampling] | None = None,
                 on_step: StepCallback | None = None, logprobs: int | None = None) -> Result:
        """Continuation of every prompt (same arguments on every rank). sampling: per prompt, its
        draw, logit bias and penalties (a sequence's token may be chosen on any rank in coherent
        mode); None is greedy for all.
        on_step: rank 0's streaming hook (StepCallback; every rank learns every token, but only
        one should report them), which may end sequences early; other ranks pass None.
        logprobs: N >= 0 gives every generated token's log-probability and the N likeliest
        alternatives (Result.logprobs; one more collective per step); None: none, no collective."""
        model, comm, dev = self.model, self.comm, self.comm.device
        spec = model.spec
        coherent = self.mode == "coherent" and comm.world > 1
        num = len(prompts)
        if num == 0 or min(map(len, prompts)) == 0:
            raise ValueError("generate needs at least one prompt and no empty prompt")
        params = list(sampling) if sampling is not None else [GREEDY] * num
        if len(params) != num:
            raise ValueError(f"{len(params)} sampling parameters for {num} prompts")
        sampled = [not p.greedy for p in params]
        any_sampled = any(sampled)  # the same for the whole call: greedy batches skip the host work
        for i, (p, n) in enumerate(zip(prompts, max_new_tokens)):
            if len(p) + n > spec.max_positions:  # RoPE past the trained context: silent garbage
                raise MoeplaceError(f"prompt {i}: {len(p)} prompt tokens + {n} new exceed the model's "
                                    f"{spec.max_positions} positions")
        self._routing, self._routing_weights = [], []
        penalties = Penalties.start(params, prompts, spec.vocab_size, dev)  # None: no sequence has one
        biases = LogitBiases.start(params, spec.vocab_size, dev)  # None: no sequence has one
        cache = KVCache(spec, num, max(len(p) + n for p, n in zip(prompts, max_new_tokens)), dev, model.dtype,
                        stride=1 if coherent else comm.world)
        lengths = torch.tensor([len(p) for p in prompts], dtype=torch.int64, device=dev)
        budget = list(max_new_tokens)  # host-side bookkeeping: one device read per step
        generated: list[list[int]] = [[] for _ in range(num)]
        logprobs_out: list[list[TokenLogprobs]] = [[] for _ in range(num)]
        if logprobs is not None and not 0 <= logprobs <= spec.vocab_size:
            raise ValueError(f"logprobs must be None or in [0, {spec.vocab_size}], got {logprobs}")
        logits_out: list[list[torch.Tensor]] = [[] for _ in range(num)]
        eos = set() if ignore_eos else set(spec.eos_token_ids)

        # prefill: home slots, all prompt positions at once, standard path
        comm.counters.phase = "prefill"
        home = [s for s in range(num) if s % comm.world == comm.rank]
        slots = torch.tensor([s for s in home for _ in prompts[s]], dtype=torch.int64, device=dev)
        positions = torch.tensor([i for s in home for i in range(len(prompts[s]))], dtype=torch.int64, device=dev)
        ids = torch.tensor([t for s in home for t in prompts[s]], dtype=torch.int64, device=dev)
        prefill_batch = (torch.cumsum(lengths, 0) - lengths, int(lengths.sum()))  # every prompt position
        h, _, kv_rows = self.forward(model.embed_tokens(ids), slots, lengths, positions, prefill_batch, cache,
                                     coherent=False)
        if coherent:
            meta = torch.stack([slots, positions], dim=1)
            kv_rows = [pack(torch.cat([cache.k[layer, slots, :, positions].flatten(1),  # stride 1: row = slot
                                       cache.v[layer, slots, :, positions].flatten(1)], dim=1),
                            torch.cat([meta, torch.full_like(slots, layer)[:, None]], dim=1))
                       for layer in range(spec.num_layers)]
            self.sync_kv(kv_rows, cache)
        last = positions == lengths[slots] - 1
        here, h = slots[last], h[last]
        comm.counters.steps["prefill"] += 1
        comm.counters.tokens["prefill"] += int(lengths.sum())

        comm.counters.phase = "decode"
        done = [b <= 0 for b in budget]
        ending: list[int] = []  # slots on_step asked to end: END in the next tokens all-reduce
        longest = max(map(len, prompts))  # host-side bound of every sequence's length
        start = time.perf_counter()
        while True:
            logits = model.logits(h)  # [n, V] for the sequences whose token ended here
            # what the token is chosen from: the raw logits, or biased then penalised (vLLM's order;
            # log-probabilities stay raw)
            scores = logits
            slots_here = here.tolist() if any_sampled or penalties is not None or biases is not None else []
            if biases is not None:
                scores = biases.apply(scores, slots_here)
            if penalties is not None:
                scores = penalties.apply(scores, slots_here, params)
            next_ids = torch.full((num,), -1, dtype=torch.int64, device=dev)
            next_ids[here] = scores.argmax(-1)
            if any_sampled:  # draw where the logits are; the all-reduce below carries the token
                picked = [i for i, s in enumerate(slots_here) if sampled[s]]
                if picked:  # step: the index of the token drawn, the same on any rank and batch
                    drawn = [slots_here[i] for i in picked]
                    next_ids[here[picked]] = sample(scores[picked], [params[s] for s in drawn],
                                                    [len(generated[s]) for s in drawn])
            active = [s for s in range(num) if not done[s]]
            step_logprobs: dict[int, TokenLogprobs] = {}  # active slot -> its token's, when asked for
            if logprobs is not None:  # where the logits are, for the token chosen there: one max all-reduce
                lp = torch.full((num, 1 + 2 * logprobs), float("-inf"), dtype=torch.float64, device=dev)
                lp[here] = token_logprobs(logits, next_ids[here], logprobs)
                lp_rows = comm.max_reduce(lp, "logprobs").tolist()
                step_logprobs = {s: read_logprobs(lp_rows[s]) for s in active}
            if ending:  # rank 0 only (the others have no on_step): the max makes it every rank's
                next_ids[ending] = END
                ending = []
            next_ids = comm.max_reduce(next_ids, "tokens")
            tokens = next_ids.tolist()
            for s in active:
                if tokens[s] == END:  # asked to end after the last step: this step's token is dropped
                    done[s] = True
            active = [s for s in active if tokens[s] != END]
            if collect_logits:
                full = torch.full((num, spec.vocab_size), float("-inf"), device=dev)
                full[here] = logits
                rows = comm.max_reduce(full, "debug").cpu()
                for s in active:
                    logits_out[s].append(rows[s])
            for s in active:
                generated[s].append(tokens[s])
                if step_logprobs:
                    logprobs_out[s].append(step_logprobs[s])
                budget[s] -= 1
                done[s] = budget[s] <= 0 or tokens[s] in eos
            if penalties is not None:  # every rank counts every token it just learned
                penalties.count(active, tokens)
            if on_step is not None and active:
                asked = on_step([(s, tokens[s], done[s], step_logprobs.get(s)) for s in active])
                ending = sorted({s for s in asked if 0 <= s < num and not done[s]}) if asked is not None else []
            if all(done):
                break
            # next step: unfinished sequences continue where their last token ended
            running = torch.tensor([not d for d in done], device=dev)
            here = here[running[here]]
            positions = lengths[here]
            step_batch = (torch.arange(num, device=dev) - lengths, num)  # one row per slot: the row is the slot
            longest += 1  # this step writes position lengths[s] <= longest - 1
            h, here, kv_rows = self.forward(model.embed_tokens(next_ids[here]), here, lengths, positions,
                                            step_batch, cache, coherent, context=longest)
            lengths = lengths + running.long()
            if coherent:
                self.sync_kv(kv_rows, cache)
            comm.counters.steps["decode"] += 1
            comm.counters.tokens["decode"] += num - sum(done)
        seconds = time.perf_counter() - start
        routing = weights = None
        if self.record_routing:
            gathered = self._gather_routing()
            k = spec.top_k
            routing = gathered[:, :3 + k]
            if gathered.shape[1] == 3 + 2 * k:  # (a gather of the ids alone gives no weights)
                weights = gathered[:, 3 + k:].astype(np.int32).view(np.float32)
        return Result(
            tokens=generated,
            seconds=seconds,
            logits=[torch.stack(x) if x else torch.empty(0, spec.vocab_size) for x in logits_out]
            if collect_logits else None,
            routing=routing,
            routing_weights=weights,
            logprobs=logprobs_out if logprobs is not None else None,
        )

    def _gather_routing(self) -> np.ndarray:
        """All ranks' recorded routing rows [slot, position, moe, ids (k)..., weight bits (k)...],
        sorted by (slot, position, moe) (not counted): int64 [rows, 3 + 2k]. A sequence's prompt
        rows (record_prefill: from its home rank) come before its decode rows (from whichever
        rank each layer ran on), its positions being smaller."""
        k = self.model.spec.top_k
        width = 3 + 2 * k
        mine = torch.cat([torch.cat(self._routing), torch.cat(self._routing_weights)], dim=1) if self._routing \
            else torch.empty((0, width), dtype=torch.int64)
        if self.comm.world > 1:
            import torch.distributed as dist

            size = torch.tensor([mine.shape[0]], device=self.comm.device)
            sizes = [torch.empty_like(size) for _ in range(self.comm.world)]
            dist.all_gather(sizes, size)
            top = int(max(s.item() for s in sizes))
            padded = torch.full((top, width), -1, dtype=torch.int64, device=self.comm.device)
            padded[: mine.shape[0]] = mine.to(self.comm.device)
            parts = [torch.empty_like(padded) for _ in range(self.comm.world)]
            dist.all_gather(parts, padded)
            mine = torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()
        rows = mine.numpy()
        return rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))]


def routing_arrays(routing: np.ndarray, weights: np.ndarray | None, prompts: list[list[int]],
                   tokens: list[list[int]], num_moe_layers: int, first_sequence: int = 0) -> dict[str, np.ndarray]:
    """A Result's recorded routing as a trace's per-token arrays, in the rows' (slot, position)
    order: topk_ids int64 [T, L, k], topk_weights float32 [T, L, k] (when recorded),
    sequence_ids (first_sequence + slot), positions, token_ids and prompt_lengths (the length of
    the token's sequence's prompt: positions below it are prompt tokens), int64 [T].

    T counts the tokens recorded: with record_prefill every prompt token (positions 0 ..
    len(prompt) - 1), and the tokens fed to a decode step: every generated token but each
    sequence's last (nothing runs it through the model), except in a sequence ended early
    (on_step), whose last kept token was fed to the step that ended it. The token at position
    p of slot s is (prompts[s] + tokens[s])[p]: a prompt token, or the one generated there."""
    k = routing.shape[1] - 3
    rows = routing.reshape(-1, num_moe_layers, 3 + k)  # sorted by (slot, position, moe): one token a block
    slots, positions = rows[:, 0, 0], rows[:, 0, 1]
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    starts = np.cumsum([0] + [len(p) + len(t) for p, t in zip(prompts, tokens)])[:-1]
    flat = np.array([t for p, seq in zip(prompts, tokens) for t in (*p, *seq)], dtype=np.int64)
    out = {"topk_ids": rows[:, :, 3:], "sequence_ids": first_sequence + slots, "positions": positions,
           "token_ids": flat[starts[slots] + positions], "prompt_lengths": lengths[slots]}
    if weights is not None:
        out["topk_weights"] = weights.reshape(-1, num_moe_layers, k)
    return out

