"""`moeplace serve`: the placement's nodes against the ranks' real ones (warning, --strict-topology),
and `--chat-template` (a template for a checkpoint whose tokenizer has none)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from moeplace.cli import run
from moeplace.placement import Placement
from moeplace.serve import dist
from moeplace.serve.cli import load_tokenizer, set_chat_template
from moeplace.serve.dist import NODE_BY_GROUP_RANK, NODE_BY_HOSTNAME, node_key
from moeplace.serve.engine import agree, describe_layout, node_layout, topology_problem
from moeplace.solve.baselines import contiguous

TINY = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-moe"  # no chat template, 16 experts, 4 MoE layers
SOURCE = NODE_BY_GROUP_RANK
# a plain Jinja template, as chat models ship them
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def placement(nodes: int, gpus_per_node: int) -> Placement:
    return Placement(np.zeros((1, 4), dtype=np.int64), num_gpus=nodes * gpus_per_node, gpus_per_node=gpus_per_node)


# ---------------------------------------------------------------------------------------------
# the comparison, pure


@pytest.mark.parametrize("keys, gpus_per_node", [
    ([7, 7, 3, 3], 2),  # node ids are any numbers: only the grouping counts
    ([3, 3, 7, 7], 2),  # the placement's node 0 may be any real node
    ([5, 5, 5, 5], 4),  # one node
    ([0, 1, 2, 3], 1),  # a node per rank
    ([9], 1),  # one rank
    ([1] * 8 + [2] * 8, 8),
])
def test_layouts_that_match(keys: list[int], gpus_per_node: int) -> None:
    assert topology_problem(placement(len(keys) // gpus_per_node, gpus_per_node), keys, "p.json", SOURCE) is None


@pytest.mark.parametrize("keys, nodes, gpus_per_node, expected", [
    # the case: solved for 2 nodes x 8, run as 4 nodes x 4
    ([n for n in range(4) for _ in range(4)], 2, 8,
     "placement p.json assumes 2 nodes x 8 GPUs, but the ranks run on 4 nodes x 4 (by torchrun's node rank): "
     "traffic the placement keeps inside a node will cross nodes; re-solve with --gpus-per-node 4"),
    # a one-node placement on ranks that span two hosts
    ([0, 0, 1, 1], 1, 4,
     "placement p.json assumes 1 node x 4 GPUs, but the ranks run on 2 nodes x 2 (by torchrun's node rank): "
     "traffic the placement keeps inside a node will cross nodes; re-solve with --gpus-per-node 2"),
    # the demo case: a 2-node placement on one machine's ranks
    ([4, 4, 4, 4], 2, 2,
     "placement p.json assumes 2 nodes x 2 GPUs, but the ranks run on 1 node x 4 (by torchrun's node rank): "
     "ranks it puts on different nodes share a node, so its node-aware choices buy nothing here; re-solve with "
     "--gpus-per-node 4"),
    # the right node sizes, ranks numbered round robin by a launcher of one's own
    ([0, 1, 0, 1], 2, 2,
     "placement p.json assumes 2 nodes x 2 GPUs, but the ranks run on 2 nodes x 2, ranks not in node order "
     "(nodes by rank: 0 1 0 1) (by torchrun's node rank): traffic the placement keeps inside a node will cross "
     "nodes; give each node consecutive ranks (rank r on node r // 2)"),
    # round robin over 4 nodes for a 2 x 4 placement: both fixes
    ([0, 1, 2, 3] * 2, 2, 4,
     "placement p.json assumes 2 nodes x 4 GPUs, but the ranks run on 4 nodes x 2, ranks not in node order "
     "(nodes by rank: 0 1 2 3 0 1 2 3) (by torchrun's node rank): traffic the placement keeps inside a node will "
     "cross nodes; give each node consecutive ranks and re-solve with --gpus-per-node 2"),
    # uneven nodes: no placement describes them
    ([0] * 6 + [1] * 2, 2, 4,
     "placement p.json assumes 2 nodes x 4 GPUs, but the ranks run on 2 nodes of 6 + 2 ranks (by torchrun's node "
     "rank): traffic the placement keeps inside a node will cross nodes; start the same number of ranks on each "
     "node, node by node (4 for this placement)"),
    # uneven, and each real node inside one of the placement's: merged, nothing split
    ([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], 3, 4,
     "placement p.json assumes 3 nodes x 4 GPUs, but the ranks run on 2 nodes of 4 + 8 ranks (by torchrun's node "
     "rank): ranks it puts on different nodes share a node, so its node-aware choices buy nothing here; start the "
     "same number of ranks on each node, node by node (4 for this placement)"),
])
def test_layouts_that_differ_are_named_with_their_fix(keys: list[int], nodes: int, gpus_per_node: int,
                                                      expected: str) -> None:
    assert topology_problem(placement(nodes, gpus_per_node), keys, "p.json", SOURCE) == expected


def test_layouts_in_words() -> None:
    assert node_layout([42, 42, 7, 42, 9]) == [0, 0, 1, 0, 2]  # numbered by first appearance
    assert describe_layout([0, 0, 1, 1]) == "2 nodes x 2"
    assert describe_layout([0]) == "1 node x 1"
    assert describe_layout([0, 0, 0, 1]) == "2 nodes of 3 + 1 ranks"
    # a long round robin is cut after 16 ranks
    assert describe_layout([r % 2 for r in range(20)]) == (
        "2 nodes x 10, ranks not in node order (nodes by rank: 0 1 0 1 0 1 0 1 0 1 0 1 0 1 0 1 ...)")


def test_node_key_prefers_torchruns_node_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dist.socket, "gethostname", lambda: "shared-hostname")  # two containers, one name
    monkeypatch.setenv("GROUP_RANK", "0")
    first, source = node_key()
    assert source == NODE_BY_GROUP_RANK and 0 <= first < 1 << 63
    monkeypatch.setenv("GROUP_RANK", "1")
    second, _ = node_key()
    assert second != first
    monkeypatch.setenv("GROUP_RANK", "0")
    assert node_key()[0] == first
    monkeypatch.delenv("GROUP_RANK")  # no torchrun: the hostname
    by_host, source = node_key()
    assert source == NODE_BY_HOSTNAME and by_host not in (first, second)
    monkeypatch.setattr(dist.socket, "gethostname", lambda: "other-host")
    assert node_key()[0] != by_host


def test_one_rank_agrees_with_itself_and_runs_no_collective() -> None:
    # world 1: no process group exists; any collective would raise
    assert agree(0, 1, torch.device("cpu"), None, 123, node=77, strict=True) == ([77], True)


# ---------------------------------------------------------------------------------------------
# ranks started with their own GROUP_RANK, as torchrun's agents on several nodes would


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what torchrun would have set, plus `extra`."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
            "MASTER_ADDR", "MASTER_PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1", **extra}


def run_ranks(groups: list[int], args: list[str], strict: list[bool]) -> list[tuple[int, str, str]]:
    """Start one `moeplace serve` process per rank, rank r with GROUP_RANK groups[r] (and
    --strict-topology where strict[r]); (exit code, stdout, stderr) of each."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "moeplace", "serve", *args,
                               *(["--strict-topology"] if strict[r] else [])],
                              env=clean_env(RANK=str(r), WORLD_SIZE=str(len(groups)), LOCAL_RANK=str(r),
                                            GROUP_RANK=str(g), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for r, g in enumerate(groups)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=180)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("topology")
    out = {"prompts": root / "prompts.txt"}
    out["prompts"].write_text("Once upon a time\n")
    for nodes, gpn in ((2, 1), (1, 2)):  # tiny-moe's 4 MoE layers x 16 experts on 2 GPUs
        out[f"{nodes}x{gpn}"] = root / f"p{nodes}x{gpn}.json"
        Placement(contiguous(4, 16, 2), num_gpus=2, gpus_per_node=gpn).save(out[f"{nodes}x{gpn}"])
    return out


