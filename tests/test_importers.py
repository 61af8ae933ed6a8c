"""`moeplace import`: CSV layers, ExFlow .npy, SGLang recorder dumps, per-layer count JSON."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import ROOT, SHARED_DATA
from moeplace.cli import run
from moeplace.errors import MoeplaceWarning, TraceError
from moeplace.trace.format import Trace, load_loads, load_trace
from moeplace.trace.importers import import_csv, import_csv_layers, import_loads_json, import_sglang

FLAME = SHARED_DATA / "flame-moe-290m-decoder"
MIXTRAL = SHARED_DATA / "mixtral-8x7b-expert-loads"


def write_layer_csv(path: Path, dense: np.ndarray, token_ids: np.ndarray | None = None) -> Path:
    header = (["token_id"] if token_ids is not None else []) + [f"expert_{e}" for e in range(dense.shape[1])]
    lines = [",".join(header)]
    for r, row in enumerate(dense):
        lines.append(",".join(([str(token_ids[r])] if token_ids is not None else []) + [repr(float(x)) for x in row]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(not FLAME.is_dir(), reason="shared FLAME data absent")
def test_flame_reimport_matches_committed_trace(tmp_path: Path) -> None:
    out = tmp_path / "flame.npz"
    assert run(["import", "csv", str(FLAME), "-o", str(out), "--meta", "model=flame-moe-290m"]) == 0
    new, committed = load_trace(out), load_trace(ROOT / "traces" / "flame-moe-290m-decoder.npz")
    for key in ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions"):
        np.testing.assert_array_equal(getattr(new, key), getattr(committed, key), err_msg=key)
    assert new.num_experts == committed.num_experts == 64
    assert new.meta["moe_layers"] == committed.meta["moe_layers"] == list(range(2, 10))
    assert new.meta["model"] == "flame-moe-290m"


def test_csv_files_are_ordered_by_layer_number(tmp_path: Path) -> None:
    # layer 2: token 0 -> experts (1, 0), token 1 -> (2, 3); layer 10: token 0 -> (3, 2), token 1 -> (0, 1)
    l2 = np.array([[0.3, 0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]])
    l10 = np.array([[0.0, 0.0, 0.1, 0.7], [0.8, 0.1, 0.0, 0.0]])
    f2 = write_layer_csv(tmp_path / "layer2.csv", l2, np.array([5, 6]))
    f10 = write_layer_csv(tmp_path / "layer10.csv", l10, np.array([5, 6]))
    t = import_csv([f10, f2])  # glob order: layer10 first
    assert t.meta["moe_layers"] == [2, 10]
    np.testing.assert_array_equal(t.topk_ids, [[[1, 0], [3, 2]], [[2, 3], [0, 1]]])
    np.testing.assert_allclose(t.topk_weights[:, 0], [[0.6, 0.3], [0.5, 0.2]])
    np.testing.assert_array_equal(t.sequence_ids, [5, 6])
    assert t.positions is None and t.num_experts == 4


def test_csv_of_expert_counts_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a per-layer count table (layer,expert_0..) imports as "tokens" selecting every expert with
    # counts as gate weights; the import says what it read and where counts belong
    counts = tmp_path / "counts.csv"
    counts.write_text("layer,expert_0,expert_1,expert_2,expert_3\n0,120,30,55,80\n1,10,300,5,8\n")
    assert run(["import", "csv", str(counts), "-o", str(tmp_path / "c.npz")]) == 0
    err = capsys.readouterr().err
    assert "looks like a table of expert counts" in err and "up to 300" in err and "import loads-json" in err
    # gate weights of a real top-k (some zero in every row), or all experts chosen with
    # probabilities below 1, get no such line
    for name, table in (("top2.csv", np.array([[0.3, 0.6, 0.0, 0.0], [0.0, 0.0, 5.0, 2.0]])),
                        ("all.csv", np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))):
        path = write_layer_csv(tmp_path / name, table, np.array([0, 1]))
        assert run(["import", "csv", str(path), "-o", str(tmp_path / "t.npz")]) == 0
        assert "counts" not in capsys.readouterr().err


def test_csv_ignores_other_columns(tmp_path: Path) -> None:
    f = tmp_path / "layer0.csv"
    f.write_text("text,expert_1,expert_0,token_id\nhello,0.2,0.7,4\n\"a, b\",0.9,0.0,5\n")
    t = import_csv([f], k=1)
    np.testing.assert_array_equal(t.topk_ids[:, 0, 0], [0, 1])  # columns mapped by expert number
    np.testing.assert_allclose(t.topk_weights[:, 0, 0], [0.7, 0.9])
    np.testing.assert_array_equal(t.sequence_ids, [4, 5])


@pytest.mark.parametrize(
    "second, message",
    [
        (np.array([[0.3, 0.6, 0.0, 0.0]]), "1 rows, but"),
        (np.array([[0.3, 0.6, 0.0], [0.0, 0.5, 0.2]]), "3 expert columns"),
        (np.array([[0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]]), "layer1.csv: line 2 selects 1 expert, expected top-2"),
        (np.array([[0.3, -0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]]), "finite and non-negative"),
    ],
)
def test_csv_layers_must_agree(tmp_path: Path, second: np.ndarray, message: str) -> None:
    f0 = write_layer_csv(tmp_path / "layer0.csv", np.array([[0.3, 0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]]))
    f1 = write_layer_csv(tmp_path / "layer1.csv", second)
    with pytest.raises(TraceError, match=message):
        import_csv([f0, f1])


def test_exflow_import_records_num_experts(tmp_path: Path) -> None:
    src = tmp_path / "exflow.npy"
    np.save(src, np.array([[0, 3], [2, 1], [3, 3]], dtype=np.int32))
    out = tmp_path / "t.npz"
    assert run(["import", "exflow", str(src), "--num-experts", "8", "-o", str(out)]) == 0
    t = load_trace(out)
    assert t.num_experts == 8 and t.topk_ids.shape == (3, 2, 1) and t.topk_weights is None
    np.testing.assert_array_equal(t.topk_ids[:, :, 0], [[0, 3], [2, 1], [3, 3]])


# --- SGLang dumps: fixtures with the layout of sglang/srt/eplb/expert_distribution.py ---------------

# 4 model layers (layer 0 dense), 4 logical experts, 6 physical slots: physical 4 and 5 are
# redundant copies of logical 1 and 2. Top-2 in SGLang's 8-wide buffer, -1 elsewhere.
P2L = np.array([[0, 1, 2, 3, 1, 2]] * 4)


def _record(pass_id: int, rank: int, physical: list[list[list[int]]], input_ids: list[int], positions: list[int]) -> dict:

    n = len(input_ids)
    ids = torch.full((4, n, 8), -1, dtype=torch.int32)
    ids[1:, :, :2] = torch.tensor(physical, dtype=torch.int32).transpose(0, 1)  # [tokens, 3, 2] -> [3, tokens, 2]
    return {
        "forward_pass_id": pass_id, "rank": rank, "gatherer_key": "primary",
        "input_ids": input_ids, "positions": positions, "extend_seq_lens": [n], "forward_mode": 1,
        "topk_ids_of_layer": ids, "misc_objects": [], "global_physical_count": torch.zeros(4, 6, dtype=torch.int32),
    }


def _per_token_dumps(tmp_path: Path) -> list[Path]:
    a = _record(0, 0, [[[0, 4], [5, 3], [1, 0]], [[2, 3], [3, 0], [4, 5]]], [11, 12], [0, 1])
    b = _record(1, 0, [[[3, 2], [0, 1], [2, 3]]], [13], [2])
    c = _record(0, 1, [[[1, 2], [2, 1], [3, 2]], [[-1, -1], [-1, -1], [-1, -1]]], [21, 0], [0, 0])  # DP rank 1 + padding row
    dup = {**a, "rank": 1}  # without DP attention, rank 1 records rank 0's batch again
    paths = []
    for rank, records in ((0, [b, a]), (1, [dup, c])):
        path = tmp_path / f"expert_distribution_recorder_1700000000.0_{rank}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(P2L)}, path)
        paths.append(path)
    return paths


def test_sglang_per_token_to_trace(tmp_path: Path) -> None:
    with pytest.warns(MoeplaceWarning, match="pass 0 holds different batches on ranks 0 and 1: DP attention"):
        t = import_sglang(_per_token_dumps(tmp_path))
    assert t.meta["moe_layers"] == [1, 2, 3] and t.meta["dropped_tokens"] == 1 and t.meta["records"] == 3
    assert t.num_experts == 4 and t.top_k == 2 and t.topk_weights is None
    # order: pass 0 rank 0 (tokens 11, 12), pass 0 rank 1 (21; padding dropped), pass 1 (13)
    np.testing.assert_array_equal(t.token_ids, [11, 12, 21, 13])
    np.testing.assert_array_equal(t.positions, [0, 1, 0, 2])
    expected_physical = np.array([
        [[0, 4], [5, 3], [1, 0]], [[2, 3], [3, 0], [4, 5]], [[1, 2], [2, 1], [3, 2]], [[3, 2], [0, 1], [2, 3]],
    ])
    np.testing.assert_array_equal(t.topk_ids, P2L[0][expected_physical])


def test_sglang_cli_writes_trace(tmp_path: Path) -> None:
    _per_token_dumps(tmp_path)
    out = tmp_path / "t.npz"
    assert run(["import", "sglang", str(tmp_path), "-o", str(out)]) == 0
    assert load_trace(out).num_tokens == 4


def test_sglang_stat_to_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    count = rng.integers(0, 50, size=(5, 3, 8))
    count[:, 0] = 0  # a dense layer
    path = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": torch.tensor(count, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, path)
    out = tmp_path / "loads.npz"
    assert run(["import", "sglang", str(path), "-o", str(out)]) == 0
    loads = load_loads(out)
    np.testing.assert_array_equal(loads.loads, count.sum(axis=0)[1:])
    assert loads.meta["moe_layers"] == [1, 2] and loads.meta["source"] == "sglang-stat"


def test_sglang_refuses_arbitrary_objects(tmp_path: Path) -> None:

    path = tmp_path / "evil.pt"
    torch.save({"records": [], "payload": Path("x")}, path)  # a pathlib object needs real unpickling
    with pytest.raises(TraceError, match="refused: loading needs unpickling of arbitrary Python objects"):
        import_sglang([path])


def test_sglang_physical_id_out_of_range(tmp_path: Path) -> None:

    rec = _record(0, 0, [[[0, 6], [1, 2], [3, 0]]], [1], [0])
    path = tmp_path / "d.pt"
    torch.save({"records": [rec], "last_physical_to_logical_map": torch.tensor(P2L)}, path)
    with pytest.raises(TraceError, match="physical expert id 6 out of range"):
        import_sglang([path])


@pytest.mark.skipif(not MIXTRAL.is_dir(), reason="shared Mixtral loads absent")
def test_mixtral_popularity_files_are_summed(tmp_path: Path) -> None:
    files = sorted((MIXTRAL / "mixtral_8x7b_original").glob("*.json"))[:2]
    docs = [json.loads(f.read_text()) for f in files]
    loads = import_loads_json(files)
    np.testing.assert_array_equal(loads.loads, np.add(*[np.array(d["expert_popularity"]) for d in docs]))
    assert loads.loads.shape == (32, 8)
    assert loads.meta["total_input_tokens"] == sum(d["total_input_tokens"] for d in docs)


def test_loads_json_shapes_must_agree(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"expert_popularity": [[1, 2], [3, 4]]}))
    b.write_text(json.dumps({"expert_loads": [[1, 2, 3], [3, 4, 5]]}))
    with pytest.raises(TraceError, match=r"is \[2, 3\], but"):
        import_loads_json([a, b])


def test_loads_json_keeps_a_token_count_only_when_every_file_has_one(tmp_path: Path,
                                                                     recwarn: pytest.WarningsRecorder) -> None:
    """Before: the sum over the files that had one, recorded as the whole loads' token count."""
    files = [tmp_path / f"{name}.json" for name in "abc"]
    for f, n in zip(files, (10, None, 7)):
        f.write_text(json.dumps({"expert_popularity": [[1, 2], [3, 4]], **({} if n is None else {"total_input_tokens": n})}))
    assert "total_input_tokens" not in import_loads_json(files).meta
    assert [str(w.message) for w in recwarn.list] == ["2 of the 3 files record total_input_tokens: not kept (a sum "
                                                      "over some of them would not be the loads' token count)"]
    recwarn.clear()
    assert import_loads_json([files[0], files[2]]).meta["total_input_tokens"] == 17
    assert "total_input_tokens" not in import_loads_json([files[1]]).meta and not recwarn.list


