"""Shared test fixtures: paths to bundled data and small synthetic traces."""

from __future__ import annotations

import os
from pathlib import Path

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
