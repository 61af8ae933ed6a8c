"""`logprobs` and `min_p` in `moeplace serve`: the log-probabilities are log_softmax of
transformers' own logits for the same tokens, carried by one collective per step only when asked
for; OpenAI's completions and chat shapes, streamed and not; min_p filters in vLLM's order;
refusals."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moeplace.serve.generate import Runtime
from moeplace.serve.openai import BadRequest, completion_logprobs, parse_chat, parse_completion
from moeplace.serve.sampling import GREEDY, Sampling, sample
from test_serve_chat import MESSAGES
from test_serve_stream import EOS, LIMIT, TEXT, post, stream

PROMPTS = [list(b"hello"), [5, 6, 7, 200, 9], list("Grüße".encode())]


@pytest.fixture(scope="module")
def rt(chat_model: Path, one_rank_runtime: Callable[[Path], Runtime]) -> Runtime:
    return one_rank_runtime(chat_model)


@pytest.fixture
def server(rt: Runtime, chat_tokenizer: Any, serving: Callable[..., Any]) -> Iterator[int]:
    with serving(rt, chat_tokenizer, LIMIT, "lp") as port:
        yield port


def collectives(rt: Runtime, kind: str) -> int:
    return rt.comm.counters.totals.get(("decode", kind), [0, 0, 0])[0]


def test_logprobs_are_log_softmax_of_transformers_logits(rt: Runtime, chat_model: Path) -> None:
    """Greedy, sampled and min_p rows: each token's log-probability and the top 3 equal
    log_softmax of transformers' float32 logits for the same sequence (the raw distribution,
    not the temperature's); the tokens are those of a run without logprobs."""
    from transformers import AutoModelForCausalLM

    sampling = [GREEDY, Sampling(1.7, seed=3), Sampling(1.2, seed=8, min_p=0.3)]
    budgets = [LIMIT] * len(PROMPTS)
    plain = rt.generate(PROMPTS, budgets, ignore_eos=True, sampling=sampling)
    before = collectives(rt, "logprobs"), collectives(rt, "tokens")
    got = rt.generate(PROMPTS, budgets, ignore_eos=True, sampling=sampling, logprobs=3)
    # one more collective per step, exactly
    assert collectives(rt, "logprobs") - before[0] == collectives(rt, "tokens") - before[1] == LIMIT
    assert got.tokens == plain.tokens and got.logprobs is not None and plain.logprobs is None
    ref = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    for i, (prompt, tokens, lps) in enumerate(zip(PROMPTS, got.tokens, got.logprobs)):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
        want = torch.log_softmax(logits.float(), dim=-1)
        assert len(lps) == len(tokens) == LIMIT
        for step, (token, (lp, top)) in enumerate(zip(tokens, lps)):
            values, ids = torch.topk(want[step], 3)
            assert [t for t, _ in top] == ids.tolist(), (i, step)
            assert math.isclose(lp, float(want[step, token]), abs_tol=1e-4), (i, step)
            assert all(math.isclose(v, float(w), abs_tol=1e-4) for (_, v), w in zip(top, values))
            if i == 0:  # greedy: the token is the likeliest, with its very log-probability
                assert top[0] == (token, lp)
        if i:  # sampled rows do draw less likely tokens: the check can tell raw from tempered
            assert any(top[0][0] != token for token, (_, top) in zip(tokens, lps)), i


def test_no_collective_without_logprobs(rt: Runtime) -> None:
    for sampling in (None, [Sampling(1.0, seed=1, min_p=0.1)] * len(PROMPTS)):
        before = collectives(rt, "logprobs"), collectives(rt, "tokens")
        rt.generate(PROMPTS, [4] * len(PROMPTS), ignore_eos=True, sampling=sampling)
        assert collectives(rt, "logprobs") == before[0] and collectives(rt, "tokens") == before[1] + 4
    before = collectives(rt, "logprobs")
    rt.generate(PROMPTS, [4] * len(PROMPTS), ignore_eos=True, logprobs=0)  # 0 alternatives: still the token's
    assert collectives(rt, "logprobs") == before + 4