# --- found by a first-use tour (tour29): each was silent, misleading or an internal error --------


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run the CLI expecting bad input: exit 2 and one `moeplace: error:` line, returned."""
    assert run(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplace: error: "), lines
    return lines[0]


def _positions(root: Path, folders: list[str], tokens: dict[str, str] | None = None) -> Path:
    """FLAME-style dir: each folder holds layer0.csv and layer1.csv of 2 sequences (+ tokens.txt)."""
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for n in (0, 1):
            write_layer_csv(root / folder / f"layer{n}.csv", np.array([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]]))
        if tokens is not None and folder in tokens:
            (root / folder / "tokens.txt").write_text(tokens[folder])
    return root


def _tokens_txt(ids: str) -> str:
    return f"header\n----------------samples-----------------\ntorch.Size([2])\ntensor([{ids}])\n"


def test_csv_position_folder_must_be_numbered(tmp_path: Path) -> None:
    root = _positions(tmp_path / "t", ["1st", "2nd", "10th", "extra"])
    with pytest.raises(TraceError, match=r"extra: position folders must be named by their number"):
        import_csv([root])
    root2 = _positions(tmp_path / "u", ["1st", "1st_copy"])
    with pytest.raises(TraceError, match=r"1st_copy: position 1 again"):
        import_csv([root2])
    t = import_csv([_positions(tmp_path / "v", ["1st", "2nd", "10th"])])
    np.testing.assert_array_equal(t.positions, [1, 1, 2, 2, 10, 10])


def test_csv_files_of_different_position_folders_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # FLAME's 1st/layer0.csv with 2nd/layer1.csv: row r of each is a different token (position 1
    # vs 2 of sequence r); pairing them made a path no token took
    root = _positions(tmp_path / "t", ["1st", "2nd"])
    out = tmp_path / "o.npz"
    err = _cli_error(capsys, "import", "csv", str(root / "1st" / "layer0.csv"), str(root / "2nd" / "layer1.csv"), "-o", str(out))
    assert "1st/layer0.csv, " in err and "2nd/layer1.csv: layer files from different directories" in err
    assert not out.exists()
    # the files of one folder, however spelled, are one token set
    t = import_csv([root / "1st" / "layer1.csv", root / "2nd" / ".." / "1st" / "layer0.csv"])
    assert t.meta["moe_layers"] == [0, 1] and t.num_tokens == 2
    # files not named layerN.csv (one folder per layer) are the user's order, wherever they are
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for name, src in (("a", "layer0.csv"), ("b", "layer1.csv")):
        (tmp_path / name / "routing.csv").write_bytes((root / "1st" / src).read_bytes())
    u = import_csv([tmp_path / "a" / "routing.csv", tmp_path / "b" / "routing.csv"])
    np.testing.assert_array_equal(u.topk_ids, t.topk_ids)


def test_csv_tokens_txt_that_cannot_be_read_is_an_error(tmp_path: Path) -> None:
    good = _tokens_txt("5,\n 6")
    t = import_csv([_positions(tmp_path / "ok", ["1st", "2nd"], {"1st": good, "2nd": good})])
    np.testing.assert_array_equal(t.token_ids, [5, 6, 5, 6])
    bad = _positions(tmp_path / "bad", ["1st", "2nd"], {"1st": good, "2nd": _tokens_txt("5,\n x")})
    with pytest.raises(TraceError, match=r"2nd/tokens.txt: line 5: 'x' is not a token id"):
        import_csv([bad])
    garbled = _positions(tmp_path / "garbled", ["1st"], {"1st": "no printout here\n"})
    with pytest.raises(TraceError, match=r"1st/tokens.txt: no '----samples----'"):
        import_csv([garbled])
    count = _positions(tmp_path / "count", ["1st"], {"1st": _tokens_txt("5, 6, 7")})
    with pytest.raises(TraceError, match=r"tokens.txt: 3 token ids, but the layer files beside it have 2 rows"):
        import_csv([count])
    partial = _positions(tmp_path / "partial", ["1st", "2nd"], {"1st": good})
    with pytest.raises(TraceError, match=r"2nd: no tokens.txt, but .*1st has one"):
        import_csv([partial])


def test_csv_errors_name_the_file_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the header is line 1; every error about a row names its line, as an editor shows it
    header = "token_id,expert_0,expert_1,expert_2\n"
    cases = {
        "short": (header + "0,0.5,0.5,0\n1,0.5,0.5,0\n2,0.5\n", "line 4 has 2 fields, header has 4"),
        "nan": (header + "0,0.5,0.5,0\n1,0.5,0.5,0\n2,0.5,x,0\n", "line 4: could not convert"),
        "top-k": (header + "0,0.5,0.5,0\n1,0.5,0.5,0\n2,0.5,0,0\n", "line 4 selects 1 expert, expected top-2"),
        "negative": (header + "0,0.5,0.5,0\n1,0.5,0.5,0\n2,0.5,-1,0\n", "line 4: gate weights must be finite"),
        "quoted": ('text,expert_0,expert_1\n"a\nb",0.5,0.5\nc,0.5,0\n', "line 4 selects 1 expert,"),
        "blank": (header + "0,0.5,0.5,0\n\n2,0.5,0.5,0\n", "line 3 is blank inside the table"),
        # csv reads CR CR LF as two line ends: the "blank" line is a stray CR, and the message says so
        "crcrlf": ((header + "0,0.5,0.5,0\n1,0.5,0.5,0\n").replace("\n", "\r\r\n"), "lines end in CR CR LF"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).mkdir()
        f = tmp_path / name / "layer0.csv"
        f.write_text(text)
        assert message in _cli_error(capsys, "import", "csv", str(f), "-o", str(tmp_path / "o.npz")), name
    write_layer_csv(tmp_path / "layer0.csv", np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 1]))
    write_layer_csv(tmp_path / "layer1.csv", np.array([[0.6, 0.4], [0.3, 0.7]]), np.array([0, 9]))
    with pytest.raises(TraceError, match=r"layer1.csv: line 3: token_id 9 differs"):
        import_csv([tmp_path / "layer0.csv", tmp_path / "layer1.csv"])


def test_csv_trailing_blank_lines_are_accepted(tmp_path: Path) -> None:
    f = tmp_path / "layer0.csv"
    f.write_text("expert_0,expert_1\n0.6,0.4\n0.3,0.7\n\n\n")
    t = import_csv([f])
    assert t.num_tokens == 2
    np.testing.assert_array_equal(t.topk_ids[:, 0, 0], [0, 1])


def test_csv_error_wording(tmp_path: Path) -> None:
    layer = write_layer_csv(tmp_path / "layer2.csv", np.array([[0.6, 0.4]]))
    with pytest.raises(TraceError, match=r"^\S+: a directory among files: give one directory alone"):
        import_csv([tmp_path, layer])
    gap = tmp_path / "gap.csv"
    gap.write_text("expert_0,expert_1,expert_3,expert_4,expert_6\n1,0,0,0,0\n")
    with pytest.raises(TraceError, match=r"gap.csv: no column expert_2, expert_5 \(expert columns go from expert_0 to expert_6\)"):
        import_csv([gap])
    (tmp_path / "a").mkdir()
    other = write_layer_csv(tmp_path / "a" / "layer2.csv", np.array([[0.6, 0.4]]))
    with pytest.raises(TraceError, match=r"^\S+/layer2.csv, \S+/a/layer2.csv: the same layer number 2 twice"):
        import_csv([layer, other])


# --- SGLang -------------------------------------------------------------------------------------


def _save_dump(path: Path, records: list[dict], p2l: np.ndarray | None) -> Path:

    dump: dict = {"records": records}
    if p2l is not None:
        dump["last_physical_to_logical_map"] = torch.tensor(p2l)
    torch.save(dump, path)
    return path


def test_sglang_map_entry_of_minus_one_is_refused(tmp_path: Path) -> None:
    p2l = P2L.copy()
    p2l[2, 4] = -1
    rec = _record(0, 0, [[[0, 4], [1, 4], [1, 0]], [[2, 3], [3, 0], [1, 2]]], [1, 2], [0, 1])
    path = _save_dump(tmp_path / "d.pt", [rec], p2l)
    with pytest.raises(TraceError, match=r"d.pt: last_physical_to_logical_map holds -1 at layer 2, physical slot 4"):
        import_sglang([path])


def test_sglang_dump_without_map_is_refused(tmp_path: Path) -> None:
    rec = _record(0, 0, [[[0, 4], [5, 3], [1, 0]]], [1], [0])  # physical slots 4 and 5 are replicas
    path = _save_dump(tmp_path / "d.pt", [rec], None)
    with pytest.raises(TraceError, match=r"d.pt: no 'last_physical_to_logical_map'"):
        import_sglang([path])


def test_sglang_token_missing_an_expert_at_some_layers_is_refused(tmp_path: Path) -> None:
    rec = _record(0, 0, [[[0, 1], [2, 3], [1, 0]], [[2, 3], [-1, -1], [1, 2]]], [1, 2], [0, 1])
    path = _save_dump(tmp_path / "d.pt", [rec], P2L)
    with pytest.raises(TraceError, match=r"d.pt: record 0: token 1 misses an expert at layer 2"):
        import_sglang([path])


def test_sglang_errors_name_the_files(tmp_path: Path) -> None:
    dup = _record(0, 0, [[[1, 4], [1, 2], [1, 0]]], [1], [0])  # physical 1 and 4 are both logical 1
    path = _save_dump(tmp_path / "d.pt", [dup], P2L)
    with pytest.raises(TraceError, match=r"d.pt: record 0: token 0 selects the same logical expert twice at layer 1"):
        import_sglang([path])
    empty = _save_dump(tmp_path / "e.pt", [], P2L)
    with pytest.raises(TraceError, match=r"e.pt: the SGLang dumps hold no tokens"):
        import_sglang([empty])


def test_sglang_stat_negative_count_is_refused(tmp_path: Path) -> None:

    count = np.ones((2, 3, 4), dtype=np.int64)
    count[1, 2, 3] = -5
    path = tmp_path / "stat.pt"
    torch.save({"rank": 0, "logical_count": torch.tensor(count)}, path)
    with pytest.raises(TraceError, match=r"stat.pt: logical_count is negative at layer 2 \(step 1, expert 3: -5\)"):
        import_sglang([path])


# --- loads-json and load-only files ------------------------------------------------------------


def test_loads_json_same_file_twice_is_refused(tmp_path: Path) -> None:
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"expert_loads": [[1, 2], [3, 4]]}))
    (tmp_path / "link.json").symlink_to(a)
    for twice in ([a, a], [a, tmp_path / "." / "a.json"], [a, tmp_path / "link.json"]):
        with pytest.raises(TraceError, match=r"the same file as .*a.json: given twice"):
            import_loads_json(twice)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"expert_loads": [[0, 0], [0, 0]]}', "holds no expert selection"),
        ('{"expert_loads": [[1e300, 1]]}', "holds 1e+300 at layer 0, expert 0: counts of token selections must be below 1e15"),
        ('{"expert_loads": [[1, ' + "9" * 400 + ']]}', "must be below 1e15"),
        ('{"expert_loads": [[1, 2.5]]}', "must hold whole counts of token selections: layer 0, expert 1 holds 2.5"),
        ('{"expert_loads": [[1, "5"]]}', "must hold numbers, not str '5' (layer 0, expert 1)"),
        ('{"expert_loads": [[1, null]]}', "must hold numbers, not null"),
        ('{"expert_loads": [[1, 2]], "expert_popularity": [[3, 4]]}', "both 'expert_popularity' and 'expert_loads'"),
    ],
)
def test_loads_json_refuses_what_is_not_a_count(tmp_path: Path, text: str, message: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "l.json"
    f.write_text(text)
    assert message in _cli_error(capsys, "import", "loads-json", str(f), "-o", str(tmp_path / "o.npz"))
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize("loads, message", [(np.array([[1e300, 1.0]]), "must be below 1e15"),
                                             (np.zeros((2, 2)), "holds no expert selection")])
def test_load_only_file_refuses_absurd_loads(tmp_path: Path, loads: np.ndarray, message: str) -> None:
    f = tmp_path / "l.npz"
    np.savez(f, expert_loads=loads, meta=np.asarray(json.dumps({"format": "moeplace.loads/v1"})))
    with pytest.raises(TraceError, match=message):
        load_loads(f)


# --- exflow, meta, help --------------------------------------------------------------------------


def test_npz_named_npy_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "fake.npy"
    with open(fake, "wb") as f:
        np.savez(f, topk_ids=np.zeros((2, 2, 1), dtype=np.int64))
    for argv in (["import", "exflow", str(fake), "-o", str(tmp_path / "f.npz")],
                 ["solve", str(fake), "--gpus", "2", "-o", str(tmp_path / "p.json")]):
        assert "fake.npy: an .npz archive named .npy" in _cli_error(capsys, *argv)


def test_meta_may_not_contradict_the_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "e.npy"
    np.save(src, np.array([[0, 3], [2, 1]]))
    out = tmp_path / "t.npz"
    line = _cli_error(capsys, "import", "exflow", str(src), "--meta", "num_experts=3", "-o", str(out))
    assert "--meta num_experts=3 contradicts the imported data (num_experts 4)" in line and not out.exists()
    assert "--meta format" in _cli_error(capsys, "import", "exflow", str(src), "--meta", "format=x", "-o", str(out))
    assert run(["import", "exflow", str(src), "--meta", "num_experts=4", "--meta", "model=m", "-o", str(out)]) == 0
    assert load_trace(out).meta["model"] == "m"


def test_exflow_num_experts_help_does_not_promise_a_count_from_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["import", "exflow", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "from the dump" not in help_text and "Default: max id + 1" in help_text


# --- found by the offline tour: layer files, k, gaps, help example, ExFlow range, SGLang copies ---


def _layer_dir(root: Path, names: list[str]) -> Path:
    """A directory of top-2 layer files (2 tokens x 3 experts) under the names given."""
    root.mkdir(parents=True)
    for name in names:
        write_layer_csv(root / name, np.array([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]]))
    return root


def test_csv_dir_takes_each_layer_once_by_its_whole_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `copy_of_layer3.csv` was read as a second layer 3 (meta.moe_layers [2, 3, 3]), and so were
    # layer2.csv with layer02.csv
    out = tmp_path / "o.npz"
    copy = _layer_dir(tmp_path / "copy", ["layer2.csv", "layer3.csv", "copy_of_layer3.csv"])
    err = _cli_error(capsys, "import", "csv", str(copy), "-o", str(out))
    assert "copy_of_layer3.csv beside the layerN.csv files" in err and not out.exists()
    padded = _layer_dir(tmp_path / "padded", ["layer2.csv", "layer02.csv", "layer3.csv"])
    assert "the same layer number 2 twice" in _cli_error(capsys, "import", "csv", str(padded), "-o", str(out))
    folders = tmp_path / "folders"
    _layer_dir(folders / "1st", ["layer0.csv", "layer1.csv"])
    _layer_dir(folders / "2nd", ["layer0.csv", "layer1.csv", "layer1 (copy).csv"])
    assert "2nd: layer1 (copy).csv beside" in _cli_error(capsys, "import", "csv", str(folders), "-o", str(out))
    # hidden files (a macOS copy's ._layer2.csv) and other files are skipped
    ok = _layer_dir(tmp_path / "ok", ["layer2.csv", "layer3.csv"])
    (ok / "._layer2.csv").write_bytes(b"\x00\x05\x16\x07")
    (ok / "notes.txt").write_text("x")
    assert import_csv([ok]).meta["moe_layers"] == [2, 3]


def test_csv_layer_gaps_are_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.npz"
    gaps = _layer_dir(tmp_path / "gaps", ["layer2.csv", "layer9.csv", "layer10.csv", "layer12.csv"])
    assert run(["import", "csv", str(gaps), "-q", "-o", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeplace: warning: no layer files for layers 3-8, 11: layers 2, 9-10, 12 are "
                                               "taken as consecutive MoE layers"), err
    assert load_trace(out).meta["moe_layers"] == [2, 9, 10, 12]
    assert run(["import", "csv", str(_layer_dir(tmp_path / "dense", ["layer2.csv", "layer3.csv"])), "-q",
                "-o", str(out)]) == 0
    assert capsys.readouterr().err == ""


def test_csv_default_k_is_the_most_of_any_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # layer1.csv line 3 selects 3 experts: the default k was layer0.csv's 2, and that row was cut to 2
    f0 = write_layer_csv(tmp_path / "layer0.csv", np.array([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]]))
    f1 = write_layer_csv(tmp_path / "layer1.csv", np.array([[0.6, 0.4, 0.0], [0.2, 0.3, 0.5]]))
    out = tmp_path / "o.npz"
    err = _cli_error(capsys, "import", "csv", str(f0), str(f1), "-o", str(out))
    assert "layer1.csv: line 3 selects 3 experts, but " in err and "layer0.csv line 2 selects 2" in err
    assert not out.exists()
    # also across position folders: the second folder's rows are checked against the first's k
    root = tmp_path / "pos"
    for folder, last in (("1st", [0.0, 0.3, 0.7]), ("2nd", [0.2, 0.3, 0.5])):
        (root / folder).mkdir(parents=True)
        for n in (0, 1):
            write_layer_csv(root / folder / f"layer{n}.csv", np.array([[0.6, 0.4, 0.0], last]))
    assert "2nd/layer0.csv: line 3 selects 3 experts" in _cli_error(capsys, "import", "csv", str(root), "-o", str(out))
    # -k given: each row keeps its k highest, as --help says
    t = import_csv([f0, f1], k=2)
    np.testing.assert_array_equal(t.topk_ids[1, 1], [2, 1])
    with pytest.raises(TraceError, match=r"layer0.csv: line 2 selects 2 experts, expected top-3"):
        import_csv([f0, f1], k=3)


def test_csv_help_example_keeps_the_bundled_trace(capsys: pytest.CaptureFixture[str]) -> None:
    # run from the repository root, the example replaced traces/flame-moe-290m-decoder.npz and
    # dropped its provenance
    assert run(["import", "csv", "--help"]) == 0
    example = capsys.readouterr().out.split("Example")[1].split("Options:")[0]
    assert "traces/" not in example and "-o flame.npz" in example and "--meta model=flame-moe-290m" in example


def test_exflow_uint64_id_is_named_as_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "e.npy"
    np.save(src, np.array([[0, 2**63 + 5], [1, 2]], dtype=np.uint64))
    err = _cli_error(capsys, "import", "exflow", str(src), "-o", str(tmp_path / "o.npz"))
    assert "expert id 9223372036854775813 out of range" in err and "negative" not in err


def test_sglang_duplicate_records_are_counted_and_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _per_token_dumps(tmp_path)  # rank 1 recorded rank 0's pass-0 batch again
    with pytest.warns(MoeplaceWarning, match="DP attention"):
        assert import_sglang(paths).meta["duplicate_records"] == 1
    out = tmp_path / "t.npz"
    assert run(["import", "sglang", *map(str, paths), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert ("3 records kept, 1 duplicate record dropped (the same batch recorded by several ranks), "
            "1 padding token dropped") in cap.out
    assert "forward pass 0 holds different batches on ranks 0 and 1: DP attention" in cap.err  # the CLI says it too
    assert load_trace(out).meta["duplicate_records"] == 1


def _rank_dumps(tmp_path: Path, records_of_rank: dict[int, list[dict]]) -> list[Path]:
    tmp_path.mkdir()
    paths = []
    for rank, records in records_of_rank.items():
        path = tmp_path / f"expert_distribution_recorder_1700000000.0_{rank}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(P2L)}, path)
        paths.append(path)
    return paths


def test_sglang_dp_attention_is_detected_and_its_limits_said(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """The dump has no DP rank: the same batch on two ranks of one pass counts once, as TP copies
    must (silently); different batches in one pass prove DP attention, which a warning names."""
    a = _record(0, 0, [[[0, 4], [5, 3], [1, 0]]], [11], [0])
    b = _record(0, 1, [[[1, 2], [2, 1], [3, 2]]], [21], [0])
    later = _record(1, 1, [[[3, 2], [0, 1], [2, 3]]], [12], [1])
    tp = import_sglang(_rank_dumps(tmp_path / "tp", {0: [a], 1: [{**a, "rank": 1}]}))
    assert isinstance(tp, Trace) and tp.num_tokens == 1 and tp.meta["duplicate_records"] == 1 and not recwarn.list
    with pytest.warns(MoeplaceWarning, match=r"forward pass 0 holds different batches on ranks 0 and 1: "
                                             r"DP attention.*count once \(1 dropped\).*--moe-a2a-backend none"):
        dp = import_sglang(_rank_dumps(tmp_path / "dp", {0: [a, later], 1: [b, {**a, "rank": 1}]}))
    assert isinstance(dp, Trace)
    np.testing.assert_array_equal(dp.token_ids, [11, 21, 12])  # rank 1's copy of rank 0's batch counted once


def test_csv_dir_with_layer_files_and_position_folders_is_refused(tmp_path: Path) -> None:
    root = _positions(tmp_path / "t", ["1st", "2nd"])
    for f in (root / "1st").glob("layer*.csv"):
        (root / f.name).write_bytes(f.read_bytes())  # the files of one folder copied up beside the folders
    with pytest.raises(TraceError, match=r"layerN.csv files and position folders holding them \(1st, 2nd\)"):
        import_csv([root])


# --- bad input found by the CLI audit: each was an internal error, an out-of-memory or silently wrong


@pytest.mark.parametrize("shape, what", [((0, 2, 8), "no layers"), ((4, 2, 0), "no expert slots")])
def test_sglang_record_without_layers_or_slots_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           shape: tuple[int, int, int], what: str) -> None:

    rec = _record(0, 0, [[[0, 1], [2, 3], [1, 0]], [[2, 3], [3, 0], [1, 2]]], [1, 2], [0, 1])
    rec["topk_ids_of_layer"] = torch.zeros(shape, dtype=torch.int32)  # was ValueError of ids.min() on no ids
    path = _save_dump(tmp_path / "d.pt", [rec], P2L)
    line = _cli_error(capsys, "import", "sglang", str(path), "-o", str(tmp_path / "t.npz"))
    assert f"d.pt: record 0: topk_ids_of_layer has shape {list(shape)} (layers, tokens, slots): {what}" in line


def _stat_dump(path: Path, count: np.ndarray) -> Path:

    torch.save({"rank": 0, "logical_count": torch.tensor(count)}, path)
    return path


def test_sglang_num_experts_is_checked_before_the_loads_are_padded(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = _stat_dump(tmp_path / "stat.pt", np.ones((2, 3, 4), dtype=np.int64))
    with pytest.raises(TraceError, match=r"num_experts must be in \[1, 65536\], got 1099511627776"):
        import_sglang([path], num_experts=2**40)  # was a [3, 2**40] pad: out of memory, naming nothing
    line = _cli_error(capsys, "import", "sglang", str(path), "--num-experts", str(2**40), "-o", str(tmp_path / "o.npz"))
    assert f"--num-experts {2**40}: num_experts must be in [1, 65536]" in line
    loads = import_sglang([path], num_experts=6)
    assert not isinstance(loads, Trace) and loads.loads.shape == (3, 6)


def test_sglang_stat_counts_that_overflow_int64_are_refused(tmp_path: Path) -> None:
    count = np.full((4, 2, 3), 10, dtype=np.int64)
    count[:, 0, 0] = 2**62
    count[3, 0, 0] += 4  # four steps sum to 2**64 + 4, which int64 wraps to 4
    path = _stat_dump(tmp_path / "stat.pt", count)
    with pytest.raises(TraceError, match=r"stat.pt: logical_count sums to 1.84467e\+19 at layer 0, expert 0 over 4 "
                                         r"steps: counts of token selections must be below 1e15"):
        import_sglang([path])


def test_sglang_same_file_twice_is_refused(tmp_path: Path) -> None:
    a, _ = _per_token_dumps(tmp_path)  # without the check, a per_token file twice was dropped as duplicate records
    (tmp_path / "stats").mkdir()
    stat = _stat_dump(tmp_path / "stats" / "stat.pt", np.ones((2, 3, 4), dtype=np.int64))  # was summed twice
    for twice in ([a, a], [a, tmp_path / "." / a.name], [tmp_path, a], [stat, stat]):
        with pytest.raises(TraceError, match=r"the same file as .*\.pt: given twice, its contents would be counted twice"):
            import_sglang(twice)


def test_meta_must_fit_the_data_and_be_standard_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "e.npy"
    np.save(src, np.array([[0, 3, 1, 2], [2, 1, 0, 3]]))  # 4 MoE layers
    out = tmp_path / "t.npz"
    for meta, message in (
        ("moe_layers=[1]", "--meta moe_layers=[1]: lists 1 layer, but the imported data has 4 MoE layers"),
        ("moe_layers=[4,3,2,1]", "decoder layer ids must be non-negative and ascending, each once"),
        ("moe_layers=[1,2,2,3]", "decoder layer ids must be non-negative and ascending, each once"),
        ('moe_layers=["a","b","c","d"]', "must be a JSON list of decoder layer ids"),
        ("x=NaN", "--meta x=NaN: NaN and Infinity are not standard JSON"),
        ("x={\"a\":[1,Infinity]}", "NaN and Infinity are not standard JSON"),
    ):
        assert message in _cli_error(capsys, "import", "exflow", str(src), "--meta", meta, "-o", str(out)), meta
        assert not out.exists()
    line = _cli_error(capsys, "import", "exflow", str(src), "--meta", "a=1", "--meta", "a=2", "-o", str(out))
    assert "--meta a: given twice (1 and 2)" in line
    assert run(["import", "exflow", str(src), "--meta", "moe_layers=[1,3,5,7]", "--meta", 'x="NaN"', "-o", str(out)]) == 0
    stored = load_trace(out).meta
    assert stored["moe_layers"] == [1, 3, 5, 7] and stored["x"] == "NaN"


@pytest.mark.parametrize("text, message", [
    # a blank line before the header: the table's first line is blank, counted as line 1
    ("\nexpert_0,expert_1\n0.6,0.4\n", "line 1 is blank inside the table"),
    ("expert_0,expert_x\n0.6,0.4\n", "expert columns must be named expert_0..expert_N"),  # one bad name is enough
    ("expert_0,expert_1,expert_1\n0.6,0.4,0\n", "column expert_1 appears more than once in the header"),
    ("expert_0,expert_2,expert_0,expert_1,expert_2\n1,0,0,0,0\n", "column expert_0 appears more than once"),  # lowest
    # five missing columns are all named; past five, the rest are counted
    ("expert_0,expert_6\n1,0\n", "no column expert_1, expert_2, expert_3, expert_4, expert_5 (expert columns"),
    ("expert_0,expert_7\n1,0\n", "no column expert_1, expert_2, expert_3, expert_4, expert_5 and 1 more (expert"),
    ("expert_0,expert_1\n0,0\n0.0,0\n", "no row selects any expert (all gate weights are 0)"),
])
def test_csv_header_and_table_errors(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "layer0.csv"
    f.write_text(text)
    with pytest.raises(TraceError, match=f"^{re.escape(str(f))}: .*{re.escape(message)}"):
        import_csv([f])


def test_csv_layers_with_a_given_k_keep_each_rows_k_highest(tmp_path: Path) -> None:
    # k given (the user's -k): a row with more non-zero entries is cut to its k highest, not refused
    f0 = write_layer_csv(tmp_path / "layer0.csv", np.array([[0.2, 0.5, 0.3], [0.0, 0.4, 0.6]]))
    f1 = write_layer_csv(tmp_path / "layer1.csv", np.array([[0.9, 0.0, 0.1], [0.3, 0.3, 0.4]]))
    ids, w, row_ids, num_experts, _ = import_csv_layers([f0, f1], k=1)
    np.testing.assert_array_equal(ids[:, :, 0], [[1, 0], [2, 2]])
    np.testing.assert_allclose(w[:, :, 0], [[0.5, 0.9], [0.6, 0.4]])
    assert row_ids is None and num_experts == 3
    read: list[Path] = []  # the progress callback sees every file, in order
    import_csv_layers([f0, f1], k=1, on_file=read.append)
    assert read == [f0, f1]


def test_csv_layer_with_other_experts_names_the_first_file(tmp_path: Path) -> None:
    dense = np.array([[0.3, 0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]])
    files = [write_layer_csv(tmp_path / f"layer{n}.csv", dense) for n in (0, 1)]
    files.append(write_layer_csv(tmp_path / "layer2.csv", dense[:, :3]))
    with pytest.raises(TraceError, match=r"layer2.csv: 3 expert columns, but \S+/layer0.csv has 4$"):
        import_csv(files)
    # 3 tokens of top-2: the counts named are rows, never k
    dense = np.array([[0.3, 0.6, 0.0], [0.0, 0.5, 0.2], [0.1, 0.0, 0.9]])
    files = [write_layer_csv(tmp_path / f"layer{n}.csv", dense) for n in (0, 1)]
    files.append(write_layer_csv(tmp_path / "layer2.csv", dense[:1]))
    with pytest.raises(TraceError, match=r"layer2.csv: 1 rows, but \S+/layer0.csv has 3: layers must list the same"):
        import_csv(files)


def test_csv_row_selecting_more_than_k_names_the_row_that_set_k(tmp_path: Path) -> None:
    two = np.array([[0.3, 0.6, 0.0], [0.0, 0.5, 0.2]])
    files = [write_layer_csv(tmp_path / f"layer{n}.csv", two) for n in (0, 1)]
    files.append(write_layer_csv(tmp_path / "layer2.csv", np.array([[0.3, 0.6, 0.0], [0.2, 0.5, 0.3]])))
    with pytest.raises(TraceError, match=r"layer2.csv: line 3 selects 3 experts, but \S+/layer0.csv line 2 selects 2"):
        import_csv(files)


def test_csv_token_ids_differing_name_the_first_file(tmp_path: Path) -> None:
    dense = np.array([[0.6, 0.4], [0.3, 0.7]])
    files = [write_layer_csv(tmp_path / f"layer{n}.csv", dense, np.array([0, 1])) for n in (0, 1)]
    files.append(write_layer_csv(tmp_path / "layer2.csv", dense, np.array([0, 9])))
    with pytest.raises(TraceError, match=r"layer2.csv: line 3: token_id 9 differs from \S+/layer0.csv \(1\)"):
        import_csv(files)


def test_csv_no_files_is_one_line() -> None:
    with pytest.raises(TraceError, match="^no layer CSV files given$"):
        import_csv_layers([])
    with pytest.raises(TraceError, match="^no layer CSV files given$"):  # was an IndexError
        import_csv([])


@pytest.mark.parametrize("others, named", [
    (["a.csv", "b.csv", "c.csv"], "a.csv, b.csv, c.csv beside"),
    (["a.csv", "b.csv", "c.csv", "d.csv", "e.csv"], "a.csv, b.csv, c.csv and 2 more beside"),
])
def test_csv_dir_names_three_other_csv_files_and_counts_the_rest(tmp_path: Path, others: list[str], named: str) -> None:
    write_layer_csv(tmp_path / "layer0.csv", np.array([[0.6, 0.4]]))
    for name in others:
        (tmp_path / name).write_text("x\n1\n")
    with pytest.raises(TraceError, match=re.escape(f"{tmp_path}: {named} the layerN.csv files")):
        import_csv([tmp_path])


def test_csv_files_with_a_layer_number_twice_name_that_number(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    files = [write_layer_csv(tmp_path / name, np.array([[0.6, 0.4]])) for name in ("layer1.csv", "layer2.csv", "a/layer2.csv")]
    with pytest.raises(TraceError, match=r"layer2.csv, \S+/a/layer2.csv: the same layer number 2 twice"):
        import_csv(files)


# --- found by a bad-input sweep of `moeplace import` (each: traceback, hang, lost input or silence) --


def test_output_onto_a_file_read_from_an_input_directory_is_refused(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `-o DIR/layer1.csv` (or a link to it, or DIR/tokens.txt) replaced that input with the
    trace, exit 0: the data was lost and DIR no longer imported. A dump directory's x.pt alike."""
    data = _layer_dir(tmp_path / "flame", ["layer0.csv", "layer1.csv"])
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    # an input's own name is not .npz (refused by the option); a link named .npz to one is refused here
    for out in (data / "layer1.csv", data / "tokens.txt"):
        assert "name it .npz" in _cli_error(capsys, "import", "csv", str(data), "-o", str(out))
    (tmp_path / "link.npz").symlink_to(data / "layer0.csv")
    err = _cli_error(capsys, "import", "csv", str(data), "-o", str(tmp_path / "link.npz"))
    assert err.endswith(f"is inside the input directory {data}, where this import reads .csv and tokens.txt "
                        "files: write the output elsewhere"), err
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert run(["import", "csv", str(data), "-o", str(data / "trace.npz"), "-q"]) == 0  # a name it never reads
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    _per_token_dumps(dumps)
    dump = next(dumps.glob("*.pt"))
    (tmp_path / "dump-link.npz").symlink_to(dump)
    before = dump.read_bytes()
    assert "where this import reads .pt files" in _cli_error(capsys, "import", "sglang", str(dumps), "-o",
                                                              str(tmp_path / "dump-link.npz"))
    assert dump.read_bytes() == before


