"""Input text for `moeplace trace`: files -> token windows -> padded batches.

Documents:  a `.txt` file is one document, read and tokenised in blocks of ~256K characters of
            whole lines, so a large file streams; a line longer than 64K characters is read in
            pieces cut before a whitespace character (at 64K characters when it has none), so
            one line never reaches the tokenizer whole. A `.jsonl` file holds one document per
            line, in its `text` field (suffixes in any case); a text over 256K characters is
            tokenised in such pieces too. Cuts fall only where a block ends, so text below
            those sizes is tokenised exactly as one string per block.
            A directory contributes its `.txt` and `.jsonl` files, recursively, sorted by path,
            skipping hidden names (a leading dot), licence and notice files (LICENSE*, LICENCE*,
            COPYING*, NOTICE*, any case, the word not running on into letters: a model's licence
            beside its data is no corpus text)
            and not following links to directories; such a file named itself is read.
            A file reached twice (given twice, or also through a directory) is refused.
Checks:     `validate` reads every file once before the model loads (UTF-8, JSONL structure),
            so bad data fails in seconds, naming FILE:LINE, not after a long run.
Windows:    each document's token stream is cut into windows of at most `seq_len` tokens; a
            window is one sequence of the trace (its `sequence_id`), positions restart at 0.
Batches:    `batch_size` windows, right-padded to the longest. Right padding is exact for causal
            MoE models: a real token attends only to earlier (real) tokens, and routing is per
            token, so padded positions are simply dropped from the trace.
"""

from __future__ import annotations

import codecs
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import MoeplaceError
from moeplace.io import file_key, loads_json

TEXT_SUFFIXES = (".txt", ".jsonl")
# names a directory's expansion skips: the word, then no letter (LICENSE-apache.txt, not licensed_text.txt)
_NOTICE_NAME = re.compile(r"(LICEN[CS]ES?|COPYING|NOTICES?)(?![A-Z])", re.IGNORECASE)
_BLOCK_CHARS = 1 << 18  # tokenise .txt files in ~256K-character blocks of whole lines
# longer lines are read in pieces: a 20 MB one-line file tokenised whole took 5.6 GB and 45 s, deaf to Ctrl-C
_LINE_CHARS = 1 << 16
_LAST_SPACE = re.compile(r".*\s", re.DOTALL)  # greedy: ends just past the last whitespace character

Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class Batch:
    """`input_ids` int64 [B, S] right-padded; `lengths` int64 [B]; `sequence_ids` int64 [B]."""

    input_ids: np.ndarray
    lengths: np.ndarray
    sequence_ids: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def valid_mask(self) -> np.ndarray:
        """bool [B, S]: True at real (non-padding) positions."""
        return np.arange(self.input_ids.shape[1])[None, :] < self.lengths[:, None]


def expand_paths(paths: Sequence[str | Path], skipped: list[Path] | None = None) -> list[Path]:
    """Files to read, in order: given files as is, directories' .txt/.jsonl files sorted by path.

    A directory's licence and notice files are left out (appended to `skipped` when given, for
    the caller to report). A file reached twice is refused: its text would be traced twice and
    skew every statistic.
    """
    files: list[Path] = []
    seen: dict[Any, Path] = {}  # io.file_key -> the path it was first read as
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _is_text(f)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            notices = [f for f in found if is_notice(f)]
            found = [f for f in found if not is_notice(f)]
            if skipped is not None:
                skipped.extend(notices)
            if not found:
                raise MoeplaceError(f"{p}: directory holds no .txt or .jsonl files "
                                    f"(hidden names and licence/notice files skipped)")
            for f in found:
                _once(f, seen, f"{f} (in {p})")
            files.extend(found)
        elif p.is_file():
            if not _is_text(p):
                raise MoeplaceError(f"{p}: unsupported text file (expected .txt or .jsonl)")
            _once(p, seen, str(p))
            files.append(p)
        elif p.exists():
            raise MoeplaceError(f"{p}: not a regular file (a device or pipe; save the text to a .txt file)")
        else:
            raise MoeplaceError(f"{p}: no such file or directory")
    return files


def is_notice(f: Path) -> bool:
    """A licence or notice file (LICENSE*, LICENCE*, COPYING*, NOTICE*, any case): legal text, not corpus."""
    return _NOTICE_NAME.match(f.name) is not None


def _once(f: Path, seen: dict[Any, Path], name: str) -> None:
    first = seen.setdefault(file_key(f), f)
    if first is not f:
        also = "" if str(first) == str(f) else f" as {first}"
        raise MoeplaceError(f"--data {name}: already read{also}; give each file once (its text would be traced twice)")


