"""Trace and placement formats: round trips and every bad-input case gets one clear error."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest

from moeplace import cli
from moeplace.errors import MoeplaceWarning, PlacementError, TraceError
from moeplace.export.eplb import read_document
from moeplace.io import loads_json, read_json, read_yaml
from moeplace.placement import Placement, check_topology, load_placement
from moeplace.trace.format import (MAX_EXPERTS, Trace, is_load_only, load_loads, load_trace, make_loads, make_trace, save_loads,
                                   save_trace, split_sequences, split_tokens, split_trace)


def test_trace_round_trip(tmp_path: Path, small_trace) -> None:
    path = tmp_path / "t.npz"
    save_trace(small_trace, path)
    back = load_trace(path)
    np.testing.assert_array_equal(back.topk_ids, small_trace.topk_ids)
    np.testing.assert_allclose(back.topk_weights, small_trace.topk_weights)
    np.testing.assert_array_equal(back.sequence_ids, small_trace.sequence_ids)
    assert back.num_experts == 8 and back.top_k == 2 and len(back.sha256) == 64
    assert not list(tmp_path.glob("*.tmp")), "atomic write left a temp file"


def test_exflow_npy_is_top1(tmp_path: Path) -> None:
    path = tmp_path / "exflow.npy"
    np.save(path, np.array([[0, 3], [2, 1], [3, 3]], dtype=np.int32))
    t = load_trace(path)
    assert t.topk_ids.shape == (3, 2, 1) and t.num_experts == 4 and t.topk_weights is None


def _npz(path: Path, **arrays) -> Path:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"topk_ids": np.zeros((4, 2), np.int64) + [[0, 1]]}, "topk_ids must be"),
        ({"topk_ids": np.zeros((4, 2, 2), np.float32)}, "must be integers"),
        ({"topk_ids": np.array([[[0, 9]]]), "num_experts": np.array(8)}, "expert id 9 out of range"),
        ({"topk_ids": np.array([[[0, -1]]]), "num_experts": np.array(8)}, "expert id -1 is negative"),
        ({"topk_ids": np.array([[[-1, -2]]])}, "expert id -2 is negative"),  # no num_experts to infer from
        ({"topk_ids": np.array([[[2, 2]]]), "num_experts": np.array(8)}, "duplicate expert ids"),
        ({"topk_ids": np.array([[[0, 1]]]), "topk_weights": np.array([[[np.nan, 0.1]]])}, "NaN"),
        ({"topk_ids": np.array([[[0, 1]]]), "topk_weights": np.array([[[-0.5, 0.1]]])}, "negative"),
        ({"topk_ids": np.array([[[0, 1]]]), "topk_weights": np.array([[0.5, 0.1]])}, "shape"),
        ({"topk_ids": np.zeros((0, 2, 2), np.int64), "num_experts": np.array(8)}, "empty trace"),
        ({"topk_ids": np.array([[[0, 1]]]), "meta": np.array("{not json")}, "not a JSON"),
        ({"topk_ids": np.array([[[0, 1]]]), "sequence_ids": np.array([0, 1])}, "sequence_ids must be"),
        ({"expert_loads": np.ones((2, 4))}, "load-only"),
    ],
)
def test_bad_trace_is_one_clear_error(tmp_path: Path, arrays, message) -> None:
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TraceError, match=message) as err:
        load_trace(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_and_empty_and_pickled(tmp_path: Path, small_trace) -> None:
    good = tmp_path / "good.npz"
    save_trace(small_trace, good)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(TraceError, match="truncated"):
        load_trace(cut)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(TraceError, match="empty"):
        load_trace(empty)
    pickled = tmp_path / "obj.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TraceError, match="not a plain numeric"):
        load_trace(pickled)
    with pytest.raises(TraceError, match="no such file"):
        load_trace(tmp_path / "missing.npz")
    npy_named_npz = tmp_path / "array.npz"
    with open(npy_named_npz, "wb") as f:
        np.save(f, np.zeros((2, 2), np.int64))
    with pytest.raises(TraceError, match="not an .npz archive"):
        load_trace(npy_named_npz)
    with pytest.raises(TraceError, match="not an .npz archive"):
        load_loads(npy_named_npz)


def test_split_is_seeded_and_disjoint() -> None:
    a_train, a_test = split_tokens(100, 0.5, seed=3)
    b_train, _ = split_tokens(100, 0.5, seed=3)
    np.testing.assert_array_equal(a_train, b_train)
    assert len(a_train) == 50 and not set(a_train) & set(a_test)
    assert len(set(a_train) | set(a_test)) == 100


def test_split_sequences_keeps_sequences_whole_near_the_fraction() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 40, size=30)  # uneven lengths, ids not in order and not contiguous
    seq = np.repeat(rng.permutation(1000)[:30] * 7, sizes)
    seq = seq[rng.permutation(len(seq))]  # tokens of one sequence need not be adjacent
    total = len(seq)
    for fraction in (0.1, 0.3, 0.5, 0.9):
        for seed in range(5):
            train, held = split_sequences(seq, fraction, seed)
            assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)  # sorted, no repeats
            np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(total))  # disjoint, covering
            assert not set(seq[train]) & set(seq[held])  # every sequence on one side only
            assert set(seq[train]) and set(seq[held])
            # train reaches round(F x T) and overshoots by less than the sequence that reached it
            target = round(fraction * total)
            assert target <= len(train) < target + sizes.max()
            again, _ = split_sequences(seq, fraction, seed)
            np.testing.assert_array_equal(train, again)  # deterministic per seed
    draws = {tuple(split_sequences(seq, 0.5, s)[0]) for s in range(5)}
    assert len(draws) > 1  # the seed changes the draw


def test_split_sequences_edges_and_refusals() -> None:
    two = np.array([5, 5, 5, 5, 5, 5, 5, 5, 9, 9])  # one sequence covers the whole fraction
    for fraction in (0.01, 0.99):
        train, held = split_sequences(two, fraction, 0)
        assert len(set(two[train])) == 1 and len(set(two[held])) == 1  # one sequence each side at F < 1
    train, held = split_sequences(two, 1.0, 0)
    assert len(train) == 10 and len(held) == 0
    train, held = split_sequences(np.zeros(6, dtype=np.int64), 0.5, 0)
    assert len(train) == 6 and len(held) == 0  # one sequence: train whole
    with pytest.raises(TraceError, match=r"train fraction must be in \(0, 1\]"):
        split_sequences(two, 0.0, 0)
    ids = np.zeros((10, 2, 1), dtype=np.int64)
    with pytest.raises(TraceError, match="^t.npz: a split by sequence needs the trace's sequence_ids, and it has none"):
        split_trace(make_trace(ids, num_experts=2), 0.5, 0, "sequence", "t.npz")
    with pytest.raises(TraceError, match="^t.npz: a split by sequence needs two or more sequences, the trace holds 1$"):
        split_trace(make_trace(ids, num_experts=2, sequence_ids=np.ones(10, dtype=np.int64)), 0.5, 0, "sequence",
                    "t.npz")
    with pytest.raises(TraceError, match="split by must be one of token, sequence, got 'text'"):
        split_trace(make_trace(ids, num_experts=2), 0.5, 0, "text")
    token = split_trace(make_trace(ids, num_experts=2), 0.5, 3)  # by token: split_tokens as before
    np.testing.assert_array_equal(token[0], split_tokens(10, 0.5, 3)[0])


def test_loads_round_trip_and_from_trace(tmp_path: Path, small_trace) -> None:
    save_loads(make_loads(np.arange(8).reshape(2, 4), {"source": "x"}), tmp_path / "l.npz")
    back = load_loads(tmp_path / "l.npz")
    assert back.loads.shape == (2, 4) and back.meta["source"] == "x"
    save_trace(small_trace, tmp_path / "t.npz")
    from_trace = load_loads(tmp_path / "t.npz")
    assert from_trace.loads.sum() == small_trace.num_tokens * small_trace.num_layers * small_trace.top_k


def test_placement_round_trip_and_checks(tmp_path: Path) -> None:
    p = Placement(np.array([[0, 0, 1, 1], [1, 0, 1, 0]]), num_gpus=2, gpus_per_node=1,
                  replicas=[[(2, 0)], []], metrics={"x": 1.0}, fit_loads=np.array([[3, 0, 5, 1], [2, 2, 4, 1.5]]))
    p.save(tmp_path / "p.json")
    back = load_placement(tmp_path / "p.json")
    np.testing.assert_array_equal(back.expert_to_gpu, p.expert_to_gpu)
    assert back.replicas == (((2, 0),), ())
    assert back.fit_loads is not None and back.fit_loads.tolist() == [[3, 0, 5, 1], [2, 2, 4, 1.5]]
    counts = Placement(np.array([[0, 1]]), 2, 2, fit_loads=np.array([[7.0, 2.0]])).to_json()["fit_loads"]
    assert counts == [[7, 2]] and isinstance(counts[0][0], int)  # token counts are written as integers
    with pytest.raises(PlacementError, match=r"fit_loads must have the layout's shape"):
        Placement(np.array([[0, 1]]), 2, 2, fit_loads=np.ones((3, 3)))
    late = replace(Placement(np.array([[0, 1]]), 2, 2), fit_loads=[[1, 2]])  # a list, as a library caller may give it
    late.save(tmp_path / "late.json")
    assert load_placement(tmp_path / "late.json").fit_loads.tolist() == [[1, 2]]
    assert back.physical_slots(0) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 3)]
    assert back.holders(0)[2] == [1, 0]
    with pytest.raises(PlacementError, match="placement is for 2 MoE layers x 4 experts"):
        back.check_fits(3, 4)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format="other"), "not a moeplace placement"),
        (lambda d: d.pop("expert_to_gpu"), "missing 'expert_to_gpu'"),
        (lambda d: d.update(expert_to_gpu=[[0, 5, 1, 1], [1, 0, 1, 0]]), "outside"),
        (lambda d: d.update(num_experts=5), "num_layers x num_experts"),
        (lambda d: d.update(num_gpus=3), "not a multiple"),
        (lambda d: d.update(replicas=[[[2, 1]], []]), "two copies"),
        # eval read solver.get(...) of whatever the file held: "x" was an AttributeError
        (lambda d: d.update(solver="x"), "p.json: 'solver' must be a JSON object or null, got 'x'"),
        (lambda d: d.update(metrics=[1]), "'metrics' must be a JSON object or null, got an array"),
        (lambda d: d.update(objective="traffic"), "'objective' must be a JSON object or null, got 'traffic'"),
        (lambda d: d.update(bound="0.5"), "'bound' must be a finite number or null, got '0.5'"),
        (lambda d: d.update(gap=float("nan")), "'gap' must be a finite number or null, got nan"),
        (lambda d: d.update(gap=True), "'gap' must be a finite number or null, got true"),
        (lambda d: d.update(trace_sha256=5), "'trace_sha256' must be a string or null, got 5"),
        # was dropped silently: export --to sglang then lost the fit trace's MoE layer numbers
        (lambda d: d.update(trace_model="mixtral"), "'trace_model' must be a JSON object or null, got 'mixtral'"),
        (lambda d: d.update(trace_routing_sha256={}), "'trace_routing_sha256' must be a string or null, got an object"),
        (lambda d: d.update(replicas=[[[2, 9]], []]), r"p.json: replica \(2, 9\) of layer 0 is out of range"),
        (lambda d: d.update(fit_loads=[[1, 2, 3, 4]]), r"p.json: fit_loads must have the layout's shape "
                                                       r"\[layers, experts\] \(2, 4\), got \(1, 4\)"),
        (lambda d: d.update(fit_loads=[[1, 2, 3, -4], [0, 0, 0, 0]]),
         "fit_loads must be finite and non-negative: layer 0, expert 3 holds -4.0"),
        (lambda d: d.update(fit_loads=[[1, 2, 3, 4], [0, float("nan"), 0, 0]]), "layer 1, expert 1 holds nan"),
        (lambda d: d.update(fit_loads=[[1e308] * 4, [0, 0, 0, 0]]), "fit_loads must sum to a finite load per layer"),
        (lambda d: d.update(fit_loads=[[1, 2, 3, True], [0, 0, 0, 0]]), "'fit_loads' must be one list of numbers"),
        (lambda d: d.update(fit_loads=[[1, 2, 3], [0, 0, 0, 0]]), "malformed fit_loads"),
        (lambda d: d.update(fit_loads="x"), "'fit_loads' must be one list of numbers per layer, or null"),
    ],
)
def test_bad_placement(tmp_path: Path, mutate, message) -> None:
    doc = Placement(np.array([[0, 0, 1, 1], [1, 0, 1, 0]]), num_gpus=2, gpus_per_node=2).to_json()
    mutate(doc)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlacementError, match=message):
        load_placement(path)
    path.write_text("{")
    with pytest.raises(PlacementError, match="not valid JSON"):
        load_placement(path)


def test_placement_fields_may_be_null(tmp_path: Path) -> None:
    doc = Placement(np.array([[0, 1]]), num_gpus=2, gpus_per_node=2, bound=1.0, gap=0).to_json()
    doc.update(objective=None, solver=None, metrics=None, bound=None, trace_sha256=None)
    (tmp_path / "p.json").write_text(json.dumps(doc))
    back = load_placement(tmp_path / "p.json")
    assert (back.objective, back.solver, back.metrics, back.bound, back.gap) == ({}, {}, {}, None, 0)


def test_impossible_topology() -> None:
    with pytest.raises(PlacementError, match="cannot be split equally"):
        check_topology(64, 6, 6)
    with pytest.raises(PlacementError, match="not a multiple"):
        check_topology(64, 8, 3)
    check_topology(64, 8, 4)


def test_make_trace_infers_experts() -> None:
    t = make_trace(np.array([[[0, 5]], [[1, 2]]]))
    assert t.num_experts == 6 and t.num_layers == 1


def test_trace_weights_must_be_highest_first(tmp_path: Path, small_trace, capsys: pytest.CaptureFixture[str]) -> None:
    # column 0 is every stage's top-1: a row whose weights rise was taken at its word
    w = small_trace.topk_weights.copy()
    w[5, 2] = w[5, 2, ::-1]
    w[9, 0] = w[9, 0, ::-1]
    w[9, 1] = [0.25, 0.25]  # ties are allowed
    arrays = {"topk_ids": small_trace.topk_ids, "topk_weights": w, "num_experts": np.array(8)}
    # another tool's file: read as stored (column 0 is the top-1), with a warning naming the first row
    with pytest.warns(MoeplaceWarning, match=r"bad.npz: topk_weights of token 5 at layer 2 are not highest first "
                                             r"\(.*; 2 token-layers affected\): column 0 is taken"):
        loaded = load_trace(_npz(tmp_path / "bad.npz", **arrays))
    np.testing.assert_array_equal(loaded.topk_ids, small_trace.topk_ids)
    assert capsys.readouterr().err == ""  # a library warns through `warnings`, it does not print
    assert cli.run(["eval", "--help"]) == 0 and cli.run(["analyze", str(tmp_path / "bad.npz"), "--no-solve",
                                                          "--no-figures", "-q", "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.splitlines()  # the CLI: one line
    assert len(err) == 1 and err[0].startswith("moeplace: warning: ") and "column 0 is taken" in err[0]
    unsorted = make_trace(small_trace.topk_ids, w, 8)  # in memory it is not checked
    with pytest.raises(TraceError, match=r"out.npz: topk_weights of token 5 at layer 2"):
        save_trace(unsorted, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
    w[5, 2] = w[5, 2, ::-1]
    w[9, 0] = w[9, 0, ::-1]
    assert load_trace(_npz(tmp_path / "ok.npz", **{**arrays, "topk_weights": w})).num_tokens == 24
    assert capsys.readouterr().err == ""


def test_uint64_values_are_checked_before_the_int64_cast() -> None:
    with pytest.raises(TraceError, match=r"expert id 18446744073709551615 out of range \(stored as uint64"):
        make_trace(np.array([[[0, 2**64 - 1]]], dtype=np.uint64))
    with pytest.raises(TraceError, match=r"token_ids value 9223372036854775808 out of range"):
        make_trace(np.array([[[0]]]), token_ids=np.array([2**63], dtype=np.uint64))
    assert make_trace(np.array([[[0, 3]]], dtype=np.uint64)).num_experts == 4


def test_meta_stored_as_bytes_is_read(tmp_path: Path) -> None:
    # np.asarray(b'{...}') stores a bytes scalar (dtype S): the same JSON as a str one
    ids = np.array([[[0, 1]]])
    t = load_trace(_npz(tmp_path / "b.npz", topk_ids=ids, meta=np.asarray(b'{"model": "m"}')))
    assert t.meta["model"] == "m"
    with pytest.raises(TraceError, match="'meta' is not a JSON string"):
        load_trace(_npz(tmp_path / "bad.npz", topk_ids=ids, meta=np.asarray(b"\xff{")))


@pytest.mark.parametrize("args, message", [
    ((np.full((2, 4), 7), 4, 4), r"GPU ids outside \[0, 4\)"),
    ((np.full((2, 4), 0.9), 4, 4), "must be an integer array"),
    ((np.zeros(4, dtype=int), 4, 4), "must be an integer array \\[layers, experts\\]"),
    ((np.zeros((2, 4), dtype=int), 4, 0), "gpus_per_node must be a positive integer"),
    ((np.zeros((2, 4), dtype=int), 4, 3), "num_gpus 4 is not a multiple of gpus_per_node 3"),
    # replicas were checked only on save or load: holders(1) of these was an IndexError
    ((np.zeros((4, 8), dtype=int), 4, 2, [[]]), r"replicas must have one list per layer \(4\), got 1"),
    ((np.zeros((1, 4), dtype=int), 2, 1, [[(9, 1)]]), r"replica \(9, 1\) of layer 0 is out of range"),
    ((np.zeros((1, 4), dtype=int), 2, 1, [[(0, 0)]]), "expert 0 of layer 0 has two copies on GPU 0"),
    ((np.zeros((1, 4), dtype=int), 2, 1, [[(0,)]]), r"replica \(0,\) of layer 0 is not an \(expert, gpu\) pair"),
])
def test_placement_built_in_python_is_checked(args: tuple, message: str) -> None:
    # from Python these failed later in numpy (reshape), truncated 0.9 to GPU 0, or divided by zero
    with pytest.raises(PlacementError, match=message):
        Placement(*args)


def test_placement_copies_the_callers_layout() -> None:
    layout = np.zeros((2, 4), dtype=np.int64)
    p = Placement(layout, 4, 4)
    layout[0, 0] = 99
    assert p.expert_to_gpu[0, 0] == 0


def test_placement_replicas_in_python_are_kept() -> None:
    p = Placement(np.zeros((2, 4), dtype=int), 2, 1, [[(1, 1)], [(np.int64(3), np.int64(1))]])  # type: ignore[list-item]
    assert p.holders(1)[3] == [0, 1] and p.num_replicas == 1


def _npz_member_header(path: Path, name: str, shape: tuple, payload: bytes) -> Path:
    """An .npz whose one member declares `shape` of int64 and holds only `payload` after its header."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<i8", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, head.getvalue() + payload)
    return path


