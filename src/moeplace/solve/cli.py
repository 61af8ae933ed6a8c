"""`moeplace solve`: fit an expert-to-GPU placement on a trace and write it as placement JSON."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from moeplace.errors import warn
from moeplace.options import (MAX_WEIGHT, NON_NEGATIVE_INT, OUTPUT_FILE, POSITIVE, POSITIVE_INT, SEED, WEIGHT, FiniteFloat,
                              check_output, given_options, plural, writing)
from moeplace.placement import Placement
from moeplace.solve.summary import cap_remedy, eval_format, migration_lines, render_front, summary

if TYPE_CHECKING:
    from moeplace.solve.costmodel import CostModel

TRAFFIC_OPTIONS = ("node_cost", "top1_weight", "coselect_weight", "smoothing", "prior")  # read by traffic only


def _objective_names() -> list[str]:
    from moeplace.solve.solver import OBJECTIVES
    return list(OBJECTIVES)


@click.command("solve", context_settings={"max_content_width": 100})
@click.argument("trace_path", metavar="TRACE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gpus", "-g", type=POSITIVE_INT, required=True,
              help="Expert-parallel GPUs G: each holds E/G experts of every layer, unless --redundant-experts or "
                   "--max-experts-per-gpu(-total) allow other counts (latency, balance; see above).")
@click.option("--gpus-per-node", type=POSITIVE_INT, default=None, help="GPUs per node (default: all G on one node).")
@click.option("--objective", type=click.Choice(_objective_names()), default=None,
              help="What to minimise (default: latency with --cluster, balance on a load-only input, else "
                   "traffic). traffic: weighted "
                   "cross-GPU/cross-node transitions (docs/solver.md); "
                   "latency: predicted MoE-layer time under --cluster; balance: max token load per GPU, the only "
                   "one for load-only inputs (docs/cost-model.md).")
@click.option("--time-limit", type=POSITIVE, default=60.0, show_default=True,
              help="Seconds for the search; the best placement found by then is written. Reading the "
                   "tokens and the final metrics come on top (seconds on 100,000s of tokens).")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the split and the search (same seed, same result); refused for a load-only input, "
                   "which draws nothing at random.")
@click.option("--train-fraction", type=FiniteFloat(0.0, 1.0, min_open=True), default=1.0, show_default=True,
              help="Fit on this seeded random fraction of the tokens; metrics also on the rest (held out). "
                   "Warns when either part has fewer tokens than experts per layer.")
@click.option("--split-by", type=click.Choice(["token", "sequence"]), default="token", show_default=True,
              help="With --train-fraction: hold out random tokens (token), or whole sequences, fitting on whole "
                   "sequences until the fit tokens reach the fraction (sequence: needs the trace's sequence_ids and "
                   "two or more sequences). Tokens of one text route alike, so a token split shares texts between "
                   "the parts and flatters the held-out figure on long sequences; sequence gives it on unseen text. "
                   "eval and check re-draw the same held-out part.")
@click.option("--node-cost", type=FiniteFloat(1.0, MAX_WEIGHT), default=2.0, show_default=True,
              help="traffic: cost of a cross-node move relative to a cross-GPU move inside a node (>= 1: a move across "
                   "nodes is never cheaper than one inside a node).")
@click.option("--top1-weight", type=WEIGHT, default=1.0, show_default=True, help="traffic: extra edge weight of the top-1 -> top-1 transition.")
@click.option("--coselect-weight", type=WEIGHT, default=None,
              help="traffic: weight of co-selection edges within a layer (top-k). Default: chosen from 1, 2, 4 by "
                   "2-fold cross-validation on the training tokens (2 on large traces).")
@click.option("--smoothing", type=WEIGHT, default=None,
              help="traffic: gate-weighted spread of edges over all k sources. Default: chosen with --prior (equal) from "
                   "0.5, 2 by cross-validation (0.5 on large traces).")
@click.option("--prior", type=WEIGHT, default=None, help="traffic: weight of the gate-weighted all-pairs transition prior "
                                                        "(default: see --smoothing).")
@click.option("--max-imbalance", type=FiniteFloat(1.0, MAX_WEIGHT), default=None,
              help="traffic: keep every layer's max/mean token load per GPU (fit tokens, as eval's imbalance) at or "
                   "under this, e.g. 1.25: the search runs without it in half the time, the cheapest swaps bring "
                   "its layout under it, and a second search keeps it throughout (docs/solver.md, step 6; a layer "
                   "the swaps cannot bring under is listed, with a warning). "
                   "Default: no cap (equal expert counts only).")
@click.option("--from", "from_path", metavar="CURRENT.json", type=click.Path(dir_okay=False, path_type=Path),
              default=None,
              help="Re-placement: the placement deployed now (same layers, experts, --gpus and --gpus-per-node). "
                   "The result's GPUs are renamed (whole nodes, GPUs within a node, which the objectives do not "
                   "see but for latency's layer 0) to keep the most experts where CURRENT has them; the JSON records CURRENT (path, sha256) "
                   "and the moves, the summary 'moved N of M experts'. Example: moeplace solve new-trace.npz "
                   "--gpus 8 --from placement.json --move-cost 20 -o placement-2.json (docs/solver.md, Re-placement).")
@click.option("--move-cost", type=WEIGHT, default=None,
              help="traffic, with --from (a CURRENT of E/G experts per GPU): price each moved (layer, expert) at W "
                   "token transitions (one transition: the mean edge weight of one fit token at one layer pair, "
                   "printed in the summary), so an expert moves only where that saves more traffic; the summary gives "
                   "the unpenalised solve's traffic beside it. E.g. W = expert weight bytes / (hidden size x dispatch "
                   "bytes) x fit tokens / tokens served until the next re-placement. Default: no price (the free "
                   "renaming only).")
@click.option("--max-moves", type=NON_NEGATIVE_INT, default=None,
              help="traffic or balance, with --from: a budget of moves per layer. traffic: at most N experts of each "
                   "layer off their CURRENT GPU (after the GPU renaming; CURRENT of E/G experts per GPU), with the "
                   "least traffic (plus --move-cost, if given) under that limit; with E/G experts on every GPU a moved "
                   "expert takes another's place, so a layer moves 0 or at least 2 experts and N = 1 allows no move. "
                   "balance: at most N expert copies the result holds that CURRENT does not (a copy of expert e on GPU "
                   "g that CURRENT lacks: one weight transfer; primaries and replicas alike, after the GPU renaming), "
                   "with the least max/mean load under that limit. The solve without the limit runs first, in half of "
                   "--time-limit; the summary gives its moves beside the result's. N = 0 keeps CURRENT. Not with "
                   "--max-imbalance. Example: moeplace solve new-trace.npz --gpus 8 --from placement.json --max-moves "
                   "2 -o placement-2.json. Default: no limit.")
@click.option("--cluster", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="latency: cluster config YAML (configs/cluster/*.yaml; docs/cost-model.md).")
@click.option("--model-config", type=click.Path(path_type=Path), default=None,
              help="latency: model config YAML (configs/model/*.yaml) when the cluster file has no model section; "
                   "or a checkpoint directory (or its config.json): expert costs estimated from its shape and the "
                   "cluster file's gpu: figures (docs/cost-model.md), printed on stderr.")
@click.option("--compute-weight", type=WEIGHT, default=1.0, show_default=True,
              help="latency: weight of the compute (balance) term against communication (1 = predicted time).")
@click.option("--redundant-experts", type=NON_NEGATIVE_INT, default=0, show_default=True,
              help="latency/balance: extra expert copies per layer (as EPLB, vLLM num_redundant_experts).")
@click.option("--max-experts-per-gpu", type=POSITIVE_INT, default=None,
              help="balance: per-layer expert slots a GPU may hold (default ceil((E + R) / G)); above that, "
                   "per-GPU counts may differ (MoETuner-style uneven layouts).")
@click.option("--max-experts-per-gpu-total", type=POSITIVE_INT, default=None,
              help="latency/balance: expert copies a GPU may hold summed over all layers (memory); per-layer "
                   "counts may then differ between GPUs (MoETuner), at least 1 each. Needs C x G >= L x (E + R); "
                   "latency: without --redundant-experts. Default: equal counts in every layer (ExFlow, "
                   "fixed-layout engines).")
@click.option("--pareto", is_flag=True,
              help="latency: solve for compute weights 0 (traffic only), 1, 4, 16, 64 (balance heavy), each in a fifth "
                   "of --time-limit; print the compute / communication front and store it in the placement "
                   "(solver.pareto); writes the weight-1 placement. Not for a load-only input (balance).")
@click.option("--output", "-o", type=OUTPUT_FILE, required=True, help="Placement JSON to write.")
@click.option("--quiet", "-q", is_flag=True, help="No summary on stdout, no progress on stderr.")
def solve(trace_path: Path, gpus: int, gpus_per_node: int | None, objective: str | None, time_limit: float, seed: int,
          train_fraction: float, split_by: str, node_cost: float, top1_weight: float, coselect_weight: float | None,
          smoothing: float | None, prior: float | None, max_imbalance: float | None, from_path: Path | None,
          move_cost: float | None, max_moves: int | None, cluster: Path | None, model_config: Path | None, compute_weight: float,
          redundant_experts: int, max_experts_per_gpu: int | None, max_experts_per_gpu_total: int | None, pareto: bool,
          output: Path, quiet: bool) -> None:
    """Place experts on GPUs so that a token's consecutive experts share a GPU.

    \b
    Input:  TRACE, a moeplace v1 .npz trace or an ExFlow .npy [tokens, layers] top-1 trace; with
            --objective balance also a load-only .npz (moeplace.loads/v1, `moeplace import`).
    Output: a placement JSON (moeplace.placement/v1) with the objective, solver settings, lower
            bound and gap, metrics of the placement and of the baselines (contiguous, round-robin,
            random, greedy_load) on the training tokens and, with --train-fraction < 1, on the
            held-out rest (evaluate it again with `moeplace eval`); a summary on stdout.
    Every GPU holds E/G experts of each layer, plus its share of the --redundant-experts copies
    (latency, balance), unless --max-experts-per-gpu (balance) or --max-experts-per-gpu-total
    (latency, balance) lets the counts differ; when G does not divide E, balance needs one of
    those three options and latency the last. With --cluster the objective defaults to latency.
    Exact integer programming (PuLP + HiGHS) when the model is small, else heuristics with ILP
    sub-problems; deterministic for a given --seed.

    \b
    Example:
      moeplace solve traces/flame-moe-290m-decoder.npz --gpus 8 --gpus-per-node 4 \\
          --train-fraction 0.5 --seed 0 -o placement.json
      # hold out whole sequences (texts the solver never saw), not random tokens
      moeplace solve trace.npz --gpus 4 --train-fraction 0.5 --split-by sequence -o placement.json
      # loads only (mixtral-loads.npz: the `moeplace import loads-json --help` example)
      moeplace solve mixtral-loads.npz --gpus 4 --redundant-experts 4 -o placement.json   # objective balance
      moeplace solve traces/flame-moe-290m-decoder.npz --gpus 16 --gpus-per-node 8 --objective latency \\
          --cluster configs/cluster/h100-2x8-ib.yaml --model-config configs/model/flame-moe-290m.yaml \\
          --redundant-experts 16 --train-fraction 0.5 -o placement.json
      # re-placement on new traffic, moving an expert only where it saves 20 token transitions
      moeplace solve new-trace.npz --gpus 8 --gpus-per-node 4 --from placement.json --move-cost 20 \\
          -o placement-2.json
      # ... or moving at most 2 experts per layer
      moeplace solve new-trace.npz --gpus 8 --gpus-per-node 4 --from placement.json --max-moves 2 \\
          -o placement-2.json
    """
    from moeplace.errors import MoeplaceError
    from moeplace.placement import load_placement
    from moeplace.solve.costmodel import checkpoint_dir
    from moeplace.solve.solver import check_layout, solve_placement
    from moeplace.trace.format import (is_load_only, load_trace, median_sequence_tokens, sequence_split_problem,
                                       trace_shape)

    # before the solve, not after it; -o CKPT/config.json would replace the checkpoint's config
    check_output(output, "-o", [trace_path, from_path, cluster, model_config],
                 [(checkpoint_dir(model_config), "--model-config")])
    if objective is None and model_config and not cluster:
        raise MoeplaceError("--model-config completes the latency objective's --cluster: add --cluster CONFIG.yaml "
                            "(configs/cluster/*.yaml)")
    load_only = is_load_only(trace_path)
    implied = objective is None and cluster is not None  # said after the solve
    loads_imply = objective is None and cluster is None and load_only  # balance is all loads allow
    if objective is None:  # only latency reads a cluster: giving one asks for it
        objective = "latency" if cluster else "balance" if load_only else "traffic"
    if max_experts_per_gpu_total is not None and objective == "traffic":
        raise MoeplaceError("--max-experts-per-gpu-total needs a load term: traffic alone would pile a layer's experts "
                            "on one GPU; use --objective latency (or balance)")
    if objective != "latency" and (cluster or model_config):
        raise MoeplaceError("--cluster and --model-config give the latency objective its cost model: add --objective "
                            "latency (any placement's predicted time: moeplace eval --cluster)")
    ctx = click.get_current_context()
    if given_options(ctx, ["compute_weight"]):
        if objective != "latency":
            raise MoeplaceError("--compute-weight weighs the latency objective's compute term: add --objective latency")
        if pareto:
            raise MoeplaceError("--pareto solves for compute weights 0, 1, 4, 16 and 64 itself: drop --compute-weight")
    if loads_imply and ((weights := given_options(ctx, TRAFFIC_OPTIONS)) or max_imbalance is not None):
        flags = ", ".join(weights) if weights else "--max-imbalance"
        raise MoeplaceError(f"{flags}: {trace_path} holds expert loads only (no token paths), so the objective is "
                            "balance, which minimises the imbalance; the traffic objective's options need a trace")
    if objective != "traffic" and (weights := given_options(ctx, TRAFFIC_OPTIONS)):
        raise MoeplaceError(f"{', '.join(weights)}: set the traffic objective's edge costs, which {objective} does not "
                            "read (latency takes its costs from --cluster; balance has only loads)")
    if objective != "traffic" and max_imbalance is not None:
        raise MoeplaceError(f"--max-imbalance caps the traffic objective's load, which {objective} weighs itself "
                            + ("(--compute-weight)" if objective == "latency" else "(it minimises the imbalance)")
                            + ": drop it, or use --objective traffic")
    if objective == "traffic" and redundant_experts:
        raise MoeplaceError("--redundant-experts applies to --objective latency or balance")
    if move_cost is not None and from_path is None:
        raise MoeplaceError("--move-cost prices moves away from a deployed placement: add --from CURRENT.json")
    if move_cost is not None and objective != "traffic":
        raise MoeplaceError(f"--move-cost prices moves in the traffic objective's search; {objective} takes --from "
                            "(the free renaming of GPUs only): drop --move-cost, or use --objective traffic")
    if max_moves is not None and from_path is None:
        raise MoeplaceError("--max-moves limits moves away from a deployed placement: add --from CURRENT.json")
    if max_moves is not None and objective not in ("traffic", "balance"):
        raise MoeplaceError(f"--max-moves limits the moves of the traffic and balance objectives; {objective} takes "
                            "--from (the free renaming of GPUs only): use --objective balance or --objective traffic")
    if max_moves is not None and max_imbalance is not None:
        raise MoeplaceError("--max-moves with --max-imbalance: the load cap's swaps would move experts the limit does "
                            "not allow (and with few moves a layer may stay above the cap); drop one of them")
    if max_moves is not None and max_experts_per_gpu_total is not None:
        raise MoeplaceError("--max-moves with --max-experts-per-gpu-total: the total cap's relabelling per layer "
                            "would move experts the limit does not see; drop one of them")
    if from_path is not None and pareto:
        raise MoeplaceError("--from with --pareto: the front's rows are solved apart; solve the chosen "
                            "--compute-weight with --from")
    if load_only:  # what a load-only input cannot take, before any file is read
        if objective != "balance":
            raise MoeplaceError(f"{trace_path} holds expert loads only (no token paths): use --objective balance")
        if given := given_options(ctx, ["train_fraction", "split_by"]):
            raise MoeplaceError(f"{given[0]}: {trace_path} holds expert loads only, no tokens to split")
        if pareto:
            raise MoeplaceError(f"--pareto sweeps the latency objective's --compute-weight, and {trace_path} holds "
                                "expert loads only (no token paths), so the objective is balance: drop --pareto")
        if given_options(ctx, ["seed"]):
            raise MoeplaceError(f"--seed: {trace_path} holds expert loads only: balance on loads draws nothing at "
                                "random (no split, no random baseline), so a seed changes nothing; drop it")
    if pareto and objective != "latency":
        raise MoeplaceError("--pareto sweeps the latency objective's --compute-weight: add --objective latency"
                            + ("" if cluster is not None else " --cluster CONFIG.yaml (see configs/cluster/)"))
    if max_experts_per_gpu is not None and objective != "balance":
        raise MoeplaceError(f"--max-experts-per-gpu applies to --objective balance ({objective} keeps equal counts, "
                            "or takes --max-experts-per-gpu-total)")
    if objective == "latency" and max_experts_per_gpu_total is not None and redundant_experts:
        raise MoeplaceError("--max-experts-per-gpu-total with --redundant-experts: replicas need equal slots per GPU; "
                            "use --objective balance for both, or drop one")
    if split_by == "sequence" and train_fraction >= 1.0:
        raise MoeplaceError("--split-by sequence says which tokens --train-fraction holds out: add --train-fraction "
                            "F < 1 (e.g. 0.5)")
    gpn = gpus if gpus_per_node is None else gpus_per_node
    if gpus % gpn:  # needs no trace: said before reading one
        raise MoeplaceError(f"--gpus {gpus} is not a multiple of --gpus-per-node {gpn}")
    if objective == "latency" and cluster is None:
        raise MoeplaceError("--objective latency needs --cluster CONFIG.yaml (see configs/cluster/)")
    # what the trace's headers state, before its tokens are read (seconds on a large trace); a
    # load-only input is small and checked once read; no stored expert count: inferred from the ids
    shape = None if load_only else trace_shape(trace_path)
    stored = None if shape is None else shape[3]
    if stored is not None and split_by != "sequence":  # (a sequence-split problem is said first, once read)
        check_layout(stored, gpus, gpn, objective, redundant_experts, max_experts_per_gpu_total)
    current = None if from_path is None else load_placement(from_path, "--from")
    if current is not None:  # its GPUs, and the trace's layers and experts
        from moeplace.solve.migrate import check_current, check_equal_counts

        layers = current.num_layers if shape is None else shape[1]
        check_current(current, str(from_path), layers, current.num_experts if stored is None else stored, gpus, gpn)
        if objective == "traffic" and (move_cost is not None or max_moves is not None):
            check_equal_counts(current, str(from_path), "--move-cost" if move_cost is not None else "--max-moves")
    if load_only:
        return _solve_loads(trace_path, gpus, gpus_per_node, redundant_experts, max_experts_per_gpu,
                            max_experts_per_gpu_total, time_limit, output, quiet, implied=loads_imply,
                            current=current, from_path=from_path, max_moves=max_moves)
    trace = load_trace(trace_path)
    if split_by == "sequence" and (problem := sequence_split_problem(trace, str(trace_path))):
        raise MoeplaceError(f"--split-by sequence: {problem}; use --split-by token")
    # the solver's first refusals, here before this command's warnings: a refused run prints one line
    check_layout(trace.num_experts, gpus, gpn, objective, redundant_experts, max_experts_per_gpu_total)
    if current is not None:
        check_current(current, str(from_path), trace.num_layers, trace.num_experts, gpus, gpn)
    cost = None
    if objective == "latency" and cluster is not None:  # after the topology, as the solver orders them
        from moeplace.solve.costmodel import load_cost_model
        cost = load_cost_model(cluster, model_config, "--cluster", "--model-config")
        cost.check(gpus, gpn)
    if trace.meta.get("source") == "exflow-npy":  # the placement's expert count comes from the ids alone
        warn(f"{trace_path}: an ExFlow .npy records no expert count: {trace.num_experts} assumed (its largest id + 1); "
             f"if the model has more, `moeplace import exflow {trace_path} --num-experts N -o TRACE.npz` records it")
    if train_fraction < 1.0:
        warn_small_split(trace, train_fraction, seed, split_by)
    options: dict[str, Any] = {}
    if objective == "traffic":
        options = dict(node_cost=node_cost, top1_weight=top1_weight, coselect_weight=coselect_weight,
                       smoothing=smoothing, prior=prior, max_imbalance=max_imbalance)
        if move_cost is not None:
            options["move_cost"] = move_cost
        if max_moves is not None:
            options["max_moves"] = max_moves
    if objective == "latency":
        options = dict(cluster=cluster, model_config=model_config, compute_weight=compute_weight,
                       redundant=redundant_experts, max_experts_per_gpu_total=max_experts_per_gpu_total)
        if cost is not None:  # always, by now
            options["cost"] = cost  # read once: the solver, its predicted times and --pareto take it
            announce_cost_model(cost, trace, trace_path)
    if objective == "balance":
        options = dict(redundant=redundant_experts, max_experts_per_gpu=max_experts_per_gpu,
                       max_experts_per_gpu_total=max_experts_per_gpu_total)
        if max_moves is not None:
            options["max_moves"] = max_moves
    if pareto:
        placement = pareto_front(trace, gpus, gpus_per_node, time_limit, seed, train_fraction, options, not quiet,
                                 split_by=split_by)
    else:
        placement = solve_placement(trace, gpus, gpus_per_node, time_limit, seed, objective=objective,
                                    train_fraction=train_fraction, split_by=split_by, progress=not quiet,
                                    current=current,
                                    current_path=None if from_path is None else str(from_path), **options)
    if implied and not quiet:  # after the solve: an input error before it stays one line
        click.echo("moeplace solve: note: --cluster given: solved --objective latency (predicted MoE time; "
                   "--objective traffic would ignore the cluster)", err=True)
    with writing(output):
        placement.save(output)
    warn_no_engine_form(placement)
    if above := placement.objective.get("layers_above_max_imbalance"):
        warn(f"--max-imbalance {max_imbalance:g}: {len(above)} MoE layer{'s' if len(above) > 1 else ''} ({above}) "
             f"stay{'' if len(above) > 1 else 's'} above it on the fit tokens ({cap_remedy(placement.objective)})")
    if not quiet:
        click.echo(summary(placement, trace_path.name, str(trace_path), str(output),
                           median_sequence=median_sequence_tokens(trace)))
        if pareto:
            click.echo("\n" + render_front(placement.solver["pareto"]))
        click.echo(f"\nwrote {output}")


def warn_no_engine_form(placement: Placement) -> None:
    """One line on stderr when GPUs hold different numbers of copies (uneven counts, or E + R not
    a multiple of G): eval and serve take such a placement, SGLang, vLLM and EPLB files cannot
    express it, so `moeplace export` will refuse it; better said at solve time than at export."""
    from moeplace.errors import PlacementError
    from moeplace.export.eplb import physical_to_logical

    try:
        physical_to_logical(placement)
    except PlacementError as e:
        warn(f"this placement has no SGLang/vLLM/EPLB form ({str(e).split(';')[0]}): `moeplace eval` and "
             "`moeplace serve` take it, `moeplace export` will refuse it")


def announce_cost_model(cost: CostModel, trace: Any, trace_path: Path) -> None:
    """On stderr, once every input is checked and before the solve: the model section estimated
    from a checkpoint, and one warning when the cost model describes another model than the
    trace's (hidden size in the trace meta, expert count or top-k the model config states)."""
    from moeplace.solve.costmodel import estimate_lines, model_facts, model_mismatch

    for line in estimate_lines(cost):
        click.echo(f"moeplace solve: note: {line}", err=True)
    if line := model_mismatch(trace, str(trace_path), model_facts(cost)):
        warn(line)


