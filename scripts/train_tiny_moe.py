#!/usr/bin/env python
"""Train a small Mixtral-architecture MoE on ../shared/data/text, for demos and tests.

    nice python scripts/train_tiny_moe.py -o checkpoints/tiny-moe

Steps:
  1. train a byte-level BPE tokenizer (`tokenizers`) on the text files;
  2. tokenise each file; its last 5% of tokens is held out for validation;
  3. build a MixtralForCausalLM from a config (16 experts, top-2, 4 MoE layers) and train it
     with AdamW + the Switch load-balancing loss on random windows for --steps (or for
     --minutes of wall time: the learning-rate schedule then runs on the fraction spent);
  4. measure routing affinity on held-out windows, before and after training: mutual information
     between consecutive MoE layers against a token-shuffled baseline (moeplace.analyze);
  5. save model (bf16 weights, tied embeddings) + tokenizer with save_pretrained, and a README.md
     with the command, data, losses and affinity figures.

The routing is recorded with moeplace's own collector (hooks on the routers), i.e. the same
path `moeplace trace` uses. With --steps the run is seeded end to end (data sampling, init);
with --minutes the number of steps depends on the machine (the README records it).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "text"
SPECIAL = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="directory of .txt files [%(default)s]")
    p.add_argument("-o", "--out", type=Path, default=ROOT / "checkpoints" / "tiny-moe")
    p.add_argument("--steps", type=int, default=1400,
                   help="training steps [%(default)s: about 10 minutes on 2 cores, 1.2 passes over the data]")
    p.add_argument("--minutes", type=float, default=None, help="train for this wall time instead of --steps")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--expert-hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-coef", type=float, default=0.01, help="per-layer load-balancing loss weight [%(default)s]")
    # one intra-op thread: on the shared 2-core machine two threads ran far slower (spinning on each other)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- 1-2. tokenizer and data --------------------------------------------------------------------

def train_tokenizer(files: list[Path], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   pad_token=SPECIAL, unk_token=None)


def tokenize_files(tokenizer, files: list[Path], holdout: float = 0.05) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per file: (train tokens, held-out tokens), int64, the last `holdout` of each file held out."""
    train, val = [], []
    for f in files:
        ids = np.asarray(tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"], dtype=np.int64)
        cut = int(len(ids) * (1 - holdout))
        train.append(ids[:cut])
        val.append(ids[cut:])
    return train, val


def sample_windows(streams: list[np.ndarray], n: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """n random windows [n, seq_len]; files are picked in proportion to their length."""
    sizes = np.array([len(s) - seq_len for s in streams], dtype=np.float64)
    which = rng.choice(len(streams), size=n, p=sizes / sizes.sum())
    rows = [streams[w][(o := rng.integers(0, len(streams[w]) - seq_len)): o + seq_len] for w in which]
    return torch.from_numpy(np.stack(rows))


def fixed_windows(streams: list[np.ndarray], per_stream: int, seq_len: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping windows from each held-out stream [S * per_stream, seq_len]."""
    rows = []
    for s in streams:
        starts = np.linspace(0, len(s) - seq_len, per_stream).astype(int)
        rows.extend(s[o: o + seq_len] for o in starts)
    return torch.from_numpy(np.stack(rows))


# ---- 3. model ----------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.expert_hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4 * args.seq_len,
        tie_word_embeddings=True, router_aux_loss_coef=0.0, output_router_logits=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(args.seed)
    return MixtralForCausalLM(config)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch load-balancing loss per MoE layer, averaged over layers (1.0 when balanced).

    transformers' Mixtral aux loss concatenates all layers' logits, which only balances each
    expert id summed over layers and leaves single layers with dead and hot experts.
    """
    losses = []
    for logits in router_logits:  # [T, E]
        probs = logits.float().softmax(-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).float()  # [T, k, E]
        losses.append(probs.shape[-1] * (chosen.mean(dim=(0, 1)) * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def val_loss(model, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [float(model(input_ids=w, labels=w, use_cache=False).loss) for w in windows.split(batch)]
    model.train()
    return float(np.mean(losses))


# ---- 4. affinity -------------------------------------------------------------------------------

@torch.no_grad()
def affinity(model, windows: torch.Tensor, batch: int, seed: int, shuffles: int = 8) -> dict:
    """Adjacent-layer MI (nats) per layer pair, top-1 and top-k, with its token-shuffled baseline,
    computed by `moeplace analyze`'s own statistics on the routing recorded by `moeplace trace`'s hooks."""
    from moeplace.analyze.affinity import affinity as trace_affinity
    from moeplace.models.discovery import find_moe_layers
    from moeplace.trace.collect import RouterRecorder, route_batch
    from moeplace.trace.format import make_trace

    model.eval()
    layers = find_moe_layers(model)
    with RouterRecorder(layers) as rec:
        routed = [route_batch(model, rec, w) for w in windows.split(batch)]
    model.train()
    trace = make_trace(np.concatenate([r[0] for r in routed]), np.concatenate([r[1] for r in routed]),
                       layers[0].num_experts)
    stats = trace_affinity(trace, num_shuffles=shuffles, seed=seed)["modes"]
    share = trace.expert_loads() / trace.expert_loads().sum(axis=1, keepdims=True)
    out: dict = {"tokens": trace.num_tokens, "max_load_share": float(share.max()), "min_load_share": float(share.min())}
    for mode in ("top1", "topk"):
        rows = stats[mode]["per_pair"]
        out[mode] = {"mi": [r["mi"] for r in rows], "shuffled": [r["mi_baseline"] for r in rows],
                     "shuffled_std": [r["mi_baseline_std"] for r in rows]}
    return out


# ---- 5. main -----------------------------------------------------------------------------------

def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    files = sorted(f for f in args.data.glob("*.txt") if not f.name.startswith("LICENSE"))
    if not files:
        sys.exit(f"no .txt files in {args.data}")
    t0 = time.monotonic()
    tokenizer = train_tokenizer(files, args.vocab)
    train_streams, val_streams = tokenize_files(tokenizer, files)
    log(f"tokenizer: {len(tokenizer)} tokens; train {sum(map(len, train_streams)):,} tokens, "
        f"held out {sum(map(len, val_streams)):,} ({time.monotonic() - t0:.0f}s)")

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} MoE layers x {args.experts} experts, top-{args.top_k}")
    val_windows = fixed_windows(val_streams, 16, args.seq_len)
    mi_windows = fixed_windows(val_streams, 32, args.seq_len)
    before = affinity(model, mi_windows, args.batch, args.seed)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 30
    history: list[dict] = []
    start = time.monotonic()
    step = 0
    model.train()
    while True:
        elapsed = time.monotonic() - start
        frac = elapsed / (args.minutes * 60) if args.minutes else step / args.steps
        if frac >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_windows(train_streams, args.batch, args.seq_len, rng)
        out = model(input_ids=x, labels=x, output_router_logits=True, use_cache=False)
        aux = balance_loss(out.router_logits, args.top_k)
        (out.loss + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == 1:
            rec = {"step": step, "loss": out.loss.item(), "aux": aux.item(), "lr": lr,
                   "seconds": round(time.monotonic() - start, 1)}
            history.append(rec)
            tps = step * args.batch * args.seq_len / max(rec["seconds"], 1e-9)
            log(f"step {step}: loss {rec['loss']:.3f} aux {rec['aux']:.3f} lr {lr:.2e} "
                f"[{rec['seconds']:.0f}s, {tps:,.0f} tokens/s]")
    train_seconds = time.monotonic() - start

    final_val = val_loss(model, val_windows, args.batch)
    after = affinity(model, mi_windows, args.batch, args.seed)
    tmp = args.out.with_name(f".{args.out.name}.tmp")  # readers of args.out never see a half-written model
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    summary = {
        "command": "python scripts/train_tiny_moe.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": [f.name for f in files],
        "parameters": n_params,
        "steps": step,
        "train_tokens": step * args.batch * args.seq_len,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": history[-1]["loss"] if history else None,
        "val_loss": round(final_val, 4),
        "affinity_at_init": before,
        "affinity_trained": after,
        "history": history,
    }
    (tmp / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    (tmp / "README.md").write_text(readme(summary))
    old = args.out.with_name(f".{args.out.name}.old")
    if args.out.exists():
        args.out.rename(old)
    tmp.rename(args.out)
    shutil.rmtree(old, ignore_errors=True)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    log(f"saved {args.out} ({size:.1f} MB), {step} steps in {train_seconds:.0f}s, val loss {final_val:.3f}")
    print(affinity_table(before, after))


def affinity_table(before: dict, after: dict) -> str:
    """Per layer pair: MI trained / shuffled baseline, and the same at initialisation (nats)."""
    rows = ["pair     top-1 MI (shuffled)   top-k MI (shuffled)   | at init: top-1 MI (shuffled)   top-k MI (shuffled)"]
    cols = [after["top1"], after["topk"], before["top1"], before["topk"]]
    for l in range(len(after["top1"]["mi"])):
        cells = [f"{c['mi'][l]:6.3f} ({c['shuffled'][l]:.3f})" for c in cols]
        rows.append(f"{l}>{l + 1}      {cells[0]}      {cells[1]}      |          {cells[2]}      {cells[3]}")
    means = [f"{np.mean(c['mi']):6.3f} ({np.mean(c['shuffled']):.3f})" for c in cols]
    rows.append(f"mean     {means[0]}      {means[1]}      |          {means[2]}      {means[3]}")
    return "\n".join(rows)


def readme(s: dict) -> str:
    a = s["args"]
    return f"""# tiny-moe: a small trained Mixtral-architecture MoE

Trained by `scripts/train_tiny_moe.py` for demos and tests of moeplace: its routing is learned,
not random, so `moeplace trace -> analyze -> solve -> eval` shows real inter-layer affinity.

- Architecture: `MixtralForCausalLM`, {a['layers']} MoE layers (no dense layers), {a['experts']} experts,
  top-{a['top_k']} (softmax, renormalised), hidden {a['hidden']}, expert hidden {a['expert_hidden']},
  4 heads / 2 KV heads, tied embeddings, {s['parameters'] / 1e6:.2f}M parameters, saved as bf16
  safetensors (load with `dtype=torch.float32` on CPU for exact float32 routing of these weights).
- Tokenizer: byte-level BPE, {a['vocab']} tokens, trained with `tokenizers` on the same text;
  `AutoTokenizer.from_pretrained` loads it. `<|endoftext|>` is bos/eos/pad.
- Data: {', '.join(s['data'])} from ../shared/data/text (OLMoE routing-analysis samples,
  Apache-2.0); the last 5% of each file is held out.
- Training: {s['steps']} steps x {a['batch']} x {a['seq_len']} tokens ({s['train_tokens']:,} tokens) in
  {s['train_seconds']:.0f} s with {a['threads']} torch thread(s) (2-core machine shared with other jobs, `nice`), AdamW lr {a['lr']},
  cosine, per-layer load-balancing loss x {a['aux_coef']}. Final train loss {s['final_train_loss']:.3f},
  held-out loss {s['val_loss']:.3f} (nats/token).
- Command: `nice {s['command']}`

## Routing affinity (held-out text, {s['affinity_trained']['tokens']:,} tokens)

Mutual information between the experts of consecutive MoE layers, in nats (log 16 = 2.773), as
`moeplace analyze` computes it: top-1 (each token's first expert) and top-k (its k x k expert
pairs); in brackets the mean over 8 token shuffles of layer l+1, which keeps both marginals
and the sample size and destroys the pairing. "At init" is the same architecture and seed
before training: random routers already inherit some affinity from the shared residual stream.

```
{affinity_table(s['affinity_at_init'], s['affinity_trained'])}
```

Share of each layer's top-k selections per expert after training: {s['affinity_trained']['min_load_share']:.3f}
to {s['affinity_trained']['max_load_share']:.3f} (uniform = {1 / int(a['experts']):.3f}).
`training.json` holds the full loss history and figures.
"""


if __name__ == "__main__":
    main()
