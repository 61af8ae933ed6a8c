"""File I/O shared by every stage: atomic output, JSON/YAML input with one-line errors.

Output goes to a temp file beside the target, then is renamed: a crash or Ctrl-C mid-write never
leaves a half-written file where the user expects a result, and never clobbers the previous good
file.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import errno
import glob
import json
import math
import os
import shutil
import tempfile
import threading
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # Windows: no flock, so stages of killed runs are not swept there
    fcntl = None  # type: ignore[assignment]

import numpy as np

from moeplace.errors import MoeplaceError

try:
    from lzma import LZMAError
except ImportError:  # Python built without lzma: zipfile then cannot read LZMA members at all
    LZMAError = OSError  # type: ignore[misc, assignment]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in the target's directory; rename it onto `path` on success.

    `suffix` keeps extensions that writers insist on (np.savez appends '.npz' otherwise).
    A symlink is written through (its target is replaced, the link stays), and so is a path that
    is not a regular file (`-o /dev/null`, a FIFO, /dev/stdout): renaming onto those would replace
    a device or a link with a plain file, so the finished bytes are copied into them instead.
    """
    target = Path(path)
    if target.exists() and not target.is_file() and not target.is_dir():
        yield from _write_through(target, suffix)
        return
    if target.is_symlink():  # a regular file (or nothing yet) behind the link: replace that, keep the link
        target = Path(os.path.realpath(target))
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


