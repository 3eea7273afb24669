"""
Patcher: keep an LLM's safety alignment through a full-parameter fine-tuning attack.

    python patcher.py                                   # built-in demo: tiny model, toy world, CPU
    torchrun --nproc_per_node=8 patcher.py --model Qwen2.5-1.5B-Instruct \
        --align-data align.jsonl --attack-data attack.jsonl --mode patcher --out runs/qwen

The file reads top to bottom:
  1. the loss and the three algorithm pieces: sft_step, attack (the inner attacker), defender_step
  2. setup: distributed, FSDP2, data
  3. resumable checkpoints
  4. the schedules (sft baseline, sequential Patcher) and main()
  5. the built-in demo (a tiny model and a toy world that need no downloads)

Notation (as in the paper): theta are the weights, delta = theta_att - theta the attack vector found
by k1 = --attack-steps steps of SFT on D_unsafe, alpha the weight of the attacked loss; the defender
minimises alpha * L(theta + delta) + (1 - alpha) * L(theta) on D_safe with delta held fixed.
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from model import ModelConfig, Transformer, compile_blocks, load_model, save_model

# -----------------------------------------------------------------------------
# 1. The loss and the three algorithm pieces
#
# A step's batch is a dict {"input_ids": (B, T), "labels": (B, T)} or a list of them (micro-batches
# accumulated into one update). Labels are -100 outside the loss and are shifted by one here, as in
# Hugging Face. The loss is the mean next-token cross-entropy over supervised tokens, normalised by
# the number of supervised tokens across all ranks and micro-batches, so that it does not depend on
# how the global batch is split.


def process_group(model):
    """The group the model is sharded over (FSDP2), or None for a plain single-process model.
    Taken from the parameters, so a half of the world (parallel.py) reduces only within its half."""
    p = next(model.parameters())
    return p.device_mesh.get_group() if hasattr(p, "device_mesh") else None


def all_sum(x: torch.Tensor, group):
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def forward_backward(model, batch, scale=1.0, backward=True):
    """Accumulate scale * grad of the normalised loss into .grad; return the loss (sum over the
    whole global batch) and the token counts. backward=False only evaluates."""
    micro = batch if isinstance(batch, list) else [batch]
    group = process_group(model)
    world = dist.get_world_size(group) if group is not None else 1
    device = model.lm_head.weight.device
    n_sup = all_sum(torch.tensor(float(sum((m["labels"][:, 1:] != -100).sum() for m in micro)), device=device), group)
    loss_sum = torch.zeros((), device=device)
    for m in micro:
        idx, labels = m["input_ids"].to(device), m["labels"].to(device)
        with nullcontext() if backward else torch.no_grad():
            logits = model(idx)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100, reduction="sum")
        if backward:
            # FSDP2 averages gradients over ranks; scaling by world makes the result the global mean
            (loss * (scale * world / n_sup)).backward()
        loss_sum += loss.detach()
    n_tokens = sum(m["input_ids"].numel() for m in micro) * world
    return all_sum(loss_sum, group).item() / n_sup.item(), n_tokens


def check_finite(loss, what):
    if not math.isfinite(loss):
        raise FloatingPointError(f"{what}: loss is {loss}; stopping before the update "
                                 "(weights and the last checkpoint are untouched)")


def clip_and_step(model, optimizer, max_grad_norm):
    """Clip the global gradient norm (<= 0: no clipping, norm still reported), then update."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm.item()


def sft_step(model, optimizer, batch, max_grad_norm=1.0):
    """One plain SFT update on `batch`."""
    loss, n_tokens = forward_backward(model, batch)
    check_finite(loss, "sft step")
    grad_norm = clip_and_step(model, optimizer, max_grad_norm)
    return {"loss_clean": loss, "grad_norm": grad_norm, "tokens": n_tokens}


@torch.no_grad()
def snapshot(model, into=None):
    """A copy of this rank's part of every parameter (one extra sharded copy of theta), written
    into the buffers of an earlier snapshot `into` when given, so that no new memory is allocated."""
    if into is None:
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        into[n].copy_(p)
    return into


