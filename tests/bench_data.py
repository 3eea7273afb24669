"""Benchmark (not a unit test): how much of a batch is padding, and what length grouping buys.

    python tests/bench_data.py [--model DIR] [--steps 6]

1. the padded share of token slots over one epoch of global batches (batch 4 and 16), without and with
   --group-by-length, on tests/data/safety (D_safe = refusals + benign answers, D_unsafe) tokenized by the
   checkpoint's tokenizer, and on BeaverTails-like lengths (log-normal, drawn with a fixed seed);
2. supervised tokens per second of SFT steps on SmolLM2 (batch 4) without and with grouping, interleaved in one
   run: the speed that grouping buys where padding is compute (on a GPU the padded share is the saving).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import patcher  # noqa: E402
from model import load_model  # noqa: E402

SAFETY = Path(__file__).resolve().parent / "data" / "safety"  # the small SmolLM2 safety set, in the repository
p = argparse.ArgumentParser()
p.add_argument("--model", default=os.path.join(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache/patcher-assets"), "smollm2-135m-instruct"))
p.add_argument("--steps", type=int, default=6)
args = p.parse_args()


def shares(examples, batch):
    """(padded share without grouping, with grouping) of the token slots of one epoch. The batches are padded with
    -1 here, which no real token is, so the padding can be counted."""
    out = []
    for group in (False, True):
        it = data.BatchIterator(examples, batch, seed=0, pad_id=-1, group_by_length=group)
        slots = pads = 0
        for _ in range(it.steps_per_epoch):
            for m in next(it):
                slots += m["input_ids"].numel()
                pads += int((m["input_ids"] == -1).sum())
        out.append(pads / slots)
    return out


tok = data.load_tokenizer(args.model)
sets = {}
if SAFETY.exists():
    safe = data.load_records(SAFETY / "align.jsonl", role="safe") + data.load_records(SAFETY / "benign.jsonl", role="safe")
    sets["safety D_safe (refusals + benign)"] = data.tokenize_records(tok, safe, 4096)[0]
    sets["safety D_unsafe"] = data.tokenize_records(tok, data.load_records(SAFETY / "attack.jsonl", role="unsafe"), 4096)[0]
rng = np.random.default_rng(0)  # BeaverTails-like: prompts ~20 tokens, answers log-normal around ~70 (long tail)
lengths = (40 + rng.lognormal(4.2, 0.8, 4000)).astype(int).clip(45, 1500)
sets["BeaverTails-like lengths"] = [([0] * n, [False] * 40 + [True] * (n - 40)) for n in lengths]
print(f"{'set':<36} {'examples':>8} {'mean len':>8} | padded share, batch 4: plain / grouped | batch 16: plain / grouped")
for name, ex in sets.items():
    b4, b16 = shares(ex, 4), shares(ex, 16)
    print(f"{name:<36} {len(ex):>8} {np.mean([len(i) for i, _ in ex]):>8.0f} | {100 * b4[0]:5.1f}% / {100 * b4[1]:5.1f}%"
          f"                  | {100 * b16[0]:5.1f}% / {100 * b16[1]:5.1f}%")

if SAFETY.exists():
    model = load_model(args.model)
    opt = patcher.make_optimizer(model.parameters(), 1e-6)
    examples = sets["safety D_safe (refusals + benign)"]
    its = {g: data.BatchIterator(examples, 4, seed=1, group_by_length=g) for g in (False, True)}
    rate = {False: [], True: []}
    for _ in range(args.steps):  # interleaved, so drift in machine load hits both alike
        for g, it in its.items():
            t = time.perf_counter()
            m = patcher.sft_step(model, opt, next(it))
            rate[g].append(m["supervised"] / (time.perf_counter() - t))
    plain, grouped = np.median(rate[False]), np.median(rate[True])
    print(f"SFT steps, SmolLM2, batch 4, {args.steps} each: {plain:.0f} vs {grouped:.0f} supervised tokens/s "
          f"(median): grouped / plain {grouped / plain:.2f}x")
