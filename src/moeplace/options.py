"""Option types shared by the sub-commands: numbers a solver can use, checked at the command line.

click's FloatRange lets nan and inf through (every comparison with nan is false), and a nan time
limit or an infinite edge weight only fails deep inside a solver; these fail as a usage error.
"""

from __future__ import annotations

import contextlib
import math
import os
import reprlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from moeplace.errors import MoeplaceError
from moeplace.io import file_key


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf."""

    name = "number"  # click words a parse failure as "'x' is not a valid {name}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Count(click.IntRange):
    name = "integer"  # not click's "integer range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            if not isinstance(value, str) or len(value) <= 40:
                raise
            # click would print all 400 digits of `--hidden-size 1000...0`
            self.fail(f"{brief(value)} is not an integer in the range {self._describe_range()}.", param, ctx)


MAX_SEED = 2**63 - 1  # numpy's generators take more, but a placement records the seed as a JSON int64


class Seed(Count):
    """A seed in [0, MAX_SEED]: a 23-digit seed was accepted and written into the placement JSON as
    an integer no int64 reader (jq, Go, Java, numpy) takes back."""

    def __init__(self) -> None:
        super().__init__(min=0, max=MAX_SEED)

    def _describe_range(self) -> str:
        return "0<=x<=2**63-1"  # not 19 digits in --help and errors

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            number = value if isinstance(value, int) else None
            if isinstance(value, str):
                with contextlib.suppress(ValueError):
                    number = int(value.strip())
            if number is None:
                raise
            self.fail(f"{brief(number)} is not a seed: seeds are integers from 0 to 2**63 - 1 "
                      f"({MAX_SEED}).", param, ctx)


class OutputFile(click.Path):
    """A file to write: `-o out/` names a directory (Path would drop the slash and write a file
    called `out`), so a trailing separator is refused."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and value.endswith(("/", os.sep)):
            self.fail(f"{value!r} ends with a path separator, so it names a directory: give a file name", param, ctx)
        return super().convert(value, param, ctx)


class NpzOutputFile(OutputFile):
    """The file a trace or load file (.npz) is written to: its name must end in .npz (any case),
    since readers go by the name: a .npy is read as an ExFlow array by every stage, a .txt or
    .jsonl as text by `trace --data`, and `trace --resume` takes .npz only. A FIFO or device that
    exists is written through whatever its name (check_writable): `-o /dev/null`."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(super().convert(value, param, ctx))
        suffix = path.suffix.lower()
        if suffix == ".npy":
            self.fail(f"{value!r}: this writes an .npz archive, and a .npy name is read as an ExFlow array by "
                      "every stage: name it .npz", param, ctx)
        written_through = path.exists() and not path.is_file() and not path.is_dir()
        if suffix != ".npz" and not written_through:
            self.fail(f"{str(value)!r}: this writes an .npz archive, and readers go by the name (a .txt or .jsonl "
                      "is read as text by trace --data; --resume takes .npz only): name it .npz", param, ctx)
        return path


OUTPUT_FILE = OutputFile()
NPZ_OUTPUT = NpzOutputFile()
SEED = Seed()
NON_NEGATIVE_INT = Count(min=0)
POSITIVE_INT = Count(min=1)
NON_NEGATIVE = FiniteFloat(min=0.0)
POSITIVE = FiniteFloat(min=0.0, min_open=True)
MAX_WEIGHT = 1e6  # relative weights and costs: far past any useful ratio, far below overflow of the edge sums
WEIGHT = FiniteFloat(0.0, MAX_WEIGHT)
# sizes far past any model (DeepSeek-V3: hidden 7168) and any step's batch, far below float overflow
# and the magnitudes an LP solver can handle (a 1e42-token batch broke HiGHS)
MAX_HIDDEN_SIZE = 2**20
MAX_BATCH_TOKENS = 2**40


def given_options(ctx: click.Context, names: Iterable[str]) -> list[str]:
    """Of the parameters `names`, those given on the command line (not defaulted), spelled as in
    --help and in the command's parameter order: for refusing options a run would ignore."""
    wanted = set(names)
    return [max(p.opts, key=len) for p in ctx.command.params
            if p.name in wanted and ctx.get_parameter_source(p.name) not in (None, click.core.ParameterSource.DEFAULT)]


def yaml_number(value: Any) -> float | None:
    """A number read from YAML as a float, None when it is not one: an int or a float, or a
    string holding one (PyYAML reads YAML 1.1, where `1e-1` or `1e308`, with no dot, is a
    string). An integer too large for a float is inf, for the caller's range check to refuse."""
    if isinstance(value, bool):  # YAML `true` is an int to Python
        return None
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class _ShortRepr(reprlib.Repr):
    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:  # past Python's limit on digits printed (YAML reads 0xfff... past it)
            return "<an integer too large to print>"


_SHORT = _ShortRepr()  # a container's repr cut as it is built (a few items, two levels), not after
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxset, _SHORT.maxdict = 2, 3, 3, 3, 3
_SHORT.maxstring = _SHORT.maxother = 30