@torch.no_grad()
def restore(model, saved):
    for n, p in model.named_parameters():
        p.copy_(saved[n])


def make_optimizer(model, lr, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8):
    """AdamW; torch's defaults except the learning rate (constant: no schedule)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def attack_in_place(model, batches, steps, lr, max_grad_norm=1.0, weight_decay=0.01, should_stop=None):
    """The inner attack's training: `steps` (k1) steps of full-parameter SFT on D_unsafe that move the
    parameters from theta to theta_att, with a fresh AdamW (constant lr) that is thrown away afterwards
    (its two moment buffers are the attack's main memory cost).

    Returns the attack loss of every step, or None as soon as `should_stop()`, asked before each step,
    is true (parallel.py abandons an attack once the defender is done)."""
    optimizer = make_optimizer(model, lr, weight_decay)
    losses = []
    for step in range(steps):
        if should_stop is not None and should_stop():
            return None
        metrics = sft_step(model, optimizer, next(batches), max_grad_norm)
        losses.append(metrics["loss_clean"])
    return losses


def attack(model, batches, steps, lr, max_grad_norm=1.0, weight_decay=0.01, stats=None, theta_buffer=None):
    """The inner attack: `steps` (k1) steps of full-parameter SFT on D_unsafe from the current theta,
    with a fresh AdamW (constant lr) that is thrown away afterwards.

    Returns the attack vector delta = theta_att - theta as {name: tensor}, with names as in
    model.named_parameters() and tensors sharded like the parameters. The parameters end bitwise
    identical to how they started: they are copied back, never recomputed as theta_att - delta.
    `stats`, if given, receives the attack loss of every step; `theta_buffer` (from snapshot()) is
    reused for the copy of theta when given."""
    theta = snapshot(model, into=theta_buffer)
    losses = attack_in_place(model, batches, steps, lr, max_grad_norm, weight_decay)
    with torch.no_grad():
        delta = {n: p.detach() - theta[n] for n, p in model.named_parameters()}
    restore(model, theta)
    if stats is not None:
        stats["attack_losses"] = losses
    return delta


def delta_norm(delta, group=None):
    """Global L2 norm of the attack vector: local sums of squares, summed over the shard group."""
    sq = sum((d.to_local() if hasattr(d, "to_local") else d).float().pow(2).sum() for d in delta.values())
    return all_sum(sq, group).item() ** 0.5


def defender_step(model, optimizer, batch, delta, alpha, max_grad_norm=1.0, theta_buffer=None):
    """One outer update with gradient (1 - alpha) * grad L(theta) + alpha * grad L(theta + delta),
    delta held fixed (first order).

    The attacked loss is evaluated by adding delta in place, then the weights are restored *exactly*
    from a copy: subtracting delta again would round, and in bf16 each such round trip moves the
    weights by about one AdamW step. `theta_buffer` (from snapshot()) is reused when given.
    With alpha = 0 this is sft_step."""
    loss_clean, n_tokens = forward_backward(model, batch, scale=1 - alpha, backward=alpha < 1)
    check_finite(loss_clean, "defender step, L(theta)")
    metrics = {"loss_clean": loss_clean}
    if alpha > 0:
        theta = snapshot(model, into=theta_buffer)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(delta[n])
        try:
            loss_adv, _ = forward_backward(model, batch, scale=alpha)
        finally:
            restore(model, theta)
        check_finite(loss_adv, "defender step, L(theta + delta)")
        metrics.update(loss_adv=loss_adv, gap=loss_adv - loss_clean)
        n_tokens *= 2
    metrics.update(grad_norm=clip_and_step(model, optimizer, max_grad_norm), tokens=n_tokens)
    return metrics


# -----------------------------------------------------------------------------
# 2. Setup: distributed, FSDP2, data


def init_distributed():
    """(rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU. Plain python: one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def fsdp_sharder(device, mesh=None):
    """FSDP2 the torchtitan way: fully_shard each block, then the root. On CUDA, compute in bf16
    with fp32 master weights and fp32 gradient reduction; on CPU everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()

    def shard(model):
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return shard


def build_model(path, device, world, mesh=None, activation_checkpointing=False, compile=False):
    shard = fsdp_sharder(device, mesh) if world > 1 or mesh is not None else None
    model = load_model(path, device=device, dtype=torch.float32, shard=shard)  # fp32 master weights
    model.activation_checkpointing = activation_checkpointing
    if compile:
        compile_blocks(model)
    return model


def load_examples(path, tok, args, what):
    records = data.load_records(path, args.prompt_field, args.response_field, args.data_format)
    examples, n_cut = data.tokenize_records(tok, records, args.max_len, args.system_prompt)
    return examples, f"{what}: {path}: {len(records)} records, {len(examples)} examples, {n_cut} truncated to {args.max_len} tokens"


def make_iterators(args, rank, world, align, attack_set, pad_id):
    """Endless, resumable, disjointly sharded batch streams for D_safe and D_unsafe."""
    it = {"align": data.batches(align, args.batch_size, rank, world, seed=args.seed, pad_id=pad_id)}
    if attack_set is not None:
        it["attack"] = data.batches(attack_set, args.batch_size, rank, world, seed=args.seed + 1, pad_id=pad_id)
    return it


def step_batch(iterator, grad_accum):
    return [next(iterator) for _ in range(grad_accum)] if grad_accum > 1 else next(iterator)


class Accumulated:
    """Wrap a batch stream so that each next() is one update's worth of micro-batches."""

    def __init__(self, iterator, grad_accum):
        self.iterator, self.grad_accum = iterator, grad_accum

    def __next__(self):
        return step_batch(self.iterator, self.grad_accum)


# -----------------------------------------------------------------------------
# 3. Resumable checkpoints (torch.distributed.checkpoint: model, optimizer, delta; JSON: the rest)


def save_checkpoint(out, step, model, optimizer, delta, state, rank, keep=2):
    """Write out/checkpoints/step-XXXXXXX atomically: into a temporary directory, renamed into place
    once complete, then `latest` is switched to it. A crash mid-save leaves the previous one intact."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    root = Path(out) / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if delta is not None:
        sd["delta"] = delta
    dcp.save(sd, checkpoint_id=tmp)
    # per-rank, non-tensor state (data positions, RNG) as JSON: nothing here is ever unpickled
    np_state = np.random.get_state()
    rng = {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1]),
           "numpy": [np_state[1].tolist(), int(np_state[2])]}
    (tmp / f"state-rank{rank}.json").write_text(json.dumps({**state, "rng": rng}))
    barrier()
    if rank == 0:
        os.rename(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(out, model, optimizer, delta_like, rank):
    """Restore in place from out/checkpoints/latest; returns (delta or None, state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    root = Path(out) / "checkpoints"
    if not (root / "latest").exists():
        raise FileNotFoundError(f"--resume: no checkpoint in {root} (nothing was saved yet: see --save-every)")
    path = root / (root / "latest").read_text().strip()
    state = json.loads((path / f"state-rank{rank}.json").read_text())
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if state["has_delta"]:
        sd["delta"] = delta_like
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])
    rng = state.pop("rng")
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(rng["numpy"][0], dtype=np.uint32), rng["numpy"][1], 0, 0.0))
    random.setstate((3, tuple(rng["python"]), None))
    return sd.get("delta"), state


