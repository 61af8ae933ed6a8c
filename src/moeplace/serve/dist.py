"""Process group set-up and the counted collectives every mode is built from.

NCCL on CUDA (one GPU per rank, LOCAL_RANK picks it), gloo on CPU. Both get a timeout on
`init_process_group`, so a rank that never arrives or dies makes the others raise instead of
hang: gloo notices a closed peer connection at once and a silent peer after `timeout_s`; NCCL is
put in blocking-wait mode so its timeout raises too. Without torchrun (no WORLD_SIZE) everything
runs in one process and the collectives are local copies.

Payloads are row tables [rows, width] in the activation dtype; integer and float32 metadata
ride in the same rows, bit-cast (`pack`/`unpack`), so one Alltoall carries a token's hidden
state, its experts, gate weights and sequence slot.

A rank started by torchrun's agent (or `--nproc-per-node`, which runs the same agent) lives in
its own session, so it dies with the agent (`tie_to_launcher`): a SIGKILLed launcher must not
leave ranks running, rank 0 still holding its HTTP port.
"""

from __future__ import annotations

import ctypes
import datetime
import hashlib
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeplace.errors import MoeplaceError
from moeplace.serve.counters import Counters


def world_from_env() -> tuple[int, int]:
    """(rank, world size) that torchrun gave this process; (0, 1) when not under torchrun."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MoeplaceError("RANK/WORLD_SIZE must be integers (set by torchrun)") from None


NODE_BY_GROUP_RANK, NODE_BY_HOSTNAME = "torchrun's node rank", "hostname"


def node_key() -> tuple[int, str]:
    """This rank's node as a 63-bit id (equal ids: one node), and what it was read from.

    torchrun's GROUP_RANK (its agent's node rank) when set: two containers on one host may share
    a hostname, and one host may run several agents on purpose (a fake multi-node job); the
    hostname otherwise (a launcher of one's own, or one process). Hashed, so that every rank
    sends one int64 whatever the hostname's length."""
    group = os.environ.get("GROUP_RANK", "").strip()
    key, source = (f"group_rank={group}", NODE_BY_GROUP_RANK) if group else \
        (f"hostname={socket.gethostname()}", NODE_BY_HOSTNAME)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1, source


def wants_cuda(device: str) -> bool:
    """--device auto|cpu|cuda -> whether ranks run on CUDA (auto: when a GPU is visible)."""
    return torch.cuda.is_available() if device == "auto" else device == "cuda"


LAUNCHER_ENV = "MOEPLACE_SERVE_LAUNCHER"  # `--nproc-per-node` sets it to its pid; it reports failures and Ctrl-C
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def launcher_pid() -> int | None:
    """The torchrun agent that started this rank (its parent); None when not started by one."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ.get(LAUNCHER_ENV) or os.getppid())


def tie_to_launcher() -> None:
    """Under torchrun's agent: die with it, and under `--nproc-per-node` let Ctrl-C end quietly.

    1. Linux: PR_SET_PDEATHSIG, the kernel sends SIGKILL when the agent exits, even when it was
       SIGKILLed itself (elsewhere rank 0's heartbeat polls its parent, httpserver.serve_forever);
    2. the agent may have died before that call: this rank's parent is then init (or a
       subreaper), and it leaves at once;
    3. `--nproc-per-node` forwards SIGINT to the ranks and prints the one line itself: the
       default action (exit, no KeyboardInterrupt line per rank) suffices.
    """
    agent = launcher_pid()
    if agent is None:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != agent:
        sys.stderr.write(f"moeplace: error: the launcher (pid {agent}) exited before this rank started\n")
        os._exit(1)
    if os.environ.get(LAUNCHER_ENV):
        signal.signal(signal.SIGINT, signal.SIG_DFL)


def init_distributed(timeout_s: float, device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the process group (tied to the launcher's life, see `tie_to_launcher`); returns
    (rank, world, device)."""
    rank, world = world_from_env()
    tie_to_launcher()
    use_cuda = wants_cuda(device)
    if use_cuda and not torch.cuda.is_available():
        raise MoeplaceError("--device cuda, but no CUDA device is visible")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        try:
            dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as e:  # an unreachable master or a rank that never arrives
            raise MoeplaceError(f"rank {rank}: cannot join the process group ({type(e).__name__}: {e})") from None
    return rank, world, dev


@dataclass
class Comm:
    """Counted collectives of one rank."""

    rank: int
    world: int
    device: torch.device
    counters: Counters

    def alltoall(self, rows: torch.Tensor, send_counts: list[int], kind: str, layer: int | None = None,
                 recv_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Send rows [m, W] (grouped by destination rank, `send_counts[r]` each) to their ranks.

        When the receivers cannot know how many rows arrive (`recv_counts` None), a counts
        Alltoall of `world` integers goes first. Returns (received rows grouped by source rank,
        counts per source).
        """
        remote = sum(send_counts) - send_counts[self.rank]
        row_bytes = rows.shape[1] * rows.element_size()
        if self.world == 1:
            self.counters.record(kind, 0, 0, layer)
            return rows, list(send_counts)
        if recv_counts is None:
            sent = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
            got = torch.empty_like(sent)
            dist.all_to_all_single(got, sent)
            self.counters.record("counts", self.world - 1, 8 * (self.world - 1))
            recv_counts = got.tolist()
        out = rows.new_empty((sum(recv_counts), rows.shape[1]))
        dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts)
        self.counters.record(kind, remote, remote * row_bytes, layer)
        return out, recv_counts

    def replicate(self, rows: torch.Tensor, kind: str) -> torch.Tensor:
        """Send the same rows to every other rank; returns the rows of all ranks (own included)."""
        if self.world == 1:
            self.counters.record(kind, 0, 0)
            return rows
        copies = rows.repeat(self.world, 1)
        out, _ = self.alltoall(copies, [rows.shape[0]] * self.world, kind)
        return out

    def max_reduce(self, values: torch.Tensor, kind: str) -> torch.Tensor:
        """Element-wise max over ranks (each rank fills what it knows, -1 elsewhere)."""
        if self.world > 1:
            values = values.to(self.device)
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        nbytes = values.numel() * values.element_size() * (self.world - 1)
        self.counters.record(kind, 0, nbytes)
        return values


def meta_scale(dtype: torch.dtype) -> int:
    """Elements of a row dtype per 4-byte metadata value (2 for 16-bit rows, 1 for 32-bit).
    Other widths cannot carry the bit-cast metadata: 8-byte rows would need half elements, 1-byte
    ones would hold no activation the model runs in; a clear error instead of misread rows."""
    size = dtype.itemsize
    if size not in (2, 4):
        raise MoeplaceError(f"serve runs its activations in a 16- or 32-bit dtype (bfloat16, float16, float32), "
                            f"not {str(dtype).removeprefix('torch.')}")
    return 4 // size


def pack(h: torch.Tensor, *meta: torch.Tensor) -> torch.Tensor:
    """Rows [n, H] + metadata columns (int32 or float32 [n, c]) bit-cast into h's dtype."""
    meta_scale(h.dtype)
    parts = [h]
    for m in meta:
        m = m[:, None] if m.dim() == 1 else m
        m = m.to(torch.int32) if not m.is_floating_point() else m.to(torch.float32)
        parts.append(m.contiguous().view(h.dtype))
    return torch.cat(parts, dim=1)


def unpack(rows: torch.Tensor, hidden: int, widths: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
    """Inverse of `pack`: [h [n, hidden], meta_1 [n, c_1], ...] (metadata as int32/float32)."""
    out = [rows[:, :hidden]]
    scale = meta_scale(rows.dtype)
    col = hidden
    for width, dtype in widths:
        out.append(rows[:, col:col + width * scale].contiguous().view(dtype))
        col += width * scale
    return out


# gloo appends advice to its socket errors ("This is typically caused by a remote worker
# crashing. ... GLHF!"): noise in a one-line error or a 503 body
GLOO_ADVICE = re.compile(r"\s*This is typically caused by .*?(GLHF!|$)", re.S)


def error_text(e: BaseException) -> str:
    """An exception as one short line: its first line, without gloo's boilerplate advice."""
    text = GLOO_ADVICE.sub("", str(e)).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def distributed_failure(rank: int, e: BaseException) -> MoeplaceError:
    """One-line error for a collective that failed because a peer died or went silent."""
    return MoeplaceError(f"rank {rank}: lost contact with a peer rank (it died or timed out): {error_text(e)}")
