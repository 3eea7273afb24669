"""Benchmark (not a unit test): our model.py vs transformers on one checkpoint, in one run, with
the same batch, dtype and threads. Reports ratios, which survive a noisy shared machine better
than absolute numbers.

    OMP_NUM_THREADS=1 python tests/bench_model.py                       # CPU, fp32
    python tests/bench_model.py --device cuda --dtype bfloat16 --compile  # GPU: CUDA graphs
    python tests/bench_model.py --skip-train --new-tokens 256             # 256 new tokens

1. an SFT step's forward+backward tokens/s on a batch of the safety data (batch 4, up to 128 tokens)
2. generation tokens/s: batch 16 prompts of 8 to 47 tokens, greedy, no stop token, KV cache on
   both sides (transformers: its default dynamic cache). First with 1 new token (the prefill),
   then with --new-tokens. Each is timed in --rounds rounds, ours and transformers alternating;
   the ratio is of the fastest times, with the median of the per-round ratios beside it.
3. generation as eval.py runs it (--eval-tokens, default 256): batch 16 harmful and benign prompts of the
   safety data in the checkpoint's chat format, greedy, rows stopping at the end-of-turn token. Short
   answers (refusals) leave our batch when they end; transformers runs every row until the last one ends.
   Also reports how many rows' tokens are identical.
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from benchlib import best_time, forward_backward_steps, sync  # noqa: E402
from model import generate, load_model, until_stop  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default=os.path.join(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache/patcher-assets"), "smollm2-135m-instruct"))
p.add_argument("--dtype", default="float32")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--batch", type=int, default=4)
p.add_argument("--seq", type=int, default=128)
p.add_argument("--iters", type=int, default=5)
p.add_argument("--skip-train", action="store_true", help="only the generation benchmark")
p.add_argument("--gen-batch", type=int, default=16)
p.add_argument("--new-tokens", type=int, default=64)
p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per generation benchmark")
p.add_argument("--compile", action="store_true", help="our generate(compile=True): a compiled decode step (CUDA graph on CUDA)")
p.add_argument("--eval-tokens", type=int, default=256, help="max new tokens of the eval-like benchmark (0: skip it)")
args = p.parse_args()

import transformers  # noqa: E402  (benchmark-only dependency)

dtype = getattr(torch, args.dtype)
dev = torch.device(args.device)


ours = load_model(args.model, device=dev, dtype=dtype).eval()
hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev).eval()
print(f"model {args.model} dtype {args.dtype} device {dev} threads {torch.get_num_threads()} compile {args.compile}")

if not args.skip_train:
    # An SFT step's forward + backward, as training runs it: a batch of the safety data when it is there (the
    # checkpoint's chat format, its loss mask: most tokens are system prompt and question), else random tokens
    # with the first half masked. Ours skips the vocabulary projection where the loss does not look.
    safety = Path(__file__).resolve().parent / "data" / "safety" / "align.jsonl"
    if safety.exists():
        tok = data.load_tokenizer(args.model)
        examples = data.tokenize_records(tok, data.load_records(safety, role="safe")[:args.batch], args.seq)[0]
        batch = data.collate(examples, tok.pad_id)
    else:
        ids = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq))
        batch = {"input_ids": ids, "labels": torch.where(torch.arange(args.seq) < args.seq // 2, -100, ids)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    ours.train(), hf.train()

    step_ours, step_hf = forward_backward_steps(ours, hf, batch)
    # interleave the two so drift in machine load hits both alike
    t_ours, t_hf = float("inf"), float("inf")
    for _ in range(2):
        t_ours = min(t_ours, best_time(step_ours, args.iters, dev))
        t_hf = min(t_hf, best_time(step_hf, args.iters, dev))
    n, sup = batch["input_ids"].numel(), int((batch["labels"][:, 1:] != -100).sum())
    print(f"SFT fwd+bwd ({'safety data' if safety.exists() else 'random tokens'}, {tuple(batch['input_ids'].shape)}, "
          f"{100 * sup / n:.0f}% supervised)  ours {n / t_ours:9.1f} tok/s ({sup / t_ours:.1f} supervised)   "
          f"transformers {n / t_hf:9.1f} tok/s ({sup / t_hf:.1f})   ratio {t_hf / t_ours:.2f}x")
    ours.eval(), hf.eval()

g = torch.Generator().manual_seed(0)
lengths = torch.randint(8, 48, (args.gen_batch,), generator=g).tolist()
prompts = [torch.randint(100, ours.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
pad = 0
T0 = max(lengths)
ids = torch.tensor([[pad] * (T0 - len(q)) + q for q in prompts], device=dev)
mask = (torch.arange(T0)[None, :] >= (T0 - torch.tensor(lengths))[:, None]).long().to(dev)


def gen_ours(new):
    out = generate(ours, prompts, max_new_tokens=new, stop_ids=[], pad_id=pad, compile=args.compile)
    assert all(len(r) == new for r in out)


def gen_hf(new):
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=pad)
    assert out.shape[1] == T0 + new


def clock():
    # On a CPU also the process's CPU time: with one thread it leaves out the time other programs on
    # a shared machine take the core away (it still counts their effect on caches and memory).
    return time.perf_counter(), time.process_time() if dev.type == "cpu" else 0.0


def compare(new):
    gen_ours(new)  # warm-up (and compilation with --compile)
    gen_hf(new)
    walls, cpus = {"ours": [], "hf": []}, {"ours": [], "hf": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", gen_ours), ("hf", gen_hf)):
            sync(dev)
            w, c = clock()
            fn(new)
            sync(dev)
            w2, c2 = clock()
            walls[name].append(w2 - w)
            cpus[name].append(c2 - c)
    n = args.gen_batch * new
    t_ours, t_hf = min(walls["ours"]), min(walls["hf"])
    median = statistics.median(h / o for h, o in zip(walls["hf"], walls["ours"]))
    line = (f"generate batch {args.gen_batch} x {new:3d} new  ours {n / t_ours:8.1f} tok/s   "
            f"transformers {n / t_hf:8.1f} tok/s   ratio {t_hf / t_ours:.2f}x (median {median:.2f}x)")
    if dev.type == "cpu":
        line += f"   cpu-time ratio {min(cpus['hf']) / min(cpus['ours']):.2f}x"
    print(line, flush=True)


def compare_eval_like():
    """Benchmark 3: real prompts that stop (a harmful and a benign one in turn), greedy, as eval.py decodes."""
    safety = Path(__file__).resolve().parent / "data" / "safety"
    tok = data.load_tokenizer(args.model)
    harmful = [r["prompt"] for r in data.load_records(safety / "eval.jsonl", role="prompts")]
    benign = [r["prompt"] for r in data.load_records(safety / "benign.jsonl", role="prompts")]
    texts = [x for pair in zip(harmful, benign) for x in pair][:args.gen_batch]
    prompts_ = [tok.encode_prompt(t) for t in texts]
    T = max(map(len, prompts_))
    ids_ = torch.tensor([[tok.pad_id] * (T - len(q)) + q for q in prompts_], device=dev)
    mask_ = (torch.arange(T)[None, :] >= T - torch.tensor(list(map(len, prompts_)))[:, None]).long().to(dev)
    stop, new = sorted(tok.stop_ids), args.eval_tokens
    outs = {}

    def ours_():
        outs["ours"] = generate(ours, prompts_, max_new_tokens=new, stop_ids=stop, pad_id=tok.pad_id, compile=args.compile)

    def hf_():
        with torch.no_grad():
            out = hf.generate(input_ids=ids_, attention_mask=mask_, max_new_tokens=new, do_sample=False,
                              repetition_penalty=1.0, eos_token_id=stop, pad_token_id=tok.pad_id)
        rows = out[:, T:].tolist()
        outs["hf"] = [until_stop(r, stop) for r in rows]

    walls = {"ours": [], "hf": []}
    ours_(), hf_()  # warm-up
    for _ in range(args.rounds):
        for name, fn in (("ours", ours_), ("hf", hf_)):
            sync(dev)
            t = time.perf_counter()
            fn()
            sync(dev)
            walls[name].append(time.perf_counter() - t)
    lengths_ = [len(r) for r in outs["ours"]]
    n = sum(lengths_)  # the tokens the prompts needed: both sides produce exactly these
    t_ours, t_hf = min(walls["ours"]), min(walls["hf"])
    median = statistics.median(h / o for h, o in zip(walls["hf"], walls["ours"]))
    same = sum(a == b for a, b in zip(outs["ours"], outs["hf"]))
    print(f"generate eval-like batch {len(prompts_)} x <= {new} new (answers {min(lengths_)}-{max(lengths_)} tokens, "
          f"mean {n / len(lengths_):.0f})  ours {n / t_ours:8.1f} tok/s   transformers {n / t_hf:8.1f} tok/s   "
          f"ratio {t_hf / t_ours:.2f}x (median {median:.2f}x)   identical rows {same}/{len(prompts_)}", flush=True)


compare(1)  # the prefill, plus one token
compare(args.new_tokens)
if args.eval_tokens:
    compare_eval_like()