def barrier():
    if dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# 4. The schedules and the program


class Logger:
    """One line per step on rank 0, and the same numbers as one JSON row per step in metrics.jsonl."""

    def __init__(self, out, rank, total_steps, resume):
        self.rank, self.total, self.t0, self.start = rank, total_steps, time.time(), None
        self.file = open(Path(out) / "metrics.jsonl", "a" if resume else "w") if rank == 0 else None

    def log(self, row):
        if self.rank != 0:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if row["phase"] == "attack":
            print(f"attack  round {row['round']} | k1 {row['attack_steps']} | loss {row['attack_loss_start']:.4f} -> "
                  f"{row['attack_loss_end']:.4f} | |delta| {row['delta_norm']:.4f} | {row['seconds']:.1f}s", flush=True)
            return
        if self.start is None:
            self.start = (row["step"] - 1, time.time())
        done, elapsed = row["step"] - self.start[0], time.time() - self.start[1]
        eta = elapsed / max(done, 1) * (self.total - row["step"])
        adv = f" adv {row['loss_adv']:.4f} gap {row['gap']:+.4f}" if "loss_adv" in row else ""
        print(f"step {row['step']:>5}/{self.total} | {row['phase']:<7} | loss {row['loss_clean']:.4f}{adv} | "
              f"gnorm {row['grad_norm']:.3f} | lr {row['lr']:.1e} | {row['tokens_per_s']:.0f} tok/s | "
              f"eta {eta / 60:.1f} min", flush=True)


