"""The prepared GPU check: every CUDA path users take, measured in one command, one table.

    python tests/gpu_check.py                 # one GPU: Qwen2.5-1.5B and Llama-3-8B shapes, random weights, ~6 min on an H200
    python tests/gpu_check.py --device cpu    # tiny shapes, the same code paths (CI runs this, so it cannot rot)

Nothing is downloaded: the models are the shapes in tests/configs/*.json with random weights built on the spot, the
data the demo's toy world. Checks, each a row (a failure is a row too, and the exit code is 1):
  1. logits parity with transformers (bf16 on CUDA, fp32 on CPU) for both shapes
  2. training throughput, ours vs transformers (forward + backward on the same bf16 weights), and MFU; our full SFT
     step under FSDP2 (one rank, bf16 mixed precision, fused AdamW); defender step / SFT step time
  3. peak memory of an SFT step, an inner attack and a defender step
  4. generation, batch 16: ours eager and compiled (a CUDA graph) vs transformers `generate`, greedy, tokens/s
  5. the programs under torchrun on one rank (NCCL on CUDA): patcher.py on the demo, plain and with --compile and
     --activation-checkpointing, a checkpoint and --resume, eval.py on the result (bf16 generation); parallel.py is
     out of reach with one GPU; and a few steps of the 1.5B shape with --compile off and on
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import patcher  # noqa: E402
from benchlib import best_time, forward_backward_steps  # noqa: E402
from model import ModelConfig, Transformer, empty_model, generate, save_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--out", default=None, help="work directory (default: a temporary one, removed after)")
args = p.parse_args()
dev = torch.device(args.device)
GPU = dev.type == "cuda"
DTYPE = torch.bfloat16 if GPU else torch.float32
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)  # the CPU stand-in for every shape: the same model types and features, tiny
work = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
work.mkdir(parents=True, exist_ok=True)
rows = []


def config(name):
    cfg = json.loads((ROOT / "tests" / "configs" / f"{name}.json").read_text())
    return cfg if GPU else {**cfg, **TINY}


def check(name):
    """Run one check; its rows are (what, result, ok) tuples it returns. A crash is a failed row, not the end."""
    def wrap(fn):
        t = time.time()
        try:
            for what, result, ok in fn():
                rows.append((what, result, ok))
        except Exception as e:  # noqa: BLE001 (a check that crashes is reported, and the others still run)
            traceback.print_exc()
            rows.append((name, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:120]}", False))
        print(f"[{time.time() - t:.0f}s] {name}", flush=True)
        if GPU:
            torch.cuda.empty_cache()
    return wrap


def twins(name):
    """transformers' model with random weights, and ours with the very same weights, both in DTYPE on dev."""
    import transformers
    cfg = config(name)
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=DTYPE)
    ours = empty_model(ModelConfig.from_hf(cfg), dev, DTYPE)
    with torch.no_grad():
        theirs = dict(hf.named_parameters())
        for n, q in ours.named_parameters():
            q.copy_(theirs[n])
    ours.reset_rope()
    return hf.eval(), ours, cfg


def sft_batch(vocab, batch, seq, supervised=0.5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * (1 - supervised))] = -100  # a prompt part and a supervised part, as in SFT data
    return {"input_ids": ids.to(dev), "labels": labels.to(dev)}