def warn_small_split(trace: Any, train_fraction: float, seed: int, split_by: str = "token") -> None:
    """One line on stderr when --train-fraction leaves a part with fewer tokens T than experts E
    per layer. Then at least E - T experts of every layer are no token's top-1 in that part and at
    most T of a layer pair's E x E top-1 transitions are seen: a fit places most experts without
    evidence, and held-out metrics describe a handful of experts, not the placement. (`eval` scores
    a small held-out part as it is, the count in its tokens line; an empty one falls back to all
    tokens, in-sample, and says so.)"""
    from moeplace.trace.format import split_trace

    num_tokens, num_experts = trace.num_tokens, trace.num_experts
    train, held = split_trace(trace, train_fraction, seed, split_by)
    few = [what for what, part in (("a reliable fit", train), ("reliable held-out metrics", held)) if len(part) < num_experts]
    if few:
        warn(f"--train-fraction {train_fraction:g} fits on {len(train)} and holds out {len(held)} of {num_tokens} "
             f"tokens; fewer than the {num_experts} experts per layer leaves most expert pairs unseen: too few "
             f"tokens for {' or '.join(few)}")


def _solve_loads(path: Path, gpus: int, gpus_per_node: int | None, redundant: int, max_experts_per_gpu: int | None,
                 max_experts_per_gpu_total: int | None, time_limit: float, output: Path, quiet: bool,
                 implied: bool = False, current: Placement | None = None, from_path: Path | None = None,
                 max_moves: int | None = None) -> None:
    """`balance` on a load-only input (moeplace.loads/v1): per-layer loads, no token paths
    (`implied`: no --objective was given, and the summary says why it is balance)."""
    from moeplace.placement import check_topology
    from moeplace.solve.balance import balance_moves_placement, balance_placement
    from moeplace.solve.ilp import software
    from moeplace.solve.migrate import best_relabeling, check_current, record, relabel
    from moeplace.trace.format import load_loads

    loads = load_loads(path)
    gpn = gpus_per_node or gpus
    check_topology(loads.num_experts, gpus, gpn, balanced=False, redundant=redundant)
    if current is not None:
        check_current(current, str(from_path), loads.num_layers, loads.num_experts, gpus, gpn)
    if current is not None and max_moves is not None:  # written in CURRENT's GPU names (its own renaming)
        placement = balance_moves_placement(loads.loads, gpus, gpn, redundant, time_limit, max_experts_per_gpu, current,
                                            max_moves, progress=not quiet)
        placement.extra["migration"] = record(placement.expert_to_gpu, current.expert_to_gpu, from_path)
    else:
        placement = balance_placement(loads.loads, gpus, gpn, redundant, time_limit, max_experts_per_gpu,
                                      progress=not quiet, max_experts_per_gpu_total=max_experts_per_gpu_total)
    if current is not None and max_moves is None:  # balance's value and metrics are per-GPU maxima: blind to the renaming
        label = best_relabeling(placement.expert_to_gpu, current.expert_to_gpu, gpus, gpn)
        layout, replicas = relabel(placement.expert_to_gpu, placement.replicas, label)
        placement = replace(placement, expert_to_gpu=layout, replicas=replicas)
        placement.extra["migration"] = record(placement.expert_to_gpu, current.expert_to_gpu, from_path)
    placement = replace(placement, trace_sha256=loads.sha256 or None,
                        trace_model=loads.model_identity())  # its moe_layers map MoE rows to decoder layers on export
    placement.solver["software"] = software()
    eplb = _eplb_imbalance(loads.loads, gpus, gpn, redundant)
    if eplb is not None:
        placement.metrics["eplb"] = eplb
    with writing(output):
        placement.save(output)
    warn_no_engine_form(placement)
    if not quiet:
        m = placement.metrics
        bound = float("nan") if placement.bound is None else placement.bound  # balance always sets one
        click.echo(f"moeplace solve: {path.name} (load only) -> {plural(gpus, 'GPU')}, {redundant} redundant experts "
                   "per layer"
                   + ("; objective balance, all that loads without token paths allow" if implied else ""))
        click.echo(f"balance: max/mean load per GPU, mean over layers {eval_format(m['imbalance_mean'], 'imbalance_mean')}, "
                   f"worst layer {eval_format(m['imbalance_max'], 'imbalance_max')}; lower bound "
                   f"{eval_format(bound, 'imbalance_mean')}, gap {placement.gap:.2%} "
                   f"({placement.solver['method']}, {placement.solver['seconds']:.1f} s)")
        if eplb is not None:  # first as moeplace's own figure (and eval) count, then as EPLB counts itself
            served = eplb["served"]
            click.echo(f"EPLB ({eplb['policy']}, DeepSeek's algorithm) on the same loads: mean "
                       f"{eval_format(served['imbalance_mean'], 'imbalance_mean')}, "
                       f"worst layer {eval_format(served['imbalance_max'], 'imbalance_max')} (served by the least-loaded "
                       f"copy, as above and in `moeplace eval`; {eval_format(eplb['imbalance_mean'], 'imbalance_mean')} "
                       f"and {eval_format(eplb['imbalance_max'], 'imbalance_max')} under EPLB's own model, an expert's "
                       "load split equally over its copies)")
        for line in migration_lines(placement):
            click.echo(line)
        click.echo(f"wrote {output}")


