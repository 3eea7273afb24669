"""The prepared GPU check: one command, one table, within a deadline it keeps.

    python tests/gpu_check.py                 # the GPUs here: about 5 min on one H100 (deadline 6 min)
    python tests/gpu_check.py --quick         # the rows that matter most first: about 2 min
    python tests/gpu_check.py --device cpu    # tiny shapes, the same code paths (CI runs it, so it cannot rot)

Nothing is downloaded: the models are the shapes in tests/configs/*.json with random weights built on the spot, the
data the demo's toy world. It is made so that correct code passes every row, on the first try, whatever the GPU:

- Numbers are compared as numbers, on the same input: logits position by position against transformers (or eager,
  or one rank), within the rounding of the dtype, and a top-1 only "up to ties": our argmax must be within the
  tolerance of transformers' maximum. Random weights give near-flat logits, where any fused kernel may flip an
  argmax; a free-running greedy generation would then diverge for good, so decoding is checked teacher-forced (every
  step fed the same token) and exact tokens are asked for only in fp32, where a difference must be a tie.
- Speed, host syncs and MFU are reported, never judged: a slow kernel is not a wrong one. Memory is judged only
  where the memory plan would let a run die: a measured peak above the plan's by more than 20%.
- A deadline: every check gets what is left of --deadline (and a program at most --program-cap seconds), so one
  hang cannot eat the lent machine's budget; a row that no longer fits is "skipped (deadline)", which is no failure.
  The checks run most important first.

Rows (a failure is a row too, and the exit code is 1):
  1. logits against transformers: bf16 (both shapes), fp32 (1.5B shape)
  2. FSDP2 (one rank) SFT step, defender step, Vaccine and Booster updates: time per step, MFU, host syncs counted
     by torch.cuda's sync debug mode (reported); peak memory of a 4k-token step in bf16 and fp32 against the plan
  3. decoding: eager and compiled against a plain forward over the same text, teacher-forced; fp32 greedy tokens;
     the paper's sampling (T 0.6, top-p 0.9, repetition 1.2, top-k 50); no recompilation on later calls
  4. the programs under torchrun on one rank (NCCL): patcher.py on the demo in fp32, bf16 and bf16-pure, with
     --compile and --activation-checkpointing, a checkpoint and --resume; eval.py on the export; the 1.5B shape
  5. with two or more GPUs: patcher.py on 2 ranks against 1, parallel.py --sync against patcher.py, and parallel.py's
     checkpoint on the defender half resumed
"""
import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as model_module  # noqa: E402
import patcher  # noqa: E402
from benchlib import best_time, forward_backward_steps  # noqa: E402
from model import ModelConfig, Transformer, empty_model, generate, save_model  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--quick", action="store_true", help="the most important rows only (about 2 min on one H100)")
p.add_argument("--deadline", type=float, help="seconds for the whole check (default: 360, --quick 150; CPU: none)")
p.add_argument("--program-cap", type=float, help="seconds one program run may take at most (default: 120; CPU: 900)")
p.add_argument("--out", default=None, help="work directory (default: a temporary one, removed after)")
args = p.parse_args()
dev = torch.device(args.device)
GPU = dev.type == "cuda"
NGPU = torch.cuda.device_count() if GPU else 0
DTYPE = torch.bfloat16 if GPU else torch.float32
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)  # the CPU stand-in for every shape: the same model types and features, tiny
START = time.monotonic()
DEADLINE = START + (args.deadline or ((150 if args.quick else 360) if GPU else 1e9))
PROGRAM_CAP = args.program_cap or (120.0 if GPU else 900.0)
work = Path(args.out or tempfile.mkdtemp(prefix="gpu-check-"))
work.mkdir(parents=True, exist_ok=True)
rows = []
# bounds on max |ours - theirs| / max |theirs| of logits on the same input: bf16 keeps 8 significant bits (2^-8
# relative per rounding) and a 28-36 layer network compounds a few of them; fp32 differs only by summation order
REL_TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}


def left():
    return DEADLINE - time.monotonic()


