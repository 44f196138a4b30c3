#!/usr/bin/env python3
"""Training speed and memory, ours against PyTorch, in one run.

Trains the stories260K and stories15M shapes for a few optimizer steps on
random tokens, with `llama2 train` and with a PyTorch eager model of the
same architecture (llama2.c's model.py: RMSNorm, RoPE, grouped-query
causal attention through scaled_dot_product_attention, SwiGLU, tied
embedding; AdamW with decay on 2-D tensors only, gradient clipping at
1.0, float32 on the CPU as train.py runs there). Both sides run the same
config, batch and sequence length on the same number of threads; the
first step (allocation, warm-up) is left out of each side's rate, which
is the median of the rest. Rounds alternate the two sides, and the ratio
printed is the median of the per-round ratios.

    scripts/bench-train.py [--llama2 target/release/llama2] [--threads 2]
        [--rounds 3] [--steps 6] [--shapes 260K,15M] [--no-torch]

PyTorch comes from a Python that has it (`--python`, default this one);
without torch only our side is measured. Peak RSS is read from each
child's rusage and printed beside the model's own memory (parameters,
gradients, AdamW moments, kept activations) for the memory target.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

from array import array
import random

# The shapes of stories260K (feed-forward 172 wide: multiple_of 4) and
# stories15M, at the batches the issue gives: 32 x 256 and 8 x 256.
SHAPES = {
    "260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab=512, seq=256, batch=32, multiple_of=4),
    "15M": dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab=32000, seq=256, batch=8, multiple_of=32),
}

TORCH_SIDE = r"""
import json, math, sys, time
import torch
import torch.nn.functional as F
from torch import nn

cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
torch.manual_seed(1337)
dim, L, H, KV, V, T, B = (cfg[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab", "seq", "batch"))
m = cfg["multiple_of"]
hidden = m * ((int(2 * 4 * dim / 3) + m - 1) // m)
hd = dim // H


class Norm(nn.Module):
    def __init__(s):
        super().__init__()
        s.weight = nn.Parameter(torch.ones(dim))

    def forward(s, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * s.weight


def rotate(x, cos, sin):
    # x [B, T, heads, hd] as pairs (even, odd), rotated by position.
    a, b = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(3)


class Block(nn.Module):
    def __init__(s):
        super().__init__()
        s.wq = nn.Linear(dim, H * hd, bias=False)
        s.wk = nn.Linear(dim, KV * hd, bias=False)
        s.wv = nn.Linear(dim, KV * hd, bias=False)
        s.wo = nn.Linear(H * hd, dim, bias=False)
        s.w1 = nn.Linear(dim, hidden, bias=False)
        s.w2 = nn.Linear(hidden, dim, bias=False)
        s.w3 = nn.Linear(dim, hidden, bias=False)
        s.n1, s.n2 = Norm(), Norm()

    def forward(s, x, cos, sin):
        h = s.n1(x)
        q = rotate(s.wq(h).view(B, T, H, hd), cos, sin)
        k = rotate(s.wk(h).view(B, T, KV, hd), cos, sin)
        v = s.wv(h).view(B, T, KV, hd)
        k = k.repeat_interleave(H // KV, dim=2)
        v = v.repeat_interleave(H // KV, dim=2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + s.wo(a.transpose(1, 2).reshape(B, T, dim))
        h = s.n2(x)
        return x + s.w2(F.silu(s.w1(h)) * s.w3(h))


class Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(V, dim)
        s.layers = nn.ModuleList(Block() for _ in range(L))
        s.norm = Norm()
        s.out = nn.Linear(dim, V, bias=False)
        s.out.weight = s.emb.weight
        f = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(T).float(), f)
        s.cos, s.sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def forward(s, idx, targets):
        x = s.emb(idx)
        for layer in s.layers:
            x = layer(x, s.cos, s.sin)
        logits = s.out(s.norm(x))
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))


model = Model()
# model.py's init: every matrix N(0, 0.02), the residual projections
# (wo, w3) scaled down by sqrt(2 * layers).
for name, p in model.named_parameters():
    if p.dim() == 2:
        std = 0.02 / math.sqrt(2 * L) if name.endswith(("wo.weight", "w3.weight")) else 0.02
        torch.nn.init.normal_(p, mean=0.0, std=std)
params = [p for p in model.parameters() if p.requires_grad]
groups = [
    {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
]
opt = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.95))
g = torch.Generator().manual_seed(1)
times = []
for step in range(cfg["steps"]):
    data = torch.randint(0, V, (B, T + 1), generator=g)
    t0 = time.perf_counter()
    loss = model(data[:, :-1], data[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t0)
    print(f"step {step} loss {loss.item():.4f} {times[-1] * 1e3:.1f} ms", file=sys.stderr)
print(json.dumps({"step_seconds": times}))
"""


def hidden_dim(s):
    m = s["multiple_of"]
    return m * ((int(2 * 4 * s["dim"] / 3) + m - 1) // m)


def param_count(s):
    d, h, kv = s["dim"], hidden_dim(s), s["dim"] // s["n_heads"] * s["n_kv_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d
    return s["vocab"] * d + s["n_layers"] * per_layer + d


def model_bytes(s):
    """Parameters, gradients, two AdamW moments, and the activations our
    backward keeps (trainer::activation_bytes), in bytes."""
    p = param_count(s)
    d, h, kv = s["dim"], hidden_dim(s), s["dim"] // s["n_heads"] * s["n_kv_heads"]
    b, t = s["batch"], s["seq"]
    n = b * t
    acts = s["n_layers"] * (n * (6 * d + 2 * kv + 3 * h) + b * s["n_heads"] * t * (t + 1) // 2) + n * s["vocab"]
    return {"weights": 4 * p, "gradients": 4 * p, "adamw": 8 * p, "activations": 4 * acts}


def run_ours(args, s, data_dir, out_dir):
    cmd = ours_cmd(args, s, data_dir, out_dir, args.steps)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama2 train failed ({r.returncode}):\n{r.stderr}{r.stdout}")
    ms = [float(m) for m in re.findall(r"\| ([0-9.]+)ms \|", r.stdout)]
    if len(ms) != args.steps:
        sys.exit(f"expected {args.steps} step lines from llama2 train, found {len(ms)}:\n{r.stdout}")
    return [m / 1e3 for m in ms]


def run_torch(args, s):
    import json

    cfg = dict(s, threads=args.threads, steps=args.steps)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    r = subprocess.run([args.python, "-c", TORCH_SIDE, json.dumps(cfg)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"the PyTorch side failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["step_seconds"]


def rate(s, step_seconds):
    """Tokens per second: the median step after the first."""
    return s["batch"] * s["seq"] / statistics.median(step_seconds[1:])


def write_shards(dir, vocab, tokens):
    rng = random.Random(7)
    for name in ("shard_00.bin", "shard_01.bin"):  # the first by name is validation
        ids = array("H", (rng.randrange(vocab) for _ in range(tokens)))
        if sys.byteorder != "little":
            ids.byteswap()
        with open(os.path.join(dir, name), "wb") as f:
            ids.tofile(f)


def torch_available(python):
    return subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama2", default="target/release/llama2")
    ap.add_argument("--python", default=sys.executable, help="a Python with torch installed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--shapes", default="260K,15M")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    if args.steps < 2:
        sys.exit("--steps must be at least 2 (the first step is not timed)")
    with_torch = not args.no_torch and torch_available(args.python)
    if not args.no_torch and not with_torch:
        print(f"note: {args.python} has no torch; measuring ours only (pip install torch)", file=sys.stderr)
    print(f"{args.threads} threads, {args.steps} steps per run ({args.steps - 1} timed), {args.rounds} rounds")
    for name in args.shapes.split(","):
        s = SHAPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            write_shards(tmp, s["vocab"], max(200_000, 4 * s["batch"] * (s["seq"] + 1)))
            ours, theirs, ratios = [], [], []
            for r in range(args.rounds):
                ours.append(rate(s, run_ours(args, s, tmp, os.path.join(tmp, "out"))))
                if with_torch:
                    theirs.append(rate(s, run_torch(args, s)))
                    ratios.append(ours[-1] / theirs[-1])
                line = f"  round {r}: ours {ours[-1]:,.0f} tok/s"
                if with_torch:
                    line += f", PyTorch {theirs[-1]:,.0f} tok/s, ratio {ratios[-1]:.2f}x"
                print(line, flush=True)
            p = param_count(s)
            gf = 6 * p * statistics.median(ours) / 1e9
            print(f"{name} (batch {s['batch']} x {s['seq']}, {p:,} params): ours {statistics.median(ours):,.0f} tok/s "
                  f"({gf:.1f} GFLOP/s as 6 * params * tokens/s)", end="")
            if with_torch:
                print(f", PyTorch {statistics.median(theirs):,.0f} tok/s, ours / PyTorch "
                      f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
            else:
                print()
            # Memory: a fresh child per side, so RUSAGE_CHILDREN's maximum is its own.
            mem = model_bytes(s)
            rss = subprocess.run(
                [sys.executable, "-c",
                 "import resource, subprocess, sys; subprocess.run(sys.argv[1:], capture_output=True, check=True); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)",
                 *ours_cmd(args, s, tmp, os.path.join(tmp, "out"), 2)],
                capture_output=True, text=True, check=True).stdout.strip()
            total = sum(mem.values())
            parts = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in mem.items())
            print(f"  memory: ours peak RSS {int(rss) / 2**20:.1f} MiB; model {total / 2**20:.1f} MiB ({parts}); "
                  f"ratio {int(rss) / total:.2f}x")


def ours_cmd(args, s, data_dir, out_dir, steps):
    return [
        args.llama2, "train", "--data", data_dir, "--out-dir", out_dir,
        "--batch-size", str(s["batch"]), "--max-seq-len", str(s["seq"]),
        "--vocab-size", str(s["vocab"]), "--dim", str(s["dim"]),
        "--n-layers", str(s["n_layers"]), "--n-heads", str(s["n_heads"]),
        "--n-kv-heads", str(s["n_kv_heads"]), "--multiple-of", str(s["multiple_of"]),
        "--gradient-accumulation-steps", "1",
        "--max-iters", str(steps), "--eval-interval", "1000000", "--eval-iters", "1",
        "--warmup-iters", "0", "--threads", str(args.threads),
    ]


if __name__ == "__main__":
    main()