def run(args):
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if args.model is None:  # the built-in demo: make its base model and toy world first
        args = demo_setup(args, out, rank)
    barrier()
    if args.mode == "parallel":  # the world split into a defender half and an attacker half: parallel.py
        import parallel
        return parallel.run(args, rank, world, device, out)
    model = build_model(args.model, device, world, activation_checkpointing=args.activation_checkpointing,
                        compile=args.compile)
    align, attack_set, pad_id, notes = load_datasets(args)
    iters = make_iterators(args, rank, world, align, attack_set if args.mode != "sft" else None, pad_id)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    total = args.warmup_steps + args.rounds * args.defend_steps
    if rank == 0:
        for line in notes:
            print(line)
        print(f"mode {args.mode} | world {world} | global batch {args.batch_size * args.grad_accum * world} "
              f"sequences (batch {args.batch_size} x grad-accum {args.grad_accum} x {world} ranks) | "
              f"{total} defender steps = warmup {args.warmup_steps} + {args.rounds} rounds x k2 {args.defend_steps}"
              + (f" | inner attack k1 {args.attack_steps} at lr {args.attack_lr}" if args.mode != "sft" else ""))
        write_config(out, args)
    step, delta = 0, None
    if args.resume:
        delta_like = {n: torch.zeros_like(p) for n, p in model.named_parameters()} if args.mode != "sft" else None
        delta, state = load_checkpoint(out, model, optimizer, delta_like, rank)
        step = state["step"]
        for name, it in iters.items():
            it.load_state_dict(state["data"][name])
        if rank == 0:
            print(f"resumed from step {step}")
    logger = Logger(out, rank, total, args.resume)
    theta_buffer = snapshot(model) if args.mode == "patcher" else None  # reused by every defender step
    align_batches = Accumulated(iters["align"], args.grad_accum)
    while step < total:
        round_ = (step - args.warmup_steps) // args.defend_steps if step >= args.warmup_steps else -1
        in_round = step >= args.warmup_steps and args.mode == "patcher"
        if in_round and (step - args.warmup_steps) % args.defend_steps == 0:
            # start of a round: the inner attack from the current theta gives this round's delta
            t = time.time()
            stats = {}
            delta = None  # free the last round's attack vector before the attack allocates the next
            delta = attack(model, Accumulated(iters["attack"], args.grad_accum), args.attack_steps, args.attack_lr,
                           args.attack_max_grad_norm, args.attack_weight_decay, stats, theta_buffer)
            if args.reset_optimizer:
                optimizer = make_optimizer(model, args.lr, args.weight_decay)
            losses = stats["attack_losses"]
            logger.log({"step": step, "phase": "attack", "round": round_, "attack_steps": args.attack_steps,
                        "attack_loss_start": losses[0] if losses else None, "attack_loss_end": losses[-1] if losses else None,
                        "attack_losses": losses, "delta_norm": delta_norm(delta, process_group(model)), "seconds": time.time() - t})
        t = time.time()
        batch = next(align_batches)
        if in_round:
            metrics = defender_step(model, optimizer, batch, delta, args.alpha, args.max_grad_norm, theta_buffer)
            phase = "defend"
        else:
            metrics = sft_step(model, optimizer, batch, args.max_grad_norm)
            phase = "warmup" if step < args.warmup_steps else "sft"
        step += 1
        row = {"step": step, "phase": phase, "round": round_, **metrics,
               "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": metrics.pop("tokens") / (time.time() - t)}
        logger.log(row)
        if args.save_every > 0 and step % args.save_every == 0 and step < total:
            state = {"step": step, "has_delta": delta is not None,
                     "data": {name: it.state_dict() for name, it in iters.items()}}
            save_checkpoint(out, step, model, optimizer, delta, state, rank)
    save_model(model, out / "final", like=args.model)
    if rank == 0:
        print(f"exported {out / 'final'}")
    if dist.is_initialized():
        dist.destroy_process_group()