def check(name, needs=0.0, quick=True):
    """Run one check; its rows are (what, result, ok) tuples it yields. A crash is a failed row, not the end; a check
    that needs more seconds than are left (or is not --quick) is a skipped row."""
    def wrap(fn):
        if args.quick and not quick:
            return
        if left() < needs:
            rows.append((name, f"skipped (deadline: {left():.0f} s left, needs ~{needs:.0f})", True))
            return
        t = time.monotonic()
        try:
            for what, result, ok in fn():
                rows.append((what, result, ok))
        except Exception as e:  # noqa: BLE001 (a check that crashes is reported, and the others still run)
            traceback.print_exc()
            rows.append((name, f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", False))
        print(f"[{time.monotonic() - t:.0f}s, {left():.0f}s left] {name}", flush=True)
        if GPU:
            torch.cuda.empty_cache()
    return wrap


def config(name):
    cfg = json.loads((ROOT / "tests" / "configs" / f"{name}.json").read_text())
    return cfg if GPU else {**cfg, **TINY}


def twins(name, dtype=DTYPE):
    """transformers' model with random weights, and ours with the very same weights, both in `dtype` on dev."""
    import transformers
    cfg = config(name)
    with torch.device(dev):
        hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg), dtype=dtype)
    ours = empty_model(ModelConfig.from_hf(cfg), dev, dtype)
    with torch.no_grad():
        theirs = dict(hf.named_parameters())
        for n, q in ours.named_parameters():
            q.copy_(theirs[n])
    ours.reset_rope()
    return hf.eval(), ours.eval(), cfg


def compare(ours, theirs, dtype):
    """(max |diff| / max |theirs|, share of positions whose top-1 agrees up to ties, ok) of logits (..., V) on the
    same input. Up to ties: theirs at our argmax is within the tolerance of their maximum."""
    a, b = ours.float().flatten(0, -2), theirs.float().flatten(0, -2)
    scale = b.abs().max().clamp_min(1e-30)
    err = ((a - b).abs().max() / scale).item()
    tol = REL_TOL[dtype] * scale
    ours_best = b.gather(1, a.argmax(-1, keepdim=True)).squeeze(1)
    tied = (ours_best >= b.max(-1).values - tol).float().mean().item()
    return err, tied, err <= REL_TOL[dtype] and tied >= 0.99


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def sft_batch(vocab, batch, seq, supervised=0.5):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : int(seq * (1 - supervised))] = -100  # a prompt part and a supervised part, as in SFT data
    return {"input_ids": ids.to(dev), "labels": labels.to(dev)}


# --- 1. logits against transformers ---------------------------------------------------------------------------------

PARITY = [("qwen2.5-1.5b", DTYPE, True), ("llama-3-8b", DTYPE, False)] + [("qwen2.5-1.5b", torch.float32, True)] * GPU
for name, dtype, quick in PARITY:  # (on the CPU DTYPE is fp32 already)
    @check(f"parity {name} {dtype_name(dtype)}", needs=40 if GPU else 0, quick=quick)
    def _(name=name, dtype=dtype):
        hf, ours, cfg = twins(name, dtype)
        idx = torch.randint(0, cfg["vocab_size"], (2, 256 if GPU else 24), generator=torch.Generator().manual_seed(1)).to(dev)
        with torch.no_grad():
            a, b = ours(idx), hf(idx).logits
        err, tied, ok = compare(a, b, dtype)
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        del hf, ours
        yield (f"logits vs transformers, {name} shape, {dtype_name(dtype)}",
               f"max |diff| / max |logit| {err:.1e} (bound {REL_TOL[dtype]:g}), top-1 up to ties {100 * tied:.1f}% "
               f"(exact {100 * top1:.1f}%)", ok)


# --- 2. FSDP2 steps: speed, syncs, memory against the plan ----------------------------------------------------------

