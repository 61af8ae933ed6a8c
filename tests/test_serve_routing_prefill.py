"""`moeplace serve --routing-out FILE --routing-prefill`: the trace holds every prompt token's
routing too (prefill), each sequence's tokens in position order, prompt first, in batch and HTTP
mode, on any number of ranks; the window counts prompt tokens; `moeplace eval`'s traffic
prediction covers the decode tokens alone (eval/traffic.py, decode_tokens)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import test_serve_live_routing
from moeplace.cli import run
from moeplace.errors import TraceError
from moeplace.eval.metrics import gpu_loads
from moeplace.eval.traffic import decode_tokens, predict_traffic, traffic_scope_note
from moeplace.placement import load_placement
from moeplace.serve import engine
from moeplace.serve.engine import RoutingLog
from moeplace.serve.generate import Result, Runtime
from moeplace.trace.format import Trace, load_trace, save_trace
from test_serve_cli import save_placement
from test_serve_live_routing import LIMIT, complete

# its fixtures: the tiny Qwen3-MoE (8 experts, top-2, MoE layers 0 and 2) with a byte tokenizer, one rank
model, tokenizer, rt = test_serve_live_routing.model, test_serve_live_routing.tokenizer, test_serve_live_routing.rt

# (prompt, max_tokens) per line; --max-batch 2 runs two batches; the last sequence generates one
# token: no decode step runs it, so only its prompt is in a prefill file
LINES = [([5, 6, 7, 8, 9], 5), ([10, 11], 4), ([3, 4, 5, 6, 7, 8, 9, 10], 6), ([100, 20, 30], 1)]


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "max_tokens": n}) + "\n" for p, n in LINES))
    return path


def serve_batch(model: Path, tmp_path: Path, name: str, *extra: str) -> tuple[Trace, list[list[int]], str]:
    """One in-process batch run over LINES: (its --routing-out trace, the completions, stdout)."""
    out = tmp_path / f"{name}.jsonl"
    routing = tmp_path / f"{name}.npz"
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    code = run(["serve", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--routing-out",
                str(routing), "--max-batch", "2", "--ignore-eos", "--device", "cpu", *extra])
    assert code == 0
    completions = [json.loads(line)["token_ids"] for line in out.read_text().splitlines()]
    return load_trace(routing), completions, str(routing)


def model_routing(model: Path, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The checkpoint's own routers on one forward of `token_ids` (transformers, as `moeplace
    trace` records them): (topk_ids [S, L, k], topk_weights [S, L, k]), highest weight first."""
    from transformers import AutoModelForCausalLM

    from moeplace.models.discovery import find_moe_layers
    from moeplace.trace.collect import RouterRecorder, route_batch

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with RouterRecorder(find_moe_layers(hf)) as recorder:
        return route_batch(hf, recorder, torch.tensor([token_ids]))


def sequences(trace: Trace) -> list[np.ndarray]:
    """Each sequence's token indices, in file order; checks they are consecutive rows, by id."""
    assert trace.sequence_ids is not None
    ids = trace.sequence_ids
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    assert len(set(ids[starts].tolist())) == len(starts) and (np.diff(ids[starts]) > 0).all()  # one run each
    return np.split(np.arange(trace.num_tokens), starts[1:])


