"""Per-sequence sampling (temperature, min-p, top-k, top-p) that replays from a seed, and the
log-probabilities a request may ask for.

A draw depends only on the sequence's logits, its parameters and (seed, step), step being the
index of the token being generated: not on the rank it runs on, the world size, the mode or
the other sequences of the batch. The one random number a draw needs is a counter-based hash of
(seed, step) (splitmix64, computed on the host: no generator state, the same on CPU and CUDA),
turned into a token by inverse CDF over the logits sorted in descending order (stable: ties in
index order, so top_k=1 and a tiny top_p give the argmax exactly, as greedy decoding does).
The filters apply in vLLM's (V1) order: temperature, then min_p, then top_k and top_p, top_p's
mass measured over the tokens min_p kept.

A logit bias (OpenAI's `logit_bias`: apply_logit_bias) is added to the raw logits of its tokens
first, then penalties (apply_penalties) reshape the logits, before all of that and greedy rows'
too (their token is the argmax of the biased and penalised logits), in vLLM's V1 sampler order
(v1/sample/sampler.py: the logit bias processor, then apply_penalties: repetition on the
prompt's and the generated tokens, then frequency and presence on the generated ones).

Log-probabilities (`token_logprobs`) are those of the raw model distribution, log_softmax of the
logits before bias, penalties, temperature and filters, as vLLM returns by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Sampling:
    """One sequence's decoding parameters. temperature 0 (or top_k 1) is greedy argmax;
    top_k 0, top_p 1 and min_p 0 are off. seed: any integer (taken modulo 2**64). min_p: keep
    the tokens whose probability (after temperature) is at least min_p x the likeliest's.
    Penalties (apply_penalties; 0, 0 and 1 are off), greedy or not: presence_penalty is
    subtracted from the logit of every token generated so far, frequency_penalty once per time
    it was generated; repetition_penalty divides the positive logits (multiplies the others) of
    every token of the prompt or generated so far. logit_bias: (token id, bias) pairs, sorted by
    id (so that equal requests are equal), each bias added to its token's raw logit before the
    penalties, greedy or not (apply_logit_bias); () is off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """Some penalty reshapes this sequence's logits (Runtime.generate then keeps its counts)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def biased(self) -> bool:
        """A logit bias reshapes this sequence's logits (Runtime.generate then keeps its bias row)."""
        return bool(self.logit_bias)

    @property
    def plain(self) -> bool:
        """Greedy argmax of the raw logits: the default decoding, which needs no parameters sent."""
        return self.greedy and not self.penalised and not self.biased


GREEDY = Sampling()


# the float64 fields of sampling_table, in its column order; top_k, seed and the logit bias's
# length follow
TABLE_FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
TABLE_WIDTH = len(TABLE_FLOATS) + 3  # columns of sampling_table


def sampling_table(params: Sequence[Sampling]) -> torch.Tensor:
    """int64 [n, TABLE_WIDTH] (TABLE_FLOATS as their float64 bits, then top_k, seed and how many
    (token, bias) pairs the row's logit_bias has): what a request's broadcast carries to the
    other ranks (engine.send_command), so that every rank draws and penalises exactly as rank 0
    would; sampling_from_table reads it. The biases themselves, of variable length, travel in
    bias_table, sent only when the last column is not all 0."""
    floats = torch.tensor([[getattr(p, f) for f in TABLE_FLOATS] for p in params], dtype=torch.float64)
    ints = torch.tensor([[p.top_k, p.seed, len(p.logit_bias)] for p in params], dtype=torch.int64)
    return torch.cat([floats.view(torch.int64), ints], dim=1)


def bias_table(params: Sequence[Sampling]) -> torch.Tensor:
    """int64 [total, 2]: every row's logit_bias pairs in row order, (token id, the bias's float64
    bits), total being the sum of sampling_table's last column."""
    ids = torch.tensor([t for p in params for t, _ in p.logit_bias], dtype=torch.int64)
    bits = torch.tensor([b for p in params for _, b in p.logit_bias], dtype=torch.float64).view(torch.int64)
    return torch.stack([ids, bits], dim=1)


def sampling_from_table(table: torch.Tensor, biases: torch.Tensor | None = None) -> list[Sampling]:
    """The parameters sampling_table (and bias_table: `biases`, None when no row has a bias) wrote,
    bit for bit, from int64 [n, TABLE_WIDTH] (and [total, 2]) on the host. ValueError when the
    table's counts of biases do not add up to the bias table's rows (a bias is never dropped)."""
    width = len(TABLE_FLOATS)
    floats = table[:, :width].contiguous().view(torch.float64)
    ints = table[:, width:].tolist()
    biases = torch.empty((0, 2), dtype=torch.int64) if biases is None else biases
    ids, values = biases[:, 0].tolist(), biases[:, 1].contiguous().view(torch.float64).tolist()
    starts = [0]
    for i in ints:
        starts.append(starts[-1] + i[2])
    if starts[-1] != len(ids):
        raise ValueError(f"the sampling table names {starts[-1]} logit biases, the bias table holds {len(ids)}")
    pairs = [tuple(zip(ids[a:b], values[a:b])) for a, b in zip(starts[:-1], starts[1:])]
    return [Sampling(**dict(zip(TABLE_FLOATS, f)), top_k=int(i[0]), seed=int(i[1]), logit_bias=b)
            for f, i, b in zip(floats.tolist(), ints, pairs)]


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) determined by (seed, step) alone (53 random bits)."""
    return (_splitmix64(_splitmix64(seed & M64) ^ (step & M64)) >> 11) * 2.0 ** -53


def int64(value: int) -> int:
    """`value` wrapped into the signed 64-bit range (a seed + prompt index past 2**63 - 1)."""
    value &= M64
    return value - (1 << 64) if value >> 63 else value


def logit_bias_rows(params: Sequence[Sampling], vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [n, V]: row i holds params[i].logit_bias at its token ids (each bias rounded to
    float32 once) and 0 elsewhere, so that adding it leaves every other logit as it was."""
    rows = torch.zeros((len(params), vocab), dtype=torch.float32, device=device)
    at = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if at:
        i, t, b = zip(*at)
        if not 0 <= min(t) <= max(t) < vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {min(t)} .. {max(t)}")
        rows[torch.tensor(i, device=device), torch.tensor(t, device=device)] = \
            torch.tensor(b, dtype=torch.float64).to(torch.float32).to(device)
    return rows


