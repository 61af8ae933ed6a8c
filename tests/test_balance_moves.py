"""`moeplace solve --objective balance --from CURRENT.json --max-moves N` (balance.balance_moves_placement)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.errors import MoeplaceError
from moeplace.placement import Placement
from moeplace.solve.balance import balance_moves_placement, balance_placement, copy_moves, expected_gpu_loads
from moeplace.solve.migrate import best_copy_relabeling
from moeplace.solve.solver import solve_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import make_loads, save_loads, save_trace

from conftest import SHARED_DATA

MIXTRAL = SHARED_DATA / "mixtral-8x7b-expert-loads" / "mixtral_8x7b_instruct"
LAYERS = 4  # of Mixtral's 32: fast, and enough layers for the per-layer limit to matter


def mixtral(subject: str) -> np.ndarray:
    return np.array(json.loads((MIXTRAL / f"expert_popularity_{subject}.json").read_text())["expert_popularity"],
                    dtype=float)[:LAYERS]


def moved(p: Placement, current: Placement) -> list[int]:
    return [copy_moves(p.holders(layer), current.holders(layer)) for layer in range(p.num_layers)]


def test_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, _ = planted_trace(200, 2, 8, 2, 4, seed=1)
    save_trace(trace, tmp_path / "t.npz")
    cur = tmp_path / "cur.json"
    assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", "--objective", "balance", "-q", "-o", str(cur)]) == 0
    capsys.readouterr()
    out = str(tmp_path / "p.json")
    for extra, says in ((["--objective", "balance", "--max-moves", "2"], "add --from CURRENT.json"),
                        (["--objective", "latency", "--from", str(cur), "--max-moves", "2"], "use --objective balance"),
                        (["--objective", "balance", "--from", str(cur), "--max-moves", "2",
                          "--max-experts-per-gpu-total", "8"], "drop one of them"),
                        (["--objective", "balance", "--from", str(cur), "--max-moves", "-1"], "-1")):
        assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", *extra, "-q", "-o", out]) != 0
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
    with pytest.raises(MoeplaceError, match="add --from CURRENT.json"):  # the library says the same
        solve_placement(trace, 4, objective="balance", max_moves=1)
    with pytest.raises(MoeplaceError, match="whole number"):
        solve_placement(trace, 4, objective="balance", max_moves=-1)
    # CURRENT solved without the replicas this solve asks for: N = 0 could not be met
    assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", "--objective", "balance", "--from", str(cur),
                "--max-moves", "0", "--redundant-experts", "4", "-q", "-o", out]) != 0
    assert "CURRENT's layer 0 holds 8 expert copies, this solve 12" in capsys.readouterr().err


@pytest.mark.skipif(not MIXTRAL.exists(), reason="shared data absent")
@pytest.mark.parametrize("redundant", [0, 8])
def test_limit_holds_and_imbalance_falls_as_it_grows(redundant: int) -> None:
    a, b = mixtral("international_law"), mixtral("high_school_mathematics")
    # time limits far above what the solves take (about a second): a limit that cuts a layer's ILP
    # changes the result, so on a loaded machine a 2 s limit made N = 4 end above N = 2
    current = balance_placement(a, 8 if redundant else 4, 8 if redundant else 4, redundant, time_limit=60.0)
    gpus = current.num_gpus
    plain = balance_placement(b, gpus, gpus, redundant, time_limit=60.0)
    values = []
    for n in (0, 1, 2, 4, 100):
        p = balance_moves_placement(b, gpus, gpus, redundant, 60.0, None, current, n)
        assert not p.solver["stopped_by_time_limit"], (n, p.solver)
        per_layer = moved(p, current)
        assert max(per_layer) <= n and p.objective["max_moves"]["moved_per_layer"] == per_layer
        mean = b.sum(1) / gpus
        assert p.objective["value"] == pytest.approx((expected_gpu_loads(p, b).max(1) / mean).mean())
        assert p.bound <= p.objective["value"] + 1e-9
        slots = np.array([[len(p.experts_on_gpu(layer, g)) for g in range(gpus)] for layer in range(LAYERS)])
        assert slots.sum(1).tolist() == [8 + redundant] * LAYERS and slots.max() <= (8 + redundant) // gpus
        if n == 0:  # CURRENT itself, in its own GPU names
            assert all(p.holders(layer) == current.holders(layer) for layer in range(LAYERS))
            assert p.expert_to_gpu.tolist() == current.expert_to_gpu.tolist()
        values.append(p.objective["value"])
    # per layer, layouts within 1e-6 of the mean load count as tied and the one with fewer moves
    # wins (balance_moves_placement's documented rule), so a larger N may end up to 1e-6 higher
    assert all(later <= earlier + 1e-6 for earlier, later in zip(values, values[1:])), values
    assert values[-1] < values[0] - 0.01  # the limit binds: CURRENT is well off B's balance
    assert values[-1] == pytest.approx(plain.objective["value"], abs=1e-5)  # no limit: the plain solve's value
    assert p.objective["max_moves"]["plain"]["value"] == pytest.approx(plain.objective["value"], abs=1e-5)


def test_copy_relabeling_is_best_over_all_permutations() -> None:
    import itertools

    rng = np.random.default_rng(0)
    new = [[sorted(rng.choice(4, 1 + (e % 2), replace=False).tolist()) for e in range(6)] for _ in range(3)]
    cur = [[sorted(rng.choice(4, 1 + (e % 3 == 0), replace=False).tolist()) for e in range(6)] for _ in range(3)]
    label = best_copy_relabeling(new, cur, 4, 4)

    def kept(lab: tuple[int, ...] | np.ndarray) -> int:
        return sum(len({int(lab[g]) for g in n} & set(c)) for ln, lc in zip(new, cur) for n, c in zip(ln, lc))

    assert kept(label) == max(kept(p) for p in itertools.permutations(range(4)))


def test_cli_loads_summary_and_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    save_loads(make_loads(rng.integers(10, 1000, size=(3, 8))), tmp_path / "a.npz")
    save_loads(make_loads(rng.integers(10, 1000, size=(3, 8))), tmp_path / "b.npz")
    cur = tmp_path / "cur.json"
    assert run(["solve", str(tmp_path / "a.npz"), "--gpus", "4", "--redundant-experts", "4", "-q", "-o", str(cur)]) == 0
    capsys.readouterr()
    assert run(["solve", str(tmp_path / "b.npz"), "--gpus", "4", "--redundant-experts", "4", "--from", str(cur),
                "--max-moves", "1", "--time-limit", "4", "-o", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    doc = json.loads((tmp_path / "p.json").read_text())
    mm = doc["objective"]["max_moves"]
    assert mm["N"] == 1 and max(mm["moved_per_layer"]) <= 1 and mm["of"] == 36
    assert f"--max-moves 1: moved {mm['moved']} of 36 expert copies" in text and "the plain balance solve" in text
    assert doc["migration"]["moved"] <= mm["moved"]  # a moved primary is a moved copy
