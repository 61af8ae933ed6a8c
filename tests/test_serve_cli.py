"""`moeplace serve` command: torchrun batch run, HTTP server, dead rank, rejected inputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

from moeplace.cli import run
from moeplace.eval.metrics import gpu_loads
from moeplace.eval.traffic import predict_traffic
from moeplace.models.tiny import build_tiny_model
from moeplace.placement import Placement, load_placement
from moeplace.serve.cli import CONTIGUOUS, held_experts, load_tokenizer
from moeplace.serve.counters import Counters
from moeplace.serve.metrics import Stats, metrics_text
from moeplace.serve.openai import BadRequest, parse_completion
from moeplace.solve.baselines import random_balanced
from moeplace.trace.format import load_trace
from test_serve import free_port

PROMPT_IDS = [[5, 6, 7, 8, 9], [10, 11, 12]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[int]]]:
    """Tiny Qwen3-MoE (top-2, a dense layer, byte tokenizer) and its greedy 6 tokens per prompt."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("serve-cli") / "qwen3", num_experts=8, top_k=2,
                            num_layers=3, seed=2)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    expected = []
    for prompt in PROMPT_IDS:
        ids = torch.tensor([prompt])
        for _ in range(6):
            with torch.no_grad():
                ids = torch.cat([ids, ref(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        expected.append(ids[0, len(prompt):].tolist())
    return path, expected


def save_placement(path: Path, layers: int, experts: int, gpus: int, seed: int = 3) -> Path:
    Placement(random_balanced(layers, experts, gpus, seed), num_gpus=gpus, gpus_per_node=gpus).save(path)
    return path


def launch(rank: int, world: int, port: int, args: list[str]) -> subprocess.Popen[str]:
    """One rank as torchrun would start it (direct, so a killed rank is not cleaned up by torchrun)."""
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "moeplace", "serve", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_torchrun_batch_matches_transformers_and_prediction(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, expected = model
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPT_IDS)
                       + '\n{"prompt": "hi there", "max_tokens": 3}\n')
    out, stats, routing = tmp_path / "out.jsonl", tmp_path / "stats.json", tmp_path / "routing.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(free_port()), "-m", "moeplace", "serve", "--model", str(path), "--placement", str(placement),
           "--prompts", str(prompts), "--out", str(out), "--stats-out", str(stats), "--routing-out", str(routing),
           "--max-new-tokens", "6", "--ignore-eos", "--timeout", "60",
           "--max-batch", "2"]  # 3 prompts: two batches (the second used to deadlock on the counters' all-reduce)
    # raw torchrun leaves its torchelastic_* log dir behind: in tmp_path, not /tmp
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    sha = hashlib.sha256(placement.read_bytes()).hexdigest()[:12]
    # which placement ran, in words on stderr and in the stats; each file written named on stdout
    assert f"moeplace serve: batch of 3 prompts (2 ranks, coherent); placement {placement} (sha256 {sha})" in proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("wrote ")] == [
        f"wrote {out}", f"wrote {stats}", f"wrote {routing}"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["token_ids"] for r in rows[:2]] == expected
    assert len(rows[2]["token_ids"]) == 3 and rows[2]["prompt"] == "hi there" and isinstance(rows[2]["text"], str)
    s = json.loads(stats.read_text())
    assert s["world"] == 2 and s["mode"] == "coherent" and s["generated_tokens"] == 15
    predicted = predict_traffic(load_placement(placement), load_trace(routing), "coherent", 32, 4)
    decode = s["decode"]
    assert decode["alltoall_bytes"] > 0 and decode["alltoall_bytes"] == predicted["alltoall_bytes"]
    assert decode["alltoalls_per_layer_step"] == 2.0  # top-2: dispatch + combine
    assert (s["placement"], s["placement_sha256"]) == (str(placement), sha)
    # each rank's expert load per MoE layer: eval's per-GPU load of the routing replayed (2 choices a token)
    loads = gpu_loads(load_placement(placement), load_trace(routing))
    assert decode["rank_expert_tokens_per_layer"] == loads.astype(int).tolist()
    assert sum(decode["rank_expert_tokens"]) == 2 * 2 * decode["tokens_processed"] == 48  # top-2 x 2 MoE layers
    assert sum(map(sum, s["prefill"]["rank_expert_tokens_per_layer"])) == 2 * 2 * (5 + 3 + 8)  # every prompt token

    # `moeplace eval --model` on the recorded routing predicts what the ranks measured (issue 4)
    capsys.readouterr()
    assert run(["eval", str(placement), str(routing), "--model", str(path), "--dtype", "fp32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["traffic"]["hidden_size"] == 32 and report["traffic"]["element_bytes"] == 4
    cli = report["layouts"]["placement"]["traffic"]["coherent"]
    assert cli["alltoall_bytes"] == decode["alltoall_bytes"]
    assert cli["dispatch_rows"] == decode["dispatch"]["rows"] and cli["combine_rows"] == decode["combine"]["rows"]
    assert cli["cross_rank_rows_per_layer"] == decode["cross_rank_rows_per_layer"]
    assert cli["alltoalls_per_layer"] == decode["alltoalls_per_layer_step"]
    assert decode["imbalance_per_layer"] == pytest.approx(report["layouts"]["placement"]["imbalance_per_layer"])
    # K/V replication: every decoded token's entries of all 3 layers go to the other rank
    assert cli["kv_sync_bytes_per_token"] * cli["tokens"] == decode["kv_sync"]["bytes"] > 0
    # one key, one meaning: per token decoded (12: each prompt's last new token is never fed back), not per
    # token generated (15)
    assert decode["tokens_processed"] == cli["tokens"] == 12
    assert decode["alltoall_bytes_per_token"] == pytest.approx(cli["alltoall_bytes_per_token"])


def test_ranks_with_different_placements_refuse_to_run(model: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    path, _ = model
    # each placement fits the model and the world size: only comparing them across ranks shows
    # that a token would reach a rank without its expert (and silently get nothing from it)
    a, b = save_placement(tmp_path / "a.json", 2, 8, 2, seed=3), save_placement(tmp_path / "b.json", 2, 8, 2, seed=5)
    assert load_placement(a).expert_to_gpu.tolist() != load_placement(b).expert_to_gpu.tolist()
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    port = free_port()
    procs = [launch(r, 2, port, ["--model", str(path), "--placement", str(p), "--prompts", str(prompts),
                                 "--timeout", "20"]) for r, p in enumerate((a, b))]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err[-1000:]
        assert "started with different placements" in err and "Traceback" not in err


def test_wrong_world_size_rejected_on_every_rank(model: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    path, _ = model
    placement = save_placement(tmp_path / "p4.json", 2, 8, 4)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    port = free_port()
    procs = [launch(r, 2, port, ["--model", str(path), "--placement", str(placement), "--prompts", str(prompts),
                                 "--timeout", "20"]) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2
        assert "placement is for 4 GPUs but 2 ranks are running" in err and "Traceback" not in err


def test_placement_for_another_model_rejected(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = model
    placement = save_placement(tmp_path / "p16.json", 2, 16, 1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert run(["serve", "--model", str(path), "--placement", str(placement), "--prompts", str(prompts)]) == 2
    assert "placement is for 2 MoE layers x 16 experts" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"prompt": [1, 2]\n', "not valid JSON"),
    ('{"prompt": [1, 999]}\n', "token id out of range"),
    ('{"text": "x"}\n', "expected an object with a \"prompt\""),
    ("\n\n", "no prompts"),
])
def test_bad_prompts_file(model: tuple[Path, list[list[int]]], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          content: str, message: str) -> None:
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text(content)
    assert run(["serve", "--model", str(model[0]), "--prompts", str(prompts)]) == 2
    assert message in capsys.readouterr().err


def test_bad_model_and_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["serve", "--model", str(tmp_path), "--prompts", "x.txt"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert run(["serve", "--model", str(tmp_path)]) == 2
    assert "exactly one of --prompts" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 99}, "num_experts_per_tok 99 is not in [1, 8]"),
    ({"num_experts_per_tok": 0}, "config.json num_experts_per_tok must be >= 1, got 0"),
    # mistyped sizes: int() used to take "2" and 2.5 as real sizes (models/config.py)
    ({"num_key_value_heads": "2"}, "config.json num_key_value_heads must be an integer, got '2'"),
    ({"hidden_size": 64.5}, "config.json hidden_size must be an integer, got 64.5"),
    ({"num_key_value_heads": 0}, "config.json num_key_value_heads must be >= 1, got 0"),
    ({"max_position_embeddings": True}, "config.json max_position_embeddings must be an integer, got True"),
    ({"num_attention_heads": 3}, "num_key_value_heads 2 does not divide num_attention_heads 3"),
    ({"num_attention_heads": 6}, "config.json does not match the weights"),
    ({"vocab_size": 100}, "model.embed_tokens.weight"),
    ({"model_type": "olmoe"}, "q_norm.weight is"),  # OLMoE norms whole projections, Qwen3 each head
])
def test_config_that_does_not_match_the_weights(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str], change: dict, message: str) -> None:
    """Before: a traceback mid-forward ("selected index k out of range"), or no error at all."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model[0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert run(["serve", "--model", str(bad), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unwritable_outputs_fail_before_the_weights_load(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    (tmp_path / "file").write_text("in the way")
    assert run(["serve", "--model", str(model[0]), "--prompts", str(prompts), "--out", str(out),
                "--stats-out", str(tmp_path / "file" / "s.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moeplace: error: --stats-out {tmp_path / 'file' / 's.json'}: {tmp_path / 'file'} is not a directory"]
    assert out.read_text() == "keep me\n"


def http(port: int, path: str, body: bytes | None = None) -> tuple[int, str, Any]:
    """(status, body, headers); POST when there is a body."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers


def exposition(text: str) -> dict[str, str]:
    """Check Prometheus' text format: every sample's family has one HELP and one TYPE line before
    its samples, and the family's samples are one contiguous group. Returns sample -> value."""
    helps: set[str] = set()
    types: dict[str, str] = {}
    family, values = None, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            family = line.split()[2]
            assert family not in helps, f"{family}: a second group"
            helps.add(family)
        elif line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert name == family and name not in types and kind in ("counter", "gauge"), line
            types[name] = kind
        else:
            sample, value = line.rsplit(" ", 1)
            assert sample.split("{")[0] == family and family in types, f"{line!r} is not in its family's group"
            float(value)
            values[sample] = value
    return values


def test_metrics_text_is_valid_exposition() -> None:
    """Before: collectives_total samples inside collective_bytes_total's group; moeplace_info,
    moeplace_collectives_total and moeplace_cross_rank_tokens_total without HELP/TYPE."""
    def rank_counters(served: bool) -> Counters:
        counters = Counters(2)
        for phase in ("prefill", "decode"):
            counters.phase = phase
            for layer in range(2):
                counters.record("dispatch", 3 + layer, 64 * (3 + layer), layer)
                counters.record("combine", 2, 128, layer)
            counters.record("kv_sync", 4, 256)
            counters.steps[phase] += 1
            if served:
                counters.record_served(0, 3)
                counters.record_served(1, 2)
        return counters

    # both ranks issue the same collectives (sent rows and bytes are summed); rank 1's experts ran nothing
    vectors = [rank_counters(True).as_vector(0, 2), rank_counters(False).as_vector(1, 2)]
    counters = Counters.from_vector(2, [a + b for a, b in zip(*vectors)], world=2)
    stats = Stats(generated_tokens=5, requests=1, counters={p: counters.summary(p) for p in ("prefill", "decode")})
    values = exposition(metrics_text(stats, "coherent", 2, {"placement": 'out/a "b".json', "placement_sha256": "0123456789ab"}))
    assert values['moeplace_collectives_total{phase="decode",kind="dispatch"}'] == "2"
    assert values['moeplace_collective_bytes_total{phase="prefill",kind="kv_sync"}'] == "512"  # 256 from each rank
    assert values['moeplace_cross_rank_tokens_total{phase="decode",layer="1"}'] == "12"  # 4 dispatched + 2 combined, per rank
    assert values['moeplace_info{mode="coherent",world="2",placement="out/a \\"b\\".json",'
                  'placement_sha256="0123456789ab"}'] == "1"  # the quote escaped
    assert values['moeplace_expert_tokens_total{phase="decode",rank="0"}'] == "5"  # 3 + 2 over the MoE layers
    assert values['moeplace_expert_tokens_total{phase="prefill",rank="1"}'] == "0"
    contiguous = exposition(metrics_text(Stats(), "standard", 4, {"placement": CONTIGUOUS, "placement_sha256": None}))
    assert contiguous == {'moeplace_info{mode="standard",world="4",placement="contiguous (no --placement)",'
                          'placement_sha256=""}': "1", **{k: v for k, v in contiguous.items() if "info" not in k}}


@pytest.mark.parametrize("field, message", [({"stream": "yes"}, "stream"), ({"n": 17}, "\"n\" must be 1 to 16"),
                                            ({"n": True}, "\"n\" must be 1")])
def test_completion_options_the_server_cannot_honour(field: dict, message: str) -> None:
    """Before: "n": 2 was answered 200 with one completion; a "stream" that is not a bool is refused."""
    with pytest.raises(BadRequest, match=message):
        parse_completion(json.dumps({"prompt": [1, 2], **field}).encode(), None, 100, 64, 16)
    # greedy's own values of the sampling fields: accepted
    job = parse_completion(json.dumps({"prompt": [1, 2], "stream": False, "n": 1, "temperature": 0,
                                       "top_p": 0.9, "seed": 7}).encode(), None, 100, 64, 16)
    assert job.prompts == [[1, 2]] and job.max_tokens == 16


@pytest.mark.parametrize("field, message", [
    ({"temperature": 2.5}, "\"temperature\": 2.5 is not supported: send a number in [0, 2] (0, the default, decodes "
                           "greedily)"),
    ({"temperature": -1}, "\"temperature\": -1 is not supported"),
    ({"temperature": "0"}, "\"temperature\": \"0\" is not supported"),
    ({"top_p": 0.9}, "\"top_p\": 0.9 asks for sampling, but the temperature is 0 (the default here, unlike OpenAI's "
                     "1): send a \"temperature\" in (0, 2] to sample, or leave top_p out"),
    ({"top_k": 40}, "\"top_k\": 40 asks for sampling"),
    ({"temperature": None, "min_p": 0.1}, "\"min_p\": 0.1 asks for sampling"),
    ({"presence_penalty": 2.5}, "\"presence_penalty\" must be a number in [-2, 2]"),
    ({"logit_bias": {"500": 100}}, "\"logit_bias\": key \"500\" is not a token id of this model")])
def test_unsupported_sampling_is_refused_not_silently_greedy(field: dict, message: str) -> None:
    """A filter without a temperature, a temperature out of range and what the server does not do
    are refused; answering them greedily would hide that they were ignored."""
    with pytest.raises(BadRequest) as e:
        parse_completion(json.dumps({"prompt": [1, 2], **field}).encode(), None, 100, 64, 16)
    assert str(e.value).startswith(message), str(e.value)


def test_greedy_values_of_the_sampling_fields_are_accepted() -> None:
    for body in ({"temperature": 0.0, "top_p": 0.5, "top_k": 50}, {"top_p": 1, "top_k": -1, "min_p": 0},
                 {"temperature": None, "top_p": None, "presence_penalty": 0, "frequency_penalty": 0.0,
                  "repetition_penalty": 1.0, "logit_bias": {}, "user": "u"}):
        assert parse_completion(json.dumps({"prompt": [1, 2], **body}).encode(), None, 100, 64, 16).prompts == [[1, 2]]


def test_http_server_and_dead_rank(model: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    path, expected = model
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    http_port = free_port()
    args = ["--model", str(path), "--placement", str(placement), "--port", str(http_port), "--timeout", "8",
            "--max-new-tokens", "16", "--mode", "standard"]
    port = free_port()
    procs = [launch(r, 2, port, args) for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if http(http_port, "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert procs[0].poll() is None, procs[0].communicate()[1]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        code, body, _ = http(http_port, "/v1/completions", json.dumps({"prompt": PROMPT_IDS[0], "max_tokens": 6}).encode())
        assert code == 200
        doc = json.loads(body)
        assert doc["choices"][0]["token_ids"] == expected[0]  # 6 tokens, no EOS among them
        assert doc["usage"]["prompt_tokens"] == 5 and doc["object"] == "text_completion"
        code, body, _ = http(http_port, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
        assert code == 200 and isinstance(json.loads(body)["choices"][0]["text"], str)
        # greedy asked for explicitly: the same tokens; sampling asked for: refused, naming what is supported
        code, body, _ = http(http_port, "/v1/completions", json.dumps(
            {"prompt": PROMPT_IDS[0], "max_tokens": 6, "temperature": 0, "top_p": 0.5, "n": 1}).encode())
        assert code == 200 and json.loads(body)["choices"][0]["token_ids"] == doc["choices"][0]["token_ids"]
        code, body, _ = http(http_port, "/v1/completions", json.dumps(
            {"prompt": PROMPT_IDS[0], "max_tokens": 6, "temperature": 0.9, "seed": 5}).encode())
        assert code == 200 and json.loads(body)["seed"] == 5, body
        code, body, _ = http(http_port, "/v1/completions", json.dumps(
            {"prompt": PROMPT_IDS[0], "max_tokens": 6, "top_p": 0.9}).encode())
        assert code == 400 and "asks for sampling, but the temperature is 0" in json.loads(body)["error"]["message"]
        for bad in (b"{not json", b'{"prompt": [1, 100000]}', b'{"prompt": [1], "max_tokens": 0}',
                    b'{"prompt": 7}', b'[]', b'{"prompt": [1], "max_tokens": 17}', b'{"prompt": [1], "stream": 1}',
                    b'{"prompt": [1], "n": 17}'):
            assert http(http_port, "/v1/completions", bad)[0] == 400, bad
        code, body, _ = http(http_port, "/v1/completions", b'{"prompt": [1], "max_tokens": 17}')
        assert code == 400 and json.loads(body)["error"]["message"] == (  # the cap is the operator's, say so
            "max_tokens must be an integer in [1, 16] (the server's --max-new-tokens)")
        code, body, _ = http(http_port, "/v1/completions", b'{"prompt": [1], "stream_options": {"include_usage": true}}')
        assert code == 400 and "\"stream_options\" is only for" in json.loads(body)["error"]["message"]
        assert http(http_port, "/nowhere")[0] == 404
        code, body, headers = http(http_port, "/v1/completions")  # before: 404
        assert code == 405 and headers["Allow"] == "POST" and "takes POST" in json.loads(body)["error"]["message"]
        code, _, headers = http(http_port, "/health", b"{}")
        assert code == 405 and headers["Allow"] == "GET, HEAD"  # a GET route answers HEAD too
        code, body, _ = http(http_port, "/v1/models")  # before: 404
        assert code == 200 and [(m["id"], m["object"]) for m in json.loads(body)["data"]] == [(path.name, "model")]
        assert json.loads(body)["object"] == "list"
        code, metrics, _ = http(http_port, "/metrics")
        assert code == 200
        values = exposition(metrics)
        assert 'moeplace_alltoall_bytes_total{phase="decode"}' in values
        assert 'moeplace_cross_rank_tokens_total{phase="decode",layer="0"}' in values
        assert values["moeplace_requests_total"] == "4" and values["moeplace_rejected_requests_total"] == "14"
        assert float(values["moeplace_decode_seconds_total"]) > 0
        sha = hashlib.sha256(placement.read_bytes()).hexdigest()[:12]
        assert json.loads(http(http_port, "/health")[1]) == {"status": "ok", "world": 2, "mode": "standard",
                                                             "placement": str(placement), "placement_sha256": sha,
                                                             "nodes": 1}
        assert values[f'moeplace_info{{mode="standard",world="2",placement="{placement}",placement_sha256="{sha}"}}'] == "1"
        # 3 requests: each decoded its tokens but the last (never fed back), 2 choices each, 2 MoE layers
        decoded = int(values["moeplace_generated_tokens_total"]) - 4
        decode_load = [int(values[f'moeplace_expert_tokens_total{{phase="decode",rank="{r}"}}']) for r in range(2)]
        assert sum(decode_load) == decoded * 2 * 2 and decoded >= 10 and min(decode_load) > 0
        # a stop string on 2 ranks: rank 0 finds it at token `count`, and the next step's tokens
        # all-reduce ends the sequence on both: count + 1 all-reduces, not one per token of the
        # 16 (before), and the answer cut as ever
        tokenizer = load_tokenizer(str(path))
        code, body, _ = http(http_port, "/v1/completions", json.dumps({"prompt": PROMPT_IDS[0],
                                                                         "max_tokens": 16}).encode())
        tokens = json.loads(body)["choices"][0]["token_ids"]
        text = tokenizer.decode(tokens)
        stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].isascii()
                    and text[i:i + 2].isprintable())  # one byte, so one token, each
        count = next(c for c in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:c]))
        key = 'moeplace_collectives_total{phase="decode",kind="tokens"}'
        before = int(exposition(http(http_port, "/metrics")[1])[key])
        code, body, _ = http(http_port, "/v1/completions", json.dumps({"prompt": PROMPT_IDS[0], "max_tokens": 16,
                                                                         "stop": stop}).encode())
        choice = json.loads(body)["choices"][0]
        assert code == 200 and (choice["token_ids"], choice["finish_reason"]) == (tokens[:count], "stop")
        assert int(exposition(http(http_port, "/metrics")[1])[key]) - before == count + 1 < len(tokens) == 16
        # a rank dies: rank 0 notices within the timeout (heartbeats) and exits with one clear line
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        assert procs[0].returncode not in (0, None)
        assert "lost contact with a peer rank" in err and "Traceback" not in err
        assert time.monotonic() - start < 30
        assert f"moeplace serve: http://127.0.0.1:{http_port} (2 ranks, standard); placement {placement} (sha256 {sha})" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def serve_launcher(args: list[str], tmp: Path) -> subprocess.Popen[str]:
    """`moeplace serve --nproc-per-node 2` as a user runs it (the launcher starts the ranks), with
    TMPDIR `tmp` (made here), which `left_in` checks afterwards."""
    tmp.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2", "--device", "cpu",
                             *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TMPDIR=str(tmp)))


