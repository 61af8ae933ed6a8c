"""Penalties in `moeplace serve` (presence, frequency, repetition: vLLM's semantics): the pure
function against a hand computation, greedy and sampled answers against a plain single-process
transformers loop, the same tokens on 1 and 2 ranks in both modes (the sampling table carries
them), no state and no work for a batch without penalties, and the HTTP and batch front ends."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

import moeplace.serve.generate as generate_module
from moeplace.cli import run
from moeplace.serve.generate import Penalties, Runtime
from moeplace.serve.openai import BadRequest, parse_chat, parse_completion
from moeplace.serve.sampling import GREEDY, Sampling, apply_penalties, sample, sampling_from_table, sampling_table
import test_serve_sampling
from test_serve_sampling import PROMPTS, complete, run_two_ranks

model, rt = test_serve_sampling.model, test_serve_sampling.rt  # its fixtures: the checkpoint, one rank
LONG = 24  # new tokens: PROMPTS[0]'s greedy answer repeats a 6-token cycle within them
NEW = 6  # test_serve_sampling's NEW: what its _rank generates per prompt


def generate(rt: Runtime, prompts: list[list[int]], sampling: list[Sampling] | None, new: int = LONG,
             **kw: Any) -> list[list[int]]:
    return rt.generate(prompts, [new] * len(prompts), ignore_eos=True, sampling=sampling, **kw).tokens


def test_apply_penalties_against_a_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0],
                           [2.0, -1.0, 0.5, 3.0, 0.0],
                           [1.0, -2.0, 4.0, -0.5, 0.25]])
    counts = torch.tensor([[2, 1, 0, 0, 0],
                           [0, 3, 0, 1, 0],
                           [1, 0, 0, 2, 0]], dtype=torch.int32)
    prompt = torch.tensor([[False, False, True, False, True],
                           [True, False, False, False, False],
                           [False, True, False, False, False]])
    params = [Sampling(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0),
              Sampling(presence_penalty=-1.0),
              GREEDY]
    got = apply_penalties(logits, counts, prompt, params)
    # row 0: tokens 0, 1 generated (2 and 1 times), 2 and 4 in the prompt; r = 2 on all four
    #   t0: 2 / 2 - 0.25 * 2 - 0.5 = 0;  t1: -1 * 2 - 0.25 - 0.5 = -2.75;  t2: 0.5 / 2 = 0.25
    #   t3: untouched 3;  t4: 0 * 2 = 0 (not positive: multiplied)
    # row 1: presence -1 on the generated tokens 1 and 3 (counts do not matter); the prompt is moot
    # row 2: no penalty: the row exactly as it was, although its counts and prompt are set
    want = torch.tensor([[0.0, -2.75, 0.25, 3.0, 0.0],
                         [2.0, 0.0, 0.5, 4.0, 0.0],
                         [1.0, -2.0, 4.0, -0.5, 0.25]])
    assert got.dtype == torch.float32 and torch.equal(got, want), got
    assert torch.equal(apply_penalties(logits.bfloat16(), counts, prompt, params)[2], logits[2])
    # without a repetition penalty in the rows no prompt is needed, and frequency counts every time
    alone = apply_penalties(logits[:1], counts[:1], None, [Sampling(frequency_penalty=1.5)])
    assert torch.equal(alone, torch.tensor([[-1.0, -2.5, 0.5, 3.0, 0.0]]))


def test_the_sampling_table_carries_penalties_bit_exactly() -> None:
    params = [Sampling(0.7, 0.9, 5, -3, 0.05, 0.1, -1.9999999999, 1.1), GREEDY,
              Sampling(presence_penalty=2.0, frequency_penalty=-0.3, repetition_penalty=0.01)]
    back = sampling_from_table(sampling_table(params))
    assert back == params
    assert [b.repetition_penalty.hex() for b in back] == [p.repetition_penalty.hex() for p in params]


def penalised(logits: torch.Tensor, prompt: list[int], generated: list[int], p: Sampling) -> torch.Tensor:
    """The reference: vLLM's penalties written out token by token in float64."""
    x = logits.double().clone()
    if p.repetition_penalty != 1:
        for t in set(prompt) | set(generated):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(generated).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def reference(ref: Any, prompt: list[int], p: Sampling, new: int = LONG) -> list[int]:
    """Greedy decoding with penalties by a plain transformers loop (`ref`: the checkpoint as a
    transformers model): no cache, no ranks, the whole sequence through the model at each step."""
    out: list[int] = []
    for _ in range(new):
        with torch.no_grad():
            logits = ref(torch.tensor([prompt + out])).logits[0, -1]
        out.append(int(penalised(logits, prompt, out, p).argmax()))
    return out