def _eplb_imbalance(loads: Any, gpus: int, gpus_per_node: int, redundant: int) -> dict[str, Any] | None:
    """EPLB's max/mean load per GPU on the same loads, under its own load model (an expert's load
    split equally over its copies, the comparison docs/benchmarks.md makes) and, in "served",
    under the serving rule balance's own figure and eval use (least-loaded copy, after merging
    copies EPLB put on one GPU); None where EPLB cannot place them (its physical slots must split
    evenly over GPUs)."""
    from moeplace.errors import PlacementError
    from moeplace.eval.metrics import imbalance
    from moeplace.solve.balance import expected_gpu_loads
    from moeplace.solve.eplb import eplb_placement

    try:
        p, own = eplb_placement(loads, gpus, gpus_per_node, redundant)
    except PlacementError:
        return None
    ratio = imbalance(own)  # own [L, G]: EPLB's per-GPU loads, each layer's total kept
    served = imbalance(expected_gpu_loads(p, loads))
    return {"policy": p.solver["name"].removeprefix("eplb-"), "imbalance_mean": float(ratio.mean()), "imbalance_max": float(ratio.max()),
            "load_model": "equal split over replicas",
            "served": {"imbalance_mean": float(served.mean()), "imbalance_max": float(served.max()),
                       "load_model": "least-loaded serving over replicas (layer_loads)"}}