def _is_text(f: Path) -> bool:
    return f.suffix.lower() in TEXT_SUFFIXES


def validate(files: Iterable[Path]) -> None:
    """Read every file once as the run will (UTF-8; JSONL lines with a string 'text'), so bad
    data fails before the model loads; raises MoeplaceError naming FILE:LINE."""
    for f in files:
        if f.suffix.lower() == ".jsonl":
            for _ in _jsonl_texts(f):
                pass
        else:
            problem = _utf8_problem(f)
            if problem is not None:
                raise MoeplaceError(problem)


def iter_documents(files: Iterable[Path]) -> Iterator[Iterator[str]]:
    """Every document of `files`, as its text pieces in order (see the module doc for the sizes)."""
    for f in files:
        if f.suffix.lower() == ".jsonl":
            for text in _jsonl_texts(f):
                yield _blocks(_pieces(text)) if len(text) > _BLOCK_CHARS else iter([text])
        else:
            yield _txt_blocks(f)


def _txt_blocks(f: Path) -> Iterator[str]:
    try:
        with open(f, encoding="utf-8") as fh:
            yield from _blocks(_bounded_lines(fh))
    except UnicodeDecodeError:
        raise MoeplaceError(_utf8_problem(f) or f"{f}: not UTF-8 text") from None


def _blocks(pieces: Iterable[str]) -> Iterator[str]:
    """Consecutive pieces joined into blocks of at least _BLOCK_CHARS (the last one shorter)."""
    block: list[str] = []
    size = 0
    for piece in pieces:
        block.append(piece)
        size += len(piece)
        if size >= _BLOCK_CHARS:
            yield "".join(block)
            block, size = [], 0
    if block:
        yield "".join(block)


def _bounded_lines(fh: Any) -> Iterator[str]:
    """The lines of a text file, a line longer than _LINE_CHARS in pieces of at most that many
    characters (never holding the whole line in memory)."""
    rest = ""
    while True:
        line = rest + fh.readline(_LINE_CHARS - len(rest))
        if len(line) < _LINE_CHARS or line.endswith("\n"):  # a whole line, or the end of the file
            if line:
                yield line
                rest = ""
                continue
            return
        cut = _cut_point(line)
        yield line[:cut]
        rest = line[cut:]


def _pieces(text: str) -> Iterator[str]:
    """`text` in pieces of at most _LINE_CHARS characters, cut as _bounded_lines cuts."""
    start = 0
    while len(text) - start > _LINE_CHARS:
        cut = start + _cut_point(text[start: start + _LINE_CHARS])
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut_point(chunk: str) -> int:
    """Where to cut `chunk`: before its last whitespace character (which then starts the next
    piece, as it would start that word's token), or at its end when it has none after index 0."""
    m = _LAST_SPACE.match(chunk, 1)
    return m.end() - 1 if m else len(chunk)