def qwen_checkpoint():
    """The 1.5B shape as a checkpoint directory with random weights (made once), trainable on the toy world."""
    cfg = config("qwen2.5-1.5b")
    ckpt = work / "qwen-shape"
    if not (ckpt / "model.safetensors").exists() and not (ckpt / "model.safetensors.index.json").exists():
        with torch.device(dev):
            m = Transformer(ModelConfig.from_hf(cfg)).to(DTYPE)
        m.init_weights()
        save_model(m, ckpt)
        (ckpt / data.ToyTokenizer.FILE).write_text("{}")  # so that the programs below can train it on the toy world
        del m
    return ckpt, cfg


def distributed(precision):
    """This process's one-rank process group, as patcher.py makes it, made once for every check that needs one."""
    import torch.distributed as dist
    if not dist.is_initialized():
        patcher.init_distributed(precision)


@contextlib.contextmanager
def counted_syncs():
    """A list that fills with one entry per host sync torch.cuda's sync debug mode sees inside (GPU only)."""
    seen = []
    if not GPU:
        yield seen
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen += [w for w in caught if "synchroniz" in str(w.message)]
    finally:
        torch.cuda.set_sync_debug_mode("default")


@check("FSDP2 steps", needs=60 if GPU else 0)
def _():
    """The path patcher.py takes: the checkpoint loaded into FSDP2 (one rank; bf16 compute over fp32 master weights
    on CUDA), fused AdamW; the defenses' updates against an SFT step."""
    ckpt, cfg = qwen_checkpoint()
    flags = patcher.get_parser().parse_args([])  # the defaults: --precision bf16 on a GPU that has it
    distributed(flags.precision)
    model = patcher.build_model(ckpt, dev, flags)
    opt = patcher.make_optimizer(model.parameters(), 1e-5)
    batch = [sft_batch(cfg["vocab_size"], 4, 1024 if GPU else 32)]
    n = batch[0]["input_ids"].numel()
    t_sft = best_time(lambda: patcher.sft_step(model, opt, batch), 3, dev)
    buf = patcher.snapshot(model)
    delta = {k: 1e-3 * torch.randn_like(v) for k, v in buf.items()}
    peak = patcher.peak_flops(dev)
    mfu = f", MFU {100 * model.flops_per_token(batch[0]['input_ids'].shape[1]) * n / t_sft / peak:.1f}%" if peak else ""
    yield ("SFT step, FSDP2 one rank, " + patcher.precision(flags.precision).split(",")[0], f"{n / t_sft:.0f} tok/s{mfu}", True)
    ratios, syncs = [], []
    for mode in patcher.DEFENSES:
        margs = patcher.get_parser().parse_args(["--mode", mode])
        update = patcher.DEFENSES[mode].update
        step = lambda: update(model, opt, patcher.Batches(batch, batch), margs, delta, buf)
        t = best_time(step, 3, dev)
        with counted_syncs() as seen:
            step()
        ratios.append(f"{mode} {t / t_sft:.2f}")
        syncs.append(f"{mode} {len(seen)}")
    yield ("update / SFT step time, every --mode (about its forward-backward passes)", ", ".join(ratios), True)
    if GPU:
        yield ("host syncs per update (torch.cuda sync debug mode; ours: 1)", ", ".join(syncs), True)
    del model, opt, buf, delta


def planned_and_measured(ckpt, cfg, precision, seq, phases_run):
    """{phase: (planned bytes, measured peak bytes or None)} of one rank's steps on a batch of one `seq`-token row,
    half of it supervised: the memory plan (patcher.training_plan) against torch.cuda's peak of each phase."""
    flags = patcher.get_parser().parse_args(["--precision", precision, "--max-len", str(seq), "--batch-size", "1",
                                             "--inner-batch-size", "1", "--inner-steps", "1"])
    scored = seq - 1 - int(seq * 0.5)
    lengths = {s: patcher.Lengths(1, None, [seq], [scored], seq, "gpu_check") for s in ("safe", "unsafe")}
    planned = patcher.training_plan(flags, ModelConfig.from_hf(cfg), patcher.param_shapes(ModelConfig.from_hf(cfg)),
                                    lengths, 1, dev.type)
    out = {phase: (sum(planned[phase].values()), None) for phase in phases_run}
    if not GPU:  # the plan alone (tests/test_memory_plan.py measures the CPU's)
        return out
    distributed(precision)
    model = patcher.build_model(ckpt, dev, flags)
    opt = patcher.make_optimizer(model.parameters(), 1e-5)
    batch = [sft_batch(cfg["vocab_size"], 1, seq)]
    buf = patcher.snapshot(model) if "defender step" in phases_run else None
    steps = {"warmup": lambda: patcher.sft_step(model, opt, batch),
             "inner attack": lambda: patcher.inner_attack(model, iter(lambda: batch, None), flags, theta_buffer=buf)[0],
             "defender step": lambda: patcher.defender_step(model, opt, batch, delta, 0.5, theta_buffer=buf)}
    delta = None
    for phase in phases_run:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        result = steps[phase]()
        if phase == "inner attack":
            delta = result
        torch.cuda.synchronize()
        out[phase] = (out[phase][0], torch.cuda.max_memory_allocated())
    del model, opt, buf, delta
    return out