def test_npz_members_are_read_safely(tmp_path: Path) -> None:
    # a damaged header declaring 72 TiB made numpy allocate it: a MemoryError, not a clear line
    huge = _npz_member_header(tmp_path / "huge.npz", "topk_ids.npy", (10**7, 10**6), bytes(64))
    with pytest.raises(TraceError, match=r"huge.npz: member 'topk_ids' is truncated \(its header declares more"):
        load_trace(huge)
    short = _npz_member_header(tmp_path / "short.npz", "topk_ids.npy", (2, 1, 2), bytes(8 * 3))
    with pytest.raises(TraceError, match="short.npz: member 'topk_ids' is truncated"):
        load_trace(short)
    fits = _npz_member_header(tmp_path / "fits.npz", "topk_ids.npy", (2, 1, 2), np.array([0, 1, 1, 0]).astype("<i8").tobytes())
    assert load_trace(fits).topk_ids.tolist() == [[[0, 1]], [[1, 0]]]
    pickled = _npz(tmp_path / "obj.npz", topk_ids=np.array([{"a": 1}], dtype=object))
    with pytest.raises(TraceError, match=r"obj.npz: member 'topk_ids' is not a readable array \(Object arrays"):
        load_trace(pickled)


def test_eplb_npz_is_read_by_the_same_reader(tmp_path: Path) -> None:
    npy_named_npz = tmp_path / "e.npz"
    with open(npy_named_npz, "wb") as f:
        np.save(f, np.zeros((2, 2), np.int64))
    # was `with ndarray`: a TypeError, reported as an internal error
    with pytest.raises(PlacementError, match="e.npz: holds one .npy array, not an .npz archive"):
        read_document(npy_named_npz)
    assert read_document(_npz(tmp_path / "ok.npz", phy2log=np.zeros((1, 2), np.int64)))["phy2log"].shape == (1, 2)


