"""Benchmark (not a unit test): our model.py vs transformers on one checkpoint, in one run, with
the same batch, dtype and threads. Reports ratios, which survive a noisy shared machine better
than absolute numbers.

    python tests/bench_model.py [--model DIR] [--dtype float32|bfloat16] [--device cpu|cuda]

1. training forward+backward tokens/s (batch 4 x 128 by default)
2. generation tokens/s: batch 16 prompts of different lengths, 64 new tokens, greedy, KV cache
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import generate, load_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default=os.path.join(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache/patcher-assets"), "smollm2-135m-instruct"))
p.add_argument("--dtype", default="float32")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--gen-batch", type=int, default=16)
p.add_argument("--new-tokens", type=int, default=64)
args = p.parse_args()

import transformers  # noqa: E402  (benchmark-only dependency)

dtype = getattr(torch, args.dtype)
dev = torch.device(args.device)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, iters):
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


ours = load_model(args.model, device=dev, dtype=dtype)
hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev)
print(f"model {args.model} dtype {args.dtype} device {dev} threads {torch.get_num_threads()}")

idx = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq), device=dev)


def step_ours():
    ours(idx).float().logsumexp(-1).mean().backward()
    ours.zero_grad(set_to_none=True)


def step_hf():
    hf(idx).logits.float().logsumexp(-1).mean().backward()
    hf.zero_grad(set_to_none=True)


# interleave the two so drift in machine load hits both alike
t_ours, t_hf = float("inf"), float("inf")
for _ in range(2):
    t_ours = min(t_ours, timed(step_ours, args.iters))
    t_hf = min(t_hf, timed(step_hf, args.iters))
n = args.batch * args.seq
print(f"fwd+bwd  ours {n / t_ours:9.1f} tok/s   transformers {n / t_hf:9.1f} tok/s   ratio {t_hf / t_ours:.2f}x")

g = torch.Generator().manual_seed(0)
lengths = torch.randint(8, 48, (args.gen_batch,), generator=g).tolist()
prompts = [torch.randint(100, ours.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
pad = 0
T0 = max(lengths)
ids = torch.tensor([[pad] * (T0 - len(q)) + q for q in prompts], device=dev)
mask = (torch.arange(T0)[None, :] >= (T0 - torch.tensor(lengths))[:, None]).long().to(dev)


def gen_ours():
    out = generate(ours, prompts, max_new_tokens=args.new_tokens, stop_ids=[], pad_id=pad)
    assert all(len(r) == args.new_tokens for r in out)


def gen_hf():
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                          min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
    assert out.shape[1] == T0 + args.new_tokens


t_ours, t_hf = float("inf"), float("inf")
for _ in range(2):
    t_ours = min(t_ours, timed(gen_ours, 2))
    t_hf = min(t_hf, timed(gen_hf, 2))
n = args.gen_batch * args.new_tokens
print(f"generate ours {n / t_ours:9.1f} tok/s   transformers {n / t_hf:9.1f} tok/s   ratio {t_hf / t_ours:.2f}x")
