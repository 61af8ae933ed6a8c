"""PNG figures of an analysis: load heatmap, transition heatmaps, affinity per layer pair.

matplotlib is imported only here and only when a figure is drawn; figures are built with the
object API (no pyplot global state, no display needed) and written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moeplace.analyze.report import decoder_differs, layer_label, pair_label
from moeplace.io import atomic_path
from moeplace.options import plural

# One colour per input (A, B); capture depths m are told apart by marker.
TRACE_COLORS = ("tab:blue", "tab:orange")
MODE_TITLES = {"top1": "top-1", "topk": "top-k (k x k pairs)", "gated": "gate-weighted top-k"}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def _pair_ticks(layer_names: Sequence[int]) -> list[str]:
    """Tick labels of the layer pairs: MoE numbers ("0>1"), decoder numbers below where they differ."""
    both = decoder_differs(layer_names)
    return [f"{a}>{a + 1}" + (f"\n({layer_names[a]}>{layer_names[a + 1]})" if both else "")
            for a in range(len(layer_names) - 1)]


def _axis_name(layer_names: Sequence[int], what: str) -> str:
    """An axis's name: what the ticks count, and that the bracketed numbers are decoder layers."""
    return f"{what} (decoder numbers in brackets)" if decoder_differs(layer_names) else what


