"""`moeplace check`: `moeplace eval` over a list of placements and thresholds read from YAML, a
CI regression gate (lines, --json, --junit-xml)."""

from __future__ import annotations

import difflib
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import click

from moeplace.errors import AlreadyReported, MoeplaceError
from moeplace.eval.cli import NO_RECORD, cost_metric_fn, evaluate_files
from moeplace.eval.gates import (BASELINE_METRICS, RATIO_THRESHOLDS, THRESHOLDS, VS_BASELINE, VS_CONTIGUOUS, Verdict,
                                 check_limit_range, describe, gate_metric, scored, threshold_results)
from moeplace.io import atomic_path, read_yaml
from moeplace.options import OUTPUT_FILE, brief, check_output, plural, writing, yaml_number
from moeplace.solve.costmodel import checkpoint_dir

def check_metric_fns(check: dict[str, Any], said: set[str] | None = None) -> dict[str, Any]:
    """evaluate_files's keyword arguments for a check's cost model: its cluster config's, or, when it
    names none, the one its placement records (max_moe_time_ratio then needs one there)."""
    if "cluster" not in check:
        needs = [k for k in check["limits"] if gate_metric(k)[0] == "moe_time_us"]
        return {"recorded": True, "cost_keys": ("a 'cluster' key", "'model_config'"),
                "none_recorded": f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} "
                                                   "'cluster' (a cluster config YAML; model_config too when it has "
                                                   f"no model section): {NO_RECORD}" if needs else ""}
    fn, facts, source, cost = cost_metric_fn(check["cluster"], check.get("model_config"), "check", said,
                                             ("cluster", "model_config"))
    return {"metric_fns": [fn], "assumed": [facts], "cost_source": source, "cluster": cost}


_CHECK_KEYS = {"name", "placement", "trace", "all_tokens", "cluster", "model_config", "baseline"}
_CHECK_FILES = ("placement", "trace", "cluster", "model_config", "baseline")  # the paths a check reads
_BASELINE_KEYS = {f"max_{n}{VS_BASELINE}" for n in BASELINE_METRICS}
_LIMIT_KEYS = ({f"max_{n}{vs}" for n in THRESHOLDS for vs in ("", VS_CONTIGUOUS)} | {f"max_{n}" for n in RATIO_THRESHOLDS}
               | _BASELINE_KEYS)
_THRESHOLD_NAMES = (f"max_<{'|'.join(THRESHOLDS)}>[{VS_CONTIGUOUS}|{VS_BASELINE}], "
                    f"{', '.join(f'max_{n}' for n in RATIO_THRESHOLDS)}, max_moe_time{VS_BASELINE}")