PARETO_WEIGHTS = (0.0, 1.0, 4.0, 16.0, 64.0)


def pareto_front(trace: Any, gpus: int, gpus_per_node: int | None, time_limit: float, seed: int,
                 train_fraction: float, options: dict[str, Any], progress: bool = True,
                 split_by: str = "token") -> Placement:
    """Solve `latency` at each compute weight, each in an equal share of the time limit; the
    weight-1 placement, its solver["pareto"] holding one row per weight: predicted compute and
    communication (held-out tokens when there is a split), cross-GPU top-1, imbalance, and
    whether the time limit cut that solve."""
    from moeplace.solve.costmodel import load_cost_model, predict
    from moeplace.solve.solver import solve_placement
    from moeplace.trace.format import split_trace

    cost = options.get("cost") or (load_cost_model(options["cluster"], options["model_config"])
                                   if options.get("cluster") else None)
    if cost is None:
        from moeplace.errors import MoeplaceError
        raise MoeplaceError("--pareto needs --cluster CONFIG.yaml")
    held = split_trace(trace, train_fraction, seed, split_by)[1] if train_fraction < 1.0 else None
    sub = trace.select_tokens(held) if held is not None and len(held) else trace
    part = "held_out" if sub is not trace else "train"
    opts = {k: v for k, v in options.items() if k not in ("cluster", "model_config", "compute_weight", "cost")}
    rows, chosen = [], None
    for w in PARETO_WEIGHTS:
        p = solve_placement(trace, gpus, gpus_per_node, time_limit / len(PARETO_WEIGHTS), seed, objective="latency",
                            train_fraction=train_fraction, split_by=split_by, progress=progress, cost=cost,
                            compute_weight=w, **opts)
        t = predict(cost, p, sub)
        m = p.metrics[part]["placement"]
        rows.append({"compute_weight": w, "compute_us": float(t.compute_us.sum()),
                     "comm_us": float(t.dispatch_us.sum() + t.combine_us.sum()), "moe_time_us": float(t.total_us.sum()),
                     "cross_gpu_top1": m["cross_gpu_top1"], "imbalance_max": m["imbalance_max"],
                     "stopped_by_time_limit": bool(p.solver.get("stopped_by_time_limit"))})
        chosen = p if w == 1.0 else chosen
    assert chosen is not None
    chosen.solver["pareto"] = {"tokens": part, "rows": rows}
    return chosen