def apply_logit_bias(logits: torch.Tensor, params: Sequence[Sampling]) -> torch.Tensor:
    """float32 [n, V]: `logits` [n, V] (any float dtype) with row i's params[i].logit_bias added
    to its tokens' logits, in float32 (vLLM's V1 logit bias processor, before the penalties); a
    row without a bias comes back unchanged."""
    return logits.float() + logit_bias_rows(params, logits.shape[1], logits.device)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt: torch.Tensor | None,
                    params: Sequence[Sampling]) -> torch.Tensor:
    """float32 [n, V]: `logits` [n, V] (any float dtype) with row i's penalties of params[i]
    applied, in vLLM's order (model_executor/layers/utils.py apply_penalties): repetition first,
    over the tokens of the prompt or generated (logit / r where positive, x r otherwise), then
    frequency (- f x count) and presence (- p where generated). counts: int32 [n, V], how often
    each token was generated so far; prompt: bool [n, V], the prompt's tokens, or None when no
    row has a repetition penalty. A row without penalties comes back unchanged (x / 1 - 0)."""
    x = logits.float()
    dev = x.device
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=dev)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=dev)
    generated = counts > 0
    if any(p.repetition_penalty != 1 for p in params):
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=dev)
        seen = generated | prompt if prompt is not None else generated
        r = torch.where(seen, rep[:, None], torch.ones_like(x))
        x = torch.where(x > 0, x / r, x * r)
    return x - freq[:, None] * counts - pres[:, None] * generated


def sample(logits: torch.Tensor, params: Sequence[Sampling], steps: Sequence[int]) -> torch.Tensor:
    """Token ids [n] drawn from `logits` [n, V] (any float dtype; sampled in float32), row i with
    params[i] at generation step steps[i]. Greedy rows give the argmax."""
    n, vocab = logits.shape
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    x = logits.float()
    # sort the raw logits: dividing by a temperature first could round two values into a tie
    values, order = torch.sort(x, dim=-1, descending=True, stable=True)
    dev = x.device
    temp = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], dtype=torch.float32, device=dev)
    top_k = torch.tensor([1 if p.greedy else p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
    min_p = torch.tensor([0.0 if p.greedy else p.min_p for p in params], dtype=torch.float32, device=dev)
    u = torch.tensor([uniform(p.seed, s) for p, s in zip(params, steps)], dtype=torch.float32, device=dev)
    probs = torch.exp((values - values[:, :1]) / temp[:, None])  # unnormalised, the top one is 1
    # min-p (vLLM's first filter): relative to the top token's probability, here 1; a prefix of
    # the sorted row that always holds the top token
    kept_min_p = probs >= min_p[:, None]
    cum = torch.cumsum(torch.where(kept_min_p, probs, torch.zeros_like(probs)), dim=-1)
    rank = torch.arange(vocab, device=dev)
    # top-p: the smallest prefix whose mass reaches p of what min_p kept (the top token always stays)
    keep = kept_min_p & (rank[None, :] < top_k[:, None]) & (cum - probs < top_p[:, None] * cum[:, -1:])
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    cum = torch.cumsum(kept, dim=-1)
    pick = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True)[:, 0]
    pick = torch.minimum(pick, keep.sum(-1) - 1)  # rounding at the top end: never past the kept set
    return order.gather(1, pick[:, None])[:, 0]


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> torch.Tensor:
    """float64 [n, 1 + 2 top]: per row of `logits` [n, V], the log-probability of token `chosen`
    [n] under the raw model distribution (log_softmax in float32, before temperature and
    filters: vLLM's default), then the `top` largest log-probabilities, highest first, then
    their token ids (exact in float64). One tensor so that one collective carries it all."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(lp, top, dim=-1)
    return torch.cat([lp.gather(1, chosen[:, None]).double(), values.double(), ids.double()], dim=1)


def read_logprobs(row: list[float]) -> tuple[float, list[tuple[int, float]]]:
    """One row of token_logprobs on the host: (the token's log-probability, [(id, log-prob)]
    of the likeliest, highest first)."""
    top = (len(row) - 1) // 2
    return row[0], [(int(row[1 + top + j]), row[1 + j]) for j in range(top)]