def read_checks(path: Path) -> list[dict[str, Any]]:
    """The checks of a YAML file, validated, with `defaults` merged and paths made absolute.

    Paths are relative to the YAML file's folder, so a config works from any directory.
    """
    doc = read_yaml(path, MoeplaceError)
    if isinstance(doc, dict) and isinstance(doc.get("format"), str) and "checks" not in doc:  # JSON is YAML
        raise MoeplaceError(f"{path}: a {doc['format']} file, not a list of checks (a YAML file with a 'checks:' "
                            "list, e.g. configs/check-example.yaml)")
    if not isinstance(doc, dict) or not isinstance(doc.get("checks"), list) or not doc["checks"]:
        raise MoeplaceError(f"{path}: expected a mapping with a non-empty 'checks' list")
    unknown_top = set(doc) - {"checks", "defaults"}
    if unknown_top:
        raise MoeplaceError(f"{path}: unknown top-level keys {_names(unknown_top)} (expected checks, defaults)")
    defaults = {} if doc.get("defaults") is None else doc["defaults"]  # `defaults:` with nothing after it
    if not isinstance(defaults, dict):
        raise MoeplaceError(f"{path}: 'defaults' must be a mapping")
    unknown = set(defaults) - _CHECK_KEYS - _LIMIT_KEYS
    if unknown:  # said here, not blamed on the first check it is merged into
        raise MoeplaceError(f"{path}: defaults: unknown keys {_names(unknown)}; thresholds are {_THRESHOLD_NAMES}")
    checks: list[dict[str, Any]] = []
    for i, raw in enumerate(doc["checks"]):
        if not isinstance(raw, dict):
            raise MoeplaceError(f"{path}: check {i + 1} must be a mapping")
        check = {**defaults, **raw}
        name = check.get("name", "unnamed")
        label = f"{path}: check {i + 1} ({name if isinstance(name, str) else brief(name)})"
        if "cluster" in raw and raw["cluster"] is None:  # no cost model here: nor the defaults' parts of one
            for key in ("model_config", *(k for k in _LIMIT_KEYS if gate_metric(k)[0] == "moe_time_us")):
                if key not in raw:
                    check.pop(key, None)
        if "baseline" in raw and raw["baseline"] is None:  # likewise the defaults' thresholds on a baseline
            for key in _BASELINE_KEYS - set(raw):
                check.pop(key, None)
        unknown = set(check) - _CHECK_KEYS - _LIMIT_KEYS
        if unknown:
            raise MoeplaceError(f"{label}: unknown keys {_names(unknown)}; thresholds are {_THRESHOLD_NAMES}")
        for key in _CHECK_FILES:
            if check.get(key) is None:
                if key in ("placement", "trace"):
                    raise MoeplaceError(f"{label}: '{key}' (a path) is required")
                check.pop(key, None)  # `cluster: null` drops a default's
                continue
            if not isinstance(check[key], str) or not check[key].strip():
                raise MoeplaceError(f"{label}: '{key}' must be a path (a non-empty string), got {brief(check[key])}")
            check[key] = Path(os.path.normpath(path.parent / Path(check[key]).expanduser()))
        if "model_config" in check and "cluster" not in check:
            raise MoeplaceError(f"{label}: model_config needs cluster")
        # `max_x: null` in a check drops a threshold its defaults set
        limits = {k: _threshold(v, k, label) for k in list(check) if k in _LIMIT_KEYS and (v := check.pop(k)) is not None}
        if not limits:
            raise MoeplaceError(f"{label}: no thresholds; set at least one of {sorted(_LIMIT_KEYS)}")
        against = sorted(k for k in limits if k in _BASELINE_KEYS)
        if against and "baseline" not in check:
            raise MoeplaceError(f"{label}: {', '.join(against)} need{'s' if len(against) == 1 else ''} 'baseline' "
                                "(a placement file of the same model to compare with)")
        if "baseline" in check and not against:
            if "baseline" in raw:  # a baseline that gates nothing: `max_cross_gpu` meant as a ratio?
                raise MoeplaceError(f"{label}: baseline is set but no max_<metric>{VS_BASELINE} threshold uses it")
            del check["baseline"]  # the defaults' baseline, for the checks that gate against it
        if not isinstance(check.get("all_tokens", False), bool):
            raise MoeplaceError(f"{label}: all_tokens must be true or false")
        check["limits"] = limits
        check.setdefault("name", f"check {i + 1}")
        if isinstance(check["name"], (int, float)) and not isinstance(check["name"], bool):
            check["name"] = str(check["name"])  # `name: 2026` is a fine name
        if not isinstance(check["name"], str):
            raise MoeplaceError(f"{label}: name must be a string, got {brief(check['name'])}")
        if not check["name"].strip() or check["name"].splitlines() != [check["name"]]:
            # it starts the check's PASS/FAIL line: a line break in it could forge another check's line
            raise MoeplaceError(f"{path}: check {i + 1}: name must be one line of text, not empty, got {brief(check['name'])}")
        twice = next((c for c in checks if c["name"] == check["name"]), None)
        if twice is not None:  # the PASS/FAIL lines and the JSON report name checks: one name, one check
            raise MoeplaceError(f"{path}: checks {checks.index(twice) + 1} and {i + 1} are both named {check['name']!r}")
        checks.append(check)
    return checks


def _names(keys: set[Any]) -> list[str]:
    """Keys of a YAML mapping, sorted for a message: `1: x` beside `foo: y` is an int beside a str."""
    return sorted(map(str, keys))