def test_min_p_filters_after_temperature_and_before_top_p() -> None:
    """Probabilities 0.4, 0.3, 0.2, 0.1: min_p 0.4 keeps the tokens at >= 0.16; a higher
    temperature flattens the row, so more pass; top_p's mass is that of what min_p kept (vLLM's
    order): 0.75 of it stops before the third token, where 0.75 of the whole row would not."""
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    n = 2000

    def drawn(params: Sampling) -> set[int]:
        rows = [Sampling(params.temperature, params.top_p, params.top_k, seed, params.min_p) for seed in range(n)]
        return set(sample(logits.expand(n, -1), rows, [0] * n).tolist())

    assert drawn(Sampling(1.0)) == {0, 1, 2, 3}  # the check can fail
    assert drawn(Sampling(1.0, min_p=0.4)) == {0, 1, 2}
    assert drawn(Sampling(2.0, min_p=0.4)) == {0, 1, 2, 3}  # sqrt(0.25) = 0.5 >= 0.4: after temperature
    assert drawn(Sampling(1.0, 0.75, min_p=0.4)) == {0, 1}
    assert drawn(Sampling(1.0, 0.75)) == {0, 1, 2}
    assert drawn(Sampling(2.0, min_p=1.0)) == {0}  # only the likeliest


def test_http_completion_logprobs(rt: Runtime, server: int, chat_tokenizer: Any) -> None:
    body = {"prompt": ["hello", TEXT], "max_tokens": LIMIT}
    code, plain = post(server, "/v1/completions", body)
    code2, doc = post(server, "/v1/completions", {**body, "logprobs": 2})
    assert code == code2 == 200 and plain["choices"][0]["finish_reason"] == "stop"
    assert [{**c, "logprobs": None} for c in doc["choices"]] == plain["choices"]  # greedy answers unchanged
    want = rt.generate([list(b"hello"), list(TEXT.encode())], [LIMIT, LIMIT], logprobs=2).logprobs
    assert want is not None
    for choice, lps in zip(doc["choices"], want):
        got = choice["logprobs"]
        assert set(got) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert got["tokens"] == [chat_tokenizer.decode([t]) for t in choice["token_ids"]]
        assert got["token_logprobs"] == [lp for lp, _ in lps]
        assert all(len(top) == 2 for _, top in lps)
        tops: list[dict[str, float]] = [{} for _ in lps]
        for keyed, (_, top) in zip(tops, lps):
            for t, v in top:  # tokens that decode alike (bytes of split characters: U+FFFD) keep the likeliest
                keyed.setdefault(chat_tokenizer.decode([t]), v)
        assert got["top_logprobs"] == tops
        offsets = [0]
        for token in got["tokens"][:-1]:
            offsets.append(offsets[-1] + len(token))
        assert got["text_offset"] == offsets
    # token ids: decoded with the tokenizer when there is one, else "token_id:N"; 0 alternatives
    code, doc = post(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "logprobs": 0})
    choice = doc["choices"][0]
    assert code == 200 and choice["text"] == ""
    assert choice["logprobs"]["tokens"] == [chat_tokenizer.decode([t]) for t in choice["token_ids"]]
    assert choice["logprobs"]["top_logprobs"] == [{}, {}, {}]
    out, end = completion_logprobs([7, 300], [(-0.5, [(7, -0.5), (9, -2.0)]), (-float("inf"), [])], 1, None, 4)
    assert out == {"tokens": ["token_id:7", "token_id:300"], "token_logprobs": [-0.5, -9999.0],
                   "top_logprobs": [{"token_id:7": -0.5}, {}], "text_offset": [4, 14]} and end == 26


def test_http_chat_logprobs(server: int, chat_tokenizer: Any) -> None:
    body = {"messages": MESSAGES, "max_tokens": LIMIT}
    code, plain = post(server, "/v1/chat/completions", body)
    code2, doc = post(server, "/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 3})
    assert code == code2 == 200 and plain["choices"][0]["finish_reason"] == "stop"
    assert doc["choices"][0]["message"] == plain["choices"][0]["message"] and plain["choices"][0]["logprobs"] is None
    content = doc["choices"][0]["logprobs"]["content"]
    assert len(content) == doc["usage"]["completion_tokens"]  # the stop token's too
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0] == {k: entry[k] for k in ("token", "logprob", "bytes")}  # greedy
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
    assert content[-1]["token"] == chat_tokenizer.decode([EOS[1]])
    code, doc = post(server, "/v1/chat/completions", {**body, "logprobs": True})
    assert code == 200 and all(e["top_logprobs"] == [] for e in doc["choices"][0]["logprobs"]["content"])


