"""Ending sequences early (`Runtime.generate`'s on_step returning slots): a slot rank 0 asks to
end after step t keeps its first t tokens (and their log-probabilities and logits), the step
that ends it adds nothing, the other sequences are untouched, the batch stops decoding once the
others are done, and the request rides in the tokens all-reduce (no extra collective, no extra
byte), on 1 and 2 ranks (threads, ThreadRanks), both modes. HTTP, batch and 2-rank gloo runs
are checked in test_serve_stop_n, test_serve_stream, test_serve_batch_options and test_serve_cli."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moeplace.models.tiny import build_tiny_model
from moeplace.placement import load_placement
from moeplace.serve.counters import Counters
from moeplace.serve.generate import Result, routing_arrays
from moeplace.serve.model import RankModel, read_spec
from moeplace.serve.replicas import ExpertMap
from moeplace.serve.sampling import GREEDY, Sampling
from test_serve import placements
from test_serve_edges import OwnRouting, ThreadRanks

PROMPTS = [[42, 43, 44], [5, 6, 7, 8, 9], [100, 20], [10, 11]]
BUDGETS = [3, 12, 5, 4]  # slot 1 would run longest; slot 0 finishes at step 3 by its budget
SAMPLING = [GREEDY, GREEDY, Sampling(1.0, seed=3), GREEDY]  # slot 2 sampled: its draws are per (seed, step)
END_AT = 3  # the step after which rank 0 asks slots 0 (finished then: ignored) and 1 to end


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("early-end") / "m", num_experts=4, top_k=2,
                            num_layers=2, seed=7)


def run_ranks(model: Path, world: int, mode: str) -> list[tuple[Result, Counters, Result, Counters,
                                                                 list[list[int]]]]:
    """Per rank: (result, counters) of the batch without a hook and with rank 0's hook asking to
    end slots 0 and 1 (and one that does not exist) after step END_AT, and the slots rank 0's
    hook was told of at each step."""
    spec = read_spec(model)
    layers = len(spec.moe_layers)
    placement = load_placement(placements(model.parent, model, world)["permuted"])
    emap = ExpertMap.from_placement(placement, torch.device("cpu"))
    mailbox: dict[int, tuple[torch.Tensor, ...]] = {}
    barrier = threading.Barrier(world, timeout=60)

    def rank(r: int) -> tuple[Result, Counters, Result, Counters, list[list[int]]]:
        local = [sorted(placement.experts_on_gpu(m, r)) for m in range(layers)]
        told: list[list[int]] = []

        def hook(step: list[tuple[int, int, bool, Any]]) -> list[int] | None:
            told.append([slot for slot, _, _, _ in step])
            return [0, 1, 1, 99] if len(told) == END_AT else None

        out: list[Any] = []
        try:
            for on_step in (None, hook if r == 0 else None):  # as serve runs: only rank 0 has one
                comm = ThreadRanks(r, world, torch.device("cpu"), Counters(layers), mailbox, barrier)
                rt = OwnRouting(RankModel(spec, local, torch.device("cpu"), torch.float32), comm, emap, mode,
                                record_routing=True)
                out += [rt.generate(PROMPTS, BUDGETS, ignore_eos=True, collect_logits=True, sampling=SAMPLING,
                                    on_step=on_step, logprobs=2), comm.counters]
        except BaseException:
            barrier.abort()
            raise
        return out[0], out[1], out[2], out[3], told

    with ThreadPoolExecutor(world) as pool:
        return list(pool.map(rank, range(world)))


@pytest.mark.parametrize("world, mode", [(1, "coherent"), (2, "coherent"), (2, "standard")])
def test_a_slot_ended_by_the_hook_keeps_its_tokens_so_far_and_the_others_run_on(model: Path, world: int,
                                                                                 mode: str) -> None:
    ranks = run_ranks(model, world, mode)
    base, base_counters, ended, counters, told = ranks[0]
    assert [len(t) for t in base.tokens] == BUDGETS
    want = [t[:END_AT] if s == 1 else t for s, t in enumerate(base.tokens)]
    assert ended.tokens == want
    for other in ranks[1:]:  # the flag crossed: rank 1, without a hook, ended slot 1 at the same step
        assert other[2].tokens == want
    assert ended.logprobs is not None and base.logprobs is not None and ended.logits is not None
    # slot 1's up to its end: the same batch, the same bits; the others' later steps ran in a
    # smaller batch, whose float32 sums may differ in their last bits
    assert ended.logprobs[1] == base.logprobs[1][:END_AT]
    for got_lp, was_lp in zip(ended.logprobs, base.logprobs, strict=True):
        assert len(got_lp) == len(was_lp) or got_lp is ended.logprobs[1]
        for (lp, top), (was, was_top) in zip(got_lp, was_lp):
            assert lp == pytest.approx(was, abs=1e-5) and [i for i, _ in top] == [i for i, _ in was_top]
    assert [x.shape[0] for x in ended.logits] == [len(t) for t in want]
    for got, was in zip(ended.logits, base.logits or [], strict=True):
        torch.testing.assert_close(got, was[:got.shape[0]])
    # the hook heard of slot 1 for END_AT steps, then never again: its next token was dropped
    assert [1 in slots for slots in told] == [i < END_AT for i in range(len(told))]
    # the batch ran as long as the others needed, plus the step that ended slot 1: not slot 1's 12
    steps = max(max(b for s, b in enumerate(BUDGETS) if s != 1), END_AT + 1) - 1
    assert (base_counters.steps["decode"], counters.steps["decode"]) == (max(BUDGETS) - 1, steps)
    # no collective or byte more: one tokens all-reduce per step (and the one after prefill), of B ids
    for c in (base_counters, counters):
        n, _, nbytes = c.totals[("decode", "tokens")]
        assert n == c.steps["decode"] + 1 and nbytes == n * len(PROMPTS) * 8 * (world - 1)
        assert c.totals[("decode", "logprobs")][0] == n
    # routing keeps what was computed: slot 1's 3 kept tokens were all fed to the model, the last
    # at the step that ended it; routing_arrays reads them
    rows = np.concatenate([r[2].routing for r in ranks if r[2].routing is not None and len(r[2].routing)])
    rows = rows[np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))].astype(np.int64)
    first = len(PROMPTS[1])
    assert sorted(set(rows[rows[:, 0] == 1, 1].tolist())) == list(range(first, first + END_AT))
    arrays = routing_arrays(rows, None, PROMPTS, ended.tokens, len(read_spec(model).moe_layers))
    mine = arrays["sequence_ids"] == 1
    assert arrays["token_ids"][mine].tolist() == ended.tokens[1]