def _threshold(value: Any, key: str, label: str) -> float:
    """A threshold as a float: a number, or a string holding one (YAML 1.1 reads `1e-1`, with no
    dot, as a string); finite (a 400-digit integer is not) and non-negative."""
    number = yaml_number(value)
    if number is None or not 0 <= number < float("inf"):
        raise MoeplaceError(f"{label}: {key} must be a non-negative number, got {brief(value)}")
    check_limit_range(key, number, f"{label}: {key}")
    return number




def _why(e: BaseException, check: dict[str, Any]) -> str:
    """A check's failure in one line; out of memory and too deep a nesting name its files."""
    files = f"{check['placement']} on {check['trace']}"
    if isinstance(e, MemoryError):
        return f"out of memory evaluating {files} (is an input far larger than intended?)"
    if isinstance(e, RecursionError):
        return f"input nested too deeply, evaluating {files}"
    return str(e)


class CheckRun(NamedTuple):
    """One check's outcome: its report and verdicts, or the one line saying why it could not run."""
    check: dict[str, Any]
    report: dict[str, Any] | None  # None: it could not run
    verdicts: list[Verdict]
    error: str  # "" when it ran
    seconds: float

    @property
    def status(self) -> str:
        return "error" if self.report is None else "pass" if all(v.passed for v in self.verdicts) else "fail"


def run_check(c: dict[str, Any], said: set[str] | None = None) -> CheckRun:
    """Evaluate one check; one bad input stops its check, not the gate."""
    start = time.perf_counter()
    try:
        report = evaluate_files(c["placement"], c["trace"], c.get("all_tokens", False), **check_metric_fns(c, said),
                                baseline=c.get("baseline"))
        verdicts = threshold_results(report, c["limits"])
    except (MoeplaceError, MemoryError, RecursionError) as e:
        return CheckRun(c, None, [], _why(e, c), time.perf_counter() - start)
    return CheckRun(c, report, verdicts, "", time.perf_counter() - start)


def check_lines(r: CheckRun) -> list[str]:
    """The text lines of a check: PASS/FAIL/ERROR, then what the tokens are when not a held-out split."""
    if r.report is None:
        return [f"ERROR {r.check['name']}: {r.error}"]
    lines = [f"{r.status.upper():<4}  {r.check['name']} ({scored(r.report)}): {describe(r.verdicts)}"]
    t = r.report.get("tokens")
    if t is None:
        lines.append(f"      loads: {r.report['loads']['note']}")
    elif t["subset"] != "held-out":  # what eval says of these tokens (in-sample, another trace, another model)
        lines.append(f"      tokens: {t['note']}")
    if r.report.get("baseline", {}).get("note"):  # a baseline on another GPU count
        lines.append(f"      baseline: {r.report['baseline']['note']}")
    return lines


def select_checks(checks: list[dict[str, Any]], only: Sequence[str], config: Path) -> list[dict[str, Any]]:
    """The checks --only names, in the YAML's order (all of them without --only); an unknown name
    is an error before anything runs, so a typo never gates nothing."""
    names = [c["name"] for c in checks]
    for name in only:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise MoeplaceError(f"--only {name!r}: {config} has no such check; {hint}its checks: "
                                + ", ".join(map(repr, names)))
    return [c for c in checks if not only or c["name"] in only]


def check_json(r: CheckRun) -> dict[str, Any]:
    """A check in --json's document: status, inputs, what was scored, each threshold's verdict."""
    out: dict[str, Any] = {"name": r.check["name"], "status": r.status, "placement": str(r.check["placement"]),
                           "trace": str(r.check["trace"])}
    if "baseline" in r.check:  # with what it is when the check ran: its GPUs, and a note on another count
        out["baseline"] = {"placement": str(r.check["baseline"])}
        if r.report is not None:
            out["baseline"].update({k: r.report["baseline"][k] for k in ("num_gpus", "gpus_per_node", "note")})
    if r.report is None:
        return {**out, "error": r.error}
    t = r.report.get("tokens")
    out["tokens"] = None if t is None else {k: t[k] for k in ("subset", "evaluated", "total", "split_by", "note") if k in t}
    if t is None:
        out["loads"] = {"total": r.report["loads"]["total"], "note": r.report["loads"]["note"]}
    out["thresholds"] = [{"threshold": v.key, "metric": v.what, "limit": v.limit, "value": v.value,
                          **({"baseline_value": v.baseline} if v.key.endswith(VS_BASELINE) else {}),
                          **({"note": v.note} if v.note else {}), "passed": v.passed} for v in r.verdicts]
    return out


