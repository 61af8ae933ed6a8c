"""File I/O shared by every stage: atomic output, JSON/YAML input with one-line errors.

Output goes to a temp file beside the target, then is renamed: a crash or Ctrl-C mid-write never
leaves a half-written file where the user expects a result, and never clobbers the previous good
file.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Hashable, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in the target's directory; rename it onto `path` on success.

    `suffix` keeps extensions that writers insist on (np.savez appends '.npz' otherwise).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix + ".tmp", dir=target.parent)
    except OSError as e:  # name the output, not the temp file; "File exists" for a file in the way reads badly
        in_the_way = next((a for a in target.parents if a.exists() and not a.is_dir()), None)
        if in_the_way is not None:
            raise NotADirectoryError(errno.ENOTDIR, f"{in_the_way} is not a directory", str(target)) from None
        raise type(e)(e.errno, e.strerror, str(target)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def existing_file(path: str | os.PathLike[str], kind: str, error: type[Exception] = ValueError) -> Path:
    """`path` as a Path when it is a file; else `error` with one line saying what it is instead."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{p}: is a directory, not a {kind} file")
    if not p.is_file():
        raise error(f"{p}: no such file")
    return p


def looks_like(path: Path) -> str | None:
    """What a file's first bytes say it is, for errors on a file given in the wrong place
    (`eval TRACE PLACEMENT`, a CSV where a trace goes); None when nothing is recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "a zip archive (an .npz trace?)"
    if head.startswith(b"\x93NUMPY"):
        return "a .npy array (an ExFlow trace?)"
    try:  # incremental: a last character cut at byte 512 is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head).lstrip()
    except UnicodeDecodeError:
        return None  # binary, whatever its first byte (random bytes may begin with '[')
    if text.startswith(("{", "[")):
        return "JSON (a placement?)"
    if text.split("\n", 1)[0].count(",") >= 2:
        return "CSV (convert it with `moeplace import csv`)"
    return None


def file_key(path: str | os.PathLike[str]) -> Any:
    """What makes two paths one file: (device, inode), so links, `..` and relative spellings
    agree; the resolved path for a file that cannot be stat'ed (its reader names the problem)."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return Path(path).resolve()


def read_json(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Any:
    """Parse a JSON file; a missing or malformed file raises `error` with one line naming it."""
    p = existing_file(path, "JSON", error)
    try:
        return json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        kind = looks_like(p)
        if kind is not None and not kind.startswith("JSON"):
            raise error(f"{p}: not JSON but {kind}: is it the right file, or are two arguments swapped?") from None
        raise error(f"{p}: not valid JSON ({e})") from None


def read_yaml(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Any:
    """Parse a YAML file (safe_load: plain data only); a missing or malformed file raises `error`
    with one line naming it."""
    import yaml  # only the config readers need it

    class UniqueKeyLoader(yaml.SafeLoader):
        """safe_load that refuses a key given twice in one mapping: PyYAML keeps the last, so a
        repeated threshold in a CI gate file would loosen it without a word."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):  # PyYAML's own error follows
                    continue
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})")
                seen.add(key)
            return super().construct_mapping(node, deep)

    p = existing_file(path, "YAML", error)
    try:
        return yaml.load(p.read_text(), Loader=UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{p}: not valid YAML ({first})") from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def save_npz_atomic(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object stops numpy appending '.npz' to the name
            np.savez_compressed(f, allow_pickle=False, **arrays)  # never write object arrays


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