def test_one_rule_says_what_is_load_only(tmp_path: Path, small_trace) -> None:
    loads = np.ones((3, 8))
    both = _npz(tmp_path / "both.npz", topk_ids=small_trace.topk_ids, num_experts=np.array(8), expert_loads=loads)
    only = _npz(tmp_path / "only.npz", expert_loads=loads)
    np.save(tmp_path / "ex.npy", np.zeros((2, 3), np.int64))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    assert is_load_only(only) and not is_load_only(both)
    assert not any(is_load_only(tmp_path / n) for n in ("ex.npy", "junk.npz", "missing.npz"))
    # a file holding both is the trace everywhere: load_loads sums its paths, as it does any trace's
    assert load_loads(both).meta.get("from_trace") is True and load_loads(only).loads.sum() == 24
    # solve took any file with expert_loads for load-only and refused the traffic objective on it
    assert cli.run(["solve", str(both), "--gpus", "2", "--time-limit", "2", "-q", "-o", str(tmp_path / "p.json")]) == 0
    assert load_placement(tmp_path / "p.json").objective["name"] == "traffic"


def test_gate_shares_renormalise_and_fall_back_to_uniform() -> None:
    ids = np.array([[[0, 1]], [[2, 3]]])
    t = make_trace(ids, np.array([[[0.6, 0.2]], [[0.0, 0.0]]], dtype=np.float32), num_experts=4)
    np.testing.assert_allclose(t.gate_shares(), [[[0.75, 0.25]], [[0.5, 0.5]]])  # all-zero weights: 1/k each
    assert t.gate_shares().dtype == np.float64 and t.gate_shares(np.float32).dtype == np.float32
    np.testing.assert_array_equal(make_trace(ids, num_experts=4).gate_shares(), np.full((2, 1, 2), 0.5))