def _thin(labels: Sequence[str], most: int = 16) -> tuple[list[int], list[str]]:
    """Positions and labels of at most `most` evenly spaced ticks (deep models have 60 layers)."""
    step = -(-len(labels) // most)
    pos = list(range(0, len(labels), step))
    return pos, [labels[i] for i in pos]


def load_heatmap(loads: Sequence[np.ndarray], names: Sequence[str], layer_names: Sequence[int], path: Path) -> Path:
    """Relative load (selections / layer mean) of each expert, one panel per trace. loads: [L, E] each."""
    from matplotlib.colors import TwoSlopeNorm

    rel = [x / np.where(x.mean(1, keepdims=True) > 0, x.mean(1, keepdims=True), 1.0) for x in loads]
    # diverging around 1.0: blue = under-loaded, red = over-loaded
    norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, *(float(r.max()) for r in rel)))
    num_layers, num_experts = loads[0].shape
    fig = _figure(min(4 + 0.12 * num_experts, 16) * len(loads), min(1.8 + 0.3 * num_layers, 10))
    axes = fig.subplots(1, len(loads), squeeze=False)[0]
    for ax, r, name in zip(axes, rel, names):
        im = ax.imshow(r, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(f"{name}: expert load / layer mean")
        ax.set_xlabel("expert")
        ax.set_ylabel(_axis_name(layer_names, "MoE layer"))
        both = decoder_differs(layer_names)
        ax.set_yticks(*_thin([f"{i} ({n})" if both else str(i) for i, n in enumerate(layer_names)], 24))
    fig.colorbar(im, ax=list(axes), label="load / mean (1 = even)")
    return _save(fig, path)


def transition_heatmaps(
    conditionals: Sequence[np.ndarray],
    names: Sequence[str],
    pairs: Sequence[int],
    layer_names: Sequence[int],
    mode: str,
    path: Path,
) -> Path:
    """P(expert j at l+1 | expert i at l) for the chosen pairs; a row of panels per trace.

    conditionals: [L-1, E, E] per trace. The colour scale is capped at the 99.5th percentile of
    the non-zero cells so a few certain transitions do not wash out the rest.
    """
    shown = np.concatenate([c[pairs].ravel() for c in conditionals])
    nonzero = shown[shown > 0]
    vmax = float(np.quantile(nonzero, 0.995)) if nonzero.size else 1.0
    fig = _figure(3.4 * len(pairs) + 1.2, 3.4 * len(conditionals) + 0.4)
    axes = fig.subplots(len(conditionals), len(pairs), squeeze=False)
    for row, (cond, name) in enumerate(zip(conditionals, names)):
        for col, pair in enumerate(pairs):
            ax = axes[row, col]
            # aspect "auto": a fixed aspect shrinks each panel inside its grid cell after the
            # layout engine placed the labels, so one row's x-labels ran into the next row's titles
            im = ax.imshow(cond[pair], cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest", aspect="auto")
            ax.set_title(f"{name}\nMoE layers {pair_label(layer_names, pair)}", fontsize=9)
            ax.set_xlabel(f"expert j at MoE layer {layer_label(layer_names, pair + 1)}", fontsize=9)
            ax.set_ylabel(f"expert i at MoE layer {layer_label(layer_names, pair)}", fontsize=9)
    fig.suptitle(f"P(j | i), {MODE_TITLES[mode]}")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="P(j | i)", shrink=0.8)
    return _save(fig, path)


def affinity_plot(
    affinities: Sequence[dict[str, Any]],
    names: Sequence[str],
    layer_names: Sequence[int],
    log_num_experts: float,
    path: Path,
    title: str = "",
) -> Path:
    """Per layer pair: MI vs its shuffled baseline (top row) and top-m capture (bottom), per mode.

    affinities: the `affinity()` result of each trace (same pairs; modes drawn if all have them).
    names: short legend keys ("A", "B"); `title` says which file each is (legends that long overflow).
    """
    modes = [m for m in affinities[0]["modes"] if all(m in a["modes"] for a in affinities)]
    labels = _pair_ticks(layer_names)
    x = np.arange(len(labels))
    ms = 6 if len(labels) <= 16 else 3  # marker size: keep deep models' lines readable
    fig = _figure(max(4.2, 0.1 * len(labels)) * len(modes) + 0.5, 6.4)
    axes = fig.subplots(2, len(modes), squeeze=False)
    for col, mode in enumerate(modes):
        ax_mi, ax_cap = axes[0, col], axes[1, col]
        for aff, name, color in zip(affinities, names, TRACE_COLORS):
            rows = aff["modes"][mode]["per_pair"]
            mi = np.array([r["mi"] for r in rows])
            base = np.array([r.get("mi_baseline", np.nan) for r in rows])
            std = np.array([r.get("mi_baseline_std", 0.0) for r in rows])
            ax_mi.plot(x, mi, "o-", color=color, markersize=ms, label=f"{name}: MI")
            # the +-2 std band of the shuffles is usually thinner than the line (0.001-0.02 nats):
            # drawn, it was invisible; its width goes in the legend instead
            ax_mi.plot(x, base, "--", color=color, alpha=0.8,
                       label=f"{name}: shuffled mean (2 std <= {2 * np.nanmax(std, initial=0.0):.2g} nats)")
            for m, marker in zip(rows[0]["capture"], "os^"):
                ax_cap.plot(x, [r["capture"][m] for r in rows], marker + "-", color=color, markersize=ms,
                            label=f"{name}: top-{m}")
                if "capture_baseline" in rows[0]:
                    ax_cap.plot(x, [r["capture_baseline"][m] for r in rows], marker + ":", color=color,
                                markersize=ms, alpha=0.5, markerfacecolor="none")
        ax_mi.set_title(f"{MODE_TITLES[mode]}: MI (log E = {log_num_experts:.2f})", fontsize=10)
        ax_mi.set_ylabel("nats")
        ax_mi.set_ylim(bottom=0)
        ax_cap.set_title("top-m successor capture (dotted: shuffled)", fontsize=10)
        ax_cap.set_ylim(0, 1.02)
        ax_cap.set_ylabel("share of transitions")
        for ax in (ax_mi, ax_cap):
            ax.set_xticks(*_thin(labels), rotation=45 if len(labels) > 8 else 0, fontsize=8)
            ax.set_xlabel(_axis_name(layer_names, "MoE layer pair"))
            ax.grid(alpha=0.3)
        ax_mi.legend(fontsize=7)
        ax_cap.legend(fontsize=7, ncol=len(affinities))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def learning_curve_plot(curve: dict[str, Any], title: str, path: Path) -> Path:
    """Held-out (mean +- standard error over splits) and in-sample ratio to contiguous against the
    number of training tokens (log x), one panel per metric; `curve` is report["learning_curve"]."""
    points = curve["points"]
    n = np.array([p["tokens"] for p in points], dtype=np.float64)
    fig = _figure(9.0, 3.8)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    for ax, metric, name in zip(axes, ("cross_gpu_top1", "dest_gpus_topk"), ("cross-GPU top-1", "dest GPUs top-k")):
        held = np.array([np.nan if p["held_out"][metric]["mean"] is None else p["held_out"][metric]["mean"]
                         for p in points])
        se = np.array([p["held_out"][metric]["se"] or 0.0 for p in points])
        own = np.array([np.nan if p["in_sample"][metric]["mean"] is None else p["in_sample"][metric]["mean"]
                        for p in points])
        ax.errorbar(n, held, yerr=se, fmt="o-", color=TRACE_COLORS[0], capsize=3,
                    label=f"held-out (+- 1 SE, {curve['splits']} splits)")
        ax.plot(n, own, "s--", color=TRACE_COLORS[0], alpha=0.6, markerfacecolor="none", label="in-sample")
        ax.set_xscale("log")
        ax.set_xticks(n, [str(int(x)) for x in n])
        ax.minorticks_off()
        ax.set_xlabel("training tokens (log scale)")
        ax.set_ylabel("ratio to contiguous (lower is better)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    tests = sorted(set(curve["test_tokens"]))
    test = str(tests[0]) if len(tests) == 1 else f"{tests[0]}-{tests[-1]}"
    fig.suptitle(f"{title}: learning curve on {plural(curve['num_gpus'], 'GPU')}, {test} held-out tokens per split",
                 fontsize=10)
    return _save(fig, path)
