"""Cost model (solve/costmodel.py) and the replica serving rule (eval/metrics.serve_layer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import serve_layer, token_gpus
from moeplace.placement import Placement
from moeplace.solve.affinity import distance_matrix, edge_terms, gate_weighted_transitions
from moeplace.solve.costmodel import (Cluster, CostModel, ModelCost, active_probability, alltoall_us,
                                      cost_model_from_record, load_cost_model, predict)
from moeplace.solve.latency import LatencyModel, _layer_lp, count_range, fold_tokens, latency_bound, shrunk_loads
from moeplace.solve.replicate import _pair_cost, add_replicas, propose
from moeplace.solve.solver import solve_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import Trace, flow_counts, make_trace

from conftest import ROOT

CLUSTERS = sorted((ROOT / "configs" / "cluster").glob("*.yaml"))


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "c.yaml"
    p.write_text(text)
    return p


MODEL = "\nmodel: {hidden_size: 8, expert_us_per_token: 1}"
TINY = """
cluster: {nodes: 1, gpus_per_node: 2, intra_node: {bandwidth_GBps: 1, latency_us: 3}}
model: {hidden_size: 1000, dtype_bytes: 1, expert_us_per_token: 2, expert_fixed_us: 10}
"""


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.stem for p in CLUSTERS])
def test_shipped_configs_load(path: Path) -> None:
    cm = load_cost_model(path, ROOT / "configs" / "model" / "flame-moe-290m.yaml")
    nodes, gpus = map(int, path.stem.split("-")[1].split("x"))  # h100-2x8-ib: 2 nodes of 8 GPUs
    assert (cm.cluster.num_gpus, cm.cluster.gpus_per_node) == (nodes * gpus, gpus)


@pytest.mark.parametrize("cluster, model", [("h100-2x8-ib.yaml", "deepseek-v3.yaml"),
                                            ("h100-1x8-nvlink.yaml", "flame-moe-290m.yaml")])
def test_recorded_cost_model_reads_back_what_describe_wrote(cluster: str, model: str) -> None:
    """A placement records describe(); eval rebuilds the very cost model from it, and refuses a
    record it cannot read (a field edited, or a key of an older moeplace) naming the field."""
    cost = load_cost_model(ROOT / "configs/cluster" / cluster, ROOT / "configs/model" / model)
    back = cost_model_from_record(cost.describe(), "p.json: objective.cost_model", "recorded")
    assert (back.cluster, back.model) == (cost.cluster, cost.model)
    old = cost.describe()
    old["cluster"] = {("intra_gbps" if k == "intra_GBps" else k): v for k, v in old["cluster"].items()}
    with pytest.raises(MoeplaceError, match=r"p.json: objective.cost_model.cluster: unknown key\(s\) \['intra_gbps'\]"):
        cost_model_from_record(old, "p.json: objective.cost_model", "recorded")


def test_hand_computed_layer_times(tmp_path: Path) -> None:
    cm = load_cost_model(_write(tmp_path, TINY))
    # 2 tokens, 1 layer, top-2 over 4 experts; experts 0,1 on GPU 0, experts 2,3 on GPU 1
    trace = make_trace(np.array([[[0, 2]], [[1, 0]]]), num_experts=4)
    p = Placement(np.array([[0, 0, 1, 1]]), 2, 2)
    t = predict(cm, p, trace)
    # loads: GPU0 serves 3 token-experts (2 experts), GPU1 1 (1 expert): 10*2 + 2*3 = 26 us
    assert t.compute_us[0] == pytest.approx(26.0)
    # token 0 sits on GPU 0 (initial home), sends 1000 B to GPU 1: 1000 B / (1 GB/s) = 1 us + 3 us
    assert t.dispatch_us[0] == pytest.approx(4.0)
    # combine: GPU 1 returns token 0's partial output to its new home GPU 0
    assert t.combine_us[0] == pytest.approx(4.0)


@pytest.mark.parametrize("bad, msg", [
    ("cluster: {nodes: 1}" + MODEL, "gpus_per_node"),
    ("cluster: {nodes: 2, gpus_per_node: 8, intra_node: {bandwidth_GBps: 1, latency_us: 1}}" + MODEL, "bandwidth_GBps"),
    ("cluster: {nodes: 1, gpus_per_node: 8, intra_node: {bandwidth_GBps: -1, latency_us: 1}}" + MODEL, "positive"),
    ("cluster: {nodes: 1, gpus_per_node: 8, intra_node: {bandwidth_GBps: 1, latency_us: 1}}\nmodel: {hidden_size: 8}", "expert_us_per_token"),
    ("[1, 2", "not valid YAML"),
    ("model: {hidden_size: 1}", "no 'cluster:'"),
    ("cluster: {nodes: 1, gpus_per_node: 8.5, intra_node: {bandwidth_GBps: 1, latency_us: 1}}" + MODEL,
     "'gpus_per_node' must be an integer, got 8.5"),
    ("cluster: {nodes: true, gpus_per_node: 8, intra_node: {bandwidth_GBps: 1, latency_us: 1}}" + MODEL,
     "'nodes' must be an integer, got True"),
    ("cluster: {nodes: 1, gpus_per_node: 8, bogus: 1, intra_node: {bandwidth_GBps: 1, latency_us: 1}}" + MODEL,
     r"unknown key\(s\) \['bogus'\]"),
    ("cluster: {nodes: 1, gpus_per_node: 8, intra_node: {bandwidth_GBps: 1, latency_us: 1}}"
     "\nmodel: {hidden_size: 8, expert_us_per_token: 1, dispatch_dtype_byte: 1}", "dispatch_dtype_byte"),
])
def test_bad_configs_one_clear_error(tmp_path: Path, bad: str, msg: str) -> None:
    with pytest.raises(MoeplaceError, match=msg):
        load_cost_model(_write(tmp_path, bad))


def test_topology_mismatch(tmp_path: Path, small_trace: Trace) -> None:
    cm = load_cost_model(_write(tmp_path, TINY))
    with pytest.raises(MoeplaceError, match="node"):
        predict(cm, Placement(np.zeros((3, 8), dtype=int) + np.arange(8) // 2, 4, 4), small_trace)


def test_serve_layer_prefers_own_gpu_then_least_loaded() -> None:
    holders = [[0, 1], [2]]  # expert 0 on GPUs 0 and 1; expert 1 on GPU 2
    ids = np.array([[0], [0], [0], [1], [1]])
    home = np.array([1, 3, 3, 2, 2])
    gpus = serve_layer(holders, ids, np.array([[0], [0], [0], [2], [2]]), home, gpus_per_node=4, num_gpus=4)
    assert gpus[0, 0] == 1  # its own GPU holds a copy
    # tokens 1 and 2 sit on GPU 3, same node as both copies: the least-loaded copies on their
    # node. Loads before them: GPU 0 has 0, GPU 1 has token 0. Filling levels [0, 1] with 2
    # tokens brings GPU 0 to GPU 1's level with one and leaves [1, 1] for the other, which the
    # lower GPU takes: both on GPU 0
    assert gpus[:, 0].tolist() == [1, 0, 0, 2, 2]
    # a hot expert with two copies on one node: its remote tokens split evenly, not all to the primary
    hot = serve_layer([[0, 1]], np.zeros((8, 1), dtype=np.int64), np.zeros((8, 1), dtype=np.int64),
                      np.full(8, 3), gpus_per_node=4, num_gpus=4)
    assert np.bincount(hot[:, 0], minlength=2).tolist() == [4, 4]
    # two nodes: a token prefers a copy on its node even when a remote copy is emptier
    node_pref = serve_layer([[0, 5]], np.zeros((3, 1), dtype=np.int64), np.zeros((3, 1), dtype=np.int64),
                            np.array([1, 2, 3]), gpus_per_node=4, num_gpus=8)
    assert (node_pref[:, 0] == 0).all()
    far = serve_layer(holders, ids, np.array([[0], [0], [0], [2], [2]]), home + 4, gpus_per_node=4, num_gpus=8)
    # homes on the other node: tokens 0-2 fill copies at levels [0, 0] -> [2, 1] (the lower GPU first)
    assert far[:, 0].tolist() == [0, 0, 1, 2, 2]


def _serve_layer_per_expert(holders: list[list[int]], ids: np.ndarray, primary_gpus: np.ndarray, home: np.ndarray,
                            gpus_per_node: int, num_gpus: int) -> np.ndarray:
    """serve_layer's rule written the direct way, one expert and one (expert, node) group at a
    time with numpy water filling (the implementation before the vectorised one)."""
    gpus = primary_gpus.copy()
    node = home // gpus_per_node
    groups = []
    for expert in np.unique(ids).tolist():
        copies = np.asarray(holders[expert])
        if len(copies) < 2:
            continue
        tok, slot = np.nonzero(ids == expert)
        own = (copies[None, :] == home[tok, None]).any(1)
        gpus[tok[own], slot[own]] = home[tok[own]]
        tok, slot = tok[~own], slot[~own]
        gpus[tok, slot] = -1
        for n in np.unique(node[tok]):
            local = copies[copies // gpus_per_node == n]
            groups.append((expert, int(n), tok[node[tok] == n], slot[node[tok] == n], local if len(local) else copies))
    load = np.bincount(gpus[gpus >= 0], minlength=num_gpus).astype(np.float64)
    for _, _, tok, slot, copies in sorted(groups, key=lambda g: (-len(g[2]), g[0], g[1])):
        level = load[copies]
        order = np.lexsort((np.arange(len(level)), level))
        lv, m = level[order], len(level)
        for i in range(1, len(lv)):
            if (len(tok) + lv[:i].sum()) / i <= lv[i]:
                m = i
                break
        take = np.zeros(len(lv), dtype=np.int64)
        take[:m] = np.floor((len(tok) + lv[:m].sum()) / m - lv[:m] + 1e-9)
        take[: len(tok) - take.sum()] += 1
        counts = np.empty_like(take)
        counts[order] = take
        gpus[tok, slot] = np.repeat(copies, counts)
        load[copies] += counts
    return gpus


@pytest.mark.parametrize("seed", range(4))
def test_serve_layer_equals_the_per_expert_rule(seed: int) -> None:
    # the vectorised serve_layer (one pass over all replicated choices, Python only for the
    # water filling) must pick the same copy for every choice as the direct per-expert rule,
    # over random copies, homes, node sizes and batch sizes (many groups share GPUs and nodes)
    rng = np.random.default_rng(seed)
    for _ in range(150):
        num_gpus = int(rng.choice([1, 2, 4, 6, 8]))
        gpus_per_node = int(rng.choice([d for d in range(1, num_gpus + 1) if num_gpus % d == 0]))
        num_experts = int(rng.integers(1, 24))
        k = int(rng.integers(1, min(num_experts, 4) + 1))
        primary = rng.integers(0, num_gpus, num_experts)
        holders = [[int(g)] for g in primary]
        for _ in range(int(rng.integers(0, 2 * num_experts))):
            e, g = int(rng.integers(num_experts)), int(rng.integers(num_gpus))
            if g not in holders[e]:
                holders[e].append(g)
        ids = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(int(rng.integers(1, 40)))])
        home = rng.integers(0, num_gpus, len(ids))
        want = _serve_layer_per_expert(holders, ids, primary[ids], home, gpus_per_node, num_gpus)
        got = serve_layer(holders, ids, primary[ids], home, gpus_per_node, num_gpus)
        assert got.dtype == np.int64 and got.tolist() == want.tolist()


def test_token_gpus_with_replicas_uses_local_copy(small_trace: Trace) -> None:
    e2g = np.tile(np.arange(8) // 2, (3, 1))
    plain = Placement(e2g, 4, 2)
    with_copy = Placement(e2g, 4, 2, replicas=[[], [(e, g) for e in range(8) for g in range(4) if g != e // 2][:6], []])
    a, b = token_gpus(plain, small_trace), token_gpus(with_copy, small_trace)
    assert (a[:, 0] == b[:, 0]).all() and (a[:, 2] == b[:, 2]).all()
    here = b[:, 0, 0]
    for t in range(small_trace.num_tokens):
        for s in range(2):
            e = small_trace.topk_ids[t, 1, s]
            if here[t] in with_copy.holders(1)[e]:
                assert b[t, 1, s] == here[t]


ONE_NODE = "cluster: {nodes: 1, gpus_per_node: 8, intra_node: {bandwidth_GBps: BW, latency_us: 1}}"


@pytest.mark.parametrize("bad, msg", [
    # sizes past any model: a 1e300 hidden size overflowed float (exit 3), a 1e42 batch broke HiGHS
    (ONE_NODE.replace("BW", "1") + "\nmodel: {hidden_size: 1" + "0" * 300 + ", expert_us_per_token: 1}",
     "'hidden_size' must be at most 1048576, got 10000000000000000000... (301 characters)"),
    (ONE_NODE.replace("BW", "1") + "\nmodel: {hidden_size: 8, expert_us_per_token: 1, batch_tokens: 1" + "0" * 42 + "}",
     "'batch_tokens' must be at most 1099511627776"),
    (ONE_NODE.replace("BW", "1").replace("nodes: 1", "nodes: 1" + "0" * 400) + MODEL, "'nodes' must be at most 1048576"),
    # YAML 1.1 reads 1e308 (no dot) as a string: a number, out of range; a 400-digit int likewise
    (ONE_NODE.replace("BW", "1e308") + MODEL, "'bandwidth_GBps' must be at most 1e+12, got '1e308'"),
    (ONE_NODE.replace("BW", "1" + "0" * 400) + MODEL, "'bandwidth_GBps' must be at most 1e+12"),
    (ONE_NODE.replace("BW", "1e-320") + MODEL, "'bandwidth_GBps' must be at least 1e-06, got '1e-320'"),
    (ONE_NODE.replace("BW", "'inf'") + MODEL, "'bandwidth_GBps' must be finite, got 'inf'"),
    (ONE_NODE.replace("BW", "fast") + MODEL, "'bandwidth_GBps' must be a number, got 'fast'"),
    (ONE_NODE.replace("BW", "1") + "\nmodel: {hidden_size: 8, expert_us_per_token: 1e13}",
     "'expert_us_per_token' must be at most 1e+12, got '1e13'"),
    (ONE_NODE.replace("BW", "1") + "\nmodel: {hidden_size: 1e3, expert_us_per_token: 1}",
     "'hidden_size' must be an integer, got '1e3'"),  # integers stay integers
], ids=["hidden_1e300", "batch_1e42", "nodes_1e400", "bw_str_1e308", "bw_int_1e400", "bw_1e-320", "bw_inf", "bw_word",
        "expert_us_1e13", "hidden_str"])
def test_out_of_range_figures_one_clear_error(tmp_path: Path, bad: str, msg: str) -> None:
    with pytest.raises(MoeplaceError) as e:
        load_cost_model(_write(tmp_path, bad))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path: Path) -> None:
    """`1e3` (no dot) is a string to YAML 1.1, as check's thresholds already knew."""
    cm = load_cost_model(_write(tmp_path, ONE_NODE.replace("BW", "4e2")
                                + "\nmodel: {hidden_size: 8, expert_us_per_token: 1e-2, batch_tokens: 1099511627776}"))
    assert cm.cluster.intra_GBps == 400.0 and cm.model.expert_us_per_token == 0.01
    assert cm.model.batch_tokens == 2**40  # the bound itself is allowed


