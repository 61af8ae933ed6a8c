"""Bad input at the command line (solve, eval, check, import): one clear line on stderr, exit 2.

Every case runs the real CLI entry point; a traceback would escape `run` and fail the test.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import moeplace.eval.cli as eval_cli
from moeplace.cli import run
from moeplace.errors import MoeplaceError
from moeplace.io import looks_like, read_yaml
from moeplace.models.checkpoint import CheckpointError, open_checkpoint, read_safetensors_header
from moeplace.placement import Placement
from moeplace.trace.format import load_trace, make_trace, save_trace
from moeplace.trace.text import validate

Setup = Callable[[Path], list[str]]


def _trace(tmp: Path, layers: int = 4, name: str = "t.npz", tokens: int = 16) -> Path:
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    save_trace(make_trace(ids, num_experts=8), tmp / name)
    return tmp / name


def _placement(tmp: Path, layers: int = 4) -> Path:
    Placement(np.tile(np.arange(8) // 2, (layers, 1)), 4, 2).save(tmp / "p.json")
    return tmp / "p.json"


def _json(tmp: Path, doc: object, name: str = "p.json") -> Path:
    (tmp / name).write_text(json.dumps(doc))
    return tmp / name


def _text(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text)
    return tmp / name


def _npz(tmp: Path, name: str, **arrays: np.ndarray) -> Path:
    with open(tmp / name, "wb") as f:
        np.savez(f, **arrays)
    return tmp / name


def _npz_compressed(tmp: Path, name: str, **arrays: np.ndarray) -> Path:
    with open(tmp / name, "wb") as f:
        np.savez_compressed(f, **arrays)
    return tmp / name


def _zip(tmp: Path, name: str, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(tmp / name, "w") as z:
        for member, data in members.items():
            z.writestr(member, data)
    return tmp / name


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _npy_header_lies(tmp: Path, shape: bytes = b"'shape': (9999999999999, 8)") -> Path:
    np.save(tmp / "e.npy", np.zeros((100, 8), dtype=np.int64))
    data = (tmp / "e.npy").read_bytes()
    (tmp / "e.npy").write_bytes(data.replace(b"'shape': (100, 8)", shape))
    return tmp / "e.npy"


def _corrupt(path: Path, member: str = "topk_ids.npy") -> Path:
    """Flip 40 bytes inside one member's compressed data: the archive's directory stays intact, so
    opening succeeds and decompressing that member fails (zlib.error, or a CRC mismatch)."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    data = bytearray(path.read_bytes())
    at = info.header_offset
    start = at + 30 + int.from_bytes(data[at + 26:at + 28], "little") + int.from_bytes(data[at + 28:at + 30], "little")
    mid = start + info.compress_size // 2
    data[mid:mid + 40] = bytes(b ^ 0xFF for b in data[mid:mid + 40])
    path.write_bytes(bytes(data))
    return path


def _torch_save(tmp: Path, name: str, obj: object) -> Path:
    import torch

    torch.save(obj, tmp / name)
    return tmp / name


