"""`moeplace analyze`: does this model's routing have affinity worth exploiting?"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Iterator

import click
import numpy as np

from moeplace.analyze.affinity import trace_modes
from moeplace.analyze.report import (
    AnalyzeConfig,
    Source,
    build_report,
    decoder_differs,
    layer_names,
    number_ranges,
    source_loads,
    summary,
)
from moeplace.errors import MoeplaceError, TraceError, warn
from moeplace.io import locked_stage, read_json, write_json_atomic
from moeplace.options import POSITIVE, POSITIVE_INT, SEED, given_options, same_file
from moeplace.placement import check_topology
from moeplace.progress import silenced
from moeplace.trace.format import Trace, is_load_only, load_loads, load_trace

JSON_NAME = "analyze.json"
MAX_DEFAULT_GPUS = 8


def default_gpus(num_experts: int) -> int:
    """8 GPUs, or the largest divisor of E below that (so every GPU holds E/G experts)."""
    return max(g for g in range(1, MAX_DEFAULT_GPUS + 1) if num_experts % g == 0)


def check_solve_cluster(num_experts: int, num_gpus: int, gpus_per_node: int, gpus_given: bool) -> None:
    """The placement-transfer test's cluster: placement's check_topology rules, with analyze's
    ways out (a divisor of E for --gpus, or --no-solve), not solve's (--objective balance,
    --redundant-experts), which analyze has not."""
    fits = ", ".join(str(g) for g in range(1, num_experts + 1) if num_experts % g == 0)
    remedy = (f"give --gpus one of {fits} (the placement-transfer test gives every GPU E/G experts), or "
              "--no-solve without it")
    check_topology(num_experts, num_gpus, gpus_per_node, hint=remedy, fewer_gpus=remedy,
                   gpus_named=f"--gpus {num_gpus}" + ("" if gpus_given else f" (the default for {num_experts} experts)"),
                   per_node_hint=f"give a --gpus-per-node that divides {num_gpus}, or --no-solve without the two")


def parse_pairs(spec: str | None, num_pairs: int, decoder: list[int] | None = None) -> list[int]:
    """Layer pairs to draw: "0,3,5-6", pair l being MoE layer l -> l+1 with MoE layers counted
    from 0 as the report prints them (and solve and eval count them); `decoder`, the model's
    layer numbers, only words the error. Default: up to four pairs spread from first to last.
    """
    if num_pairs < 1:
        if spec is not None:  # refused, not ignored, as every option that cannot apply
            raise MoeplaceError(f"--layers {spec!r}: the trace has one MoE layer, so no layer pairs to draw")
        return []
    if spec is None:
        return sorted({int(round(x)) for x in np.linspace(0, num_pairs - 1, min(4, num_pairs))})
    pairs: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if last < first:
                raise ValueError(part)
            if first < 0 or last >= num_pairs:  # before expanding: '0-99999999999' is refused, not built
                mapping = (f"; MoE layers 0-{num_pairs} are decoder layers {number_ranges(decoder)}"
                           if decoder and decoder_differs(decoder) else "")
                raise MoeplaceError(f"--layers {spec!r}: pair indices must be in [0, {num_pairs - 1}] "
                                    f"(pair l is MoE layer l -> l+1, MoE layers counted from 0{mapping})")
            pairs += list(range(first, last + 1))
    except ValueError:
        raise MoeplaceError(f"--layers {spec!r}: expected comma-separated pair indices or ranges, e.g. 0,3,5-6") from None
    return sorted(set(pairs))


def load_source(path: str) -> Source:
    """A per-token trace, or a load-only file (moeplace.loads/v1) when that is what `path` holds."""
    return load_loads(path) if is_load_only(path) else load_trace(path)


def _check_compatible(a: Source, b: Source, path_b: str) -> None:
    """B must be routing of A's model: the same shape, and the same MoE layers where both metas
    name them (a relabelled or other model's trace would be drawn under A's layer labels). A
    different top-k is allowed but said: load skew and MI differ with k alone."""
    if (a.num_layers, a.num_experts) != (b.num_layers, b.num_experts):
        raise TraceError(
            f"{path_b}: --compare needs an input of the same model, but it has {b.num_layers} MoE layers x "
            f"{b.num_experts} experts and TRACE has {a.num_layers} x {a.num_experts}"
        )
    layers_a, layers_b = a.meta.get("moe_layers"), b.meta.get("moe_layers")
    if isinstance(layers_a, list) and isinstance(layers_b, list) and layers_a != layers_b:
        raise TraceError(f"{path_b}: --compare needs the same MoE layers, but its meta lists {layers_b} and "
                         f"TRACE's {layers_a}: routing of another model (or of other layers)")
    if isinstance(a, Trace) and isinstance(b, Trace) and a.routing_sha256() == b.routing_sha256():
        warn(f"{path_b} holds the same routing as TRACE: the domain-shift figures compare a trace with itself")
    if isinstance(a, Trace) and isinstance(b, Trace) and a.top_k != b.top_k:
        warn(f"{path_b} routes each token to {b.top_k} experts and TRACE to {a.top_k}: load skew, MI and "
             "capture differ with k alone, not only with the text")


# Options of the parts a load-only input does not get: affinity, stability halves and placement
# transfer need per-token paths in some input (LOADS --compare TRACE solves TRACE's halves, with
# --time-limit, --gpus and --seed), the transition heatmaps in every input. Given when no input
# uses them, they are refused rather than silently ignored; the load-skew part's options (-o,
# --compare, --hottest, --no-figures, -q) apply to any input.
PER_TOKEN_OPTIONS = ("shuffles", "seed", "gpus", "gpus_per_node", "time_limit", "no_solve", "learning_curve",
                     "curve_splits")
HEATMAP_OPTIONS = ("layers_spec", "heatmap_mode")
SOLVE_OPTIONS = ("gpus", "gpus_per_node", "time_limit")  # the placement-transfer part's


def _refuse_inapplicable(ctx: click.Context, sources: dict[str, tuple[Source, str]]) -> None:
    """One line naming every option given on the command line that cannot apply to these inputs."""
    load_only = [path for source, path in sources.values() if not isinstance(source, Trace)]
    if not load_only:
        return
    every = len(load_only) == len(sources)
    given = given_options(ctx, HEATMAP_OPTIONS + (PER_TOKEN_OPTIONS if every else ()))
    if not given:
        return
    what = " and ".join(load_only)
    if every:
        raise MoeplaceError(f"{', '.join(given)}: not applicable to a load-only input ({what}: expert loads, no "
                            "per-token paths), which gets the load skew only; drop "
                            f"{'it' if len(given) == 1 else 'them'}")
    raise MoeplaceError(f"{', '.join(given)}: the transition heatmaps need per-token paths in every input, and "
                        f"{what} is load-only (expert loads); drop {'it' if len(given) == 1 else 'them'}")


def _refuse_skipped(ctx: click.Context, no_solve: bool, no_figures: bool) -> None:
    """One line naming the options of a part --no-solve or --no-figures skips: they were
    accepted and ignored (even a --gpus the solve would refuse)."""
    for skipped, flag, names in ((no_solve, "--no-solve", SOLVE_OPTIONS), (no_figures, "--no-figures", HEATMAP_OPTIONS)):
        if skipped and (given := given_options(ctx, names)):
            one = len(given) == 1
            raise MoeplaceError(f"{', '.join(given)}: {flag} skips the part {'it sets' if one else 'they set'}; "
                                f"drop {'it' if one else 'them'} or {flag}")


@click.command("analyze", context_settings={"max_content_width": 100})
@click.argument("trace_path", metavar="TRACE")
@click.option("-o", "--output", "out_dir", default=None, metavar="DIR",
              help="Directory for analyze.json and the PNG figures (created if needed). "
                   "[default: analyze-<TRACE name>]")
@click.option("--compare", "compare_path", default=None, metavar="B.npz",
              help="A second trace of the same model (e.g. another domain): its statistics side by side, "
                   "transition-matrix correlation and placement gain transferred from TRACE to B.")
@click.option("--layers", "layers_spec", default=None, metavar="PAIRS",
              help="Layer pairs for the transition heatmaps: '0,3,5-6', where pair l is MoE layer l -> l+1 "
                   "and MoE layers are counted from 0, as the report's tables print them (and solve and eval "
                   "count them), not by the model's decoder layer numbers: on a model whose MoE layers are "
                   "decoder layers 2-9, pair 0 is the tables' row 0>1, decoder 2>3. "
                   "[default: up to 4 spread from first to last]")
@click.option("--gpus", type=POSITIVE_INT, default=None, metavar="N",
              help="GPUs for the placement-transfer test and --learning-curve (1: no cross-GPU traffic, so the "
                   "test measures nothing and says so). [default: 8, or the largest divisor of E below 8]")
@click.option("--gpus-per-node", type=POSITIVE_INT, default=None, metavar="N", help="GPUs per node. [default: all GPUs in one node]")
@click.option("--time-limit", type=POSITIVE, default=10.0, show_default=True, metavar="SECONDS",
              help="Seconds per placement solve (two per comparison; up to 4 x --curve-splits for "
                   "--learning-curve).")
@click.option("--no-solve", is_flag=True, help="Skip the placement-transfer test (statistics only; fast).")
@click.option("--learning-curve", is_flag=True,
              help="Is TRACE long enough to solve on? Per split, hold out a quarter of the tokens and solve on "
                   "nested training sets of 1/8, 1/4, 1/2 and all of the rest (sizes under max(25, E) tokens "
                   "skipped), scoring every placement on the same held-out tokens: up to 4 x --curve-splits solves "
                   "of up to --time-limit each (FLAME, 8 GPUs: 6 solves, ~15 s). Uses --gpus (or its default) and "
                   "--gpus-per-node; writes learning_curve.png and a verdict.")
@click.option("--curve-splits", type=click.IntRange(2, 100), default=2, show_default=True, metavar="S",
              help="Seeded splits of --learning-curve (standard errors over them).")
@click.option("--shuffles", type=click.IntRange(1, 1000), default=8, show_default=True,
              help="Token shuffles for the MI / capture baseline (mean and std reported).")
@click.option("--hottest", type=click.IntRange(1, 100), default=4, show_default=True,
              help="Hottest experts listed per layer.")
@click.option("--heatmap-mode", type=click.Choice(["top1", "topk", "gated"]), default=None,
              help="Transitions drawn in the heatmaps. [default: topk, or top1 when k = 1]")
@click.option("--no-figures", is_flag=True, help="Write the JSON only.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the shuffles, the halves split and the solver.")
@click.option("-q", "--quiet", is_flag=True, help="No summary on stdout, no progress on stderr.")
def analyze(
    trace_path: str,
    out_dir: str | None,
    compare_path: str | None,
    layers_spec: str | None,
    gpus: int | None,
    gpus_per_node: int | None,
    time_limit: float,
    no_solve: bool,
    learning_curve: bool,
    curve_splits: int,
    shuffles: int,
    hottest: int,
    heatmap_mode: str | None,
    no_figures: bool,
    seed: int,
    quiet: bool,
) -> None:
    """Report load skew, inter-layer affinity and its stability for TRACE, with figures.

    TRACE is a v1 trace (.npz) or an ExFlow .npy; a load-only .npz (moeplace.loads/v1) gets the
    load skew (and, with --compare, the per-layer load correlation) only. Options of a part no
    input gets are refused: --shuffles, --seed, --gpus, --gpus-per-node, --time-limit,
    --no-solve and --curve-splits when no input has per-token paths (LOADS --compare B.npz
    still solves B's halves: they apply), --learning-curve when TRACE is load-only, --layers and
    --heatmap-mode whenever an input is load-only.

    \b
    Answers, per MoE layer and per consecutive layer pair l -> l+1:
      load skew      max/mean, coefficient of variation, Gini, entropy, hottest experts;
      affinity       P(j at l+1 | i at l) for top-1, top-k and gate-weighted top-k choices;
                     its conditional entropy (vs log E); mutual information beside a
                     token-shuffled baseline (mean +- std of --shuffles shuffles), which
                     absorbs the upward bias of MI on few tokens; share of transitions going
                     to each expert's top-1/2/4 successors (real and shuffled);
      stability      two seeded halves (by sequence when the trace has sequence ids):
                     correlation of transition matrices, top-m capture of one half by the
                     other's successors, and the placement gain transferred: a placement
                     solved on half 1 replayed on half 2, vs one solved on half 2;
      trace length   (--learning-curve) held-out ratio to contiguous of placements
                     solved on 1/8 .. all of the non-held-out tokens: still improving
                     (trace more) or flat (long enough for --gpus).

    \b
    Outputs (in -o DIR): analyze.json (everything above), load_heatmap.png,
    transitions.png (P(j | i) of the --layers pairs), affinity.png (MI vs shuffled and
    top-m capture per layer pair), learning_curve.png (--learning-curve); a figure
    that an earlier run's analyze.json in DIR lists and this run does not draw
    (--no-figures, load-only input) is removed. All outputs are written first and then
    moved into DIR together: an error or interrupt leaves DIR as it was (the hidden temp
    directory of a run killed outright is removed by the next run into DIR). A summary is
    printed; progress goes to stderr.

    \b
    Examples:
      moeplace analyze traces/flame-moe-290m-decoder.npz -o out/flame
      moeplace analyze wiki.npz --compare code.npz --gpus 8 -o out/wiki-vs-code
      moeplace analyze traces/flame-moe-290m-decoder.npz --learning-curve --gpus 8 -o out/flame
    """
    out = Path(out_dir) if out_dir else Path(f"analyze-{Path(trace_path).stem}")
    if out.exists() and not out.is_dir():
        raise MoeplaceError(f"-o {out}: exists and is not a directory")
    _check_inputs_kept(out, [("TRACE", trace_path), ("--compare", compare_path)])
    sources: dict[str, tuple[Source, str]] = {"A": (load_source(trace_path), trace_path)}
    if compare_path is not None:
        sources["B"] = (load_source(compare_path), compare_path)
        _check_compatible(sources["A"][0], sources["B"][0], compare_path)
    first = sources["A"][0]
    traces = [s for s, _ in sources.values() if isinstance(s, Trace)]
    all_traces = len(traces) == len(sources)
    _refuse_inapplicable(click.get_current_context(), sources)
    # transitions need per-token paths in every input
    modes = [m for m in trace_modes(traces[0]) if all(m in trace_modes(t) for t in traces)] if all_traces else []
    pairs = parse_pairs(layers_spec, first.num_layers - 1, layer_names(first.meta, first.num_layers)) if all_traces else []
    if heatmap_mode is not None and heatmap_mode not in modes:
        raise MoeplaceError(f"--heatmap-mode {heatmap_mode}: not available for this input "
                            f"(available: {', '.join(modes) or 'none'})")
    _refuse_skipped(click.get_current_context(), no_solve, no_figures)  # after the values' own checks
    num_gpus = None
    if not no_solve and traces:  # a placement is solved on per-token paths only
        num_gpus = gpus if gpus is not None else default_gpus(first.num_experts)
        gpus_per_node = gpus_per_node if gpus_per_node is not None else num_gpus
        check_solve_cluster(first.num_experts, num_gpus, gpus_per_node, gpus_given=gpus is not None)
    if learning_curve:
        _check_curve(first, trace_path, no_solve, num_gpus, curve_splits, seed)
    elif given_options(click.get_current_context(), ("curve_splits",)):
        raise MoeplaceError("--curve-splits: sets the splits of --learning-curve; add --learning-curve or drop it")
    try:  # fail before the work, not after it
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeplaceError(f"-o {out}: cannot create the output directory ({e.strerror})") from None

    cfg = AnalyzeConfig(num_shuffles=shuffles, seed=seed, hottest=hottest, num_gpus=num_gpus,
                        gpus_per_node=gpus_per_node or 1, time_limit=time_limit,
                        curve_splits=curve_splits if learning_curve else None)
    with silenced(quiet):
        report, conditionals = build_report(sources, cfg)
    try:
        with _staging(out) as stage:  # all outputs or none: DIR never mixes two runs
            drawn: list[Path] = []
            if not no_figures:
                mode = heatmap_mode or ("topk" if "topk" in modes else "top1")
                drawn = _draw(report, conditionals, sources, pairs, mode, stage)
            if not no_figures and "learning_curve" in report:
                drawn.append(_draw_curve(report, trace_path, stage))
            report["figures"] = [str(out / p.name) for p in drawn]  # where they will be, not the stage
            report["transition_pairs"] = pairs if any(p.name == FIGURES[1] for p in drawn) else []
            report["json"] = str(out / JSON_NAME)
            write_json_atomic(stage / JSON_NAME, report)
            _publish(stage, out)
    except OSError as e:
        raise MoeplaceError(f"-o {out}: cannot write the report ({e.strerror or e})") from None
    if not quiet:
        click.echo(summary(report))


FIGURES = ("load_heatmap.png", "transitions.png", "affinity.png", "learning_curve.png")


def _check_curve(first: Source, path: str, no_solve: bool, num_gpus: int | None, splits: int, seed: int) -> None:
    """--learning-curve's refusals, before any work: it solves placements on TRACE's per-token
    paths, on more than one GPU, with enough tokens for two training sizes (curve.plan)."""
    from moeplace.analyze.curve import plan

    if not isinstance(first, Trace):
        raise MoeplaceError(f"--learning-curve: TRACE ({path}) is load-only (expert loads, no per-token paths) and the "
                            "curve solves placements on per-token paths; drop --learning-curve")
    if no_solve:
        raise MoeplaceError("--learning-curve solves placements (up to 4 x --curve-splits), which --no-solve "
                            "skips; drop one of the two")
    if num_gpus == 1:
        raise MoeplaceError("--learning-curve on --gpus 1: one GPU has no cross-GPU traffic to reduce; give --gpus "
                            "of the deployment (a divisor of E above 1)")
    plan(first, splits, seed)


def _check_inputs_kept(out: Path, inputs: list[tuple[str, str | None]]) -> None:
    """Refuse, before the work, an input that is one of the files this run writes (or removes) in
    `out`: `moeplace analyze DIR/affinity.png -o DIR` (a trace under that name, or a link to it)
    would be replaced by the figure. (option, path or None)."""
    for name in (JSON_NAME, *FIGURES):
        for option, path in inputs:
            if path is not None and same_file(out / name, Path(path)):
                raise MoeplaceError(f"-o {out}: this run writes {out / name}, which is {option} ({path}); "
                                    "write the report elsewhere")


STAGE_PREFIX = ".analyze."  # the staging directories' names: .analyze.*.tmp


def _staging(out: Path) -> contextlib.AbstractContextManager[Path]:
    """A hidden stage inside `out` to build the outputs in (io.locked_stage: removed on the way
    out, and a killed run's by the next run). Inside rather than beside `out`: the same
    filesystem even when `out` is a mount point or a symlink, so the final renames cannot fail
    with EXDEV, and no write access to `out`'s parent is needed."""
    return locked_stage(out, STAGE_PREFIX)


def _publish(stage: Path, out: Path) -> None:
    """Move every staged output into `out` and remove the figures of an earlier run that this run
    did not draw (an old figure beside this run's JSON would pass for its own): only those the
    earlier run's JSON lists as its own, so a user's file of such a name is never touched. The
    JSON goes last, and SIGINT/SIGTERM wait until all renames are done, so an interrupt cannot
    split them."""
    earlier = _figures_of_report(out / JSON_NAME)
    with _signals_held():
        for name in (*FIGURES, JSON_NAME):
            if (stage / name).exists():
                os.replace(stage / name, out / name)
            elif name in earlier:
                (out / name).unlink(missing_ok=True)


def _figures_of_report(path: Path) -> set[str]:
    """File names of the figures an analyze report at `path` says it drew (none when `path` is
    missing or not such a report)."""
    from moeplace.analyze.report import REPORT_FORMAT

    try:
        doc = read_json(path)
    except (OSError, ValueError):  # missing, unreadable or not JSON: no report of ours
        return set()
    if not isinstance(doc, dict) or doc.get("format") != REPORT_FORMAT or not isinstance(doc.get("figures"), list):
        return set()
    return {Path(f).name for f in doc["figures"] if isinstance(f, str)} & set(FIGURES)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread; a signal that came meanwhile is delivered on exit."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:  # Windows: no signal masks; the window is a handful of renames
        yield
        return
    old = mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, old)


def _draw(report: dict, conditionals: dict, sources: dict, pairs: list[int], mode: str, out: Path) -> list[Path]:
    from moeplace.analyze import plots  # matplotlib only when drawing

    keys = list(sources)
    titles = [f"{key} ({Path(path).stem})" for key, (_, path) in sources.items()]
    first = sources["A"][0]
    labels = layer_names(first.meta, first.num_layers)
    loads = [source_loads(s) for s, _ in sources.values()]
    paths = [plots.load_heatmap(loads, titles, labels, out / FIGURES[0])]
    if pairs:  # only when every input is a per-token trace with layer pairs
        cond = [conditionals[key][mode] for key in keys]
        paths.append(plots.transition_heatmaps(cond, titles, pairs, labels, mode, out / FIGURES[1]))
        affs = [report["traces"][key]["affinity"] for key in keys]
        paths.append(plots.affinity_plot(affs, keys, labels, affs[0]["log_num_experts"], out / FIGURES[2],
                                         ", ".join(titles)))
    return paths


def _draw_curve(report: dict, trace_path: str, out: Path) -> Path:
    from moeplace.analyze import plots  # matplotlib only when drawing

    return plots.learning_curve_plot(report["learning_curve"], f"A ({Path(trace_path).stem})", out / FIGURES[3])
