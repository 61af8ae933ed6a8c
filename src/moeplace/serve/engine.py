"""One rank of `moeplace serve`: checks, loading, and the command loop rank 0 drives.

Order on every rank (so a bad placement costs nothing):
    1. read the checkpoint's config and safetensors headers, the placement, and the world size;
       reject a placement made for another model or another world size (no weight read yet)
    2. join the process group (timeout: a rank that never arrives is an error, not a hang); rank 0
       checks its own inputs (prompts file, HTTP port) while telling the others it is still at it
       (`check_inputs`: no timeout for a large prompts file), and broadcasts the verdict (`agree`,
       whose all-reduce also tells every rank each rank's node: `topology_problem` compares them
       with the placement's nodes)
    3. load the replicated weights and this rank's experts
    4. rank 0 reads requests (file or HTTP) and broadcasts each batch as a command; the other
       ranks follow the commands; idle rank 0 sends heartbeats, so a dead rank is noticed by
       the others within the timeout even when no request arrives

`RoutingLog` is rank 0's record of the HTTP server's decode routing, and with --routing-prefill
its prompts' too (`serve --port --routing-out`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import click
import numpy as np
import torch
import torch.distributed as dist

from moeplace.errors import AlreadyReported, MoeplaceError
from moeplace.export.permute import check_not_applied
from moeplace.options import plural
from moeplace.placement import Placement, load_placement
from moeplace.serve.counters import Counters
from moeplace.serve.dist import Comm, init_distributed, world_from_env
from moeplace.serve.generate import MODES, Result, Runtime, StepCallback, routing_arrays
from moeplace.serve.model import ModelSpec, RankModel, read_spec
from moeplace.serve.replicas import ExpertMap
from moeplace.serve.sampling import TABLE_WIDTH, Sampling, bias_table, sampling_from_table, sampling_table
from moeplace.solve.baselines import contiguous
from moeplace.trace.format import Trace, save_trace

NOOP, GENERATE, STOP = 0, 1, 2  # commands rank 0 broadcasts
# a GENERATE header's flag: rank 0's Runtime.record_prefill, which every rank records by
# (send_command sets it, receive_command applies it), so the ranks never disagree on it
RECORD_PREFILL = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Request:
    prompts: list[list[int]]
    max_new_tokens: list[int]
    ignore_eos: bool = False
    # gather the decode routing (--routing-out: traffic checks, re-solving); the prefill's too
    # where rank 0's runtime has record_prefill (--routing-prefill: a flag of the command, not of the request)
    record_routing: bool = False
    sampling: list[Sampling] | None = None  # per prompt (serve/sampling.py); None: all greedy
    # N >= 0: every token's log-probability and the N likeliest alternatives, for the whole
    # batch (the largest N a request of it asked for); None: none (no collective for them)
    logprobs: int | None = None

    @property
    def sampled(self) -> bool:
        """Some sequence samples or has a penalty or a logit bias: every rank needs the parameters
        (sampling table)."""
        return self.sampling is not None and not all(p.plain for p in self.sampling)

    @property
    def flags(self) -> int:
        """The header's flags: bits 0-3 ignore_eos, record_routing, sampled, logprobs; bit 4
        (RECORD_PREFILL) is send_command's; N above them."""
        wants = self.logprobs is not None
        return (int(self.ignore_eos) | 2 * int(self.record_routing) | 4 * int(self.sampled) | 8 * int(wants)
                | (self.logprobs or 0) << 5)


def check_placement(spec: ModelSpec, placement: Placement | None, world: int) -> Placement:
    """The placement this run uses; contiguous blocks when none is given. Raises before any load."""
    moe_layers, experts = len(spec.moe_layers), spec.num_experts
    if placement is None:
        if experts % world:
            raise MoeplaceError(f"{experts} experts cannot be split over {world} ranks; pass a --placement")
        return Placement(contiguous(moe_layers, experts, world), num_gpus=world, gpus_per_node=world)
    placement.check_fits(moe_layers, experts, what=f"model {spec.path}")
    placement.check_model(spec.family, spec.moe_layers, what=f"model {spec.path}")
    check_not_applied(spec.path, placement)
    if placement.num_gpus != world:
        raise MoeplaceError(f"placement is for {plural(placement.num_gpus, 'GPU')} but {plural(world, 'rank')} "
                            f"{'is' if world == 1 else 'are'} running: start {placement.num_gpus} (--nproc-per-node "
                            f"{placement.num_gpus}), or solve a placement for {world}")
    return placement