def test_csv_edge_cases_found_by_the_sweep_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o.npz")
    big_id = tmp_path / "big_id.csv"  # before: internal error (OverflowError), exit 3
    big_id.write_text("token_id,expert_0,expert_1\n1,0.5,0.5\n99999999999999999999,0.5,0.5\n")
    assert _cli_error(capsys, "import", "csv", str(big_id), "-o", out).endswith(
        "line 3: token_id 99999999999999999999 out of range (above 2^63)")
    superscript = tmp_path / "sup.csv"  # before: internal error ('²'.isdigit() is True, int('²') fails)
    superscript.write_text("expert_0,expert_\u00b2,expert_1\n0.5,0,0.5\n")
    assert "expert columns must be named expert_0..expert_N" in _cli_error(capsys, "import", "csv", str(superscript),
                                                                          "-o", out)
    wide = tmp_path / "wide.csv"  # before: a quadratic duplicate check, minutes with no word
    wide.write_text(",".join(f"expert_{e}" for e in range(70_000)) + "\n" + ",".join(["0"] * 69_999 + ["1"]) + "\n")
    assert "70000 expert columns, more than the 65536 experts a trace may have" in _cli_error(
        capsys, "import", "csv", str(wide), "-o", out)
    a = write_layer_csv(tmp_path / "a.csv", np.eye(4)[[0, 1, 2]])
    (tmp_path / "b.csv").symlink_to(a)  # before: a 2-layer trace whose layers were one file
    for twice in ([a, a], [a, tmp_path / "b.csv"]):
        assert "given twice" in _cli_error(capsys, "import", "csv", *map(str, twice), "-o", out)
    assert _cli_error(capsys, "import", "csv", str(a), "-k", "9", "-o", out).endswith(
        "top-9 asked (-k), but the file has 4 experts")
    gz = tmp_path / "g.csv"
    gz.write_bytes(gzip.compress(a.read_bytes()))
    assert _cli_error(capsys, "import", "csv", str(gz), "-o", out).endswith(
        "not UTF-8 text (it looks like gzip-compressed (decompress it first))")
    assert not Path(out).exists()


