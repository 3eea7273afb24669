"""Benchmark (not a unit test): the cost of Patcher's defender step relative to a plain SFT step.

    python tests/bench_patcher.py [--model DIR] [--batch 4] [--seq 128] [--iters 7] [--precision fp32|bf16|both]

1. time:   defender_step (alpha = 0.5: two forward-backward passes) / sft_step, interleaved in one
           process on the same batch; 2.0 is the floor.
2. memory: peak resident memory of a process that runs SFT steps vs one that runs an inner attack
           plus defender steps, each measured in its own subprocess, expressed in fp32 parameter
           copies (so the extra copies Patcher holds can be counted: theta snapshot, delta, AdamW
           moments of the inner attack).
On CUDA the memory numbers are torch.cuda.max_memory_allocated instead of resident memory.
The model is built as patcher.py builds it for --precision: fp32 on one CPU process is a plain module, bf16 is
FSDP2's mixed precision on a one-rank process group. --precision both only times sft_step and defender_step in fp32
against bf16, interleaved in one process (fp32 / bf16 time per step, median of the interleaved pairs).
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import patcher  # noqa: E402
from model import load_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default=os.path.join(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache/patcher-assets"), "smollm2-135m-instruct"))
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--iters", type=int, default=7)
p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="fp32", help="both: fp32 against bf16 (time only)")
p.add_argument("--part", choices=["sft", "patcher"], help=argparse.SUPPRESS)  # internal: one memory measurement
args = p.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build(precision):
    """The checkpoint as patcher.build_model builds it for --precision on this device (fp32 master weights)."""
    if precision == "bf16" and not dist.is_initialized():
        patcher.init_distributed("bf16")
    shard = patcher.fsdp_sharder(precision) if dist.is_initialized() and (precision == "bf16" or dev.type == "cuda") else None
    return load_model(args.model, device=dev, dtype=torch.float32, shard=shard)


def steps(model):
    """(sft, defender): one sft_step, one defender_step (alpha 0.5), each with its own AdamW, on the same batch."""
    opt_sft, opt_def = patcher.make_optimizer(model.parameters(), 1e-5), patcher.make_optimizer(model.parameters(), 1e-5)
    delta = {n: 1e-3 * p.detach() for n, p in model.named_parameters()}  # sharded like theta
    buf = patcher.snapshot(model)
    return (lambda: patcher.sft_step(model, opt_sft, batch),
            lambda: patcher.defender_step(model, opt_def, batch, delta, 0.5, theta_buffer=buf))


def median(xs):
    return sorted(xs)[len(xs) // 2]


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


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if args.precision == "both":  # fp32 against bf16, each model built as patcher.py builds it, steps interleaved
    models = {p: build(p) for p in ("fp32", "bf16")}
    batch = make_batch(models["fp32"].config.vocab_size)
    print(f"model {args.model} | device {dev} | threads {torch.get_num_threads()} | batch {args.batch}x{args.seq} | "
          f"fp32 (plain module on one CPU process) vs bf16 ({patcher.precision('bf16')})")
    fns = {p: steps(m) for p, m in models.items()}
    for sft, defend in fns.values():  # warm-up
        sft(), defend()
    t = {(p, k): [] for p in fns for k in ("sft", "defender")}
    for _ in range(args.iters):  # interleaved, so drift in machine load hits all four alike
        for p, (sft, defend) in fns.items():
            t[p, "sft"].append(timed(sft))
        for p, (sft, defend) in fns.items():
            t[p, "defender"].append(timed(defend))
    for k in ("sft", "defender"):
        ratio = median([a / b for a, b in zip(t["fp32", k], t["bf16", k])])  # each bf16 step against the fp32 one beside it
        print(f"{k + '_step':<14} fp32 {median(t['fp32', k]):.3f}s | bf16 {median(t['bf16', k]):.3f}s (medians) | fp32 / bf16: "
              f"median of {args.iters} interleaved pairs {ratio:.2f}x")
    patcher.exit_now(0)

model = build(args.precision)
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
        flags = patcher.get_parser().parse_args(["--inner-steps", str(args.iters), "--inner-lr", "1e-5"])
        delta, _ = patcher.inner_attack(model, iter(lambda: batch, None), flags, theta_buffer=buf)
        for _ in range(args.iters):
            patcher.defender_step(model, opt, batch, delta, 0.5, theta_buffer=buf)
    print(json.dumps({"peak": peak_bytes(), "after_load": base}))
    patcher.exit_now(0)  # with a process group (bf16): no interpreter teardown, which gloo sometimes aborts

print(f"model {args.model} | device {dev} | threads {torch.get_num_threads()} | batch {args.batch}x{args.seq} | "
      f"{patcher.precision(args.precision)}")
sft, defend = steps(model)
sft(), defend()  # warm-up both
t_sft, t_def = [], []
for _ in range(args.iters):  # interleaved, so drift in machine load hits both alike
    t_sft.append(timed(sft))
    t_def.append(timed(defend))
s, d = min(t_sft), min(t_def)
pairs = sorted(b / a for a, b in zip(t_sft, t_def))  # each defender step against the SFT step just before it
print(f"time   sft_step {s:.3f}s | defender_step {d:.3f}s | ratio of the fastest {d / s:.3f}, median of the "
      f"{len(pairs)} interleaved pairs {pairs[len(pairs) // 2]:.3f} (floor 2.0)")
del model, sft, defend

peaks = {}
for part in ("sft", "patcher"):
    r = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
                        "--iters", str(args.iters), "--precision", args.precision, "--part", part],
                       capture_output=True, text=True, check=True)
    peaks[part] = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
extra = (peaks["patcher"] - peaks["sft"]) / param_bytes
print(f"memory peak sft {peaks['sft'] / 2**30:.2f} GiB | patcher {peaks['patcher'] / 2**30:.2f} GiB | "
      f"extra {extra:.2f} fp32 parameter copies ({param_bytes / 2**20:.0f} MiB each)")
patcher.exit_now(0)
