"""Sampling in `moeplace serve`: the pure sampler's distribution and greedy limits, replay from a
seed whatever the batch, world size or mode, and the HTTP and batch front ends."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moeplace.cli import run
from moeplace.models.tiny import build_tiny_model
from moeplace.serve.generate import Runtime
from moeplace.serve.openai import BadRequest, parse_completion
from moeplace.serve.sampling import GREEDY, Sampling, sample, uniform
from test_serve import free_port
from test_serve_cli import http

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10], [100, 20]]
NEW = 6
Z = 4.5  # binomial tolerance in standard errors: a correct sampler fails one cell with p < 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("serve-sampling") / "qwen3", num_experts=8, top_k=2,
                            num_layers=3, seed=2)


@pytest.fixture(scope="module")
def rt(model: Path, one_rank_runtime: Callable[[Path], Runtime]) -> Runtime:
    return one_rank_runtime(model)


def expected_probs(logits: np.ndarray, p: Sampling) -> np.ndarray:
    """The distribution a sampler with `p` must follow, computed independently in float64: min_p
    first, then top_k and top_p, top_p's mass that of the tokens min_p kept (vLLM's order)."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp((logits - logits.max()) / p.temperature)
    probs /= probs.sum()
    allowed = probs >= p.min_p * probs.max()
    base = probs[allowed].sum()
    keep = np.zeros_like(probs, dtype=bool)
    mass = 0.0
    for rank, token in enumerate(order):
        if (p.top_k and rank >= p.top_k) or mass >= p.top_p * base or not allowed[token]:
            break
        keep[token] = True
        mass += probs[token]
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("params, by_step", [(Sampling(1.0), False), (Sampling(0.7, top_k=3), True),
                                             (Sampling(1.3, top_p=0.8), False), (Sampling(2.0, 0.95, 4), True),
                                             (Sampling(1.0, min_p=0.2), False),
                                             (Sampling(1.5, 0.8, 0, min_p=0.1), True)])
def test_sampled_tokens_follow_the_distribution(params: Sampling, by_step: bool) -> None:
    """4000 draws of a fixed logits vector, over seeds (or over the steps of one seed): each
    token's frequency within Z binomial standard errors of its probability; filtered-out tokens
    never drawn."""
    logits = np.array([2.0, 1.0, 0.5, 0.5, 0.0, -1.0, -3.0, 1.5])
    n = 4000
    if by_step:
        rows = [params] * n
        steps = list(range(n))
    else:
        rows = [dataclasses.replace(params, seed=seed) for seed in range(n)]
        steps = [0] * n
    drawn = sample(torch.tensor(logits, dtype=torch.float32).expand(n, -1), rows, steps)
    freq = np.bincount(drawn.numpy(), minlength=len(logits)) / n
    want = expected_probs(logits, params)
    assert np.all(freq[want == 0] == 0), (freq, want)
    se = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= Z * se), (freq, want, Z * se)


def test_uniform_is_a_function_of_seed_and_step() -> None:
    values = [uniform(s, t) for s in range(50) for t in range(50)]
    assert all(0.0 <= v < 1.0 for v in values) and len(set(values)) == len(values)
    assert uniform(7, 3) == uniform(7, 3) and uniform(-1, 0) == uniform((1 << 64) - 1, 0)
    assert abs(float(np.mean(values)) - 0.5) < Z * math.sqrt(1 / 12 / len(values))