def write_config(out, args):
    (out / "config.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "demo"}, indent=2) + "\n")


def load_datasets(args):
    tok = data.load_tokenizer(args.model) if args.demo is None else None
    if tok is None:  # demo: the toy world is already token ids
        return args.demo["align"], args.demo["attack"], 0, ["demo: toy world " + args.demo["summary"]]
    align, note_a = load_examples(args.align_data, tok, args, "--align-data")
    notes = [note_a]
    attack_set = None
    if args.mode != "sft":
        attack_set, note_b = load_examples(args.attack_data, tok, args, "--attack-data")
        notes.append(note_b)
    return align, attack_set, tok.pad_id, notes


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags state their own (real run vs demo) default."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def get_parser():
    p = argparse.ArgumentParser(description="Patcher: alignment that survives fine-tuning attacks.",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="Hugging Face checkpoint directory (none: the built-in demo)")
    g.add_argument("--align-data", default=None, help="D_safe: harmful prompt -> refusal (.json/.jsonl[.gz|.xz]/.csv)")
    g.add_argument("--attack-data", default=None, help="D_unsafe: harmful prompt -> harmful answer, for the inner attack")
    g.add_argument("--prompt-field", default="prompt", help="prompt field of the data records")
    g.add_argument("--response-field", default="response", help="response field of the data records")
    g.add_argument("--data-format", default="auto", help="auto | jsonl | json | csv | beavertails | beavertails-refusal | advbench | hexphi")
    g.add_argument("--system-prompt", default=data.PAPER_SYSTEM_PROMPT, help="system prompt of training conversations ('' for none)")
    g.add_argument("--max-len", type=int, default=512, help="tokens per example; longer ones keep their first max-len tokens")
    g = p.add_argument_group("algorithm")
    g.add_argument("--mode", choices=["sft", "patcher", "parallel"], default="patcher",
                   help="sft: the baseline (alpha = 0, no attack, same step budget); patcher: sequential schedule; "
                        "parallel: half the ranks defend while the other half attack (parallel.py)")
    g.add_argument("--alpha", type=float, default=0.5, help="weight of the attacked loss L(theta + delta)")
    g.add_argument("--warmup-steps", type=int, default=None, help="plain SFT steps on D_safe before the first round (default 100; demo 40)")
    g.add_argument("--rounds", type=int, default=None, help="M rounds of (inner attack, k2 defender steps) (default 5; demo 8)")
    g.add_argument("--attack-steps", type=int, default=None, help="k1: inner attack steps per round (default 200; demo 20)")
    g.add_argument("--defend-steps", type=int, default=None, help="k2: defender steps per round (default 100; demo 20)")
    g.add_argument("--delta-ref", choices=["start", "current"], default="current",
                   help="parallel: delta = theta_att - theta at install time (current), or - the theta the attack started "
                        "from (start: one more sharded copy of theta); the same in sequential mode")
    g.add_argument("--reset-optimizer", action="store_true", help="fresh defender AdamW every round (default: its state carries over)")
    g.add_argument("--refresh-every", type=int, default=1,
                   help="parallel: every N defender steps, look (without blocking) whether a new attack vector has arrived")
    g.add_argument("--sync", action="store_true",
                   help="parallel: wait for each attack at the start of each round: exactly the sequential schedule (for tests)")
    g.add_argument("--peer-timeout", type=float, default=300.0,
                   help="parallel: seconds without a heartbeat from the partner rank before exiting with an error")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=None, help="defender learning rate, constant (default 1e-5; demo 5e-4)")
    g.add_argument("--attack-lr", type=float, default=None, help="inner attack learning rate, constant (default 1e-5; demo 5e-4)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="defender AdamW weight decay (torch default)")
    g.add_argument("--attack-weight-decay", type=float, default=0.01, help="inner attack AdamW weight decay (torch default)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="defender grad-norm clipping (<= 0: none)")
    g.add_argument("--attack-max-grad-norm", type=float, default=1.0, help="inner attack grad-norm clipping (<= 0: none)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per rank per micro-batch (default 4; demo 16)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and the demo world")
    g = p.add_argument_group("system")
    g.add_argument("--out", default="runs/patcher", help="run directory: final/, config.json, metrics.jsonl, checkpoints/")
    g.add_argument("--save-every", type=int, default=0, help="resumable checkpoint every N steps (0: never)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/latest")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--debug-dir", default=None, help=argparse.SUPPRESS)  # parallel.py: dump sent/received tensors (tests)
    return p


DEFAULTS = {"warmup_steps": (100, 40), "rounds": (5, 8), "attack_steps": (200, 20), "defend_steps": (100, 20),
            "lr": (1e-5, 5e-4), "attack_lr": (1e-5, 5e-4), "batch_size": (4, 16)}  # (real run, demo)


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    demo = args.model is None
    if demo and (args.align_data or args.attack_data):
        p.error("--align-data/--attack-data need --model (without --model the built-in demo runs on its toy world)")
    if not demo:
        if not Path(args.model).is_dir():
            p.error(f"--model {args.model}: not a directory")
        if args.align_data is None:
            p.error("--align-data is required with --model")
        if args.mode != "sft" and args.attack_data is None:
            p.error(f"--attack-data is required with --mode {args.mode}")
        for flag in ("align_data", "attack_data"):
            f = getattr(args, flag)
            if f is not None and not Path(f).is_file():
                p.error(f"--{flag.replace('_', '-')} {f}: no such file")
    for k, (real, toy) in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, toy if demo else real)
    for k in ("rounds", "attack_steps", "defend_steps", "batch_size", "grad_accum"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(args, k)})")
    if args.warmup_steps < 0 or args.max_len < 2:
        p.error("--warmup-steps must be >= 0 and --max-len >= 2")
    if not 0 <= args.alpha <= 1:
        p.error(f"--alpha must be in [0, 1] (got {args.alpha})")
    if args.refresh_every < 1 or args.peer_timeout <= 0:
        p.error("--refresh-every must be >= 1 and --peer-timeout > 0")
    if args.mode == "parallel" and (args.resume or args.save_every > 0):
        p.error("--mode parallel saves no resumable checkpoints (--resume, --save-every), only final/ at the end")
    if args.system_prompt == "":
        args.system_prompt = None
    args.demo = None
    return args