@check("memory against the plan", needs=60 if GPU else 0)
def _():
    """A 4k-token row through the 1.5B shape: the warmup step, an inner attack step and a defender step in bf16, an
    SFT step in fp32 (whose grouped-query attention must not fall back to SDPA's math kernel: T x T scores per head,
    which the plan does not hold). The plan may overestimate; measured above it by 20% is a run that dies."""
    ckpt, cfg = qwen_checkpoint()
    seq = 4096 if GPU else 64
    for precision, phases_run in (("bf16", ("warmup", "inner attack", "defender step")), ("fp32", ("warmup",))):
        if precision == "bf16" and not GPU:
            continue
        got = planned_and_measured(ckpt, cfg, precision, seq, phases_run)
        cells = [f"{phase} {planned / 2**30:.1f}" + (f" / {peak / 2**30:.1f} ({peak / planned:.2f})" if peak else "")
                 for phase, (planned, peak) in got.items()]
        ok = all(peak is None or peak <= 1.2 * planned for planned, peak in got.values())
        yield (f"peak GiB planned / measured (ratio), 1.5B shape, 1 x {seq} tokens, {precision}", ", ".join(cells), ok)
        if GPU:
            torch.cuda.empty_cache()


# --- 3. decoding ------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def teacher_forced(tokens=None):
    """Inside, generate() records the logits each step samples from (a list, returned) and, given `tokens` (B, n),
    feeds step t the tokens[:, t] instead of its own choice: two decoders then see the same text at every step."""
    seen, real = [], model_module.sample_next

    def sample_next(logits, *a, **kw):
        t = len(seen)
        seen.append(logits.float().clone())
        chosen = real(logits, *a, **kw)
        return chosen if tokens is None else tokens[:, t].to(chosen.device)
    model_module.sample_next = sample_next
    try:
        yield seen
    finally:
        model_module.sample_next = real


def prompts_of(cfg, n, lo=8, hi=64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, cfg["vocab_size"], (int(k),), generator=g).tolist() for k in torch.randint(lo, hi, (n,), generator=g)]


def full_forward_logits(m, prompts, new):
    """A plain forward (no cache) over each row's prompt and new tokens: the logits of positions that predict them."""
    out = []
    with torch.no_grad():
        for q, t in zip(prompts, new.tolist()):
            ids = torch.tensor([q + t], device=dev)
            out.append(m(ids)[0, len(q) - 1:len(q) - 1 + len(t)].float())
    return torch.stack(out, 1)  # (steps, B, V)