def _jsonl_texts(f: Path) -> Iterator[str]:
    try:
        with open(f, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = loads_json(line)
                except ValueError as e:
                    raise MoeplaceError(f"{f}:{n}: not a JSON line ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise MoeplaceError(f"{f}:{n}: expected an object with a string 'text' field")
                yield record["text"]
    except UnicodeDecodeError:
        raise MoeplaceError(_utf8_problem(f) or f"{f}: not UTF-8 text") from None


def _utf8_problem(f: Path) -> str | None:
    """'FILE:LINE: not UTF-8 text (...)' for the first invalid byte of `f`, None when it is all
    UTF-8. Read in binary: a text-mode decode error gives a position within its block."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0  # file offset of the decoder's pending bytes; newlines before them
    with open(f, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            data = decoder.getstate()[0] + chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.start is an index into `data` (pending + chunk)
                line = lines + data.count(b"\n", 0, e.start) + 1
                return (f"{f}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {offset + e.start}: "
                        f"{e.reason})")
            if not chunk:
                return None
            done = len(data) - len(decoder.getstate()[0])
            lines += data.count(b"\n", 0, done)
            offset += done


def iter_windows(files: Sequence[Path], tokenize: Tokenize, seq_len: int, max_tokens: int | None = None,
                 sources: list[tuple[Path, int]] | None = None) -> Iterator[np.ndarray]:
    """Token windows int64 [<= seq_len] over all documents, stopping after `max_tokens` tokens.

    `sources`, when given, receives (file, index of its first window) as each file yields its
    first window, so a caller knows which files the first N windows came from.
    """
    if seq_len < 1:
        raise MoeplaceError(f"--seq-len must be >= 1, got {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise MoeplaceError(f"--max-tokens must be >= 1, got {max_tokens}")
    remaining = max_tokens if max_tokens is not None else sys.maxsize
    count = 0
    for f in files:
        first = count
        for window in _file_windows(f, tokenize, seq_len):
            window = window[:remaining]
            if count == first and sources is not None:
                sources.append((f, first))
            count += 1
            remaining -= len(window)
            yield np.asarray(window, dtype=np.int64)
            if remaining == 0:
                return


def _file_windows(f: Path, tokenize: Tokenize, seq_len: int) -> Iterator[list[int]]:
    """The windows of every document of one file; windows never cross documents."""
    for pieces in iter_documents([f]):
        pending: list[int] = []
        for piece in pieces:
            pending.extend(tokenize(piece))
            full = len(pending) - len(pending) % seq_len
            for start in range(0, full, seq_len):
                yield pending[start: start + seq_len]
            del pending[:full]
        if pending:
            yield pending


def skip_windows(windows: Iterator[np.ndarray], token_ids: np.ndarray, sequence_ids: np.ndarray,
                 positions: np.ndarray, name: str) -> int:
    """Consume from `windows` the windows a partial trace already holds, checking each against it.

    token_ids, sequence_ids, positions int [T]: the partial trace's columns, sequences 0..n-1 in
    order, positions counting from 0 in each. Returns n, the number of windows consumed. Raises
    MoeplaceError naming `name` and the first sequence that differs from what `windows` gives
    (other text, tokenizer, --seq-len or windowing), before any model runs on the rest.
    """
    steps = np.diff(sequence_ids)
    # 0, 0, 1, 1, 2...: checked before bincount, which a stray id of 10**12 would size in terabytes
    numbered = sequence_ids.size > 0 and sequence_ids[0] == 0 and not np.any((steps != 0) & (steps != 1))
    counts = np.bincount(sequence_ids) if numbered else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    if not numbered or not np.array_equal(positions, np.arange(sequence_ids.size) - starts[sequence_ids]):
        raise MoeplaceError(f"{name}: its sequences are not windows numbered from 0 in order, positions from 0 in "
                            "each, as `moeplace trace` writes them: it cannot be resumed")
    for i in range(counts.size):
        window = next(windows, None)
        if window is None:
            raise MoeplaceError(f"{name}: holds {counts.size} sequences, but --data gives only {i} windows now "
                                "(other text, --seq-len or --max-tokens)")
        held = token_ids[starts[i]: starts[i + 1]]
        if len(held) != len(window) or not np.array_equal(held, window):
            n = min(len(held), len(window))
            other = np.flatnonzero(held[:n] != window[:n])
            if not other.size and len(held) < len(window) and i == counts.size - 1:
                raise MoeplaceError(f"{name}: its last sequence stops after {len(held)} of this window's "
                                    f"{len(window)} tokens (its --max-tokens cut it): a window cut short cannot be "
                                    "continued; trace again with the larger --max-tokens")
            what = (f"token {other[0]} is {held[other[0]]} there, {window[other[0]]} now" if other.size
                    else f"it holds {len(held)} tokens, the window now {len(window)}")
            raise MoeplaceError(f"{name}: sequence {i} differs from what --data gives now ({what}): resume with the "
                                "same --data, --tokenizer and --seq-len")
    return int(counts.size)


def iter_batches(windows: Iterable[np.ndarray], batch_size: int, pad_id: int = 0,
                 first_seq: int = 0) -> Iterator[Batch]:
    """Group windows into right-padded batches; sequence ids count windows from `first_seq`
    (a resumed run's first window follows the partial trace's)."""
    if batch_size < 1:
        raise MoeplaceError(f"--batch-size must be >= 1, got {batch_size}")
    group: list[np.ndarray] = []
    seq = first_seq
    for w in windows:
        group.append(w)
        if len(group) == batch_size:
            yield _pad(group, seq, pad_id)
            seq += len(group)
            group = []
    if group:
        yield _pad(group, seq, pad_id)


def _pad(group: list[np.ndarray], first_seq: int, pad_id: int) -> Batch:
    lengths = np.array([len(w) for w in group], dtype=np.int64)
    ids = np.full((len(group), int(lengths.max())), pad_id, dtype=np.int64)
    for row, w in enumerate(group):
        ids[row, : len(w)] = w
    return Batch(ids, lengths, np.arange(first_seq, first_seq + len(group), dtype=np.int64))
