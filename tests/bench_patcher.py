"""Benchmark (not a unit test): the cost of Patcher's defender step relative to a plain SFT step.

    python tests/bench_patcher.py [--model DIR] [--batch 4] [--seq 128] [--iters 3]

1. time:   defender_step (alpha = 0.5: two forward-backward passes) / sft_step, interleaved in one
           process on the same batch; 2.0 is the floor.
2. memory: peak resident memory of a process that runs SFT steps vs one that runs an inner attack
           plus defender steps, each measured in its own subprocess, expressed in fp32 parameter
           copies (so the extra copies Patcher holds can be counted: theta snapshot, delta, AdamW
           moments of the inner attack).
On CUDA the memory numbers are torch.cuda.max_memory_allocated instead of resident memory.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import patcher  # noqa: E402
from model import load_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default=os.path.join(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache/patcher-assets"), "smollm2-135m-instruct"))
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--iters", type=int, default=7)
p.add_argument("--part", choices=["sft", "patcher"], help=argparse.SUPPRESS)  # internal: one memory measurement
args = p.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100  # a prompt half and a supervised half, as in SFT data
    return {"input_ids": ids, "labels": labels}


def peak_bytes():
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    # VmHWM: this process's peak resident memory. (ru_maxrss would not do: Linux carries it over
    # from the parent across fork + exec, so a child would report the parent's peak.)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


model = load_model(args.model, device=dev, dtype=torch.float32)
batch = make_batch(model.config.vocab_size)
param_bytes = sum(p.numel() * 4 for p in model.parameters())

if args.part:  # child process: run one kind of training and report its peak memory
    base = peak_bytes()
    opt = patcher.make_optimizer(model.parameters(), 1e-5)
    if args.part == "sft":
        for _ in range(args.iters):
            patcher.sft_step(model, opt, batch)
    else:
        patcher.sft_step(model, opt, batch)  # a warmup step: the defender's AdamW state exists during attacks
        buf = patcher.snapshot(model)  # as run() does: one theta buffer shared by attack and defender
        delta, _ = patcher.inner_attack(model, iter(lambda: batch, None), steps=args.iters, lr=1e-5, theta_buffer=buf)
        for _ in range(args.iters):
            patcher.defender_step(model, opt, batch, delta, 0.5, theta_buffer=buf)
    print(json.dumps({"peak": peak_bytes(), "after_load": base}))
    sys.exit(0)

print(f"model {args.model} | device {dev} | threads {torch.get_num_threads()} | batch {args.batch}x{args.seq} | fp32")
opt_sft, opt_def = patcher.make_optimizer(model.parameters(), 1e-5), patcher.make_optimizer(model.parameters(), 1e-5)
delta = {n: 1e-3 * torch.randn_like(p) for n, p in model.named_parameters()}
buf = patcher.snapshot(model)
patcher.sft_step(model, opt_sft, batch)  # warm-up both
patcher.defender_step(model, opt_def, batch, delta, 0.5, theta_buffer=buf)
t_sft, t_def = [], []
for _ in range(args.iters):  # interleaved, so drift in machine load hits both alike
    t = time.perf_counter()
    patcher.sft_step(model, opt_sft, batch)
    t_sft.append(time.perf_counter() - t)
    t = time.perf_counter()
    patcher.defender_step(model, opt_def, batch, delta, 0.5, theta_buffer=buf)
    t_def.append(time.perf_counter() - t)
s, d = min(t_sft), min(t_def)
pairs = sorted(b / a for a, b in zip(t_sft, t_def))  # each defender step against the SFT step just before it
print(f"time   sft_step {s:.3f}s | defender_step {d:.3f}s | ratio of the fastest {d / s:.3f}, median of the "
      f"{len(pairs)} interleaved pairs {pairs[len(pairs) // 2]:.3f} (floor 2.0)")
del model, opt_sft, opt_def, delta, buf

peaks = {}
for part in ("sft", "patcher"):
    r = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
                        "--iters", str(args.iters), "--part", part], capture_output=True, text=True, check=True)
    peaks[part] = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
extra = (peaks["patcher"] - peaks["sft"]) / param_bytes
print(f"memory peak sft {peaks['sft'] / 2**30:.2f} GiB | patcher {peaks['patcher'] / 2**30:.2f} GiB | "
      f"extra {extra:.2f} fp32 parameter copies ({param_bytes / 2**20:.0f} MiB each)")