def batch_args(files: dict[str, Path], layout: str, tmp_path: Path) -> list[str]:
    return ["--model", str(TINY), "--placement", str(files[layout]), "--prompts", str(files["prompts"]),
            "--max-new-tokens", "2", "--timeout", "30", "--device", "cpu", "--stats-out", str(tmp_path / "stats.json")]


def lines(text: str, word: str) -> list[str]:
    """The lines of `text` that start `moeplace: WORD:` (a path may hold the word too)."""
    return [line for line in text.splitlines() if line.startswith(f"moeplace: {word}:")]


def test_a_placement_on_its_own_nodes_runs_without_a_word(files: dict[str, Path], tmp_path: Path) -> None:
    (code0, out0, err0), (code1, _, err1) = run_ranks([0, 1], batch_args(files, "2x1", tmp_path), [False, False])
    assert code0 == code1 == 0, err0[-2000:] + err1[-2000:]
    assert not lines(err0 + err1, "warning") and len(out0.splitlines()) == 1
    assert json.loads((tmp_path / "stats.json").read_text())["nodes"] == 2


def test_a_mismatch_is_one_warning_on_rank_0_and_the_run_goes_on(files: dict[str, Path], tmp_path: Path) -> None:
    # the demo case: a 2-node placement on one machine (both ranks on torchrun's node 0)
    (code0, out0, err0), (code1, _, err1) = run_ranks([0, 0], batch_args(files, "2x1", tmp_path), [False, False])
    assert code0 == code1 == 0, err0[-2000:] + err1[-2000:]
    assert lines(err0, "warning") == [
        f"moeplace: warning: placement {files['2x1']} assumes 2 nodes x 1 GPU, but the ranks run on 1 node x 2 "
        "(by torchrun's node rank): ranks it puts on different nodes share a node, so its node-aware choices buy "
        "nothing here; re-solve with --gpus-per-node 2"]
    assert not lines(err1, "warning")
    # said before any weight is read
    assert err0.index("moeplace: warning") < err0.index("loading weights")
    assert len(out0.splitlines()) == 1 and json.loads((tmp_path / "stats.json").read_text())["nodes"] == 1