def test_batch_file_holds_prompts_in_position_order(model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Per sequence, consecutive rows: its prompt (positions 0.., the prompt's ids), then each
    token a decode step ran; every row the routing a plain transformers forward over those ids
    gives, per position and layer; the decode rows those of a run without the option; meta says
    what the file holds."""
    got, completions, path = serve_batch(model, tmp_path, "prefill", "--routing-prefill")
    prompt_tokens = sum(len(p) for p, _ in LINES)
    decode = sum(len(c) - 1 for c in completions)
    assert f"wrote {path}: prefill+decode routing of {prompt_tokens + decode} tokens ({prompt_tokens} prompt, " \
           f"{decode} decode) x 2 MoE layers" in capsys.readouterr().out
    assert got.meta["source"] == "moeplace serve (prefill+decode)" and got.meta["phases"] == ["prefill", "decode"]
    assert got.meta["prompt_lengths"] == [[i, len(p)] for i, (p, _) in enumerate(LINES)]
    assert got.positions is not None and got.token_ids is not None and got.topk_weights is not None
    runs = sequences(got)
    assert len(runs) == len(LINES) and [len(c) for c in completions] == [n for _, n in LINES]
    for seq, ((prompt, _), completion, rows) in enumerate(zip(LINES, completions, runs)):
        fed = prompt + completion[:-1]  # the last token is never fed back
        np.testing.assert_array_equal(got.positions[rows], np.arange(len(fed)))
        np.testing.assert_array_equal(got.token_ids[rows], fed)
        want_ids, want_weights = model_routing(model, fed)
        np.testing.assert_array_equal(got.topk_ids[rows], want_ids)  # prompt and decode rows, every layer
        np.testing.assert_allclose(got.topk_weights[rows], want_weights, rtol=1e-5, atol=1e-6)

    plain, again, _ = serve_batch(model, tmp_path, "plain")
    assert again == completions and plain.meta["source"] == "moeplace serve (decode)"
    assert "phases" not in plain.meta and "prompt_lengths" not in plain.meta
    idx = decode_tokens(got)
    assert idx is not None and len(idx) == plain.num_tokens == decode
    for key in ("topk_ids", "sequence_ids", "positions", "token_ids"):
        np.testing.assert_array_equal(getattr(got, key)[idx], getattr(plain, key))
    # two runs, two model instances: the weights agree to float32 rounding (test_serve_live_routing)
    np.testing.assert_allclose(got.topk_weights[idx], plain.topk_weights, rtol=1e-6, atol=1e-7)


def test_same_runtime_same_decode_rows_byte_for_byte(rt: Runtime) -> None:
    """On one runtime, recording the prefill adds the prompt rows and changes no decode row (ids
    and gate weights, bit for bit), nor the tokens."""
    prompts = [p for p, _ in LINES]
    budgets = [n for _, n in LINES]
    rt.record_routing = True
    try:
        rt.record_prefill = False
        plain = rt.generate(prompts, budgets, ignore_eos=True)
        rt.record_prefill = True
        both = rt.generate(prompts, budgets, ignore_eos=True)
    finally:
        rt.record_routing = rt.record_prefill = False
    assert both.tokens == plain.tokens
    assert plain.routing is not None and both.routing is not None and both.routing_weights is not None
    decode_rows = both.routing[:, 1] >= np.array([len(p) for p in prompts])[both.routing[:, 0]]
    np.testing.assert_array_equal(both.routing[decode_rows], plain.routing)
    assert both.routing_weights[decode_rows].tobytes() == plain.routing_weights.tobytes()
    assert (~decode_rows).sum() == sum(map(len, prompts)) * len(rt.model.spec.moe_layers)


def test_http_records_prompts_too(rt: Runtime, tokenizer: Any, tmp_path: Path, serving: Callable[..., Any],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The server's file: each request's sequences, prompt tokens then decode tokens, ids unique
    over batches; its decode rows are those of the same requests served without the option."""
    files = {}
    for name, prefill in (("both", True), ("plain", False)):
        path = tmp_path / f"{name}.npz"
        answers = []
        with serving(rt, tokenizer, LIMIT, "live", routing=RoutingLog(str(path), rt, every_s=3600,
                                                                      prefill=prefill)) as port:
            for prompts, max_tokens in test_serve_live_routing.REQUESTS:
                answers.append(complete(port, prompts, max_tokens))
        files[name] = load_trace(path), [c["token_ids"] for a in answers for c in a["choices"]]
    (got, completions), (plain, again) = files["both"], files["plain"]
    assert completions == again
    prompts = [tokenizer.encode(p, add_special_tokens=False)
               for r in test_serve_live_routing.REQUESTS for p in r[0]]
    prompt_tokens = sum(map(len, prompts))
    total = prompt_tokens + sum(len(c) - 1 for c in completions)
    assert f"decode routing of {total} tokens ({prompt_tokens} prompt, " in capsys.readouterr().out
    assert got.meta["source"] == "moeplace serve (prefill+decode, http)" and got.meta["phases"] == ["prefill", "decode"]
    assert got.sequence_ids is not None and got.positions is not None and got.token_ids is not None
    runs = sequences(got)
    assert [int(got.sequence_ids[r[0]]) for r in runs] == [0, 1, 2]  # the second request: its own batch
    assert got.meta["prompt_lengths"] == [[i, len(p)] for i, p in enumerate(prompts)]
    for prompt, completion, rows in zip(prompts, completions, runs):
        np.testing.assert_array_equal(got.positions[rows], np.arange(len(prompt) + len(completion) - 1))
        np.testing.assert_array_equal(got.token_ids[rows], prompt + completion[:-1])
    idx = decode_tokens(got)
    assert idx is not None
    for key in ("topk_ids", "topk_weights", "sequence_ids", "positions", "token_ids"):  # one runtime: bit for bit
        assert getattr(got, key)[idx].tobytes() == getattr(plain, key).tobytes(), key


def fake_prefill_batch(prompt_lengths: list[int], new_tokens: list[int], layers: int, k: int = 2,
                       experts: int = 8) -> tuple[engine.Request, Result]:
    """As test_serve_live_routing.fake_batch, with the prompt rows a --routing-prefill batch
    records: slot s's positions 0 .. len + n - 2."""
    rows, weights = [], []
    for slot, (length, n) in enumerate(zip(prompt_lengths, new_tokens)):
        for position in range(length + n - 1):
            for moe in range(layers):
                first = (3 * slot + position + moe) % experts
                rows.append([slot, position, moe, *((first + j) % experts for j in range(k))])
                weights.append([(k - j) / (k * (k + 1) / 2) + 0.01 * position for j in range(k)])
    req = engine.Request([[7 + 10 * slot + i for i in range(length)] for slot, length in enumerate(prompt_lengths)],
                         list(new_tokens), record_routing=True)
    tokens = [[100 + 10 * slot + j for j in range(n)] for slot, n in enumerate(new_tokens)]
    return req, Result(tokens=tokens, seconds=0.0, routing=np.array(rows, dtype=np.int64).reshape(-1, 3 + k),
                       routing_weights=np.array(weights, dtype=np.float32).reshape(-1, k))


# (prompt lengths, new tokens) per batch; sequence ids 0-1, 2, 3-4; tokens (prompt + decode)
# 3+1, 4+3 | 1+0 | 2+1, 5+1: 21
BATCHES = [([3, 4], [2, 4]), ([1], [1]), ([2, 5], [2, 2])]


def log(rt: Runtime, path: Path, **options: Any) -> RoutingLog:
    routing = RoutingLog(str(path), rt, every_s=3600, prefill=True, **options)
    for lengths, new in BATCHES:
        routing.add(*fake_prefill_batch(lengths, new, len(rt.model.spec.moe_layers)))
    routing.close()
    return routing


def test_the_window_counts_prompt_tokens(rt: Runtime, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--routing-max-tokens counts prompt tokens: keep first holds the first N tokens of
    everything recorded (a cut inside a prompt included), keep last the last N; meta's
    prompt_lengths lists exactly the sequences in the file."""
    everything = load_trace(log(rt, tmp_path / "all.npz", max_tokens=1000).path)
    assert everything.num_tokens == 21 and everything.sequence_ids is not None
    assert everything.sequence_ids.tolist() == [0] * 4 + [1] * 7 + [2] + [3] * 3 + [4] * 6
    assert everything.positions is not None and everything.positions[:11].tolist() == [0, 1, 2, 3, *range(7)]
    assert everything.token_ids is not None and everything.token_ids[:11].tolist() == [7, 8, 9, 100, 17, 18, 19, 20,
                                                                                       110, 111, 112]
    assert everything.meta["prompt_lengths"] == [[0, 3], [1, 4], [2, 1], [3, 2], [4, 5]]
    capsys.readouterr()

    first = log(rt, tmp_path / "first.npz", max_tokens=6)
    got = load_trace(first.path)
    assert got.num_tokens == 6 and got.meta["prompt_lengths"] == [[0, 3], [1, 4]]  # sequence 1 cut in its prompt
    for key in ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions"):
        np.testing.assert_array_equal(getattr(got, key), getattr(everything, key)[:6])
    out, err = capsys.readouterr()
    assert err.count(f"--routing-out {first.path} holds 6 prompt and decode tokens (--routing-max-tokens): "
                     "recording stops here") == 1, err
    assert "prefill+decode routing of 6 tokens (5 prompt, 1 decode) x 2 MoE layers" in out

    last = log(rt, tmp_path / "last.npz", max_tokens=8, keep="last")
    got = load_trace(last.path)
    assert got.num_tokens == 8 and got.meta["dropped_tokens"] == 13
    assert got.meta["prompt_lengths"] == [[3, 2], [4, 5]]  # sequence 3 cut in its prompt
    for key in ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions"):
        np.testing.assert_array_equal(getattr(got, key), getattr(everything, key)[-8:])
    assert "now keeps the most recent 8 prompt and decode tokens (--routing-keep last)" in capsys.readouterr().err


def test_two_ranks_record_what_one_does_and_eval_predicts_their_decode(model: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Under --nproc-per-node 2 (coherent), each prompt is run on its home rank and every rank's
    rows are gathered: the file is the 1-rank file (routing is the model's, not the rank's). Its
    prompt rows are the --stats-out prefill expert loads; `moeplace eval --model` predicts the
    decode Alltoall bytes the ranks measured, byte for byte, from its decode tokens alone."""
    one, _, _ = serve_batch(model, tmp_path, "one", "--routing-prefill")
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    two_path, stats = tmp_path / "two.npz", tmp_path / "stats.json"
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2", "--device", "cpu",
                           "--model", str(model), "--placement", str(placement), "--prompts",
                           str(write_prompts(tmp_path / "prompts.jsonl")), "--out", str(tmp_path / "two.jsonl"),
                           "--routing-out", str(two_path), "--routing-prefill", "--stats-out", str(stats),
                           "--max-batch", "2", "--ignore-eos", "--timeout", "60"],
                          capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = load_trace(two_path)
    assert two.meta["world"] == 2 and {k: v for k, v in two.meta.items() if k != "world"} == \
        {k: v for k, v in one.meta.items() if k != "world"}
    for key in ("topk_ids", "sequence_ids", "positions", "token_ids"):
        np.testing.assert_array_equal(getattr(two, key), getattr(one, key))
    # the expert outputs add up in another order on 2 ranks: weights equal to float32 rounding
    assert two.topk_weights is not None and one.topk_weights is not None
    np.testing.assert_allclose(two.topk_weights, one.topk_weights, rtol=1e-5, atol=1e-6)

    s = json.loads(stats.read_text())
    idx = decode_tokens(two)
    assert idx is not None
    prompt_rows = np.setdiff1d(np.arange(two.num_tokens), idx)
    pl = load_placement(placement)
    assert s["prefill"]["rank_expert_tokens_per_layer"] == gpu_loads(pl, two.select_tokens(prompt_rows)).astype(
        int).tolist()
    assert s["decode"]["rank_expert_tokens_per_layer"] == gpu_loads(pl, two.select_tokens(idx)).astype(int).tolist()
    assert s["decode"]["tokens_processed"] == len(idx) and len(prompt_rows) == sum(len(p) for p, _ in LINES)

    capsys.readouterr()
    assert run(["eval", str(placement), str(two_path), "--model", str(model), "--dtype", "fp32", "--json"]) == 0
    traffic = json.loads(capsys.readouterr().out)["layouts"]["placement"]["traffic"]["coherent"]
    assert traffic["alltoall_bytes"] == s["decode"]["alltoall_bytes"] > 0
    assert traffic["tokens"] == len(idx) and traffic["prompt_tokens"] == len(prompt_rows)


def test_traffic_prediction_skips_prompt_tokens(model: Path, tmp_path: Path) -> None:
    """predict_traffic of a prefill file is that of its decode tokens alone (both modes, copies
    of experts included), with the prompt tokens counted apart; a file whose meta cannot tell
    them apart is refused, never predicted over every token."""
    from moeplace.placement import Placement

    got, _, _ = serve_batch(model, tmp_path, "prefill", "--routing-prefill")
    idx = decode_tokens(got)
    assert idx is not None
    decode = dataclasses.replace(got.select_tokens(idx), meta={})  # a decode-only file: every token is predicted
    plain = save_placement(tmp_path / "p.json", 2, 8, 2)
    table = load_placement(plain).expert_to_gpu
    # every other expert of each layer also on the other rank: serving_gpus' per-step batches
    copies = Placement(table, num_gpus=2, gpus_per_node=1,
                       replicas=[[(e, 1 - int(table[m, e])) for e in range(0, 8, 2)] for m in range(2)])
    for pl in (load_placement(plain), copies):
        for mode in ("standard", "coherent"):
            with_prompts = predict_traffic(pl, got, mode, 32, 4)
            assert with_prompts.pop("prompt_tokens") == got.num_tokens - len(idx) > 0
            assert with_prompts == predict_traffic(pl, decode, mode, 32, 4)
    note = traffic_scope_note(got, "f.npz")
    assert note is not None and note.startswith(f"f.npz holds {got.num_tokens - len(idx)} prompt (prefill) and "
                                                f"{len(idx)} decode tokens")
    assert traffic_scope_note(decode, "d.npz") is None
    for meta, message in (({"phases": ["prefill", "decode"]}, "no valid meta prompt_lengths"),
                          ({**got.meta, "prompt_lengths": [[0, 5], [1, 2]]}, "lists no sequence 2"),
                          ({**got.meta, "prompt_lengths": [0, 5, 1, 2]}, "no valid meta prompt_lengths")):
        broken = dataclasses.replace(got, meta=meta)
        with pytest.raises(TraceError, match=message):
            predict_traffic(load_placement(plain), broken, "coherent", 32, 4)


def test_the_option_needs_routing_out(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "load_runtime", lambda *args, **kwargs: pytest.fail("weights were loaded"))
    prompts = write_prompts(tmp_path / "p.jsonl")
    for mode in (["--prompts", str(prompts)], ["--port", "0"]):
        for flag in ("--routing-prefill", "--no-routing-prefill"):
            assert run(["serve", "--model", str(model), "--device", "cpu", *mode, flag]) == 2
            lines = capsys.readouterr().err.strip().splitlines()
            assert lines == [f"moeplace: error: {flag} shapes the --routing-out file: give --routing-out FILE"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_merge_keeps_which_tokens_are_prompt_tokens(model: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`moeplace import merge` of a decode-only file and a prefill file shifts the prefill file's
    sequence ids, and its meta prompt_lengths with them (a length 0 for the decode-only file's
    sequences): the merged file's decode tokens are each input's, and eval predicts the sum of
    the inputs' traffic (ids shift by multiples of the files' world, keeping home ranks), saying
    which tokens it covers. Before, prompt_lengths (different in the two) was dropped, so eval
    refused the merged file."""
    decode_only, _, decode_path = serve_batch(model, tmp_path, "decode")
    prefill, _, prefill_path = serve_batch(model, tmp_path, "prefill", "--routing-prefill")
    # as if served on 2 ranks (meta world 2): home rank = sequence id % 2, which merge keeps
    decode_only, prefill = (dataclasses.replace(t, meta={**t.meta, "world": 2}) for t in (decode_only, prefill))
    save_trace(decode_only, decode_path)
    save_trace(prefill, prefill_path)
    merged_path = tmp_path / "merged.npz"
    assert run(["import", "merge", decode_path, prefill_path, "-o", str(merged_path), "-q"]) == 0
    merged = load_trace(merged_path)
    assert merged.holds_prompt_tokens() and not decode_only.holds_prompt_tokens()
    idx = decode_tokens(merged)
    own = decode_tokens(prefill)
    assert idx is not None and own is not None
    np.testing.assert_array_equal(idx, np.concatenate([np.arange(decode_only.num_tokens),
                                                       decode_only.num_tokens + own]))
    placement = load_placement(save_placement(tmp_path / "p.json", 2, 8, 2))
    for mode in ("standard", "coherent"):
        whole = predict_traffic(placement, merged, mode, 32, 4)
        parts = [predict_traffic(placement, t, mode, 32, 4) for t in (decode_only, prefill)]
        assert whole["prompt_tokens"] == parts[1]["prompt_tokens"] > 0
        assert whole["tokens"] == parts[0]["tokens"] + parts[1]["tokens"]
        assert whole["alltoall_bytes"] == parts[0]["alltoall_bytes"] + parts[1]["alltoall_bytes"]
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "p.json"), str(merged_path), "--hidden-size", "32"]) == 0
    assert f"moeplace eval: note: {traffic_scope_note(merged, str(merged_path))}" in capsys.readouterr().err
    assert run(["eval", str(tmp_path / "p.json"), decode_path, "--hidden-size", "32"]) == 0
    assert "note:" not in capsys.readouterr().err