def _good_placement_doc() -> dict:
    return Placement(np.tile(np.arange(8) // 2, (4, 1)), 4, 2).to_json()


def _eval(placement: Callable[[Path], Path], trace: Callable[[Path], Path] = _trace) -> Setup:
    return lambda tmp: ["eval", str(placement(tmp)), str(trace(tmp))]


def _record(layers: int, fill: int = 0) -> dict:
    import torch

    return {"forward_pass_id": 0, "rank": 0, "input_ids": [1], "positions": [0],
            "topk_ids_of_layer": torch.full((layers, 1, 8), fill, dtype=torch.int32)}


CSV_HEADER = "token_id,expert_0,expert_1,expert_2,expert_3\n"


def _position_folders(tmp: Path, layers: dict[str, list[int]]) -> Path:
    """FLAME-style dir: a folder per position holding layerN.csv files."""
    for folder, numbers in layers.items():
        (tmp / "trace" / folder).mkdir(parents=True)
        for n in numbers:
            _text(tmp / "trace" / folder, f"layer{n}.csv", CSV_HEADER + "0,0.5,0.5,0,0\n")
    return tmp / "trace"

EVAL_CASES: list[tuple[str, Setup, str]] = [
    ("placement-missing", _eval(lambda t: t / "none.json"), "none.json: no such file"),
    ("placement-not-json", _eval(lambda t: _text(t, "p.json", "{oops")), "not valid JSON"),
    ("placement-wrong-format", _eval(lambda t: _json(t, {"format": "other"})), "not a moeplace placement"),
    ("placement-other-model", _eval(lambda t: _placement(t, layers=3)),
     "placement is for 3 MoE layers x 8 experts, but the trace has 4 x 8"),
    ("placement-gpu-out-of-range", _eval(lambda t: _json(t, {**_good_placement_doc(), "num_gpus": 2, "gpus_per_node": 2})),
     "outside [0, 2)"),
    ("placement-ragged", _eval(lambda t: _json(t, {**_good_placement_doc(), "expert_to_gpu": [[0, 1], [0]]})),
     "malformed expert_to_gpu"),
    ("trace-truncated", _eval(_placement, lambda t: _truncated(_trace(t))), "truncated or not an .npz file"),
    ("trace-empty", _eval(_placement, lambda t: _text(t, "t.npz", "")), "file is empty"),
    ("trace-id-out-of-range", _eval(_placement, lambda t: _npz(t, "t.npz", topk_ids=np.array([[[0, 9]] * 4]),
                                                                 num_experts=np.array(8))), "expert id 9 out of range"),
    # eval scores a placement on loads (balance only): a traffic gate on them is the error
    ("trace-is-loads-only", lambda t: [*_eval(_placement, lambda t: _npz(t, "t.npz", expert_loads=np.ones((4, 8))))(t),
                                       "--max-cross-gpu", "0.5"], "load-only"),
    ("check-config-missing", lambda t: ["check", str(t / "ci.yaml")], "ci.yaml: no such file"),
    # found by an adversarial pass (2026-11-23): each was a traceback or a silent acceptance
    ("trace-member-not-npy", _eval(_placement, lambda t: _zip(t, "t.npz", {"topk_ids.npy": b"junk"})),
     "member 'topk_ids' is not a .npy array"),
    ("trace-text-named-npz", _eval(_placement, lambda t: _text(t, "t.npz", "hello, not an archive")),
     "not an .npz file (no zip archive signature)"),
    # a file in the wrong place says what it looks like (found by a fresh-eyes tour, 2026-11-23)
    ("eval-arguments-swapped", lambda t: ["eval", str(_trace(t)), str(_placement(t))],
     "t.npz: not JSON but a zip archive (an .npz trace?): is it the right file, or are two arguments swapped?"),
    ("solve-a-layer-csv", lambda t: ["solve", str(_text(t, "layer2.csv", CSV_HEADER + "0,0.5,0.5,0,0\n")),
                                     "--gpus", "2", "-o", str(t / "p.json")],
     "layer2.csv: not an .npz file (no zip archive signature; it looks like CSV (per-token gate weights, one file per layer? `moeplace import csv` converts those))"),
    ("analyze-a-placement", lambda t: ["analyze", str(_placement(t)), "-o", str(t / "report")],
     "p.json: not an .npz file (no zip archive signature; it looks like JSON (a placement?))"),
    ("trace-float-positions", _eval(_placement, lambda t: _npz(t, "t.npz", topk_ids=np.zeros((3, 4, 1), np.int64),
                                                                num_experts=np.array(8), positions=np.arange(3) + 0.5)),
     "positions must be integers"),
    ("trace-inf-weight", _eval(_placement, lambda t: _npz(t, "t.npz", topk_ids=np.zeros((3, 4, 1), np.int64),
                                                           topk_weights=np.full((3, 4, 1), np.inf), num_experts=np.array(8))),
     "topk_weights contains NaN or infinite values"),
    ("trace-absurd-num-experts", _eval(_placement, lambda t: _npz(t, "t.npz", topk_ids=np.zeros((3, 4, 1), np.int64),
                                                                   num_experts=np.array(10**12))),
     "num_experts must be in [1, 65536]"),
    ("placement-float-count", _eval(lambda t: _json(t, {**_good_placement_doc(), "gpus_per_node": 1.5})),
     "gpus_per_node must be a positive integer, got 1.5"),
    ("placement-bool-gpu", _eval(lambda t: _json(t, {**_good_placement_doc(),
                                                     "expert_to_gpu": [[True] + [0] * 7] + [[0] * 8] * 3})),
     "expert_to_gpu must be a list of lists of integer GPU ids"),
    ("placement-negative-split-seed", _eval(lambda t: _json(t, {**_good_placement_doc(),
                                                                "split": {"train_fraction": 0.5, "seed": -1}})),
     "integer seed >= 0"),
    ("placement-is-a-directory", _eval(lambda t: (t / "pdir").mkdir() or t / "pdir"), "is a directory"),
    ("eval-nan-threshold", lambda t: ["eval", str(_placement(t)), str(_trace(t)), "--max-cross-gpu", "nan"],
     "'--max-cross-gpu': 'nan' is not a finite number"),
    # found by a code review: zlib.error escaped every .npz reader but export's (an internal error)
    ("trace-corrupt-member", _eval(_placement, lambda t: _corrupt(_trace(t, tokens=400))),
     "t.npz: member 'topk_ids' is corrupt or truncated"),
    ("analyze-corrupt-member", lambda t: ["analyze", str(_corrupt(_trace(t, tokens=400))), "-o", str(t / "a"),
                                          "--no-figures", "--no-solve"], "t.npz: member 'topk_ids' is corrupt or truncated"),
    ("loads-corrupt-member", lambda t: ["analyze", str(_corrupt(_npz_compressed(t, "l.npz", expert_loads=np.ones((40, 64))),
                                                                "expert_loads.npy")), "-o", str(t / "a"), "--no-figures"],
     "l.npz: member 'expert_loads' is corrupt or truncated"),
    ("eplb-corrupt-member", lambda t: ["export", "--from", "eplb",
                                       str(_corrupt(_npz_compressed(t, "e.npz", phy2log=np.arange(4096).reshape(4, -1) % 8),
                                                    "phy2log.npy")), "--gpus", "4", "-o", str(t / "x.json")],
     "e.npz: member 'phy2log' is corrupt or truncated"),
    ("placement-solver-not-object", _eval(lambda t: _json(t, {**_good_placement_doc(), "solver": "x"})),
     "p.json: 'solver' must be a JSON object or null, got 'x'"),
    ("check-nan-threshold", lambda t: ["check", str(_text(t, "ci.yaml", f"checks:\n- placement: {_placement(t)}\n"
                                                                   f"  trace: {_trace(t)}\n  max_cross_gpu: .nan\n"))],
     "max_cross_gpu must be a non-negative number, got nan"),
]

IMPORT_CASES: list[tuple[str, Setup, str]] = [
    ("csv-missing", lambda t: ["import", "csv", str(t / "nodir"), "-o", str(t / "o.npz")], "no such file"),
    ("csv-truncated-row", lambda t: ["import", "csv", str(_text(t, "layer0.csv", CSV_HEADER + "0,0.5,0.5,0,0\n1,0.5,0.5\n")),
                                     "-o", str(t / "o.npz")], "line 3 has 3 fields, header has 5 (truncated?)"),
    ("csv-wrong-columns", lambda t: ["import", "csv", str(_text(t, "layer0.csv", "token_id,a,b\n0,1,2\n")),
                                     "-o", str(t / "o.npz")], "no 'expert_N' columns"),
    ("csv-bad-expert-names", lambda t: ["import", "csv", str(_text(t, "layer0.csv", "expert_a,expert_b\n1,0\n")),
                                        "-o", str(t / "o.npz")], "expert columns must be named"),
    ("csv-not-a-number", lambda t: ["import", "csv", str(_text(t, "layer0.csv", CSV_HEADER + "0,0.5,x,0,0\n")),
                                    "-o", str(t / "o.npz")], "line 2: could not convert"),
    ("csv-empty", lambda t: ["import", "csv", str(_text(t, "layer0.csv", "")), "-o", str(t / "o.npz")], "no data rows"),
    ("csv-mismatched-layers", lambda t: ["import", "csv", str(_text(t, "layer0.csv", CSV_HEADER + "0,0.5,0.5,0,0\n")),
                                         str(_text(t, "layer1.csv", CSV_HEADER + "0,0.5,0.5,0,0\n1,0.5,0.5,0,0\n")),
                                         "-o", str(t / "o.npz")], "2 rows, but"),
    ("csv-folders-disagree", lambda t: ["import", "csv", str(_position_folders(t, {"1st": [0, 1], "2nd": [0]})),
                                        "-o", str(t / "o.npz")], "layers [0] differ"),
    ("csv-dir-without-layers", lambda t: ["import", "csv", str(t), "-o", str(t / "o.npz")], "no layerN.csv files"),
    ("exflow-3d", lambda t: (np.save(t / "e.npy", np.zeros((2, 2, 2), np.int64)),
                             ["import", "exflow", str(t / "e.npy"), "-o", str(t / "o.npz")])[1], "[tokens, moe_layers]"),
    ("exflow-pickled", lambda t: (np.save(t / "e.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
                                  ["import", "exflow", str(t / "e.npy"), "-o", str(t / "o.npz")])[1], "not a plain numeric"),
    # a damaged header declaring 582 TiB: numpy would try to allocate it (MemoryError); a cut-off file
    ("exflow-header-declares-too-much", lambda t: ["import", "exflow", str(_npy_header_lies(t)), "-o", str(t / "o.npz")],
     "truncated .npy (its header declares more data than the file holds)"),
    ("exflow-cut-off", lambda t: ["import", "exflow", str(_truncated(_exflow(t))), "-o", str(t / "o.npz")],
     "truncated .npy (its header declares more data than the file holds)"),
    ("exflow-garbled-header", lambda t: ["import", "exflow", str(_npy_header_lies(t, b"'shape': (100, 8")),
                                         "-o", str(t / "o.npz")], "truncated or unreadable .npy (TokenError"),
    ("exflow-floats", lambda t: (np.save(t / "e.npy", np.zeros((2, 2))),
                                 ["import", "exflow", str(t / "e.npy"), "-o", str(t / "o.npz")])[1], "must be integers"),
    ("exflow-num-experts-too-small", lambda t: (np.save(t / "e.npy", np.array([[0, 5]])),
                                                ["import", "exflow", str(t / "e.npy"), "--num-experts", "4",
                                                 "-o", str(t / "o.npz")])[1], "--num-experts 4, but its expert ids go up to 5"),
    ("exflow-suffix", lambda t: ["import", "exflow", str(_text(t, "e.txt", "0 1")), "-o", str(t / "o.npz")], "is a .npy file"),
    ("sglang-arbitrary-object", lambda t: ["import", "sglang", str(_torch_save(t, "d.pt", {"records": [], "x": Path("a")})),
                                           "-o", str(t / "o.npz")], "refused: loading needs unpickling"),
    ("sglang-truncated", lambda t: ["import", "sglang", str(_truncated(_torch_save(t, "d.pt", {"records": [_record(2)]}))),
                                    "-o", str(t / "o.npz")], "truncated or not a torch.save file"),
    ("sglang-not-torch", lambda t: ["import", "sglang", str(_text(t, "d.pt", "hello")), "-o", str(t / "o.npz")],
     "not a torch.save file"),
    ("sglang-wrong-keys", lambda t: ["import", "sglang", str(_torch_save(t, "d.pt", {"weights": 1})), "-o", str(t / "o.npz")],
     "not an SGLang expert-distribution dump"),
    ("sglang-mismatched-layers", lambda t: ["import", "sglang", str(_torch_save(t, "d.pt", {"records": [_record(2), _record(3)]})),
                                            "-o", str(t / "o.npz")], "disagree on the number of layers"),
    ("sglang-no-expert", lambda t: ["import", "sglang", str(_torch_save(t, "d.pt", {"records": [_record(2, fill=-1)]})),
                                    "-o", str(t / "o.npz")], "record no expert at any layer"),
    ("sglang-bad-input-ids", lambda t: ["import", "sglang", str(_torch_save(t, "d.pt", {"records": [{**_record(2), "input_ids": 7}]})),
                                        "-o", str(t / "o.npz")], "input_ids: expected an integer array of 1 dimensions"),
    ("sglang-empty-dir", lambda t: ["import", "sglang", str(t), "-o", str(t / "o.npz")], "no .pt files"),
    ("loads-json-no-key", lambda t: ["import", "loads-json", str(_json(t, {"counts": []}, "l.json")), "-o", str(t / "o.npz")],
     "no 'expert_popularity' or 'expert_loads'"),
    ("loads-json-ragged", lambda t: ["import", "loads-json", str(_json(t, {"expert_loads": [[1, 2], [3]]}, "l.json")),
                                     "-o", str(t / "o.npz")], "rectangular"),
    ("loads-json-negative", lambda t: ["import", "loads-json", str(_json(t, {"expert_loads": [[1, -2]]}, "l.json")),
                                       "-o", str(t / "o.npz")], "finite and non-negative"),
    ("loads-json-bool", lambda t: ["import", "loads-json", str(_json(t, {"expert_loads": [[1, True]]}, "l.json")),
                                   "-o", str(t / "o.npz")], "must hold numbers, not true/false"),
    ("loads-json-infinite", lambda t: ["import", "loads-json", str(_text(t, "l.json", '{"expert_loads": [[1, 1e400]]}')),
                                       "-o", str(t / "o.npz")], "finite and non-negative"),
    ("loads-json-bad-token-count", lambda t: ["import", "loads-json", str(_json(t, {"expert_loads": [[1, 2]],
                                                                                     "total_input_tokens": "many"}, "l.json")),
                                              "-o", str(t / "o.npz")], "'total_input_tokens' must be a non-negative integer"),
    ("exflow-absurd-num-experts", lambda t: (np.save(t / "e.npy", np.array([[0, 1]])),
                                             ["import", "exflow", str(t / "e.npy"), "--num-experts", str(10**20),
                                              "-o", str(t / "o.npz")])[1], "num_experts must be in [1, 65536]"),
    ("import-bad-meta", lambda t: ["import", "loads-json", str(_json(t, {"expert_loads": [[1, 2]]}, "l.json")),
                                   "--meta", "novalue", "-o", str(t / "o.npz")], "--meta expects KEY=VALUE"),
    # a copy under another name (or a shard traced twice) was merged, its tokens counted twice; the
    # copy's meta may differ (a re-save): the routing decides
    ("merge-a-copy", lambda t: ["import", "merge", str(_trace(t)),
                                str(_resaved(_trace(t), t / "copy.npz", corpus="shard2")), "-o", str(t / "o.npz")],
     "copy.npz: the same routing as "),
]


def _resaved(path: Path, out: Path, **meta: str) -> Path:
    """The trace at `path` saved again to `out`, its meta extended by `meta`."""
    t = load_trace(path)
    save_trace(replace(t, meta={**t.meta, **meta}), out)
    return out

SOLVE_CASES: list[tuple[str, Setup, str]] = [
    ("solve-truncated-trace", lambda t: ["solve", str(_truncated(_trace(t))), "--gpus", "4", "-o", str(t / "p.json")],
     "truncated or not an .npz file"),
    ("solve-uneven-gpus", lambda t: ["solve", str(_trace(t)), "--gpus", "3", "--gpus-per-node", "1", "-o", str(t / "p.json")],
     "cannot be split equally over 3 GPUs"),
    ("solve-bad-node-size", lambda t: ["solve", str(_trace(t)), "--gpus", "4", "--gpus-per-node", "3", "-o", str(t / "p.json")],
     "not a multiple of --gpus-per-node 3"),
    ("solve-usage-error", lambda t: ["solve", str(_trace(t)), "--gpus", "abc", "-o", str(t / "p.json")],
     "'--gpus' / '-g': 'abc' is not a valid integer"),
    ("solve-corrupt-member", lambda t: ["solve", str(_corrupt(_trace(t, tokens=400))), "--gpus", "4", "-o", str(t / "p.json")],
     "t.npz: member 'topk_ids' is corrupt or truncated"),
    ("solve-too-many-replicas", lambda t: ["solve", str(_npz(t, "l.npz", expert_loads=np.ones((4, 8)))), "--gpus", "4",
                                           "--objective", "balance", "--redundant-experts", "25", "-o", str(t / "p.json")],
     "at most 24 copies fit 4 GPUs"),
]


def _params(cases: list[tuple[str, Setup, str]], marks: tuple = ()) -> list:
    return [pytest.param(setup, message, id=name, marks=marks) for name, setup, message in cases]


@pytest.mark.parametrize(
    "setup, message",
    _params(EVAL_CASES) + _params(IMPORT_CASES)
    + _params(SOLVE_CASES),
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, setup: Setup, message: str, capsys) -> None:
    argv = setup(tmp_path)
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moeplace: error: ") and message in lines[0], lines[0]
    assert not list(tmp_path.glob("o.npz")), "no output may be left behind on error"


def _link(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def _exflow(tmp: Path) -> Path:
    np.save(tmp / "ex.npy", np.random.default_rng(0).integers(0, 8, (16, 4)))
    return tmp / "ex.npy"


@pytest.mark.parametrize("argv", [
    lambda t: ["solve", str(_trace(t)), "--gpus", "4", "-o", str(t / "t.npz")],
    lambda t: ["solve", str(_trace(t)), "--gpus", "4", "-o", str(t / "sub" / ".." / "t.npz")],
    lambda t: ["eval", str(_placement(t)), str(_trace(t)), "-o", str(t / "p.json")],
    lambda t: ["eval", str(_placement(t)), str(_trace(t)), "-o", str(t / "t.npz")],
    lambda t: ["export", str(_placement(t)), "--to", "sglang", "-o", str(t / "p.json")],
    # import writes .npz names only (an input's .csv, .json or ExFlow .npy name is refused as an
    # output name before this check): a link of that name to the input
    lambda t: ["import", "csv", str(_text(t, "layer0.csv", "expert_0,expert_1\n0.6,0.4\n")), "-o",
               str(_link(t / "csv.npz", t / "layer0.csv"))],
    lambda t: ["import", "loads-json", str(_json(t, {"expert_popularity": [[1, 2], [3, 4]]}, "l.json")),
               "-o", str(_link(t / "json.npz", t / "l.json"))],
])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(tmp_path: Path, argv: Callable[[Path], list[str]],
                                                                   capsys) -> None:
    """-o naming a file the run reads would replace it with the result: one line, exit 2, before
    any work, the input byte for byte as it was (also through a `..` path or a symlink)."""
    (tmp_path / "sub").mkdir()
    args = argv(tmp_path)
    target = Path(args[-1]).resolve()
    before = target.read_bytes()
    capsys.readouterr()
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an input of this run" in err[0], err
    assert target.read_bytes() == before
    (tmp_path / "link").symlink_to(target)
    assert run(args[:-1] + [str(tmp_path / "link")]) == 2
    assert target.read_bytes() == before and (tmp_path / "link").is_symlink()


def test_a_yaml_key_given_twice_is_refused(tmp_path: Path, capsys) -> None:
    """PyYAML keeps the last of two equal keys: a repeated gate threshold would loosen it unseen."""
    p = _placement(tmp_path)
    t = _trace(tmp_path)
    ci = _text(tmp_path, "ci.yaml", f"checks:\n- placement: {p}\n  trace: {t}\n  max_cross_gpu: 0.0\n"
                                    "  max_cross_gpu: 0.99\n")
    capsys.readouterr()
    assert run(["check", str(ci)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ci.yaml" in err[0] and "'max_cross_gpu' appears twice" in err[0] and "line 5" in err[0]
    # a `<<:` merge overridden by the mapping's own key is YAML, not a repeat
    merged = _text(tmp_path, "m.yaml", "base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 5\n")
    assert read_yaml(merged)["c"] == {"x": 5, "y": 2}


def test_a_file_is_called_json_or_csv_only_when_it_is_text(tmp_path: Path) -> None:
    """looks_like names what a misplaced file is; random bytes that happen to begin with '[' are
    not 'JSON (a placement?)', while a JSON whose 512th byte cuts a character still is."""
    (tmp_path / "r.bin").write_bytes(b"[" + np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    assert looks_like(tmp_path / "r.bin") is None
    assert looks_like(_text(tmp_path, "p.json", '{"a": "' + "é" * 600 + '"}')) == "JSON (a placement?)"
    assert looks_like(_text(tmp_path, "c.csv", "a,b,c\n1,2,3\n")).startswith("CSV")


DEEP = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit: was "internal error: RecursionError"


def _one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    assert run(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeplace: error: "), err
    return err[0]


def test_deeply_nested_json_and_yaml_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = _trace(tmp_path)
    assert "p.json: not valid JSON (nested too deeply)" in _one_error(capsys, ["eval", str(_text(tmp_path, "p.json", DEEP)), str(t)])
    ci = _text(tmp_path, "ci.yaml", DEEP)
    assert "ci.yaml: not valid YAML (nested too deeply)" in _one_error(capsys, ["check", str(ci)])


def test_placement_with_a_bom_or_a_repeated_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = _trace(tmp_path)
    text = json.dumps(_good_placement_doc())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + text.encode())  # was "not JSON but CSV"
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "bom.json"), str(t), "--all-tokens"]) == 0
    dup = _text(tmp_path, "dup.json", text[:-1] + ', "gpus_per_node": 4}')  # was silently the last
    assert "dup.json: key 'gpus_per_node' appears twice in one object" in _one_error(capsys, ["eval", str(dup), str(t)])


@pytest.mark.parametrize("gpus", [1 << 31, 10**6])
def test_more_gpus_than_expert_copies_is_refused_before_any_work(tmp_path: Path, gpus: int, capsys: pytest.CaptureFixture[str]) -> None:
    """2**31 GPUs: `export --to eplb` looped per GPU for ever, eval ran out of memory; 10**6 GPUs
    for 8 experts was evaluated."""
    p = _json(tmp_path, {**_good_placement_doc(), "num_gpus": gpus})
    message = f"p.json: num_gpus {gpus} exceeds the 8 expert copies of a layer (8 experts): some GPU would hold no expert"
    assert message in _one_error(capsys, ["eval", str(p), str(_trace(tmp_path))])
    assert message in _one_error(capsys, ["export", str(p), "--to", "eplb", "-o", str(tmp_path / "e.json")])
    assert not (tmp_path / "e.json").exists()


@pytest.mark.filterwarnings("error::RuntimeWarning")  # numpy's cast-overflow warning printed two lines
def test_overflowing_weights_and_wide_loads_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = np.stack([np.arange(2) + 2 * (i % 4) for i in range(8)])[:, None, :].repeat(2, axis=1)
    w = np.full(ids.shape, 0.5)
    w[3, 1, 0] = 1e300
    huge = _npz(tmp_path, "w.npz", topk_ids=ids, topk_weights=w, num_experts=np.array(8))
    line = _one_error(capsys, ["analyze", str(huge), "-o", str(tmp_path / "a"), "--no-figures"])
    assert "w.npz: topk_weights holds 1e+300 (stored as float64), beyond the float32 range" in line
    wide = _npz(tmp_path, "l.npz", expert_loads=np.ones((1, (1 << 16) + 1), np.uint8))
    line = _one_error(capsys, ["analyze", str(wide), "-o", str(tmp_path / "a"), "--no-figures"])
    assert "l.npz: num_experts must be in [1, 65536], got 65537" in line


@pytest.mark.parametrize("error, message", [
    (RecursionError, "moeplace: error: input nested too deeply in {p}, {t}"),
    (MemoryError, "moeplace: error: out of memory reading or processing {p}, {t} (is the input far larger"),
])
def test_the_last_resort_lines_name_the_input_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], error: type,
                                                    message: str) -> None:
    """A RecursionError a reader missed was exit 3 "internal error"; out of memory named no file.
    The output (-o, here an existing file) is not an input and is not named."""
    def fail(path: object) -> None:
        raise error()

    p, t, out = _placement(tmp_path), _trace(tmp_path), _text(tmp_path, "old.json", "{}")
    monkeypatch.setattr(eval_cli, "load_placement", fail)
    line = _one_error(capsys, ["eval", str(p), str(t), "-o", str(out)])
    assert line.startswith(message.format(p=p, t=t)) and "old.json" not in line, line


def test_deep_json_in_text_data_and_checkpoints(tmp_path: Path) -> None:
    """The JSONL text reader and the safetensors header and index readers: one-line errors."""

    data = _text(tmp_path, "d.jsonl", '{"text": "ok"}\n' + DEEP + "\n")
    with pytest.raises(MoeplaceError, match=r"d.jsonl:2: not a JSON line \(nested too deeply\)"):
        validate([data])
    header = DEEP.encode()
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=r"m.safetensors: malformed safetensors header \(nested too deeply\)"):
        read_safetensors_header(tmp_path / "m.safetensors")
    _json(tmp_path, {"model_type": "mixtral"}, "config.json")
    _text(tmp_path, "model.safetensors.index.json", DEEP)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: malformed shard index .*nested too deeply"):
        open_checkpoint(tmp_path)


def test_a_missing_file_names_a_close_sibling(tmp_path: Path, capsys) -> None:
    """A typo of a file beside it gets its name (the tour's configs/cluster/h100-1x4.yaml); nothing
    close: plain "no such file"."""
    (tmp_path / "h100-1x4-nvlink.yaml").write_text("cluster: {}\n")
    trace = _trace(tmp_path)
    assert run(["solve", str(trace), "--gpus", "4", "--cluster", str(tmp_path / "h100-1x4.yaml"), "-o",
                str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.strip() == (f"moeplace: error: --cluster {tmp_path / 'h100-1x4.yaml'}: no such file; "
                                               f"did you mean {tmp_path / 'h100-1x4-nvlink.yaml'}?")
    assert run(["solve", str(tmp_path / "zzz.npz"), "--gpus", "4", "-o", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("zzz.npz: no such file")