def prepare(model_dir: str, placement_path: str | None, mode: str,
            world: int | None = None) -> tuple[ModelSpec, Placement]:
    """Step 1 on every rank (and once in the launcher, for the `world` it starts): config,
    safetensors headers and placement checks, no weights."""
    if mode not in MODES:
        raise MoeplaceError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    world = world_from_env()[1] if world is None else world
    spec = read_spec(model_dir)
    return spec, check_placement(spec, load_placement(placement_path) if placement_path else None, world)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """--dtype, or the default for the device (bfloat16 on CUDA, float32 on CPU)."""
    return DTYPES[dtype or ("bfloat16" if device.type == "cuda" else "float32")]


def fingerprint(spec: ModelSpec, placement: Placement, mode: str, dtype: torch.dtype | None = None) -> int:
    """What every rank must share, as a 63-bit integer: the placement (with gpus_per_node, which
    the replica rule reads), the mode, the model's shapes and the activation dtype (it sets the
    packed row width and how the rows are read; None: left out, for callers that do not know it)."""
    doc = {"expert_to_gpu": placement.expert_to_gpu.tolist(), "replicas": placement.replicas, "mode": mode,
           "gpus_per_node": placement.gpus_per_node, "dtype": None if dtype is None else str(dtype),
           "model": [spec.family, spec.num_layers, spec.hidden_size, spec.vocab_size, spec.num_experts, spec.top_k,
                     list(spec.moe_layers)]}
    return int.from_bytes(hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()[:8], "big") >> 1


def check_inputs(rank: int, world: int, device: torch.device, check: Callable[[], None] | None,
                 heartbeat_s: float) -> MoeplaceError | None:
    """Rank 0 runs `check` (its own inputs; tokenising a large prompts file can outlast
    --timeout) in a thread and tells the other ranks "still checking" every `heartbeat_s`, so
    that their wait is not bounded by the collective timeout while rank 0 is alive; a dead rank 0
    still ends it at once (gloo) and a hung one after the timeout. Returns rank 0's input error."""
    if world == 1:
        try:
            if check is not None:
                check()
        except MoeplaceError as e:
            return e
        return None
    if rank > 0:
        flag = torch.zeros(1, dtype=torch.int64, device=device)
        while True:
            dist.broadcast(flag, 0)
            if not flag.item():
                return None
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if check is not None:
                check()
        except BaseException as e:  # re-raised on the main thread
            failure.append(e)

    thread = threading.Thread(target=run, name="moeplace-input-check", daemon=True)
    thread.start()
    while True:
        thread.join(heartbeat_s)
        busy = thread.is_alive()
        dist.broadcast(torch.tensor([int(busy)], dtype=torch.int64, device=device), 0)
        if not busy:
            break
    if failure and isinstance(failure[0], MoeplaceError):
        return failure[0]
    if failure:
        raise failure[0]
    return None


def agree(rank: int, world: int, device: torch.device, error: str | None, shared: int = 0, node: int = 0,
          strict: bool = False) -> tuple[list[int], bool]:
    """After joining: rank 0 tells the others whether its own input checks passed; then every
    rank checks that all run the same `shared` fingerprint (placement, mode, model, dtype):
    ranks started with different --placement files would route a token to a rank that lacks its
    expert and silently add nothing for it; with different --dtype they would misread each
    other's rows, or wait forever on Alltoalls of different sizes.

    The same all-reduce (max) also carries each rank's `node` id (dist.node_key; slot r is rank
    r's, -1 elsewhere) and whether a rank asked for `strict` (--strict-topology): every rank
    learns every rank's node and decides the topology check alike, with no collective more.
    Returns (node id per rank, strict on any rank); world 1: ([node], strict)."""
    if world == 1:
        return [node], strict
    flag = torch.tensor([int(error is not None)], dtype=torch.int64, device=device)
    dist.broadcast(flag, 0)
    if flag.item():
        if rank > 0:
            raise AlreadyReported(MoeplaceError.exit_code)  # rank 0's line says why; one line, not N
        return [], strict
    nodes = [-1] * world
    nodes[rank] = node
    table = torch.tensor([shared, -shared, int(strict), *nodes], dtype=torch.int64, device=device)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    values = table.tolist()
    if values[0] != -values[1]:
        raise MoeplaceError(f"rank {rank}: the ranks were started with different placements, modes, models or "
                            "dtypes; give every rank the same --placement, --mode, --model and --dtype")
    return values[3:], bool(values[2])