for name in ("qwen2.5-1.5b", "llama-3-8b"):
    @check(f"parity {name}")
    def _(name=name):
        hf, ours, cfg = twins(name)
        idx = torch.randint(0, cfg["vocab_size"], (2, 256 if GPU else 24), generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            a, b = ours(idx).float(), hf(idx).logits.float()
        err = ((a - b).abs().max() / b.abs().max()).item()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        del hf, ours
        yield (f"logits vs transformers, {name} shape, {str(DTYPE).removeprefix('torch.')}",
               f"max |diff| / max |logit| {err:.1e}, top-1 agreement {100 * top1:.1f}%",
               err < (3e-2 if GPU else 1e-4) and top1 > (0.97 if GPU else 0.999))


@check("training throughput")
def _():
    hf, ours, cfg = twins("qwen2.5-1.5b")
    batch = sft_batch(cfg["vocab_size"], 4, 1024 if GPU else 32)
    n = batch["input_ids"].numel()

    step_ours, step_hf = forward_backward_steps(ours, hf, batch)
    hf.train()
    t_ours, t_hf = best_time(step_ours, 3, dev), best_time(step_hf, 3, dev)
    peak = patcher.peak_flops(dev)
    mfu = lambda t: f", MFU {100 * ours.flops_per_token(batch['input_ids'].shape[1]) * n / t / peak:.1f}%" if peak else ""
    yield ("forward + backward, 1.5B shape, same weights", f"ours {n / t_ours:.0f} tok/s{mfu(t_ours)}, transformers "
           f"{n / t_hf:.0f} tok/s{mfu(t_hf)}: {t_hf / t_ours:.2f}x", True)


@check("FSDP2 SFT / defender step, memory")
def _():
    """The path patcher.py takes: a checkpoint loaded into FSDP2 (one rank; bf16 compute over fp32 master
    weights on CUDA), fused AdamW; then the defender step, the inner attack and their peak memory."""
    cfg = config("qwen2.5-1.5b")
    ckpt = work / "qwen-shape"
    if not (ckpt / "model.safetensors").exists() and not (ckpt / "model.safetensors.index.json").exists():
        with torch.device(dev):
            m = Transformer(ModelConfig.from_hf(cfg)).to(DTYPE)
        m.init_weights()
        save_model(m, ckpt)
        (ckpt / data.ToyTokenizer.FILE).write_text("{}")  # so that the programs below can train it on the toy world
        del m
    flags = patcher.get_parser().parse_args([])  # the defaults: --precision bf16 on a GPU that has it
    rank, world, device = patcher.init_distributed(flags.precision)
    model = patcher.build_model(ckpt, dev, flags)
    opt = patcher.make_optimizer(model.parameters(), 1e-5)
    batch = [sft_batch(cfg["vocab_size"], 4, 1024 if GPU else 32)]
    n = batch[0]["input_ids"].numel()
    t_sft = best_time(lambda: patcher.sft_step(model, opt, batch), 3, dev)
    buf = patcher.snapshot(model)
    delta = {k: 1e-3 * torch.randn_like(v) for k, v in buf.items()}
    t_def = best_time(lambda: patcher.defender_step(model, opt, batch, delta, 0.5, theta_buffer=buf), 3, dev)
    peak = patcher.peak_flops(dev)
    mfu = f", MFU {100 * model.flops_per_token(batch[0]['input_ids'].shape[1]) * n / t_sft / peak:.1f}%" if peak else ""
    yield ("SFT step, FSDP2 one rank, " + patcher.precision(flags.precision).split(",")[0], f"{n / t_sft:.0f} tok/s{mfu}", True)
    yield ("defender step / SFT step time (floor 2.0)", f"{t_def / t_sft:.2f}", t_def / t_sft < 2.3)
    for mode, floor in (("vaccine", 2.0), ("booster", 3.0)):  # passes per update: two, three
        update, margs = getattr(patcher, f"{mode}_update"), patcher.get_parser().parse_args(["--mode", mode])
        t_mode = best_time(lambda: update(model, opt, patcher.Batches(batch, batch), margs, theta_buffer=buf), 3, dev)
        yield (f"{mode} update / SFT step time (floor {floor:.1f})", f"{t_mode / t_sft:.2f}", t_mode / t_sft < floor + 0.5)
    if GPU:
        mem, k1_3 = {}, patcher.get_parser().parse_args(["--inner-steps", "3"])
        for what, fn in (("SFT step", lambda: patcher.sft_step(model, opt, batch)),
                         ("inner attack, k1 3", lambda: patcher.inner_attack(model, iter(lambda: batch, None), k1_3, theta_buffer=buf)),
                         ("defender step", lambda: patcher.defender_step(model, opt, batch, delta, 0.5, theta_buffer=buf))):
            torch.cuda.reset_peak_memory_stats()
            fn()
            mem[what] = torch.cuda.max_memory_allocated() / 2**30
        yield ("peak memory (GiB), 1.5B shape, batch 4 x 1024", ", ".join(f"{k} {v:.1f}" for k, v in mem.items()), True)
    del model, opt, buf, delta


@check("generation")
def _():
    hf, ours, cfg = twins("qwen2.5-1.5b")
    new = 256 if GPU else 16
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(100, cfg["vocab_size"], (int(n),), generator=g).tolist() for n in torch.randint(8, 64, (16,), generator=g)]
    T0 = max(map(len, prompts))
    ids = torch.tensor([[0] * (T0 - len(q)) + q for q in prompts], device=dev)
    mask = torch.tensor([[0] * (T0 - len(q)) + [1] * len(q) for q in prompts], device=dev)
    out = {}
    for mode in ("eager", "compiled"):
        run = lambda: generate(ours, prompts, new, stop_ids=[], pad_id=0, compile=mode == "compiled")
        out[mode] = (best_time(run, 2, dev), run())
    with torch.no_grad():
        hf_run = lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, pad_token_id=0)
        t_hf = best_time(hf_run, 2, dev)
        theirs = hf_run()[:, T0:].tolist()
    agree = sum(a == b for a, b in zip(out["eager"][1], theirs)) / len(theirs)
    n = 16 * new
    yield (f"generation, batch 16 x {new} new tokens, greedy, 1.5B shape",
           f"ours {n / out['eager'][0]:.0f} tok/s eager ({t_hf / out['eager'][0]:.2f}x), {n / out['compiled'][0]:.0f} "
           f"compiled ({t_hf / out['compiled'][0]:.2f}x); transformers {n / t_hf:.0f}", True)
    yield ("greedy tokens: compiled = eager; rows identical to transformers", f"{out['compiled'][1] == out['eager'][1]}; "
           f"{100 * agree:.0f}% of rows", out["compiled"][1] == out["eager"][1] and agree >= (0.75 if GPU else 1.0))