DEEP = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit


def test_json_files_deep_bom_and_repeated_keys(tmp_path: Path) -> None:
    """read_json: deep nesting was a RecursionError (exit 3), a UTF-8 BOM "not JSON but CSV", and
    a key given twice silently kept the last (a second num_gpus overrode the first)."""
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP)
    with pytest.raises(PlacementError, match=r"deep.json: not valid JSON \(nested too deeply\)"):
        read_json(deep, PlacementError)
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_json(DEEP.encode())
    doc = Placement(np.tile(np.arange(8) // 2, (2, 1)), 4, 2).to_json()
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps(doc).encode())
    assert load_placement(bom).num_gpus == 4
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps(doc)[:-1] + ', "num_gpus": 8}')
    with pytest.raises(PlacementError, match="dup.json: key 'num_gpus' appears twice in one object"):
        load_placement(dup)
    nested = tmp_path / "nested.json"
    nested.write_text('{"a": {"b": 1, "b": 2}}')
    with pytest.raises(ValueError, match="key 'b' appears twice"):
        read_json(nested)
    assert loads_json('{"b": 1, "b": 2}') == {"b": 2}  # only file inputs are strict; JSON allows it


def test_deep_yaml_is_one_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text(DEEP)
    with pytest.raises(ValueError, match=r"deep.yaml: not valid YAML \(nested too deeply\)"):
        read_yaml(deep)
    huge = tmp_path / "huge.yaml"  # Python's int() refuses over 4300 digits: was an internal error
    huge.write_text("max_cross_gpu: 1" + "0" * 5000 + "\n")
    with pytest.raises(ValueError, match=r"huge.yaml: not valid YAML \(Exceeds the limit \(4300 digits\)"):
        read_yaml(huge)


def test_placement_with_more_gpus_than_expert_copies_is_refused(tmp_path: Path) -> None:
    """num_gpus 2**31 made `export --to eplb` loop per GPU for ever and eval run out of memory."""
    doc = Placement(np.tile(np.arange(8) // 2, (2, 1)), 4, 2).to_json()
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**doc, "num_gpus": 1 << 31}))
    with pytest.raises(PlacementError, match=r"p.json: num_gpus 2147483648 exceeds the 8 expert copies of a layer"):
        load_placement(path)
    path.write_text(json.dumps({**doc, "num_gpus": 10}))
    with pytest.raises(PlacementError, match="num_gpus 10 exceeds the 8 expert copies"):
        load_placement(path)
    # replicas are copies too: 16 GPUs for 8 experts + 8 replicas (EPLB-style), one layer short of them is fine
    e2g = np.tile(np.arange(8), (2, 1))
    reps = [[(e, 8 + e) for e in range(8)], [(e, 8 + e) for e in range(7)]]
    ok = Placement(e2g, 16, 8, replicas=reps)
    ok.save(path)
    assert load_placement(path).num_gpus == 16
    with pytest.raises(PlacementError, match=r"num_gpus 24 exceeds the 16 expert copies of a layer \(8 experts \+ 8 "):
        Placement(e2g, 24, 8, replicas=reps).save(tmp_path / "q.json")
    assert not (tmp_path / "q.json").exists()


