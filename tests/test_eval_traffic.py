"""`moeplace eval --model/--hidden-size`: the predicted Alltoall bytes equal what `moeplace serve`
measures for the routing it recorded (issue 4: within 1%), and bad traffic options fail cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.models.tiny import build_tiny_model
from moeplace.placement import Placement
from moeplace.solve.baselines import random_balanced
from moeplace.trace.format import Trace, make_trace, save_trace


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen3-MoE: top-2 over 8 experts, 3 decoder layers (2 MoE), hidden 32."""
    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("eval-traffic") / "qwen3", num_experts=8, top_k=2,
                            num_layers=3, seed=2)


def eval_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert run(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_predicts_measured_serve_bytes(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    placement = tmp_path / "p.json"
    Placement(random_balanced(2, 8, 2, 3), num_gpus=2, gpus_per_node=2).save(placement)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ([5, 6, 7, 8, 9], [10, 11, 12], [40] * 7)) + "\n")
    stats, routing = tmp_path / "stats.json", tmp_path / "routing.npz"
    cmd = [sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2", "--device", "cpu", "--model", str(model), "--placement", str(placement), "--prompts", str(prompts),
           "--out", str(tmp_path / "out.jsonl"), "--stats-out", str(stats), "--routing-out", str(routing),
           "--max-new-tokens", "8", "--ignore-eos", "--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(stats.read_text())
    assert measured["mode"] == "coherent" and measured["dtype"] == "float32"

    report = eval_json(capsys, str(placement), str(routing), "--model", str(model), "--dtype", "fp32")
    assert report["traffic"]["hidden_size"] == 32 and report["traffic"]["element_bytes"] == 4
    predicted = report["layouts"]["placement"]["traffic"]["coherent"]
    decode = measured["decode"]
    assert decode["alltoall_bytes"] > 0
    assert abs(predicted["alltoall_bytes"] - decode["alltoall_bytes"]) <= 0.01 * decode["alltoall_bytes"]
    assert predicted["dispatch_rows"] == decode["dispatch"]["rows"]
    assert predicted["combine_rows"] == decode["combine"]["rows"]
    assert predicted["cross_rank_rows_per_layer"] == decode["cross_rank_rows_per_layer"]
    assert predicted["alltoalls_per_layer"] == decode["alltoalls_per_layer_step"]
    # K/V replication: every decoded token's entries of all 3 layers go to the other rank
    assert predicted["kv_sync_bytes_per_token"] * predicted["tokens"] == decode["kv_sync"]["bytes"]

    # --hidden-size gives the same payload prediction; the ratios are against standard + contiguous
    by_size = eval_json(capsys, str(placement), str(routing), "--hidden-size", "32", "--dtype", "fp32")
    assert by_size["layouts"]["placement"]["traffic"]["coherent"]["alltoall_bytes"] == predicted["alltoall_bytes"]
    assert "kv_sync_bytes_per_token" not in by_size["layouts"]["placement"]["traffic"]["coherent"]
    base = by_size["layouts"]["contiguous"]["traffic"]["standard"]
    assert base["vs_standard_contiguous"] == 1.0
    assert predicted["vs_standard_contiguous"] == pytest.approx(
        predicted["alltoall_bytes_per_token"] / base["alltoall_bytes_per_token"])


@pytest.fixture
def routing_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 2-GPU placement, a routing trace with sequences and one without."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(12)])
    placement = tmp_path / "p.json"
    Placement(random_balanced(2, 8, 2, 1), num_gpus=2, gpus_per_node=2).save(placement)
    routed, bare = tmp_path / "routing.npz", tmp_path / "bare.npz"
    save_trace(make_trace(ids, None, 8, sequence_ids=np.repeat([0, 1, 2], 4), positions=np.tile(np.arange(4), 3)),
               routed)
    save_trace(make_trace(ids, None, 8), bare)
    return placement, routed, bare


def test_table_shows_modes_and_ratio(routing_files: tuple[Path, Path, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, _ = routing_files
    assert run(["eval", str(placement), str(routed), "--hidden-size", "64", "--runtime-mode", "standard"]) == 0
    out = capsys.readouterr().out
    assert "predicted decode Alltoall traffic" in out and "x standard+contiguous" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["placement", "standard"],
                                                                              ["contiguous", "standard"])]
    assert len(rows) == 2 and all(r[1] == "standard" for r in rows)
    assert not any(line.split()[:1] == ["placement"] and "coherent" in line for line in out.splitlines())
    assert rows[1][6] == "1.00x"  # contiguous + standard is the reference


def test_without_options_the_report_is_unchanged(routing_files: tuple[Path, Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, _ = routing_files
    report = eval_json(capsys, str(placement), str(routed))
    assert "traffic" not in report and all("traffic" not in m for m in report["layouts"].values())
    assert run(["eval", str(placement), str(routed)]) == 0
    assert "predicted" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "fp32"], "need --hidden-size or --model"),
    (["--hidden-size", "8", "--model", "."], "not both"),
    (["--model", "no-such-dir"], "cannot read config.json"),
    (["--hidden-size", "0"], "Invalid value"),
])
def test_bad_traffic_options(routing_files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
                             extra: list[str], message: str) -> None:
    placement, routed, _ = routing_files
    assert run(["eval", str(placement), str(routed), *extra]) == 2
    assert message in capsys.readouterr().err


def test_trace_without_sequences_or_for_another_model(routing_files: tuple[Path, Path, Path], model: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, bare = routing_files
    assert run(["eval", str(placement), str(bare), "--hidden-size", "16"]) == 2
    assert "sequence_ids" in capsys.readouterr().err
    config = tmp_path / "other" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({**json.loads((model / "config.json").read_text()), "num_local_experts": 16}))
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "not the model of" in capsys.readouterr().err
    config.write_text(json.dumps({**json.loads((model / "config.json").read_text()), "num_experts_per_tok": 1}))
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "8 experts top-1, the trace 8 experts top-2" in capsys.readouterr().err
    config.write_text("{not json")
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


