"""`moeplace eval --model/--hidden-size`: the traffic report, its step grouping, and bad traffic options.
That the prediction equals what `moeplace serve` measures is checked on a real two-rank run in
test_serve_cli.py (test_torchrun_batch_matches_transformers_and_prediction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.eval.metrics import serve_layer
from moeplace.errors import TraceError
from moeplace.eval.traffic import dispatch_row_bytes, predict_traffic, serving_gpus
from moeplace.placement import Placement
from moeplace.solve.baselines import random_balanced
from moeplace.trace.format import Trace, make_trace, save_trace


CONFIG = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "num_local_experts": 8, "num_experts_per_tok": 2}


def eval_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert run(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


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


def test_trace_without_sequences_or_for_another_model(routing_files: tuple[Path, Path, Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, bare = routing_files
    assert run(["eval", str(placement), str(bare), "--hidden-size", "16"]) == 2
    assert "sequence_ids" in capsys.readouterr().err
    config = tmp_path / "other" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({**CONFIG, "num_local_experts": 16}))
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "not the model of" in capsys.readouterr().err
    config.write_text(json.dumps({**CONFIG, "num_experts_per_tok": 1}))
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "8 experts top-1, the trace 8 experts top-2" in capsys.readouterr().err
    config.write_text("{not json")
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_model_config_shape_is_used(routing_files: tuple[Path, Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, _ = routing_files
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIG))  # no head_dim: 32 // 4
    report = eval_json(capsys, str(placement), str(routed), "--model", str(tmp_path / "m"))
    assert report["traffic"]["kv_bytes_per_rank"] == 3 * (2 * 2 * 8 * 2 + 12)  # layers * ([k|v] bf16 + 12)
    assert report["traffic"]["hidden_size"] == 32 and report["traffic"]["element_bytes"] == 2

    # --hidden-size gives the same payload prediction, without the K/V term it cannot know
    by_size = eval_json(capsys, str(placement), str(routed), "--hidden-size", "32")
    for mode in ("standard", "coherent"):
        model_pred = report["layouts"]["placement"]["traffic"][mode]
        size_pred = by_size["layouts"]["placement"]["traffic"][mode]
        assert size_pred["alltoall_bytes"] == model_pred["alltoall_bytes"] > 0
        assert "kv_sync_bytes_per_token" not in size_pred
        # the ratio column is against standard Alltoalls on the contiguous layout
        base = by_size["layouts"]["contiguous"]["traffic"]["standard"]["alltoall_bytes_per_token"]
        assert size_pred["vs_standard_contiguous"] == pytest.approx(size_pred["alltoall_bytes_per_token"] / base)


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


def test_per_token_bytes_and_alltoall_counts_by_hand() -> None:
    # 2 GPUs, expert e on GPU e; sequences 0 and 1 (homes 0 and 1), top-1, 3 tokens, 1 MoE layer
    placement = Placement(np.array([[0, 1]]), num_gpus=2, gpus_per_node=2)
    trace = make_trace(np.array([[[1]], [[1]], [[0]]]), None, 2, sequence_ids=np.array([0, 1, 1]),
                       positions=np.array([0, 0, 1]))
    # standard: token 0 (home 0) goes to GPU 1 and back, token 1 is served at home (1), token 2
    # (home 1) goes to GPU 0 and back -> 2 dispatch + 2 combine rows; 2 Alltoalls a layer at top-1 too
    p = predict_traffic(placement, trace, "standard", hidden_size=4, element_bytes=2)
    row = dispatch_row_bytes(4, 1, 2)
    assert row == 4 * 2 + 4 * 3
    assert (p["dispatch_rows"], p["combine_rows"], p["alltoalls_per_layer"]) == (2, 2, 2)
    assert p["alltoall_bytes"] == 2 * row + 2 * 8
    assert p["alltoall_bytes_per_token"] == pytest.approx((2 * row + 2 * 8) / 3)
    # coherent: token 0 starts at home (0) -> 1 row; token 1 at home (1) -> none; token 2 starts
    # where token 1 ended (1) -> 1 row to expert 0; top-1 has no combine and one Alltoall per layer
    p = predict_traffic(placement, trace, "coherent", hidden_size=4, element_bytes=2)
    assert (p["dispatch_rows"], p["combine_rows"], p["alltoalls_per_layer"]) == (2, 0, 1)
    assert p["alltoall_bytes_per_token"] == pytest.approx(2 * row / 3)


def test_unknown_mode_and_missing_positions_are_refused() -> None:
    placement = Placement(np.array([[0, 1]]), num_gpus=2, gpus_per_node=2)
    no_positions = make_trace(np.array([[[1]], [[0]]]), None, 2, sequence_ids=np.array([0, 0]))
    with pytest.raises(TraceError, match="needs sequence_ids and positions"):
        predict_traffic(placement, no_positions, "coherent", 4, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        predict_traffic(placement, no_positions, "eager", 4, 2)