@pytest.mark.parametrize("body", [{"prompt": ["hello", TEXT], "max_tokens": LIMIT, "logprobs": 3},
                                  {"prompt": "Grüße", "max_tokens": 7, "temperature": 1.5, "seed": 3, "logprobs": 1,
                                   "min_p": 0.05}])
def test_streamed_completion_logprobs_put_together_are_the_answer(server: int, body: dict[str, Any]) -> None:
    code, want = post(server, "/v1/completions", body)
    _, events = stream(server, "/v1/completions", body)
    assert code == 200
    for choice in want["choices"]:
        parts = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["index"] == choice["index"]]
        assert all(len(p["tokens"]) == 1 for p in parts)
        assert {key: [v for p in parts for v in p[key]] for key in parts[0]} == choice["logprobs"]


def test_streamed_chat_logprobs_put_together_are_the_answer(server: int) -> None:
    for body in ({"messages": MESSAGES, "max_tokens": LIMIT, "logprobs": True, "top_logprobs": 2},  # a stop
                 {"messages": [{"role": "user", "content": "Grüße"}], "max_tokens": LIMIT, "temperature": 1.3,
                  "seed": 5, "logprobs": True}):
        code, want = post(server, "/v1/chat/completions", body)
        _, events = stream(server, "/v1/chat/completions", body)
        assert code == 200
        parts = [e["choices"][0]["logprobs"] for e in events]
        assert parts[0] is None  # the role delta
        assert [e for p in parts if p is not None for e in p["content"]] == want["choices"][0]["logprobs"]["content"]
        assert all(p is None or p["content"] for p in parts)  # no empty lists
    assert events[-1]["choices"][0]["delta"] == {}


@pytest.mark.parametrize("path, body, message", [
    ("completions", {"logprobs": 6}, "\"logprobs\" must be an integer in [0, 5]"),
    ("completions", {"logprobs": True}, "\"logprobs\" must be an integer in [0, 5]"),
    ("completions", {"logprobs": -1}, "\"logprobs\" must be an integer in [0, 5]"),
    ("chat", {"top_logprobs": 2}, "\"top_logprobs\" needs \"logprobs\": true, got \"top_logprobs\": 2 with "
                                  "\"logprobs\": null"),
    ("chat", {"logprobs": False, "top_logprobs": 0}, "\"top_logprobs\" needs \"logprobs\": true"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "\"top_logprobs\" must be an integer in [0, 20]"),
    ("chat", {"logprobs": 3}, "\"logprobs\" must be true or false"),
    ("completions", {"temperature": 1, "min_p": 1.01}, "\"min_p\" must be a number in [0, 1], got 1.01"),
    ("chat", {"temperature": 1, "min_p": "0.1"}, "\"min_p\" must be a number in [0, 1], got \"0.1\""),
    ("chat", {"min_p": 0.1}, "\"min_p\": 0.1 asks for sampling, but the temperature is 0"),
])
def test_refusals_are_a_400_with_one_message(path: str, body: dict[str, Any], message: str,
                                             chat_tokenizer: Any) -> None:
    with pytest.raises(BadRequest) as e:
        if path == "chat":
            parse_chat(json.dumps({"messages": MESSAGES, **body}).encode(), chat_tokenizer, "lp", 300, 64, LIMIT)
        else:
            parse_completion(json.dumps({"prompt": [1, 2], **body}).encode(), None, 300, 64, LIMIT)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_min_p_one_samples_the_argmax_over_http(server: int) -> None:
    body = {"prompt": ["hello", TEXT], "max_tokens": LIMIT}
    greedy = post(server, "/v1/completions", body)[1]["choices"]
    code, doc = post(server, "/v1/completions", {**body, "temperature": 2, "seed": 9, "min_p": 1})
    assert code == 200 and doc["seed"] == 9 and doc["choices"] == greedy
    hot = post(server, "/v1/completions", {**body, "temperature": 2, "seed": 9})[1]["choices"]
    assert hot != greedy  # without min_p the same seed wanders off
    # accepted at its neutral values with no temperature; parsed into the sampling
    ok = parse_completion(json.dumps({"prompt": [1], "min_p": 0.0, "logprobs": None}).encode(), None, 300, 64, 4)
    assert ok.sampling == GREEDY and ok.logprobs is None
