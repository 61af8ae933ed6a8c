"""Routing-path sketch (trace/paths.py): the hash, the sketch solve stores, and what eval says of a
trace that holds some of the fit tokens in another file (a subset, a mix), which the file and
routing hashes cannot recognise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.errors import PlacementError
from moeplace.placement import Placement, load_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import load_trace, save_trace, split_tokens
from moeplace.trace.paths import PATH_HASH, fit_path_share, path_hashes, sketch

MASK = (1 << 64) - 1


def reference_hash(path: list[int]) -> int:
    """The documented hash in plain Python integers: splitmix64's finaliser folded over the ids."""
    def mix(h: int) -> int:
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK
        return h ^ (h >> 31)

    h = mix((len(path) + 0x9E3779B97F4A7C15) & MASK)
    for expert in path:
        h = mix(h ^ (expert & MASK))
    return h


def test_path_hash_is_the_documented_function_of_the_ordered_path() -> None:
    ids = np.array([[[3, 1], [0, 7]], [[1, 3], [0, 7]], [[3, 1], [0, 7]], [[0, 0], [0, 0]]])  # [T=4, L=2, k=2]
    got = path_hashes(ids)
    assert got.dtype == np.uint64
    assert [int(h) for h in got] == [reference_hash(row.ravel().tolist()) for row in ids]
    assert got[0] == got[2] and got[0] != got[1]  # the top-1 expert comes first: order matters
    # the hash sees the flat path: [T, 1, 4] is the same path as [T, 2, 2] (eval checks shapes first);
    # a path of another length is seeded differently
    assert path_hashes(ids.reshape(4, 1, 4))[0] == got[0]
    assert path_hashes(ids[:, :1])[0] != got[0]


def test_sketch_keeps_the_smallest_distinct_hashes() -> None:
    trace, _ = planted_trace(600, 4, 16, 2, 4, seed=1)
    hashes = np.unique(path_hashes(trace.topk_ids))
    small = sketch(trace.topk_ids, size=10_000)
    assert small["hash"] == PATH_HASH and small["complete"] is True
    assert [int(h, 16) for h in small["sample"]] == hashes.tolist()
    capped = sketch(trace.topk_ids, size=64)
    assert capped["complete"] is False and [int(h, 16) for h in capped["sample"]] == hashes[:64].tolist()


def test_share_is_exact_when_complete_and_estimated_from_the_sampled_range() -> None:
    trace, _ = planted_trace(4000, 6, 32, 2, 4, seed=2)
    ids = trace.topk_ids
    assert len(np.unique(path_hashes(ids))) == len(ids)  # every path distinct: shares count tokens
    fit, other = ids[:2000], ids[2000:]
    full = sketch(fit, size=1 << 16)
    assert fit_path_share(fit[:300], full) == (1.0, 300)
    assert fit_path_share(other, full) == (0.0, 2000)
    assert fit_path_share(np.concatenate([fit[:500], other[:1500]]), full) == (0.25, 2000)
    small = sketch(fit, size=256)
    share, measured = fit_path_share(np.concatenate([fit[:1000], other[:1000]]), small)
    assert 150 < measured < 350  # those in the sketch's range: ~128 of the 1000 fit tokens, ~128 of the others
    assert abs(share - 0.5) < 0.1
    assert fit_path_share(fit[:500], small)[0] == 1.0  # a subset of the fit tokens: every sampled one found


def test_placement_keeps_the_sketch_and_refuses_a_bad_one(tmp_path: Path) -> None:
    doc = Placement(np.array([[0, 1]]), 2, 2, fit_paths={"hash": PATH_HASH, "complete": True,
                                                          "sample": ["00000000000000ff", "0a00000000000000"]}).to_json()
    (tmp_path / "p.json").write_text(json.dumps(doc))
    assert load_placement(tmp_path / "p.json").fit_paths == doc["fit_paths"]
    for bad, message in [
        ({"hash": "md5", "complete": True, "sample": []}, "must be an object with hash"),
        ({"hash": PATH_HASH, "sample": []}, "must be an object with hash"),
        ({"hash": PATH_HASH, "complete": True, "sample": ["xyz"]}, "sample must be a list of 16-digit lowercase hex"),
        ({"hash": PATH_HASH, "complete": True, "sample": "00000000000000ff"}, "sample must be a list of 16-digit lowercase hex"),
        ({"hash": PATH_HASH, "complete": True, "sample": ["0a00000000000000", "00000000000000ff"]}, "sample must be ascending"),
        ([1, 2], "must be an object with hash"),
    ]:
        (tmp_path / "p.json").write_text(json.dumps({**doc, "fit_paths": bad}))
        with pytest.raises(PlacementError, match=f"p.json: 'fit_paths' {message}"):
            load_placement(tmp_path / "p.json")


def test_eval_says_how_many_tokens_of_another_trace_the_solver_saw(tmp_path: Path, capsys) -> None:
    trace, _ = planted_trace(1200, 6, 32, 2, 4, seed=3)
    path = tmp_path / "t.npz"
    save_trace(trace, path)
    assert run(["solve", str(path), "--gpus", "4", "--train-fraction", "0.5", "--seed", "1", "--time-limit", "20",
                "-q", "-o", str(tmp_path / "p.json")]) == 0
    placement = load_placement(tmp_path / "p.json")
    assert placement.fit_paths is not None and placement.fit_paths["complete"] is False  # 600 paths > 256
    train, held = split_tokens(1200, 0.5, 1)
    t = load_trace(path)

    def tokens(trace_file: Path) -> dict:
        capsys.readouterr()
        assert run(["eval", str(tmp_path / "p.json"), str(trace_file), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    same = tokens(path)  # the fit trace itself: held out by split, the share exact
    hashes = path_hashes(t.topk_ids)
    assert same["subset"] == "held-out"
    assert same["fit_path_share"] == np.isin(hashes[held], hashes[train]).mean()
    save_trace(t.select_tokens(train[::-3]), tmp_path / "subset.npz")  # fit tokens, re-ordered, another file
    subset = tokens(tmp_path / "subset.npz")
    assert subset["subset"] == "all" and subset["fit_path_share"] == 1.0
    assert "100% of them repeat a fit token's routing path" in subset["note"]
    save_trace(t.select_tokens(held), tmp_path / "held.npz")
    assert tokens(tmp_path / "held.npz")["fit_path_share"] == pytest.approx(same["fit_path_share"], abs=0.02)

    # a placement written before fit_paths existed: nothing is claimed
    doc = json.loads((tmp_path / "p.json").read_text())
    del doc["fit_paths"]
    (tmp_path / "p.json").write_text(json.dumps(doc))
    old = tokens(tmp_path / "subset.npz")
    assert old["fit_path_share"] is None and "routing path" not in old["note"]