def summary_counts(runs: list[CheckRun], skipped: int) -> dict[str, int]:
    statuses = [r.status for r in runs]
    return {"checks": len(runs), "passed": statuses.count("pass"), "failed": statuses.count("fail"),
            "errors": statuses.count("error"), "not_selected": skipped}


# XML 1.0 has no way to write these (not even escaped): ElementTree would write them as they are
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    """Text an XML 1.0 parser accepts: control characters and lone surrogates (a path's
    undecodable bytes) as U+FFFD; ElementTree escapes <, & and quotes itself."""
    return _NOT_XML.sub("\ufffd", text)


def junit_xml(runs: list[CheckRun], config: Path) -> ET.Element:
    """A JUnit report: one testsuite "moeplace check", one testcase per check; a <failure> names
    the broken thresholds, an <error> says why a check could not run."""
    counts = summary_counts(runs, 0)
    total = f"{sum(r.seconds for r in runs):.3f}"
    attrs = {"name": "moeplace check", "tests": str(counts["checks"]), "failures": str(counts["failed"]),
             "errors": str(counts["errors"]), "time": total}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", {**attrs, "skipped": "0", "file": _xml(str(config))})
    for r in runs:
        case = ET.SubElement(suite, "testcase", {"name": _xml(r.check["name"]), "classname": "moeplace check",
                                                 "time": f"{r.seconds:.3f}"})
        if r.report is None:
            ET.SubElement(case, "error", {"message": _xml(r.error), "type": "error"}).text = _xml(r.error)
            continue
        lines = "\n".join(check_lines(r))
        if r.status == "fail":
            broken = describe([v for v in r.verdicts if not v.passed])
            ET.SubElement(case, "failure", {"message": _xml(broken), "type": "threshold"}).text = _xml(lines)
        else:
            ET.SubElement(case, "system-out").text = _xml(lines)
    ET.indent(root)
    return root


def write_junit(path: Path, root: ET.Element) -> None:
    with writing(path), atomic_path(path) as tmp:  # bytes: the declaration says UTF-8 whatever the locale
        tmp.write_bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")


@click.command("check")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (each check's status, files, tokens, thresholds; the counts) instead "
                   "of the lines.")
@click.option("--junit-xml", "junit", type=OUTPUT_FILE, default=None, metavar="FILE",
              help="Also write a JUnit XML report (a testcase per check) for CI test reporters; not a file a "
                   "check reads, nor inside a model_config checkpoint directory.")
