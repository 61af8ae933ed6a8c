"""`moeplace analyze`: statistics on constructed traces with known answers, and the command."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeplace.analyze.affinity import (
    affinity,
    capture,
    conditional,
    conditional_entropy,
    entropy,
    gini,
    load_skew,
    mean_stats,
    mode_arrays,
    mode_counts,
    mutual_information,
    pair_counts,
    pair_stats,
    shuffle_perms,
    topm_capture,
    transition_counts,
)
from moeplace.analyze.stability import MIN_SIDE_TOKENS, compare_affinity, matrix_correlations, split_halves, stability
from moeplace.cli import run
from moeplace.trace.format import Trace, load_trace, make_loads, make_trace, save_loads, save_trace

from conftest import ROOT


def planted(num_tokens: int = 1024, num_layers: int = 4, num_experts: int = 16, seed: int = 0) -> Trace:
    """Top-2 trace whose top-1 expert at l+1 is a fixed permutation of the one at l.

    Top-1 at layer 0 is exactly uniform (num_tokens a multiple of E), so MI(top-1) = log E.
    The second choice is random (distinct from the first).
    """
    rng = np.random.default_rng(seed)
    top1 = np.empty((num_tokens, num_layers), dtype=np.int64)
    top1[:, 0] = rng.permutation(np.arange(num_tokens) % num_experts)
    for layer in range(1, num_layers):
        top1[:, layer] = rng.permutation(num_experts)[top1[:, layer - 1]]
    second = (top1 + rng.integers(1, num_experts, top1.shape)) % num_experts
    ids = np.stack([top1, second], axis=-1)
    w = np.stack([np.full(top1.shape, 0.7), np.full(top1.shape, 0.3)], axis=-1).astype(np.float32)
    seqs = np.repeat(np.arange(num_tokens // 8), 8)
    return make_trace(ids, w, num_experts, sequence_ids=seqs, meta={"moe_layers": [3, 5, 7, 9][:num_layers]})


def shuffled_layers(trace: Trace, seed: int = 1) -> Trace:
    """The same trace with tokens permuted independently at every layer: no affinity left."""
    rng = np.random.default_rng(seed)
    ids = np.stack([trace.topk_ids[rng.permutation(trace.num_tokens), layer] for layer in range(trace.num_layers)], 1)
    return make_trace(ids, num_experts=trace.num_experts)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------


def test_load_skew_hand_computed() -> None:
    rows = load_skew(np.array([[2.0, 2, 2, 2], [8.0, 0, 0, 0], [3.0, 1, 0, 0]]), hottest=2)
    even, one_hot, mixed = rows
    assert even["max_over_mean"] == pytest.approx(1.0) and even["cv"] == pytest.approx(0.0)
    assert even["gini"] == pytest.approx(0.0) and even["entropy_frac"] == pytest.approx(1.0)
    assert one_hot["max_over_mean"] == pytest.approx(4.0) and one_hot["cv"] == pytest.approx(np.sqrt(3))
    assert one_hot["gini"] == pytest.approx(0.75) and one_hot["entropy_frac"] == pytest.approx(0.0)
    assert one_hot["unused"] == 3
    assert [h["expert"] for h in mixed["hottest"]] == [0, 1]
    assert [h["share"] for h in mixed["hottest"]] == pytest.approx([0.75, 0.25])
    # Gini of [0, 0, 1, 3] = sum_ij |xi - xj| / (2 n^2 mean) = (2 * 2 * 4 + 2 * 2) / 32
    assert mixed["gini"] == pytest.approx(20 / 32)
    assert gini(np.zeros((1, 4)))[0] == 0.0


def test_pair_counts_top1_topk_and_gated_by_hand() -> None:
    # one token, two layers, top-2: layer 0 experts (0, 1) gates (3, 1); layer 1 experts (2, 3) gates (1, 1)
    t = make_trace(np.array([[[0, 1], [2, 3]]]), np.array([[[3.0, 1.0], [1.0, 1.0]]], dtype=np.float32), 4)
    top1, topk, gated = (transition_counts(t, m)[0] for m in ("top1", "topk", "gated"))
    assert top1[0, 2] == 1.0 and top1.sum() == 1.0
    assert topk[[0, 0, 1, 1], [2, 3, 2, 3]] == pytest.approx([0.25] * 4) and topk.sum() == pytest.approx(1.0)
    assert gated[[0, 0, 1, 1], [2, 3, 2, 3]] == pytest.approx([0.375, 0.375, 0.125, 0.125])


def test_pair_counts_chunking_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    t = planted(256)
    whole = transition_counts(t, "gated")
    monkeypatch.setattr("moeplace.analyze.affinity._CHUNK_PAIRS", 7)  # many tiny chunks
    assert np.allclose(transition_counts(t, "gated"), whole)
    assert whole.sum(axis=(1, 2)) == pytest.approx([256] * 3)  # every token carries mass 1 per pair
    with pytest.raises(ValueError, match="both masses or neither"):
        pair_counts(t.topk_ids[:, :-1], t.topk_ids[:, 1:], 16, t.topk_weights[:, :-1], None)


def _token_major_counts(ids: np.ndarray, mass: np.ndarray | None, e: int, chunk: int,
                        perm: np.ndarray | None) -> np.ndarray:
    """The straightforward count: chunks of tokens, one bincount over [n, P, k, k] each."""
    cur, nxt = ids[:, :-1], ids[:, 1:]
    t, p, k = cur.shape
    counts = np.zeros(p * e * e)
    base = (np.arange(p) * e * e)[None, :, None, None]
    for start in range(0, t, chunk):
        rows = np.arange(start, min(start + chunk, t))
        other = rows if perm is None else perm[rows]
        index = (cur[rows] * e)[:, :, :, None] + nxt[other][:, :, None, :] + base
        w = None if mass is None else (mass[rows, :-1][:, :, :, None] * mass[other, 1:][:, :, None, :]).astype(np.float64)
        counts += np.bincount(index.ravel(), weights=None if w is None else w.ravel(), minlength=p * e * e)
    return (counts if mass is not None else counts / (k * k)).reshape(p, e, e)


def test_shared_pair_major_pass_is_the_token_major_count_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """mode_counts counts topk and gated in one pass, laid out pair by pair: the float sums of each
    cell must still be added in the token-major order, so the numbers are the same to the bit."""
    rng = np.random.default_rng(4)
    ids = np.argsort(rng.random((300, 5, 12)), axis=-1)[:, :, :3]  # top-3 of 12, distinct per token-layer
    # masses over 2^-40..1: a cell's sum needs more than 53 bits, so its order shows in the result
    weights = (rng.random((300, 5, 3)) * 2.0 ** -rng.integers(0, 40, (300, 5, 3))).astype(np.float32)
    t = make_trace(ids, weights, 12)
    monkeypatch.setattr("moeplace.analyze.affinity._CHUNK_PAIRS", 500)  # 13 tokens a chunk: 24 chunks
    chunk = 500 // (4 * 3 * 3)
    for perm in (None, shuffle_perms(300, 1, 9)[0]):
        got = mode_counts(t, ("top1", "topk", "gated"), perm)
        for mode in ("top1", "topk", "gated"):
            ids_m, mass = mode_arrays(t, mode)
            want = _token_major_counts(ids_m, mass, 12, 500 // (4 * ids_m.shape[2] ** 2), perm)
            assert got[mode].tobytes() == want.tobytes(), mode
            assert got[mode].tobytes() == transition_counts(t, mode, perm).tobytes(), mode
        # a different chunking gives different float sums: the test can tell orders apart
        gated = _token_major_counts(t.topk_ids, mode_arrays(t, "gated")[1], 12, chunk + 1, perm)
        assert gated.tobytes() != got["gated"].tobytes()


def test_mi_conditional_entropy_and_capture_by_hand() -> None:
    independent = np.outer([1.0, 3.0], [2.0, 2.0])[None]  # P(i, j) = P(i) P(j)
    diagonal = np.diag([5.0, 5.0])[None]
    assert mutual_information(independent)[0] == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(diagonal)[0] == pytest.approx(np.log(2))
    assert conditional_entropy(independent)[0] == pytest.approx(np.log(2))
    assert conditional_entropy(diagonal)[0] == pytest.approx(0.0)
    counts = np.array([[[6.0, 2.0, 0.0], [1.0, 1.0, 2.0], [0.0, 0.0, 0.0]]])
    assert conditional(counts)[0, 0] == pytest.approx([0.75, 0.25, 0.0])
    assert conditional(counts)[0, 2] == pytest.approx([0.0, 0.0, 0.0])  # unseen expert: zero row
    assert topm_capture(counts, 1)[0] == pytest.approx((6 + 2) / 12)
    assert topm_capture(counts, 2)[0] == pytest.approx((8 + 3) / 12)
    assert capture(counts, np.array([[[2], [2], [2]]]))[0] == pytest.approx(2 / 12)


def test_planted_transitions_have_mi_log_e_and_full_capture() -> None:
    t = planted()
    aff = affinity(t, num_shuffles=4, seed=0)
    log_e = np.log(t.num_experts)
    for row in aff["modes"]["top1"]["per_pair"]:
        assert row["mi"] == pytest.approx(log_e)
        assert row["mi_frac"] == pytest.approx(1.0)
        assert row["cond_entropy"] == pytest.approx(0.0, abs=1e-9)
        assert row["capture"] == pytest.approx({"1": 1.0, "2": 1.0, "4": 1.0})
        # the shuffled baseline is the small-sample bias only: far below log E, capture far below 1
        # (measured: 0.045, 0.12 and 0.96 log E; independent top-1 choices capture ~1/16 + noise)
        assert row["mi_baseline"] < 0.1 * log_e
        assert row["capture_baseline"]["1"] < 0.2
        assert row["mi_excess"] > 0.9 * log_e
    assert aff["conditional"]["top1"].shape == (3, 16, 16)
    assert np.allclose(aff["conditional"]["top1"].max(axis=-1), 1.0)  # each row one certain successor
    # top-k and gated modes see the affinity diluted by the random second choice, but clearly
    for mode in ("topk", "gated"):
        for row in aff["modes"][mode]["per_pair"]:
            assert row["mi"] > row["mi_baseline"] + 10 * row["mi_baseline_std"]


def test_shuffled_trace_mi_is_within_its_baseline() -> None:
    t = shuffled_layers(planted(2048, num_experts=8))
    aff = affinity(t, num_shuffles=16, seed=3)
    for mode in ("top1", "topk"):
        for row in aff["modes"][mode]["per_pair"]:
            assert row["mi"] > 0  # the plug-in estimate is biased upward ...
            assert abs(row["mi_excess"]) < 4 * row["mi_baseline_std"] + 1e-3  # ... by what the baseline says
            assert abs(row["capture"]["1"] - row["capture_baseline"]["1"]) < 0.05


def test_baseline_on_threads_is_the_serial_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shuffles are counted on one thread per CPU; the baseline is the same, bit for bit, as
    one thread counting them in order (and as the shuffles of shuffle_perms counted by hand)."""
    from moeplace import parallel
    from moeplace.analyze import affinity as aff_mod

    t = planted(512, num_experts=8)
    monkeypatch.setattr(parallel, "available_cpus", lambda: 3)
    threaded = affinity(t, num_shuffles=5, seed=2)
    monkeypatch.setattr(parallel, "available_cpus", lambda: 1)
    serial = affinity(t, num_shuffles=5, seed=2)
    assert threaded["modes"] == serial["modes"]
    perms = aff_mod.shuffle_perms(t.num_tokens, 5, 2)
    mi = np.stack([mutual_information(transition_counts(t, "gated", p)) for p in perms])
    for pair, row in enumerate(threaded["modes"]["gated"]["per_pair"]):
        assert row["mi_baseline"] == float(mi[:, pair].mean())
        assert row["mi_baseline_std"] == float(mi[:, pair].std())


