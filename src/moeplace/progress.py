"""Progress on stderr for long work: a line per update when not a TTY, a rewritten line on a TTY."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

_silenced = False


@contextlib.contextmanager
def silenced(quiet: bool = True) -> Iterator[None]:
    """Every Progress made inside is off (a command's --quiet: the bars live deep in the stages)."""
    global _silenced
    before, _silenced = _silenced, _silenced or quiet
    try:
        yield
    finally:
        _silenced = before


class Progress:
    """Reports at most every `every` seconds; silent for work that finishes within `after` s.

    With a `total`, each line shows the share done and, once `eta_after` of it is done (before,
    the estimate is mostly noise: warm-up, first-batch costs), the time left at the average rate so far.
    """

    eta_after = 0.03

    def __init__(self, label: str, total: float | None = None, every: float = 0.5, after: float = 1.0,
                 enabled: bool = True) -> None:
        self.label, self.total, self.every, self.after = label, total, every, after
        self.enabled = enabled and not _silenced
        self.start = time.monotonic()
        self._last = 0.0
        self._tty = sys.stderr.isatty()
        self._shown = False

    def update(self, done: float, note: str = "") -> None:
        now = time.monotonic()
        if not self.enabled or now - self.start < self.after or now - self._last < self.every:
            return
        self._last = now
        elapsed = now - self.start
        share = min(max(done / self.total, 0.0), 1.0) if self.total else None
        frac = f" {share:5.1%}" if share is not None else ""
        eta = f", ~{_duration(elapsed * (1 - share) / share)} left" if share and share >= self.eta_after else ""
        msg = f"{self.label}:{frac} {note} [{elapsed:.1f}s{eta}]"
        if self._tty:
            sys.stderr.write("\r\x1b[K" + msg)
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()
        self._shown = True

    def close(self, note: str = "") -> None:
        if self.enabled and (self._shown or note):
            end = "\n" if self._tty and self._shown else ""
            msg = f"{self.label}: done {note} [{time.monotonic() - self.start:.1f}s]"
            sys.stderr.write(("\r\x1b[K" if self._tty and self._shown else "") + msg + "\n" if note else end)
            sys.stderr.flush()


def _duration(seconds: float) -> str:
    """A short rounded duration: 8s, 4m10s, 2h05m."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