def test_greedy_penalties_equal_a_plain_reference_loop(rt: Runtime, model: Path) -> None:
    """PROMPTS[0]'s greedy answer cycles; each penalty breaks that, token for token as the
    reference loop does, in one batch with an unpenalised row that keeps its plain answer."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    plain = generate(rt, PROMPTS[:2], None)
    assert plain[0] == reference(ref, PROMPTS[0], GREEDY)
    assert len(set(plain[0])) < LONG - 6, plain[0]  # the repetition the penalties act on
    for params in (Sampling(presence_penalty=1.0), Sampling(frequency_penalty=0.5), Sampling(repetition_penalty=1.3),
                   Sampling(presence_penalty=0.25, frequency_penalty=0.25, repetition_penalty=1.1)):
        got = generate(rt, PROMPTS[:2], [params, GREEDY])
        assert got[1] == plain[1]  # the other row's state does not leak
        assert got[0] != plain[0] and len(set(got[0])) > len(set(plain[0])), params
        assert got[0] == reference(ref, PROMPTS[0], params), params


def test_sampled_rows_draw_from_the_penalised_logits(rt: Runtime) -> None:
    """A sampled row's token at step t is sample() of its raw logits (collect_logits: raw) with
    the penalties of its prompt and tokens before t applied, at (seed, t); it replays from the seed."""
    params = [Sampling(1.0, seed=3, frequency_penalty=-2.0, repetition_penalty=0.5), GREEDY,
              Sampling(0.8, 0.9, 0, 5, presence_penalty=1.5), Sampling(1.0, seed=3)]
    res = rt.generate(PROMPTS, [NEW] * 4, ignore_eos=True, sampling=params, collect_logits=True)
    assert res.logits is not None and res.tokens == generate(rt, PROMPTS, params, NEW)
    vocab = res.logits[0].shape[1]
    for prompt, tokens, logits, p in zip(PROMPTS, res.tokens, res.logits, params):
        mask = torch.zeros((1, vocab), dtype=torch.bool)
        mask[0, prompt] = True
        for t, token in enumerate(tokens):
            counts = torch.bincount(torch.tensor(tokens[:t], dtype=torch.int64), minlength=vocab).int()[None]
            scores = apply_penalties(logits[t:t + 1], counts, mask, [p])
            assert token == int(sample(scores, [p], [t])[0]), (p, t)
    unpenalised = generate(rt, PROMPTS, [Sampling(1.0, seed=3), GREEDY, Sampling(0.8, 0.9, 0, 5), params[3]], NEW)
    assert res.tokens[0] != unpenalised[0] and res.tokens[2] != unpenalised[2] and res.tokens[3] == unpenalised[3]


def test_no_penalty_no_state_and_the_same_tokens(rt: Runtime) -> None:
    """A batch without penalties (greedy, sampled, or the penalties at their defaults) allocates no
    penalty state and never enters the penalty path; its tokens and log-probabilities are those of
    the same batch decoded without sampling parameters at all."""
    starts: list[Penalties | None] = []
    real = Penalties.start

    def spy(*args: Any) -> Penalties | None:
        starts.append(real(*args))
        return starts[-1]

    hot = [Sampling(1.5, seed=s) for s in range(4)]
    with mock.patch.object(Penalties, "start", side_effect=spy), \
            mock.patch.object(generate_module, "apply_penalties", side_effect=AssertionError("penalty path")):
        plain = rt.generate(PROMPTS, [NEW] * 4, ignore_eos=True, logprobs=2)
        zero = rt.generate(PROMPTS, [NEW] * 4, ignore_eos=True, logprobs=2,
                           sampling=[Sampling(presence_penalty=0.0, frequency_penalty=-0.0,
                                              repetition_penalty=1.0)] * 4)
        sampled = generate(rt, PROMPTS, hot, NEW)
    assert starts == [None, None, None]
    assert zero.tokens == plain.tokens and zero.logprobs == plain.logprobs
    assert sampled == generate(rt, PROMPTS, hot, NEW)  # the check above ran on a real sampled batch
    # a penalty allocates [P, V] counts for its P rows only, a prompt mask only for a repetition penalty
    with mock.patch.object(Penalties, "start", side_effect=spy):
        generate(rt, PROMPTS, [GREEDY, Sampling(presence_penalty=1.0), GREEDY, hot[3]], 2)
        generate(rt, PROMPTS, [Sampling(repetition_penalty=1.2)] * 2 + [GREEDY] * 2, 2)
    pres, rep = starts[3:]
    assert pres is not None and pres.rows == [-1, 0, -1, -1] and tuple(pres.counts.shape) == (1, 256)
    assert pres.prompt is None and int(pres.counts.sum()) == 2  # its 2 tokens counted
    assert rep is not None and rep.prompt is not None and tuple(rep.prompt.shape) == (2, 256)
    assert rep.prompt[1].nonzero().flatten().tolist() == sorted(set(PROMPTS[1]))


def test_log_probabilities_stay_raw(rt: Runtime) -> None:
    """A penalised row's log-probabilities are the raw model distribution's: those its token has
    in an unpenalised run of the same sequence (prompt + the tokens before it)."""
    params = Sampling(presence_penalty=-2.0, repetition_penalty=0.5)
    res = rt.generate([PROMPTS[0]], [3], ignore_eos=True, sampling=[params], logprobs=3)
    assert res.logprobs is not None
    for i, token in enumerate(res.tokens[0]):
        raw = rt.generate([PROMPTS[0] + res.tokens[0][:i]], [1], ignore_eos=True, collect_logits=True)
        assert raw.logits is not None
        lp = torch.log_softmax(raw.logits[0][0].float(), -1)
        got, top = res.logprobs[0][i]
        assert abs(got - float(lp[token])) < 1e-4
        assert [t for t, _ in top] == lp.topk(3).indices.tolist()
    assert res.tokens[0] != generate(rt, [PROMPTS[0]], None, 3)[0]  # the penalties did change the answer


def test_same_tokens_on_one_and_two_ranks_both_modes(rt: Runtime, model: Path, tmp_path: Path) -> None:
    """Every rank penalises as rank 0 would: the request's broadcast carries the penalties also
    for a batch of greedy rows only (every row's tokens differ without them)."""
    greedy = [Sampling(presence_penalty=-2.0), GREEDY, Sampling(frequency_penalty=-1.0),
              Sampling(repetition_penalty=0.5)]
    mixed = [Sampling(repetition_penalty=0.5), Sampling(1.0, seed=12, frequency_penalty=-2.0),
             Sampling(presence_penalty=-2.0), Sampling(1.0, seed=13, repetition_penalty=3.0)]
    plain = generate(rt, PROMPTS, None, NEW)
    want_greedy, want_mixed = generate(rt, PROMPTS, greedy, NEW), generate(rt, PROMPTS, mixed, NEW)
    assert [a != b for a, b in zip(want_greedy, plain)] == [True, False, True, True]
    unpenalised = [Sampling(p.temperature, seed=p.seed) for p in mixed]
    assert all(a != b for a, b in zip(want_mixed, generate(rt, PROMPTS, unpenalised, NEW)))
    jobs = [("coherent", greedy, None), ("standard", greedy, None), ("coherent", mixed, None)]
    (coherent, _), (standard, _), (sampled, _) = run_two_ranks(model, tmp_path, jobs)
    assert coherent == want_greedy and standard == want_greedy and sampled == want_mixed


@pytest.fixture(scope="module")
def server(rt: Runtime, model: Path, serving: Callable[..., Any]) -> Any:
    from moeplace.serve.cli import load_tokenizer

    with serving(rt, load_tokenizer(str(model)), LONG) as port:
        yield port


def test_http_serves_penalties(rt: Runtime, server: int) -> None:
    body = {"prompt": PROMPTS[0], "max_tokens": LONG, "presence_penalty": 1, "frequency_penalty": 0.5}
    code, doc = complete(server, body)
    want = rt.generate([PROMPTS[0]], [LONG], sampling=[Sampling(presence_penalty=1.0, frequency_penalty=0.5)])
    assert code == 200 and doc["seed"] is None  # greedy: no seed to report
    assert doc["choices"][0]["token_ids"] == want.tokens[0] != generate(rt, [PROMPTS[0]], None)[0][:LONG]
    # sampled, with a seed: replays; null is the default
    body = {"prompt": PROMPTS[1], "max_tokens": NEW, "temperature": 1.0, "seed": 12, "frequency_penalty": -2.0,
            "presence_penalty": None, "repetition_penalty": None}
    code, doc = complete(server, body)
    assert code == 200 and doc["seed"] == 12
    assert doc["choices"][0]["token_ids"] == rt.generate([PROMPTS[1]], [NEW], sampling=[
        Sampling(1.0, seed=12, frequency_penalty=-2.0)]).tokens[0]
    code, doc = complete(server, {"prompt": PROMPTS[1], "repetition_penalty": 0})
    assert code == 400 and doc["error"]["message"].startswith("\"repetition_penalty\" must be a number in [0.01, 100]")


def parsed(body: dict[str, Any]) -> Sampling:
    return parse_completion(json.dumps({"prompt": [1, 2], **body}).encode(), None, 100, 64, 16).sampling


@pytest.mark.parametrize("field, message", [
    ({"presence_penalty": 2.5}, "\"presence_penalty\" must be a number in [-2, 2] (0: off), got 2.5"),
    ({"presence_penalty": -2.01}, "\"presence_penalty\" must be a number in [-2, 2] (0: off), got -2.01"),
    ({"frequency_penalty": "0.5"}, "\"frequency_penalty\" must be a number in [-2, 2] (0: off), got \"0.5\""),
    ({"frequency_penalty": True}, "\"frequency_penalty\" must be a number in [-2, 2] (0: off), got true"),
    ({"frequency_penalty": [1]}, "\"frequency_penalty\" must be a number in [-2, 2] (0: off), got [1]"),
    ({"repetition_penalty": 0}, "\"repetition_penalty\" must be a number in [0.01, 100] (1: off), got 0"),
    ({"repetition_penalty": -1.2}, "\"repetition_penalty\" must be a number in [0.01, 100] (1: off), got -1.2"),
    ({"repetition_penalty": 101}, "\"repetition_penalty\" must be a number in [0.01, 100] (1: off), got 101"),
    ({"temperature": 1, "repetition_penalty": False}, "\"repetition_penalty\" must be a number in [0.01, 100]")])
def test_bad_penalties_are_a_400_with_one_message(field: dict, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        parsed(field)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_penalties_are_refused(literal: str) -> None:
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        with pytest.raises(BadRequest, match=f"\"{name}\" must be a number in .* got {literal}"):
            parse_completion(f'{{"prompt": [1, 2], "{name}": {literal}}}'.encode(), None, 100, 64, 16)


def test_penalties_accepted_greedy_or_sampled() -> None:
    assert parsed({"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1}) == GREEDY
    assert parsed({"presence_penalty": 2, "frequency_penalty": -2, "repetition_penalty": 0.01}) == \
        Sampling(presence_penalty=2.0, frequency_penalty=-2.0, repetition_penalty=0.01)
    # a penalty needs no temperature (it changes the greedy answer); temperature 0 and top_k 1 keep it
    assert parsed({"temperature": 0, "top_p": 0.5, "repetition_penalty": 1.2}) == Sampling(repetition_penalty=1.2)
    assert parsed({"temperature": 1.5, "top_k": 1, "presence_penalty": -1}) == Sampling(presence_penalty=-1.0)
    assert parsed({"temperature": 0.5, "seed": 4, "min_p": 0.1, "frequency_penalty": 1}) == \
        Sampling(0.5, seed=4, min_p=0.1, frequency_penalty=1.0)

    class Chat:  # a tokenizer with a chat template, as parse_chat reads it
        chat_template = "x"

        def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> list[int]:
            return [1, 2, 3]

    job = parse_chat(json.dumps({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5,
                                 "frequency_penalty": 0.1}).encode(), Chat(), "m", 100, 64, 16)
    assert job.sampling == Sampling(presence_penalty=0.5, frequency_penalty=0.1)
    with pytest.raises(BadRequest, match="\"presence_penalty\" must be a number in \\[-2, 2\\]"):
        parse_chat(json.dumps({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}).encode(),
                   Chat(), "m", 100, 64, 16)


def test_batch_options_and_jsonl_keys(rt: Runtime, model: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(d) for d in (
        {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[0], "presence_penalty": None},
        {"prompt": PROMPTS[0], "frequency_penalty": -1.0, "presence_penalty": 0},
        {"prompt": PROMPTS[1], "temperature": 1.0, "seed": 12, "frequency_penalty": -2.0})) + "\n")
    out = tmp_path / "o.jsonl"
    base = ["serve", "--model", str(model), "--prompts", str(prompts), "--max-new-tokens", str(LONG), "--ignore-eos"]
    assert run([*base, "--out", str(out), "--presence-penalty", "1", "--repetition-penalty", "1.3"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = [(PROMPTS[0], Sampling(presence_penalty=1.0, repetition_penalty=1.3)),
            (PROMPTS[0], Sampling(repetition_penalty=1.3)),  # null: the default, not the option
            (PROMPTS[0], Sampling(frequency_penalty=-1.0, repetition_penalty=1.3)),
            (PROMPTS[1], Sampling(1.0, seed=12, presence_penalty=1.0, frequency_penalty=-2.0, repetition_penalty=1.3))]
    assert [line["token_ids"] for line in lines] == [generate(rt, [p], [s])[0] for p, s in want]
    assert [line.get("seed") for line in lines] == [None, None, None, 12]
    assert len({tuple(line["token_ids"]) for line in lines[:3]}) == 3  # each line's own penalties
    err = capsys.readouterr().err
    assert "ignored" not in err  # the penalty keys are read, not warned about
    assert run([*base, "--presence-penalty", "2.5"]) != 0
    assert "--presence-penalty" in capsys.readouterr().err
    assert run(["serve", "--model", str(model), "--port", "0", "--frequency-penalty", "0.5"]) != 0
    assert "--frequency-penalty applies to batch runs (--prompts), not to the HTTP server" in capsys.readouterr().err
    prompts.write_text('{"prompt": [1, 2], "repetition_penalty": -1}\n')
    assert run(base) == 2
    assert "p.jsonl:1: \"repetition_penalty\" must be a number in [0.01, 100] (1: off), got -1" \
        in capsys.readouterr().err
