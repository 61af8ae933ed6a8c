"""Importers: traces of other tools into the v1 trace format, and load-only inputs.

Dense CSV layers ("one CSV per layer, one row per token, one column per expert"): each row holds
the gate probability of every expert, zero for those not selected; the non-zero entries are the
token's top-k. The FLAME-MoE decoder traces are a directory of such layer sets, one per decode
position.

SGLang expert-distribution recorder dumps (`.pt`, read with torch.load(weights_only=True)):
`per_token` mode -> Trace, `stat` mode -> ExpertLoads. Per-layer count JSON (fiddler's Mixtral
`expert_popularity`) -> ExpertLoads. docs/import.md gives every layout with its source.
"""

from __future__ import annotations

import csv
import hashlib
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from moeplace.errors import TraceError, warn
from moeplace.io import file_key, looks_like, not_a_file, read_json
from moeplace.progress import Progress
from moeplace.trace.format import MAX_EXPERTS, MAX_LOAD, ExpertLoads, Trace, make_loads, make_trace

# The whole name: `copy_of_layer3.csv` is not layer 3 (searching the name made it a second one)
_LAYER_FILE = re.compile(r"layer[_-]?(\d+)\.csv")


def _csv_rows(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """(header, data rows, line number of each row): lines count from 1 at the header.

    Trailing blank lines are ignored; a blank line inside the table is an error (a lost row).
    """
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            start = 1
            for row in reader:
                rows.append(row)
                lines.append(start)  # a quoted field may span lines: name the row's first one
                start = reader.line_num + 1
    except UnicodeDecodeError as e:
        what = looks_like(path)
        raise TraceError(f"{path}: not UTF-8 text " + (f"(it looks like {what})" if what else
                         f"(byte {e.start}: {e.reason}); save it as UTF-8")) from None
    except (OSError, csv.Error) as e:
        raise TraceError(f"{path}: unreadable CSV ({e})") from None
    while rows and not rows[-1]:
        rows.pop()
        lines.pop()
    if len(rows) < 2:
        raise TraceError(f"{path}: no data rows")
    blank = next((i for i, row in enumerate(rows) if not row), None)
    if blank is not None:
        if _stray_carriage_return(path):  # csv reads CR CR LF as two line ends: every other row "blank"
            raise TraceError(f"{path}: lines end in CR CR LF (a stray carriage return, e.g. a Windows file "
                             "converted twice); strip it, e.g. `tr -d '\\r' < IN > OUT`")
        raise TraceError(f"{path}: line {lines[blank]} is blank inside the table (a lost row?)")
    return rows[0], rows[1:], lines[1:]


def _stray_carriage_return(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\r\r\n" in f.read(1 << 20)


def read_dense_csv(path: Path, expert_prefix: str = "expert_") -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """One layer file -> (gate weights float [rows, E], row token ids int [rows] or None, line of each row)."""
    header, body, lines = _csv_rows(path)
    cols = [i for i, h in enumerate(header) if h.startswith(expert_prefix)]
    if not cols:
        raise TraceError(f"{path}: no '{expert_prefix}N' columns in the header")
    if len(cols) > MAX_EXPERTS:
        raise TraceError(f"{path}: {len(cols)} expert columns, more than the {MAX_EXPERTS} experts a trace may have")
    suffixes = [header[i][len(expert_prefix):] for i in cols]
    if not all(x.isascii() and x.isdigit() for x in suffixes):  # str.isdigit alone passes '²'
        raise TraceError(f"{path}: expert columns must be named {expert_prefix}0..{expert_prefix}N")
    experts = [int(x) for x in suffixes]
    repeated = sorted(e for e, n in Counter(experts).items() if n > 1)  # a count per column was quadratic
    if repeated:
        raise TraceError(f"{path}: column {expert_prefix}{repeated[0]} appears more than once in the header")
    missing = sorted(set(range(max(experts) + 1)) - set(experts))
    if missing:
        names = ", ".join(f"{expert_prefix}{e}" for e in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TraceError(f"{path}: no column {names} (expert columns go from {expert_prefix}0 to {expert_prefix}{max(experts)})")
    tok_col = header.index("token_id") if "token_id" in header else None
    short = next((r for r, row in enumerate(body) if len(row) != len(header)), None)
    if short is not None:
        raise TraceError(f"{path}: line {lines[short]} has {len(body[short])} fields, header has {len(header)} (truncated?)")
    dense = np.zeros((len(body), len(cols)))
    try:  # fast path: numpy parses the whole table when every column is numeric
        dense[:, experts] = np.array(body, dtype=np.float64)[:, cols]
        tok = np.array([row[tok_col] for row in body], dtype=np.int64) if tok_col is not None else None
    except (ValueError, OverflowError):  # other text columns, or a bad value: row by row, naming the bad line
        tok = np.zeros(len(body), dtype=np.int64) if tok_col is not None else None
        for r, row in enumerate(body):
            try:
                dense[r, experts] = [float(row[i]) for i in cols]
                if tok is not None and tok_col is not None:
                    tok[r] = int(row[tok_col])
            except ValueError as e:
                raise TraceError(f"{path}: line {lines[r]}: {e}") from None
            except OverflowError:  # past int64 (floats overflow to inf, not this)
                raise TraceError(f"{path}: line {lines[r]}: token_id {row[tok_col or 0]} out of range (above 2^63)") from None
    return dense, tok, lines


def dense_to_topk(
    dense: np.ndarray, k: int | None, name: str, lines: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Dense gate weights [T, E] -> (ids [T, k], weights [T, k]) sorted by weight, highest first.

    `lines`: the file line of each row, so that errors name "line N" as the CSV reader does.
    """
    where = lambda r: f"line {lines[r]}" if lines is not None else f"row {r}"  # noqa: E731
    bad = ~np.isfinite(dense) | (dense < 0)
    if bad.any():
        raise TraceError(f"{name}: {where(int(np.argmax(bad.any(axis=1))))}: gate weights must be finite and non-negative")
    nnz = (dense > 0).sum(axis=1)
    if k is None:
        k = int(nnz.max())
    if k == 0:
        raise TraceError(f"{name}: no row selects any expert (all gate weights are 0)")
    if k > dense.shape[1]:
        raise TraceError(f"{name}: top-{k} asked (-k), but the file has {dense.shape[1]} experts")
    if (nnz < k).any():
        r = int(np.argmax(nnz < k))
        n = int(nnz[r])
        raise TraceError(f"{name}: {where(r)} selects {n} expert{'' if n == 1 else 's'}, expected top-{k} "
                         "(truncated, or fewer non-zero weights?)")
    ids = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(dense, ids, axis=1)


def import_csv_layers(
    files: Sequence[Path], k: int | None = None, on_file: Callable[[Path], None] | None = None,
    explicit: bool | None = None, k_from: tuple[Path, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, tuple[Path, int] | None]:
    """Layer files (in layer order) -> ids [T, L, k], weights [T, L, k], row token ids [T], experts E,
    and (file, line) of the row that set k.

    An explicit k (the user's -k; default: k given) keeps each row's k highest entries. Otherwise
    k is the most non-zero entries of any row and every row must have that many: a row read after
    k was set (by the first file, or `k_from` of an earlier call) with more is refused, not cut.
    """
    explicit = k is not None if explicit is None else explicit
    ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    row_ids: np.ndarray | None = None
    num_experts = 0
    for path in files:
        dense, tok, lines = read_dense_csv(path)
        if on_file is not None:
            on_file(path)
        if ids and dense.shape[1] != num_experts:
            raise TraceError(f"{path}: {dense.shape[1]} expert columns, but {files[0]} has {num_experts}")
        num_experts = dense.shape[1]
        if not explicit and k is not None:
            nnz = (dense > 0).sum(axis=1)
            if (nnz > k).any():
                r = int(np.argmax(nnz > k))
                assert k_from is not None  # set with k, by the first file read
                src, src_line = k_from
                raise TraceError(f"{path}: line {lines[r]} selects {int(nnz[r])} experts, but {src} line {src_line} "
                                 f"selects {k}: without -k every row must select the same number (the most in any "
                                 f"row); give -k to keep each row's k highest")
        i, w = dense_to_topk(dense, k, str(path), lines)
        if k is None:
            k_from = (path, lines[0])
        k = i.shape[1]
        if ids and i.shape[0] != ids[0].shape[0]:
            raise TraceError(f"{path}: {i.shape[0]} rows, but {files[0]} has {ids[0].shape[0]}: layers must list the same tokens")
        if row_ids is not None and tok is not None and not np.array_equal(tok, row_ids):
            r = int(np.argmax(tok != row_ids))
            raise TraceError(f"{path}: line {lines[r]}: token_id {tok[r]} differs from {files[0]} ({row_ids[r]}): "
                             "rows are not the same tokens")
        row_ids = tok if row_ids is None else row_ids
        ids.append(i)
        weights.append(w)
    if not ids:
        raise TraceError("no layer CSV files given")
    return np.stack(ids, axis=1), np.stack(weights, axis=1).astype(np.float32), row_ids, num_experts, k_from


def layer_files(directory: Path) -> list[tuple[int, Path]]:
    """`layerN.csv` files of a directory, sorted by N ([] when it holds none).

    A directory holding them is read whole, as one token set: another `.csv` beside them (a copy
    such as `copy_of_layer3.csv`, or `layer3 (1).csv`) or a layer number twice (`layer2.csv` and
    `layer02.csv`) is refused, not guessed at. Hidden files (`._layer2.csv` of a macOS copy) are
    skipped.
    """
    found: list[tuple[int, Path]] = []
    other: list[Path] = []
    for p in directory.iterdir():
        if p.name.startswith("."):
            continue
        if not p.is_file():  # a layer that cannot be read must not vanish from the trace unsaid
            if _LAYER_FILE.fullmatch(p.name) or p.suffix.lower() == ".csv":
                raise TraceError(f"{p}: {not_a_file(p) if not p.is_dir() else 'a directory named like a layer file'}")
            continue
        if m := _LAYER_FILE.fullmatch(p.name):
            found.append((int(m.group(1)), p))
        elif p.suffix.lower() == ".csv":
            other.append(p)
    found.sort()
    if found and other:
        names = ", ".join(sorted(p.name for p in other)[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise TraceError(f"{directory}: {names} beside the layerN.csv files: a directory of layer files is read whole, "
                         "so move other CSV files out (or give the layer files one by one)")
    for (a, pa), (b, pb) in zip(found, found[1:]):
        if a == b:
            raise TraceError(f"{pa}, {pb}: the same layer number {a} twice (give each layer once)")
    return found


_SAMPLES = re.compile(r"-samples-+\s*torch\.Size\(\[\d+\]\)\s*tensor\(\[(.*?)\]\)", re.S)


def _tokens_txt_ids(path: Path) -> np.ndarray | None:
    """Token ids printed as the 'samples' tensor of a FLAME tokens.txt (None if there is no file).

    A tokens.txt that is there but unreadable is an error: silently dropping it would lose the
    token ids of the whole trace.
    """
    if not path.is_file():
        return None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: unreadable ({e})") from None
    m = _SAMPLES.search(text)
    if m is None:
        raise TraceError(f"{path}: no '----samples----' torch.Size(...) tensor([...]) printout of the token ids (FLAME's layout)")
    first_line = text.count("\n", 0, m.start(1)) + 1
    ids: list[int] = []
    for offset, line in enumerate(m.group(1).split("\n")):
        pieces = line.split(",")
        if not pieces[-1].strip():
            pieces.pop()  # torch ends each wrapped line with a comma
        for x in pieces:
            try:
                ids.append(int(x))
            except ValueError:
                raise TraceError(f"{path}: line {first_line + offset}: {x.strip()!r} is not a token id") from None
    return np.array(ids, dtype=np.int64)


def import_csv(paths: Sequence[Path], k: int | None = None) -> Trace:
    """One directory (see `import_csv_dir`) or the layer CSV files of one token set.

    Files named `layerN.csv` are put in order of N (a shell glob puts layer10 before layer2);
    other names keep the order given, layer l being the l-th file.
    """
    paths = [Path(p) for p in paths]
    if not paths:  # the CLI requires one; the API got an IndexError
        raise TraceError("no layer CSV files given")
    if len(paths) == 1 and paths[0].is_dir():
        return import_csv_dir(paths[0], k)
    for p in paths:
        if p.is_dir():
            raise TraceError(f"{p}: a directory among files: give one directory alone, or layer CSV files only")
        if not p.is_file():
            raise TraceError(f"{p}: {not_a_file(p)} (give one directory, or layer CSV files)")
    _refuse_repeated_files(paths)  # the same file as two layers would be a made-up path
    matches = [_LAYER_FILE.fullmatch(p.name) for p in paths]
    numbers = [int(m.group(1)) for m in matches if m is not None]
    if len(numbers) == len(paths):
        twice = next(n for n in numbers if numbers.count(n) > 1) if len(set(numbers)) != len(numbers) else None
        if twice is not None:
            same = ", ".join(str(p) for p, n in zip(paths, numbers) if n == twice)
            raise TraceError(f"{same}: the same layer number {twice} twice (give each layer once)")
        paths = [p for _, p in sorted(zip(numbers, paths))]
        layers = sorted(numbers)
        _check_one_directory(paths)
    else:
        layers = list(range(len(paths)))
    return _import_csv_groups([(None, paths)], layers, k, name=str(paths[0].parent), source=[p.name for p in paths])


def _check_one_directory(paths: Sequence[Path]) -> None:
    """`layerN.csv` files given one by one are one token set, and a directory of them holds one
    token set (FLAME: a position folder): such files from two directories, e.g. 1st/layer2.csv with
    2nd/layer3.csv, would pair rows of different tokens into one token's path. (Files named
    otherwise, e.g. one folder per layer, are the user's order and are taken as given.)"""
    first = paths[0].absolute().parent
    for p in paths[1:]:
        parent = p.absolute().parent
        if parent != first and file_key(parent) != file_key(first):
            raise TraceError(f"{paths[0]}, {p}: layer files from different directories (a directory holds one token "
                             "set, e.g. one position folder): give files of one directory, or the directory above "
                             "the position folders")


def import_csv_dir(directory: Path, k: int | None = None) -> Trace:
    """A directory of `layerN.csv` files, or of position folders each holding such files.

    Position folders (FLAME: `1st` ... `10th`) are sorted by their leading number, which is the
    token position: a folder without one (a copy such as `extra/`) or two folders with the same
    number would give tokens the same (sequence, position), so both are refused. The row index
    within a folder is the sequence, so token (sequence s, position p) keeps the same sequence id
    across folders. Layers must be the same set in every folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TraceError(f"{directory}: not a directory")
    direct = layer_files(directory)
    if direct:
        beside = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".") and layer_files(p))
        if beside:  # two layouts in one: which tokens are meant is a guess
            raise TraceError(f"{directory}: layerN.csv files and position folders holding them ({', '.join(beside[:3])}"
                             f"{', ...' if len(beside) > 3 else ''}): give the files' directory or the folders' "
                             "parent, not one holding both")
        return _import_csv_groups([(None, [p for _, p in direct])], [n for n, _ in direct], k, str(directory), directory.name)
    sub = [p for p in directory.iterdir() if p.is_dir() and layer_files(p)]
    if not sub:
        raise TraceError(f"{directory}: no layerN.csv files, nor folders holding them")
    numbered: list[tuple[int, Path]] = []
    for p in sorted(sub):
        m = re.match(r"\d+", p.name)
        if m is None:
            raise TraceError(f"{p}: position folders must be named by their number (1st, 2nd, ..., 10th); "
                             "move this folder out or rename it")
        numbered.append((int(m.group()), p))
    folders = sorted(numbered)
    for (a, pa), (b, pb) in zip(folders, folders[1:]):
        if a == b:
            raise TraceError(f"{pb}: position {b} again (also {pa.name}): each position folder must have its own number")
    layers0 = [n for n, _ in layer_files(folders[0][1])]
    groups: list[tuple[int | None, list[Path]]] = []
    for position, folder in folders:
        files = layer_files(folder)
        if [n for n, _ in files] != layers0:
            raise TraceError(f"{folder}: layers {[n for n, _ in files]} differ from {folders[0][1]} ({layers0})")
        groups.append((position, [p for _, p in files]))
    return _import_csv_groups(groups, layers0, k, str(directory), directory.name)


def _import_csv_groups(
    groups: Sequence[tuple[int | None, list[Path]]], layers: list[int], k: int | None, name: str, source: Any
) -> Trace:
    """Token sets (position or None, layer files) -> one Trace; row r of a set is sequence r."""
    all_ids: list[np.ndarray] = []
    all_w: list[np.ndarray] = []
    seq: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    toks: list[np.ndarray | None] = []
    num_experts = 0
    progress = Progress("import csv: reading layer files", total=sum(len(files) for _, files in groups))
    read: list[Path] = []

    def on_file(path: Path) -> None:
        read.append(path)
        progress.update(len(read), path.name)

    explicit, k_from = k is not None, None
    for position, files in groups:
        ids, w, row_ids, num_experts, k_from = import_csv_layers(files, k, on_file, explicit, k_from)
        k = ids.shape[2]
        n = ids.shape[0]
        all_ids.append(ids)
        all_w.append(w)
        seq.append(row_ids if row_ids is not None else np.arange(n))
        pos.append(np.full(n, position if position is not None else 0))
        txt = files[0].parent / "tokens.txt"
        t = _tokens_txt_ids(txt)
        if t is not None and len(t) != n:
            raise TraceError(f"{txt}: {len(t)} token ids, but the layer files beside it have {n} rows")
        toks.append(t)
    progress.close()
    known = [t for t in toks if t is not None]
    if known and len(known) != len(toks):  # token ids for some folders only: say which lacks them
        lacking = next(files[0].parent for (_, files), t in zip(groups, toks) if t is None)
        having = next(files[0].parent for (_, files), t in zip(groups, toks) if t is not None)
        raise TraceError(f"{lacking}: no tokens.txt, but {having} has one: token ids must cover every folder or none")
    token_ids = np.concatenate(known) if known else None
    has_positions = any(position is not None for position, _ in groups)
    return make_trace(
        np.concatenate(all_ids),
        np.concatenate(all_w),
        num_experts,
        token_ids=token_ids,
        sequence_ids=np.concatenate(seq),
        positions=np.concatenate(pos) if has_positions else None,
        meta={"source": "csv-layers", "moe_layers": layers, "input": source},
        name=name,
    )


# --- torch dumps (SGLang) ------------------------------------------------------------------------


def load_torch_dump(path: Path) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: {not_a_file(path)}")
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: file is empty")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (legacy: a pickle, protocol 2 starts with 0x80): anything
    # else is the wrong file, not an unsafe one
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise TraceError(f"{path}: not a torch.save file (no zip or pickle signature)")
    try:
        with warnings.catch_warnings():  # torch warns about a pickle protocol, then refuses: the refusal says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TraceError(
            f"{path}: refused: loading needs unpickling of arbitrary Python objects{pickled_object(e)}; "
            "moeplace reads only tensors and plain containers"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"{path}: truncated or not a torch.save file ({first})") from None


def pickled_object(e: BaseException) -> str:
    """' (it holds posix.system)': the object torch.load(weights_only=True) refused to unpickle, as
    its UnpicklingError names it; "" when it names none."""
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", str(e))
    return f" (it holds {found.group(1)})" if found else ""


def _dump_files(paths: Sequence[Path]) -> list[Path]:
    """Files given, with a directory standing for its `*.pt` files (sorted by name)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():  # hidden files (a macOS ._x.pt) and directories named *.pt are no dumps
            found = sorted(f for f in p.glob("*.pt") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise TraceError(f"{p}: no .pt files in this directory")
            out += found
        else:
            out.append(p)
    if not out:
        raise TraceError("no dump files given")
    return out


def _names(paths: Sequence[Path]) -> str:
    """The files an error is about, for the `FILE: what is wrong` line."""
    shown = ", ".join(map(str, paths[:3]))
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def import_sglang(paths: Sequence[Path], num_experts: int | None = None) -> Trace | ExpertLoads:
    """SGLang expert-distribution recorder dumps -> Trace (`per_token` mode) or ExpertLoads (`stat`).

    The mode is read from the dumps' keys: `records` (per_token) or `logical_count` (stat).
    A file given twice (also through its directory, a link or another spelling) is refused: its
    records or counts would be counted twice.
    """
    check_num_experts(num_experts)
    files = _dump_files(paths)
    _refuse_repeated_files(files)
    dumps = []
    for path in files:
        dump = load_torch_dump(path)
        if not isinstance(dump, dict) or not ({"records", "logical_count"} & set(dump)):
            keys = sorted(map(str, dump)) if isinstance(dump, dict) else type(dump).__name__
            raise TraceError(
                f"{path}: not an SGLang expert-distribution dump: expected a dict with 'records' "
                f"(per_token mode) or 'logical_count' (stat mode), got {keys}"
            )
        dumps.append((path, dump))
    per_token = [p for p, d in dumps if "records" in d]
    if per_token and len(per_token) != len(dumps):
        stat = next(p for p, d in dumps if "records" not in d)
        raise TraceError(f"{per_token[0]}, {stat}: mixed SGLang dump modes (per_token, stat): "
                         "give either per_token dumps or stat dumps, not both")
    if per_token:
        return sglang_per_token(dumps, num_experts)
    return sglang_stat(dumps, num_experts)


def check_num_experts(num_experts: int | None, given_as: str = "") -> None:
    """A given expert count within what the formats hold, before anything is sized by it
    (--num-experts 1000000000 was a table of a billion columns); `given_as` names the option."""
    if num_experts is not None and not 1 <= num_experts <= MAX_EXPERTS:
        where = f"{given_as} {num_experts}: " if given_as else ""
        raise TraceError(f"{where}num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")


def _refuse_repeated_files(paths: Sequence[Path]) -> None:
    """One file given twice (a link, ./x beside x, a directory beside a file in it) would have its
    records or counts counted twice: refused. A missing file is left for its reader to name."""
    seen: dict[Any, Path] = {}
    for path in paths:
        ident = file_key(path)
        if ident in seen:
            raise TraceError(f"{path}: the same file as {seen[ident]}: given twice, its contents would be counted twice")
        seen[ident] = path


def _as_int_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """A tensor or (nested) list as an int64 array of `ndim` dimensions, else TraceError."""
    import torch

    try:
        a = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TraceError(f"{name}: not an integer array ({e})") from None
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise TraceError(f"{name}: expected an integer array of {ndim} dimensions, got shape {list(a.shape)} dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


# (forward pass, rank, logical ids [layers, n, 8], input ids [n], positions [n], "FILE: record r")
_SglangRecord = tuple[int, int, np.ndarray, "np.ndarray | None", "np.ndarray | None", str]


def _physical_to_logical(dump: dict, path: Path) -> np.ndarray | None:
    """The dump's `last_physical_to_logical_map` [layers, physical], checked; None if absent."""
    p2l = dump.get("last_physical_to_logical_map")
    if p2l is None:
        return None
    p2l = _as_int_array(p2l, f"{path}: last_physical_to_logical_map", 2)
    if p2l.size and p2l.min() < 0:  # SGLang maps every physical slot to a logical expert
        layer, slot = (int(x) for x in np.argwhere(p2l < 0)[0])
        raise TraceError(f"{path}: last_physical_to_logical_map holds {int(p2l[layer, slot])} at layer {layer}, "
                         f"physical slot {slot}: every physical slot must map to a logical expert")
    return p2l


def _sglang_record(rec: Any, p2l: np.ndarray | None, name: str) -> _SglangRecord | None:
    """One per_token record -> (forward pass, rank, logical ids [layers, n, 8], input ids, positions, name).

    Ids stay physical when the dump has no map (refused later, once the records are known to
    hold experts). None for an idle forward pass (no token).
    """
    if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
        raise TraceError(f"{name}: no 'topk_ids_of_layer' (is this a per_token dump?)")
    ids = _as_int_array(rec["topk_ids_of_layer"], f"{name}: topk_ids_of_layer", 3)
    if ids.shape[1] == 0:
        return None
    if ids.shape[0] == 0 or ids.shape[2] == 0:  # SGLang writes every layer and its top-k slots
        raise TraceError(f"{name}: topk_ids_of_layer has shape {list(ids.shape)} (layers, tokens, slots): "
                         f"no {'layers' if ids.shape[0] == 0 else 'expert slots'}")
    per_token = []
    for key in ("input_ids", "positions"):
        v = rec.get(key)
        v = None if v is None else _as_int_array(v, f"{name}: {key}", 1)
        if v is not None and len(v) != ids.shape[1]:
            raise TraceError(f"{name}: {key} has {len(v)} entries but topk_ids_of_layer has {ids.shape[1]} tokens")
        per_token.append(v)
    if ids.min() < -1:
        raise TraceError(f"{name}: expert id {int(ids.min())} (only -1 may mark a missing expert)")
    if p2l is not None:
        if p2l.shape[0] != ids.shape[0]:
            raise TraceError(f"{name}: {ids.shape[0]} layers, but last_physical_to_logical_map has {p2l.shape[0]}")
        if ids.max() >= p2l.shape[1]:
            raise TraceError(f"{name}: physical expert id {int(ids.max())} out of range [0, {p2l.shape[1]})")
        ids = np.where(ids >= 0, p2l[np.arange(ids.shape[0])[:, None, None], ids.clip(0)], -1)
    return _record_int(rec, "forward_pass_id", name), _record_int(rec, "rank", name), ids, per_token[0], \
        per_token[1], name


def _record_int(rec: dict, key: str, name: str) -> int:
    """A record's `key` (forward_pass_id, rank): an integer, a one-element integer tensor, or absent
    (0); anything else (1.5 would be truncated, a tensor of several values is no one pass) refused."""
    import torch

    value = rec.get(key)
    if value is None:
        return 0
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value.item())
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    shown = f"a tensor of shape {list(value.shape)} dtype {value.dtype}" if isinstance(value, torch.Tensor) \
        else repr(value)[:40]
    raise TraceError(f"{name}: {key} must be an integer, got {shown}")


def _check_record_experts(rec: _SglangRecord, moe_layers: np.ndarray, k: int) -> None:
    """Each token of a record: k distinct experts at every MoE layer, or none at all (padding)."""
    ids = rec[2][moe_layers, :, :k]  # [L, n, k]
    s = np.sort(ids, axis=-1)
    dup = np.argwhere(((s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)).any(axis=-1))
    if len(dup):
        layer, tok = (int(x) for x in dup[0])
        raise TraceError(f"{rec[5]}: token {tok} selects the same logical expert twice at layer {int(moe_layers[layer])} "
                         f"(duplicate expert ids; {len(dup)} token-layers affected)")
    has = ids >= 0
    partial = has.any(axis=(0, 2)) & ~has.all(axis=(0, 2))  # padding rows are -1 at every MoE layer
    if partial.any():
        tok = int(np.argmax(partial))
        layer = int(np.argmax(~has[:, tok].all(axis=1)))
        raise TraceError(f"{rec[5]}: token {tok} misses an expert at layer {int(moe_layers[layer])} but not at others "
                         f"(only batch padding may be -1, and SGLang masks it at every layer)")


def sglang_per_token(dumps: Sequence[tuple[Path, dict]], num_experts: int | None = None) -> Trace:
    """per_token dumps (one `.pt` per rank) -> Trace with token ids and positions; no gate weights.

    Layout (sglang/srt/eplb/expert_distribution.py, _DetailAccumulator.dump):
        {"records": [record, ...], "last_physical_to_logical_map": int [layers, physical experts]}
        record: {"forward_pass_id": int, "rank": int, "input_ids": [n], "positions": [n],
                 "topk_ids_of_layer": int32 [layers, n, 8] physical ids, -1 = no expert, ...}
    1. keep each distinct record once: without DP attention every rank records the same batch
       (same forward pass, token ids and expert ids; rank ignored); the copies dropped are counted
       in meta.duplicate_records. A record's `rank` is the TP rank (ModelRunner passes
       rank=self.tp_rank); nothing in the dump gives the DP rank (tp_rank // (tp_size / dp_size),
       sglang/srt/layers/dp_attention.py compute_dp_attention_world_info) or says DP attention was
       on. So with DP attention two DP ranks that ran the identical batch in one pass count once
       too; two different batches in one pass prove DP attention, and a warning then says so
       (and that without an all-to-all backend the records of DP ranks past 0 are not theirs);
    2. order by (forward_pass_id, rank) and map physical ids to logical ones through the map
       (required: SGLang always writes it, and physical slot ids are not logical expert ids);
    3. MoE layers = layers with any id (dense layers stay -1); k = slots used at those layers;
    4. drop token rows with no id at any MoE layer (batch padding, which SGLang masks to -1);
       a row missing ids at some layers only is an error.
    """
    paths = [p for p, _ in dumps]
    files = _names(paths)
    records: list[_SglangRecord] = []
    seen: set[tuple[int, bytes]] = set()
    duplicates = 0
    first_rank: dict[int, int] = {}  # forward pass -> rank of its first distinct record
    dp_seen: tuple[int, int, int] | None = None  # (pass, rank, rank) with different batches: DP attention
    no_map: list[Path] = []
    map_experts = 0  # logical experts the maps name: the model's count unless --num-experts says
    for path, dump in dumps:
        p2l = _physical_to_logical(dump, path)
        if p2l is None:
            no_map.append(path)
        else:
            map_experts = max(map_experts, int(p2l.max()) + 1 if p2l.size else 0)
        if not isinstance(dump["records"], list):
            raise TraceError(f"{path}: 'records' must be a list")
        for r, rec in enumerate(dump["records"]):
            parsed = _sglang_record(rec, p2l, f"{path}: record {r}")
            if parsed is None:
                continue  # an idle forward pass
            tokens = parsed[3] if parsed[3] is not None else np.zeros(0, np.int64)
            # the rank is not in the key: the dump cannot tell TP copies of one batch from two DP
            # ranks that ran the same batch (see step 1)
            key = (parsed[0], hashlib.sha256(parsed[2].tobytes() + tokens.tobytes()).digest())
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            records.append(parsed)
            rank = first_rank.setdefault(parsed[0], parsed[1])
            if dp_seen is None and rank != parsed[1]:
                dp_seen = (parsed[0], rank, parsed[1])
    if not records:
        raise TraceError(f"{files}: the SGLang dumps hold no tokens (was recording started before the requests?)")
    num_layers = {r[2].shape[0]: r[5] for r in records}
    if len(num_layers) > 1:
        (la, a), (lb, b) = sorted(num_layers.items())[:2]
        raise TraceError(f"{a} has {la} layers, {b} has {lb}: records disagree on the number of layers")
    records.sort(key=lambda r: (r[0], r[1]))
    ids = np.concatenate([r[2] for r in records], axis=1)  # [layers, T, slots]
    moe_layers = np.flatnonzero((ids >= 0).any(axis=(1, 2)))
    if not len(moe_layers):
        raise TraceError(f"{files}: the SGLang dumps record no expert at any layer: nothing to import")
    if no_map:
        raise TraceError(f"{_names(no_map)}: no 'last_physical_to_logical_map' (SGLang's per_token dumps carry it): "
                         "the recorded ids are physical slots, which cannot be mapped to logical experts without it")
    given = num_experts is not None
    num_experts = num_experts if num_experts is not None else map_experts
    ids = ids[moe_layers]
    k = int(np.flatnonzero((ids >= 0).any(axis=(0, 1))).max()) + 1
    for rec in records:
        _check_record_experts(rec, moe_layers, k)
    ids = ids[:, :, :k].transpose(1, 0, 2)  # [T, L, k]
    keep = (ids >= 0).all(axis=(1, 2))
    if not keep.any():
        raise TraceError(f"{files}: every recorded token misses an expert at some MoE layer: nothing to import")
    if given and ids[keep].max() >= num_experts:  # the option's fault, not the dump's: say so
        raise TraceError(f"{files}: --num-experts {num_experts}, but experts up to {int(ids[keep].max())} were selected")

    def per_token(i: int) -> np.ndarray | None:
        if any(r[i] is None for r in records):
            return None
        return np.concatenate([r[i] for r in records])[keep]

    if dp_seen is not None:
        warn(f"{files}: forward pass {dp_seen[0]} holds different batches on ranks {dp_seen[1]} and {dp_seen[2]}: "
             f"DP attention; the dump has no DP rank, so identical batches of one pass count once ({duplicates} "
             "dropped), and with --moe-a2a-backend none the records of DP ranks past 0 hold other ranks' experts "
             "(docs/import.md)")
    meta = {
        "source": "sglang-per_token",
        "moe_layers": moe_layers.tolist(),
        "input": [p.name for p in paths],
        "records": len(records),
        "duplicate_records": duplicates,
        "dropped_tokens": int((~keep).sum()),
    }
    return make_trace(ids[keep], None, num_experts, token_ids=per_token(3), positions=per_token(4), meta=meta, name=files)


def sglang_stat(dumps: Sequence[tuple[Path, dict]], num_experts: int | None = None) -> ExpertLoads:
    """stat dumps -> ExpertLoads summed over recorded steps (and over the files given).

    Layout (sglang/srt/eplb/expert_distribution.py, _StatAccumulator.dump; rank 0 writes it):
        {"rank": 0, "logical_count": int [steps, layers, logical experts],
         "average_utilization_rate_over_window": float or None}
    Layers with no selection at all are dense layers of the model and are dropped.
    """
    check_num_experts(num_experts)
    total = None
    exact = None  # the same sums in float64, which cannot wrap: int64 sums are kept only below MAX_LOAD
    for path, dump in dumps:
        step_counts = _as_int_array(dump["logical_count"], f"{path}: logical_count", 3)
        if step_counts.size and step_counts.min() < 0:  # a count, never negative: not a dense layer either
            step, layer, expert = (int(x) for x in np.argwhere(step_counts < 0)[0])
            raise TraceError(f"{path}: logical_count is negative at layer {layer} "
                             f"(step {step}, expert {expert}: {int(step_counts[step, layer, expert])})")
        counts = step_counts.sum(axis=0)
        if total is not None and counts.shape != total.shape:
            raise TraceError(f"{path}: logical_count is {list(counts.shape)} per step, but {dumps[0][0]} has {list(total.shape)}")
        total = counts if total is None else total + counts
        sums = step_counts.sum(axis=0, dtype=np.float64)
        exact = sums if exact is None else exact + sums
        if (exact >= MAX_LOAD).any():  # int64 may have wrapped (4 x 2**62 sums to 0): refuse before using it
            layer, expert = (int(x) for x in np.argwhere(exact >= MAX_LOAD)[0])
            raise TraceError(f"{path}: logical_count sums to {exact[layer, expert]:.6g} at layer {layer}, expert {expert} "
                             f"over {step_counts.shape[0]} steps{' and the files before' if total is not counts else ''}: "
                             "counts of token selections must be below 1e15")
    assert total is not None
    files = _names([p for p, _ in dumps])
    moe_layers = np.flatnonzero(total.sum(axis=1) > 0)
    if not len(moe_layers):
        raise TraceError(f"{files}: the SGLang stat dumps count no expert selection (was recording started?)")
    loads = total[moe_layers]
    if num_experts is not None:
        if num_experts < loads.shape[1] and loads[:, num_experts:].any():
            raise TraceError(f"{files}: --num-experts {num_experts}, but experts up to {loads.shape[1] - 1} were selected")
        loads = np.pad(loads, ((0, 0), (0, max(0, num_experts - loads.shape[1]))))[:, :num_experts]
    meta = {"source": "sglang-stat", "moe_layers": moe_layers.tolist(), "input": [p.name for p, _ in dumps]}
    return make_loads(loads, meta, name=files)


# --- per-layer count JSON ------------------------------------------------------------------------

_COUNT_KEYS = ("expert_popularity", "expert_loads")


def _count_table(rows: Any, path: Path, key: str) -> np.ndarray:
    """JSON [layers][experts] of whole non-negative numbers (not strings, not true/false) -> float64."""
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise TraceError(f"{path}: '{key}' must be a rectangular [layers][experts] table of numbers")
    for layer, row in enumerate(rows):
        for expert, x in enumerate(row):
            if isinstance(x, list):
                raise TraceError(f"{path}: '{key}' must be a [layers][experts] table, got a list at layer {layer}, expert {expert}")
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                what = "true/false" if isinstance(x, bool) else "null" if x is None else f"{type(x).__name__} {x!r}"
                raise TraceError(f"{path}: '{key}' must hold numbers, not {what} (layer {layer}, expert {expert})")
            if isinstance(x, int) and abs(x) >= MAX_LOAD:  # a 400-digit int would overflow the float conversion
                shown = f"{x:.6g}" if x.bit_length() < 1000 else f"a {x.bit_length()}-bit integer"
                raise TraceError(f"{path}: '{key}' holds {shown} at layer {layer}, expert {expert}: "
                                 "counts of token selections must be below 1e15")
    try:
        counts = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{path}: '{key}' must be a rectangular [layers][experts] table of numbers") from None
    counts = make_loads(counts, name=str(path), what=f"'{key}'").loads
    fractional = np.argwhere(counts != np.floor(counts))
    if len(fractional):
        layer, expert = (int(x) for x in fractional[0])
        raise TraceError(f"{path}: '{key}' must hold whole counts of token selections: "
                         f"layer {layer}, expert {expert} holds {float(counts[layer, expert])!r}")
    return counts


def import_loads_json(paths: Sequence[Path]) -> ExpertLoads:
    """JSON objects holding per-layer counts [layers][experts] -> ExpertLoads (files summed).

    The counts sit under `expert_popularity` (fiddler's Mixtral-8x7B MMLU dumps, with
    `total_input_tokens`) or `expert_loads`. Summing several files (e.g. several subjects)
    gives the load of the mixed traffic; a file given twice would be counted twice, so it is
    refused.
    """
    if not paths:
        raise TraceError("no JSON files given")
    paths = [Path(p) for p in paths]
    _refuse_repeated_files(paths)
    total: np.ndarray | None = None
    tokens: list[int] = []  # of the files that record it
    for path in paths:
        doc = read_json(path, TraceError)
        present = [k for k in _COUNT_KEYS if isinstance(doc, dict) and k in doc]
        if len(present) > 1:  # which one holds the counts is a guess
            raise TraceError(f"{path}: both {' and '.join(repr(k) for k in present)}: give one table of counts")
        key = present[0] if present else None
        if key is None:
            raise TraceError(f"{path}: no {' or '.join(repr(k) for k in _COUNT_KEYS)} [layers][experts] counts")
        counts = _count_table(doc[key], path, key)
        if total is not None and counts.shape != total.shape:
            raise TraceError(f"{path}: {key} is {list(counts.shape)}, but {paths[0]} has {list(total.shape)}")
        total = counts if total is None else total + counts
        if "total_input_tokens" in doc:
            n = doc["total_input_tokens"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise TraceError(f"{path}: 'total_input_tokens' must be a non-negative integer, got {n!r}")
            tokens.append(n)
    assert total is not None  # paths is not empty
    meta: dict[str, Any] = {"source": "loads-json", "input": [p.name for p in paths]}
    if len(tokens) == len(paths):  # a sum over some of the files would understate the traffic's tokens
        meta["total_input_tokens"] = sum(tokens)
    elif tokens:
        warn(f"{len(tokens)} of the {len(paths)} files record total_input_tokens: not kept (a sum over some "
             "of them would not be the loads' token count)")
    return make_loads(total, meta, name=_names(paths))