def test_topology_mismatch_names_the_file(tmp_path: Path, small_trace: Trace) -> None:
    path = _write(tmp_path, TINY.replace("nodes: 1", "name: shared, nodes: 1"))
    cm = load_cost_model(path)
    with pytest.raises(MoeplaceError, match=f"cluster config {path} has 1 node"):
        predict(cm, Placement(np.zeros((3, 8), dtype=int) + np.arange(8) // 2, 4, 4), small_trace)


def test_latency_solve_at_the_largest_figures(small_trace: Trace) -> None:
    """A 2**40-token batch of 1e12-us experts over 1e-6 GB/s links gives LP coefficients past
    HiGHS' 1e15 (PuLP then raised IndexError): the layer LP scales them and still solves."""
    cost = CostModel(Cluster("c", 2, 2, 1e-6, 1e12, 1e12, 0.0),
                     ModelCost("m", 2**20, 64.0, 64.0, expert_us_per_token=1e12, expert_fixed_us=1e12, batch_tokens=2**40))
    model = LatencyModel(cost, small_trace)
    e2g = np.tile(np.arange(8) // 2, (3, 1))
    row = _layer_lp(model, e2g, 1, 10.0, count_range(e2g, 1, 4, None))
    assert row is not None and np.bincount(row, minlength=4).tolist() == [2, 2, 2, 2]


def _cold_trace() -> Trace:
    """10 tokens, 1 layer, top-1: expert 0 takes 9, expert 1 (cold) 1, experts 2 and 3 none."""
    return make_trace(np.array([0] * 9 + [1]).reshape(10, 1, 1), num_experts=4)


@pytest.mark.parametrize("batch, active", [
    (None, 2.0),  # the batch is the trace itself: both experts with tokens are active
    (2, (1 - 0.1**2) + (1 - 0.9**2)),  # 0.99 + 0.19: the cold expert likely gets no token
    (20, 1.0 + (1 - 0.9**20)),  # 1 + 0.8784
    (1000, 2.0),  # 1 - 0.9**1000 = 1 - 2e-46: certain
])
def test_per_expert_term_counts_experts_expected_active_in_the_batch(tmp_path: Path, batch: int | None,
                                                                     active: float) -> None:
    text = TINY if batch is None else TINY.replace("expert_fixed_us: 10", f"expert_fixed_us: 10, batch_tokens: {batch}")
    cm = load_cost_model(_write(tmp_path, text))
    # experts 0 and 1 on GPU 0 (all 10 token-experts), 2 and 3 on GPU 1 (none)
    t = predict(cm, Placement(np.array([[0, 0, 1, 1]]), 2, 2), _cold_trace())
    tokens = 10 if batch is None else batch
    assert t.compute_us[0] == pytest.approx(10 * active + 2 * tokens, rel=1e-12)


def test_per_expert_term_of_a_hot_trace_is_the_plain_count(tmp_path: Path, small_trace: Trace) -> None:
    """Every expert busy (share x batch far past 37): exactly the count of experts with tokens."""
    cm = load_cost_model(_write(tmp_path, TINY.replace("expert_fixed_us: 10", "expert_fixed_us: 10, batch_tokens: 8192")))
    e2g = np.tile(np.arange(8) // 4, (3, 1))
    t = predict(cm, Placement(e2g, 2, 2), small_trace)
    for layer in range(3):
        ids = small_trace.topk_ids[:, layer]
        load = np.bincount(e2g[layer][ids].ravel(), minlength=2) * (8192 / 24)
        experts = np.bincount(e2g[layer][np.unique(ids)], minlength=2)
        assert t.compute_us[layer] == (10.0 * experts + 2.0 * load).max()  # bit for bit
    assert (active_probability(np.array([0.0, 40 / 8192, 1.0]), 24, 8192 / 24) == [0.0, 1.0, 1.0]).all()


def test_search_model_and_bound_use_the_expected_count(small_trace: Trace) -> None:
    """The search's smoothed model counts each expert by its chance of a token in the batch from
    its shrunk share, and the bound stays below the value where that chance is far from 1."""
    cost = CostModel(Cluster("c", 1, 2, 1.0, 0.0, 1.0, 0.0),
                     ModelCost("m", 8, 1.0, 1.0, expert_us_per_token=1.0, expert_fixed_us=100.0, batch_tokens=2))
    model = LatencyModel(cost, small_trace, smooth=True)
    share = shrunk_loads(small_trace.expert_loads()) / small_trace.num_tokens
    assert model.active is not None
    np.testing.assert_allclose(model.active, 1 - (1 - share) ** 2, rtol=1e-12)
    assert (model.active < 0.6).all()  # shares of 1/4 at most: nowhere near the plain count 1
    # the bound's fixed part is the expected count spread over the GPUs, not the 8 experts
    exact = LatencyModel(cost, small_trace)
    assert latency_bound(exact, 2, 0) < 3 * 100.0 * 8 / 2
    for redundant in (0, 2):
        p = solve_placement(small_trace, 2, 2, time_limit=5, seed=0, objective="latency", cost=cost, redundant=redundant)
        assert p.bound is not None and 0 < p.bound <= p.objective["value"] + 1e-9


def test_replicas_past_the_deadline_are_the_load_rule_copies() -> None:
    """Out of time, add_replicas still places R copies per layer, by the `load` rule alone (EPLB's),
    and its cost is the prediction of the placement with them."""
    trace, _ = planted_trace(128, 2, 16, 2, 8, seed=4, zipf=1.2)
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", ROOT / "configs/model/flame-moe-290m.yaml")
    model = LatencyModel(cm, trace)
    e2g = np.tile(np.arange(16) % 8, (2, 1))
    replicas, value = add_replicas(model, e2g, 8, deadline=0.0)
    homed = flow_counts(model.home0, trace.topk_ids[:, 0], 8, 16)
    assert replicas[0] == propose(homed, homed.sum(0), e2g[0], 8, 3, "load")
    assert [len(r) for r in replicas] == [8, 8]
    assert value == pytest.approx(predict(cm, Placement(e2g, 8, 8, replicas), trace).total_us.sum(), rel=1e-6)


def test_replicas_take_the_affinity_copies_where_they_cost_less() -> None:
    """Two nodes, a skewed planted trace: on layer 0 the copies beside the GPUs sending each expert
    its tokens (`affinity`) pass the acceptance rule, and the whole prediction is lower with them
    than with the `load` rule's copies there (the other layers as chosen)."""
    trace, planted = planted_trace(512, 3, 16, 2, 16, gpus_per_node=8, seed=1, zipf=1.5)
    cm = load_cost_model(ROOT / "configs/cluster/h100-2x8-ib.yaml", ROOT / "configs/model/flame-moe-290m.yaml")
    model = LatencyModel(cm, trace)
    replicas, value = add_replicas(model, planted, 16, float("inf"), fold_tokens(trace.num_tokens, 0))
    homed = flow_counts(model.home0, trace.topk_ids[:, 0], 16, 16)
    by_load = propose(homed, homed.sum(0), planted[0], 16, 2, "load")
    assert replicas[0] == propose(homed, homed.sum(0), planted[0], 16, 2, "affinity") != by_load
    assert value == pytest.approx(predict(cm, Placement(planted, 16, 8, replicas), trace).total_us.sum(), rel=1e-6)
    assert value < predict(cm, Placement(planted, 16, 8, [by_load, *replicas[1:]]), trace).total_us.sum()


def test_replica_pair_cost_is_this_layer_and_the_next_as_predicted() -> None:
    """add_replicas scores a layer's copies on that layer and the next (whose tokens start on this
    layer's top-1 GPUs): the same figures as `predict` of the placement, the last layer alone."""
    trace, planted = planted_trace(256, 3, 16, 2, 16, gpus_per_node=8, seed=1, zipf=1.5)
    cm = load_cost_model(ROOT / "configs/cluster/h100-2x8-ib.yaml", ROOT / "configs/model/flame-moe-290m.yaml")
    model = LatencyModel(cm, trace)
    placement = Placement(planted, 16, 8, [[(0, 9), (1, 3)], [(2, 12)], [(5, 0), (6, 15)]])
    served = token_gpus(placement, trace)  # [T, L, k]
    times = predict(cm, placement, trace).total_us
    assert _pair_cost(model, model.home0, served[:, 0], served, 0, slice(None)) == pytest.approx(times[0] + times[1])
    assert _pair_cost(model, served[:, 0, 0], served[:, 1], served, 1, slice(None)) == pytest.approx(times[1] + times[2])
    assert _pair_cost(model, served[:, 1, 0], served[:, 2], served, 2, slice(None)) == pytest.approx(times[2])


def test_alltoall_hand_figures_on_two_nodes() -> None:
    """2 nodes x 2 GPUs, 1 GB/s + 3 us inside a node, 0.5 GB/s + 10 us across (1 GB/s = 1000 B/us):
    the slowest GPU's bytes over its link's bandwidth plus that link's latency, paid only by a GPU
    that sends or receives something on that link, however little."""
    cost = CostModel(Cluster("t", 2, 2, 1.0, 3.0, 0.5, 10.0), ModelCost("m", 1, 1.0, 1.0, 1.0, 0.0, None))
    counts = np.zeros((4, 4, 4))
    counts[1, 0, 1] = 2  # 2000 B inside node 0: 2 us + 3 us
    counts[2, 0, 2] = 1  # 1000 B across: 1000 / 500 = 2 us + 10 us
    counts[3, 0, 1] = counts[3, 3, 2] = 0.25  # a scaled quarter of a token (250 B) still pays latency
    assert np.asarray(alltoall_us(counts, 1000.0, cost)).tolist() == pytest.approx([0.0, 5.0, 12.0, 3.25])
    assert alltoall_us(counts[2], 1000.0, cost) == pytest.approx(12.0)
    # mirrored GPUs, and under a byte each: the latency still counts
    assert np.asarray(alltoall_us(counts[:, ::-1, ::-1] * 1e-3, 1.0, cost)).tolist() == pytest.approx(
        [0.0, 3 + 2e-6, 10 + 2e-6, 3 + 2.5e-7], rel=1e-12)


def test_hand_computed_layer_times_scaled_with_own_dtypes(tmp_path: Path) -> None:
    """The hand case of test_hand_computed_layer_times (2 tokens, top-2, experts 0,1 on GPU 0) with a
    batch of 4 (scale 2), BF16 dispatch and FP32 combine: every count doubles, bytes follow the dtype."""
    cm = load_cost_model(_write(tmp_path, TINY.replace(
        "dtype_bytes: 1, expert_us_per_token: 2, expert_fixed_us: 10",
        "dispatch_dtype_bytes: 2, combine_dtype_bytes: 4, expert_us_per_token: 2, expert_fixed_us: 0, batch_tokens: 4")))
    trace = make_trace(np.array([[[0, 2]], [[1, 0]]]), num_experts=4)
    t = predict(cm, Placement(np.array([[0, 0, 1, 1]]), 2, 2), trace)
    assert t.compute_us[0] == pytest.approx(2 * 3 * 2)  # GPU 0: 3 token-experts x 2, 2 us each
    # each GPU sends one token (x2) of 1000 x 2 B: 4000 B / (1 GB/s) = 4 us + 3 us
    assert t.dispatch_us[0] == pytest.approx(7.0)
    # GPU 1 returns token 0's partial output (x2) to GPU 0 at 1000 x 4 B: 8 us + 3 us
    assert t.combine_us[0] == pytest.approx(11.0)


def test_active_experts_are_counted_per_gpu(tmp_path: Path) -> None:
    """Expert 1 on GPU 0, expert 0 on GPU 1, top-1 tokens choosing 1, 0, 0: one active expert per
    GPU (10 us) plus 2 us a token: GPU 1's 10 + 2 x 2 = 14 us. At scale 1 an expert with no token
    is inactive, exactly."""
    cm = load_cost_model(_write(tmp_path, TINY))
    trace = make_trace(np.array([[[1]], [[0]], [[0]]]), num_experts=2)
    assert predict(cm, Placement(np.array([[1, 0]]), 2, 2), trace).compute_us[0] == pytest.approx(14.0)
    assert active_probability(np.array([0.0, 0.25, 1.0]), 4, 1.0).tolist() == [0.0, 1.0, 1.0]


def test_traffic_objective_terms_of_one_token_by_hand() -> None:
    """The traffic objective's edge weights (solve/affinity.py) for one token, top-2: layer 0 experts
    0, 1 (gates .6, .2: shares .75, .25), layer 1 experts 2, 0 (gates .5, .3), destinations weighted
    2 (top-1) and 1. Defaults: smoothing .5, prior .5 rescaled to the other terms' sum, coselect 2."""
    trace = make_trace(np.array([[[0, 1], [2, 0]]]), np.array([[[0.6, 0.2], [0.5, 0.3]]], dtype=np.float32),
                       num_experts=3)
    terms = edge_terms(trace)
    pairs = np.array([[0.18, 0, 0.3], [0.06, 0, 0.1], [0, 0, 0]])  # raw gate products, layer 0 -> 1
    np.testing.assert_allclose(gate_weighted_transitions(trace).inter[0], pairs, rtol=1e-6)
    np.testing.assert_allclose(terms.top1[0], [[1, 0, 2], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(terms.smooth[0], np.array([[0.75, 0, 1.5], [0.25, 0, 0.5], [0, 0, 0]]))
    graph = terms.graph()
    # top1 + .5 smooth sums to 4.5; the prior adds .5 x 4.5 / .64 x pairs (2.25 in all)
    np.testing.assert_allclose(graph.inter[0], np.array([[1.375, 0, 2.75], [0.125, 0, 0.25], [0, 0, 0]]) + 0.5 * 4.5 / 0.64 * pairs,
                               rtol=1e-6)
    assert graph.intra[1][0, 2] == graph.intra[1][2, 0] == 2.0 and graph.intra[1].sum() == 4.0
    assert graph.total_weight() == pytest.approx(6.75 + 2.0, rel=1e-6)
    assert distance_matrix(4, 2, 3.0).tolist() == [[0, 1, 3, 3], [1, 0, 3, 3], [3, 3, 0, 1], [3, 3, 1, 0]]
    # three layers: each layer's pairs go to the next one; one layer: no transitions at all
    three = make_trace(np.array([[[0, 1], [2, 0], [1, 2]]]), np.array([[[0.6, 0.2], [0.5, 0.3], [0.4, 0.4]]],
                                                                     dtype=np.float32), num_experts=3)
    np.testing.assert_allclose(gate_weighted_transitions(three).inter[0], pairs, rtol=1e-6)
    np.testing.assert_allclose(gate_weighted_transitions(three).inter[1][[2, 2, 0, 0], [1, 2, 1, 2]], [0.2, 0.2, 0.12, 0.12],
                               rtol=1e-6)
    one = make_trace(np.array([[[0, 1]]]), num_experts=3)
    assert edge_terms(one).top1.shape == gate_weighted_transitions(one).inter.shape == (0, 3, 3)
    # co-selection is per pair of the k experts, normalised by k - 1; top-1 has none
    top3 = edge_terms(make_trace(np.array([[[0, 1, 2], [0, 1, 2]]]), num_experts=3)).graph()
    assert top3.intra[1][0, 1] == 1.0 and top3.intra[1].sum() == 6.0
    assert not edge_terms(make_trace(np.array([[[0], [1]]]), num_experts=3)).graph().intra.any()


def test_a_cluster_of_another_shape_names_the_shipped_config_that_fits() -> None:
    """Before: the mismatch alone; solve's own load note named the shipped config, the error did not."""
    cm = load_cost_model(ROOT / "configs/cluster/h100-2x8-ib.yaml", ROOT / "configs/model/flame-moe-290m.yaml")
    with pytest.raises(MoeplaceError, match=r"has 2 node\(s\) x 8 GPUs, but the placement uses 4 GPUs with 4 per node "
                                            r"\(the shipped \S*configs/cluster/h100-1x4-nvlink.yaml describes that cluster\)$"):
        cm.check(4, 4)
    with pytest.raises(MoeplaceError, match=r"uses 6 GPUs with 3 per node$"):  # none shipped: nothing named
        cm.check(6, 3)
    cm.check(16, 8)