def test_a_layer_file_that_cannot_be_read_is_named_not_dropped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a broken layer0.csv link or a directory named layer2.csv was skipped: a trace of the
    other layers, exit 0, no word."""
    data = _layer_dir(tmp_path / "d", ["layer0.csv", "layer1.csv"])
    (data / "layer0.csv").unlink()
    (data / "layer0.csv").symlink_to(tmp_path / "gone.csv")
    out = str(tmp_path / "o.npz")
    assert _cli_error(capsys, "import", "csv", str(data), "-o", out).endswith(
        "layer0.csv: a broken link (its target does not exist)")
    (data / "layer0.csv").unlink()
    (data / "layer2.csv").mkdir()
    assert _cli_error(capsys, "import", "csv", str(data), "-o", out).endswith(
        "layer2.csv: a directory named like a layer file")
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)  # before: "no such file"; never opened (it would block)
    assert _cli_error(capsys, "import", "csv", str(fifo), "-o", out).endswith(
        "pipe.csv: not a regular file (a pipe or device); give a file (give one directory, or layer CSV files)")


def test_exflow_files_that_are_not_npy_say_what_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: numpy's "contains pickled (object) data ... allow_pickle=True" for a text or gzip file."""
    text, gz = tmp_path / "t.npy", tmp_path / "g.npy"
    text.write_text("0,1\n2,3\n")
    gz.write_bytes(gzip.compress(b"\x93NUMPY"))
    out = str(tmp_path / "o.npz")
    assert _cli_error(capsys, "import", "exflow", str(text), "-o", out).endswith(f"{text}: not a .npy file (no NUMPY header)")
    assert _cli_error(capsys, "import", "exflow", str(gz), "-o", out).endswith(
        "not a .npy file (no NUMPY header); it looks like gzip-compressed (decompress it first)")