@click.option("--only", multiple=True, metavar="NAME", help="Run only the check NAME (repeatable).")
def check(config: Path, as_json: bool, junit: Path | None, only: tuple[str, ...]) -> None:
    """CI regression gate: run the checks of a YAML file; exit 1 if any fails.

    \b
    Each check evaluates one placement on one trace (as `moeplace eval` does: held-out tokens
    when the placement was fitted on a split of that trace) and compares the placement's
    metrics with thresholds. Output: one PASS/FAIL/ERROR line per check, then a summary counting
    each kind. Exit 0 all pass, 1 any fails, 2 a check could not run (missing or malformed file;
    2 wins over 1) or the YAML is malformed.

    \b
    YAML (paths relative to the YAML file; `defaults` apply to every check):
      defaults:
        trace: ../traces/flame-moe-290m-decoder.npz
      checks:
        - name: flame-8gpu
          placement: ../out/placement.json
          all_tokens: false                    # optional
          max_cross_gpu_vs_contiguous: 0.70    # ratio to the contiguous layout
          max_dest_gpus: 3.0                   # absolute
        - name: flame-1x8-latency              # cluster adds the predicted MoE time
          placement: ../out/p1x8.json
          cluster: ../configs/cluster/h100-1x8-nvlink.yaml
          model_config: ../configs/model/flame-moe-290m.yaml   # when the cluster file has no model
          max_moe_time_ratio: 0.95             # placement's MoE time / contiguous's
        - name: no-worse-than-released         # against the placement shipped last
          placement: ../out/placement.json
          baseline: ../placements/released.json
          max_cross_gpu_vs_baseline: 1.0       # placement's value / baseline's, same tokens
    Thresholds: max_cross_gpu, max_cross_node, max_dest_gpus, max_dest_nodes, max_imbalance
    (worst layer's max/mean load), each also as max_<name>_vs_contiguous and
    max_<name>_vs_baseline, and max_moe_time_ratio, max_moe_time_vs_baseline (with cluster, or
    the cost model the placement records when the check names no cluster); `null` in a check
    drops a default's threshold (or cluster, or baseline, with the defaults' thresholds on it);
    a ratio to contiguous where contiguous has 0 (a node ratio on one node, any ratio on one
    GPU) is n/a: it holds if the placement's value is 0 too, else it fails. When the tokens are
    not a held-out split, a `tokens:` line under the check says what they are.

    \b
    baseline: another placement of the same model (layers, experts; else the check is an
    ERROR), scored on exactly the placement's tokens; a _vs_baseline threshold needs one. A
    baseline on another GPU count is compared, with a `baseline:` line saying so (its MoE time
    is not predicted: the cost model is the placement's cluster). Where the baseline's value is
    0 there is no ratio: the threshold holds if the placement's is 0 too, else it fails.

    \b
    For CI: --json prints one JSON document on stdout instead of the lines (per check: name,
    status pass/fail/error, placement, trace, baseline, tokens, each threshold's limit, value,
    verdict and, for a _vs_baseline one, the baseline's own value; or the error; then the
    counts); the FAIL or error summary line still goes to stderr, and the exit codes are the
    same. --junit-xml FILE also writes a JUnit report (a <failure> names the broken thresholds,
    an <error> a check that could not run) for GitLab, Jenkins or GitHub test reporters.
    --only NAME runs only that check (repeatable; an unknown name is an error listing the
    YAML's names). A malformed YAML or an unknown --only name is one error line on
    stderr and exit 2, before any check runs: no JSON, no XML file.

    \b
    Example (after `make demo`):
      moeplace check configs/check-example.yaml
      moeplace check configs/check-example.yaml --only flame-decoder-8gpu-2node \\
          --junit-xml out/check.xml --json > out/check.json
    """
    every = read_checks(config)
    checks = select_checks(every, only, config)
    if junit is not None:  # fail now, not after the checks have run
        check_output(junit, "--junit-xml", [config, *(c.get(k) for c in checks for k in _CHECK_FILES)],
                     [(checkpoint_dir(c.get("model_config")), f"check {c['name']!r} model_config") for c in checks])
    runs = []
    said: set[str] = set()  # a checkpoint's cost estimate, said once however many checks use it
    for c in checks:
        runs.append(run_check(c, said))
        if not as_json:  # each line as its check ends: a long gate shows progress
            click.echo("\n".join(check_lines(runs[-1])))
    if junit is not None:
        write_junit(junit, junit_xml(runs, config))
    counts = summary_counts(runs, len(every) - len(checks))
    n, passed, failed, broken = counts["checks"], counts["passed"], counts["failed"], counts["errors"]
    if as_json:
        click.echo(json.dumps({"config": str(config), "passed": not failed and not broken, "summary": counts,
                               "checks": [check_json(r) for r in runs]}, indent=2))
    if broken:  # exit 2 wins: the gate did not run whole, whatever the others say
        raise MoeplaceError(f"{broken} of {plural(n, 'check')} could not run ({passed} passed, {failed} failed)")
    if failed:  # a verdict, not bad input: not the `moeplace: error:` line
        click.echo(f"moeplace check: FAIL: {failed} of {plural(n, 'check')} failed ({passed} passed)", err=True)
        raise AlreadyReported(1)
    if not as_json:
        click.echo(f"moeplace check: PASS: {f'all {n} checks' if n > 1 else 'the 1 check'} passed")
