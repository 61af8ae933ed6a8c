"""Outputs that are not plain files: a symlink is written through (the link stays), a FIFO or
device gets the bytes (never replaced by a regular file: as root, `-o /dev/null` would otherwise
replace the system's /dev/null)."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from moeplace import cli
from moeplace.io import atomic_path, write_text_atomic
from moeplace.trace.format import Trace, save_trace


def _drain(fifo: Path, into: list[bytes]) -> threading.Thread:
    def read() -> None:
        with open(fifo, "rb") as f:
            into.append(f.read())
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_written_through_not_replaced(tmp_path: Path) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = _drain(fifo, got)
    write_text_atomic(fifo, "hello\n")
    reader.join(10)
    assert got == [b"hello\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out.fifo"]  # no temp file left beside it


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_failed_write_sends_nothing_to_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    with pytest.raises(RuntimeError):
        with atomic_path(fifo) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # never opened: opening would block with no reader


def test_symlink_output_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text('{"old": 1}')
    link = tmp_path / "link.json"
    link.symlink_to(real.name)
    write_text_atomic(link, '{"new": 1}')
    assert link.is_symlink() and os.readlink(link) == real.name
    assert json.loads(real.read_text()) == {"new": 1}
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to("later.json")
    write_text_atomic(dangling, "x")
    assert dangling.is_symlink() and (tmp_path / "later.json").read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_solve_into_a_fifo(tmp_path: Path, small_trace: Trace) -> None:
    save_trace(small_trace, tmp_path / "t.npz")
    fifo = tmp_path / "placement.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = _drain(fifo, got)
    assert cli.run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", "-q", "-o", str(fifo)]) == 0
    reader.join(30)
    assert json.loads(got[0])["format"] == "moeplace.placement/v1"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.parametrize("argv", [["solve", "{t}", "--gpus", "4"], ["import", "exflow", "{npy}"]])
def test_output_with_a_trailing_separator_is_refused(argv: list[str], tmp_path: Path, small_trace: Trace,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    # `-o out/` names a directory; pathlib drops the slash, so it wrote a file called `out`
    save_trace(small_trace, tmp_path / "t.npz")
    np.save(tmp_path / "x.npy", small_trace.topk_ids[:, :, 0])
    args = [a.format(t=tmp_path / "t.npz", npy=tmp_path / "x.npy") for a in argv]
    assert cli.run([*args, "-o", f"{tmp_path / 'out'}/"]) == 2
    assert "ends with a path separator, so it names a directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_reading_the_umask_does_not_change_it() -> None:
    # os.umask(0) and back, on every write, let another thread's new file come out world-writable
    from moeplace.io import current_umask

    old = os.umask(0o027)
    try:
        seen: list[int] = []
        real_umask = os.umask

        def watch(mask: int) -> int:
            seen.append(mask)
            return real_umask(mask)

        os.umask = watch  # type: ignore[assignment]
        try:
            assert current_umask() == 0o027
        finally:
            os.umask = real_umask  # type: ignore[assignment]
        if Path("/proc/self/status").exists():
            assert seen == []  # read from /proc, never set
    finally:
        os.umask(old)


def test_trace_meta_may_hold_numpy_values(tmp_path: Path) -> None:
    from moeplace.trace.format import load_trace, make_trace

    t = make_trace(np.array([[[0, 1]], [[1, 0]]]), num_experts=2, meta={"moe_layers": np.arange(1), "n": np.int64(3)})
    save_trace(t, tmp_path / "t.npz")  # Placement.save took numpy values; save_trace raised TypeError
    assert load_trace(tmp_path / "t.npz").meta["moe_layers"] == [0]