def test_strict_topology_stops_every_rank_with_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    # a one-node placement on ranks of two nodes; the flag given to rank 1 only is strict for all
    # (the ranks share their flags in the same all-reduce), so no rank goes on to wait for another
    results = run_ranks([0, 1], batch_args(files, "1x2", tmp_path), [False, True])  # (a hang: communicate's timeout)
    assert [code for code, _, _ in results] == [2, 2], [err[-2000:] for _, _, err in results]
    err0, err1 = results[0][2], results[1][2]
    assert err0.strip().splitlines() == [
        f"moeplace: error: placement {files['1x2']} assumes 1 node x 2 GPUs, but the ranks run on 2 nodes x 1 "
        "(by torchrun's node rank): traffic the placement keeps inside a node will cross nodes; re-solve with "
        "--gpus-per-node 1 (--strict-topology)"]
    assert err1.strip() == ""  # rank 0's line says it: one line, not one per rank
    assert not (tmp_path / "stats.json").exists() and "Traceback" not in err0 + err1


def test_strict_topology_under_the_launcher_is_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    # --nproc-per-node: every rank on torchrun's node 0, a 2-node placement
    proc = subprocess.run([sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2",
                           *batch_args(files, "2x1", tmp_path), "--strict-topology"],
                          capture_output=True, text=True, timeout=180, env=clean_env(TMPDIR=str(tmp_path)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"moeplace: error: placement {files['2x1']} assumes 2 nodes x 1 GPU, but the ranks run on 1 node x 2 "
        "(by torchrun's node rank): ranks it puts on different nodes share a node, so its node-aware choices buy "
        "nothing here; re-solve with --gpus-per-node 2 (--strict-topology)"]


# ---------------------------------------------------------------------------------------------
# --chat-template


def http(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_template_serves_chat_on_a_checkpoint_without_one(tmp_path: Path) -> None:
    assert load_tokenizer(str(TINY)).chat_template is None  # without the flag, chat is a 400 here
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moeplace", "serve", "--model", str(TINY), "--port", str(port),
                             "--chat-template", str(template), "--max-new-tokens", "8", "--device", "cpu"],
                            env=clean_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                code, health = http(port, "/health")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert code == 200 and health["nodes"] == 1
        code, chat = http(port, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8})
        assert code == 200, chat
        # the prompt is the template's rendering of the messages, with the generation prompt
        tokenizer = load_tokenizer(str(TINY))
        tokenizer.chat_template = TEMPLATE
        ids = list(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
        assert tokenizer.decode(ids) == "<|system|>Be brief.\n<|user|>Name a colour.\n<|assistant|>"
        assert chat["usage"]["prompt_tokens"] == len(ids)
        # and the answer is the completion of exactly those ids
        code, plain = http(port, "/v1/completions", {"prompt": ids, "max_tokens": 8})
        assert code == 200
        tokens = plain["choices"][0]["token_ids"]
        assert chat["usage"] == plain["usage"]
        assert chat["choices"][0]["message"]["content"] == tokenizer.decode(tokens, skip_special_tokens=True)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_chat_template_as_text_and_its_check(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(str(TINY))
    set_chat_template(tokenizer, TEMPLATE, str(TINY))  # no file of that name: the value is the template
    assert tokenizer.chat_template == TEMPLATE
    with_bom = tmp_path / "bom.jinja"  # a BOM from a Windows editor is no part of the template
    with_bom.write_bytes(b"\xef\xbb\xbf" + TEMPLATE.encode())
    set_chat_template(tokenizer, str(with_bom), str(TINY))
    assert tokenizer.chat_template == TEMPLATE


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-moe without its tokenizer files."""
    path = tmp_path_factory.mktemp("no-tokenizer") / "bare"
    path.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(TINY / name, path / name)
    return path


@pytest.mark.parametrize("content, value, message", [
    (None, "missing.jinja", "--chat-template missing.jinja: no such file (give a file holding a Jinja chat "
                            "template, or the template text)"),
    ("{% for m in messages %}{{ m['content'] }}", "t.jinja",
     "--chat-template t.jinja: not a valid Jinja template (TemplateSyntaxError: Unexpected end of template."),
    ("{{ messages[0]['content'] | no_such_filter }}", "t.jinja",
     "--chat-template t.jinja: not a valid Jinja template (TemplateAssertionError: No filter named "
     "'no_such_filter'., line 1)"),
    ("{{ raise_exception('a system message first') }}", "t.jinja",
     "--chat-template t.jinja: rendering a one-message conversation ([{'role': 'user', 'content': 'Hello'}]) "
     "fails (TemplateError: a system message first)"),
    ("{% if false %}x{% endif %}", "t.jinja", "renders a one-message conversation"),
    (" \n", "t.jinja", "--chat-template t.jinja: the template is empty"),
    (b"\xff{{ x }}", "t.jinja", "--chat-template t.jinja: not UTF-8 text"),
    (None, "{{ oops", "--chat-template (the template text): not a valid Jinja template"),
    (None, ".", "--chat-template .: is a directory"),
])
def test_bad_chat_templates_are_one_line_before_the_weights_load(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch, content: Any,
                                                                 value: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    if content is not None:
        (tmp_path / value).write_bytes(content if isinstance(content, bytes) else content.encode())
    assert run(["serve", "--model", str(TINY), "--port", "0", "--chat-template", value, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "loading weights" not in err, err


def test_chat_template_needs_a_tokenizer_and_the_http_server(no_tokenizer: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    assert run(["serve", "--model", str(no_tokenizer), "--port", "0", "--chat-template", str(template)]) == 2
    err = capsys.readouterr().err
    assert f"--chat-template {template}: model {no_tokenizer} has no tokenizer to apply it with" in err
    assert len(err.strip().splitlines()) == 1
    # batch runs have no chat path: refused, not silently ignored
    assert run(["serve", "--model", str(TINY), "--prompts", "p.txt", "--chat-template", str(template)]) == 2
    assert "--chat-template applies to the HTTP server (--port), not to batch runs (--prompts)" in \
        capsys.readouterr().err
    # the launcher reads the file once before it starts any rank
    assert run(["serve", "--nproc-per-node", "2", "--model", str(TINY), "--port", "0", "--chat-template",
                str(tmp_path / "nowhere.jinja")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moeplace: error: --chat-template {tmp_path / 'nowhere.jinja'}: no such file (give a file holding a Jinja "
        "chat template, or the template text)"]