CONFIG = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_local_experts": 8, "num_experts_per_tok": 2}


def test_model_config_shape_is_used(routing_files: tuple[Path, Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, _ = routing_files
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))  # no head_dim: 32 // 4
    report = eval_json(capsys, str(placement), str(routed), "--model", str(tmp_path / "m"))
    assert report["traffic"]["kv_bytes_per_rank"] == 3 * (2 * 2 * 8 * 2 + 12)  # layers * ([k|v] bf16 + 12)


@pytest.mark.parametrize("change, message", [
    ({"num_attention_heads": 0}, "config.json num_attention_heads must be >= 1, got 0"),  # was ZeroDivisionError
    ({"hidden_size": -64}, "config.json hidden_size must be >= 1, got -64"),  # was a negative prediction
    ({"num_hidden_layers": 0}, "config.json num_hidden_layers must be >= 1, got 0"),
    ({"num_key_value_heads": -2}, "config.json num_key_value_heads must be >= 1, got -2"),
    ({"num_key_value_heads": 3}, "config.json num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"head_dim": -8}, "config.json head_dim must be >= 1, got -8"),
    ({"hidden_size": 64.5}, "config.json hidden_size must be an integer, got 64.5"),  # int() made it 64
    ({"num_attention_heads": True}, "config.json num_attention_heads must be an integer, got True"),
    ({"num_local_experts": 0}, "config.json num_local_experts must be >= 1, got 0"),
    ({"num_experts_per_tok": 9}, "config.json num_experts_per_tok 9 is not in [1, 8]"),
    ({"num_attention_heads": 64, "num_key_value_heads": 8},
     "config.json has no head_dim and hidden_size 32 < num_attention_heads 64"),
    ({"hidden_size": None}, "config.json has no hidden_size"),
    ({"num_local_experts": None}, "config.json has no num_local_experts or num_experts or n_routed_experts"),
])
def test_bad_model_config_is_one_line(routing_files: tuple[Path, Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], change: dict, message: str) -> None:
    placement, routed, _ = routing_files
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    cfg = {key: value for key, value in {**CONFIG, **change}.items() if value is not None}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert run(["eval", str(placement), str(routed), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert f"--model {model_dir}: {message}" in err and len(err.strip().splitlines()) == 1, err


def test_config_that_is_not_an_object(routing_files: tuple[Path, Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, _ = routing_files
    (tmp_path / "config.json").write_text("[1, 2]")
    assert run(["eval", str(placement), str(routed), "--model", str(tmp_path)]) == 2
    assert "config.json is not a JSON object" in capsys.readouterr().err


def per_step_serving_gpus(placement: Placement, trace: Trace, mode: str) -> np.ndarray:
    """serving_gpus written as the rule says, one decode step at a time: step i holds each
    sequence's i-th token by position, ordered by sequence id (the reference for the grouping)."""
    from moeplace.eval.metrics import serve_layer

    seq, pos = trace.sequence_ids, trace.positions
    assert seq is not None and pos is not None
    gpus = placement.expert_to_gpu[np.arange(trace.num_layers)[None, :, None], trace.topk_ids]
    step, prev = {}, {}
    for s in np.unique(seq):
        mine = sorted(np.flatnonzero(seq == s), key=lambda t: pos[t])
        for i, t in enumerate(mine):
            step[t], prev[t] = i, mine[i - 1] if i else -1
    for i in range(max(step.values()) + 1):
        tok = np.array(sorted((t for t in step if step[t] == i), key=lambda t: seq[t]))
        here = np.array([gpus[prev[t], -1, 0] if mode == "coherent" and prev[t] >= 0 else seq[t] % placement.num_gpus
                         for t in tok])
        for layer in range(trace.num_layers):
            if placement.replicas[layer]:
                gpus[tok, layer] = serve_layer(placement.holders(layer), trace.topk_ids[tok, layer], gpus[tok, layer],
                                               here, placement.gpus_per_node, placement.num_gpus)
            if mode == "coherent":
                here = gpus[tok, layer, 0]
    return gpus


@pytest.mark.parametrize("mode", ["standard", "coherent"])
def test_step_grouping_matches_a_per_step_loop(mode: str) -> None:
    """Replicas on 2 nodes x 2 GPUs, 23 sequences of 1..40 tokens with gaps in ids and positions,
    tokens shuffled: serving_gpus (tokens grouped by step once) equals the per-step loop exactly."""
    from moeplace.eval.traffic import serving_gpus

    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 41, size=23)
    seq = np.repeat(rng.choice(1000, size=23, replace=False), lengths)
    pos = np.concatenate([np.sort(rng.choice(100, size=n, replace=False)) for n in lengths])
    shuffle = rng.permutation(len(seq))
    hot = np.array([8.0, 4, 2, 1, 1, 1, 1, 1])  # skewed, so replicas of hot experts are used
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False, p=hot / hot.sum()) for _ in range(3)])
                    for _ in range(len(seq))])
    trace = make_trace(ids[shuffle], None, 8, sequence_ids=seq[shuffle], positions=pos[shuffle])
    placement = Placement(random_balanced(3, 8, 4, 5), num_gpus=4, gpus_per_node=2,
                          replicas=[[(0, 1), (0, 3), (1, 0)], [], [(0, 0), (2, 3)]])
    expected = per_step_serving_gpus(placement, trace, mode)
    got = serving_gpus(placement, trace, mode)
    assert (got != placement.expert_to_gpu[np.arange(3)[None, :, None], trace.topk_ids]).any()  # replicas used
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