def program(script, *flags, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(ROOT / script), *map(str, flags)], env=env, capture_output=True, text=True, timeout=900)
    if r.returncode:
        raise RuntimeError(f"{script} exited {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1][:200]}")
    return r.stdout


def last_step(out):
    """The last step line of a log, cut to its loss, throughput and MFU."""
    line = next((x for x in reversed(out.splitlines()) if x.startswith("step")), "no step line")
    return " | ".join(part.strip() for part in line.split("|") if part.strip().startswith(("step", "loss", "mfu")) or "tok/s" in part)


@check("programs under torchrun")
def _():
    demo = work / "demo"
    fast = ["--warmup-steps", "3", "--rounds", "2", "--inner-steps", "3", "--defend-steps", "4"]
    out = program("patcher.py", "--out", demo, *fast, "--save-every", "5")
    yield ("patcher.py demo, one rank, checkpoints every 5 steps", last_step(out), "exported" in out)
    (demo / "done.json").unlink()  # as if killed in its export (a finished run's --resume has nothing to do)
    out = program("patcher.py", "--out", demo, *fast, "--save-every", "5", "--resume")
    # the last checkpoint is the last step's (taken before the export): the resumed run goes straight to the export
    yield ("  --resume from its last checkpoint", "resumed" if "resumed at step 11" in out else out[-90:], "resumed at step 11" in out)
    for flags in (["--compile"], ["--activation-checkpointing"]) if GPU else (["--activation-checkpointing"],):
        again = work / f"demo{flags[0]}"
        if not (again / "base").exists():  # the demo's base model, trained once above
            shutil.copytree(demo / "base", again / "base")
        out = program("patcher.py", "--out", again, *fast, *flags)
        yield (f"  {flags[0]}", last_step(out), "exported" in out)
    d = demo / "data"
    out = program("eval.py", "--model", demo / "final", "--attack-data", d / "attack.jsonl", "--eval-data", d / "eval_harmful.jsonl",
                  "--eval-at", "0,4", "--greedy", "--max-new-tokens", "4", "--attack-batch-size", "16", "--limit", "32",
                  "--out", work / "eval")
    yield ("eval.py on the export (" + ("bf16" if GPU else "fp32") + " generation)", "report written", "wrote" in out)
    ckpt = work / "qwen-shape"
    if not ckpt.exists():
        raise RuntimeError("the 1.5B-shape checkpoint of the FSDP2 check is missing")
    paths = data.write_toy_world(work / "toy")
    for flags in ([], ["--compile"]) if GPU else ([],):  # CI compiles on the CPU in tests/test_gpu_paths.py
        out = program("patcher.py", "--model", ckpt, "--safe-data", paths["safe"], "--unsafe-data", paths["unsafe"],
                      "--out", work / f"qwen{''.join(flags)}", "--warmup-steps", "1", "--rounds", "1", "--inner-steps", "2",
                      "--defend-steps", "2", "--batch-size", "4", "--inner-batch-size", "4", *flags)
        yield (f"patcher.py, 1.5B shape, one rank {' '.join(flags) or '(eager)'}", last_step(out), "exported" in out)


width = max(len(r[0]) for r in rows)
print(f"\n{torch.cuda.get_device_name(dev) if GPU else 'CPU (tiny shapes)'} | torch {torch.__version__} | "
      f"{time.strftime('%Y-%m-%d')}\n")
print(f"| {'check':<{width}} | result | ok |\n|{'-' * (width + 2)}|---|---|")
for what, result, ok in rows:
    print(f"| {what:<{width}} | {result} | {'yes' if ok else 'NO'} |")
if args.out is None:
    shutil.rmtree(work, ignore_errors=True)
sys.exit(0 if all(ok for _, _, ok in rows) else 1)