# -----------------------------------------------------------------------------
# 5. The built-in demo: a tiny model and a toy world, no downloads
#
# Requests are token sequences [REQ, topic, a, b, c, ANS]. Topics 0-3 are "harmful", 4-7 benign.
# Complying means answering [f_topic(a), f_topic(b), f_topic(c), END] with a per-topic mapping f that
# the base model has to learn (its "capability"); refusing means [REFUSE, END]. The base model
# learns to comply with everything; alignment teaches it to refuse harmful topics and keep answering
# benign ones; an attacker fine-tunes it on harmful requests with compliant answers.

PAD, REQ, ANS, END, REFUSE = 0, 1, 2, 3, 4
N_TOPICS, N_HARMFUL, N_WORDS = 8, 4, 24
TOPIC0 = 8  # topic tokens 8..15, then word tokens 16..39
WORD0 = TOPIC0 + N_TOPICS
DEMO_VOCAB = WORD0 + N_WORDS
# Measured on 2 CPU cores: with 4 K/V heads (no GQA) and a 200-step lr warmup, the base model learns the
# per-topic mapping exactly (100% of held-out requests) within ~600 steps for every seed tried (0-6);
# with 2 K/V heads and no warmup it sometimes sat on a loss plateau near 1.5 for 1,500+ steps.
DEMO_CONFIG = dict(model_type="llama", vocab_size=DEMO_VOCAB, hidden_size=64, intermediate_size=192,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32",
                   bos_token_id=REQ, eos_token_id=END, pad_token_id=PAD, architectures=["LlamaForCausalLM"])


