"""The traffic solver: edge weights, objective, exact sub-problems, bounds, search, CLI."""

from __future__ import annotations

import inspect
import itertools
import json
import re
import shlex
import time
from pathlib import Path
from typing import Callable

import click
import numpy as np
import pytest

from moeplace.cli import run
from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import evaluate
from moeplace.placement import Placement, load_placement
from moeplace.solve import chain, heuristics, ilp
from moeplace.solve.affinity import AffinityGraph, EdgeTerms, distance_matrix, edge_terms, edge_weights, placement_cost
from moeplace.solve.baselines import contiguous
from moeplace.solve.cli import solve as solve_command
from moeplace.solve.summary import summary
from moeplace.solve.heuristics import assign_layer, cluster_layer, layer_cost, layer_costs, swap_descent
from moeplace.solve.solver import (
    DEFAULT_WEIGHTS, SearchResult, cv_folds, plain_coordinate_ascent, relative_gap, search_traffic, select_weights,
    solve_placement, solve_traffic,
)
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import Trace, load_trace, make_trace, save_trace, split_sequences, split_tokens

ROOT = Path(__file__).resolve().parents[1]


def balanced_layouts(num_experts: int, num_gpus: int):
    """Every balanced layout of one layer (with repeats: dedupe with set())."""
    per = num_experts // num_gpus
    for perm in itertools.permutations(np.repeat(np.arange(num_gpus), per)):
        yield tuple(int(g) for g in perm)


def random_graph(rng, layers: int, experts: int) -> AffinityGraph:
    inter = rng.random((layers - 1, experts, experts)) * (rng.random((layers - 1, experts, experts)) < 0.6)
    intra = rng.random((layers, experts, experts)) * (rng.random((layers, experts, experts)) < 0.5)
    intra = np.triu(intra, 1)
    return AffinityGraph(inter, intra + intra.transpose(0, 2, 1))


def brute_cost(graph: AffinityGraph, x: np.ndarray, d: np.ndarray) -> float:
    c = 0.0
    for l, i, j in itertools.product(range(x.shape[0] - 1), range(x.shape[1]), range(x.shape[1])):
        c += graph.inter[l, i, j] * d[x[l, i], x[l + 1, j]]
    for l, i, j in itertools.product(range(x.shape[0]), range(x.shape[1]), range(x.shape[1])):
        if i < j:
            c += graph.intra[l, i, j] * d[x[l, i], x[l, j]]
    return c


def test_edge_weights_count_tokens_exactly():
    # 2 tokens, 2 layers, top-2 over 4 experts
    ids = np.array([[[0, 1], [2, 3]], [[0, 2], [2, 1]]])
    g = edge_weights(make_trace(ids, num_experts=4), top1_weight=1.0, coselect_weight=1.0, smoothing=0.0, prior=0.0)
    want = np.zeros((4, 4))
    want[0, 2] += 2 + 2  # both tokens: top-1 0 -> top-1 2 (1 + top1_weight)
    want[0, 3] += 1
    want[0, 1] += 1
    np.testing.assert_allclose(g.inter[0], want)
    assert not g.intra[0].any()  # layer 0 is no destination
    assert g.intra[1][2, 3] == g.intra[1][3, 2] == 1.0 and g.intra[1][1, 2] == 1.0 and g.intra[1].sum() == 4.0


def test_smoothing_and_prior_only_add_weight(small_trace):
    base = edge_weights(small_trace, smoothing=0.0, prior=0.0)
    reg = edge_weights(small_trace, smoothing=0.5, prior=0.5)
    assert (reg.inter >= base.inter - 1e-12).all() and reg.inter.sum() > base.inter.sum()
    np.testing.assert_allclose(reg.intra, base.intra)


@pytest.mark.parametrize("gpus,gpn", [(2, 2), (4, 2)])
def test_placement_cost_matches_edge_by_edge_sum(gpus, gpn):
    rng = np.random.default_rng(1)
    graph = random_graph(rng, 3, 8)
    d = distance_matrix(gpus, gpn, 3.0)
    for _ in range(3):
        x = np.stack([rng.permutation(contiguous(1, 8, gpus)[0]) for _ in range(3)])
        assert placement_cost(graph, x, d) == pytest.approx(brute_cost(graph, x, d))


def test_assign_layer_is_the_optimal_balanced_assignment():
    rng = np.random.default_rng(2)
    cost = rng.random((6, 3))
    best = min(sum(cost[e, g] for e, g in enumerate(p)) for p in set(balanced_layouts(6, 3)))
    got = assign_layer(cost)
    assert np.bincount(got, minlength=3).tolist() == [2, 2, 2]
    assert cost[np.arange(6), got].sum() == pytest.approx(best)


def test_swap_descent_reports_the_exact_gain():
    rng = np.random.default_rng(3)
    graph = random_graph(rng, 3, 8)
    d = distance_matrix(4, 2, 2.0)
    x = np.stack([rng.permutation(contiguous(1, 8, 4)[0]) for _ in range(3)])
    before = layer_cost(graph, x, 1, d)
    gpus = x[1].copy()
    gained = swap_descent(layer_costs(graph, x, 1, d), gpus, graph.intra[1], d)
    x[1] = gpus
    assert gained > 0
    assert before - layer_cost(graph, x, 1, d) == pytest.approx(gained)
    assert np.bincount(gpus, minlength=4).tolist() == [2, 2, 2, 2]


def test_exact_ilp_and_bounds_match_brute_force():
    rng = np.random.default_rng(4)
    graph = random_graph(rng, 2, 6)
    d = distance_matrix(3, 3, 1.0)
    layouts = list({tuple(p) for p in balanced_layouts(6, 3)})
    brute = min(placement_cost(graph, np.array([a, b]), d) for a in layouts if a[0] == 0 for b in layouts)
    res = ilp.solve_window(graph, contiguous(2, 6, 3), range(2), d, 3, time_limit=30, pin_first=True)
    assert res.optimal and res.cost == pytest.approx(brute)
    assert res.bound <= brute + 1e-6
    assert placement_cost(graph, res.expert_to_gpu, d) == pytest.approx(brute)
    assert 0 <= ilp.combinatorial_bound(graph, 3, 3, 1.0) <= brute + 1e-9


