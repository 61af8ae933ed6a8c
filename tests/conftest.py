"""Shared test fixtures: paths to bundled data and small synthetic traces."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeplace.trace.format import Trace, make_trace

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model hubs are unreachable: fail fast, never hang
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def small_trace() -> Trace:
    """24 tokens x 3 layers x top-2 over 8 experts, with weights, sequences and positions."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(24)])
    w = rng.random((24, 3, 2)).astype(np.float32)
    w = -np.sort(-w, axis=-1)
    return make_trace(ids, w, 8, sequence_ids=np.repeat(np.arange(4), 6), positions=np.tile(np.arange(6), 4))


@pytest.fixture(scope="session")
def one_rank_runtime() -> Callable[[Path], Any]:
    """A factory: the coherent-mode runtime of a checkpoint on one CPU rank, built as `moeplace
    serve` builds it, with RANK/WORLD_SIZE of the environment out of the way."""
    from unittest import mock

    from moeplace.serve.engine import build_runtime

    def build(model: Path) -> Any:
        with mock.patch.dict(os.environ):
            for key in ("RANK", "WORLD_SIZE"):
                os.environ.pop(key, None)
            return build_runtime(str(model), None, "coherent", timeout_s=60, device="cpu")
    return build


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """test_serve_stream's chat checkpoint (`chat_checkpoint`: byte tokenizer, chat template, EOS
    ids whose greedy answers stop within a few tokens), built once for the serve tests that read
    it. Shared, so read-only: a test that would change it copies it first; the session's end
    checks that none did."""
    from test_serve_stream import chat_checkpoint

    path = chat_checkpoint(tmp_path_factory.mktemp("chat-model") / "chat")
    before = tree_state(path)
    yield path
    assert tree_state(path) == before, f"a test changed the shared chat checkpoint {path}: copy it first"


@pytest.fixture(scope="session")
def chat_tokenizer(chat_model: Path) -> Any:
    """`chat_model`'s tokenizer, loaded as `moeplace serve` loads it (tests only read it)."""
    from moeplace.serve.cli import load_tokenizer

    return load_tokenizer(str(chat_model))


def tree_state(path: Path) -> list[tuple[str, int, int]]:
    """Each file under `path`: (relative path, size, mtime in ns): what a write would change."""
    return sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                  for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="session")
def serving() -> Callable[..., Any]:
    """A factory of context managers: rank 0's HTTP loop (`serve_forever`) on a one-rank runtime,
    in a thread, with `tokenizer` (and a RoutingLog for --routing-out), yielding its port;
    stopped through its heartbeat on exit (a failed collective, as a dead rank: a RoutingLog
    then writes), which the exit waits for."""
    import contextlib
    import threading
    from unittest import mock

    import moeplace.serve.httpserver as hs
    from moeplace.serve.cli import CONTIGUOUS

    @contextlib.contextmanager
    def serve(rt: Any, tokenizer: Any, max_new_tokens: int = 16, model_name: str = "m",
              routing: Any = None) -> Iterator[int]:
        stop = threading.Event()
        beat = hs.send_command

        def heartbeat(rt: Any, cmd: int, req: Any = None) -> None:
            if stop.is_set():
                raise RuntimeError("test over")
            beat(rt, cmd, req)

        srv = hs.make_server("127.0.0.1", 0)

        def loop() -> None:
            try:
                hs.serve_forever(rt, srv, tokenizer, 8, max_new_tokens, heartbeat_s=0.1, model_name=model_name,
                                 placement={"placement": CONTIGUOUS, "placement_sha256": None}, routing=routing)
            except RuntimeError:
                pass

        with mock.patch.object(hs, "send_command", heartbeat), mock.patch.dict(os.environ):
            os.environ.pop("TORCHELASTIC_RUN_ID", None)  # no launcher to watch
            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            try:
                yield srv.server_address[1]
            finally:
                stop.set()
                thread.join(30)
                assert not thread.is_alive()
    return serve


@pytest.fixture(scope="session")
def ctrl_c_at_batch() -> Callable[[int], Callable[..., Iterator[Any]]]:
    """A factory: an `iter_batches` (trace/text.py, as it is at session start) that raises
    KeyboardInterrupt (Ctrl-C) while batch n is being produced; monkeypatch it in."""
    from moeplace.trace import text

    real = text.iter_batches

    def stop_after(n: int) -> Callable[..., Iterator[Any]]:
        def batches(*args: Any, **kw: Any) -> Iterator[Any]:
            for i, b in enumerate(real(*args, **kw)):
                if i == n:
                    raise KeyboardInterrupt
                yield b
        return batches
    return stop_after