def left_in(tmp: Path) -> list[str]:
    """What a launcher run left in its TMPDIR (before: a torchelastic_* log dir per run)."""
    return sorted(p.name for p in tmp.iterdir())


def test_launcher_runs_the_ranks(model: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    path, expected = model
    placement = save_placement(tmp_path / "p.json", 2, 8, 2, seed=5)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPT_IDS) + "\n")
    out = tmp_path / "out.jsonl"
    proc = serve_launcher(["--model", str(path), "--placement", str(placement), "--prompts", str(prompts),
                           "--out", str(out), "--max-new-tokens", "6", "--ignore-eos", "--mode", "standard",
                           "--max-batch", "1"], tmp_path / "tmp")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert left_in(tmp_path / "tmp") == []
    assert [json.loads(line)["token_ids"] for line in out.read_text().splitlines()] == expected
    assert "--max-batch 1 runs as 2, a multiple of the 2 ranks" in err  # before: raised without a word
    assert "OMP_NUM_THREADS" not in err and "Traceback" not in err  # torchrun's banner and report stay out


def test_launcher_reads_piped_prompts_once_on_rank_0(model: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    """`--prompts -` under the launcher: the ranks inherit its stdin and rank 0 alone reads it.
    Before: "-: no such file" (and "/dev/stdin: no such file": a pipe is no regular file)."""
    path, expected = model
    placement = save_placement(tmp_path / "p.json", 2, 8, 2, seed=5)
    proc = subprocess.Popen([sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2", "--device", "cpu",
                             "--model", str(path), "--placement", str(placement), "--prompts", "-",
                             "--max-new-tokens", "6", "--ignore-eos"], text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, TMPDIR=str(tmp_path)))
    out, err = proc.communicate("\n".join(json.dumps({"prompt": p}) for p in PROMPT_IDS) + "\n", timeout=240)
    assert proc.returncode == 0, err[-2000:]
    assert [json.loads(line)["token_ids"] for line in out.splitlines()] == expected