def test_load_only_input_has_the_trace_expert_cap(tmp_path: Path) -> None:
    """A trace refused num_experts past MAX_EXPERTS, but expert_loads of any width went through."""
    message = rf"num_experts must be in \[1, {MAX_EXPERTS}\], got {MAX_EXPERTS + 1}"
    with pytest.raises(TraceError, match="l: " + message):
        make_loads(np.ones((1, MAX_EXPERTS + 1), np.float32), name="l")
    path = _npz(tmp_path / "l.npz", expert_loads=np.ones((1, MAX_EXPERTS + 1), np.uint8))
    with pytest.raises(TraceError, match="l.npz: " + message):
        load_loads(path)
    assert make_loads(np.ones((1, MAX_EXPERTS))).num_experts == MAX_EXPERTS


def test_float64_weights_past_float32_are_refused_without_warnings() -> None:
    """1e300 printed numpy's two-line cast RuntimeWarning, then was called "NaN or infinite"."""
    ids = np.array([[[0, 1]], [[2, 3]]])
    w = np.array([[[1e300, 0.5]], [[0.6, 0.4]]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TraceError, match=r"t: topk_weights holds 1e\+300 \(stored as float64\), beyond the float32"):
            make_trace(ids, w, num_experts=4, name="t")
        w[0, 0, 0] = 0.9  # float64 within range: read as before
        kept = make_trace(ids, w, num_experts=4).topk_weights
        assert kept is not None and kept.dtype == np.float32
        w[0, 0, 0] = np.inf  # really infinite: the existing wording
        with pytest.raises(TraceError, match="NaN or infinite"):
            make_trace(ids, w, num_experts=4)


def test_trace_meta_nested_too_deeply(tmp_path: Path) -> None:
    path = _npz(tmp_path / "t.npz", topk_ids=np.zeros((2, 1, 1), np.int64), meta=np.asarray(DEEP))
    with pytest.raises(TraceError, match=r"t.npz: 'meta' is not a JSON string \(nested too deeply\)"):
        load_trace(path)


@pytest.mark.parametrize("layout", [[[0, -1]], [[0, 2]], [[2, 2]]])
def test_placement_gpu_ids_at_the_range_edges_are_refused(layout: list) -> None:
    # GPU ids are [0, num_gpus): -1 and num_gpus itself are out, whatever the other entries hold
    with pytest.raises(PlacementError, match=r"GPU ids outside \[0, 2\)"):
        Placement(np.array(layout), num_gpus=2, gpus_per_node=1)
    assert Placement(np.array([[0, 1]]), num_gpus=2, gpus_per_node=1).expert_to_gpu.tolist() == [[0, 1]]


def test_placement_constructor_checks_small_and_empty_layouts(tmp_path: Path) -> None:
    # a one-expert float layout is refused as a larger one is (only an empty one has no dtype to go by)
    with pytest.raises(PlacementError, match="must be an integer array"):
        Placement(np.array([[0.0]]), num_gpus=1, gpus_per_node=1)
    # fit_loads given to the constructor is checked and kept as float64 there, not only on save
    with pytest.raises(PlacementError, match=r"fit_loads must have the layout's shape \[layers, experts\] \(1, 2\)"):
        Placement(np.array([[0, 1]]), 2, 2, fit_loads=np.ones((3, 3)))
    loads = Placement(np.array([[0, 1]]), 2, 2, fit_loads=[[1, 2]]).fit_loads  # type: ignore[arg-type]
    assert isinstance(loads, np.ndarray) and loads.dtype == np.float64 and loads.tolist() == [[1.0, 2.0]]
    # an empty layout can be built (no dtype to check) but is never written
    with pytest.raises(PlacementError, match="expert_to_gpu must be a non-empty"):
        Placement(np.zeros((0, 4), dtype=np.int64), 4, 4).save(tmp_path / "empty.json")
    assert not (tmp_path / "empty.json").exists()


def test_placement_is_frozen_and_a_changed_one_is_checked_again(tmp_path: Path) -> None:
    # a checked placement stays checked: no field re-bound, no array or replica list changed in place
    layout = np.array([[0, 1], [1, 0]])
    p = Placement(layout, num_gpus=2, gpus_per_node=2, replicas=[[], [(0, 0)]], fit_loads=np.ones((2, 2)))
    layout[1, 0] = 7  # the caller's array stays theirs
    assert p.expert_to_gpu.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ValueError, match="read-only"):
        p.expert_to_gpu[1, 0] = 2
    with pytest.raises(ValueError, match="read-only"):
        p.fit_loads[0, 0] = -1.0  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        p.num_gpus = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.replicas[1].append((1, 0))  # type: ignore[attr-defined]
    assert p.replicas == ((), ((0, 0),))
    # a changed placement is a new one, checked as construction checks
    with pytest.raises(PlacementError, match="num_gpus 3 is not a multiple of gpus_per_node 2"):
        replace(p, num_gpus=3)
    with pytest.raises(PlacementError, match=r"GPU ids outside \[0, 2\)"):
        replace(p, expert_to_gpu=np.array([[0, 1], [2, 0]]))
    with pytest.raises(PlacementError, match="expert 1 of layer 1 has two copies on GPU 0"):
        replace(p, replicas=[[], [(1, 0)]])
    moved = replace(p, expert_to_gpu=np.array([[1, 0], [1, 0]]), bound=1.0)
    assert (moved.bound, p.bound, moved.replicas) == (1.0, None, p.replicas)
    moved.save(tmp_path / "q.json")
    assert load_placement(tmp_path / "q.json").expert_to_gpu.tolist() == [[1, 0], [1, 0]]
    Placement(np.array([[0, 0]]), num_gpus=1, gpus_per_node=1).save(tmp_path / "one.json")  # one GPU is fine
    assert load_placement(tmp_path / "one.json").num_gpus == 1


@pytest.mark.parametrize("pair", [(1, 1.5), (1.0, 1), (1, True)])
def test_replica_pairs_need_two_integers(pair: tuple) -> None:
    # int() would have read 1.5 as GPU 1 and True as 1
    with pytest.raises(PlacementError, match=r"of layer 0 is not an \(expert, gpu\) pair of integers"):
        Placement(np.zeros((1, 4), dtype=int), 2, 1, [[pair]])


def test_replica_ids_at_the_range_edges_are_refused() -> None:
    # expert ids are [0, experts), GPU ids [0, gpus): the first id past each end is out
    for pair in [(4, 1), (0, 2), (-1, 1), (0, -1)]:
        with pytest.raises(PlacementError, match=rf"replica \({pair[0]}, {pair[1]}\) of layer 0 is out of range"):
            Placement(np.zeros((1, 4), dtype=int), 2, 1, [[pair]])
    assert Placement(np.zeros((1, 4), dtype=int), 2, 1, [[(3, 1)]]).holders(0)[3] == [0, 1]