@check("decoding", needs=90 if GPU else 0)
def _():
    hf, ours, cfg = twins("qwen2.5-1.5b")
    new = 64 if GPU else 8
    prompts = prompts_of(cfg, 16)
    with teacher_forced() as eager_logits:
        eager = generate(ours, prompts, new, stop_ids=[], pad_id=0)
    forced = torch.tensor(eager)
    plain = full_forward_logits(ours, prompts, forced)
    err, tied, ok = compare(torch.stack(eager_logits), plain, DTYPE)
    yield (f"decode steps (eager, cache) vs a plain forward, {dtype_name(DTYPE)}", f"max |diff| / max {err:.1e}, top-1 up to "
           f"ties {100 * tied:.1f}%", ok)
    with torch.no_grad():
        T0 = max(map(len, prompts))
        ids = torch.tensor([[0] * (T0 - len(q)) + q + t for q, t in zip(prompts, eager)], device=dev)
        mask = torch.tensor([[0] * (T0 - len(q)) + [1] * (len(q) + new) for q in prompts], device=dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # counted from each row's first real token, as generate() does
        theirs = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        theirs = theirs[:, T0 - 1:T0 - 1 + new].float().transpose(0, 1)
    err, tied, ok = compare(torch.stack(eager_logits), theirs, DTYPE)
    yield (f"decode steps vs transformers over the same text (left-padded), {dtype_name(DTYPE)}",
           f"max |diff| / max {err:.1e}, top-1 up to ties {100 * tied:.1f}%", ok)
    if GPU:  # compiled on CUDA (a CUDA graph); CI compiles the decode step on the CPU in tests/test_model.py
        with teacher_forced(forced) as compiled_logits:
            generate(ours, prompts, new, stop_ids=[], pad_id=0, compile=True)
        err, tied, ok = compare(torch.stack(compiled_logits), torch.stack(eager_logits), DTYPE)
        yield ("decode steps compiled (CUDA graph) vs eager, same tokens fed", f"max |diff| / max {err:.1e}, top-1 up "
               f"to ties {100 * tied:.1f}%", ok)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        for n_rows, hi in ((12, 40), (16, 64)):  # a smaller batch, shorter prompts, then the first size again
            generate(ours, prompts_of(cfg, n_rows, hi=hi, seed=n_rows), new, stop_ids=[], pad_id=0, compile=True)
        torch.cuda.synchronize()
        again = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        yield ("compiled generate() called again (12 then 16 rows): graphs compiled", f"{again} ({time.perf_counter() - t:.1f} s "
               f"for both)", again == 0)
        n = 16 * new
        t_eager = best_time(lambda: generate(ours, prompts, new, stop_ids=[], pad_id=0), 2, dev)
        t_comp = best_time(lambda: generate(ours, prompts, new, stop_ids=[], pad_id=0, compile=True), 2, dev)
        yield (f"greedy generation, batch 16 x {new}, 1.5B shape bf16", f"eager {n / t_eager:.0f} tok/s, compiled "
               f"{n / t_comp:.0f} tok/s ({t_eager / t_comp:.1f}x)", True)
        # the paper's sampling: it runs, stays in the vocabulary and is seeded
        paper = dict(temperature=0.6, top_p=0.9, top_k=50, repetition_penalty=1.2, seed=7)
        runs = [generate(ours, prompts, new, stop_ids=[], pad_id=0, compile=c, **paper) for c in (False, False, True)]
        in_vocab = all(0 <= t < cfg["vocab_size"] for run in runs for row in run for t in row)
        yield ("sampled generation as the paper's (T 0.6, top-p 0.9, top-k 50, repetition 1.2), eager and compiled",
               f"tokens in the vocabulary {in_vocab}; the same seed, the same tokens {runs[0] == runs[1]}",
               in_vocab and runs[0] == runs[1])
    del hf, ours
    # fp32: exact greedy tokens, compiled against eager, unless they part at a tie
    if GPU:
        hf, ours, cfg = twins("qwen2.5-1.5b", torch.float32)
        del hf
        prompts = prompts_of(cfg, 8)
        with teacher_forced() as eager_logits:
            eager = generate(ours, prompts, 16, stop_ids=[], pad_id=0)
        compiled = generate(ours, prompts, 16, stop_ids=[], pad_id=0, compile=True)
        parted = [(b, next(t for t in range(16) if x[t] != y[t])) for b, (x, y) in enumerate(zip(eager, compiled)) if x != y]
        at_ties = all(margin_at(eager_logits[t][b]) <= REL_TOL[torch.float32] * eager_logits[t][b].abs().max() for b, t in parted)
        yield ("fp32 greedy tokens, compiled = eager (or parting at a tie)", f"{8 - len(parted)}/8 rows equal"
               + (f"; the others part where the top two are within fp32 rounding: {at_ties}" if parted else ""), at_ties)


def margin_at(logits):
    top = logits.float().topk(2).values
    return (top[0] - top[1]).item()


# --- 4. the programs under torchrun ---------------------------------------------------------------------------------

def program(script, *flags, nproc=1):
    """A program under torchrun, given what is left of the deadline (at most --program-cap): its stdout."""
    limit = min(PROGRAM_CAP, left())
    if limit < 10:
        raise TimeoutError("no time left before the deadline")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *map(str, flags)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{script} ran past {limit:.0f} s") from None
    if r.returncode:
        raise RuntimeError(f"{script} exited {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[-1][:200]}")
    return r.stdout


def last_step(out):
    """The last step line of a log, cut to its loss, throughput and MFU."""
    line = next((x for x in reversed(out.splitlines()) if x.startswith("step")), "no step line")
    return " | ".join(part.strip() for part in line.split("|") if part.strip().startswith(("step", "loss", "mfu")) or "tok/s" in part)


FAST = ["--warmup-steps", "3", "--rounds", "2", "--inner-steps", "3", "--defend-steps", "4"]


def demo_run(name, *flags, nproc=1, script="patcher.py"):
    """The demo under torchrun in work/name (its base model trained once, then copied): (stdout, metrics rows)."""
    out = work / name
    if not (out / "base").exists() and (work / "demo" / "base").exists():
        shutil.copytree(work / "demo" / "base", out / "base")
    stdout = program(script, "--out", out, *FAST, *flags, nproc=nproc)
    return stdout, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(rs):
    return [r.get("loss_clean", r.get("attack_loss_end")) for r in rs]


@check("programs under torchrun", needs=45 if GPU else 0)
def _():
    out, rs = demo_run("demo", "--save-every", "5")
    yield ("patcher.py demo, one rank, checkpoints every 5 steps", last_step(out), "exported" in out)
    (work / "demo" / "done.json").unlink()  # as if killed in its export (a finished run's --resume has nothing to do)
    out = program("patcher.py", "--out", work / "demo", *FAST, "--save-every", "5", "--resume")
    # the last checkpoint is the last step's (taken before the export): the resumed run goes straight to the export
    yield ("  --resume from its last checkpoint", "resumed" if "resumed at step 11" in out else out[-90:], "resumed at step 11" in out)
    d = work / "demo" / "data"
    out = program("eval.py", "--model", work / "demo" / "final", "--attack-data", d / "attack.jsonl", "--eval-data",
                  d / "eval_harmful.jsonl", "--eval-at", "0,4", "--greedy", "--max-new-tokens", "4", "--attack-batch-size",
                  "16", "--limit", "32", "--out", work / "eval", *(["--compile"] if GPU else []))
    yield ("eval.py on the export (" + ("bf16, compiled" if GPU else "fp32") + " generation)", "report written", "wrote" in out)


@check("precisions and switches", needs=90 if GPU else 0, quick=False)
def _():
    """The demo in each precision against fp32, and --compile / --activation-checkpointing against the same run
    without them. bf16 against fp32 over 13 steps at lr 5e-4 stays within 0.05 of each loss (tests/test_gpu_paths.py's
    BF16_TOL, measured there on the CPU); bf16-pure is another method (README: the numeric regime): reported only."""
    _, fp32 = demo_run("demo-fp32", "--precision", "fp32")
    default = fp32
    if GPU:
        out, default = demo_run("demo-bf16", "--precision", "bf16")
        gap = max(abs(a - b) for a, b in zip(losses(fp32), losses(default)) if a is not None)
        yield ("  demo --precision bf16 against fp32", f"{last_step(out)} | largest loss gap {gap:.3f}", gap < 0.05)
        out, pure = demo_run("demo-bf16-pure", "--precision", "bf16-pure")
        gap = max(abs(a - b) for a, b in zip(losses(fp32), losses(pure)) if a is not None)
        yield ("  demo --precision bf16-pure against fp32 (reported)", f"{last_step(out)} | largest loss gap {gap:.3f}",
               "exported" in out)
    # the default precision (bf16 on a GPU, fp32 on the CPU) with each switch; CI compiles on the CPU elsewhere
    for flags in (["--compile"], ["--activation-checkpointing"]) if GPU else (["--activation-checkpointing"],):
        out, rs = demo_run("demo" + flags[0], *flags)
        gap = max(abs(a - b) for a, b in zip(losses(default), losses(rs)) if a is not None)
        bound = 0.05 if GPU else 1e-5
        yield (f"  demo {flags[0]} against without", f"{last_step(out)} | largest loss gap {gap:.1e}",
               "exported" in out and gap < bound)


@check("1.5B shape under torchrun", needs=60 if GPU else 0, quick=False)
def _():
    ckpt, _ = qwen_checkpoint()
    paths = data.write_toy_world(work / "toy")
    for flags in ([], ["--compile"]) if GPU else ([],):
        out = program("patcher.py", "--model", ckpt, "--safe-data", paths["safe"], "--unsafe-data", paths["unsafe"],
                      "--out", work / f"qwen{''.join(flags)}", "--warmup-steps", "1", "--rounds", "1", "--inner-steps", "2",
                      "--defend-steps", "2", "--batch-size", "4", "--inner-batch-size", "4", *flags)
        yield (f"patcher.py, 1.5B shape, one rank {' '.join(flags) or '(eager)'}", last_step(out), "exported" in out)


# --- 5. two or more GPUs --------------------------------------------------------------------------------------------

@check("two GPUs", needs=90, quick=False)
def _():
    if NGPU < 2:
        yield ("NCCL on 2 ranks, parallel.py, a sub-group's checkpoint", f"not run: {NGPU} GPU(s) here", True)
        return
    fp32 = ["--precision", "fp32"]
    _, one = demo_run("nccl-1", *fp32)
    _, two = demo_run("nccl-2", *fp32, nproc=2)
    gap = max(abs(a - b) for a, b in zip(losses(one), losses(two)) if a is not None)
    yield ("patcher.py demo fp32, 2 ranks (NCCL) vs 1", f"largest loss gap {gap:.1e}", gap < 1e-4 and len(one) == len(two))
    out, par = demo_run("par", *fp32, "--sync", "--save-every", "4", nproc=2, script="parallel.py")
    gap = max(abs(a - b) for a, b in zip(losses(one), losses(par)) if a is not None)
    yield ("parallel.py --sync, 1 defender + 1 attacker (NCCL), vs patcher.py", f"largest loss gap {gap:.1e}; "
           + out.strip().splitlines()[-1][:80], gap < 1e-4 and "attack vectors installed" in out)
    (work / "par" / "checkpoints" / "latest").write_text("step-0000008")  # the older of the two kept
    (work / "par" / "done.json").unlink(missing_ok=True)
    program("parallel.py", "--out", work / "par", *FAST, *fp32, "--sync", "--save-every", "4", "--resume", nproc=2)
    again = [json.loads(line) for line in (work / "par" / "metrics.jsonl").read_text().splitlines()]
    gap = max(abs(a - b) for a, b in zip(losses(par), losses(again)) if a is not None)
    yield ("  its defender half's DCP checkpoint (a sub-group) resumed", f"largest loss gap {gap:.1e}",
           gap < 1e-6 and len(again) == len(par))


width = max(len(r[0]) for r in rows)
print(f"\n{torch.cuda.get_device_name(dev) if GPU else 'CPU (tiny shapes)'} x {max(NGPU, 1)} | torch {torch.__version__} | "
      f"{time.strftime('%Y-%m-%d')} | {time.monotonic() - START:.0f} s{' | --quick' if args.quick else ''}\n")
print(f"| {'check':<{width}} | result | ok |\n|{'-' * (width + 2)}|---|---|")
for what, result, ok in rows:
    print(f"| {what:<{width}} | {result} | {'yes' if ok else 'NO'} |")
if args.out is None:
    shutil.rmtree(work, ignore_errors=True)
patcher.exit_now(0 if all(ok for _, _, ok in rows) else 1)