def test_proven_optimal_reads_highs_status_not_pulps():
    """proven_optimal is HiGHS' own status: False at a time-limit stop, True at a proof. (PuLP
    reports a time-limit stop *with an incumbent* as "Optimal", which no fixed input can force.)"""
    import pulp
    rng = np.random.default_rng(0)
    prob = pulp.LpProblem("knapsacks", pulp.LpMaximize)
    x = [pulp.LpVariable(f"x{i}", cat="Binary") for i in range(40)]
    prob += pulp.lpSum(float(v) * xi for v, xi in zip(rng.integers(1, 100, 40), x))
    for _ in range(8):
        a = rng.integers(1, 100, 40)
        prob += pulp.lpSum(float(c) * xi for c, xi in zip(a, x)) <= float(a.sum() // 2)
    assert ilp.highs_status(prob) is None  # never solved
    prob.solve(pulp.HiGHS(msg=False, timeLimit=0.0, threads=1))
    assert not ilp.proven_optimal(prob)
    prob.solve(pulp.HiGHS(msg=False, threads=1))
    assert ilp.proven_optimal(prob) and pulp.LpStatus[prob.status] == "Optimal"


def test_layer_ilps_keep_only_proven_optima_and_cross_validation_runs_none(monkeypatch):
    """Step 4 drops an ILP stopped at its cap (its incumbent depends on the machine's speed) and
    says the solve was cut; the short searches of cross-validation run no ILP at all."""
    graph = random_graph(np.random.default_rng(8), 3, 8)
    far = time.monotonic() + 60
    real = ilp.solve_window
    calls: list[bool] = []

    def capped(graph, expert_to_gpu, layers, *args, **kwargs):  # a "better" layout, not proven optimal
        calls.append(True)
        out = real(graph, expert_to_gpu, layers, *args, **kwargs)
        lie = out.expert_to_gpu.copy()
        lie[layers[0]] = lie[layers[0]][::-1]
        return ilp.IlpResult(lie, -1.0, None, False, 5.0)

    honest = search_traffic(graph, 2, 2, 2.0, far, 0, restarts=2, kicks=4, exact=False)
    assert honest.stats["layer_ilps"] == 3 and honest.stats["layer_ilps_cut"] == 0 and not honest.cut
    monkeypatch.setattr(ilp, "solve_window", capped)
    got = search_traffic(graph, 2, 2, 2.0, far, 0, restarts=2, kicks=4, exact=False)
    assert got.stats["layer_ilps"] == got.stats["layer_ilps_cut"] == len(calls) == 3 and got.cut
    assert got.method == "chain+coordinate-descent+ils"
    assert got.cost == pytest.approx(placement_cost(graph, got.expert_to_gpu, distance_matrix(2, 2, 2.0)))
    assert got.cost >= honest.cost - 1e-9  # the optimal layer ILPs can only have helped
    monkeypatch.setattr(chain, "MAX_LAYOUTS", 0)  # the whole-model ILP, not the shortest path over 70 layouts
    whole = search_traffic(graph, 2, 2, 2.0, far, 0, restarts=2, kicks=4)  # the exact model, "stopped" too
    assert whole.method == "ilp(time-limited)+heuristic" and whole.cut
    calls.clear()
    skipped = search_traffic(graph, 2, 2, 2.0, far, 0, restarts=2, kicks=4, exact=False, layer_ilps=False)
    assert not calls and skipped.stats["layer_ilps"] == 0 and not skipped.cut
    trace, _ = planted_trace(160, 3, 16, 2, 4, seed=5)
    _, record, _ = select_weights(trace, 4, 4, 0, far, dict.fromkeys(("coselect_weight", "smoothing", "prior")))
    assert len(record["scores"]) == 6 and not calls


def test_combinatorial_bound_is_valid_with_nodes():
    rng = np.random.default_rng(6)
    graph = random_graph(rng, 2, 4)
    d = distance_matrix(4, 2, 3.0)
    perms = [np.array(p) for p in itertools.permutations(range(4))]
    best = min(placement_cost(graph, np.stack([a, b]), d) for a in perms for b in perms)
    assert 0 < ilp.combinatorial_bound(graph, 4, 2, 3.0) <= best + 1e-9


def test_cluster_layer_recovers_planted_gpu_and_node_groups():
    rng = np.random.default_rng(7)
    gpu = rng.permutation(np.repeat(np.arange(8), 4))  # 32 experts, 8 GPUs, 2 nodes of 4
    same_gpu = gpu[:, None] == gpu[None, :]
    same_node = gpu[:, None] // 4 == gpu[None, :] // 4
    weight = 10.0 * same_gpu + 3.0 * same_node + rng.random((32, 32))
    weight = np.triu(weight, 1) + np.triu(weight, 1).T
    got = cluster_layer(weight, 8, 4, rng)
    assert np.bincount(got, minlength=8).tolist() == [4] * 8
    np.testing.assert_array_equal(got[:, None] == got[None, :], same_gpu)
    np.testing.assert_array_equal(got[:, None] // 4 == got[None, :] // 4, same_node)


def test_window_ilp_with_fixed_neighbours_and_nodes():
    rng = np.random.default_rng(5)
    graph = random_graph(rng, 3, 4)
    d = distance_matrix(4, 2, 2.5)
    x = np.stack([rng.permutation(4) for _ in range(3)])
    res = ilp.solve_window(graph, x, range(1, 2), d, 2, time_limit=30)
    best = min(layer_cost(graph, np.stack([x[0], p, x[2]]), 1, d) for p in itertools.permutations(range(4)))
    assert res.optimal and res.cost == pytest.approx(best)
    np.testing.assert_array_equal(res.expert_to_gpu[[0, 2]], x[[0, 2]])


def test_small_models_are_solved_exactly(small_trace, monkeypatch):
    """8 experts on 2 GPUs: the shortest path over 70 layouts per layer; without it the
    whole-model ILP proves the same optimum."""
    out = solve_traffic(small_trace, 2, 2, time_limit=30, seed=0, progress=False)
    assert out.solver["method"] == "exact-dp" and out.gap == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(chain, "MAX_LAYOUTS", 0)
    by_ilp = solve_traffic(small_trace, 2, 2, time_limit=30, seed=0, progress=False)
    assert by_ilp.solver["method"] == "exact-ilp"
    assert by_ilp.gap == pytest.approx(0.0, abs=1e-6)
    assert by_ilp.objective["value"] == pytest.approx(out.objective["value"], rel=1e-9)
    assert np.bincount(out.expert_to_gpu[0], minlength=2).tolist() == [4, 4]


def test_planted_affinity_is_recovered_across_nodes():
    trace, planted = planted_trace(1500, 6, 32, 4, 8, 4, seed=3)
    p = solve_placement(trace, 8, 4, time_limit=30, seed=0)
    o = p.objective
    graph = edge_weights(trace, o["top1_weight"], o["coselect_weight"], o["smoothing"], o["prior"])
    d = distance_matrix(8, 4, o["node_cost"])
    c0, cp, cf = (placement_cost(graph, x, d) for x in (contiguous(6, 32, 8), planted, p.expert_to_gpu))
    assert (c0 - cf) / (c0 - cp) >= 0.99
    assert p.bound is not None and p.bound <= cf + 1e-6 and 0 <= p.gap < 1
    m = p.metrics["train"]
    assert m["placement"]["cross_gpu_top1"] < 0.5 * m["contiguous"]["cross_gpu_top1"]


def test_beats_the_plain_heuristic_on_held_out_synthetic_tokens():
    trace, _ = planted_trace(640, 8, 64, 6, 8, affinity=0.6, boost=8.0, seed=11)
    p = solve_placement(trace, 8, time_limit=30, seed=1, train_fraction=0.5)
    train_idx, held_idx = split_tokens(640, 0.5, 1)
    plain = plain_coordinate_ascent(trace.select_tokens(train_idx), 8)
    held = trace.select_tokens(held_idx)
    ours, theirs, base = (evaluate(Placement(x, 8, 8), held) for x in (p.expert_to_gpu, plain, contiguous(8, 64, 8)))
    for metric in ("cross_gpu_top1", "dest_gpus_topk"):
        assert ours[metric] < theirs[metric] - 0.02 * base[metric]


def test_split_by_sequence_fits_whole_sequences_and_records_it():
    planted, _ = planted_trace(300, 3, 8, 2, 4, seed=2)
    seq = np.arange(300) // 15  # 20 sequences of 15 tokens
    trace = make_trace(planted.topk_ids, planted.topk_weights, 8, sequence_ids=seq)
    p = solve_placement(trace, 4, time_limit=5, seed=3, train_fraction=0.5, split_by="sequence")
    assert p.split == {"train_fraction": 0.5, "seed": 3, "by": "sequence"}
    train, held = split_sequences(seq, 0.5, 3)
    assert not set(seq[train]) & set(seq[held]) and len(train) == 150  # 10 whole sequences reach 150 exactly
    np.testing.assert_array_equal(p.fit_loads, trace.select_tokens(train).expert_loads())
    assert p.metrics["held_out"]["placement"] == evaluate(p, trace.select_tokens(held))
    # at fraction 1 nothing is held out, whatever the split would keep whole
    assert solve_placement(trace, 4, time_limit=5, train_fraction=1.0, split_by="sequence").split is None
    with pytest.raises(MoeplaceError, match="split_by must be one of token, sequence, got 'text'"):
        solve_placement(trace, 4, time_limit=5, train_fraction=0.5, split_by="text")
    with pytest.raises(MoeplaceError, match="trace: a split by sequence needs the trace's sequence_ids"):
        solve_placement(planted, 4, time_limit=5, train_fraction=0.5, split_by="sequence")


def test_deterministic_per_seed_and_balanced():
    trace, _ = planted_trace(400, 5, 16, 2, 4, seed=1)
    a = solve_placement(trace, 4, time_limit=30, seed=7, train_fraction=0.5)
    b = solve_placement(trace, 4, time_limit=30, seed=7, train_fraction=0.5)
    np.testing.assert_array_equal(a.expert_to_gpu, b.expert_to_gpu)
    assert all(np.bincount(row, minlength=4).tolist() == [4] * 4 for row in a.expert_to_gpu)
    assert a.split == {"train_fraction": 0.5, "seed": 7}
    train, _ = split_tokens(400, 0.5, 7)  # the fit tokens' loads: eval's load baselines are fitted on them
    np.testing.assert_array_equal(a.fit_loads, trace.select_tokens(train).expert_loads())
    held = a.metrics["held_out"]
    assert set(held) == {"placement", "contiguous", "round_robin", "random", "greedy_load"}
    assert held["placement"]["tokens"] == 200
    # what determinism is relative to: another HiGHS may return another of tied LP/ILP optima
    import pulp

    import moeplace

    software = a.solver["software"]
    assert software["moeplace"] == moeplace.__version__ and software["pulp"] == pulp.__version__
    assert software["numpy"] == np.__version__ and software["highs"].count(".") == 2


def test_time_limit_is_honoured_with_a_valid_placement():
    trace, _ = planted_trace(2000, 24, 64, 6, 8, 4, seed=2)
    t = time.monotonic()
    # 1 us: spent before the search starts on any machine (0.05 s was not always, on an idle one)
    p = solve_placement(trace, 8, 4, time_limit=1e-6, seed=0)
    assert time.monotonic() - t < 6.0  # edge weights and baseline metrics come on top
    assert p.solver["stopped_by_time_limit"]
    assert all(np.bincount(row, minlength=8).tolist() == [8] * 8 for row in p.expert_to_gpu)
    # the limit is spent before the search starts, yet the first greedy chaining still runs:
    # a placement built from the affinity, not the contiguous start
    graph = edge_weights(trace, 1.0, *(p.objective[k] for k in ("coselect_weight", "smoothing", "prior")))
    assert p.solver["restarts_run"] == 1
    assert p.objective["value"] < 0.5 * placement_cost(graph, contiguous(24, 64, 8), distance_matrix(8, 4, 2.0))


@pytest.fixture
def trace_file(tmp_path):
    trace, _ = planted_trace(300, 4, 16, 2, 4, seed=0)
    path = tmp_path / "t.npz"
    save_trace(trace, path)
    return path


def test_cli_writes_a_placement_and_a_summary(trace_file, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert run(["solve", str(trace_file), "--gpus", "4", "--gpus-per-node", "2", "--train-fraction", "0.5",
                "--seed", "3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out tokens (150)" in text and "cross-node top-1" in text
    # rows named and ratioed as `moeplace eval` prints them: placement, contiguous at 1.00x, every column
    held = text[text.index("held-out tokens (150)"):].splitlines()
    assert held[1].split()[0] == "placement" and held[1].count("x)") == 4
    assert held[2].split()[0] == "contiguous" and held[2].count("(1.00x)") == 4
    assert "(x: ratio to contiguous, the default layout of Megatron, DeepSpeed, vLLM and SGLang; lower is better)" in text
    p = load_placement(out)
    assert (p.num_gpus, p.gpus_per_node, p.split) == (4, 2, {"train_fraction": 0.5, "seed": 3})
    doc = json.loads(out.read_text())
    assert doc["trace_sha256"] and doc["objective"]["name"] == "traffic" and doc["objective"]["node_cost"] == 2.0
    assert doc["bound"] <= doc["objective"]["value"] + 1e-6
    cv = doc["solver"]["cross_validation"]  # with several nodes the node metrics are scored too
    assert doc["objective"]["weights_chosen_by"] == "cross-validation" and len(cv["scores"]) == 6
    assert {k: doc["objective"][k] for k in DEFAULT_WEIGHTS} == cv["candidates"][cv["chosen"]]
    _, held_idx = split_tokens(300, 0.5, 3)  # eval replays the same held-out tokens
    held = evaluate(p, load_trace(trace_file).select_tokens(held_idx))
    assert doc["metrics"]["held_out"]["placement"]["cross_gpu_top1"] == pytest.approx(held["cross_gpu_top1"])


def test_eval_knows_the_fit_trace_in_another_file(tmp_path, capsys):
    """eval holds out the solver's tokens when the trace is the fit one in any file (an ExFlow
    .npy imported to .npz, a re-save with other meta), not only the very same file; the same
    routing in another token order is another trace, evaluated whole."""
    npy = tmp_path / "exflow.npy"
    np.save(npy, np.random.default_rng(0).integers(0, 8, (100, 4)))
    out = tmp_path / "p.json"
    assert run(["solve", str(npy), "--gpus", "4", "--train-fraction", "0.5", "-q", "-o", str(out)]) == 0
    assert run(["import", "exflow", str(npy), "--meta", "note=copy", "-q", "-o", str(tmp_path / "t.npz")]) == 0
    trace = load_trace(tmp_path / "t.npz")
    save_trace(make_trace(trace.topk_ids[::-1].copy(), num_experts=8), tmp_path / "reversed.npz")
    reports = []
    for path in (npy, tmp_path / "t.npz", tmp_path / "reversed.npz"):
        capsys.readouterr()
        assert run(["eval", str(out), str(path), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert [r["tokens"]["subset"] for r in reports[:2]] == ["held-out", "held-out"]
    assert reports[0]["tokens"]["evaluated"] == reports[1]["tokens"]["evaluated"] == 50
    assert reports[0]["layouts"] == reports[1]["layouts"]
    assert reports[2]["tokens"]["evaluated"] == 100 and "not the trace the placement was fitted on" in reports[2]["tokens"]["note"]


def test_cli_reads_exflow_npy(tmp_path, capsys):
    path = tmp_path / "exflow.npy"
    np.save(path, np.random.default_rng(0).integers(0, 8, (100, 4)))
    out = tmp_path / "p.json"
    assert run(["solve", str(path), "--gpus", "2", "--time-limit", "2", "--coselect-weight", "3", "-o", str(out),
                "-q"]) == 0
    captured = capsys.readouterr()
    assert load_placement(out).num_experts == 8 and captured.out == ""
    # the .npy holds no expert count: a model whose top expert no token picked would get a
    # placement for one expert fewer, so the solve names the count it assumed and the way out
    assert "exflow.npy: an ExFlow .npy records no expert count: 8 assumed (its largest id + 1)" in captured.err
    assert "moeplace import exflow" in captured.err
    doc = json.loads(out.read_text())  # a given weight is kept; the others are chosen, folds by token
    cv = doc["solver"]["cross_validation"]
    assert doc["objective"]["coselect_weight"] == 3.0 and cv["by"] == "token" and len(cv["candidates"]) == 2


@pytest.mark.parametrize("args,needle", [
    (["--gpus", "3"], "cannot be split equally"),
    (["--gpus", "4", "--gpus-per-node", "3"], "not a multiple"),
    (["--gpus", "32"], "32 GPUs for 16 experts: some GPU would hold no expert"),
    (["--gpus", "3", "--objective", "latency", "--cluster",
      str(ROOT / "configs" / "cluster" / "h100-1x8-nvlink.yaml")],
     "--objective latency keeps E/G experts per GPU; --objective balance with --redundant-experts"),
    (["--gpus", "0"], "'--gpus' / '-g': 0 is not in the range x>=1"),
    (["--gpus", "4", "--train-fraction", "0"], "--train-fraction"),
    (["--gpus", "4", "--train-fraction", "1.5"], "--train-fraction"),
    (["--gpus", "4", "--time-limit", "0"], "time-limit"),
    (["--gpus", "4", "--time-limit", "nan"], "'--time-limit': 'nan' is not a finite number"),
    (["--gpus", "4", "--node-cost", "-1"], "--node-cost"),
    # below 1 the exact ILP optimised another objective and the "bound" exceeded the cost found
    (["--gpus", "4", "--node-cost", "0.5"], "'--node-cost': 0.5 is not in the range 1.0<=x<=1000000.0"),
    (["--gpus", "4", "--node-cost", "inf"], "'--node-cost': inf is not in the range 1.0<=x<=1000000.0"),
    (["--gpus", "4", "--seed", "-1"], "'--seed': -1 is not a seed: seeds are integers from 0 to 2**63 - 1"),
    (["--gpus", "4", "--objective", "latency", "--compute-weight", "inf"], "--compute-weight"),
])
def test_cli_bad_options_exit_2_with_one_line(trace_file, tmp_path, capsys, args, needle):
    out = tmp_path / "p.json"
    assert run(["solve", str(trace_file), *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeplace: error:") and needle in err[0], err
    assert not out.exists()


def test_library_refuses_node_cost_below_one():
    trace, _ = planted_trace(100, 2, 8, 2, 4, seed=0)
    with pytest.raises(MoeplaceError, match=re.escape("node_cost must be a number in [1, 1e+06], got 0.5")):
        solve_placement(trace, 4, 2, time_limit=5, seed=0, node_cost=0.5)
    with pytest.raises(MoeplaceError, match="--node-cost 0.5: must be >= 1"):  # the objective's own check
        solve_traffic(trace, 4, 2, time_limit=5, seed=0, node_cost=0.5)


def test_cli_balance_places_uneven_counts_on_a_trace(trace_file, tmp_path, capsys):
    # 16 experts on 3 GPUs: only balance can, with slots for the remainder (--redundant-experts 2: 18 slots)
    out = tmp_path / "p.json"
    assert run(["solve", str(trace_file), "--gpus", "3", "--objective", "balance", "--redundant-experts", "2",
                "--train-fraction", "0.5", "--time-limit", "5", "-o", str(out), "-q"]) == 0
    p = load_placement(out)
    assert [len(p.physical_slots(layer)) for layer in range(p.num_layers)] == [18] * p.num_layers
    slots = [[sum(g == gpu for g, _ in p.physical_slots(layer)) for gpu in range(3)] for layer in range(p.num_layers)]
    assert all(row == [6, 6, 6] for row in slots), slots
    # the baselines hold 6, 5, 5 experts (vLLM's uneven expert map) and are reported beside it
    held = json.loads(out.read_text())["metrics"]["held_out"]
    assert set(held) == {"placement", "contiguous", "round_robin", "random", "greedy_load"}
    assert held["placement"]["imbalance_max"] < held["contiguous"]["imbalance_max"]


def test_cli_unwritable_output_fails_before_the_solve(trace_file, tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    out = tmp_path / "file" / "p.json"
    assert run(["solve", str(trace_file), "--gpus", "4", "--time-limit", "30", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moeplace: error: -o {out}: {tmp_path / 'file'} is not a directory"]


@pytest.mark.parametrize("content, reason", [
    (b"", "file is empty"),
    (b"PK\x03\x04 truncated", "not a readable .npz: truncated or not an .npz file"),
    (b"not a trace at all", "not an .npz file (no zip archive signature)"),
])
def test_cli_bad_trace_files_exit_2(tmp_path, capsys, content, reason):
    bad, out = tmp_path / "bad.npz", tmp_path / "p.json"
    bad.write_bytes(content)
    assert run(["solve", str(bad), "--gpus", "2", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moeplace: error: {bad}: {reason}"), err
    assert not out.exists()


def test_cli_missing_trace_exit_2(tmp_path, capsys):
    assert run(["solve", str(tmp_path / "nope.npz"), "--gpus", "2", "-o", str(tmp_path / "p.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cv_folds_keep_sequences_together(small_trace):
    fold = cv_folds(small_trace, 2, np.random.default_rng(0))
    for seq in np.unique(small_trace.sequence_ids):
        assert len(set(fold[small_trace.sequence_ids == seq])) == 1
    assert np.bincount(fold, minlength=2).tolist() == [12, 12]  # 4 sequences of 6 tokens, 2 per fold
    assert cv_folds(small_trace.select_tokens(np.arange(6)), 2, np.random.default_rng(0)) is None  # one sequence


def test_select_weights_scores_every_candidate_and_keeps_given_weights():
    trace, _ = planted_trace(160, 3, 16, 2, 4, seed=5)
    far = time.monotonic() + 60
    free = dict.fromkeys(("coselect_weight", "smoothing", "prior"))
    weights, record, terms = select_weights(trace, 4, 4, 0, far, free)
    whole = edge_terms(trace)  # the folds' token sums, added, are the whole trace's
    for mine, theirs in ((terms.top1, whole.top1), (terms.smooth, whole.smooth), (terms.pairs, whole.pairs),
                         (terms.coselect, whole.coselect)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)
    assert len(record["candidates"]) == len(record["scores"]) == 6 and not record["stopped_by_time_limit"]
    assert weights == record["candidates"][int(np.argmin(record["scores"]))]
    assert record["candidates"][0] == DEFAULT_WEIGHTS  # first: wins ties
    given, rec, _ = select_weights(trace, 4, 4, 0, far, free | {"coselect_weight": 3.0})
    assert len(rec["candidates"]) == 2 and {c["coselect_weight"] for c in rec["candidates"]} == {3.0}
    assert all(c["smoothing"] == c["prior"] for c in rec["candidates"])
    assert select_weights(trace, 4, 4, 0, far, dict(coselect_weight=1.0, smoothing=0.0, prior=0.0)) == (
        dict(coselect_weight=1.0, smoothing=0.0, prior=0.0), None, None)
    many, _ = planted_trace(240, 4, 2, 2, 2, seed=5)  # 60 tokens per expert pair: no cross-validation
    assert select_weights(many, 2, 2, 0, far, free) == (DEFAULT_WEIGHTS, None, None)
    late, rec, _ = select_weights(trace, 4, 4, 0, time.monotonic() - 1, free)  # out of time: the default
    assert late == DEFAULT_WEIGHTS and rec["scores"] == [] and rec["stopped_by_time_limit"]
    # and the placement says the defaults were used, not that cross-validation chose them
    cut = solve_placement(trace, 4, time_limit=1e-6, seed=0)
    assert cut.objective["weights_chosen_by"].startswith("defaults (the time limit cut cross-validation")


def test_cross_validated_weights_beat_the_defaults_on_held_out_synthetic_tokens():
    """The synthetic planted trace favours more co-selection weight than the default."""
    trace, _ = planted_trace(640, 8, 64, 6, 8, affinity=0.6, boost=8.0, seed=7)
    _, held_idx = split_tokens(640, 0.5, 0)
    held = trace.select_tokens(held_idx)
    cv, fixed = (solve_placement(trace, 8, time_limit=30, seed=0, train_fraction=0.5, **w) for w in ({}, DEFAULT_WEIGHTS))
    assert cv.objective["weights_chosen_by"] == "cross-validation" and fixed.objective["weights_chosen_by"] == "given"
    ours, theirs = (evaluate(Placement(p.expert_to_gpu, 8, 8), held) for p in (cv, fixed))
    assert ours["cross_gpu_top1"] + ours["dest_gpus_topk"] < theirs["cross_gpu_top1"] + theirs["dest_gpus_topk"]


def test_uneven_baselines_keep_vllm_counts_and_greedy_balances():
    from moeplace.solve.baselines import experts_per_gpu, greedy_load, random_balanced, round_robin

    assert experts_per_gpu(16, 3).tolist() == [6, 5, 5] and experts_per_gpu(16, 4).tolist() == [4, 4, 4, 4]
    assert contiguous(1, 7, 3).tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    loads = np.array([[50.0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 9]])
    for layout in (random_balanced(2, 7, 3, 5), round_robin(2, 7, 3), greedy_load(loads, 3)):
        assert all(sorted(np.bincount(row, minlength=3).tolist()) == [2, 2, 3] for row in layout)
    greedy = greedy_load(loads, 3)
    # the hot expert gets a GPU with the fewest others: its GPU carries 50 + 1, the others 3 and 2
    assert np.bincount(greedy[0], weights=loads[0], minlength=3).max() == 51.0
    assert np.bincount(greedy[0], minlength=3)[greedy[0, 0]] == 2


def test_one_layer_trace_is_balanced_by_load():
    """One MoE layer has no layer pairs, so traffic is 0 for every layout: the solver must
    return the load-balanced one, not the contiguous start (which is lumpy under skewed loads)."""
    rng = np.random.default_rng(0)
    # skewed top-2 routing of one layer: experts 0-3 take most tokens, and contiguous puts them together
    probs = np.r_[np.full(4, 0.2), np.full(12, 0.2 / 12)]
    ids = np.stack([rng.choice(16, size=2, replace=False, p=probs) for _ in range(400)])[:, None, :]
    trace = make_trace(ids, num_experts=16)
    p = solve_placement(trace, num_gpus=4)
    assert p.objective["value"] == 0.0 and p.bound == 0.0 and p.gap == 0.0
    assert "no layer pairs" in p.solver["method"]
    assert np.bincount(p.expert_to_gpu[0], minlength=4).tolist() == [4, 4, 4, 4]
    train = p.metrics["train"]
    assert train["placement"]["imbalance_max"] == pytest.approx(train["greedy_load"]["imbalance_max"])
    assert train["placement"]["imbalance_max"] < train["contiguous"]["imbalance_max"] - 0.5


@pytest.mark.parametrize("layers, experts, gpus, gpn", [(2, 4, 2, 1), (3, 4, 4, 2), (2, 6, 2, 2)])
def test_exact_ilp_with_star_cuts_matches_brute_force(layers, experts, gpus, gpn):
    """The star cuts (an expert shares its GPU with E/G experts of a neighbouring layer, its
    node with E/N) are valid: the whole-model ILP finds the brute-force optimum, intra-layer
    edges and nodes included, and its bound stays below it."""
    rng = np.random.default_rng(layers * 10 + gpus)
    graph = random_graph(rng, layers, experts)
    d = distance_matrix(gpus, gpn, 2.5)
    layouts = [np.array(p) for p in {tuple(p) for p in balanced_layouts(experts, gpus)}]
    best = min(placement_cost(graph, np.stack(xs), d) for xs in itertools.product(layouts, repeat=layers))
    res = ilp.solve_window(graph, contiguous(layers, experts, gpus), range(layers), d, gpn, time_limit=30, pin_first=True)
    assert res.optimal and res.cost == pytest.approx(best)
    assert placement_cost(graph, res.expert_to_gpu, d) == pytest.approx(best)
    assert res.bound <= best + 1e-6


def test_summary_notes_when_traffic_piles_token_load_on_a_gpu() -> None:
    # traffic keeps E/G experts per GPU, not tokens: on a planted 256-expert trace at 64 GPUs its
    # worst layer carried 1.7x contiguous's max/mean load, and nothing said so
    def placement(objective: str, mine: float) -> Placement:
        row = {"cross_gpu_top1": 0.5, "cross_node_top1": 0.2, "dest_gpus_topk": 2.0, "imbalance_max": mine, "tokens": 10}
        return Placement(contiguous(2, 8, 4), 4, 4, objective={"name": objective},
                         metrics={"train": {"placement": row, "contiguous": {**row, "imbalance_max": 2.0}}})
    assert "note: the worst layer's max/mean token load per GPU is 3.00 against contiguous's 2.00" in \
        summary(placement("traffic", 3.0), "t.npz")
    assert "note:" not in summary(placement("traffic", 2.4), "t.npz")  # within 1.25x
    assert "note:" not in summary(placement("latency", 3.0), "t.npz")  # latency weighs load itself


def test_summary_says_what_the_traffic_objective_counts_and_what_a_large_gap_means() -> None:
    # `objective traffic: 45047.9, lower bound 25918, gap 42.5%` read as "42% from the best" to a
    # first-time reader (make demo); the bound is loose when E/G is large, which docs/solver.md said
    def placement(gap: float) -> Placement:
        return Placement(contiguous(2, 8, 4), 4, 4, objective={"name": "traffic", "value": 100.0}, bound=100 * (1 - gap),
                         gap=gap)
    lines = summary(placement(0.4), "t.npz").splitlines()
    assert lines[1].startswith("objective traffic: 100 (gate-weighted cross-GPU/cross-node moves of the fit tokens, "
                               "docs/solver.md), lower bound 60, gap 40.0%")
    assert lines[2].startswith('  (a large gap here means "not proven"')
    assert "not proven" not in summary(placement(0.1), "t.npz")


def test_summary_names_a_step_cut_by_its_share_of_the_time_limit() -> None:
    # a latency start's candidate ILPs cut by their 0.3 share, the solve not: said as such (before:
    # "stopped by --time-limit" after 15.6 s of 60), and the stopped solve still says it stopped
    def line(solver: dict) -> str:
        p = Placement(contiguous(2, 8, 4), 4, 4, objective={"name": "latency", "value": 50.0}, bound=45.0, gap=0.1,
                      solver={"method": "latency", "seconds": 15.6, **solver})
        return summary(p, "t.npz").splitlines()[1]
    assert line({"stopped_by_time_limit": False, "cut_steps": ["balance start (descent, ilp)"]}).endswith(
        "(latency, 15.6 s, balance start (descent, ilp) cut by its share of --time-limit)")
    assert line({"stopped_by_time_limit": True, "cut_steps": ["search"]}).endswith("15.6 s, stopped by --time-limit)")
    assert line({"stopped_by_time_limit": False, "cut_steps": []}).endswith("(latency, 15.6 s)")


@pytest.mark.parametrize("kwargs, message", [
    ({"time_limit": float("nan")}, "time_limit (--time-limit) must be a positive number"),
    ({"coselect_weight": -5.0}, "coselect_weight must be a number in [0, 1e+06]"),
    ({"smoothing": float("nan")}, "smoothing must be a number"),
    ({"node_cost": 0.5}, "node_cost must be a number in [1, 1e+06]"),
    ({"seed": -1}, "seed must be a whole number >= 0"),
    ({"seed": 1.5}, "seed must be a whole number >= 0"),
    ({"num_gpus": 4.0}, "num_gpus must be a whole number >= 1"),
    ({"restarts": -1}, "restarts must be a whole number >= 0"),
    ({"train_fraction": 0.0}, "train_fraction must be in (0, 1]"),
    ({"objective": "balance", "redundant": -1}, "redundant must be a whole number >= 0"),
])
def test_library_arguments_are_checked_as_the_cli_options_are(kwargs: dict, message: str) -> None:
    # the CLI's option types refused these; from Python they wrote NaN into the placement JSON,
    # reported a negative cost under a positive bound, or failed deep in numpy
    trace, _ = planted_trace(64, 3, 8, 2, 4, seed=1)
    args = {"num_gpus": 4, "time_limit": 5.0, **kwargs}
    with pytest.raises(MoeplaceError, match=re.escape(message)):
        solve_placement(trace, **args)


def test_concurrent_solves_give_back_the_callers_blas_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("no BLAS library found by threadpoolctl")
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        short, _ = planted_trace(64, 3, 8, 2, 4, seed=1)
        long, _ = planted_trace(2000, 8, 32, 2, 4, seed=2)
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(solve_placement, t, 4, time_limit=5.0) for t in (long, short)]
            placements = [f.result() for f in futures]  # a solve that failed in its thread fails here
        assert [p.num_gpus for p in placements] == [4, 4]
        # the short solve ended first: it must not restore while the long one runs, nor leave 1 behind
        assert blas_threads() == before


def test_edge_weights_defaults_are_the_solvers() -> None:
    """A library caller of edge_weights/EdgeTerms.graph gets the weighting `moeplace solve` uses
    by default (co-selection weight 1 used to be the library's, 2 the solver's)."""
    for fn in (edge_weights, EdgeTerms.graph):
        params = inspect.signature(fn).parameters
        assert {name: params[name].default for name in DEFAULT_WEIGHTS} == DEFAULT_WEIGHTS


def test_load_note_gives_the_latency_command_and_it_runs(tmp_path, capsys, monkeypatch) -> None:
    """The adoption review's tour (tiny-moe, 4 GPUs): traffic held 3.0 max/mean load against
    contiguous's 1.78 and the note named no way on. It now gives the latency solve's command line
    with the shipped 4-GPU cluster and tiny-moe configs, looking at the train tokens too; the
    command runs as printed."""
    monkeypatch.chdir(ROOT)
    trace, _ = planted_trace(200, 3, 16, 2, 4, seed=0)
    save_trace(make_trace(trace.topk_ids, num_experts=16, meta={"model": "checkpoints/tiny-moe"}), tmp_path / "t.npz")
    row = {"cross_gpu_top1": 0.5, "cross_node_top1": 0.2, "dest_gpus_topk": 2.0, "imbalance_max": 1.5, "tokens": 10}
    bad = {**row, "imbalance_max": 3.0}
    p = Placement(contiguous(3, 16, 4), 4, 4, objective={"name": "traffic"}, solver={"seed": 2},
                  split={"train_fraction": 0.5, "seed": 2}, trace_model={"model": "checkpoints/tiny-moe"},
                  metrics={"train": {"placement": bad, "contiguous": row}, "held_out": {"placement": row, "contiguous": row}})
    text = summary(p, "t.npz", str(tmp_path / "t.npz"), str(tmp_path / "p.json"))
    assert "max/mean token load per GPU is 3.00 against contiguous's 1.50 (train tokens)" in text  # held-out is fine
    command = text.splitlines()[-1].strip()
    assert command == (f"moeplace solve {tmp_path / 't.npz'} --gpus 4 --train-fraction 0.5 --seed 2 --objective latency "
                       "--cluster configs/cluster/h100-1x4-nvlink.yaml --model-config configs/model/tiny-moe.yaml "
                       f"-o {tmp_path / 'p-latency.json'}")
    args = shlex.split(command)
    assert args[:2] == ["moeplace", "solve"] and run(args[1:] + ["--time-limit", "5", "-q"]) == 0
    assert load_placement(tmp_path / "p-latency.json").objective["name"] == "latency"
    # no shipped config for 3 nodes x 4 GPUs nor for an unknown model: placeholders, each explained
    odd = Placement(contiguous(3, 24, 12), 12, 4, objective={"name": "traffic"},
                    metrics={"train": {"placement": bad, "contiguous": row}})
    lines = summary(odd, "t.npz").splitlines()
    assert "--cluster CLUSTER.yaml --model-config MODEL.yaml -o PLACEMENT.json" in lines[-3]
    assert "--gpus 12 --gpus-per-node 4" in lines[-3] and "nodes: 3, gpus_per_node: 4" in lines[-2]


def test_cluster_without_objective_solves_latency_and_traffic_refuses_it(trace_file, tmp_path, capsys) -> None:
    """A cost model is only the latency objective's: --cluster alone now asks for it (one note on
    stderr) instead of failing; --objective traffic with it is still refused, not ignored."""
    cost = ["--cluster", str(ROOT / "configs" / "cluster" / "h100-1x4-nvlink.yaml"),
            "--model-config", str(ROOT / "configs" / "model" / "tiny-moe.yaml")]
    out = tmp_path / "p.json"
    assert run(["solve", str(trace_file), "--gpus", "4", "--time-limit", "3", *cost, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: --cluster given: solved --objective latency" in err
    assert load_placement(out).objective["name"] == "latency"
    assert run(["solve", str(trace_file), "--gpus", "4", "--objective", "traffic", *cost, "-o", str(out)]) == 2
    assert "--cluster and --model-config give the latency objective its cost model" in capsys.readouterr().err
    assert run(["solve", str(trace_file), "--gpus", "4", "--time-limit", "3", "-q", "-o", str(out)]) == 0
    assert load_placement(out).objective["name"] == "traffic" and capsys.readouterr().err == ""  # still the default
    assert run(["solve", str(trace_file), "--gpus", "4", *cost[2:], "-o", str(out)]) == 2  # a model without a cluster
    assert "--model-config completes the latency objective's --cluster: add --cluster" in capsys.readouterr().err


def test_gpus_help_says_when_counts_may_differ(capsys) -> None:
    # "each holds E/G experts of every layer" was false for balance/latency with a cap or copies
    helps = {option.name: option.help for option in solve_command.params if isinstance(option, click.Option)}
    assert helps["gpus"] == ("Expert-parallel GPUs G: each holds E/G experts of every layer, unless --redundant-experts "
                             "or --max-experts-per-gpu(-total) allow other counts (latency, balance; see above).")
    assert "(default: latency with --cluster, balance on a load-only input, else traffic)" in helps["objective"]
    assert run(["solve", "--help"]) == 0 and "Expert-parallel GPUs G: each holds" in capsys.readouterr().out


def _table(text: str, header: str) -> dict[str, dict[str, str]]:
    """A summary table of `text` (the block from the line starting `header`): {row label: {column title: cell}}."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(header))
    titles = re.split(r"\s{2,}", lines[start].strip())[1:]
    rows = {}
    for line in lines[start + 1:]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(titles) + 1:
            break
        rows[cells[0]] = dict(zip(titles, cells[1:]))
    return rows


def test_solve_and_eval_print_a_metric_with_the_same_digits(trace_file: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """solve printed cross-GPU top-1 with 3 decimals, eval with 4: the same figure of the same
    placement read differently. Both take eval's column formats now (node metrics too: 2 nodes)."""
    out = tmp_path / "p.json"
    assert run(["solve", str(trace_file), "--gpus", "4", "--gpus-per-node", "2", "--train-fraction", "0.5",
                "--time-limit", "5", "-o", str(out)]) == 0
    solved = _table(capsys.readouterr().out, "held-out tokens (150):")
    assert run(["eval", str(out), str(trace_file)]) == 0
    evaluated = _table(capsys.readouterr().out, "layout")
    assert set(solved["placement"]) == {"cross-GPU top-1", "cross-node top-1", "dest GPUs top-k", "imbalance max"}
    # every row of solve's held-out table is eval's row, cell for cell (value and ratio to contiguous)
    assert list(solved) == list(evaluated)
    for name, cells in solved.items():
        for title, cell in cells.items():
            assert cell == evaluated[name][title], (name, title)
    assert re.fullmatch(r"0\.\d{4} \(\d\.\d\dx\)", solved["placement"]["cross-GPU top-1"])


@pytest.mark.parametrize("meta, warned", [({"hidden_size": 64}, True), ({"hidden_size": 1024}, False), ({}, False),
                                          ({"hidden_size": "64"}, False)])
def test_latency_solve_warns_when_the_model_config_is_not_the_traced_width(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                           meta: dict, warned: bool) -> None:
    """A model config's hidden_size was never checked against the traced model's (trace meta,
    `moeplace trace` records it): a mismatch is one warning line naming both (a what-if is
    legitimate, so never an error); no meta hidden_size, or not a number there: nothing said."""
    trace, _ = planted_trace(64, 3, 8, 2, 4, seed=1)
    save_trace(make_trace(trace.topk_ids, num_experts=8, meta=meta), tmp_path / "t.npz")
    (tmp_path / "c.yaml").write_text("cluster: {nodes: 1, gpus_per_node: 4, intra_node: {bandwidth_GBps: 400, latency_us: 5}}\n")
    (tmp_path / "m.yaml").write_text("model: {hidden_size: 1024, expert_us_per_token: 0.01}\n")
    args = ["solve", str(tmp_path / "t.npz"), "--gpus", "4", "--objective", "latency", "--cluster", str(tmp_path / "c.yaml"),
            "--model-config", str(tmp_path / "m.yaml"), "--time-limit", "2", "-o", str(tmp_path / "p.json")]
    assert run(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "hidden_size" in line]
    if not warned:
        assert lines == []
        return
    assert lines == [f"moeplace: warning: {tmp_path / 't.npz'} is a trace of a model of hidden_size 64 (trace meta), "
                     f"{tmp_path / 'm.yaml'} gives hidden_size 1024: predicted bytes and times are those of that model "
                     "(if that is not the what-if intended, give the traced model's figures)"]
    # the model section in the cluster file: that file is named
    (tmp_path / "cm.yaml").write_text((tmp_path / "c.yaml").read_text() + (tmp_path / "m.yaml").read_text())
    assert run(args[:7] + [str(tmp_path / "cm.yaml"), "--pareto", "--time-limit", "2", "-q", "-o", str(tmp_path / "q.json")]) == 0
    (line,) = capsys.readouterr().err.splitlines()
    assert f"hidden_size 64 (trace meta), {tmp_path / 'cm.yaml'} gives hidden_size 1024" in line


def test_combinatorial_bound_is_the_hand_figure_and_tight_on_uniform_edges() -> None:
    """All-ones 4 x 4 layer pair plus a weight-2 intra pair (total 18). One node of 2 GPUs (node
    cost ignored): each expert saves its 2 heaviest next-layer edges (8) and its heaviest intra one
    (2): 18 - 10 = 8. Two nodes of 2 GPUs, node cost 3: GPUs save 4 (one edge each), nodes 8 + 2,
    so 3 x 18 - 2 x 10 - 4 = 30. A single sender (row 0 all ones) saves 2 on its GPU, counted from
    the rows; its transpose, a single receiver, from the columns: 4 - 2 = 2. Every figure is the
    brute-force optimum."""
    inter = np.ones((1, 4, 4))
    intra = np.zeros((2, 4, 4))
    intra[0, 0, 1] = intra[0, 1, 0] = 2.0
    graph = AffinityGraph(inter, intra)
    sender = np.zeros((1, 4, 4))
    sender[0, 0] = 1.0
    cases = [(graph, 2, 2, 3.0, 8.0), (graph, 4, 2, 3.0, 30.0),
             (AffinityGraph(sender, np.zeros((2, 4, 4))), 2, 2, 1.0, 2.0),
             (AffinityGraph(sender.transpose(0, 2, 1).copy(), np.zeros((2, 4, 4))), 2, 2, 1.0, 2.0)]
    for g, gpus, gpn, node_cost, figure in cases:
        d = distance_matrix(gpus, gpn, node_cost)
        layouts = [np.array(p) for p in set(itertools.permutations(np.repeat(np.arange(gpus), 4 // gpus)))]
        brute = min(placement_cost(g, np.stack([a, b]), d) for a in layouts for b in layouts)
        assert ilp.combinatorial_bound(g, gpus, gpn, node_cost) == pytest.approx(figure) == brute


def test_relative_gap_is_the_share_of_the_cost_above_the_bound() -> None:
    assert relative_gap(10.0, 8.0) == pytest.approx(0.2)
    assert relative_gap(8.0, 10.0) == 0.0  # a bound above the cost (rounding): no negative gap
    assert relative_gap(0.0, 0.0) == 0.0 and relative_gap(3.0, None) is None


def _pair_cost(inter: np.ndarray, a: np.ndarray, b: np.ndarray, d: np.ndarray) -> float:
    """Traffic of one layer pair: sum_ij inter[i, j] D[a(i), b(j)]."""
    return float((inter * d[a][:, b]).sum())


LAYOUTS_2X4 = [np.array(p) for p in sorted(set(itertools.permutations([0, 0, 1, 1])))]  # 4 experts, 2 GPUs


def _anchored(anchor: int, seed: int) -> tuple[np.ndarray, AffinityGraph]:
    """Random inter edges [3, 4, 4] over 4 layers; intra edges only at layer `anchor`, grouping
    its experts {0, 3} | {1, 2}."""
    inter = np.random.default_rng(seed).random((3, 4, 4))
    intra = np.zeros((4, 4, 4))
    intra[anchor, 0, 3] = intra[anchor, 3, 0] = intra[anchor, 1, 2] = intra[anchor, 2, 1] = 1.0
    return inter, AffinityGraph(inter, intra)


def test_chain_init_assigns_each_layer_optimally_to_the_one_before_it() -> None:
    """2 GPUs x 4 experts, 4 layers: from the anchor (the layer with the most intra-layer weight,
    grouped by co-selection), each later layer is the cheapest balanced layout given the layer
    before it and each earlier one given the layer after it (brute force over the 6 layouts)."""
    inter, graph = _anchored(2, seed=11)
    d, layouts = distance_matrix(2, 2, 1.0), LAYOUTS_2X4
    x = heuristics.chain_init(graph, 2, 2, d, np.random.default_rng(0))
    assert (x[2][0] == x[2][3]) and (x[2][1] == x[2][2]) and x[2][0] != x[2][1]
    assert _pair_cost(inter[2], x[2], x[3], d) == pytest.approx(min(_pair_cost(inter[2], x[2], b, d) for b in layouts))
    for layer in (1, 0):
        assert _pair_cost(inter[layer], x[layer], x[layer + 1], d) == pytest.approx(
            min(_pair_cost(inter[layer], a, x[layer + 1], d) for a in layouts))
    y = heuristics.chain_init(graph, 2, 2, d, np.random.default_rng(0), anchor=0)  # no intra: a seeded shuffle
    assert np.bincount(y[0], minlength=2).tolist() == [2, 2]
    for layer in (1, 2, 3):
        assert _pair_cost(inter[layer - 1], y[layer - 1], y[layer], d) == pytest.approx(
            min(_pair_cost(inter[layer - 1], y[layer - 1], b, d) for b in layouts))


def test_improve_layer_and_coordinate_descent_reach_each_layers_transport_optimum() -> None:
    """Without intra-layer edges a layer's best layout given its neighbours is a transport problem:
    improve_layer reaches the brute-force optimum over the 6 balanced layouts and reports the exact
    gain; after coordinate descent no single layer can improve; a passed deadline stops it at once."""
    rng = np.random.default_rng(12)
    graph = AffinityGraph(rng.random((2, 4, 4)), np.zeros((3, 4, 4)))
    d = distance_matrix(2, 2, 1.0)
    layouts = LAYOUTS_2X4

    def best_cost(x: np.ndarray, layer: int) -> float:
        return min(layer_cost(graph, np.concatenate([x[:layer], a[None], x[layer + 1:]]), layer, d) for a in layouts)

    x = np.array([[0, 1, 0, 1], [1, 1, 0, 0], [1, 0, 0, 1]])  # layer 1 is its worst layout
    before = layer_cost(graph, x, 1, d)
    gain = heuristics.improve_layer(graph, x, 1, d)
    assert gain > 1.0
    assert layer_cost(graph, x, 1, d) == pytest.approx(best_cost(x, 1)) and gain == pytest.approx(before - best_cost(x, 1))
    assert np.bincount(x[1], minlength=2).tolist() == [2, 2]
    start = x.copy()
    assert heuristics.coordinate_descent(graph, x, d, deadline=time.monotonic() - 1) == 1
    np.testing.assert_array_equal(x, start)
    sweeps = heuristics.coordinate_descent(graph, x, d)
    assert 1 <= sweeps <= 50
    for layer in range(3):
        assert layer_cost(graph, x, layer, d) == pytest.approx(best_cost(x, layer))


def test_perturb_swaps_pairs_only_inside_its_window() -> None:
    x = np.tile(np.repeat(np.arange(4), 2), (6, 1))
    y = x.copy()
    layers = heuristics.perturb(y, np.random.default_rng(0), window=2, strength=0.5)
    assert len(layers) == 2 and 0 <= layers.start <= 4
    for layer in range(6):
        assert np.bincount(y[layer], minlength=4).tolist() == [2] * 4
        if layer not in layers:
            np.testing.assert_array_equal(y[layer], x[layer])
    assert any((y[layer] != x[layer]).any() for layer in layers)
    assert heuristics.perturb(x.copy(), np.random.default_rng(0), window=10, strength=0.5) == range(0, 6)


def test_check_arguments_bounds_are_inclusive_where_the_cli_options_are() -> None:
    """The edges of what the CLI accepts: whole numbers from their minimum (numpy integers too,
    never bools), weights in [0, MAX_WEIGHT] (node_cost from 1), a finite positive time limit, a
    train fraction in (0, 1]; None and names it does not know are let through."""
    from moeplace.options import MAX_WEIGHT
    from moeplace.solve.solver import check_arguments

    check_arguments(num_gpus=1, seed=np.int64(0), max_experts_per_gpu=1, coselect_weight=0.0, smoothing=MAX_WEIGHT,
                    node_cost=1.0, top1_weight=np.float32(2.0), time_limit=1e-6, train_fraction=1.0, prior=None,
                    objective="balance")
    for bad in ({"num_gpus": 0}, {"seed": True}, {"kicks": 2.0}, {"coselect_weight": MAX_WEIGHT * 2},
                {"node_cost": 0.99}, {"prior": True}, {"compute_weight": "1"}, {"time_limit": float("inf")},
                {"time_limit": 0.0}, {"time_limit": -1.0}, {"train_fraction": 1.5}, {"train_fraction": -0.5}):
        with pytest.raises(MoeplaceError, match=f"^{next(iter(bad))}"):
            check_arguments(**bad)


def test_improve_layer_keeps_only_exact_improvements_and_solves_three_gpu_transport() -> None:
    """6 experts on 3 GPUs, layer 1 of random graphs. With intra-layer edges the re-assignment is
    linearised, so improve_layer keeps it only when the exact cost improves: the gain is never
    negative (seed 5's linearised layout is worse, even after swaps). Without them it is the
    transport optimum over all 90 balanced layouts, also where only a 3-cycle (no single swap)
    improves (seeds 5, 15, 18, 29 start at such a swap-local optimum)."""
    d = distance_matrix(3, 3, 1.0)
    layouts = [np.array(p) for p in set(balanced_layouts(6, 3))]
    for seed in range(30):
        rng = np.random.default_rng(seed)
        graph = random_graph(rng, 3, 6)
        x = np.stack([rng.permutation(np.repeat(np.arange(3), 2)) for _ in range(3)])
        y = x.copy()
        before = layer_cost(graph, y, 1, d)
        gain = heuristics.improve_layer(graph, y, 1, d)
        assert gain >= -1e-9 and gain == pytest.approx(before - layer_cost(graph, y, 1, d))
        plain = AffinityGraph(graph.inter, np.zeros_like(graph.intra))
        y = x.copy()
        heuristics.improve_layer(plain, y, 1, d)
        best = min(layer_cost(plain, np.stack([x[0], a, x[2]]), 1, d) for a in layouts)
        assert layer_cost(plain, y, 1, d) == pytest.approx(best)


def test_coordinate_descent_alternates_sweep_direction_until_a_sweep_gains_too_little(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweeps run forward, backward, forward, ... over `layers`; the first sweep whose total gain
    is at most rel_tol x total edge weight (here 1e-6 x 12) is the last, and its number is returned."""
    graph = AffinityGraph(np.full((3, 2, 2), 1.0), np.zeros((4, 2, 2)))  # total weight 12
    gains = iter([1.0] * 6 + [1e-3, 0.0, 0.0] + [0.0] * 3)  # sweeps 1-2 gain 3, 3 gains 1e-3, 4 nothing
    calls: list[int] = []

    def fake_improve(graph: AffinityGraph, x: np.ndarray, layer: int, distance: np.ndarray,
                     cap: heuristics.LoadCap | None, moves: heuristics.MoveLimit | None = None) -> float:
        assert cap is None and moves is None
        calls.append(layer)
        return next(gains)

    monkeypatch.setattr(heuristics, "improve_layer", fake_improve)
    x = np.zeros((4, 2), dtype=np.int64)
    assert heuristics.coordinate_descent(graph, x, distance_matrix(2, 2, 1.0), layers=range(1, 4)) == 4
    assert calls == [1, 2, 3, 3, 2, 1, 1, 2, 3, 3, 2, 1]


def test_chain_init_groups_the_anchor_by_coselection_or_shuffles_it_by_seed() -> None:
    """An anchor with intra-layer edges is grouped by them for every seed; one without is a seeded
    random balanced layout (not one fixed layout). The anchor may be the last layer: the chain
    then runs backwards only, each layer optimal given the one after it."""
    inter, graph = _anchored(3, seed=13)
    d, layouts = distance_matrix(2, 2, 1.0), LAYOUTS_2X4
    for seed in range(8):
        x = heuristics.chain_init(graph, 2, 2, d, np.random.default_rng(seed))
        assert (x[3][0] == x[3][3]) and (x[3][1] == x[3][2]) and x[3][0] != x[3][1]
        for layer in (2, 1, 0):
            assert _pair_cost(inter[layer], x[layer], x[layer + 1], d) == pytest.approx(
                min(_pair_cost(inter[layer], a, x[layer + 1], d) for a in layouts))
    shuffled = {tuple(heuristics.chain_init(graph, 2, 2, d, np.random.default_rng(seed), anchor=0)[0])
                for seed in range(8)}
    assert len(shuffled) > 1 and all(sorted(s) == [0, 0, 1, 1] for s in shuffled)


def test_combinatorial_bound_counts_only_the_intra_pairs_a_gpu_or_node_can_hold() -> None:
    """One layer of 4 experts, all 6 intra pairs weight 1 (total 6), no next-layer traffic. On 2
    GPUs each expert keeps 1 partner: 4 / 2 = 2 pairs saved (below the total 6), bound 6 - 2 = 4.
    On 4 GPUs in 2 nodes, node cost 3: no pair shares a GPU, 2 share a node: 3 x 6 - 2 x 2 = 14.
    Both are the brute-force optimum."""
    intra = np.ones((2, 4, 4))
    intra[1] = 0.0
    for layer in intra:
        np.fill_diagonal(layer, 0.0)
    graph = AffinityGraph(np.zeros((1, 4, 4)), intra)
    for gpus, gpn, node_cost, figure in ((2, 2, 1.0, 4.0), (4, 2, 3.0, 14.0)):
        d = distance_matrix(gpus, gpn, node_cost)
        layouts = [np.array(p) for p in set(itertools.permutations(np.repeat(np.arange(gpus), 4 // gpus)))]
        brute = min(placement_cost(graph, np.stack([a, np.zeros(4, dtype=np.int64)]), d) for a in layouts)
        assert ilp.combinatorial_bound(graph, gpus, gpn, node_cost) == pytest.approx(figure) == brute


def test_perturb_makes_strength_times_half_the_experts_swaps_at_least_one() -> None:
    """8 experts, one per GPU, so each swap is a transposition of the layer's permutation: after
    k swaps its parity is k mod 2 and at most 2k experts moved. Strength 0 still swaps one pair
    (exactly 2 moved); strength 0.75 swaps 0.75 x 8 / 2 = 3 pairs: an odd permutation, and more
    than the 2 experts one swap could move in some layer."""
    def parity(perm: np.ndarray) -> int:
        seen, cycles = np.zeros(len(perm), dtype=bool), 0
        for i in range(len(perm)):
            if not seen[i]:
                cycles += 1
                while not seen[i]:
                    seen[i], i = True, int(perm[i])
        return (len(perm) - cycles) % 2

    x = np.tile(np.arange(8), (5, 1))
    y = x.copy()
    heuristics.perturb(y, np.random.default_rng(0), window=5, strength=0.0)
    assert [int((y[layer] != x[layer]).sum()) for layer in range(5)] == [2] * 5
    y = x.copy()
    heuristics.perturb(y, np.random.default_rng(0), window=5, strength=0.75)
    assert [parity(y[layer]) for layer in range(5)] == [1] * 5
    assert max(int((y[layer] != x[layer]).sum()) for layer in range(5)) > 2


def _contiguous_search(calls: list[dict]) -> Callable[..., SearchResult]:
    """A stand-in for the short searches of cross-validation: records its arguments and returns
    the contiguous layout, so that every metric scores exactly its contiguous baseline."""
    def search(graph: AffinityGraph, num_gpus: int, gpus_per_node: int, node_cost: float, deadline: float, seed: int,
               **kwargs: object) -> SearchResult:
        calls.append(dict(graph=graph, num_gpus=num_gpus, node_cost=node_cost, seed=seed, **kwargs))
        layout = contiguous(graph.num_layers, graph.num_experts, num_gpus)
        return SearchResult(layout, 0.0, 0.0, "stub", {}, False)
    return search


def test_select_weights_scores_each_metric_as_a_ratio_to_contiguous_averaged_over_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout that scores as contiguous on every fold scores 1 per metric: 2 on one node
    (cross_gpu_top1, dest_gpus_topk), 4 on two (+ cross_node_top1, dest_nodes_topk). Each
    candidate is fitted on the other fold's tokens only, by a short search (2 restarts, 4 kicks,
    no ILP) with the final solve's node cost and seed."""
    from moeplace.solve import solver

    calls: list[dict] = []
    monkeypatch.setattr(solver, "search_traffic", _contiguous_search(calls))
    trace, _ = planted_trace(160, 3, 16, 2, 4, seed=5)
    free = dict.fromkeys(("coselect_weight", "smoothing", "prior"))
    far = time.monotonic() + 60
    _, one_node, _ = select_weights(trace, 4, 4, 7, far, free, node_cost=3.0)
    assert one_node is not None
    assert one_node["scores"] == [2.0] * 6 and one_node["by"] == "token" and one_node["chosen"] == 0
    fold = cv_folds(trace, 2, np.random.default_rng(7))
    folds = [edge_terms(trace.select_tokens(np.flatnonzero(fold == f))) for f in range(2)]
    assert len(calls) == 12
    for i, cand in enumerate(one_node["candidates"]):  # one fit per fold, each on that fold's tokens alone
        fits = [terms.graph(cand["coselect_weight"], cand["smoothing"], cand["prior"]) for terms in folds]
        got = [calls[2 * i]["graph"], calls[2 * i + 1]["graph"]]
        same = [[np.allclose(g.inter, f.inter, rtol=1e-12, atol=1e-12) and np.allclose(g.intra, f.intra, rtol=1e-12, atol=1e-12)
                 for f in fits] for g in got]
        assert same in ([[True, False], [False, True]], [[False, True], [True, False]])
    for call in calls:
        assert (call["num_gpus"], call["node_cost"], call["seed"]) == (4, 3.0, 7)
        assert (call["restarts"], call["kicks"], call["exact"], call["layer_ilps"]) == (2, 4, False, False)
    _, two_nodes, _ = select_weights(trace, 4, 2, 7, far, free)
    assert two_nodes is not None and two_nodes["scores"] == [4.0] * 6


def test_select_weights_keeps_a_given_smoothing_and_chooses_the_prior(monkeypatch: pytest.MonkeyPatch) -> None:
    """--smoothing given, --prior not: the shrinkage grid (0.5, 2) fills the prior alone."""
    from moeplace.solve import solver

    monkeypatch.setattr(solver, "search_traffic", _contiguous_search([]))
    trace, _ = planted_trace(160, 3, 16, 2, 4, seed=5)
    free: dict[str, float | None] = dict(coselect_weight=None, smoothing=1.5, prior=None)
    _, record, _ = select_weights(trace, 4, 4, 0, time.monotonic() + 60, free)
    assert record is not None and [(c["coselect_weight"], c["smoothing"], c["prior"]) for c in record["candidates"]] == [
        (2.0, 1.5, 0.5), (2.0, 1.5, 2.0), (1.0, 1.5, 0.5), (1.0, 1.5, 2.0), (4.0, 1.5, 0.5), (4.0, 1.5, 2.0)]


def test_select_weights_skip_rules_at_their_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cross-validation runs at 50 tokens per expert pair and at L x E = 4096, and is skipped
    (defaults, no record) just above either, and when the folds cannot be formed (one sequence)."""
    from moeplace.solve import solver

    monkeypatch.setattr(solver, "search_traffic", _contiguous_search([]))
    rng = np.random.default_rng(0)
    free = dict.fromkeys(("coselect_weight", "smoothing", "prior"))
    far = time.monotonic() + 60

    def chosen(tokens: int, layers: int, experts: int, sequence_ids: np.ndarray | None = None) -> bool:
        trace = make_trace(rng.integers(0, experts, (tokens, layers, 1)), num_experts=experts, sequence_ids=sequence_ids)
        weights, record, terms = select_weights(trace, 2, 2, 0, far, free)
        assert (record is None) == (terms is None) and (record is not None or weights == DEFAULT_WEIGHTS)
        return record is not None

    assert chosen(200, 1, 2) and not chosen(201, 1, 2)  # 50 and 50.25 tokens per pair
    assert chosen(4, 64, 64) and not chosen(4, 17, 241)  # L x E = 4096 and 4097
    assert chosen(4, 1, 4, sequence_ids=np.array([0, 0, 1, 1]))
    assert not chosen(4, 1, 4, sequence_ids=np.zeros(4, dtype=np.int64))


def test_select_weights_prints_nothing_when_it_is_quick(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The progress bar stays silent for work under a second, its closing line included."""
    from moeplace.solve import solver

    monkeypatch.setattr(solver, "search_traffic", _contiguous_search([]))
    trace, _ = planted_trace(160, 3, 16, 2, 4, seed=5)
    select_weights(trace, 4, 4, 0, time.monotonic() + 60, dict.fromkeys(("coselect_weight", "smoothing", "prior")),
                   progress=True)
    assert capsys.readouterr().err == ""


def test_cross_validation_gets_half_of_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeplace.solve import solver

    class Stop(Exception):
        pass

    got: list[float] = []

    def record(trace: Trace, num_gpus: int, gpus_per_node: int, seed: int, deadline: float, *args: object,
               **kwargs: object) -> None:
        got.append(deadline)
        raise Stop

    monkeypatch.setattr(solver, "select_weights", record)
    trace, _ = planted_trace(160, 3, 16, 2, 4, seed=5)
    start = time.monotonic()
    with pytest.raises(Stop):
        solver.solve_traffic(trace, 4, 4, 100.0, 0)
    assert got[0] - start == pytest.approx(50.0, abs=1.0)


def test_select_weights_records_the_fold_average_of_the_ratios_to_5_decimals(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search that returns contiguous with each layer's experts shifted by one: its recorded
    score is, averaged over the two held-out folds, the sum of its metrics over contiguous's, rounded."""
    from moeplace.solve import solver

    def shifted(graph: AffinityGraph, num_gpus: int, *args: object, **kwargs: object) -> SearchResult:
        return SearchResult(np.roll(contiguous(graph.num_layers, graph.num_experts, num_gpus), 1, axis=1),
                            0.0, 0.0, "stub", {}, False)

    monkeypatch.setattr(solver, "search_traffic", shifted)
    trace, _ = planted_trace(160, 3, 16, 2, 4, seed=5)
    _, record, _ = select_weights(trace, 4, 4, 0, time.monotonic() + 60, dict(coselect_weight=None, smoothing=1.0, prior=1.0))
    fold = cv_folds(trace, 2, np.random.default_rng(0))
    ratio = []
    for f in range(2):
        held = trace.select_tokens(np.flatnonzero(fold == f))
        ours = evaluate(Placement(np.roll(contiguous(3, 16, 4), 1, axis=1), 4, 4), held)
        base = evaluate(Placement(contiguous(3, 16, 4), 4, 4), held)
        ratio.append(sum(ours[k] / base[k] for k in ("cross_gpu_top1", "dest_gpus_topk")))
    expected = round((ratio[0] + ratio[1]) / 2, 5)
    assert record is not None and expected != round(expected, 4) and record["scores"] == [expected] * 3


def test_one_expert_per_layer_solves_and_analyzes(tmp_path: Path) -> None:
    # a trace whose layers hold a single expert (an import of a one-column CSV, or ids all 0)
    # made the local search's kick draw two distinct experts out of one: exit 3 from solve and
    # analyze; there is nothing to swap, and every layout is the one layout
    trace = make_trace(np.zeros((60, 3, 1), dtype=np.int64), num_experts=1)
    path = tmp_path / "one.npz"
    save_trace(trace, path)
    out = tmp_path / "p.json"
    assert run(["solve", str(path), "--gpus", "1", "--time-limit", "2", "-q", "-o", str(out)]) == 0
    assert load_placement(out).expert_to_gpu.tolist() == [[0], [0], [0]]
    assert run(["analyze", str(path), "--no-figures", "--time-limit", "1", "-o", str(tmp_path / "an")]) == 0
    x = np.zeros((3, 1), dtype=np.int64)
    assert list(heuristics.perturb(x, np.random.default_rng(0), window=2, strength=0.3)) in ([0, 1], [1, 2]) and not x.any()