def test_check_topology_edges() -> None:
    check_topology(4, 1, 1)  # one GPU
    check_topology(4, 4, 2)  # one expert per GPU
    check_topology(4, 5, 5, balanced=False, redundant=1)  # a redundant copy lets a fifth GPU hold one
    with pytest.raises(PlacementError, match="--gpus must be >= 1, got 0"):
        check_topology(4, 0, 1)
    with pytest.raises(PlacementError, match="--gpus 4 is not a multiple of --gpus-per-node 0"):
        check_topology(4, 4, 0)
    with pytest.raises(PlacementError, match=r"^5 GPUs for 4 experts: some GPU would hold no expert \(--objective"):
        check_topology(4, 5, 5, balanced=False)
    with pytest.raises(PlacementError, match=r"^6 GPUs for 4 experts \+ 1 redundant copies: some GPU would hold no expert$"):
        check_topology(4, 6, 6, balanced=False, redundant=1)
    with pytest.raises(PlacementError, match=r"^6 experts per layer cannot be split equally over 4 GPUs \(6 % 4 = 2\): "
                                             r"use balance$"):
        check_topology(6, 4, 2, hint="use balance")
    check_topology(6, 4, 2, balanced=False)


def test_trace_expert_ids_and_counts_at_the_edges() -> None:
    ids = np.array([[[0, 1]], [[1, 0]]])
    with pytest.raises(TraceError, match=r"t: expert id 8 out of range \[0, 8\)"):
        make_trace(np.array([[[0, 8]]]), num_experts=8, name="t")
    assert make_trace(np.array([[[0, 7]]]), num_experts=8).num_experts == 8
    assert make_trace(np.zeros((3, 2, 1), np.int64), num_experts=1).num_experts == 1  # a single expert
    assert make_trace(ids, num_experts=MAX_EXPERTS).num_experts == MAX_EXPERTS
    for bad in (0, -3, MAX_EXPERTS + 1):
        with pytest.raises(TraceError, match=rf"t: num_experts must be in \[1, {MAX_EXPERTS}\], got {bad}$"):
            make_trace(ids, num_experts=bad, name="t")
    # more choices than experts is named as such, not as the duplicates it implies
    with pytest.raises(TraceError, match="t: k=3 exceeds num_experts=2"):
        make_trace(np.array([[[0, 1, 0]]]), num_experts=2, name="t")