class _Getcwd:
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return os.getcwd, ()  # harmless, but a global that only real unpickling can call


def test_sglang_dumps_the_sweep_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "o.npz")
    legacy = tmp_path / "legacy.pt"  # a pickle that would call a function: refused, naming it
    legacy.write_bytes(pickle.dumps({"records": _Getcwd()}, protocol=2))
    assert re.search(r"refused: loading needs unpickling of arbitrary Python objects \(it holds \w+\.getcwd\)",
                     _cli_error(capsys, "import", "sglang", str(legacy), "-o", out))
    proto4 = tmp_path / "p4.pt"  # before: torch's UserWarning and its source line above the error
    proto4.write_bytes(pickle.dumps({"records": _Getcwd()}, protocol=4))
    _cli_error(capsys, "import", "sglang", str(proto4), "-o", out)  # checks one line
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    _per_token_dumps(dumps)
    (dumps / "sub.pt").mkdir()  # before: "no such file" for a directory the glob matched
    (dumps / "._x.pt").write_bytes(b"\x00\x05\x16\x07")  # a macOS copy's resource fork: skipped as csv does
    assert run(["import", "sglang", str(dumps), "-q", "-o", out]) == 0
    assert load_trace(out).num_tokens == 4


def test_a_npy_output_name_is_refused_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: import and trace wrote an .npz archive under a .npy name, exit 0; every reader then
    took it for an ExFlow array and refused it ("an .npz archive named .npy")."""
    a = write_layer_csv(tmp_path / "a.csv", np.eye(4)[[0, 1, 2]])
    for argv in (["import", "csv", str(a)], ["trace", "--model", str(tmp_path / "none"), "--data", str(a)]):
        err = _cli_error(capsys, *argv, "-o", str(tmp_path / "t.NPY"))
        assert "this writes an .npz archive, and a .npy name is read as an ExFlow array by every stage: name it .npz" in err
    assert not (tmp_path / "t.NPY").exists()