def brief(value: Any, width: int = 40) -> str:
    """repr(value), cut to about `width` characters: a one-line error about a 400-digit number.
    A list or mapping shows its first few items, two levels deep, only: a YAML alias of aliases
    (`b: [*a, *a, *a]`, `c: [*b, *b, *b]`, ...) is a few lines whose whole repr runs to gigabytes."""
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return _SHORT.repr(value)  # ~100 characters at most: its own limits, and '...' where it cut
    try:
        text = repr(value)
    except ValueError:  # an int past Python's limit on digits printed
        return "an integer too large to print"
    return text if len(text) <= width else f"{text[:width - 20]}... ({len(text)} characters)"


def check_writable(path: Path, option: str = "-o", inputs: Iterable[Path | str | None] = ()) -> None:
    """Fail before a long run, not after it, when `path` cannot be written, or is one of the
    run's `inputs` (a file the run reads would be replaced by what it writes). atomic_path makes
    missing parent directories, so the nearest existing ancestor decides; a real temp file tells
    (os.access says yes to root even on a read-only or pseudo file system)."""
    if path.is_dir():
        raise MoeplaceError(f"{option} {path}: is a directory")
    if path.exists() and not path.is_file():  # /dev/null, a FIFO: written through (io.atomic_path)
        if not os.access(path, os.W_OK):
            raise MoeplaceError(f"{option} {path}: cannot write (no permission)")
        return
    for source in inputs:
        if source is not None and same_file(path, Path(source)):
            raise MoeplaceError(f"{option} {path}: is an input of this run ({source}); write the output elsewhere")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoeplaceError(f"{option} {path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise MoeplaceError(f"{option} {path}: cannot write in {parent} ({e.strerror or e})") from None


def check_output(output: Path, option: str, files: Sequence[Path | None],
                 directories: Sequence[tuple[Path | None, str]]) -> None:
    """Before the run: `output` can be written, is none of the `files` read (a cluster or model
    YAML, a placement) and lies outside every checkpoint directory read ((path or None, the option
    naming it)): `-o CKPT/config.json` would replace the checkpoint's config with a report."""
    check_writable(output, option, inputs=files)
    for directory, name in directories:
        if directory is not None:
            check_outside(output, option, directory, name)


def check_outside(output: Path, option: str, directory: str | Path, name: str) -> None:
    """Refuse an output inside a local directory the run reads (`name`: --model, --tokenizer):
    `-o CKPT/model.safetensors` would replace the checkpoint's weights, and any new file there
    becomes part of the checkpoint. A file of it reached through a link is refused too. A hub
    id (no such local directory) has nothing here to protect."""
    d = Path(directory)
    if not d.is_dir():
        return
    root, real = Path(os.path.abspath(d)), d.resolve()
    inside = Path(os.path.abspath(output)).is_relative_to(root) or output.resolve().is_relative_to(real)
    if not inside and output.is_file():  # a hard link, or a link into a snapshot of the hub cache
        key = file_key(output)
        inside = any(file_key(Path(top) / f) == key for top, _, names in os.walk(d) for f in names)
    if inside:
        raise MoeplaceError(f"{option} {output}: is inside the {name} directory {directory} (it would replace "
                            "or add to the files this run reads); write the output elsewhere")


def same_file(a: Path, b: Path) -> bool:
    """True when both paths name one existing file (through links, `..` or a relative path)."""
    return a.is_file() and b.is_file() and file_key(a) == file_key(b)


def same_directory(a: Any, b: Any) -> bool:
    """Two spellings of one existing local directory (meta strings: a relative and an absolute
    path to one checkpoint, say); False for anything else (a hub id, None)."""
    return (isinstance(a, str) and isinstance(b, str) and Path(a).is_dir() and Path(b).is_dir()
            and file_key(a) == file_key(b))


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn an OS failure while writing `path` (no permission, disk full) into one clear line."""
    try:
        yield
    except OSError as e:
        raise MoeplaceError(f"cannot write {path}: {e.strerror or e}") from None


def plural(n: int, noun: str) -> str:
    """'1 check', '2 checks': counts in messages."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_distinct_outputs(outputs: Iterable[tuple[str, Path | str | None]]) -> None:
    """Refuse two output options naming one file (through links, `..` or a relative spelling;
    a file not written yet by its resolved path): the later write would silently replace the
    earlier one. `outputs`: (option, path or None when not given)."""
    seen: dict[Any, tuple[str, Path | str]] = {}
    for option, path in outputs:
        if path is None:
            continue
        key = file_key(path)
        if key in seen:
            first, first_path = seen[key]
            raise MoeplaceError(f"{option} {path}: is the same file as {first} {first_path}; "
                                "give each output its own file")
        seen[key] = (option, path)


# Activation/weight dtype spellings: trace and serve say torch's names, eval said the short ones;
# every command accepts both. Key: any accepted spelling; value: torch's name (the canonical one).
DTYPE_SPELLINGS: dict[str, str] = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}  # by canonical name


class DtypeChoice(click.Choice):
    """A dtype in either spelling (DTYPE_SPELLINGS), converted to torch's name."""

    def __init__(self, extra: tuple[str, ...] = ()) -> None:
        super().__init__([*DTYPE_SPELLINGS, *extra])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        return DTYPE_SPELLINGS.get(rv, rv)