def test_trace_built_by_hand_is_checked_on_save(tmp_path: Path) -> None:
    # make_trace reshapes and casts; a Trace built directly reaches validate_trace as it is
    for ids, message in [(np.zeros((2, 2), np.int64), r"topk_ids must be \[tokens, moe_layers, k\], got shape \[2, 2\]"),
                         (np.zeros((1, 1, 1, 1), np.int64), r"got shape \[1, 1, 1, 1\]"),
                         (np.zeros((2, 1, 1)), "topk_ids must be integers, got dtype float64")]:
        with pytest.raises(TraceError, match=message):
            save_trace(Trace(topk_ids=ids, num_experts=4), tmp_path / "t.npz")
    ints = np.ones((2, 1, 1), np.int64)
    with pytest.raises(TraceError, match="topk_weights must be floats, got dtype int64"):
        save_trace(Trace(topk_ids=np.zeros((2, 1, 1), np.int64), num_experts=4, topk_weights=ints), tmp_path / "t.npz")
    with pytest.raises(TraceError, match="sequence_ids must be integers, got dtype float64"):
        save_trace(Trace(topk_ids=np.zeros((2, 1, 1), np.int64), num_experts=4, sequence_ids=np.zeros(2)),
                   tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()
    with pytest.raises(TraceError, match=r"topk_ids must be \[tokens, moe_layers, k\], got shape \[3\]"):
        make_trace(np.array([0, 1, 2]))
    # no ids to infer num_experts from: the empty trace is named, not a numpy error on max()
    with pytest.raises(TraceError, match=r"t: empty trace \(shape \[0, 2, 2\]\)"):
        make_trace(np.zeros((0, 2, 2), np.int64), name="t")


def test_duplicate_expert_anywhere_in_the_top_k_is_named() -> None:
    ids = np.array([[[0, 1, 2], [0, 1, 2]], [[3, 4, 5], [3, 4, 5]], [[0, 1, 2], [2, 5, 2]]])  # top-3, not adjacent
    with pytest.raises(TraceError, match=r"t: duplicate expert ids in the top-k of token 2 at layer 1 "
                                         r"\(1 token-layers affected\)"):
        make_trace(ids, num_experts=6, name="t")


def test_make_trace_refuses_what_a_cast_would_hide(tmp_path: Path) -> None:
    ids = np.array([[[0, 1]], [[1, 0]]])
    with pytest.raises(TraceError, match="t: topk_weights must be floats, got dtype int64"):
        make_trace(ids, np.ones((2, 1, 2), np.int64), 2, name="t")
    with pytest.raises(TraceError, match="t: sequence_ids must be integers, got dtype float64"):
        make_trace(ids, num_experts=2, sequence_ids=np.array([0.5, 1.0]), name="t")  # int64 would truncate 0.5
    for bad in (2.0, True, "2"):
        with pytest.raises(TraceError, match=rf"t: num_experts must be an integer, got {bad!r}"):
            make_trace(ids, num_experts=bad, name="t")  # type: ignore[arg-type]
    assert make_trace(ids, num_experts=np.int32(2)).num_experts == 2  # type: ignore[arg-type]
    top1 = make_trace(np.array([[0, 1], [1, 0]]), np.array([[1.0, 0.5], [0.9, 1.0]]), 2)  # [T, L]: top-1
    assert top1.topk_ids.shape == (2, 2, 1) and top1.topk_weights is not None
    assert top1.topk_weights.shape == (2, 2, 1) and top1.topk_weights[1, 0, 0] == np.float32(0.9)
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(TraceError, match=r"empty.npy: file is empty$"):
        load_trace(tmp_path / "empty.npy")


def test_npz_trace_header_fields_are_checked(tmp_path: Path, small_trace: Trace) -> None:
    ids = np.array([[[0, 1]]])
    with pytest.raises(TraceError, match=r"v2.npz: unsupported trace format 'moeplace.trace/v2' \(this moeplace reads "):
        load_trace(_npz(tmp_path / "v2.npz", topk_ids=ids, meta=np.asarray('{"format": "moeplace.trace/v2"}')))
    for stored in (np.array([8, 8]), np.array(8.0)):
        with pytest.raises(TraceError, match="n.npz: num_experts must be one integer"):
            load_trace(_npz(tmp_path / "n.npz", topk_ids=ids, num_experts=stored))
    assert load_trace(_npz(tmp_path / "ok.npz", topk_ids=ids, num_experts=np.array([8]))).num_experts == 8
    save_trace(small_trace, tmp_path / "good.npz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-ordered file loads without any warning
        assert load_trace(tmp_path / "good.npz").num_tokens == small_trace.num_tokens


def _placement_doc(**changes: object) -> dict:
    doc = Placement(np.array([[0, 0, 1, 1], [1, 0, 1, 0]]), num_gpus=2, gpus_per_node=2).to_json()
    doc.update(changes)
    return doc


@pytest.mark.parametrize("doc, message", [
    ([1, 2], r"/p.json: a placement is a JSON object$"),
    (_placement_doc(replicas="x"), "p.json: replicas must be one list per layer of"),
    (_placement_doc(replicas=[[[2, 1]], "x"]), "p.json: replicas must be one list per layer of"),
    (_placement_doc(replicas=[[[2, 1, 0]], []]), "p.json: replicas must be one list per layer of"),
    (_placement_doc(replicas=[[[2, 1], 5], []]), "p.json: replicas must be one list per layer of"),
    (_placement_doc(replicas=[[[2, "a"]], []]), "p.json: replicas must be one list per layer of"),
    (_placement_doc(replicas=[[[2, True]], []]), "p.json: replicas must be one list per layer of"),
    (_placement_doc(expert_to_gpu=[]), "p.json: expert_to_gpu must be a rectangular table"),
    (_placement_doc(num_experts=5), r"p.json: expert_to_gpu is 2x4 but num_layers x num_experts is 2x5$"),
    (_placement_doc(split={"train_fraction": 0, "seed": 0}), r"'split' must hold train_fraction in \(0, 1\]"),
    (_placement_doc(split={"train_fraction": 1.5, "seed": 0}), r"'split' must hold train_fraction in \(0, 1\]"),
    (_placement_doc(split={"train_fraction": 0.5, "seed": -1}), "an integer seed >= 0"),
    (_placement_doc(split={"train_fraction": 0.5, "seed": 0, "by": "text"}),
     r"p.json: 'split' by must be one of 'token', 'sequence', got 'text'$"),
    (_placement_doc(split={"train_fraction": 0.5, "seed": 0, "by": None}), "'split' by must be one of"),
    (_placement_doc(num_gpus=0), "p.json: num_gpus must be a positive integer, got 0$"),
    (_placement_doc(num_layers=0, expert_to_gpu=[]), "p.json: num_layers must be a positive integer, got 0$"),
    (_placement_doc(num_layers=(1 << 31) + 1), "p.json: num_layers must be a positive integer, got 2147483649$"),
    (_placement_doc(num_gpus=1 << 31), "p.json: num_gpus 2147483648 exceeds the 4 expert copies"),  # 2**31: the edge
])
def test_placement_json_shapes_are_one_error(tmp_path: Path, doc: object, message: str) -> None:
    # each is a PlacementError naming the file, not an AttributeError/ValueError from unpacking
    (tmp_path / "p.json").write_text(json.dumps(doc))
    with pytest.raises(PlacementError, match=message):
        load_placement(tmp_path / "p.json")


def test_placement_json_keeps_split_edges_unknown_keys_and_huge_loads(tmp_path: Path) -> None:
    for split in ({"train_fraction": 1, "seed": 0}, {"train_fraction": 1e-9, "seed": 7},  # (0, 1], seed >= 0
                  {"train_fraction": 0.5, "seed": 0, "by": "sequence"}, {"train_fraction": 0.5, "seed": 0, "by": "token"}):
        (tmp_path / "p.json").write_text(json.dumps(_placement_doc(split=split)))
        assert load_placement(tmp_path / "p.json").split == split
    # keys another tool added travel through load and save unchanged; known keys are not duplicated
    (tmp_path / "p.json").write_text(json.dumps(_placement_doc(note={"by": "me"})))
    back = load_placement(tmp_path / "p.json")
    assert back.extra == {"note": {"by": "me"}} and back.to_json()["note"] == {"by": "me"}
    # whole numbers past int64 stay floats (an int64 cast would wrap them); small ones become ints
    p = Placement(np.array([[0, 1]]), 2, 2, fit_loads=np.array([[1.0, 1e19]]))
    assert p.to_json()["fit_loads"] == [[1.0, 1e19]]
    p.save(tmp_path / "big.json")
    big = load_placement(tmp_path / "big.json").fit_loads
    assert big is not None and big.tolist() == [[1.0, 1e19]]


def test_weights_rising_anywhere_in_a_top3_row_are_refused(tmp_path: Path) -> None:
    ids = np.array([[[0, 1, 2]], [[3, 4, 5]]])
    w = np.array([[[0.5, 0.3, 0.2]], [[0.5, 0.2, 0.3]]])  # token 1 rises only from column 1 to 2
    with pytest.raises(TraceError, match=r"t.npz: topk_weights of token 1 at layer 0 are not highest first "
                                         r"\(0.5, 0.2, 0.3; 1 token-layers affected\)"):
        save_trace(make_trace(ids, w, 8), tmp_path / "t.npz")
    save_trace(make_trace(ids, np.sort(w, axis=-1)[..., ::-1], 8), tmp_path / "t.npz")
    stored = np.load(tmp_path / "t.npz")["topk_ids"]
    assert stored.dtype == np.int16  # ids are stored compactly; load_trace widens them
    assert load_trace(tmp_path / "t.npz").topk_ids.dtype == np.int64


@pytest.mark.parametrize("loads, message", [
    (np.array([1.0, 2.0]), r"^x: expert_loads must be a non-empty \[moe_layers, experts\] array, got shape \[2\]$"),
    (np.zeros((2, 0)), r"^x: expert_loads must be a non-empty \[moe_layers, experts\] array, got shape \[2, 0\]$"),
    (np.array([[True, False]]), r"^x: expert_loads must be numeric, got dtype bool$"),  # not counts
    (np.array([["1", "2"]]), r"^x: expert_loads must be numeric, got dtype <U1$"),
])
def test_make_loads_refuses_wrong_shapes_and_dtypes(loads: np.ndarray, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        make_loads(loads, name="x")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_make_loads_refuses_one_bad_count_among_good_ones(bad: float) -> None:
    loads = np.ones((2, 4))
    loads[1, 2] = bad  # one bad cell is enough: the others are valid counts
    with pytest.raises(TraceError, match=rf"^x: expert_loads must be finite and non-negative, got {bad:.6g} at "
                                         r"layer 1, expert 2$"):
        make_loads(loads, name="x")


def test_make_loads_names_the_first_count_at_or_past_1e15() -> None:
    loads = np.ones((3, 4))
    loads[1, 2] = 1e15  # the bound itself is refused: counts must be below it
    loads[2, 0] = 5e15
    with pytest.raises(TraceError, match=r"^x: expert_loads holds 1e\+15 at layer 1, expert 2: counts of token "
                                         r"selections must be below 1e15$"):
        make_loads(loads, name="x")
    with pytest.raises(TraceError, match=r"holds 1e\+15 at layer 0, expert 1"):
        make_loads(np.array([[1.0, 1e15]]), name="x")  # the bound alone
    assert make_loads(np.full((1, 2), np.nextafter(1e15, 0))).loads.max() < 1e15


def test_make_loads_refuses_all_zero_counts() -> None:
    with pytest.raises(TraceError, match=r"^x: expert_loads holds no expert selection \(every count is 0\)$"):
        make_loads(np.zeros((2, 3), np.int64), name="x")
    assert make_loads(np.array([[0, 0, 1]])).loads.sum() == 1  # one selection is enough


def test_load_loads_of_an_npz_with_neither_member_and_npz_named_npy(tmp_path: Path) -> None:
    path = _npz(tmp_path / "other.npz", counts=np.ones((2, 2)))
    with pytest.raises(TraceError, match="other.npz: neither 'expert_loads' nor 'topk_ids' found$"):
        load_loads(path)
    # a .npy name is an ExFlow trace to every stage, whatever it holds: load_trace names the problem
    assert not is_load_only(_npz(tmp_path / "loads.npy", expert_loads=np.ones((2, 2))))
    assert is_load_only(_npz(tmp_path / "loads.npz", expert_loads=np.ones((2, 2))))


def test_trace_shape_reads_the_headers_only(tmp_path: Path, small_trace: Trace, monkeypatch: pytest.MonkeyPatch) -> None:
    """trace_shape answers from the .npy headers, compressed or not; num_experts None where the
    file stores none (an ExFlow .npy, an .npz without the member: inferred from the ids)."""
    import moeplace.trace.format as fmt

    save_trace(small_trace, tmp_path / "z.npz")
    save_trace(small_trace, tmp_path / "plain.npz", compress=False)
    _npz(tmp_path / "bare.npz", topk_ids=small_trace.topk_ids.astype(np.int16))
    np.save(tmp_path / "exflow.npy", small_trace.topk_ids[:, :, 0].astype(np.int32))
    # against load_trace's own reading, before it is made to fail
    expected = {name: (t.num_tokens, t.num_layers, t.top_k, t.num_experts)
                for name, t in ((n, load_trace(tmp_path / n)) for n in ("z.npz", "plain.npz", "bare.npz", "exflow.npy"))}
    assert expected["z.npz"] == expected["plain.npz"] == (24, 3, 2, 8)

    def refuse(*_: object) -> None:
        raise AssertionError("trace_shape read the tokens")

    monkeypatch.setattr(fmt, "load_trace", refuse)
    for name in ("z.npz", "plain.npz"):
        assert fmt.trace_shape(tmp_path / name) == expected[name]
    assert fmt.trace_shape(tmp_path / "bare.npz") == (24, 3, 2, None)  # load_trace infers 8 from the ids
    assert fmt.trace_shape(tmp_path / "exflow.npy") == (24, 3, 1, None)
    # what only the data shows is load_trace's to find
    assert fmt.trace_shape(_npz(tmp_path / "ids.npz", topk_ids=np.array([[[0, 9]]]), num_experts=np.array(8))) == (1, 1, 2, 8)


def _npy_bytes(shape: tuple[int, ...], data: bytes) -> bytes:
    """An .npy of int64 whose header declares `shape`, followed by `data` as it is."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "<i8", "fortran_order": False, "shape": shape})
    return out.getvalue() + data


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("make", [
    lambda t: t / "missing.npz",
    lambda t: t / "missing.npy",
    lambda t: _text(t / "empty.npz", ""),
    lambda t: _text(t / "t.npz", "a,b,c\n1,2,3\n"),
    lambda t: _text(t / "t.npy", "a,b,c\n1,2,3\n"),
    lambda t: _npz(t / "loads.npz", expert_loads=np.ones((2, 4))),
    lambda t: _npz(t / "2d.npz", topk_ids=np.zeros((4, 2), np.int64)),
    lambda t: _npz(t / "float.npz", topk_ids=np.zeros((4, 2, 2), np.float32)),
    lambda t: _npz(t / "empty-ids.npz", topk_ids=np.zeros((0, 2, 2), np.int64), num_experts=np.array(8)),
    lambda t: _npz(t / "n.npz", topk_ids=np.array([[[0, 1]]]), num_experts=np.array([8, 8])),
    lambda t: _npz(t / "n0.npz", topk_ids=np.array([[[0, 1]]]), num_experts=np.array(0)),
    lambda t: _npz(t / "k.npz", topk_ids=np.array([[[0, 1, 2]]]), num_experts=np.array(2)),
    lambda t: _npz(t / "v2.npz", topk_ids=np.array([[[0, 1]]]), meta=np.asarray('{"format": "moeplace.trace/v2"}')),
    lambda t: _npz(t / "meta.npz", topk_ids=np.array([[[0, 1]]]), meta=np.asarray("{not json")),
    lambda t: _zip(t / "cut.npz", {"topk_ids.npy": _npy_bytes((1000, 16, 4), b"\0" * 64)}),
    lambda t: _zip(t / "cutw.npz", {"topk_ids.npy": _npy_bytes((1, 1, 2), np.array([0, 1]).tobytes()),
                                    "topk_weights.npy": _npy_bytes((1, 1, 2), b"\0" * 8)}),
    lambda t: _zip(t / "raw.npz", {"topk_ids.npy": b"not an array"}),
    lambda t: _bytes(t / "cut.npy", _npy_bytes((1000, 16), b"\0" * 64)),
    lambda t: _npy_object(t / "obj.npy"),
    lambda t: _npz_named_npy(t / "z.npy"),
])
def test_trace_shape_refuses_as_load_trace_does(tmp_path: Path, make) -> None:
    """A file that is not a readable trace: the same one line from trace_shape as from load_trace."""
    from moeplace.trace.format import trace_shape

    path = make(tmp_path)
    with pytest.raises(TraceError) as loaded:
        load_trace(path)
    with pytest.raises(TraceError) as shaped:
        trace_shape(path)
    assert str(shaped.value) == str(loaded.value) and "\n" not in str(shaped.value)


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _npy_object(path: Path) -> Path:
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return path


def _npz_named_npy(path: Path) -> Path:
    with open(path, "wb") as f:
        np.savez(f, topk_ids=np.array([[[0, 1]]]))
    return path