def test_one_layer_and_top1_traces() -> None:
    one_layer = make_trace(np.arange(8).reshape(8, 1, 1) % 4, num_experts=4)
    assert affinity(one_layer, 2)["modes"] == {}
    top1 = make_trace(planted().topk_ids[:, :, 0], num_experts=16)
    assert list(affinity(top1, 2)["modes"]) == ["top1"]


# ---------------------------------------------------------------------------------------------
# stability
# ---------------------------------------------------------------------------------------------


def test_split_halves_by_sequence_and_by_token() -> None:
    t = planted(512)
    a, b, info = split_halves(t, seed=5)
    assert info["by"] == "sequence" and a.num_tokens + b.num_tokens == 512
    assert not set(a.sequence_ids.tolist()) & set(b.sequence_ids.tolist())
    again = split_halves(t, seed=5)[0]
    assert np.array_equal(again.sequence_ids, a.sequence_ids)  # seeded
    no_seq = make_trace(t.topk_ids, num_experts=16)
    a, b, info = split_halves(no_seq, seed=5)
    assert info["by"] == "token" and info["tokens"] == [256, 256]


def test_identical_traces_correlate_perfectly() -> None:
    t = planted(512)
    counts = transition_counts(t, "topk")
    rows = matrix_correlations(counts, counts)
    assert all(r["corr_joint"] == pytest.approx(1.0) and r["corr_excess"] == pytest.approx(1.0) for r in rows)
    res = compare_affinity(t, t)["topk"]["mean"]
    assert res["capture_heldout"] == pytest.approx(res["capture_in_sample"])


def test_planted_halves_transfer_and_shuffled_do_not() -> None:
    a, b, _ = split_halves(planted(1024), seed=0)
    res = compare_affinity(a, b)["top1"]["mean"]
    assert res["corr_excess"] > 0.95
    assert res["capture_heldout"]["1"] == pytest.approx(1.0)
    assert res["capture_heldout_marginal"]["1"] < 0.1  # busiest expert: ~1/16 of transitions (measured 0.041)
    # against a trace of the same model with no affinity, nothing transfers
    res = compare_affinity(a, shuffled_layers(b))["top1"]["mean"]
    assert abs(res["corr_excess"]) < 0.1  # (measured -0.020)
    assert res["capture_heldout"]["1"] < 0.1  # ~1/16 (measured 0.061)


# ---------------------------------------------------------------------------------------------
# command
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def planted_file(tmp_path: Path) -> Path:
    path = tmp_path / "planted.npz"
    save_trace(planted(512, num_experts=8), path)
    return path