@pytest.mark.parametrize("prompts", ["-", "/dev/stdin"])
def test_prompts_from_a_pipe(model: tuple[Path, list[list[int]]], prompts: str) -> None:
    """One rank, stdin a pipe: `-` and /dev/stdin both read it (before: "no such file")."""
    path, expected = model
    proc = subprocess.run([sys.executable, "-m", "moeplace", "serve", "--model", str(path), "--prompts", prompts,
                           "--max-new-tokens", "6", "--ignore-eos"], capture_output=True, text=True, timeout=240,
                          input="\n".join(json.dumps({"prompt": p}) for p in PROMPT_IDS) + "\n",
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(line)["token_ids"] for line in proc.stdout.splitlines()] == expected


def test_piped_prompt_errors_name_stdin(model: tuple[Path, list[list[int]]], monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad line of piped prompts is named <stdin>:LINE; a format is sniffed (no suffix to go by)."""
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"prompt": [1, 2]}\n{"prompt": [1, 999]}\n')))
    assert run(["serve", "--model", str(model[0]), "--prompts", "-"]) == 2
    assert "moeplace: error: <stdin>:2: token id out of range" in capsys.readouterr().err


def test_a_stream_with_no_end_is_refused_not_read_forever(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--prompts /dev/zero (or a pipe that never closes with data) used to be read until memory ran out."""
    import moeplace.serve.cli as serve_cli

    monkeypatch.setattr(serve_cli, "MAX_PROMPT_BYTES", 1 << 20)
    assert run(["serve", "--model", str(model[0]), "--prompts", "/dev/zero"]) == 2
    assert capsys.readouterr().err.strip() == "moeplace: error: /dev/zero: more than 1 MiB of prompts; split them " \
                                              "over several runs"
    exactly = tmp_path / "p.txt"
    exactly.write_bytes(b"hello\n" * ((1 << 20) // 6) + b"x" * ((1 << 20) % 6))  # at the cap: read
    assert serve_cli.prompt_bytes(str(exactly)) == exactly.read_bytes()


@pytest.mark.parametrize("case", ["world size", "bad prompt", "too long"])
def test_launcher_failures_are_one_line(model: tuple[Path, list[list[int]]], tmp_path: Path, case: str) -> None:
    """Before: after the rank's line, torchrun's ChildFailedError traceback and failure table; then
    rank 1's "rank 0 rejected its input", sometimes first."""
    prompts = tmp_path / "p.jsonl"
    args = ["--max-new-tokens", "65536"] if case == "too long" else []
    if case == "world size":  # checked once, before any rank starts
        placement, expect = save_placement(tmp_path / "p4.json", 2, 8, 4), "placement is for 4 GPUs but 2 ranks"
        prompts.write_text('{"prompt": [1, 2]}\n')
    else:  # rank 0 rejects it and says why; rank 1 hears so and leaves quietly; the launcher adds nothing
        placement = save_placement(tmp_path / "p2.json", 2, 8, 2)
        prompts.write_text('{"prompt": [1, 100000]}\n' if case == "bad prompt" else '{"prompt": [1, 2]}\n')
        expect = "token id out of range" if case == "bad prompt" else "2 prompt tokens + 65536 new exceed"
    proc = serve_launcher(["--model", str(model[0]), "--placement", str(placement), "--prompts", str(prompts), *args],
                          tmp_path / "tmp")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2 and left_in(tmp_path / "tmp") == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplace: error: ") and expect in lines[0], err


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_server(proc: subprocess.Popen) -> tuple[int, list[int]]:
    """(HTTP port, rank pids) of a launcher once its server is up."""
    assert proc.stderr is not None
    while "moeplace serve: http://" not in (line := proc.stderr.readline()):
        assert line, "the server did not come up"
    http_port = int(line.split("http://", 1)[1].split()[0].rsplit(":", 1)[1])
    ranks = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
             for pid in (task / "children").read_text().split()]
    return http_port, ranks


def rank_pid(ranks: list[int], rank: int) -> int:
    """The pid of `rank` among a launcher's rank processes (by their RANK environment variable)."""
    key = f"RANK={rank}".encode()
    return next(pid for pid in ranks if key in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))


def stop_launcher(proc: subprocess.Popen, ranks: list[int], event: str) -> tuple[str, str]:
    """End a launcher's run as production does ("rank 1 killed": SIGKILL rank 1; else Ctrl-C
    to the launcher) and check its one line and exit code. (stdout, stderr)."""
    if event == "rank 1 killed":
        os.kill(rank_pid(ranks, 1), signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    if event == "rank 1 killed":
        assert proc.returncode == 2 and lines == ["moeplace: error: rank 1 of 2 was killed by SIGKILL"], err
    else:  # before: a "moeplace: error: interrupted" line per rank first
        assert proc.returncode == 130 and lines == ["moeplace: interrupted (SIGINT); ranks stopped"], err
    return out, err


def reap(proc: subprocess.Popen, ranks: list[int]) -> None:
    """Never leave a server behind: kill what is left of a launcher and its ranks (only a failed
    test leaves anything)."""
    for pid in ranks:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


@pytest.mark.parametrize("event", ["rank 1 killed", "launcher interrupted", "launcher killed"])
def test_launcher_reports_a_killed_rank_or_an_interrupt(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                        event: str) -> None:
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    proc = serve_launcher(["--model", str(model[0]), "--placement", str(placement), "--port", "0", "--timeout", "8"],
                          tmp_path / "tmp")
    ranks: list[int] = []
    try:
        http_port, ranks = wait_for_server(proc)
        assert len(ranks) == 2
        if event == "launcher killed":  # before: both ranks kept running, rank 0 kept the port
            proc.send_signal(signal.SIGKILL)

            def listening() -> bool:  # (binding the port to test it is racy: it is an ephemeral one)
                with socket.socket() as s:
                    return s.connect_ex(("127.0.0.1", http_port)) == 0

            # a rank's main thread turns zombie before its other threads have closed its files
            deadline = time.monotonic() + 10
            while (any(running(pid) for pid in ranks) or listening()) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(running(pid) for pid in ranks) and not listening()
            return
        stop_launcher(proc, ranks, event)
        if event == "rank 1 killed":
            assert left_in(tmp_path / "tmp") == []
        else:
            assert not any(running(pid) for pid in ranks)
    finally:
        reap(proc, ranks)


def test_launcher_refused_under_torchrun(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run(["serve", "--nproc-per-node", "2", "--model", str(model[0]), "--port", "0"]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


# --- runtime tour fixes -------------------------------------------------------------------------

def test_two_outputs_naming_one_file_are_refused(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: exit 0, and only the --stats-out JSON was left in same.json (the generations gone)."""
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n')
    base = ["serve", "--model", str(model[0]), "--prompts", str(prompts)]
    cases = [
        (["--out", "same.json", "--stats-out", "same.json"], "--stats-out same.json: is the same file as --out same.json"),
        (["--out", "r.npz", "--routing-out", str(tmp_path / "sub" / ".." / "r.npz")], "is the same file as --out r.npz"),
        (["--nproc-per-node", "2", "--device", "cpu", "--stats-out", "s.npz", "--routing-out", "./s.npz"],
         "--routing-out s.npz: is the same file as --stats-out s.npz"),  # the launcher refuses it too
    ]
    for extra, message in cases:
        assert run([*base, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moeplace: error: ") and lines[0].endswith(
            f"{message}; give each output its own file"), lines
    (tmp_path / "existing.json").write_text("{}")
    os.link(tmp_path / "existing.json", tmp_path / "hardlink.json")  # one file under two names
    assert run([*base, "--out", "existing.json", "--stats-out", "hardlink.json"]) == 2
    assert "is the same file as --out existing.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.json", "hardlink.json", "p.jsonl"]


@pytest.mark.parametrize("extra", [["--out", "o.jsonl"], ["--stats-out", "s.json"], ["--ignore-eos"]])
def test_batch_options_are_refused_with_port(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str], extra: list[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the HTTP server started and ignored them (no --out file ever appeared)."""
    import moeplace.serve.httpserver as httpserver

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server started")

    monkeypatch.setattr(httpserver, "serve_forever", started)
    assert run(["serve", "--model", str(model[0]), "--port", "0", *extra]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moeplace: error: {extra[0]} applies to batch runs (--prompts), not to the HTTP server (--port)"]


def test_host_is_refused_in_a_batch_run(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n')
    assert run(["serve", "--model", str(model[0]), "--prompts", str(prompts), "--host", "0.0.0.0"]) == 2
    assert "--host applies to the HTTP server (--port), not to batch runs" in capsys.readouterr().err


def test_prompt_lines_end_at_newline_only(model: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    """Before: str.splitlines made 4 prompts of these 2 lines (U+2028, form feed, \\x1c, \\x85
    split them) and a lone \\r split a line too (read_text's universal newlines)."""
    from moeplace.serve.cli import load_tokenizer, read_prompts

    path = tmp_path / "p.txt"
    path.write_bytes("one\u2028two\x0cthree\x1c\r\nfour\x85five\rsix\n\n".encode())
    prompts = read_prompts(str(path), load_tokenizer(str(model[0])), 512, 4096, 4)
    assert [p[0] for p in prompts] == ["one\u2028two\x0cthree\x1c", "four\x85five\rsix"]


@pytest.mark.parametrize("name, first, jsonl", [("p.jsonl", '{"prompt": [1, 2]}', True),
                                                ("p.txt", '{"prompt": [1, 2]}', False),  # before: read as JSONL
                                                ("p.in", '{"prompt": [1, 2]}', True),
                                                ("p.in", "hello {", False)])
def test_prompts_format_follows_the_suffix_then_the_content(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                            name: str, first: str, jsonl: bool) -> None:
    from moeplace.serve.cli import load_tokenizer, read_prompts

    path = tmp_path / name
    path.write_text(f"\n{first}\n")
    prompts = read_prompts(str(path), load_tokenizer(str(model[0])), 512, 4096, 4)
    assert prompts[0][0] == ([1, 2] if jsonl else first)


def test_jsonl_prompt_lines_refuse_sampling_and_name_ignored_keys(tmp_path: Path) -> None:
    """A batch JSONL line is read like an HTTP request: "temperature": 0.7 is refused (greedy
    decoding would hide that it was ignored), and a key nothing reads ("max_token", a typo
    that ran the default length) is named in one warning, with its line."""
    import warnings

    from moeplace.errors import MoeplaceError, MoeplaceWarning
    from moeplace.serve.cli import read_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": [1, 2], "max_tokens": 3, "temperature": 0}\n{"prompt": [3], "max_token": 3}\n'
                    '{"prompt": [4], "model": "m"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prompts = read_prompts(str(path), None, 512, 4096, 4)
    assert [(p[1], p[2]) for p in prompts] == [([1, 2], 3), ([3], 4), ([4], 4)]
    assert [str(w.message) for w in caught if issubclass(w.category, MoeplaceWarning)] == [
        f"{path}:2: keys ['max_token'] ignored (a line reads \"prompt\" and \"max_tokens\")"]
    path.write_text('{"prompt": [1, 2]}\n{"prompt": [3], "temperature": 2.7}\n')
    with pytest.raises(MoeplaceError, match=r"p.jsonl:2: \"temperature\": 2.7 is not supported"):
        read_prompts(str(path), None, 512, 4096, 4)


@pytest.mark.parametrize("field, value", [("stop", "\n"), ("stop", ["x"]), ("echo", True), ("best_of", 2),
                                          ("best_of", True), ("suffix", "end")])
def test_completion_fields_that_would_change_the_answer_are_refused(field: str, value: Any) -> None:
    """Before: accepted and ignored ("stop" changes what a real server answers)."""
    with pytest.raises(BadRequest, match=f"\"{field}\" is not supported"):
        parse_completion(json.dumps({"prompt": [1, 2], field: value}).encode(), None, 100, 64, 16)


def test_completion_fields_at_their_defaults_are_accepted() -> None:
    body = {"prompt": [1, 2], "stop": None, "echo": False, "logprobs": None, "best_of": 1, "suffix": None}
    assert parse_completion(json.dumps(body).encode(), None, 100, 64, 16).prompts == [[1, 2]]
    assert parse_completion(json.dumps({"prompt": [1, 2], "stop": []}).encode(), None, 100, 64, 16).prompts == [[1, 2]]


def test_a_request_never_exceeds_max_batch_sequences() -> None:
    """Before: --max-batch counted requests: one request with 5000 prompts ran as one batch."""
    import queue

    from moeplace.serve.httpserver import next_batch
    from moeplace.serve.openai import Job

    class Tokenizer:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [1]

    with pytest.raises(BadRequest, match="3 prompts in one request; this server decodes at most 2 sequences"):
        parse_completion(json.dumps({"prompt": ["a", "b", "c"]}).encode(), Tokenizer(), 100, 64, 16, max_prompts=2)
    assert len(parse_completion(json.dumps({"prompt": ["a", "b"]}).encode(), Tokenizer(), 100, 64, 16,
                                max_prompts=2).prompts) == 2
    jobs: queue.Queue[Job] = queue.Queue()
    sizes = [2, 1, 3, 1, 4, 1]
    for n in sizes:
        jobs.put(Job([[1]] * n, 4, False))
    waiting: list[Job] = []
    batches = []
    while waiting or not jobs.empty():
        batches.append([len(j.prompts) for j in next_batch(waiting, jobs, 4)])
    assert batches == [[2, 1], [3, 1], [4], [1]]  # in order, each at most 4 sequences


def test_a_client_that_leaves_mid_request_is_no_server_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a BrokenPipeError/ConnectionResetError traceback on the server's stderr."""
    import queue
    import struct
    import threading
    from types import SimpleNamespace

    from moeplace.serve.httpserver import make_server

    server = make_server("127.0.0.1", 0)
    server.spec = SimpleNamespace(vocab_size=100, max_positions=64, eos_token_ids=[0])
    server.tokenizer, server.mode, server.world, server.model_name, server.created = None, "standard", 1, "m", 0
    server.max_tokens_limit, server.max_batch, server.jobs, server.stats = 16, 4, queue.Queue(), Stats()
    server.placement = {"placement": CONTIGUOUS, "placement_sha256": None}
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def engine() -> None:  # answers each job once its client has gone
        while True:
            job = server.jobs.get()
            time.sleep(0.3)
            job.result = [[5] * 4000]  # a large answer: its write meets the closed socket
            job.done.set()

    threading.Thread(target=engine, daemon=True).start()
    port = server.server_address[1]
    try:
        for _ in range(2):
            body = json.dumps({"prompt": [1, 2], "max_tokens": 4}).encode()
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
            time.sleep(0.8)
        assert http(port, "/health")[0] == 200  # still serving
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def test_the_failure_named_is_a_rank_killed_by_a_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: rank 0's exit 2 ("lost contact", the same second, the lower rank) was taken as the
    failure and the SIGKILLed rank 1 went unnamed."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from moeplace.errors import AlreadyReported, MoeplaceError
    from moeplace.serve import launch as launcher

    failures = {0: ProcessFailure(0, 100, 2, ""), 1: ProcessFailure(1, 101, -signal.SIGKILL, "")}
    failures[1].timestamp = failures[0].timestamp

    def fail(args: Any) -> None:
        raise ChildFailedError("serve", failures)

    monkeypatch.setattr(torchrun, "run", fail)
    with pytest.raises(MoeplaceError, match="^rank 1 of 2 was killed by SIGKILL$"):
        launcher.launch(2, [])
    failures[0].exitcode = -signal.SIGTERM  # rank 0 stopped by the agent, the same second
    with pytest.raises(MoeplaceError, match="^rank 1 of 2 was killed by SIGKILL$"):
        launcher.launch(2, [])
    # rank 0 lost contact with a stopped rank 1, which the agent SIGKILLed after the grace: rank 0 said why
    failures[0].exitcode, failures[1].timestamp = 2, failures[0].timestamp + 3
    with pytest.raises(AlreadyReported):
        launcher.launch(2, [])
    del failures[1]
    with pytest.raises(AlreadyReported):
        launcher.launch(2, [])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_launcher_exit_code_follows_the_signal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                               sig: signal.Signals, code: int) -> None:
    """Before: 130 for SIGTERM too (the README's rule: 128 + the signal)."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from moeplace.errors import AlreadyReported
    from moeplace.serve import launch as launcher

    def stopped(args: Any) -> None:
        raise SignalException("stopped", sigval=sig)

    monkeypatch.setattr(torchrun, "run", stopped)
    with pytest.raises(AlreadyReported) as info:
        launcher.launch(2, [])
    assert info.value.exit_code == code
    assert capsys.readouterr().err == f"moeplace: interrupted ({sig.name}); ranks stopped\n"


def test_gloo_advice_is_left_out_of_one_line_errors() -> None:
    from moeplace.serve.dist import distributed_failure, error_text

    e = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5000. This is "
                     "typically caused by a remote worker crashing. GLHF!\nmore")
    assert error_text(e) == "[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5000."
    assert str(distributed_failure(1, e)).endswith("peer [127.0.0.1]:5000.")


def test_one_rank_is_worded_as_one(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "placement is for 2 GPUs but 1 ranks are running"."""
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    assert run(["serve", "--model", str(model[0]), "--placement", str(placement), "--port", "0"]) == 2
    assert "placement is for 2 GPUs but 1 rank is running" in capsys.readouterr().err


def test_a_stopped_rank_ends_the_run_within_a_few_seconds_of_the_timeout(model: tuple[Path, list[list[int]]],
                                                                        tmp_path: Path) -> None:
    """Before: rank 0's "lost contact" line came after --timeout, then the launcher waited out
    torch's 30 s SIGTERM grace on the stopped rank before SIGKILL."""
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    proc = serve_launcher(["--model", str(model[0]), "--placement", str(placement), "--port", "0", "--timeout", "2"],
                          tmp_path / "tmp")
    ranks: list[int] = []
    try:
        _, ranks = wait_for_server(proc)
        os.kill(rank_pid(ranks, 1), signal.SIGSTOP)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - start < 2 + 12, err  # the timeout, the grace (3 s), slack for a busy machine
        assert proc.returncode == 2 and "lost contact with a peer rank" in err and "Traceback" not in err, err
        assert "GLHF" not in err and "typically caused" not in err
    finally:
        reap(proc, ranks)


def test_a_slow_prompts_file_on_rank_0_is_not_a_timeout(model: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    """Before: the other ranks waited for rank 0's verdict under --timeout; tokenising a large
    prompts file for longer than that failed with "lost contact with a peer rank"."""
    path, expected = model
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPT_IDS) + "\n")
    out = tmp_path / "out.jsonl"
    code = ("import sys, time\nimport moeplace.serve.cli as c\nread = c.read_prompts\n"
            "def slow(*a):\n    time.sleep(2)  # rank 0 only reads the prompts\n    return read(*a)\n"
            "c.read_prompts = slow\nfrom moeplace.cli import entry\nsys.argv = ['moeplace', *sys.argv[1:]]\nentry()\n")
    args = ["serve", "--model", str(path), "--placement", str(placement), "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "6", "--ignore-eos", "--timeout", "1", "--mode", "standard"]
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        errs = [p.communicate(timeout=180)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs
        assert [json.loads(line)["token_ids"] for line in out.read_text().splitlines()] == expected
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


# --- trace tour fixes -----------------------------------------------------------------------------

def test_an_output_inside_the_model_directory_is_refused(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `--out CKPT/model.safetensors` served, then replaced the weights with generations."""
    import shutil

    victim = tmp_path / "victim"
    shutil.copytree(model[0], victim)
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n')
    for option, name in (("--out", "model.safetensors"), ("--stats-out", "config.json"),
                         ("--routing-out", "new.npz"), ("--out", "../victim/sub/o.jsonl")):
        out = victim / name
        assert run(["serve", "--model", str(victim), "--prompts", str(prompts), option, str(out),
                    "--nproc-per-node", "2", "--device", "cpu"]) == 2  # refused before the ranks start
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"moeplace: error: {option} {out}: is inside the --model directory {victim} (it would "
                       "replace or add to the files this run reads); write the output elsewhere"], err
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before


def test_short_grace_caps_torch_wait_and_leaves_an_unknown_signature_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher caps torch's private 30 s SIGTERM -> SIGKILL wait; a changed signature is left as it is."""
    from torch.distributed.elastic.multiprocessing import api

    from moeplace.serve import launch

    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)  # restored after the test
    waits: list[int] = []

    def close(self: Any, death_sig: Any = None, timeout: int = 30) -> None:
        waits.append(timeout)

    monkeypatch.setattr(api.PContext, "close", close)
    launch._short_grace()
    api.PContext.close(object())  # the agent's call, with torch's default
    api.PContext.close(object(), None, 1)  # a shorter wait stays shorter
    assert waits == [launch.SHUTDOWN_GRACE_S, 1]
    launch._short_grace()  # idempotent: not wrapped twice
    api.PContext.close(object())
    assert waits[-1] == launch.SHUTDOWN_GRACE_S and len(waits) == 3

    def moved(self: Any, timeout: int = 30, death_sig: Any = None) -> None:
        waits.append(timeout)

    monkeypatch.setattr(api.PContext, "close", moved)
    launch._short_grace()
    assert api.PContext.close is moved


class _FailingRuntime:
    """Runs nothing: its first batch waits for `release`, then fails as a dead rank would."""

    def __init__(self, started: Any, release: Any) -> None:
        from types import SimpleNamespace

        self.started, self.release = started, release
        self.model = SimpleNamespace(spec=SimpleNamespace(vocab_size=100, max_positions=64, eos_token_ids=[0]))
        self.comm = SimpleNamespace(world=1)  # no broadcasts
        self.mode, self.record_routing = "standard", False

    def generate(self, prompts: list[list[int]], max_new: list[int], ignore_eos: bool, sampling: Any = None,
                 on_step: Any = None, logprobs: int | None = None) -> Any:
        self.started.set()
        self.release.wait(30)
        raise RuntimeError("rank 1 died")


def test_queued_requests_get_503_when_the_runtime_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: only the running batch and `waiting` were answered; jobs still in the queue
    waited on `done` until the process died (here: until the client's timeout)."""
    import threading

    from moeplace.serve.httpserver import make_server, serve_forever
    from moeplace.serve.openai import Job

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)  # no launcher to watch
    started, release = threading.Event(), threading.Event()
    server = make_server("127.0.0.1", 0)
    port = server.server_address[1]
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            rt: Any = _FailingRuntime(started, release)
            serve_forever(rt, server, None, 1, 16, heartbeat_s=0.1, model_name="m",
                          placement={"placement": CONTIGUOUS, "placement_sha256": None})
        except BaseException as e:
            failure.append(e)

    answers: list[tuple[int, str]] = []

    def client() -> None:
        code, body, _ = http(port, "/v1/completions", json.dumps({"prompt": [1, 2], "max_tokens": 2}).encode())
        answers.append((code, json.loads(body)["error"]["message"]))

    main = threading.Thread(target=loop, daemon=True)
    main.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    clients[0].start()
    assert started.wait(20), "the first request never ran"
    for c in clients[1:]:  # queued behind the running batch
        c.start()
    deadline = time.monotonic() + 20
    while server.jobs.qsize() < 3:
        assert time.monotonic() < deadline, "the requests never reached the queue"
        time.sleep(0.02)
    release.set()
    start = time.monotonic()
    for c in clients:
        c.join(timeout=10)
    main.join(timeout=10)
    assert not any(c.is_alive() for c in clients) and time.monotonic() - start < 5, answers
    assert answers == [(503, "runtime failed: rank 1 died")] * 4
    assert [type(e) for e in failure] == [RuntimeError] and not main.is_alive()
    # closing: nothing is queued any more, whoever asks
    assert server.closing == "runtime failed: rank 1 died"
    assert not server.submit(Job([[1]], 1, False)) and server.jobs.empty()
    assert server.stats.snapshot().rejected == 4


def test_dtype_takes_evals_spelling_too(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Before: serve took float32|bfloat16|float16 only, eval bf16|fp16|fp32 only."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT_IDS[0]}) + "\n")
    for given, stored in (("bf16", "bfloat16"), ("fp32", "float32"), ("float16", "float16")):
        stats = tmp_path / f"{given}.json"
        assert run(["serve", "--model", str(model[0]), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                    "--stats-out", str(stats), "--max-new-tokens", "2", "--dtype", given]) == 0
        assert json.loads(stats.read_text())["dtype"] == stored
    assert "of 8 experts in each of 2 MoE layers" in capsys.readouterr().err


def test_the_loaded_line_counts_experts_per_layer() -> None:
    """Before: "done rank 0: 32 experts" on a 16-expert model (8 per layer, summed over 4 layers)."""
    assert held_experts([[0, 1, 2, 3, 4, 5, 6, 7]] * 4, 16) == \
        "8 of 16 experts in each of 4 MoE layers (32 expert FFNs, replicas included)"
    assert held_experts([[0, 1], [2, 3, 4]], 4) == \
        "2-3 of 4 experts per MoE layer over 2 layers (5 expert FFNs, replicas included)"
    assert held_experts([[0]], 4) == "1 of 4 experts in the MoE layer (1 expert FFN, replicas included)"


def test_bytes_per_token_are_per_token_the_phase_processed() -> None:
    """Before: serve divided decode bytes by the tokens generated (32 for 2 x 16), eval by the
    tokens decoded (30), under the same key."""
    c = Counters(num_moe_layers=1)
    c.record("dispatch", rows=10, nbytes=3000, layer=0)
    c.tokens["decode"], c.steps["decode"] = 30, 15
    s = c.summary("decode", per_token=True)
    assert s["alltoall_bytes_per_token"] == 100.0 and s["all_bytes_per_token"] == 100.0
    assert "alltoall_bytes_per_token" not in c.summary("decode")


def test_stats_snapshot_is_consistent_while_updated() -> None:
    """Before: handler threads did `stats.rejected += 1` (lost updates) while the main thread
    wrote the other fields one by one, and /metrics read them mid-update."""
    import threading

    stats = Stats()
    stop = threading.Event()

    def batches() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            stats.record_batch(1, 2, 0.5, {"batches": n})

    def rejections() -> None:
        for _ in range(5000):
            stats.reject()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    threads = [threading.Thread(target=batches)] + [threading.Thread(target=rejections) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        snaps = [stats.snapshot() for _ in range(3000)]
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
    for s in snaps:  # every field from the same batch
        assert s.generated_tokens == 2 * s.requests and s.decode_seconds == 0.5 * s.requests
        assert s.counters.get("batches", 0) == s.requests and s.last_tokens_per_s in (0.0, 4.0)
    final = stats.snapshot()
    assert final.rejected == 4 * 5000 and final.requests >= snaps[-1].requests
    assert final is not stats and final.lock is not stats.lock
    stats.reject()
    assert final.rejected == 4 * 5000  # a copy: later updates leave it as it was


def test_fingerprint_covers_gpus_per_node_and_dtype() -> None:
    """Before: ranks that differed only in gpus_per_node (the replica rule reads it) or in
    --dtype (the packed row width) passed the agreement check."""
    from types import SimpleNamespace

    from moeplace.serve.engine import fingerprint, resolve_dtype
    from moeplace.solve.baselines import contiguous

    spec: Any = SimpleNamespace(family="qwen3_moe", num_layers=3, hidden_size=16, vocab_size=100, num_experts=8, top_k=2,
                           moe_layers=[1, 2])
    one_node, two_nodes = (Placement(contiguous(2, 8, 4), num_gpus=4, gpus_per_node=n) for n in (4, 2))
    assert fingerprint(spec, one_node, "standard") == fingerprint(spec, Placement(contiguous(2, 8, 4), 4, 4), "standard")
    assert fingerprint(spec, one_node, "standard") != fingerprint(spec, two_nodes, "standard")
    prints = {fingerprint(spec, one_node, "standard", d) for d in (None, torch.float32, torch.bfloat16, torch.float16)}
    assert len(prints) == 4
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert (resolve_dtype(None, cpu), resolve_dtype(None, cuda), resolve_dtype("float16", cpu)) == \
        (torch.float32, torch.bfloat16, torch.float16)


def test_pack_refuses_rows_that_cannot_carry_the_metadata() -> None:
    """Before: float64 rows failed in `view` on an odd metadata width and unpacked with scale 0
    (empty metadata) otherwise."""
    from moeplace.errors import MoeplaceError
    from moeplace.serve.dist import pack, unpack

    ids, weights = torch.tensor([[3, 1], [0, 2]], dtype=torch.int32), torch.tensor([[0.25, 0.75], [1.0, 0.0]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        h = torch.randn(2, 6).to(dtype)
        rows = pack(h, ids, weights)
        rh, rids, rweights = unpack(rows, 6, [(2, torch.int32), (2, torch.float32)])
        assert torch.equal(rh, h) and torch.equal(rids, ids) and torch.equal(rweights, weights)
    for dtype in (torch.float64, torch.uint8):
        with pytest.raises(MoeplaceError, match="16- or 32-bit dtype"):
            pack(torch.zeros(2, 6, dtype=dtype), ids)
        with pytest.raises(MoeplaceError, match="16- or 32-bit dtype"):
            unpack(torch.zeros(2, 8, dtype=dtype), 6, [(2, torch.int32)])


DEEP = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit


def test_deeply_nested_json_is_a_bad_request_or_one_line(tmp_path: Path) -> None:
    """Was a RecursionError: an HTTP handler crash, an "internal error" for a prompts file."""
    from moeplace.errors import MoeplaceError
    from moeplace.serve.cli import read_prompts

    with pytest.raises(BadRequest, match=r"body is not valid JSON \(nested too deeply\)"):
        parse_completion(DEEP.encode(), None, 100, 64, 16)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n' + DEEP + "\n")
    with pytest.raises(MoeplaceError, match=r"p.jsonl:2: not valid JSON \(nested too deeply\)"):
        read_prompts(str(prompts), None, 100, 64, 4)


@pytest.mark.parametrize("value, message", [("nan", "'nan' is not a finite number"), ("inf", "1000000"),
                                            ("1e20", "1000000"), ("0.5", "0.5")])
def test_timeout_must_be_a_finite_number_of_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str,
                                                    message: str) -> None:
    """click's FloatRange(1.0) let nan and inf through, and 1e20 s overflows the collectives' timeout."""
    assert run(["serve", "--model", str(tmp_path), "--prompts", "x.txt", "--timeout", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--timeout" in err[0] and message in err[0], err


def test_batch_names_its_placement_and_the_files_it_wrote(model: tuple[Path, list[list[int]]], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Before: no line said which placement a run applied, and a batch run wrote --out without
    the `wrote FILE` line every other command prints."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT_IDS[0]}) + "\n")
    out, stats = tmp_path / "o.jsonl", tmp_path / "s.json"
    base = ["serve", "--model", str(model[0]), "--prompts", str(prompts), "--max-new-tokens", "2"]
    assert run([*base, "--out", str(out), "--stats-out", str(stats)]) == 0
    got = capsys.readouterr()
    assert got.out.splitlines() == [f"wrote {out}: 1 generation, 2 tokens", f"wrote {stats}: counters of 1 rank (coherent)"]
    assert "moeplace serve: batch of 1 prompt (1 rank, coherent); placement contiguous (no --placement)" in got.err
    s = json.loads(stats.read_text())
    assert (s["placement"], s["placement_sha256"]) == (CONTIGUOUS, None)
    assert s["decode"]["rank_expert_tokens_per_layer"] == [[2], [2]]  # 1 token decoded, top-2, one rank
    # generations on stdout: stdout stays JSONL, the other files are named on stderr
    placement = save_placement(tmp_path / "one.json", 2, 8, 1)
    assert run([*base, "--stats-out", str(stats), "--placement", str(placement)]) == 0
    got = capsys.readouterr()
    assert [json.loads(line)["index"] for line in got.out.splitlines()] == [0]
    assert f"wrote {stats}: counters of 1 rank (coherent)" in got.err
    sha = hashlib.sha256(placement.read_bytes()).hexdigest()[:12]
    assert f"; placement {placement} (sha256 {sha})" in got.err
    assert json.loads(stats.read_text())["placement_sha256"] == sha


def test_max_new_tokens_help_says_it_caps_http_requests(capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "Greedy tokens per prompt (a JSONL max_tokens overrides it)", silent on the HTTP cap."""
    assert run(["serve", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "HTTP: the most a request's max_tokens may ask for (more is a 400)" in text