def _write_through(target: Path, suffix: str) -> Iterator[Path]:
    """atomic_path for a device, FIFO or socket: the writer fills a private temp file, whose
    bytes then go into `target` opened for writing (nothing is written there on failure)."""
    fd, tmp = tempfile.mkstemp(prefix=".moeplace.", suffix=suffix + ".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def locked_stage(parent: Path, prefix: str, suffix: str = ".tmp") -> Iterator[Path]:
    """A fresh hidden directory PARENT/PREFIX*SUFFIX to build outputs in, removed on the way out
    (error, Ctrl-C, or SIGTERM, which the CLI turns into SystemExit) unless the caller renamed it
    into place.

    A run killed outright (SIGKILL, OOM killer) cannot remove its stage, which may be large (a
    whole checkpoint); the next run with the same parent and prefix does, first thing. Each run
    holds an flock on its own stage while it lives and the kernel drops it when the process dies,
    however it dies, so a stage nobody holds is a dead run's and one that is held belongs to a
    live concurrent run (no pid or host names, which reuse and shared mounts fool)."""
    remove_dead_stages(parent, prefix, suffix)
    stage, fd = _new_stage(parent, prefix, suffix)
    try:
        yield stage
    finally:
        # only while `stage` is still ours: renamed into place, the name may be another's now
        if fd is None or _still_there(fd, stage):
            shutil.rmtree(stage, ignore_errors=True)
        if fd is not None:
            os.close(fd)  # after the removal: never an unlocked stage of a live run


def _new_stage(parent: Path, prefix: str, suffix: str) -> tuple[Path, int | None]:
    """A fresh stage and the fd holding its lock (None where the file system has no flock: then
    nothing is swept either)."""
    for _ in range(100):
        stage = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        try:
            fd = _lock_dir(stage)
        except (BlockingIOError, FileNotFoundError):
            continue  # a sweeping run took it in the instant before our lock: make another
        except OSError:
            return stage, None
        if _still_there(fd, stage):
            return stage, fd
        os.close(fd)  # swept in that instant (the sweeper held the lock while it removed it)
    raise OSError(f"cannot create a staging directory in {parent}")


def remove_dead_stages(parent: Path, prefix: str, suffix: str = ".tmp") -> None:
    """Remove the stages of dead runs: those whose lock can be taken. A held one, a symlink, a
    file, or one on a file system without flock is left alone."""
    for stage in parent.glob(f"{glob.escape(prefix)}*{glob.escape(suffix)}"):
        try:
            fd = _lock_dir(stage)
        except OSError:
            continue
        try:
            if _still_there(fd, stage):
                shutil.rmtree(stage, ignore_errors=True)
        finally:
            os.close(fd)


def _lock_dir(path: Path) -> int:
    """An fd of directory `path` holding an exclusive flock on it. Raises BlockingIOError when
    another process holds it, another OSError when `path` is not a directory (or a symlink) or
    locks are unsupported here."""
    if fcntl is None:  # Windows
        raise OSError("no flock")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _still_there(fd: int, path: Path) -> bool:
    """Whether `path` still names the directory `fd` holds open (not removed, not replaced)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except OSError:
        return False


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc): setting
    it to 0 and back, the only portable way, would let a file another thread creates meanwhile
    come out world-writable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # other platforms: at least moeplace's own threads never race it
        mask = os.umask(0)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def existing_file(path: str | os.PathLike[str], kind: str, error: type[Exception] = ValueError) -> Path:
    """`path` as a Path when it is a file; else `error` with one line saying what it is instead."""
    p = Path(path)
    if p.is_dir():
        raise error(f"{p}: is a directory, not a {kind} file")
    if not p.is_file():
        raise error(f"{p}: {not_a_file(p)}")
    return p


def not_a_file(p: Path) -> str:
    """Why `p`, which is no regular file, cannot be read as one: for "{p}: ..." errors."""
    if p.is_symlink() and not p.exists():
        return "a broken link (its target does not exist)"
    if p.is_dir():
        return "is a directory, not a file"
    if p.exists():  # a FIFO, a device, a socket: no size, no second read
        return "not a regular file (a pipe or device); give a file"
    try:  # a typo of a file beside it (configs/cluster/h100-1x4.yaml)
        siblings = [q.name for q in p.parent.iterdir()] if p.parent.is_dir() else []
    except OSError:
        siblings = []
    near = difflib.get_close_matches(p.name, [q for q in siblings if _could_be(q, p.name)], n=1, cutoff=0.7)
    return f"no such file; did you mean {p.parent / near[0]}?" if near else "no such file"


def _could_be(candidate: str, asked: str) -> bool:
    """Whether a file beside a missing one could be what was asked for, by name alone (nothing
    is opened): the same suffix, and no eval report (`p_eval.json` beside a missing placement
    `p.json`) unless an eval report was asked for."""
    if Path(candidate).suffix.lower() != Path(asked).suffix.lower():
        return False
    return _eval_report_name(candidate) <= _eval_report_name(asked)


def _eval_report_name(name: str) -> bool:
    """A name like an eval report's (`p_eval.json`, `eval-p1x8.json`, `report.json`): a word of it,
    split at anything not a letter or digit, begins with "eval" or is "report"."""
    words = "".join(c if c.isalnum() else " " for c in Path(name).stem.lower()).split()
    return any(w.startswith("eval") or w in ("report", "reports") for w in words)


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
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed (decompress it first)"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16 text (save it as UTF-8)"
    try:  # incremental: a last character cut at byte 512 is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head).lstrip()
    except UnicodeDecodeError:
        return None  # binary, whatever its first byte (random bytes may begin with '[')
    if text.startswith(("{", "[")):
        return "JSON (a placement?)"
    if text.split("\n", 1)[0].count(",") >= 2:
        return "CSV (per-token gate weights, one file per layer? `moeplace import csv` converts those)"
    return None


def file_key(path: str | os.PathLike[str]) -> Any:
    """What makes two paths one file: (device, inode), so links, `..` and relative spellings
    agree; the resolved path for a file that cannot be stat'ed (its reader names the problem)."""
    try:
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    except OSError:
        return Path(path).resolve()


class DuplicateKeyError(ValueError):
    """A JSON object that gives one key twice (json keeps the last without a word)."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook refusing a repeated key: a second num_gpus would silently win."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def loads_json(text: str | bytes, unique_keys: bool = False) -> Any:
    """json.loads that fails with ValueError, never RecursionError, on deeply nested input
    ('[' * 100000 exhausts the parser's recursion limit), so every reader's one-line
    ValueError handling covers it; `unique_keys` refuses a key given twice in one object."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | os.PathLike[str], error: type[Exception] = ValueError) -> Any:
    """Parse a JSON file (a UTF-8 BOM is allowed; a key twice in one object is refused); a
    missing or malformed file raises `error` with one line naming it."""
    p = existing_file(path, "JSON", error)
    try:
        return loads_json(p.read_text(encoding="utf-8-sig"), unique_keys=True)
    except DuplicateKeyError as e:
        raise error(f"{p}: {e}") from None
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
        kind = looks_like(p)
        if kind is not None and not kind.startswith(("JSON", "CSV")):  # JSON is YAML; a CSV line may be too
            raise error(f"{p}: not YAML but {kind}: is it the right file, or are two arguments swapped?") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise error(f"{p}: not valid YAML ({first})") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise error(f"{p}: not valid YAML (nested too deeply)") from None
    except ValueError as e:  # an integer of over 4300 digits: Python's int() refuses to parse it
        raise error(f"{p}: not valid YAML ({' '.join(str(e).split(':')[0].split())})") from None


# What reading a damaged or hostile .npz raises: zipfile (BadZipFile, a CRC mismatch; KeyError;
# NotImplementedError for an unknown compression method, RuntimeError for an encrypted member), the
# decompressors (zlib.error, LZMAError, OSError from bz2), and numpy's .npy reader (ValueError: an
# object array, which needs pickle, or a malformed header; EOFError; TokenError and SyntaxError
# from parsing a garbled header).
NPY_FAILURES = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, LZMAError,
                NotImplementedError, RuntimeError, tokenize.TokenError, SyntaxError)


def read_npz(path: str | os.PathLike[str], what: str, error: type[MoeplaceError] = MoeplaceError,
             members: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of the .npz archive at `path`: every member, or those of `members` it holds (one it
    lacks is left out, for the caller to name). Never unpickles. Every failure (no such file, not a
    zip archive, one bare .npy array, truncated or corrupt data, an object array, a member that is
    not a .npy array) raises `error`, one line naming the file; `what` names the kind of file."""
    p = existing_file(path, what, error)
    with _open_npz(p, error) as z:
        keys = z.files if members is None else [k for k in members if k in z.files]
        return {k: _read_member(z, k, p, error) for k in keys}


def npz_names(path: str | os.PathLike[str], what: str, error: type[MoeplaceError] = MoeplaceError) -> list[str]:
    """The array names in the .npz archive at `path` (no data read); errors as read_npz's."""
    with _open_npz(existing_file(path, what, error), error) as z:
        return list(z.files)


def _open_npz(p: Path, error: type[MoeplaceError]) -> Any:
    """np.load of an .npz archive (an NpzFile, to close), or `error` saying what the file is instead."""
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
        if magic.startswith(b"\x93NUMPY"):  # refused before numpy reads the whole array
            raise error(f"{p}: holds one .npy array, not an .npz archive (a single array, such as an ExFlow "
                        "trace, is named .npy)")
        if not magic.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            kind = looks_like(p)
            raise error(f"{p}: not an .npz file (no zip archive signature{'; it looks like ' + kind if kind else ''})")
        return np.load(p, allow_pickle=False)
    except MoeplaceError:
        raise
    except NPY_FAILURES as e:
        raise error(f"{p}: not a readable .npz: truncated or not an .npz file ({type(e).__name__}: {e})") from None


def _read_member(z: Any, key: str, p: Path, error: type[MoeplaceError]) -> np.ndarray:
    """One array of the open NpzFile `z`, or `error` naming the file and the member."""
    name = key if key in z.zip.namelist() else key + ".npy"  # NpzFile's own mapping of keys to members
    try:
        if not _declared_size_fits(z.zip, name):
            raise error(f"{p}: member {key!r} is truncated (its header declares more data than it holds)")
        value = z[key]
    except MoeplaceError:
        raise
    except ValueError as e:
        raise error(f"{p}: member {key!r} is not a readable array ({e})") from None
    except NPY_FAILURES as e:
        raise error(f"{p}: member {key!r} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(value, np.ndarray):  # NpzFile hands back a member that is not .npy as raw bytes
        raise error(f"{p}: member {key!r} is not a .npy array (truncated or not an .npz file)")
    return value


def _declared_size_fits(zf: zipfile.ZipFile, name: str) -> bool:
    """Whether a .npy member of `zf` holds the data its header declares (npy_data_fits)."""
    info = zf.getinfo(name)
    with zf.open(info) as f:
        return npy_data_fits(f, info.file_size)


def npy_data_fits(f: Any, size: int) -> bool:
    """Whether the .npy stream `f` (at its start; `size` bytes in all) holds the data its header
    declares: checked before numpy allocates the declared shape, which a damaged header can make
    terabytes (a MemoryError, not a clear line). True for what this cannot tell (not .npy, a
    header version without a public reader, a header numpy's own reader will refuse)."""
    try:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return True
        shape, _, dtype = readers[version](f)
    except NPY_FAILURES:  # not .npy, or a garbled header: np.load says what is wrong
        return True
    return math.prod(shape) * dtype.itemsize <= size - f.tell()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def save_npz_atomic(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object stops numpy appending '.npz' to the name
            (np.savez_compressed if compress else np.savez)(f, allow_pickle=False, **arrays)  # never object arrays


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