def node_layout(keys: list[int]) -> list[int]:
    """Each rank's node, numbered 0, 1, ... in the order the ranks first name them: two layouts
    group the ranks alike exactly when their node_layouts are equal. keys [world]: any id per
    rank, equal on one node (dist.node_key's, or a placement's rank // gpus_per_node)."""
    number: dict[int, int] = {}
    return [number.setdefault(k, len(number)) for k in keys]


def describe_layout(nodes: list[int]) -> str:
    """A node_layout in words: '4 nodes x 4', '2 nodes of 3 + 1 ranks', with ', ranks not in node
    order (nodes by rank: 0 1 0 1)' when a node's ranks are not consecutive."""
    counts = Counter(nodes)
    sizes = [counts[n] for n in range(len(counts))]
    text = f"{plural(len(sizes), 'node')} x {sizes[0]}" if len(set(sizes)) == 1 else \
        f"{plural(len(sizes), 'node')} of {' + '.join(map(str, sizes))} ranks"
    if nodes != sorted(nodes):
        shown = " ".join(map(str, nodes[:16])) + (" ..." if len(nodes) > 16 else "")
        text += f", ranks not in node order (nodes by rank: {shown})"
    return text


def topology_problem(placement: Placement, keys: list[int], name: str, source: str) -> str | None:
    """One line when the ranks' real nodes (`keys`, a node id per rank; read from `source`)
    group them otherwise than the placement's rank // gpus_per_node does, else None. GPU g's
    experts run on rank g, so the solver's care to keep a token's experts inside a node holds
    only where rank g's node is g's node in the placement."""
    world = len(keys)
    gpn = placement.gpus_per_node
    assumed = node_layout([r // gpn for r in range(world)])
    real = node_layout(keys)
    if real == assumed:
        return None
    # a placement node whose ranks run on several real nodes: traffic it kept inside a node
    # crosses nodes; otherwise the real nodes only merge its nodes (no traffic is worse for it)
    spans: dict[int, set[int]] = {}
    for a, r in zip(assumed, real):
        spans.setdefault(a, set()).add(r)
    split = any(len(s) > 1 for s in spans.values())
    effect = ("traffic the placement keeps inside a node will cross nodes" if split else
              "ranks it puts on different nodes share a node, so its node-aware choices buy nothing here")
    sizes = set(Counter(real).values())
    in_order = real == sorted(real)
    if len(sizes) > 1:
        fix = f"start the same number of ranks on each node, node by node ({gpn} for this placement)"
    elif in_order:
        fix = f"re-solve with --gpus-per-node {sizes.pop()}"
    elif sizes == {gpn}:
        fix = f"give each node consecutive ranks (rank r on node r // {gpn})"
    else:
        fix = f"give each node consecutive ranks and re-solve with --gpus-per-node {sizes.pop()}"
    return (f"placement {name} assumes {plural(placement.num_nodes, 'node')} x {plural(gpn, 'GPU')}, but the "
            f"ranks run on {describe_layout(real)} (by {source}): {effect}; {fix}")


def load_runtime(spec: ModelSpec, placement: Placement, mode: str, rank: int, world: int, device: torch.device,
                 dtype: str | None = None) -> Runtime:
    """Step 3: this rank's weights (replicated part + its experts' copies, primary or replica)
    and communicator."""
    torch_dtype = resolve_dtype(dtype, device)
    # ascending ids: partial sums add up in transformers' expert order
    local = [sorted(placement.experts_on_gpu(m, rank)) for m in range(placement.num_layers)]
    model = RankModel(spec, local, device, torch_dtype)
    comm = Comm(rank, world, device, Counters(len(spec.moe_layers)))
    return Runtime(model, comm, ExpertMap.from_placement(placement, device), mode)


def build_runtime(model_dir: str, placement_path: str | None, mode: str, timeout_s: float,
                  device: str = "auto", dtype: str | None = None) -> Runtime:
    """Steps 1-3 above on this rank (no rank-0 input to check)."""
    spec, placement = prepare(model_dir, placement_path, mode)
    rank, world, dev = init_distributed(timeout_s, device)
    return load_runtime(spec, placement, mode, rank, world, dev, dtype)


def receive_command(rt: Runtime) -> tuple[int, Request | None]:
    """Worker side of send_command: (command, request when GENERATE); a GENERATE also sets the
    runtime's record_prefill to rank 0's."""
    dev = rt.comm.device
    header = torch.zeros(4, dtype=torch.int64, device=dev)
    dist.broadcast(header, 0)
    cmd, n, total, flags = header.tolist()
    if cmd != GENERATE:
        return cmd, None
    body = torch.zeros(2 * n + total, dtype=torch.int64, device=dev)
    dist.broadcast(body, 0)
    vals = body.tolist()
    lens, max_new, flat = vals[:n], vals[n:2 * n], vals[2 * n:]
    starts = np.cumsum([0] + lens)
    prompts = [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]
    rt.record_prefill = bool(flags & RECORD_PREFILL)
    sampling = None
    if flags & 4:  # a token may be drawn on any rank (coherent mode): every rank needs every row's parameters
        table = torch.zeros((n, TABLE_WIDTH), dtype=torch.int64, device=dev)
        dist.broadcast(table, 0)
        table = table.cpu()
        biases: torch.Tensor | None = None
        if total_biases := int(table[:, -1].sum()):  # the rows' logit_bias pairs (sampling.bias_table)
            biases = torch.zeros((total_biases, 2), dtype=torch.int64, device=dev)
            dist.broadcast(biases, 0)
            biases = biases.cpu()
        sampling = sampling_from_table(table, biases)
    return cmd, Request(prompts, max_new, bool(flags & 1), bool(flags & 2), sampling,
                        flags >> 5 if flags & 8 else None)


def send_command(rt: Runtime, cmd: int, req: Request | None = None) -> None:
    """Rank 0 side: broadcast (cmd, request) to the other ranks, with rank 0's record_prefill: the
    header [cmd, n, total, flags]; for GENERATE the body (prompt lengths, max_new_tokens, prompt
    ids), the sampling table when some sequence is not plain greedy, and the bias table when some
    has a logit bias (the sampling table's last column says how many pairs each row has)."""
    if rt.comm.world == 1:
        return
    dev = rt.comm.device
    n = len(req.prompts) if req else 0
    total = sum(len(p) for p in req.prompts) if req else 0
    flags = req.flags | RECORD_PREFILL * int(rt.record_prefill) if req else 0
    header = torch.tensor([cmd, n, total, flags], dtype=torch.int64, device=dev)
    dist.broadcast(header, 0)
    if cmd == GENERATE and req is not None:
        body = torch.tensor([len(p) for p in req.prompts] + list(req.max_new_tokens)
                            + [t for p in req.prompts for t in p], dtype=torch.int64, device=dev)
        dist.broadcast(body, 0)
        if req.sampled:
            assert req.sampling is not None
            dist.broadcast(sampling_table(req.sampling).to(dev), 0)
            if any(p.biased for p in req.sampling):  # variable length: its own broadcast, only when there is one
                dist.broadcast(bias_table(req.sampling).to(dev), 0)


def run_request(rt: Runtime, req: Request, on_step: StepCallback | None = None) -> Result:
    """Every rank: generate for the request (rank 0 has already broadcast it). on_step: rank 0's
    hook (Runtime.generate: streaming, and slots to end early, whose flags ride in the tokens
    all-reduce every rank runs anyway); workers pass None."""
    rt.record_routing = req.record_routing
    return rt.generate(req.prompts, req.max_new_tokens, req.ignore_eos,
                       sampling=req.sampling if req.sampled else None, on_step=on_step, logprobs=req.logprobs)


def merged_counters(rt: Runtime) -> Counters:
    """Counters summed over ranks (one all-reduce, not itself counted), each rank's expert load included."""
    c = rt.comm.counters
    vec = torch.tensor(c.as_vector(rt.comm.rank, rt.comm.world), dtype=torch.int64, device=rt.comm.device)
    if rt.comm.world > 1:
        dist.all_reduce(vec)
    return Counters.from_vector(c.num_moe_layers, vec.tolist(), rt.comm.world)


def worker_loop(rt: Runtime) -> None:
    """Ranks > 0: follow rank 0's commands until STOP (NOOP is rank 0's idle heartbeat)."""
    while True:
        cmd, req = receive_command(rt)
        if cmd == GENERATE:
            assert req is not None
            run_request(rt, req)
            merged_counters(rt)
        elif cmd == STOP:
            return


# --routing-max-tokens' default. A decode token costs L x k x (2 B id + 4 B gate weight) + 24 B
# (sequence, position, token id): 2.8 kB for DeepSeek-V3 (58 MoE layers, top-8, 256 experts), so
# 200k tokens hold 0.56 GB on rank 0's host, twice that while a write joins the batches' arrays.
# With --routing-prefill a prompt token costs as much, and every token 4 B more (its prompt's length).
ROUTING_MAX_TOKENS = 200_000
ROUTING_EVERY_S = 300.0
# --routing-keep: the first max_tokens tokens (then recording stops), or a window of the last
# max_tokens (recording goes on for the server's life; the oldest tokens are dropped)
ROUTING_KEEP = ("first", "last")


def routing_meta(spec: ModelSpec, world: int, prefill: bool, http: bool) -> dict[str, Any]:
    """A --routing-out trace's meta, batch or HTTP: source ("moeplace serve (decode)",
    "(prefill+decode, http)" ...), model, moe_layers, and how eval finds a token's home rank
    (phase_meta adds a prefill file's prompt lengths)."""
    return {"source": f"moeplace serve ({'prefill+decode' if prefill else 'decode'}{', http' if http else ''})",
            "model": str(spec.path), "moe_layers": list(spec.moe_layers), "home_rank": "sequence_id % world",
            "world": world}


def phase_meta(sequence_ids: np.ndarray, prompt_lengths: np.ndarray) -> dict[str, Any]:
    """The meta of a --routing-prefill trace that says which tokens are prompt tokens: phases
    ["prefill", "decode"], and prompt_lengths [[sequence id, its prompt's length], ...] for every
    sequence in the file, by id: its tokens at positions below the length are prompt tokens
    (prefill), the others tokens a decode step ran. sequence_ids, prompt_lengths: int [T], per token."""
    seqs, first = np.unique(sequence_ids, return_index=True)
    return {"phases": ["prefill", "decode"],
            "prompt_lengths": [[int(q), int(n)] for q, n in zip(seqs, prompt_lengths[first])]}


def prompt_token_count(positions: np.ndarray, prompt_lengths: np.ndarray) -> int:
    """How many of the tokens are prompt tokens (position below their prompt's length)."""
    return int(np.count_nonzero(positions < prompt_lengths))


def routing_summary(tokens: int, layers: int, prefill: bool, prompt: int) -> str:
    """What a --routing-out file holds, for its `wrote FILE: ...` line: "decode routing of 30
    tokens x 4 MoE layers", or with prefill "prefill+decode routing of 46 tokens (16 prompt, 30
    decode) x 4 MoE layers"."""
    if not prefill:
        return f"decode routing of {plural(tokens, 'token')} x {plural(layers, 'MoE layer')}"
    return (f"prefill+decode routing of {plural(tokens, 'token')} ({prompt} prompt, {tokens - prompt} decode) x "
            f"{plural(layers, 'MoE layer')}")


class RoutingLog:
    """Rank 0's decode routing of the batches an HTTP server ran (prefill=True: the prompts'
    routing too, each sequence's tokens in position order, with phase_meta), kept as per-batch
    arrays and written as a v1 trace (`moeplace.trace/v1`, batch mode's layout and meta;
    uncompressed, see `write`) every `every_s` seconds when tokens were added (`maybe_write`, from
    a thread: the main thread keeps serving) and when the server stops (`close`). Sequence ids count up over
    requests and batches, each batch starting at a multiple of the world size: a sequence's home
    rank (its slot % world) stays its id % world, as eval's traffic model reads it. At most
    `max_tokens` are held: keep="first" stops recording there, with one note on stderr;
    keep="last" records on and drops the oldest (`_drop_oldest`), with one note when the window
    first fills, and says so in the trace's meta. Prompt tokens count as tokens there. Only rank
    0's main thread calls the methods; a writer thread touches only the numpy arrays of its
    snapshot. prefill sets rank 0's rt.record_prefill, which every command carries to the other
    ranks (send_command)."""

    def __init__(self, path: str, rt: Runtime, max_tokens: int = ROUTING_MAX_TOKENS,
                 every_s: float = ROUTING_EVERY_S, source: str | None = None,
                 keep: str = "first", prefill: bool = False) -> None:
        if keep not in ROUTING_KEEP:
            raise ValueError(f"keep must be one of {ROUTING_KEEP}, got {keep!r}")
        spec = rt.model.spec
        self.path, self.max_tokens, self.every_s, self.keep = path, max_tokens, every_s, keep
        self.num_experts, self.num_layers, self.world = spec.num_experts, len(spec.moe_layers), rt.comm.world
        self.prefill = rt.record_prefill = prefill
        self.unit = "prompt and decode token" if prefill else "decode token"  # what the notes count
        self.meta = routing_meta(spec, rt.comm.world, prefill, http=True)
        if source is not None:
            self.meta["source"] = source
        # never changed once appended (a snapshot is a list copy): dropping replaces list elements
        self.chunks: list[dict[str, np.ndarray]] = []
        self.tokens = 0  # held in chunks
        # tokens ever added: the version of what is held (with keep="last" the held count can
        # stay at max_tokens while the tokens change); dropped = added - tokens
        self.added = 0
        self.filled = False  # keep="last": the window has filled (said once)
        self.next_sequence = 0
        self.written = 0  # `added` when the file on disk was snapshot (set by whichever thread wrote it)
        self.written_tokens = 0  # tokens in the file on disk
        self.written_prompt = 0  # of which prompt tokens (prefill)
        self.last_write = time.monotonic()
        self.writer: threading.Thread | None = None
        self.failure: str | None = None  # the writer thread's last error, reported once by the main thread
        self.reported: str | None = None
        self.closing = False  # set when the server loop has ended: the last write follows

    @property
    def recording(self) -> bool:
        """Whether the next batch's routing is wanted (Request.record_routing)."""
        return self.keep == "last" or self.tokens < self.max_tokens

    def add(self, req: Request, result: Result) -> None:
        """Keep a served batch's recorded routing (slots 0.. are its prompts, in order)."""
        first = self.next_sequence
        self.next_sequence += -(-len(req.prompts) // self.world) * self.world
        if result.routing is None or not self.recording:
            return
        arrays = routing_arrays(result.routing, result.routing_weights, req.prompts, result.tokens,
                                self.num_layers, first)
        if self.prefill:  # (phase_meta's, at each write); int32: a prompt fits max_positions
            arrays["prompt_lengths"] = arrays["prompt_lengths"].astype(np.int32)
        else:
            del arrays["prompt_lengths"]
        room = self.max_tokens - self.tokens
        if self.keep == "first" and len(arrays["positions"]) >= room:
            arrays = {key: a[:room] for key, a in arrays.items()}
            click.echo(f"moeplace serve: note: --routing-out {self.path} holds {plural(self.max_tokens, self.unit)} "
                       "(--routing-max-tokens): recording stops here; the file keeps them", err=True)
        arrays["topk_ids"] = arrays["topk_ids"].astype(np.int16 if self.num_experts <= 32767 else np.int32)
        # own copies: `positions` is a view into the batch's whole gathered routing (int64, 3 + 2k
        # columns a row), which it would keep alive, about three times the token's own cost
        arrays = {key: a if a.base is None else a.copy() for key, a in arrays.items()}
        if not len(arrays["positions"]):
            return
        self.chunks.append(arrays)
        self.tokens += len(arrays["positions"])
        self.added += len(arrays["positions"])
        if self.keep == "last" and self.tokens >= self.max_tokens:
            if not self.filled:
                self.filled = True
                click.echo(f"moeplace serve: note: --routing-out {self.path} now keeps the most recent "
                           f"{plural(self.max_tokens, self.unit)} (--routing-keep last): older batches are "
                           "dropped", err=True)
            if self.tokens > self.max_tokens:
                self._drop_oldest(self.tokens - self.max_tokens)

    def _drop_oldest(self, excess: int) -> None:
        """Drop `excess` tokens from the head: the oldest batches whole, then the head of the
        oldest one left, so that exactly max_tokens stay (a bound the memory and the file size can
        be told from, even where one batch holds more than the window). A batch's tokens are in
        (slot, position) order, so the cut takes its first slots' sequences whole and the first
        positions of at most one sequence; positions and sequence ids stay as recorded. Replaces
        list elements and arrays, never changes one: a writer's snapshot stays as it was."""
        drop = 0
        while excess >= len(self.chunks[drop]["positions"]):
            excess -= len(self.chunks[drop]["positions"])
            drop += 1
        kept = self.chunks[drop:]
        if excess:  # a copy: a view would keep the dropped head's memory
            kept[0] = {key: a[excess:].copy() for key, a in kept[0].items()}
        self.chunks = kept
        self.tokens = sum(len(c["positions"]) for c in kept)

    def maybe_write(self) -> None:
        """Start a write in a thread when `every_s` has passed since the last one, tokens were
        added since (`added`: with keep="last" the count held may not change), and no write is
        under way."""
        self.report_failure()
        if self.added == self.written or time.monotonic() - self.last_write < self.every_s or \
                (self.writer is not None and self.writer.is_alive()):
            return
        self.last_write = time.monotonic()
        self.writer = threading.Thread(target=self._write_quietly, args=(list(self.chunks), self.added),
                                       name="moeplace-routing-writer", daemon=True)
        self.writer.start()

    def close(self) -> None:
        """When the server stops: finish a write under way, then write what it lacks, here
        (raises MoeplaceError when the file cannot be written)."""
        self.closing = True
        if self.writer is not None:
            self.writer.join()
        self.report_failure()
        if self.added > self.written:
            try:
                self.write(list(self.chunks), self.added)
            except OSError as e:
                raise MoeplaceError(f"cannot write {self.path}: {e.strerror or e}") from None
        if self.written_tokens:
            summary = routing_summary(self.written_tokens, self.num_layers, self.prefill, self.written_prompt)
            click.echo(f"wrote {self.path}: {summary}")
        else:  # a trace holds at least one token
            ran = "no request was recorded" if self.prefill else "no decode step ran"
            click.echo(f"moeplace serve: note: {ran}, so {self.path} was not written", err=True)

    def report_failure(self) -> None:
        failure = self.failure
        if failure is not None and failure != self.reported:
            click.echo(f"moeplace serve: warning: cannot write {self.path}: {failure} (will try again)", err=True)
            self.reported = failure

    def _write_quietly(self, chunks: list[dict[str, np.ndarray]], added: int) -> None:
        try:
            self.write(chunks, added)
            self.failure = None
        except Exception as e:  # a full disk: said by the main thread, tried again at the next period
            self.failure = (e.strerror if isinstance(e, OSError) else None) or str(e)

    def write(self, chunks: list[dict[str, np.ndarray]], added: int) -> None:
        """`chunks` (a snapshot of `self.chunks`, taken when `added` tokens had been added) as one
        trace file, atomically (save_trace: a reader, or a SIGKILL, sees the old file or the new
        one), uncompressed and unchecked: 200k DeepSeek-V3-shaped tokens took 3.0-4.0 s on 2 shared
        CPU cores where compression took 47 s (docs/runtime.md) (gate weights barely compress), and the rows come from the router's
        topk (distinct ids, weights highest first); load_trace checks what it reads. keep="last"
        adds meta keep, routing_max_tokens and dropped_tokens (tokens recorded before the file's)."""
        if not chunks:
            return
        joined = {key: np.concatenate([c[key] for c in chunks]) for key in ("topk_ids", "sequence_ids", "positions",
                                                                          "token_ids")}
        weights = np.concatenate([c["topk_weights"] for c in chunks]) if all("topk_weights" in c for c in chunks) \
            else None
        meta = self.meta if self.keep == "first" else \
            {**self.meta, "keep": "last", "routing_max_tokens": self.max_tokens,
             "dropped_tokens": added - len(joined["positions"])}
        prompt = 0
        if self.prefill:
            lengths = np.concatenate([c["prompt_lengths"] for c in chunks])
            meta = {**meta, **phase_meta(joined["sequence_ids"], lengths)}
            prompt = prompt_token_count(joined["positions"], lengths)
        trace = Trace(joined["topk_ids"], self.num_experts, weights, token_ids=joined["token_ids"],
                      sequence_ids=joined["sequence_ids"], positions=joined["positions"], meta=meta)
        save_trace(trace, self.path, compress=False, checked=True)
        self.written, self.written_tokens, self.written_prompt = added, trace.num_tokens, prompt
