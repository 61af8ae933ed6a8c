"""OpenAI's `logit_bias` in `moeplace serve` (vLLM's V1 semantics: added to the raw logits before
the penalties, greedy rows too; log-probabilities stay raw): the pure functions against a hand
computation, greedy answers against a plain transformers loop, sampled tokens against sample() of
the hand-biased logits, the same tokens on 1 and 2 ranks in both modes (one more broadcast carries
the biases bit for bit, and only for a batch that has one), and the HTTP and batch front ends."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

import moeplace.serve.engine as engine_module
import moeplace.serve.generate as generate_module
from moeplace.cli import run
from moeplace.serve.generate import LogitBiases, Runtime
from moeplace.serve.openai import MAX_LOGIT_BIAS, BadRequest, parse_chat, parse_completion
from moeplace.serve.sampling import (GREEDY, TABLE_WIDTH, Sampling, apply_logit_bias, apply_penalties, bias_table,
                                     logit_bias_rows, sample, sampling_from_table, sampling_table)
import test_serve_sampling
from test_serve_chat import TEMPLATE
from test_serve_penalties import penalised
from test_serve_sampling import NEW, PROMPTS, complete, run_two_ranks
from test_serve_cli import http

model, rt = test_serve_sampling.model, test_serve_sampling.rt  # its fixtures: the checkpoint, one rank
LONG = 16  # new tokens of the greedy comparisons
VOCAB = 256  # the tiny checkpoint's


def generate(rt: Runtime, prompts: list[list[int]], sampling: list[Sampling] | None, new: int = LONG,
             **kw: Any) -> list[list[int]]:
    return rt.generate(prompts, [new] * len(prompts), ignore_eos=True, sampling=sampling, **kw).tokens


def bias(*pairs: tuple[int, float]) -> tuple[tuple[int, float], ...]:
    return tuple(sorted(pairs))


def test_apply_logit_bias_against_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0],
                           [2.0, -1.0, 0.5, 3.0, 0.0],
                           [1.0, -2.0, 4.0, -0.5, 0.25]])
    params = [Sampling(logit_bias=bias((0, -100.0), (4, 0.1))), GREEDY, Sampling(1.0, logit_bias=bias((1, 100.0)))]
    got = apply_logit_bias(logits, params)
    want = torch.tensor([[2.0 - 100, -1.0, 0.5, 3.0, 0.1],
                         [2.0, -1.0, 0.5, 3.0, 0.0],  # no bias: the row exactly as it was
                         [1.0, -2.0 + 100, 4.0, -0.5, 0.25]])
    assert got.dtype == torch.float32 and torch.equal(got, want), got
    assert torch.equal(apply_logit_bias(logits.bfloat16(), params)[1], logits[1])
    rows = logit_bias_rows(params, 5)
    assert rows[0].tolist() == [-100.0, 0.0, 0.0, 0.0, torch.tensor(0.1).item()] and not rows[1].any()
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 5\), got 1 \.\. 5"):
        logit_bias_rows([Sampling(logit_bias=bias((1, 1.0), (5, 1.0)))], 5)


def test_the_tables_carry_biases_bit_exactly() -> None:
    params = [Sampling(0.7, 0.9, 5, -3, 0.05, 0.1, logit_bias=bias((3, 1 / 3), (255, -100.0), (0, 1e-300))), GREEDY,
              Sampling(repetition_penalty=1.1, logit_bias=bias((7, -0.1))), Sampling(1.0, seed=4)]
    table, biases = sampling_table(params), bias_table(params)
    assert table.shape == (4, TABLE_WIDTH) and table[:, -1].tolist() == [3, 0, 1, 0]
    assert biases.shape == (4, 2) and biases[:, 0].tolist() == [0, 3, 255, 7]
    back = sampling_from_table(table, biases)
    assert back == params
    assert [b.hex() for p in back for _, b in p.logit_bias] == [b.hex() for p in params for _, b in p.logit_bias]
    plain = [GREEDY, Sampling(1.0, seed=4)]
    assert sampling_table(plain)[:, -1].tolist() == [0, 0] and bias_table(plain).shape == (0, 2)
    assert sampling_from_table(sampling_table(plain)) == plain
    with pytest.raises(ValueError, match="the sampling table names 4 logit biases, the bias table holds 3"):
        sampling_from_table(table, biases[:3])
    with pytest.raises(ValueError, match="names 4 logit biases, the bias table holds 0"):
        sampling_from_table(table)  # a worker that missed the bias table: refused, not run unbiased


class FakeComm:
    world, rank, device = 2, 0, torch.device("cpu")


class FakeRuntime:
    comm, record_prefill = FakeComm(), False


@pytest.mark.parametrize("sampling, sends", [
    (None, 2), ([GREEDY, Sampling(1.0, seed=3)], 3), ([Sampling(presence_penalty=1.0), GREEDY], 3),
    ([GREEDY, Sampling(1.0, seed=3, logit_bias=bias((5, 2.5), (9, -100.0)))], 4),
    ([Sampling(logit_bias=bias((200, 100.0))), Sampling(logit_bias=bias((1, 1 / 7)))], 4)])
def test_the_command_carries_biases_only_when_a_sequence_has_one(sampling: list[Sampling] | None,
                                                                  sends: int) -> None:
    """send_command's broadcasts, read back by receive_command (a worker's side): a batch without a
    bias sends what it sent before biases existed (header, body, and the sampling table when some
    sequence is not plain greedy); a biased one one tensor more; the worker gets every parameter."""
    req = engine_module.Request([[5, 6, 7], [8]], [3, 4], sampling=sampling)
    sent: list[torch.Tensor] = []
    with mock.patch.object(engine_module.dist, "broadcast", side_effect=lambda t, src: sent.append(t.clone())):
        engine_module.send_command(FakeRuntime(), engine_module.GENERATE, req)  # type: ignore[arg-type]
    assert len(sent) == sends
    if sends == 3:  # no bias: the table's counts are 0, so the worker waits for nothing more
        assert not sent[2][:, -1].any()
    replay = iter(sent)

    def receive(t: torch.Tensor, src: int) -> None:
        t.copy_(next(replay))  # the shapes must agree, or copy_ raises

    with mock.patch.object(engine_module.dist, "broadcast", side_effect=receive):
        cmd, got = engine_module.receive_command(FakeRuntime())  # type: ignore[arg-type]
    assert next(replay, None) is None  # it read every broadcast, no more
    assert cmd == engine_module.GENERATE and got is not None
    assert got.prompts == req.prompts and got.sampling == (sampling if req.sampled else None)


def reference(ref: Any, prompt: list[int], p: Sampling, new: int = LONG, bias_first: bool = True) -> list[int]:
    """Greedy decoding with a logit bias and penalties by a plain transformers loop (`ref`: the
    checkpoint as a transformers model): no cache, no ranks, the whole sequence through the model
    at each step; the bias added in float32 to the raw logits, then the penalties (bias_first
    False: the other order, which the test shows to matter)."""
    out: list[int] = []
    for _ in range(new):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out])).logits[0, -1].float()
        scores = logits.clone()
        if bias_first:
            for t, b in p.logit_bias:
                scores[t] += b
            scores = penalised(scores, prompt, out, p)
        else:
            scores = penalised(scores, prompt, out, p).float()
            for t, b in p.logit_bias:
                scores[t] += b
        out.append(int(scores.argmax()))
    return out


def test_greedy_bias_equals_a_plain_reference_loop(rt: Runtime, model: Path) -> None:
    """-100 on the token greedy decoding picks first bans it: another answer, without that token,
    token for token as the reference loop's, in one batch with an unbiased row that keeps its
    plain answer. A bias on a prompt token with a repetition penalty: bias first, then the
    penalty (vLLM's order), which here gives another answer than the reverse order."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    plain = generate(rt, PROMPTS[:2], None)
    first = plain[0][0]
    banned = Sampling(logit_bias=bias((first, -100.0)))
    got = generate(rt, PROMPTS[:2], [banned, GREEDY])
    assert got[1] == plain[1]  # the other row's bias does not leak
    assert got[0] != plain[0] and first not in got[0], got[0]
    assert got[0] == reference(ref, PROMPTS[0], banned)
    # the tiny model's logits span less than 1: +0.5 then / 3 (vLLM) is not + 0.5 after / 3
    both = Sampling(repetition_penalty=3.0, logit_bias=bias((PROMPTS[0][0], 0.5), (first, -0.2)))
    got = generate(rt, PROMPTS[:1], [both])[0]
    assert got == reference(ref, PROMPTS[0], both) != reference(ref, PROMPTS[0], both, bias_first=False)
    assert got != generate(rt, PROMPTS[:1], [Sampling(repetition_penalty=3.0)])[0]  # the bias counts


def test_plus_100_forces_its_token_greedy_and_sampled(rt: Runtime) -> None:
    """+100 on one token: every token is it; on two (a choice among labels): every token is one
    of them, the greedy row's the likelier one each step, the sampled rows' both over the seeds."""
    params = [Sampling(logit_bias=bias((42, 100.0))), Sampling(1.0, seed=5, logit_bias=bias((42, 100.0))),
              Sampling(2.0, 0.9, 0, 6, logit_bias=bias((42, 100.0))),
              Sampling(1.0, seed=7, top_k=3, logit_bias=bias((42, 100.0)))]
    assert generate(rt, PROMPTS, params, NEW) == [[42] * NEW] * 4
    labels = bias((65, 100.0), (66, 100.0))
    two = [Sampling(logit_bias=labels)] + [Sampling(2.0, seed=s, logit_bias=labels) for s in range(3)]
    res = rt.generate(PROMPTS, [NEW] * 4, ignore_eos=True, sampling=two, collect_logits=True)
    assert res.logits is not None and all(set(t) <= {65, 66} for t in res.tokens)
    # greedy: the argmax of the two biased logits (float32 sums, ties to the lower id, as argmax)
    assert res.tokens[0] == [65 if row[65] + 100 >= row[66] + 100 else 66 for row in res.logits[0]]
    assert {t for row in res.tokens[1:] for t in row} == {65, 66}


def test_sampled_rows_draw_from_the_biased_logits(rt: Runtime) -> None:
    """A sampled row's token at step t is sample() of its raw logits (collect_logits: raw) with its
    bias added, then the penalties of its prompt and tokens before t, at (seed, t)."""
    params = [Sampling(1.0, seed=3, logit_bias=bias((PROMPTS[0][1], 0.6), (7, -0.3))), GREEDY,
              Sampling(0.8, 0.9, 0, 5, logit_bias=bias((3, 0.4)), repetition_penalty=0.5, presence_penalty=-1.0),
              Sampling(1.0, seed=3, min_p=0.2, logit_bias=bias(*((t, -5.0) for t in range(0, VOCAB, 2))))]
    res = rt.generate(PROMPTS, [NEW] * 4, ignore_eos=True, sampling=params, collect_logits=True)
    assert res.logits is not None and res.tokens == generate(rt, PROMPTS, params, NEW)
    for prompt, tokens, logits, p in zip(PROMPTS, res.tokens, res.logits, params):
        mask = torch.zeros((1, VOCAB), dtype=torch.bool)
        mask[0, prompt] = True
        for t, token in enumerate(tokens):
            counts = torch.bincount(torch.tensor(tokens[:t], dtype=torch.int64), minlength=VOCAB).int()[None]
            scores = apply_penalties(apply_logit_bias(logits[t:t + 1], [p]), counts, mask, [p])
            assert token == int(sample(scores, [p], [t])[0]), (p, t)
    assert all(t % 2 for t in res.tokens[3])  # -5 on every even id (logits span < 1), min_p 0.2: odd ids only
    unbiased = generate(rt, PROMPTS, [Sampling(p.temperature, p.top_p, p.top_k, p.seed, p.min_p, p.presence_penalty,
                                               p.frequency_penalty, p.repetition_penalty) for p in params], NEW)
    assert [a != b for a, b in zip(res.tokens, unbiased)] == [True, False, True, True]


def test_no_bias_no_state_and_the_same_tokens(rt: Runtime) -> None:
    """A batch without a bias (greedy, sampled, penalised, or logit_bias empty) allocates no bias
    rows and never enters the bias path; its tokens and log-probabilities are those of the same
    batch without the field."""
    starts: list[LogitBiases | None] = []
    real = LogitBiases.start

    def spy(*args: Any) -> LogitBiases | None:
        starts.append(real(*args))
        return starts[-1]

    batches = [None, [Sampling(1.5, seed=s) for s in range(4)], [Sampling(presence_penalty=1.0), GREEDY] * 2]
    with mock.patch.object(LogitBiases, "start", side_effect=spy), \
            mock.patch.object(generate_module, "logit_bias_rows", side_effect=AssertionError("bias path")):
        got = [rt.generate(PROMPTS, [NEW] * 4, ignore_eos=True, sampling=b, logprobs=2) for b in batches]
        empty = rt.generate(PROMPTS, [NEW] * 4, ignore_eos=True, sampling=[Sampling(logit_bias=())] * 4, logprobs=2)
    assert starts == [None] * 4
    assert empty.tokens == got[0].tokens and empty.logprobs == got[0].logprobs
    # one biased row: [1, V] rows for it alone
    with mock.patch.object(LogitBiases, "start", side_effect=spy):
        generate(rt, PROMPTS, [GREEDY, GREEDY, Sampling(logit_bias=bias((9, 1.0))), GREEDY], 2)
    one = starts[-1]
    assert one is not None and one.rows == [-1, -1, 0, -1] and tuple(one.table.shape) == (1, VOCAB)
    assert one.table.nonzero().tolist() == [[0, 9]]


def test_log_probabilities_stay_raw(rt: Runtime) -> None:
    """A biased row's log-probabilities are the raw model distribution's, log_softmax of the logits
    before the bias: a forced token keeps its (low) raw log-probability."""
    plain = generate(rt, [PROMPTS[0]], None, 3)[0]
    forced = next(t for t in range(VOCAB) if t not in plain)
    params = Sampling(logit_bias=bias((forced, 100.0), (plain[0], -5.0)))
    res = rt.generate([PROMPTS[0]], [3], ignore_eos=True, sampling=[params], logprobs=3, collect_logits=True)
    assert res.logprobs is not None and res.logits is not None and res.tokens[0] == [forced] * 3
    for (got, top), raw in zip(res.logprobs[0], res.logits[0]):
        lp = torch.log_softmax(raw.float(), -1)
        assert abs(got - float(lp[forced])) < 1e-6 and got < top[0][1] - 1e-3  # not the biased distribution's ~0
        assert [t for t, _ in top] == lp.topk(3).indices.tolist() and forced not in [t for t, _ in top]


def test_same_tokens_on_one_and_two_ranks_both_modes(rt: Runtime, model: Path, tmp_path: Path) -> None:
    """Every rank biases as rank 0 would: the request's bias broadcast carries every row's biases,
    also for the rows the other rank holds (every biased row's tokens differ without them)."""
    mixed = [Sampling(logit_bias=bias((PROMPTS[0][2], 0.5), (3, -100.0))),
             Sampling(1.0, seed=12, logit_bias=bias((183, -100.0), (10, 0.3))),
             Sampling(repetition_penalty=0.5, logit_bias=bias((201, -1.0), (38, 0.7))),
             Sampling(1.0, seed=13, logit_bias=bias(*((t, -0.5) for t in range(128))))]
    want = generate(rt, PROMPTS, mixed, NEW)
    unbiased = generate(rt, PROMPTS, [Sampling(p.temperature, seed=p.seed, repetition_penalty=p.repetition_penalty)
                                      for p in mixed], NEW)
    assert all(a != b for a, b in zip(want, unbiased)), (want, unbiased)
    jobs = [("coherent", mixed, None), ("standard", mixed, None)]
    (coherent, _), (standard, _) = run_two_ranks(model, tmp_path, jobs)
    assert coherent == want and standard == want


@pytest.fixture(scope="module")
def server(rt: Runtime, model: Path, serving: Callable[..., Any]) -> Any:
    """Both endpoints: the checkpoint's byte tokenizer with test_serve_chat's chat template."""
    from moeplace.serve.cli import load_tokenizer

    tokenizer = load_tokenizer(str(model))
    tokenizer.chat_template = TEMPLATE
    with serving(rt, tokenizer, LONG) as port:
        yield port


def test_http_completions_and_chat_honour_logit_bias(rt: Runtime, server: int) -> None:
    plain = rt.generate([PROMPTS[0]], [NEW]).tokens[0]  # as the server decodes: up to an EOS
    body = {"prompt": PROMPTS[0], "max_tokens": NEW, "logit_bias": {str(plain[0]): -100, "7": 0.25}}
    code, doc = complete(server, body)
    want = rt.generate([PROMPTS[0]], [NEW], sampling=[Sampling(logit_bias=bias((plain[0], -100.0), (7, 0.25)))])
    assert code == 200 and doc["seed"] is None
    assert doc["choices"][0]["token_ids"] == want.tokens[0] != plain and plain[0] not in want.tokens[0]
    # sampled, with a seed: replays; null and {} are the default
    body = {"prompt": PROMPTS[1], "max_tokens": NEW, "temperature": 1.0, "seed": 12, "logit_bias": {"183": -100}}
    code, doc = complete(server, body)
    assert code == 200 and doc["choices"][0]["token_ids"] == \
        rt.generate([PROMPTS[1]], [NEW], sampling=[Sampling(1.0, seed=12, logit_bias=bias((183, -100.0)))]).tokens[0]
    for empty in (None, {}):
        code, doc = complete(server, {"prompt": PROMPTS[0], "max_tokens": NEW, "logit_bias": empty})
        assert code == 200 and doc["choices"][0]["token_ids"] == plain
    # chat: +100 on "a" (the byte tokenizer's id 97) makes every token of the answer an "a"
    code, text, _ = http(server, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "logit_bias": {"97": 100}}).encode())
    doc = json.loads(text)
    assert code == 200 and doc["choices"][0]["message"]["content"] == "aaaaa", doc
    # a refusal is a 400 with the message, on both endpoints
    code, doc = complete(server, {"prompt": PROMPTS[0], "logit_bias": {"256": 1}})
    assert code == 400 and doc["error"]["message"] == \
        "\"logit_bias\": key \"256\" is not a token id of this model (an integer in [0, 256), as a string)"
    code, text, _ = http(server, "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"97": 101}}).encode())
    assert code == 400 and json.loads(text)["error"]["message"] == \
        "\"logit_bias\": the bias of token id 97 must be a number in [-100, 100], got 101"


def test_http_logprobs_with_a_bias_are_the_raw_ones(rt: Runtime, server: int) -> None:
    plain = rt.generate([PROMPTS[0]], [3]).tokens[0]
    forced = next(t for t in range(VOCAB) if t not in plain)
    code, doc = complete(server, {"prompt": PROMPTS[0], "max_tokens": 3, "logprobs": 2,
                                  "logit_bias": {str(forced): 100}})
    raw = rt.generate([PROMPTS[0]], [3], sampling=[Sampling(logit_bias=bias((forced, 100.0)))], collect_logits=True)
    choice = doc["choices"][0]
    assert code == 200 and choice["token_ids"] == [forced] * 3 and raw.logits is not None
    for got, logits in zip(choice["logprobs"]["token_logprobs"], raw.logits[0]):
        lp = torch.log_softmax(logits.float(), -1)
        assert abs(got - float(lp[forced])) < 1e-6 and got < float(lp.max()) - 1e-3


def parsed(body: dict[str, Any]) -> Sampling:
    return parse_completion(json.dumps({"prompt": [1, 2], **body}).encode(), None, VOCAB, 64, 16).sampling


@pytest.mark.parametrize("field, message", [
    ([1, 2], "\"logit_bias\" must be an object {\"token id\": bias in [-100, 100], ...}, got [1, 2]"),
    ("5", "\"logit_bias\" must be an object {\"token id\": bias in [-100, 100], ...}, got \"5\""),
    ({"abc": 1}, "\"logit_bias\": key \"abc\" is not a token id of this model (an integer in [0, 256), as a string)"),
    ({"256": 1}, "\"logit_bias\": key \"256\" is not a token id of this model"),
    ({"-1": 1}, "\"logit_bias\": key \"-1\" is not a token id of this model"),
    ({"1e2": 1}, "\"logit_bias\": key \"1e2\" is not a token id"),
    ({" 5": 1}, "\"logit_bias\": key \" 5\" is not a token id"),
    ({"": 1}, "\"logit_bias\": key \"\" is not a token id"),
    ({"9" * 5000: 1}, "\"logit_bias\": key \"9999"),
    ({"5": 1, "05": 2}, "\"logit_bias\": token id 5 is given twice"),
    ({"5": 100.5}, "\"logit_bias\": the bias of token id 5 must be a number in [-100, 100], got 100.5"),
    ({"5": -101}, "\"logit_bias\": the bias of token id 5 must be a number in [-100, 100], got -101"),
    ({"5": "1"}, "\"logit_bias\": the bias of token id 5 must be a number in [-100, 100], got \"1\""),
    ({"5": True}, "\"logit_bias\": the bias of token id 5 must be a number in [-100, 100], got true"),
    ({"5": None}, "\"logit_bias\": the bias of token id 5 must be a number in [-100, 100], got null"),
    ({str(t): 1 for t in range(MAX_LOGIT_BIAS + 1)}, "\"logit_bias\" has 301 entries; at most 300")])
def test_bad_logit_bias_is_a_400_with_one_message(field: Any, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_completion(json.dumps({"prompt": [1, 2], "logit_bias": field}).encode(), None, VOCAB, 64, 16)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_biases_are_refused(literal: str) -> None:
    with pytest.raises(BadRequest, match=f"the bias of token id 3 must be a number in .* got {literal}"):
        parse_completion(f'{{"prompt": [1, 2], "logit_bias": {{"3": {literal}}}}}'.encode(), None, VOCAB, 64, 16)


def test_logit_bias_accepted_greedy_or_sampled() -> None:
    assert parsed({"logit_bias": None}) == parsed({"logit_bias": {}}) == GREEDY
    assert parsed({"logit_bias": {"200": -100, "3": 1.5, "0": 0, "255": 100}}) == \
        Sampling(logit_bias=((0, 0.0), (3, 1.5), (200, -100.0), (255, 100.0)))  # sorted by id: equal requests equal
    assert parsed({"logit_bias": {"3": 1, "200": 2}}) == parsed({"logit_bias": {"200": 2, "3": 1}})
    assert parsed({"logit_bias": {"007": 1}}).logit_bias == ((7, 1.0),)
    most = json.dumps({"prompt": [1], "logit_bias": {str(t): 1 for t in range(MAX_LOGIT_BIAS)}}).encode()
    assert len(parse_completion(most, None, 1000, 64, 16).sampling.logit_bias) == MAX_LOGIT_BIAS
    # a bias needs no temperature (it changes the greedy answer); temperature 0 and top_k 1 keep it
    assert parsed({"temperature": 0, "top_p": 0.5, "logit_bias": {"9": -100}}) == Sampling(logit_bias=((9, -100.0),))
    assert parsed({"temperature": 1.5, "top_k": 1, "logit_bias": {"9": 1}}) == Sampling(logit_bias=((9, 1.0),))
    assert parsed({"temperature": 0.5, "seed": 4, "logit_bias": {"9": 1}, "frequency_penalty": 1}) == \
        Sampling(0.5, seed=4, frequency_penalty=1.0, logit_bias=((9, 1.0),))
    assert parsed({"logit_bias": {"9": 1}}).plain is False and parsed({"logit_bias": {}}).plain

    class Chat:  # a tokenizer with a chat template, as parse_chat reads it
        chat_template = "x"

        def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> list[int]:
            return [1, 2, 3]

    messages = [{"role": "user", "content": "hi"}]
    job = parse_chat(json.dumps({"messages": messages, "logit_bias": {"4": -2}}).encode(), Chat(), "m", VOCAB, 64, 16)
    assert job.sampling == Sampling(logit_bias=((4, -2.0),))
    with pytest.raises(BadRequest, match="\"logit_bias\": key \"300\" is not a token id of this model"):
        parse_chat(json.dumps({"messages": messages, "logit_bias": {"300": 1}}).encode(), Chat(), "m", VOCAB, 64, 16)


def test_batch_jsonl_key(rt: Runtime, model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    lines = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[0], "logit_bias": {"2": -100, "5": 0.5}},
             {"prompt": PROMPTS[0], "logit_bias": None},
             {"prompt": PROMPTS[1], "temperature": 1.0, "seed": 12, "logit_bias": {"42": 100}}]
    prompts.write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    out = tmp_path / "o.jsonl"
    base = ["serve", "--model", str(model), "--prompts", str(prompts), "--max-new-tokens", str(NEW), "--ignore-eos"]
    assert run([*base, "--out", str(out), "--presence-penalty", "0.5"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = [(PROMPTS[0], Sampling(presence_penalty=0.5)),
            (PROMPTS[0], Sampling(presence_penalty=0.5, logit_bias=((2, -100.0), (5, 0.5)))),
            (PROMPTS[0], Sampling(presence_penalty=0.5)),
            (PROMPTS[1], Sampling(1.0, seed=12, presence_penalty=0.5, logit_bias=((42, 100.0),)))]
    assert [line["token_ids"] for line in got] == [generate(rt, [p], [s], NEW)[0] for p, s in want]
    assert got[1]["token_ids"] != got[0]["token_ids"] == got[2]["token_ids"] and got[3]["token_ids"] == [42] * NEW
    assert "ignored" not in capsys.readouterr().err  # the key is read, not warned about
    prompts.write_text('{"prompt": [1, 2]}\n{"prompt": [1, 2], "logit_bias": {"256": -100}}\n')
    assert run(base) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:2: \"logit_bias\": key \"256\" is not a token id of this model (an integer in [0, 256), as a " \
           "string)" in err and "Traceback" not in err