def test_greedy_limits_give_the_argmax_ties_included() -> None:
    """temperature 0, top_k 1 at any temperature and a tiny top_p all give torch's argmax (the
    first of tied maxima), as greedy decoding does."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen)
    logits[::3, 40] = logits[::3].max(-1).values  # tied maxima: the argmax is the lower index
    logits[1] = 0.25  # all tied
    argmax = logits.argmax(-1)
    steps = list(range(64))
    for params in (GREEDY, Sampling(0.3, top_k=1, seed=5), Sampling(2.0, top_k=1, seed=6),
                   Sampling(1.0, top_p=1e-9, seed=7), Sampling(2.0, top_p=1e-3, top_k=10, seed=8)):
        assert torch.equal(sample(logits, [params] * 64, steps), argmax), params
    assert not torch.equal(sample(logits, [Sampling(1.0, seed=9)] * 64, steps), argmax)  # the check can fail


def test_a_row_draws_the_same_alone_or_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 300, generator=gen)
    params = [Sampling(0.4 + 0.2 * i, [1.0, 0.9][i % 2], [0, 20][i % 3 == 0], seed=i) for i in range(8)]
    together = sample(logits, params, list(range(8)))
    alone = [sample(logits[i:i + 1], params[i:i + 1], [i]) for i in range(8)]
    assert together.tolist() == torch.cat(alone).tolist()
    perm = [5, 2, 7, 0, 1, 6, 3, 4]
    shuffled = sample(logits[perm], [params[i] for i in perm], perm)
    assert shuffled.tolist() == together[perm].tolist()


def generate(rt: Runtime, prompts: list[list[int]], sampling: list[Sampling] | None,
             ignore_eos: bool = True) -> list[list[int]]:
    return rt.generate(prompts, [NEW] * len(prompts), ignore_eos=ignore_eos, sampling=sampling).tokens


def test_runtime_sampling_replays_and_greedy_limits(rt: Runtime) -> None:
    greedy = generate(rt, PROMPTS, None)
    n = len(PROMPTS)
    # temperature 0 is greedy whatever else is set; top_k 1 and a tiny top_p are greedy at any temperature
    for params in (GREEDY, Sampling(0.0, 0.5, 3, 9), Sampling(1.5, top_k=1, seed=4), Sampling(1.0, 1e-6, 0, 4)):
        assert generate(rt, PROMPTS, [params] * n) == greedy, params
    hot = [Sampling(2.0, seed=s) for s in range(n)]
    first = generate(rt, PROMPTS, hot)
    assert generate(rt, PROMPTS, hot) == first  # same seeds, same tokens
    seeds = [generate(rt, [PROMPTS[0]], [Sampling(2.0, seed=s)])[0] for s in range(4)]
    assert len({tuple(t) for t in seeds + [greedy[0]]}) == 5, seeds  # other seeds, other tokens
    # batch companions change nothing: a sequence alone, or among greedy and other sampled ones
    assert [generate(rt, [p], [s])[0] for p, s in zip(PROMPTS, hot)] == first
    mixed = [hot[0], GREEDY, hot[2], Sampling(0.8, 0.9, 5, 77)]
    got = generate(rt, PROMPTS, mixed)
    assert got[0] == first[0] and got[2] == first[2] and got[1] == greedy[1]


def _rank(rank: int, world: int, port: int, model: str, jobs: list[tuple[str, list[Sampling], int | None]],
          out: str) -> None:
    """As `moeplace serve` runs: rank 0 broadcasts each batch and samples with its parameters;
    rank 1 follows the commands, learning the parameters (and logprobs' N) from the request's broadcast."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moeplace.serve.engine import GENERATE, STOP, Request, build_runtime, merged_counters, worker_loop
    from moeplace.serve.engine import run_request, send_command

    results = []
    for mode, sampling, logprobs in jobs:
        rt = build_runtime(model, None, mode, timeout_s=60, device="cpu")
        if rank == 0:
            req = Request(PROMPTS, [NEW] * len(PROMPTS), ignore_eos=True, sampling=sampling, logprobs=logprobs)
            send_command(rt, GENERATE, req)
            result = run_request(rt, req)
            results.append((result.tokens, result.logprobs))
            merged_counters(rt)
            send_command(rt, STOP)
        else:
            worker_loop(rt)
    if rank == 0:
        torch.save(results, Path(out) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_two_ranks(model: Path, tmp_path: Path, jobs: list[tuple[str, list[Sampling], int | None]]) -> list[Any]:
    """_rank's results of `jobs` (mode, per-prompt sampling, logprobs) on 2 gloo ranks: per job
    (tokens, logprobs)."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(_rank, args=(2, free_port(), str(model), jobs, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2 ranks did not finish (hang)")
    return torch.load(tmp_path / "results.pt", weights_only=True)  # lists of ints and floats


def test_same_seed_same_tokens_on_one_and_two_ranks_both_modes(rt: Runtime, model: Path, tmp_path: Path) -> None:

    # min_p travels in the sampling table: a rank that lacked it would draw from more tokens
    sampling = [Sampling(1.0, seed=11), GREEDY, Sampling(1.5, 0.9, 0, 12, 0.05), Sampling(0.7, 1.0, 8, -5)]
    want = generate(rt, PROMPTS, sampling)
    assert want[1] == generate(rt, PROMPTS, None)[1] and want != generate(rt, PROMPTS, None)
    one = rt.generate(PROMPTS, [NEW] * len(PROMPTS), ignore_eos=True, sampling=sampling, logprobs=2)
    assert one.tokens == want and one.logprobs is not None
    # logprobs on 2 ranks (standard only: the coherent run checks plain sampling, as before)
    jobs = [("coherent", sampling, None), ("standard", sampling, 2)]
    (coherent, none), (standard, logprobs) = run_two_ranks(model, tmp_path, jobs)
    assert coherent == want and standard == want and none is None and logprobs is not None
    # the logits of 2 ranks add expert outputs in another order: equal to float32 rounding
    for got, ref in zip(logprobs, one.logprobs):
        assert len(got) == len(ref) == NEW
        for (lp, top), (lp1, top1) in zip(got, ref):
            assert [i for i, _ in top] == [i for i, _ in top1]
            assert np.allclose([lp] + [v for _, v in top], [lp1] + [v for _, v in top1], atol=1e-4)


@pytest.fixture
def server(rt: Runtime, model: Path, serving: Callable[..., Any]) -> Any:
    """rank 0's HTTP loop on the 1-rank runtime, in a thread; stopped through its heartbeat."""
    from moeplace.serve.cli import load_tokenizer

    with serving(rt, load_tokenizer(str(model))) as port:
        yield port


def complete(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    code, text, _ = http(port, "/v1/completions", json.dumps(body).encode())
    return code, json.loads(text)


def test_http_samples_replays_and_reports_its_seed(rt: Runtime, server: int) -> None:
    prompt = PROMPTS[0]
    code, doc = complete(server, {"prompt": prompt, "max_tokens": NEW})
    assert code == 200 and doc["seed"] is None
    assert doc["choices"][0]["token_ids"] == generate(rt, [prompt], None, ignore_eos=False)[0]
    code, doc = complete(server, {"prompt": prompt, "max_tokens": NEW, "temperature": 0.9, "seed": 3})
    assert code == 200 and doc["seed"] == 3
    assert doc["choices"][0]["token_ids"] == generate(rt, [prompt], [Sampling(0.9, seed=3)], ignore_eos=False)[0]
    # no seed: a random one, reported, and replaying it gives the same tokens
    body = {"prompt": prompt, "max_tokens": NEW, "temperature": 1.7, "top_p": 0.95, "top_k": -1}
    code, doc = complete(server, body)
    seed = doc["seed"]
    assert code == 200 and isinstance(seed, int)
    assert complete(server, {**body, "seed": seed})[1]["choices"] == doc["choices"]
    # prompt i of a list samples with seed + i
    code, doc = complete(server, {"prompt": ["hi", "hi"], "max_tokens": NEW, "temperature": 2, "seed": 40})
    alone = [complete(server, {"prompt": "hi", "max_tokens": NEW, "temperature": 2, "seed": s})[1] for s in (40, 41)]
    assert code == 200 and doc["seed"] == 40 and [a["seed"] for a in alone] == [40, 41]
    assert [c["token_ids"] for c in doc["choices"]] == [a["choices"][0]["token_ids"] for a in alone]
    assert doc["choices"][0]["token_ids"] != doc["choices"][1]["token_ids"]


@pytest.mark.parametrize("field, message", [
    ({"temperature": 2.5}, "\"temperature\": 2.5 is not supported: send a number in [0, 2] (0, the default, "
                           "decodes greedily)"),
    ({"temperature": -0.1}, "\"temperature\": -0.1 is not supported"),
    ({"temperature": "1"}, "\"temperature\": \"1\" is not supported"),
    ({"temperature": True}, "\"temperature\": true is not supported"),
    ({"temperature": 1, "top_p": 0}, "\"top_p\" must be a number in (0, 1], got 0"),
    ({"temperature": 1, "top_p": 1.5}, "\"top_p\" must be a number in (0, 1], got 1.5"),
    ({"temperature": 1, "top_k": -2}, "\"top_k\" must be an integer >= 1, or 0 or -1 for no limit, got -2"),
    ({"temperature": 1, "top_k": 2.0}, "\"top_k\" must be an integer"),
    ({"temperature": 1, "top_k": False}, "\"top_k\" must be an integer"),
    ({"temperature": 1, "seed": 1.5}, "\"seed\" must be an integer in [-2**63, 2**63), got 1.5"),
    ({"temperature": 1, "seed": "3"}, "\"seed\" must be an integer"),
    ({"temperature": 1, "seed": 1 << 63}, "\"seed\" must be an integer in [-2**63, 2**63)"),
    ({"top_p": 0.9}, "\"top_p\": 0.9 asks for sampling, but the temperature is 0 (the default here, unlike "
                     "OpenAI's 1): send a \"temperature\" in (0, 2] to sample, or leave top_p out"),
    ({"temperature": None, "top_k": 40}, "\"top_k\": 40 asks for sampling, but the temperature is 0"),
    ({"temperature": 0.5, "min_p": 1.5}, "\"min_p\" must be a number in [0, 1], got 1.5"),
    ({"temperature": 0.5, "min_p": -0.1}, "\"min_p\" must be a number in [0, 1], got -0.1"),
    ({"temperature": 0.5, "min_p": True}, "\"min_p\" must be a number in [0, 1], got true"),
    ({"min_p": 0.2}, "\"min_p\": 0.2 asks for sampling, but the temperature is 0"),
    ({"temperature": 0.5, "n": 17}, "\"n\" must be 1 to 16"),
    ({"temperature": 0.5, "logprobs": 6}, "\"logprobs\" must be an integer in [0, 5] (the alternatives per token, "
                                          "OpenAI's cap), got 6")])
def test_bad_sampling_values_are_a_400_with_one_message(field: dict, message: str) -> None:
    with pytest.raises(BadRequest) as e:
        parse_completion(json.dumps({"prompt": [1, 2], **field}).encode(), None, 100, 64, 16)
    assert str(e.value).startswith(message), str(e.value)


def test_sampling_fields_accepted(server: int) -> None:
    def parsed(body: dict[str, Any]) -> Sampling:
        return parse_completion(json.dumps({"prompt": [1, 2], **body}).encode(), None, 100, 64, 16).sampling

    assert parsed({"temperature": 0, "top_p": 0.5, "top_k": 5, "seed": 3, "min_p": 0.2}) == GREEDY  # moot filters
    assert parsed({"temperature": 1.2, "top_k": 1}) == GREEDY  # top_k 1 is the argmax
    assert parsed({"temperature": 1, "top_p": 0.5, "top_k": 0, "seed": -9}) == Sampling(1.0, 0.5, 0, -9)
    assert parsed({"temperature": 2, "top_k": 7, "seed": 1, "min_p": 0}) == Sampling(2.0, 1.0, 7, 1)
    assert parsed({"temperature": 2, "seed": 1, "min_p": 0.25}) == Sampling(2.0, 1.0, 0, 1, 0.25)
    assert parsed({"temperature": 2, "seed": 1, "min_p": 1}) == Sampling(2.0, seed=1, min_p=1.0)
    assert parsed({"temperature": 0.5, "top_k": -1, "seed": 1}) == Sampling(0.5, 1.0, 0, 1)
    # over the wire: a refusal is a 400 with the message, and the server goes on
    code, doc = complete(server, {"prompt": [1, 2], "temperature": 3})
    assert code == 400 and doc["error"]["message"].startswith("\"temperature\": 3 is not supported")
    assert complete(server, {"prompt": [1, 2], "max_tokens": 2, "temperature": 0.5})[0] == 200


def test_batch_options_and_jsonl_keys_sample(rt: Runtime, model: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(d) for d in (
        {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "temperature": 0},
        {"prompt": PROMPTS[1], "seed": 4, "top_k": 5})) + "\n")
    out = tmp_path / "o.jsonl"
    base = ["serve", "--model", str(model), "--prompts", str(prompts), "--max-new-tokens", str(NEW), "--ignore-eos"]
    assert run([*base, "--out", str(out), "--temperature", "0.9", "--seed", "11"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    want = [(PROMPTS[0], Sampling(0.9, seed=11)), (PROMPTS[0], Sampling(0.9, seed=12)), (PROMPTS[1], GREEDY),
            (PROMPTS[1], Sampling(0.9, 1.0, 5, 4))]
    assert [line.get("seed") for line in lines] == [11, 12, None, 4]
    assert [line["token_ids"] for line in lines] == [generate(rt, [p], [s])[0] for p, s in want]
    capsys.readouterr()
    assert run([*base, "--top-p", "0.5"]) != 0
    assert "--top-p and --top-k shape sampling: give --temperature too" in capsys.readouterr().err
    assert run(["serve", "--model", str(model), "--port", "0", "--temperature", "0.5"]) != 0
    assert "--temperature applies to batch runs (--prompts), not to the HTTP server" in capsys.readouterr().err
    prompts.write_text('{"prompt": [1, 2], "top_p": 0.5}\n')
    assert run(base) != 0
    assert "p.jsonl:1: \"top_p\": 0.5 asks for sampling, but the temperature is 0" in capsys.readouterr().err