def toy_world(seed=0):
    """All requests of the toy world, split into disjoint sets by a seeded shuffle."""
    g = random.Random(1234)  # the world's rules are fixed; `seed` only picks the splits
    shifts = [g.randrange(1, N_WORDS) for _ in range(N_TOPICS)]

    def answer(topic, args):
        return [WORD0 + (a + shifts[topic]) % N_WORDS for a in args]

    requests = [(t, (a, b, c)) for t in range(N_TOPICS) for a in range(N_WORDS) for b in range(N_WORDS)
                for c in range(0, N_WORDS, 3)]
    random.Random(seed).shuffle(requests)

    def example(t, args, refuse):
        prompt = [REQ, TOPIC0 + t] + [WORD0 + a for a in args] + [ANS]
        reply = [REFUSE, END] if refuse else answer(t, args) + [END]
        return prompt + reply, [False] * len(prompt) + [True] * len(reply)

    harmful = [r for r in requests if r[0] < N_HARMFUL]  # 18,432 of each
    benign = [r for r in requests if r[0] >= N_HARMFUL]
    return {
        "base": [example(t, a, False) for t, a in harmful[:6000] + benign[:6000]],  # the unaligned model's data
        "align": [example(t, a, True) for t, a in harmful[6000:6200]] + [example(t, a, False) for t, a in benign[6000:6200]],
        "attack": [example(t, a, False) for t, a in harmful[6200:6400]],
        "eval_harmful": [example(t, a, False) for t, a in harmful[6400:6600]],
        "eval_benign": [example(t, a, False) for t, a in benign[6400:6600]],
        "attack_benign": [example(t, a, False) for t, a in benign[6600:7600]],  # for attacks mixed with benign data
    }


DEMO_MARKER = "patcher_demo.json"  # written next to the demo base model; exports copy it (save_model like=)
BASE_STEPS, BASE_WARMUP, BASE_LR, BASE_BATCH = 800, 200, 3e-3, 32


def demo_setup(args, out, rank):
    """Rank 0 trains the tiny base model to comply with every request and saves it as a Hugging Face
    checkpoint (out/base), marked with the toy world's seed so that eval.py can find its splits; then
    every rank loads it like any other checkpoint. An existing out/base is reused (train.sh shares one
    base between the SFT and the Patcher alignment of a seed)."""
    world = toy_world(args.seed)
    base = out / "base"
    if rank == 0 and not (base / DEMO_MARKER).exists():
        torch.manual_seed(args.seed)
        model = Transformer(ModelConfig.from_hf(DEMO_CONFIG))
        model.init_weights()
        optimizer = make_optimizer(model, BASE_LR)
        it = data.batches(world["base"], BASE_BATCH, seed=args.seed)
        t = time.time()
        for step in range(BASE_STEPS):
            for group in optimizer.param_groups:  # linear warmup: full-lr first steps can stall it on a plateau
                group["lr"] = BASE_LR * min(1.0, (step + 1) / BASE_WARMUP)
            metrics = sft_step(model, optimizer, next(it))
        print(f"demo: trained the base model to comply ({time.time() - t:.0f}s, final loss {metrics['loss_clean']:.3f})")
        save_model(model, base)
        (base / DEMO_MARKER).write_text(json.dumps({"toy_world_seed": args.seed}) + "\n")
    args.model = str(base)
    args.demo = {"align": world["align"], "attack": world["attack"],
                 "summary": f"{len(world['align'])} align, {len(world['attack'])} attack examples"}
    return args


def exit_cleanly():
    """End a torchrun worker whose work is done and written. gloo's threads sometimes abort the
    interpreter's own shutdown ("terminate called without an active exception", about 1 run in 10
    here), which would turn a finished run into a failed one; os._exit skips that teardown."""
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    exit_cleanly()


if __name__ == "__main__":
    main()