def test_cli_writes_json_and_figures(planted_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other.npz"
    save_trace(shuffled_layers(planted(512, num_experts=8)), other)
    out = tmp_path / "new" / "dir"
    code = run(["analyze", str(planted_file), "--compare", str(other), "-o", str(out), "--no-solve",
                "--shuffles", "2", "--layers", "0,2"])
    assert code == 0
    report = json.loads((out / "analyze.json").read_text())
    assert report["format"] == "moeplace.analyze/v1"
    assert set(report["traces"]) == {"A", "B"}
    a_mi = report["traces"]["A"]["affinity"]["modes"]["top1"]["mean"]["mi_excess"]
    b_mi = report["traces"]["B"]["affinity"]["modes"]["top1"]["mean"]["mi_excess"]
    assert a_mi > 1.0 > 0.1 > b_mi
    assert report["traces"]["A"]["info"]["moe_layers"] == [3, 5, 7, 9]
    assert report["traces"]["A"]["verdict"]["significant_pairs"]["top1"] == 3
    assert report["traces"]["A"]["halves"]["split"]["by"] == "sequence"
    assert "placement" not in report["transfer"]  # --no-solve
    assert report["transfer"]["modes"]["top1"]["mean"]["capture_heldout"]["1"] < 0.3
    names = sorted(Path(p).name for p in report["figures"])
    assert names == ["affinity.png", "load_heatmap.png", "transitions.png"]
    for p in report["figures"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "Domain shift A -> B" in text and "transitions.png" in text
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_figures_say_which_file_is_a_and_which_b(planted_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The affinity plot's legends say "A"/"B" (file names there overflowed the panels): its title
    names the files, as the heatmaps' panel titles do."""
    from moeplace.analyze import plots

    other = tmp_path / "other.npz"
    save_trace(planted(512, num_experts=8, seed=7), other)
    titles: dict[str, str] = {}
    save = plots._save

    def record(fig: Any, path: Path) -> Path:
        titles[path.name] = fig._suptitle.get_text() if fig._suptitle else ""
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    assert run(["analyze", str(planted_file), "--compare", str(other), "-o", str(tmp_path / "o"), "--no-solve",
                "--shuffles", "2"]) == 0
    assert titles["affinity.png"] == "A (planted), B (other)"


def test_cli_with_solver(planted_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # B: the same model, but its chains follow other permutations (a different "domain")
    other = tmp_path / "other.npz"
    save_trace(planted(512, num_experts=8, seed=7), other)
    out = tmp_path / "o"
    assert run(["analyze", str(planted_file), "--compare", str(other), "-o", str(out), "--no-figures",
                "--shuffles", "2", "--gpus", "4", "--gpus-per-node", "2", "--time-limit", "1"]) == 0
    report = json.loads((out / "analyze.json").read_text())
    for name in ("A", "B"):  # within one domain a placement transfers between halves, both ways
        pl = report["traces"][name]["halves"]["placement"]
        assert pl["num_gpus"] == 4 and pl["gpus_per_node"] == 2
        for direction in ("a_to_b", "b_to_a"):
            on_target = pl[direction]["evaluated"]
            # the planted chains can each live on one GPU: both solved placements cut traffic to ~0
            assert on_target["solved_on_target"]["cross_gpu_top1"] < 0.05
            assert on_target["solved_on_source"]["cross_gpu_top1"] < 0.05
            assert on_target["contiguous"]["cross_gpu_top1"] > 0.3
            assert pl[direction]["transferred"]["cross_gpu_top1"] > 0.9
    across = report["transfer"]["placement"]["a_to_b"]
    assert across["evaluated"]["solved_on_target"]["cross_gpu_top1"] < 0.05
    assert across["transferred"]["cross_gpu_top1"] < 0.5  # A's chains are not B's
    # ratios to contiguous, as solve and eval print them; the absolute difference named as one
    text = capsys.readouterr().out
    ev = across["evaluated"]
    ratio = ev["solved_on_target"]["cross_gpu_top1"] / ev["contiguous"]["cross_gpu_top1"]
    assert "replayed on B (x: ratio to contiguous, lower is better):" in text
    assert f"solved on B {ratio:.2f}x of contiguous; reduction (contiguous - placement) " in text, text
    row = next(line for line in text.splitlines() if line.strip().startswith("solved on B ") and "x)" in line)
    assert f"({ratio:.2f}x)" in row and "gain over contiguous" not in text


def test_cli_one_layer_and_exflow_npy(tmp_path: Path) -> None:
    one_layer = tmp_path / "one.npz"
    save_trace(make_trace(np.arange(40).reshape(40, 1, 1) % 4, num_experts=4), one_layer)
    assert run(["analyze", str(one_layer), "-o", str(tmp_path / "a"), "--shuffles", "2"]) == 0
    report = json.loads((tmp_path / "a" / "analyze.json").read_text())
    assert report["traces"]["A"]["halves"] == {"skipped": "one MoE layer: no layer pairs"}
    assert [Path(p).name for p in report["figures"]] == ["load_heatmap.png"]
    # a re-run into the same directory that draws nothing removes the earlier run's figures
    # (they would pass for this run's), and nothing else: not a figure name its report does not list
    (tmp_path / "a" / "notes.txt").write_text("mine")
    (tmp_path / "a" / "transitions.png").write_bytes(b"mine too")
    assert run(["analyze", str(one_layer), "-o", str(tmp_path / "a"), "--shuffles", "2", "--no-figures"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["analyze.json", "notes.txt", "transitions.png"]
    npy = tmp_path / "exflow.npy"
    np.save(npy, planted(64, num_experts=8).topk_ids[:, :, 0])
    assert run(["analyze", str(npy), "-o", str(tmp_path / "b"), "--shuffles", "2", "--no-solve", "--no-figures"]) == 0
    modes = json.loads((tmp_path / "b" / "analyze.json").read_text())["traces"]["A"]["affinity"]["modes"]
    assert list(modes) == ["top1"] and modes["top1"]["mean"]["mi"] == pytest.approx(np.log(8))


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (hidden ones included) with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _interrupt(*args: object, **kwargs: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["moeplace.analyze.plots.transition_heatmaps", "moeplace.analyze.cli.write_json_atomic"])
def test_cli_interrupted_leaves_dir_as_it_was(where: str, planted_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # an interrupt after the first figure (or after every figure, before the JSON) is written
    other = tmp_path / "other.npz"
    save_trace(shuffled_layers(planted(512, num_experts=8)), other)
    out = tmp_path / "o"
    args = ["--no-solve", "--shuffles", "2", "-q"]
    assert run(["analyze", str(planted_file), "-o", str(out), *args]) == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    assert sorted(before) == ["affinity.png", "analyze.json", "load_heatmap.png", "notes.txt", "transitions.png"]
    monkeypatch.setattr(where, _interrupt)
    assert run(["analyze", str(other), "-o", str(out), *args]) == 130
    assert _snapshot(out) == before  # no new figure beside the old JSON, no temp files left
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    fresh = tmp_path / "fresh"
    assert run(["analyze", str(other), "-o", str(fresh), *args]) == 130
    assert list(fresh.iterdir()) == []  # no figures without their analyze.json
    monkeypatch.undo()  # the same run uninterrupted replaces every output, names the final paths
    assert run(["analyze", str(other), "-o", str(out), *args]) == 0
    after = _snapshot(out)
    assert sorted(after) == sorted(before) and after["notes.txt"] == before["notes.txt"]
    assert all(after[name] != before[name] for name in ("analyze.json", "load_heatmap.png"))
    report = json.loads(after["analyze.json"])
    assert report["json"] == str(out / "analyze.json")
    assert sorted(report["figures"]) == sorted(str(out / name) for name in
                                               ("affinity.png", "load_heatmap.png", "transitions.png"))


def test_cli_load_only_inputs(planted_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hot_first = tmp_path / "a.npz"
    save_loads(make_loads(np.array([[8.0, 4, 2, 2, 1, 1, 1, 1]] * 4)), hot_first)
    hot_last = tmp_path / "b.npz"
    save_loads(make_loads(np.array([[1.0, 1, 1, 1, 2, 2, 4, 8]] * 4)), hot_last)
    out = tmp_path / "o"
    assert run(["analyze", str(hot_first), "--compare", str(hot_last), "-o", str(out)]) == 0
    report = json.loads((out / "analyze.json").read_text())
    a = report["traces"]["A"]
    assert a["info"]["load_only"] and a["affinity"]["modes"] == {} and "skipped" in a["halves"]
    assert a["load"][0]["max_over_mean"] == pytest.approx(8 / 2.5)
    corr = report["transfer"]["load_corr"]
    assert corr["mean"] == pytest.approx(np.corrcoef([8, 4, 2, 2, 1, 1, 1, 1], [1, 1, 1, 1, 2, 2, 4, 8])[0, 1])
    assert "placement" not in report["transfer"] and "modes" not in report["transfer"]
    assert [Path(p).name for p in report["figures"]] == ["load_heatmap.png"]
    text = capsys.readouterr().out
    assert "load-only input" in text
    assert report["transfer"]["verdict"]["status"] == "not_measured"
    assert (f"Verdict [A vs B], domain shift: expert-load correlation only (mean {corr['mean']:.3f}; a load-only "
            "input has no per-token paths)") in text
    # a trace against loads of the same model: load correlation only
    assert run(["analyze", str(planted_file), "--compare", str(hot_last), "-o", str(out), "--no-solve",
                "--no-figures", "--shuffles", "2"]) == 0
    report = json.loads((out / "analyze.json").read_text())
    assert set(report["transfer"]) == {"load_corr", "verdict"} and report["traces"]["A"]["affinity"]["modes"]
    # the load-skew part's options apply to a load-only input
    assert run(["analyze", str(hot_first), "-o", str(out), "--hottest", "2", "--no-figures", "-q"]) == 0
    report = json.loads((out / "analyze.json").read_text())
    assert [h["expert"] for h in report["traces"]["A"]["load"][0]["hottest"]] == [0, 1] and report["figures"] == []


def _stage_holder(out: Path) -> subprocess.Popen:
    """Another process that has entered analyze's staging in `out` and waits there."""
    code = ("import sys, time; from pathlib import Path; from moeplace.analyze.cli import _staging\n"
            "with _staging(Path(sys.argv[1])) as stage:\n"
            "    (stage / 'analyze.json').write_text('{}'); print(stage, flush=True); time.sleep(300)")
    return subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)


@pytest.mark.skipif(sys.platform == "win32", reason="no flock: stages of killed runs are not swept")
def test_cli_removes_stages_of_killed_runs_never_of_live_ones(planted_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / ".analyze.notes.tmp").write_text("a file of that name is not a stage")
    live, killed = _stage_holder(out), _stage_holder(out)
    try:
        live_stage, killed_stage = (Path(p.stdout.readline().strip()) for p in (live, killed))  # type: ignore[union-attr]
        assert live_stage.is_dir() and killed_stage.is_dir()
        killed.kill()  # SIGKILL: no cleanup, its stage stays behind
        killed.wait()
        args = ["analyze", str(planted_file), "-o", str(out), "--no-solve", "--no-figures", "--shuffles", "2", "-q"]
        assert run(args) == 0
        assert not killed_stage.exists()
        assert live_stage.is_dir() and (live_stage / "analyze.json").read_text() == "{}"  # a live run's: kept
        assert sorted(p.name for p in out.iterdir()) == sorted([".analyze.notes.tmp", "analyze.json", live_stage.name])
    finally:
        live.kill()
        live.wait()
    assert run(args) == 0  # killed too now: the next run removes its stage
    assert sorted(p.name for p in out.iterdir()) == [".analyze.notes.tmp", "analyze.json"]


def test_flame_trace_has_affinity_above_shuffled(tmp_path: Path) -> None:
    path = ROOT / "traces" / "flame-moe-290m-decoder.npz"
    out = tmp_path / "flame"
    assert run(["analyze", str(path), "-o", str(out), "--no-solve", "--no-figures", "--shuffles", "4"]) == 0
    modes = json.loads((out / "analyze.json").read_text())["traces"]["A"]["affinity"]["modes"]
    for mode in ("top1", "topk", "gated"):
        for row in modes[mode]["per_pair"]:
            assert row["mi_excess"] > 5 * row["mi_baseline_std"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.npz"], "no such file"),
        (["{bad}"], "truncated or not an .npz"),
        (["{trace}", "--compare", "{other}"], "same model"),
        (["{trace}", "--layers", "5"], "pair indices must be in [0, 2]"),
        (["{trace}", "--layers", "a-b"], "expected comma-separated"),
        (["{trace}", "--gpus", "3"], "cannot be split equally"),
        (["{trace}", "--gpus", "4", "--gpus-per-node", "3"], "not a multiple"),
        (["{trace}", "-o", "{bad}"], "not a directory"),
        (["{top1}", "--heatmap-mode", "gated"], "not available"),
        (["{npy_as_npz}"], "holds one .npy array"),
        (["{trace}", "--layers", "2-1"], "expected comma-separated"),
        # options that cannot apply to a load-only input are refused, not silently ignored
        (["{loads}", "--shuffles", "2"], "--shuffles: not applicable to a load-only input"),
        (["{loads}", "--gpus", "4", "--no-solve", "--seed", "1"], "--gpus, --no-solve, --seed: not applicable"),
        (["{loads}", "--time-limit", "1", "--gpus-per-node", "2"], "--gpus-per-node, --time-limit: not applicable"),
        (["{loads}", "--layers", "0"], "--layers: not applicable to a load-only input"),
        (["{loads}", "--heatmap-mode", "top1"], "--heatmap-mode: not applicable to a load-only input"),
        (["{trace}", "--compare", "{loads}", "--layers", "0"], "--layers: the transition heatmaps need per-token"),
        (["{loads}", "--compare", "{trace}", "--heatmap-mode", "top1"], "loads.npz is load-only"),
        (["{one_layer}", "--layers", "0"], "one MoE layer, so no layer pairs"),
    ],
)
def test_cli_bad_input_is_one_line(args: list[str], message: str, planted_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(planted_file.read_bytes()[:100])
    other = tmp_path / "other.npz"
    save_trace(make_trace(np.zeros((4, 2, 1), dtype=np.int64), num_experts=8), other)
    top1 = tmp_path / "top1.npz"
    save_trace(make_trace(planted(64, num_experts=8).topk_ids[:, :, :1], num_experts=8), top1)
    npy_as_npz = tmp_path / "npy.npz"
    with open(npy_as_npz, "wb") as f:
        np.save(f, np.zeros((4, 2), dtype=np.int64))
    loads = tmp_path / "loads.npz"
    save_loads(make_loads(np.ones((4, 8))), loads)  # planted_file's model: 4 MoE layers x 8 experts
    one_layer = tmp_path / "one.npz"
    save_trace(make_trace(np.arange(40).reshape(40, 1, 1) % 4, num_experts=4), one_layer)
    paths = {"trace": planted_file, "bad": bad, "other": other, "top1": top1, "npy_as_npz": npy_as_npz, "loads": loads,
             "one_layer": one_layer}
    argv = ["analyze", *(a.format(**paths) for a in args), "--no-figures"]
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeplace: error:") and message in err[0], err


@pytest.mark.parametrize("args, message", [
    (["--gpus", "16"], "--gpus 16 for 8 experts: some GPU would hold no expert; give --gpus one of 1, 2, 4, 8"),
    (["--gpus", "3"], "--gpus 3: 8 experts per layer cannot be split equally over 3 GPUs (8 % 3 = 2): give --gpus "
                      "one of 1, 2, 4, 8"),
    (["--gpus-per-node", "3"], "--gpus 8 (the default for 8 experts) is not a multiple of --gpus-per-node 3"),
])
def test_a_cluster_the_transfer_test_cannot_use_is_refused_in_analyzes_words(
        args: list[str], message: str, planted_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: "16 GPUs for 8 experts: some GPU would hold no expert (--objective balance with
    --redundant-experts adds copies)": options of solve, not of analyze."""
    assert run(["analyze", str(planted_file), "-o", str(tmp_path / "a"), "--no-figures", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--no-solve" in err[0], err
    assert "--objective" not in err[0] and "--redundant-experts" not in err[0]


def test_halves_too_small_to_mean_anything_are_skipped_and_the_rest_reported(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """Before: two sequences of 49 and 1 tokens (or a 6-token trace) got correlations, captures
    and a placement transfer computed on 1 (or 3) tokens, reported as if they meant something."""
    t = planted(64, num_experts=16)
    lopsided = tmp_path / "lopsided.npz"
    save_trace(make_trace(t.topk_ids[:50], num_experts=16, sequence_ids=np.array([0] * 49 + [1])), lopsided)
    tiny = tmp_path / "tiny.npz"
    save_trace(make_trace(t.topk_ids[:6], num_experts=16), tiny)
    for path, sides in ((lopsided, "49 and 1"), (tiny, "3 and 3")):
        out = tmp_path / path.stem
        assert run(["analyze", str(path), "-o", str(out), "--no-figures", "--shuffles", "2", "--time-limit", "1"]) == 0
        report = json.loads((out / "analyze.json").read_text())["traces"]["A"]
        halves = report["halves"]
        assert set(halves) == {"split", "tokens", "skipped"}  # no modes, no placement
        assert f"too few tokens to compare ({sides}): each side needs at least 25" in halves["skipped"]
        assert report["affinity"]["modes"]["top1"]["per_pair"] and report["load"]  # the rest still stands
        captured = capsys.readouterr()
        assert f"skipped: too few tokens to compare ({sides})" in captured.out
        assert "solving placements" not in captured.err  # no progress line for a transfer test not run


def test_stability_needs_a_token_per_expert_and_the_share_floor_on_each_side() -> None:
    big = planted(256, num_experts=64)  # 64 experts: one token per expert is the larger floor
    assert "one per expert (64)" in stability(big.select_tokens(np.arange(63)), big, None, 1, 1.0, 0)["skipped"]
    assert "skipped" not in stability(big.select_tokens(np.arange(64)), big, None, 1, 1.0, 0)
    small = planted(64, num_experts=8)  # 8 experts: the share floor decides
    n = MIN_SIDE_TOKENS
    assert "skipped" in stability(small, small.select_tokens(np.arange(n - 1)), None, 1, 1.0, 0)
    res = stability(small, small.select_tokens(np.arange(n)), None, 1, 1.0, 0)
    assert "skipped" not in res and res["modes"]["top1"]["per_pair"]


def test_figure_names_are_removed_only_beside_an_earlier_report(planted_file: Path, tmp_path: Path) -> None:
    # a user's own affinity.png in a folder that never held an analyze report is not ours to delete
    out = tmp_path / "paper"
    out.mkdir()
    for name in ("affinity.png", "load_heatmap.png"):
        (out / name).write_text("mine")
    args = ["analyze", str(planted_file), "-o", str(out), "--no-solve", "--no-figures", "--shuffles", "2", "-q"]
    assert run(args) == 0
    assert (out / "affinity.png").read_text() == "mine" and (out / "load_heatmap.png").read_text() == "mine"
    assert run(args) == 0  # nor beside a report that did not draw them
    assert (out / "affinity.png").read_text() == "mine" and (out / "load_heatmap.png").read_text() == "mine"
    # the figures an earlier report lists as its own are removed by a run that does not draw them
    assert run(args[:-4] + ["--shuffles", "2", "-q"]) == 0  # with figures: they replace the user's
    drawn = json.loads((out / "analyze.json").read_text())["figures"]
    assert {Path(f).name for f in drawn} == {"affinity.png", "load_heatmap.png", "transitions.png"}
    assert run(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["analyze.json"]


def test_compare_refuses_other_moe_layers_and_warns_on_another_top_k(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    trace = load_trace(ROOT / "traces" / "flame-moe-290m-decoder.npz")
    shifted, top2 = tmp_path / "shifted.npz", tmp_path / "top2.npz"
    save_trace(replace(trace, meta={**trace.meta, "moe_layers": [x + 1 for x in trace.meta["moe_layers"]]}), shifted)
    save_trace(make_trace(trace.topk_ids[:, :, :2], trace.topk_weights[:, :, :2], 64, meta=trace.meta), top2)
    base = ["analyze", str(ROOT / "traces" / "flame-moe-290m-decoder.npz"), "--no-solve", "--no-figures",
            "--shuffles", "2", "-q", "-o", str(tmp_path / "o")]
    # the same routing relabelled as other layers was accepted and drawn under A's layer labels
    assert run(base + ["--compare", str(shifted)]) == 2
    assert "--compare needs the same MoE layers, but its meta lists [3, 4," in capsys.readouterr().err
    assert run(base + ["--compare", str(top2)]) == 0  # allowed, but k alone moves every figure: said
    assert "moeplace: warning: " in capsys.readouterr().err
    assert run(base + ["--compare", str(ROOT / "traces" / "flame-moe-290m-decoder.npz")]) == 0
    assert "holds the same routing as TRACE" in capsys.readouterr().err


def test_layers_range_is_checked_before_it_is_expanded(planted_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """'0-99999999999' was expanded into a list first: out of memory, naming nothing."""
    from moeplace.analyze.cli import parse_pairs

    argv = ["analyze", str(planted_file), "--no-solve", "-o", str(tmp_path / "out"), "--layers"]
    assert run([*argv, f"0-{2**62}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moeplace: error: --layers '0-{2**62}': pair indices must be in [0, 2] (pair l is MoE layer l -> l+1, "
                   "MoE layers counted from 0; MoE layers 0-3 are decoder layers 3, 5, 7, 9)"]
    assert parse_pairs("2,0-1", 3) == [0, 1, 2]


def test_pair_stats_and_their_mean_by_hand() -> None:
    # pair 0: expert i always goes to i (MI = log 2); pair 1: P(i, j) = P(i) P(j) (MI = 0)
    counts = np.stack([np.diag([5.0, 5.0]), np.outer([1.0, 3.0], [2.0, 2.0])])
    # two shuffled copies' (MI [P], top-m capture [P] per m), as shuffled_stats returns them
    baseline = [(np.array([0.1, 0.3]), {1: np.array([0.5, 0.6]), 2: np.array([1.0, 1.0])}),
                (np.array([0.3, 0.1]), {1: np.array([0.7, 0.4]), 2: np.array([1.0, 1.0])})]
    diag, indep = pair_stats(counts, baseline, 2)
    log2 = np.log(2)
    assert diag["pair"] == [0, 1] and indep["pair"] == [1, 2]
    assert diag["mi"] == pytest.approx(log2) and diag["mi_frac"] == pytest.approx(1.0)
    assert diag["next_entropy"] == pytest.approx(log2) and indep["next_entropy"] == pytest.approx(log2)
    assert diag["cond_entropy"] == pytest.approx(0.0, abs=1e-12) and diag["cond_entropy_frac"] == pytest.approx(0.0, abs=1e-12)
    assert indep["cond_entropy"] == pytest.approx(log2) and indep["cond_entropy_frac"] == pytest.approx(1.0)
    assert diag["capture"] == pytest.approx({"1": 1.0, "2": 1.0})  # depths m <= E: 1 and 2
    assert indep["capture"] == pytest.approx({"1": 0.5, "2": 1.0})  # (2 + 6) of 16 go to each row's top-1
    assert diag["mi_baseline"] == pytest.approx(0.2) and diag["mi_baseline_std"] == pytest.approx(0.1)
    assert diag["mi_excess"] == pytest.approx(log2 - 0.2) and diag["mi_ratio"] == pytest.approx(log2 / 0.2)
    assert indep["mi_excess"] == pytest.approx(-0.2) and indep["mi_ratio"] == pytest.approx(0.0, abs=1e-12)
    assert diag["capture_baseline"] == pytest.approx({"1": 0.6, "2": 1.0})
    assert indep["capture_baseline"] == pytest.approx({"1": 0.5, "2": 1.0})
    mean = mean_stats([diag, indep])
    assert "pair" not in mean and mean["mi"] == pytest.approx(log2 / 2)
    assert mean["capture"] == pytest.approx({"1": 0.75, "2": 1.0})
    assert mean["mi_ratio"] == pytest.approx(log2 / 0.4)
    # no baseline: no baseline fields; a zero baseline MI: no ratio, and the mean skips it
    assert "mi_baseline" not in pair_stats(counts, [], 2)[0]
    zero = [(np.zeros(2), {1: np.ones(2), 2: np.ones(2)})]
    rows = pair_stats(counts, zero, 2)
    assert [r["mi_ratio"] for r in rows] == [None, None] and "mi_ratio" not in mean_stats(rows)
    assert mean_stats([]) == {}


def test_pair_stats_of_one_expert_have_zero_fractions() -> None:
    # log E = 0: the fractions of log E are 0, not 0 / 0
    (row,) = pair_stats(np.array([[[4.0]]]), [], 1)
    assert row["mi_frac"] == 0.0 and row["cond_entropy_frac"] == 0.0 and row["capture"] == {"1": 1.0}


def test_load_skew_of_a_layer_no_token_reached() -> None:
    even, empty = load_skew(np.array([[1.0, 2, 3, 4, 5, 6], [0.0] * 6]))
    assert len(even["hottest"]) == 4 and [h["expert"] for h in even["hottest"]] == [5, 4, 3, 2]
    assert even["hottest"][0]["share"] == pytest.approx(6 / 21)
    assert empty["max_over_mean"] == 0.0 and empty["cv"] == 0.0 and empty["gini"] == 0.0
    assert empty["entropy_frac"] == 0.0 and empty["unused"] == 6
    assert [h["share"] for h in empty["hottest"]] == [0.0] * 4


def test_statistics_of_fractional_masses_and_small_counts() -> None:
    # gated counts and shares are fractions: sums below 1 are normalised like any other
    assert gini(np.array([[0.0, 0.5]]))[0] == pytest.approx(0.5)  # = (E-1)/E: one expert has all
    assert entropy(np.array([0.25, 0.25])) == pytest.approx(np.log(2))
    assert conditional(np.array([[[0.25, 0.25], [0.0, 0.0]]]))[0, 0] == pytest.approx([0.5, 0.5])
    assert capture(np.array([[[0.375, 0.125], [0.0, 0.0]]]), np.array([[[0], [0]]]))[0] == pytest.approx(0.75)
    assert capture(np.zeros((1, 2, 2)), np.array([[[0], [0]]]))[0] == 0.0  # no transitions: 0, not 0 / 0
    # one selection in four experts: mean 0.25
    (row,) = load_skew(np.array([[1.0, 0, 0, 0]]))
    assert row["max_over_mean"] == pytest.approx(4.0) and row["cv"] == pytest.approx(np.sqrt(3))
    (one,) = load_skew(np.array([[5.0]]))  # one expert: evenly loaded by definition
    assert one["entropy_frac"] == 1.0 and one["max_over_mean"] == 1.0
    with pytest.raises(ValueError, match="unknown transition mode 'nope'"):
        mode_arrays(planted(16), "nope")


def test_mean_stats_of_one_row_and_of_partly_missing_ratios() -> None:
    assert mean_stats([{"pair": [0, 1], "mi": 0.5, "capture": {"1": 0.25}}]) == {"mi": 0.5, "capture": {"1": 0.25}}
    rows = [{"layer": 0, "mi_ratio": None, "gini": 0.5}, {"layer": 1, "mi_ratio": 2.0, "gini": 0.25}]
    assert mean_stats(rows) == {"mi_ratio": 2.0, "gini": 0.375}  # None skipped; the layer index is no statistic


@pytest.mark.parametrize("args, message", [
    (["--no-figures", "--heatmap-mode", "top1"], "--heatmap-mode: --no-figures skips the part it sets; drop it or --no-figures"),
    (["--no-figures", "--layers", "0"], "--layers: --no-figures skips the part it sets"),
    (["--no-solve", "--gpus", "3"], "--gpus: --no-solve skips the part it sets"),  # a --gpus solve would refuse
    (["--no-solve", "--time-limit", "3", "--gpus-per-node", "2"],
     "--gpus-per-node, --time-limit: --no-solve skips the part they set; drop them or --no-solve"),
])
def test_options_of_a_skipped_part_are_refused(planted_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               args: list[str], message: str) -> None:
    """They were accepted and ignored: a user believed the heatmaps or the solve used them."""
    assert run(["analyze", str(planted_file), *args, "-q", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moeplace: error: {message}") and "\n" not in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# layer numbering: MoE layers 0..L-1 everywhere, decoder numbers beside them
# ---------------------------------------------------------------------------------------------

FLAME = ROOT / "traces" / "flame-moe-290m-decoder.npz"  # MoE layers 0-7 = decoder layers 2-9


def test_tables_figures_and_layers_count_moe_layers_from_0_with_decoder_numbers_beside(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: FLAME's tables showed rows 2..9 and pairs "2>3".."8>9" while --layers 2 drew
    "layer 4>5": the pair a user picked from the table was not the pair drawn."""
    from moeplace.analyze import plots

    titles: list[str] = []
    save = plots._save

    def record(fig: Any, path: Path) -> Path:
        if path.name == "transitions.png":
            titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", record)
    out = tmp_path / "flame"
    assert run(["analyze", str(FLAME), "--no-solve", "--shuffles", "2", "--layers", "0", "-o", str(out)]) == 0
    report = json.loads((out / "analyze.json").read_text())
    assert report["transition_pairs"] == [0]
    assert titles == ["A (flame-moe-290m-decoder)\nMoE layers 0>1 (decoder 2>3)"]
    text = capsys.readouterr().out
    assert "Layer numbers: MoE layers 0-7 are the model's decoder layers 2-9" in text
    lines = text.splitlines()
    assert any(line.split()[:2] == ["0", "2"] for line in lines)  # load table: MoE 0, decoder 2
    assert any(line.split()[:2] == ["0>1", "2>3"] for line in lines)  # affinity table: pair 0, decoder 2>3
    assert f"{out / 'transitions.png'}  (pairs 0>1; decoder 2>3)" in text
    # --no-figures draws no pairs, and says so in the JSON
    assert run(["analyze", str(FLAME), "--no-solve", "--shuffles", "2", "--no-figures", "-q", "-o", str(out)]) == 0
    assert json.loads((out / "analyze.json").read_text())["transition_pairs"] == []


def test_layers_out_of_range_names_the_moe_to_decoder_mapping(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A decoder number typed for --layers ('8' for FLAME's last pair 8>9) is refused with the
    mapping, not taken silently; a trace whose numbers agree gets no mapping."""
    assert run(["analyze", str(FLAME), "--no-solve", "--no-figures", "--layers", "8", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["moeplace: error: --layers '8': pair indices must be in [0, 6] (pair l is MoE layer l -> l+1, "
                   "MoE layers counted from 0; MoE layers 0-7 are decoder layers 2-9)"]
    from moeplace.analyze.cli import parse_pairs

    with pytest.raises(Exception, match=r"must be in \[0, 2\] \(pair l is MoE layer l -> l\+1, MoE layers counted "
                                        r"from 0\)$"):
        parse_pairs("3", 3, [0, 1, 2, 3])


def test_labels_of_a_model_with_a_dense_first_layer() -> None:
    from moeplace.analyze.report import decoder_differs, layer_label, number_ranges, numbering_line, pair_label

    decoder = [1, 2, 3]  # e.g. qwen3 with a dense layer 0
    assert decoder_differs(decoder) and not decoder_differs([0, 1, 2])
    assert pair_label(decoder, 0) == "0>1 (decoder 1>2)" and pair_label([0, 1, 2], 1) == "1>2"
    assert layer_label(decoder, 2) == "2 (decoder 3)" and layer_label([0, 1, 2], 2) == "2"
    assert number_ranges([0, 2, 3, 4, 7]) == "0, 2-4, 7"
    assert numbering_line([0, 1, 2]) is None
    assert str(numbering_line(decoder)).startswith("Layer numbers: MoE layers 0-2 are the model's decoder layers 1-3;")


# ---------------------------------------------------------------------------------------------
# verdicts: load skew and domain shift
# ---------------------------------------------------------------------------------------------


def _routed(probs: np.ndarray, num_tokens: int, num_layers: int, seed: int = 0) -> Trace:
    """Top-1 trace whose every layer draws each token's expert from `probs`, independently."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(len(probs), size=(num_tokens, num_layers, 1), p=probs)
    return make_trace(ids, num_experts=len(probs))


def _load_verdict(source: Any) -> dict[str, Any]:
    from moeplace.analyze.report import AnalyzeConfig, analyze_loads, analyze_trace

    cfg = AnalyzeConfig(num_shuffles=1, num_gpus=None)
    if isinstance(source, Trace):
        return analyze_trace(source, "t.npz", cfg)[0]["verdict"]["load"]
    return analyze_loads(source, "l.npz", cfg)["verdict"]["load"]


def test_load_verdict_high_low_and_too_few_selections() -> None:
    from moeplace.analyze.report import LOAD_SKEW_HIGH, load_sampling_noise

    hot = np.full(8, 0.6 / 7)
    hot[3] = 0.4  # expert 3 takes 40% of 8: max/mean 3.2
    high = _load_verdict(_routed(hot, 2000, 2))
    assert high["status"] == "high" and high["max_over_mean"] > 3.0
    assert "load skewed" in high["text"] and "--max-imbalance" in high["text"] and "--objective latency" in high["text"]
    low = _load_verdict(planted(1024))  # top-1 exactly even, the second choice random
    assert low["status"] == "low" and low["max_over_mean"] < LOAD_SKEW_HIGH
    assert low["text"].startswith("load skew low, worst layer's max/mean expert load")
    # even routing, 10 selections per expert over 8 layers x 64 experts: chance alone takes the
    # worst layer to about 2 (the median of simulations is 2.05), so no verdict either way
    for seed in range(5):
        few = _load_verdict(_routed(np.full(64, 1 / 64), 640, 8, seed))
        assert few["status"] == "too_few", (seed, few)
        assert few["text"].startswith("too few selections to judge load skew")
    # ... but a skew far beyond chance is high even there
    one = np.full(64, 0.5 / 63)
    one[0] = 0.5
    assert _load_verdict(_routed(one, 640, 8))["status"] == "high"
    # the chance level is that of the worst of L x E counts: more counts, higher; more tokens, lower
    assert load_sampling_noise(10, 512) > load_sampling_noise(10, 64) > load_sampling_noise(1000, 64) > 1.0
    assert load_sampling_noise(0, 8) == float("inf")


def test_load_verdict_of_load_only_inputs_points_to_balance_not_traffic() -> None:
    skewed = _load_verdict(make_loads(np.array([[8000.0, 1000, 1000, 1000, 1000, 1000, 1000, 1000]] * 4)))
    assert skewed["status"] == "high" and "objective balance" in skewed["text"]
    assert "traffic objective" not in skewed["text"]
    # 2.5 selections per expert: max/mean 1.6 says nothing when chance alone reaches above 3
    assert _load_verdict(make_loads(np.array([[4.0, 3, 3, 2, 2, 2, 2, 2]] * 4)))["status"] == "too_few"


def _transfer(a_to_b: float | None, b_to_a: float | None) -> dict[str, Any]:
    return {"modes": {}, "placement": {d: {"transferred": {"cross_gpu_top1": v}}
                                       for d, v in (("a_to_b", a_to_b), ("b_to_a", b_to_a))}}


def _traces(half_a: float | None, half_b: float | None) -> dict[str, Any]:
    return {name: {"halves": {} if v is None else _transfer(v, v)} for name, v in (("A", half_a), ("B", half_b))}


@pytest.mark.parametrize("a_to_b, b_to_a, halves, status, words", [
    (0.95, 0.85, (0.9, 0.9), "keeps", "both >= 80%: one placement serves both domains"),
    (0.9, 0.3, (0.9, 0.85), "loses", "under 50%: most of the gain is domain-specific"),
    (0.6, 0.7, (0.9, 0.95), "partial", "between 50% and 80%: part of the gain is domain-specific"),
    # the halves of B lose as much: sampling alone explains it, whatever the thresholds say
    (0.6, 0.4, (0.9, 0.35), "sampling", "sampling noise alone can explain the loss"),
    (0.4, None, (None, None), "loses", "one fitted on B n/a on A"),  # no halves measured: thresholds alone
])
def test_domain_verdict(a_to_b: float, b_to_a: float | None, halves: tuple, status: str, words: str) -> None:
    from moeplace.analyze.report import domain_verdict

    v = domain_verdict(_transfer(a_to_b, b_to_a), _traces(*halves))
    assert v["status"] == status and words in v["text"], v
    assert v["kept"] == min(x for x in (a_to_b, b_to_a) if x is not None)
    nothing = domain_verdict(_transfer(None, None), _traces(0.9, 0.9))
    assert nothing["kept"] is None and "gains nothing over contiguous" in nothing["text"]


def test_domain_verdict_of_compare_runs(planted_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the same chains (halves of one planted trace): one placement serves both
    whole = planted(1024, num_experts=8)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    save_trace(whole.select_tokens(np.arange(512)), a)
    save_trace(whole.select_tokens(np.arange(512, 1024)), b)
    common = ["--no-figures", "--shuffles", "2", "--gpus", "4", "--time-limit", "1", "-o", str(tmp_path / "o")]
    assert run(["analyze", str(a), "--compare", str(b), *common]) == 0
    verdict = json.loads((tmp_path / "o" / "analyze.json").read_text())["transfer"]["verdict"]
    assert verdict["status"] == "keeps" and verdict["kept"] > 0.9
    assert "Verdict [A vs B], domain shift: a placement fitted on A keeps" in capsys.readouterr().out
    # other chains: the gain does not transfer
    other = tmp_path / "other.npz"
    save_trace(planted(512, num_experts=8, seed=7), other)
    assert run(["analyze", str(planted_file), "--compare", str(other), *common]) == 0
    verdict = json.loads((tmp_path / "o" / "analyze.json").read_text())["transfer"]["verdict"]
    assert verdict["status"] == "loses" and verdict["kept"] < 0.5 and verdict["halves_kept"] > 0.9
    assert "most of the gain is domain-specific" in capsys.readouterr().out
    # --no-solve: not measured, and how to measure it
    assert run(["analyze", str(planted_file), "--compare", str(other), "--no-solve", "--no-figures", "--shuffles", "2",
                "-o", str(tmp_path / "o")]) == 0
    assert ("Verdict [A vs B], domain shift: placement transfer not measured (--no-solve)"
            in capsys.readouterr().out)
    # two one-layer traces: load correlation only, for that reason (not "load-only")
    one_a, one_b = tmp_path / "one_a.npz", tmp_path / "one_b.npz"
    save_trace(make_trace(np.arange(40).reshape(40, 1, 1) % 4, num_experts=4), one_a)
    save_trace(make_trace(np.arange(1, 41).reshape(40, 1, 1) % 4, num_experts=4), one_b)
    assert run(["analyze", str(one_a), "--compare", str(one_b), "--no-figures", "--shuffles", "2", "--no-solve",
                "-o", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "expert-load correlation only (mean" in text and "one MoE layer: no layer pairs" in text
    assert "load-only" not in text


# ---------------------------------------------------------------------------------------------
# --learning-curve: is the trace long enough to solve on?
# ---------------------------------------------------------------------------------------------


def _weak_planted(num_tokens: int = 200) -> Trace:
    """SYNTHETIC planted affinity (16 experts on 4 GPUs, 4 layers, top-2) strong enough that the
    whole trace finds it and weak enough that a few dozen tokens do not: the curve falls."""
    from moeplace.solve.synthetic import planted_trace

    return planted_trace(num_tokens, 4, 16, 2, 4, affinity=0.85, boost=10.0, seed=0)[0]


def test_curve_training_sets_are_nested_and_never_hold_a_test_token() -> None:
    from moeplace.analyze.curve import TEST_SHARE, curve_splits, min_side, plan

    by_token, by_seq = _weak_planted(), planted(1024, num_experts=8)  # the second has 128 sequences of 8
    for trace, by in ((by_token, "token"), (by_seq, "sequence")):
        splits, sizes, _ = plan(trace, 3, seed=5)
        pool = min(len(s.order) for s in splits)
        assert sizes == [n for n in (round(pool / 8), round(pool / 4), round(pool / 2), pool) if n >= 25]
        for split in splits:
            test = set(split.test.tolist())
            assert len(test) == len(split.test) >= max(TEST_SHARE * trace.num_tokens, min_side(trace.num_experts))
            assert test.isdisjoint(split.order.tolist())
            assert sorted(test | set(split.order.tolist())) == list(range(trace.num_tokens))  # nothing lost
            sets = [set(split.train(n).tolist()) for n in sizes]
            assert [len(s) for s in sets] == sizes
            assert all(small < large for small, large in zip(sets, sets[1:]))  # nested, strictly
            assert all(s.isdisjoint(test) for s in sets)
            if by == "sequence":  # whole sequences: no text is both tested and trained on
                seq = trace.sequence_ids
                assert set(seq[split.test].tolist()).isdisjoint(seq[split.order].tolist())
        assert len({tuple(s.test) for s in splits}) == 3  # the splits differ
        again = curve_splits(trace, 3, seed=5)  # and are the seed's
        assert all(np.array_equal(a.test, b.test) and np.array_equal(a.order, b.order) for a, b in zip(splits, again))
        assert not np.array_equal(curve_splits(trace, 1, seed=6)[0].test, splits[0].test)
    # by_token: 50 test tokens, a pool of 150: 1/8 of it (19) is under max(25, E = 16) and skipped
    assert plan(by_token, 2, 0)[1] == [38, 75, 150] and plan(by_token, 2, 0)[2][0]["tokens"] == 19


def test_curve_needs_the_tokens_its_refusal_names() -> None:
    from moeplace.analyze.curve import min_curve_tokens, plan
    from moeplace.errors import MoeplaceError

    trace = _weak_planted(400)
    need = min_curve_tokens(16)  # 3 x max(25, 16)
    assert len(plan(trace.select_tokens(np.arange(need)), 2, 0)[1]) == 2
    with pytest.raises(MoeplaceError, match=f"{need - 1} tokens are too few for a curve.*at least {need} tokens"):
        plan(trace.select_tokens(np.arange(need - 1)), 2, 0)


def test_curve_refuses_whole_sequence_test_sets_that_leave_one_training_size() -> None:
    """80 tokens (above min_curve_tokens) in 10 sequences of 8: the whole-sequence test set of 32
    leaves a pool of 48, whose halves (24) fall under the floor of 25: one size, no doubling to
    read a verdict from, so refused naming the sizes (not a crash after the solves)."""
    from moeplace.analyze.curve import min_curve_tokens, plan
    from moeplace.errors import MoeplaceError

    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(16, 2, replace=False) for _ in range(2)]) for _ in range(80)])
    trace = make_trace(ids, num_experts=16, sequence_ids=np.repeat(np.arange(10), 8))
    assert trace.num_tokens >= min_curve_tokens(16)
    with pytest.raises(MoeplaceError, match="80 tokens are too few for a curve: whole-sequence test sets of up to 32 "
                                            "leave 48 for training"):
        plan(trace, 2, 0)


def test_learning_curve_falls_on_planted_affinity_and_its_ratios_are_evals(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    from moeplace.analyze.curve import learning_curve
    from moeplace.placement import Placement
    from moeplace.solve.baselines import contiguous
    from moeplace.eval.metrics import evaluate

    trace = _weak_planted()
    calls: list[tuple[int, int, int]] = []
    result = learning_curve(trace, 4, 2, 0.5, seed=0, num_splits=2, on_solve=lambda *a: calls.append(a))
    rep = result.report
    assert rep["sizes"] == [38, 75, 150] and rep["solves"] == 6 and len(calls) == 6
    assert rep["split_by"] == "token" and rep["test_tokens"] == [50, 50]
    first, last = rep["points"][0]["held_out"], rep["points"][-1]["held_out"]
    for metric in ("cross_gpu_top1", "dest_gpus_topk"):  # more training tokens, a better held-out placement
        assert last[metric]["mean"] < first[metric]["mean"], (metric, first, last)
    # one point recomputed by `moeplace eval` on the split's test tokens, and in-sample on its training set
    split, n = result.splits[1], 38
    placement = result.placements[(1, n)]
    assert placement.num_gpus == 4 and placement.gpus_per_node == 2
    placement.save(tmp_path / "p.json")
    save_trace(trace.select_tokens(split.test), tmp_path / "test.npz")
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "p.json"), str(tmp_path / "test.npz"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    point = rep["points"][0]
    assert point["tokens"] == n
    assert ev["tokens"]["evaluated"] == len(split.test) == 50  # every test token (not a split of them)
    for metric in ("cross_gpu_top1", "dest_gpus_topk"):
        assert point["held_out"][metric]["per_split"][1] == pytest.approx(ev["vs_contiguous"]["placement"][metric],
                                                                         rel=1e-12)
        fit = trace.select_tokens(split.train(n))
        base = evaluate(Placement(contiguous(4, 16, 4), 4, 2), fit)
        assert point["in_sample"][metric]["per_split"][1] == pytest.approx(
            evaluate(placement, fit)[metric] / base[metric], rel=1e-12)
        values = point["held_out"][metric]["per_split"]
        assert point["held_out"][metric]["mean"] == pytest.approx(np.mean(values))
        assert point["held_out"][metric]["se"] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    assert rep["verdict"]["from_tokens"] == 75 and rep["verdict"]["to_tokens"] == 150


def _points(*per_split: list[float | None]) -> list[dict[str, Any]]:
    """Curve points of constructed held-out cross_gpu_top1 ratios per split, n = 100, 200, ..."""
    return [{"tokens": 100 * 2**i, "held_out": {"cross_gpu_top1": {"per_split": list(v)}}}
            for i, v in enumerate(per_split)]


@pytest.mark.parametrize("small, large, status, gain, se", [
    ([0.70, 0.72], [0.65, 0.68], "improving", 0.045, 0.005),  # > 2 SE and > 0.01
    ([0.700, 0.710], [0.695, 0.703], "flat", 0.006, 0.001),  # > 2 SE, but under MIN_GAIN
    ([0.70, 0.70], [0.65, 0.73], "flat", 0.01, 0.04),  # >= MIN_GAIN, within 2 SE
    ([0.70, 0.70, 0.70], [0.68, 0.67, 0.66], "improving", 0.03, 0.00577),  # three splits
    ([0.60, 0.61], [0.62, 0.63], "flat", -0.02, 0.0),  # worse: flat, and says "lost"
])
def test_curve_verdict_follows_its_rule(small: list[float], large: list[float], status: str, gain: float,
                                        se: float) -> None:
    from moeplace.analyze.curve import MIN_GAIN, SE_FACTOR, curve_verdict

    v = curve_verdict(_points([0.9] * len(small), small, large), 8)
    assert v["status"] == status and v["gain"] == pytest.approx(gain) and v["se"] == pytest.approx(se, abs=1e-5)
    assert (v["gain"] > max(SE_FACTOR * v["se"], MIN_GAIN)) == (status == "improving")  # the rule as documented
    assert (v["from_tokens"], v["to_tokens"]) == (200, 400)  # the last doubling, whatever came before
    if status == "improving":
        assert v["text"].startswith("still improving: a longer trace should give a better placement on 8 GPUs "
                                    f"(the last doubling, 200 -> 400 training tokens, gained {gain:.3f} +- {se:.3f}")
    else:
        assert v["text"].startswith("flat: the trace is long enough for 8 GPUs (the last doubling, 200 -> 400 "
                                    f"training tokens, {'lost' if gain < 0 else 'gained'} {abs(gain):.3f}")


def test_curve_verdict_without_traffic_to_reduce() -> None:
    from moeplace.analyze.curve import curve_verdict

    v = curve_verdict(_points([None, None], [None, None]), 4)
    assert v["status"] == "flat" and v["gain"] is None and "no cross-GPU traffic" in v["text"]


def test_cli_learning_curve_writes_its_key_figure_and_verdict(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, out = tmp_path / "weak.npz", tmp_path / "o"
    save_trace(_weak_planted(), path)
    assert run(["analyze", str(path), "--learning-curve", "--gpus", "4", "--time-limit", "0.5", "--shuffles", "2",
                "-o", str(out)]) == 0
    report = json.loads((out / "analyze.json").read_text())
    lc = report["learning_curve"]
    assert lc["trace"] == "A" and lc["num_gpus"] == 4 and lc["splits"] == 2 and lc["sizes"] == [38, 75, 150]
    assert lc["verdict"]["status"] in ("improving", "flat") and len(lc["points"]) == 3
    assert str(out / "learning_curve.png") in report["figures"]
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    captured = capsys.readouterr()
    assert f"Verdict [A], trace length: {lc['verdict']['text']}" in captured.out
    assert "skipped 19 training tokens: too few tokens" in captured.out
    solving = [line for line in captured.err.splitlines() if "learning curve" in line and "solving on" in line]
    assert len(solving) == 6, captured.err  # a progress line per solve
    # a later run without the curve removes the figure that the earlier report lists as its own
    assert run(["analyze", str(path), "--no-solve", "--shuffles", "2", "-q", "-o", str(out)]) == 0
    assert not (out / "learning_curve.png").exists()
    assert "learning_curve" not in json.loads((out / "analyze.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["{loads}", "--learning-curve"], "--learning-curve: not applicable to a load-only input"),
    (["{loads}", "--compare", "{trace}", "--learning-curve"], "loads.npz) is load-only"),
    (["{trace}", "--learning-curve", "--no-solve"], "--learning-curve solves placements"),
    (["{trace}", "--curve-splits", "3"], "--curve-splits: sets the splits of --learning-curve"),
    (["{trace}", "--learning-curve", "--curve-splits", "1"], "--curve-splits"),
    (["{trace}", "--learning-curve", "--gpus", "1"], "one GPU has no cross-GPU traffic"),
    (["{short}", "--learning-curve"], "60 tokens are too few for a curve"),
    (["{one_layer}", "--learning-curve"], "one MoE layer, so no layer transitions"),
])
def test_cli_learning_curve_refusals(args: list[str], message: str, planted_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    loads, short, one_layer = tmp_path / "loads.npz", tmp_path / "short.npz", tmp_path / "one.npz"
    save_loads(make_loads(np.ones((4, 8))), loads)
    save_trace(planted(64, num_experts=8).select_tokens(np.arange(60)), short)  # needs 3 x max(25, 8) = 75
    save_trace(make_trace(np.arange(400).reshape(400, 1, 1) % 4, num_experts=4), one_layer)
    paths = {"trace": planted_file, "loads": loads, "short": short, "one_layer": one_layer}
    out = tmp_path / "out"
    assert run(["analyze", *(a.format(**paths) for a in args), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeplace: error:") and message in err[0], err
    assert not out.exists()  # refused before any work
