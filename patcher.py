"""
Patcher: keep an LLM's safety alignment through a full-parameter fine-tuning attack.

    python patcher.py                                # the built-in demo: a tiny model in a toy world, CPU
    torchrun --nproc_per_node=8 patcher.py --model Qwen2.5-1.5B-Instruct \
        --safe-data d_safe.jsonl --unsafe-data d_unsafe.jsonl --out runs/qwen
    torchrun --nproc_per_node=8 parallel.py ...      # the parallel schedule, built on this file

The algorithm, as run() below runs it (theta: the weights; L: the mean next-token loss on D_safe):

    theta <- --warmup-steps steps of plain SFT on D_safe
    for round in range(M):                                        # M = --rounds
        delta = inner_attack(theta)    # k1 = --inner-steps steps of SFT on D_unsafe, minus theta; theta restored
        for k2 steps:                                             # k2 = --defend-steps
            theta <- AdamW step on  alpha * L(theta + delta) + (1 - alpha) * L(theta),  delta fixed (first order)

The baseline (--mode sft) takes the same steps with alpha = 0 and no inner attack. The file reads top to bottom:
  1. the loss and the three pieces: sft_step, inner_attack, defender_step
  2. run(): the schedule above
  3. setup: distributed, FSDP2, data, optimizer
  4. the run directory: the log, resumable checkpoints
  5. the command line: flags, the built-in demo, main()
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
from model import CheckpointError, ModelConfig, Transformer, all_finite, compile_blocks, load_model, save_model

# -----------------------------------------------------------------------------
# 1. The loss and the three pieces
#
# A step's batch is this rank's share of one global batch: a list of micro-batches {"input_ids", "labels"}
# (B, T), accumulated into one update. Labels are -100 outside the loss and shifted by one here, as in
# Hugging Face. The loss is the mean next-token cross-entropy over the supervised tokens of the whole
# global batch (all ranks, all micro-batches), so it does not depend on how the batch is split.


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
    """Accumulate scale * grad of the loss on `batch` into .grad (backward=False only evaluates).
    Returns {"loss", "tokens", "supervised", "flops"}: the loss and the global counts of token slots
    (padding included), supervised tokens and model flops (for throughput and MFU)."""
    micro = batch if isinstance(batch, list) else [batch]
    group = process_group(model)
    world = dist.get_world_size(group) if group is not None else 1
    device = model.lm_head.weight.device
    scored = [m["labels"][:, 1:] != data.IGNORE_INDEX for m in micro]  # position t predicts token t + 1
    flops = sum(m["input_ids"].numel() * model.flops_per_token(m["input_ids"].shape[1], backward) for m in micro)
    counts = all_sum(torch.tensor([float(sum(s.sum() for s in scored)), float(sum(m["input_ids"].numel() for m in micro)),
                                   flops], device=device, dtype=torch.float64), group).tolist()
    loss_sum = torch.zeros((), device=device)
    for m, s in zip(micro, scored):
        idx, s = m["input_ids"].to(device), s.to(device)
        with nullcontext() if backward else torch.no_grad():
            logits = model(idx, only=F.pad(s, (0, 1)))  # (N, vocab): only where the loss looks
            loss = F.cross_entropy(logits.float(), m["labels"][:, 1:].to(device)[s], reduction="sum")
        if backward:
            # FSDP2 averages gradients over ranks; scaling by world makes the result the global mean
            (loss * (scale * world / counts[0])).backward()
        loss_sum += loss.detach()
    if not backward and hasattr(model, "reshard"):
        model.reshard()  # FSDP2 keeps the root unsharded after a forward with no backward to follow
    return {"loss": all_sum(loss_sum, group).item() / counts[0], "tokens": counts[1], "supervised": counts[0],
            "flops": counts[2]}


def check_finite(value, what):
    """Stop before the update: one NaN would spread to every weight."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}")


def clip_and_step(model, optimizer, max_grad_norm):
    """Clip the global gradient norm (0: no clipping; the norm is still reported), then update."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        check_finite(norm, "the gradient norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def sft_step(model, optimizer, batch, max_grad_norm=1.0):
    """One plain SFT update on `batch`."""
    m = forward_backward(model, batch)
    check_finite(m["loss"], "the loss")
    return {**m, "grad_norm": clip_and_step(model, optimizer, max_grad_norm)}


def sft_steps(model, optimizer, batches, steps, max_grad_norm=1.0, first=1, should_stop=None):
    """`steps` SFT updates on the stream `batches`: the loop of every attack (the inner attack here,
    eval.py's test-time attack, parallel.py's attacker). Returns the loss of each step, or None as soon as
    should_stop(), asked before each step, is true. A non-finite loss or gradient stops it with its step
    named (numbered from `first`)."""
    losses = []
    for i in range(first, first + steps):
        if should_stop is not None and should_stop():
            return None
        try:
            losses.append(sft_step(model, optimizer, next(batches), max_grad_norm)["loss"])
        except FloatingPointError as e:
            raise FloatingPointError(f"attack step {i}: {e}") from None
    return losses


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


def make_optimizer(params, lr, weight_decay=0.01, fused=None):
    """AdamW with torch's defaults but the learning rate (constant: no schedule), fused on CUDA unless
    fused=False (one kernel for all parameters instead of several per parameter)."""
    params = list(params)
    if fused is None:
        fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def inner_attack(model, batches, steps, lr, weight_decay=0.01, max_grad_norm=1.0, theta_buffer=None, fused=None):
    """The inner attack: k1 = `steps` steps of full-parameter SFT on D_unsafe from the current theta, with
    a fresh AdamW (constant lr) that is thrown away afterwards (its two moment buffers are the attack's
    main memory cost). Returns (delta, losses): the attack vector delta = theta_att - theta as
    {name: tensor}, named as model.named_parameters() and sharded like them, and the loss of every step.
    The parameters end bitwise as they started: copied back, never recomputed as theta_att - delta.
    `theta_buffer` (from snapshot()) is reused for the copy of theta when given."""
    theta = snapshot(model, into=theta_buffer)
    optimizer = make_optimizer(model.parameters(), lr, weight_decay, fused)
    losses = sft_steps(model, optimizer, batches, steps, max_grad_norm)
    with torch.no_grad():
        delta = {n: p.detach() - theta[n] for n, p in model.named_parameters()}
    restore(model, theta)
    return delta, losses


def delta_norm(delta, group=None):
    """Global L2 norm of the attack vector: local sums of squares, summed over the shard group."""
    sq = sum((d.to_local() if hasattr(d, "to_local") else d).float().pow(2).sum() for d in delta.values())
    return all_sum(sq, group).item() ** 0.5


def defender_step(model, optimizer, batch, delta, alpha, max_grad_norm=1.0, theta_buffer=None, retain=None,
                  retain_weight=0.0):
    """One outer update on a D_safe batch, with gradient

        (1 - alpha) * grad L(theta) + alpha * grad L(theta + delta)  [+ retain_weight * grad L_retain(theta)]

    delta held fixed (first order); delta None is a plain SFT step (alpha = 0: the warmup, the baseline).
    The attacked loss is evaluated by adding delta in place, then the weights are restored *exactly* from
    a copy: subtracting delta again would round, and in bf16 each such round trip moves the weights by
    about one AdamW step. `theta_buffer` (from snapshot()) is reused when given.

    The optional retain term (TAR's retain loss, Tamirisa et al. 2024) keeps the model useful: the loss on
    a batch of benign prompt -> answer pairs (`retain`) at theta only, never at theta + delta. Without it
    (None, or weight 0) nothing is computed and the update is bitwise the paper's."""
    alpha = alpha if delta is not None else 0.0
    clean = forward_backward(model, batch, scale=1 - alpha, backward=alpha < 1)
    check_finite(clean["loss"], "L(theta)")
    metrics = {"loss_clean": clean["loss"], **{k: clean[k] for k in ("tokens", "supervised", "flops")}}
    passes = [clean]
    if alpha > 0:
        theta = snapshot(model, into=theta_buffer)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(delta[n])
        try:
            adv = forward_backward(model, batch, scale=alpha)
        finally:
            restore(model, theta)
        check_finite(adv["loss"], "L(theta + delta)")
        metrics.update(loss_adv=adv["loss"], gap=adv["loss"] - clean["loss"])
        passes.append(adv)
    if retain is not None and retain_weight > 0:
        kept = forward_backward(model, retain, scale=retain_weight)
        check_finite(kept["loss"], "L_retain(theta)")
        metrics["loss_retain"] = kept["loss"]
        passes.append(kept)
    for k in ("tokens", "supervised", "flops"):
        metrics[k] = sum(p[k] for p in passes)
    metrics["grad_norm"] = clip_and_step(model, optimizer, max_grad_norm)
    return metrics


# -----------------------------------------------------------------------------
# 2. The schedule


def run(args):
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    if args.model is None:  # the built-in demo: a tiny base model and its toy world, written as files
        make_demo(args, out, rank)
    model = build_model(args.model, device, args)
    streams, notes = load_data(args, rank, world)
    optimizer = make_optimizer(model.parameters(), args.lr, args.weight_decay, args.fused_adamw)
    warmup, M, k2 = args.warmup_steps, args.rounds, args.defend_steps
    total = warmup + M * k2
    step, delta, log = start_run(args, out, model, optimizer, streams, world, rank, total, notes)
    theta_buffer = snapshot(model) if args.mode == "patcher" else None  # one copy of theta for every attack and step
    safe, retain = streams["safe"], streams.get("retain")

    def train(n, phase, r):
        """n steps on D_safe against the current delta (None: plain SFT), logged and checkpointed."""
        nonlocal step
        for _ in range(n):
            t = time.time()
            try:
                metrics = defender_step(model, optimizer, next(safe), delta, args.alpha, args.max_grad_norm,
                                        theta_buffer, next(retain) if retain else None, args.retain_weight)
            except FloatingPointError as e:
                raise FloatingPointError(f"{phase} step {step + 1}: {e}") from None
            step += 1
            log.step(step, phase, r, metrics, time.time() - t, args.lr)
            if args.save_every and step % args.save_every == 0 and step < total:
                save_checkpoint(out, step, model, optimizer, delta, streams, settings(args, world), log.offset(), rank)

    train(warmup - step, "warmup", -1)  # plain SFT on D_safe (a resumed run may be past it)
    r0, i0 = divmod(step - warmup, k2) if step >= warmup else (0, 0)  # a resumed run re-enters its round
    for r in range(r0, M):
        if i0 == 0:  # a new round: the inner attack from the current theta gives its attack vector
            delta = None  # free the last round's attack vector before the attack allocates the next
            if args.mode == "patcher":
                t = time.time()
                try:
                    delta, losses = inner_attack(model, streams["unsafe"], args.inner_steps, args.inner_lr,
                                                 args.inner_weight_decay, args.inner_max_grad_norm, theta_buffer,
                                                 args.fused_adamw)
                except FloatingPointError as e:
                    raise FloatingPointError(f"round {r}, inner {e}") from None
                log.inner_attack(step, r, losses, delta_norm(delta, process_group(model)), time.time() - t)
            if args.reset_optimizer:  # as the official code, whose every round is a new process
                optimizer = make_optimizer(model.parameters(), args.lr, args.weight_decay, args.fused_adamw)
        train(k2 - i0, "defend" if args.mode == "patcher" else "sft", r)
        i0 = 0
    save_model(model, out / "final", like=args.model)
    if rank == 0:
        print(f"exported {out / 'final'}", flush=True)


# -----------------------------------------------------------------------------
# 3. Setup: distributed, FSDP2, data, optimizer


def init_distributed():
    """(rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU. Plain `python`: one process,
    which on CUDA still gets a one-rank process group, so that FSDP2's mixed precision (the one precision
    policy on CUDA) holds at every world size."""
    if "RANK" in os.environ:
        if torch.cuda.is_available():
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
            return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
        return 0, 1, torch.device("cuda", 0)
    return 0, 1, torch.device("cpu")


def precision(device):
    return ("bf16 compute over fp32 master weights, fp32 gradient reduction (FSDP2 MixedPrecisionPolicy)"
            if device.type == "cuda" else "fp32")


def fsdp_sharder(device, mesh=None):
    """FSDP2 the torchtitan way: fully_shard each block, then the root. On CUDA, compute in bf16 with
    fp32 master weights and fp32 gradient reduction; on CPU everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()

    def shard(model):
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return shard


def build_model(path, device, args, mesh=None):
    """The checkpoint in fp32 master weights, FSDP2-sharded whenever there is a process group."""
    shard = fsdp_sharder(device, mesh) if dist.is_initialized() else None
    model = load_model(path, device=device, dtype=torch.float32, shard=shard)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        compile_blocks(model)
    return model


def load_data(args, rank, world):
    """Endless, resumable batch streams for D_safe, D_unsafe (patcher mode) and the retain set (if any),
    each rank taking its share of every global batch; and a line about each set for the log."""
    tok = data.load_tokenizer(args.model)
    sets = [("safe", args.safe_data, args.safe_format, args.batch_size)]
    if args.mode != "sft":
        sets.append(("unsafe", args.unsafe_data, args.unsafe_format, args.inner_batch_size))
    if args.retain_data and args.retain_weight > 0:
        sets.append(("retain", args.retain_data, "auto", args.batch_size))
    streams, notes = {}, []
    for i, (name, path, fmt, batch) in enumerate(sets):
        records = data.load_records(path, args.prompt_field, args.response_field, fmt, role=name)
        examples, n_cut, longest = data.tokenize_records(tok, records, args.max_len, args.system_prompt)
        micro = min(args.micro_batch_size or batch, -(-batch // world))
        streams[name] = data.BatchIterator(examples, batch, rank, world, micro, seed=args.seed + i, pad_id=tok.pad_id,
                                           group_by_length=args.group_by_length)
        s = streams[name]
        notes.append(f"{name}: {path}: {len(records)} records, longest {longest} tokens, {n_cut} truncated at "
                     f"--max-len {args.max_len} | global batch {batch} = {s.accum} x {world} ranks x {s.micro}"
                     + (f" ({s.accum * world * s.micro - batch} empty rows: more ranks than sequences)"
                        if s.accum * world * s.micro > batch else ""))
    return streams, notes


# peak dense bf16 flop/s of one GPU, by a part of its name, for MFU
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "L4": 121e12, "A10": 125e12, "B200": 2250e12, "GH200": 989e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


# -----------------------------------------------------------------------------
# 4. The run directory: config.json, metrics.jsonl, checkpoints/, final/


class Log:
    """One line per step on rank 0, and the same numbers as one JSON row per step in metrics.jsonl."""

    def __init__(self, out, rank, total, device, offset=None):
        self.rank, self.total, self.start, self.peak = rank, total, None, peak_flops(device)
        self.file = None
        if rank == 0:
            path = Path(out) / "metrics.jsonl"
            self.file = open(path, "r+" if offset is not None else "w")
            if offset is not None:  # a resumed run: drop what was logged after its checkpoint
                self.file.truncate(offset)
                self.file.seek(offset)

    def offset(self):
        return self.file.tell() if self.file else 0

    def write(self, row):
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def step(self, step, phase, r, m, seconds, lr):
        row = {"step": step, "phase": phase, "round": r, **m, "lr": lr, "tokens_per_s": m["tokens"] / seconds,
               "supervised_per_s": m["supervised"] / seconds,
               "mfu": m["flops"] / seconds / self.peak if self.peak else None}
        for k in ("tokens", "supervised", "flops"):
            del row[k]
        self.write(row)
        if self.rank != 0:
            return
        if self.start is None:
            self.start = (step - 1, time.time())
        eta = (time.time() - self.start[1]) / (step - self.start[0]) * (self.total - step)
        adv = f" adv {m['loss_adv']:.4f} gap {m['gap']:+.4f}" if "loss_adv" in m else ""
        adv += f" retain {m['loss_retain']:.4f}" if "loss_retain" in m else ""
        mfu = f" | mfu {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
        print(f"step {step:>5}/{self.total} | {phase:<6} | loss {m['loss_clean']:.4f}{adv} | gnorm {m['grad_norm']:.3f} "
              f"| lr {lr:.1e} | {row['tokens_per_s']:.0f} tok/s ({row['supervised_per_s']:.0f} supervised){mfu} "
              f"| eta {eta / 60:.1f} min", flush=True)

    def inner_attack(self, step, r, losses, dnorm, seconds, **extra):
        self.write({"step": step, "phase": "inner_attack", "round": r, "attack_loss_start": losses[0],
                    "attack_loss_end": losses[-1], "attack_losses": losses, "delta_norm": dnorm, "seconds": seconds, **extra})
        if self.rank == 0:
            more = "".join(f" | {k} {v:.4g}" for k, v in extra.items())
            print(f"inner attack, round {r} | k1 {len(losses)} | loss {losses[0]:.4f} -> {losses[-1]:.4f} | "
                  f"|delta| {dnorm:.4f} | {seconds:.1f}s{more}", flush=True)


class RunError(RuntimeError):
    """A run that cannot go on as asked (a resume with other settings, a checkpoint that cannot be written)."""


# flags that do not change what a run computes: a resume may change them
NOT_RUN_SETTINGS = ("resume", "save_every", "out", "compile", "activation_checkpointing", "fused_adamw", "debug",
                    "peer_timeout")


def settings(args, world):
    return {**{k: v for k, v in vars(args).items() if k not in NOT_RUN_SETTINGS}, "world_size": world}


def start_run(args, out, model, optimizer, streams, world, rank, total, notes):
    """Fresh, or resumed from out/checkpoints/latest (a resume with other settings is refused, before
    anything is written). Writes config.json, prints the header; returns (step, delta, log)."""
    step, delta, offset = 0, None, None
    latest = out / "checkpoints" / "latest"
    if args.resume:
        delta_like = {n: torch.zeros_like(p) for n, p in model.named_parameters()} if args.mode == "patcher" else None
        step, delta, offset = load_checkpoint(out, model, optimizer, delta_like, streams, settings(args, world), rank)
    elif latest.exists():
        raise RunError(f"--out {out} holds a resumable run ({latest}): pass --resume to continue it, or another --out")
    device = model.lm_head.weight.device
    if rank == 0:
        write_config(out, args)
        for line in notes:
            print(line)
        print(f"mode {args.mode} | world {world} | {precision(device)} | {total} steps = warmup {args.warmup_steps} + "
              f"{args.rounds} rounds x k2 {args.defend_steps}" + (f" | inner attack k1 {args.inner_steps} at lr "
              f"{args.inner_lr:g}" if args.mode == "patcher" else "") + (f" | resumed at step {step}" if step else ""),
              flush=True)
    return step, delta, Log(out, rank, total, device, offset)


def write_config(out, args):
    """out/config.json: every resolved flag (written only once a resume has been accepted)."""
    (out / ".config.json.tmp").write_text(json.dumps(vars(args), indent=2) + "\n")
    os.replace(out / ".config.json.tmp", out / "config.json")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(out, step, model, optimizer, delta, streams, run_settings, log_offset, rank, keep=2):
    """Write out/checkpoints/step-XXXXXXX (torch.distributed.checkpoint: model, optimizer, delta; one JSON per
    rank: step, settings, data positions, RNG, the log's length; nothing is ever unpickled). It is written
    into a temporary directory and renamed once complete, then `latest` is switched to it: a crash at any
    point leaves the previous checkpoint intact and named by `latest`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    if not all_finite(model):
        raise FloatingPointError(f"step {step}: non-finite weights; checkpoint not written")
    root = out / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    np_state = np.random.get_state()
    state = {"step": step, "has_delta": delta is not None, "settings": run_settings, "metrics_bytes": log_offset,
             "data": {name: s.state_dict() for name, s in streams.items()},
             "rng": {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1]),
                     "numpy": [np_state[1].tolist(), int(np_state[2])]}}
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if delta is not None:
        sd["delta"] = delta
    try:
        dcp.save(sd, checkpoint_id=tmp)
        (tmp / f"state-rank{rank}.json").write_text(json.dumps(state))
    except (Exception, dcp.api.CheckpointException) as e:  # a full disk: an OSError, or dcp's own (a BaseException)
        cause = next(iter(getattr(e, "failures", {}).values()), e)  # dcp wraps each rank's error
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free
        raise RunError(f"could not write checkpoint {tmp}: {type(cause).__name__}: {str(cause).splitlines()[0][:200]} "
                       f"({free / 2**30:.2f} GiB free there); the previous checkpoint is intact") from None
    barrier()
    if rank == 0:
        if final.exists():  # left by a run killed before it switched `latest`, which never names it
            shutil.rmtree(final)
        os.rename(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    barrier()


def load_checkpoint(out, model, optimizer, delta_like, streams, run_settings, rank):
    """Restore in place from out/checkpoints/latest -> (step, delta or None, the log's length then). A run
    with other settings than the checkpoint's (flags, world size, mode) is refused, naming each change."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    root = out / "checkpoints"
    if not (root / "latest").exists():
        raise RunError(f"--resume: no checkpoint in {root} (nothing was saved yet: see --save-every)")
    path = root / (root / "latest").read_text().strip()
    saved = json.loads((path / "state-rank0.json").read_text())["settings"]
    changed = [k for k in sorted(set(saved) | set(run_settings)) if saved.get(k) != run_settings.get(k)]
    if changed:
        flag = lambda k: k.replace("_", " ") if k == "world_size" else "--" + k.replace("_", "-")
        raise RunError("--resume: the checkpoint's run had " + ", ".join(
            f"{flag(k)} {saved.get(k)!r} (now {run_settings.get(k)!r})" for k in changed)
            + f"; resume with its settings ({path}), or start a new run in another --out")
    state = json.loads((path / f"state-rank{rank}.json").read_text())
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if state["has_delta"]:
        sd["delta"] = delta_like
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])
    for name, s in streams.items():
        s.load_state_dict(state["data"][name])
    rng = state["rng"]
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(rng["numpy"][0], dtype=np.uint32), rng["numpy"][1], 0, 0.0))
    random.setstate((3, tuple(rng["python"]), None))
    return state["step"], sd.get("delta"), state["metrics_bytes"]


# -----------------------------------------------------------------------------
# 5. The command line


FLOAT32_MAX = 3.4028234663852886e38  # beyond it torch's fp32 optimizer math overflows


def number(cast, low=None, high=None, above=False):
    """An argparse type: a finite (fp32) number >= low (> low with above) and <= high; else a usage error naming
    the flag."""
    def parse(text):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'}, got {text!r}")
        bad = not abs(v) <= FLOAT32_MAX or (low is not None and (v <= low if above else v < low)) or (high is not None and v > high)
        if bad:
            rule = " and ".join(r for r in (f"{'>' if above else '>='} {low}" if low is not None else "",
                                            f"<= {high}" if high is not None else "") if r)
            raise argparse.ArgumentTypeError(f"must be a finite number {rule}, got {text}")
        return v
    return parse


COUNT, POSITIVE_COUNT = number(int, 0), number(int, 1)
RATE, NONNEGATIVE, FRACTION = number(float, 0, above=True), number(float, 0), number(float, 0, 1)


def get_parser():
    p = argparse.ArgumentParser(
        description="Patcher: alignment that survives fine-tuning attacks. Without --model it runs the built-in "
                    "demo, which prepends its own small flags: " + " ".join(DEMO_FLAGS) + ". The defaults below "
                    "are a small, fast setting for trying the method on a real model, NOT the paper's (loop 1: "
                    "1,000 SFT steps; then 14 rounds of k1 300 / k2 1,000, fresh AdamW each round, global batches "
                    "4 / 2): PRESET=paper ./train.sh runs those.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="Hugging Face checkpoint directory (none: the built-in demo)")
    g.add_argument("--safe-data", help="D_safe: harmful prompt -> refusal (.json/.jsonl[.gz|.xz]/.csv)")
    g.add_argument("--unsafe-data", help="D_unsafe: harmful prompt -> harmful answer, for the inner attack")
    g.add_argument("--safe-format", choices=data.FORMATS, default="auto", help="layout of --safe-data")
    g.add_argument("--unsafe-format", choices=data.FORMATS, default="auto", help="layout of --unsafe-data")
    g.add_argument("--retain-data", help="benign prompt -> answer for the optional retain term (see --retain-weight)")
    g.add_argument("--prompt-field", default="prompt", help="prompt field of the records")
    g.add_argument("--response-field", default="response", help="response field of the records")
    g.add_argument("--system-prompt", default=data.PAPER_SYSTEM_PROMPT, help="system prompt of every conversation ('' for the template's own)")
    g.add_argument("--max-len", type=number(int, 2), default=4096, help="tokens per example; longer ones keep their first max-len")
    g = p.add_argument_group("algorithm")
    g.add_argument("--mode", choices=["sft", "patcher"], default="patcher",
                   help="sft: the baseline (alpha = 0, no inner attack, same steps); patcher: the sequential schedule")
    g.add_argument("--alpha", type=FRACTION, default=0.5, help="weight of the attacked loss L(theta + delta)")
    g.add_argument("--warmup-steps", type=COUNT, default=100, help="plain SFT steps on D_safe before the first round")
    g.add_argument("--rounds", type=POSITIVE_COUNT, default=5, help="M: rounds of (inner attack, k2 defender steps)")
    g.add_argument("--inner-steps", type=POSITIVE_COUNT, default=200, help="k1: steps of each inner attack")
    g.add_argument("--defend-steps", type=POSITIVE_COUNT, default=100, help="k2: defender steps per round")
    g.add_argument("--reset-optimizer", action="store_true", help="a fresh defender AdamW every round (the official code)")
    g.add_argument("--retain-weight", type=NONNEGATIVE, default=0.0,
                   help="weight of the retain loss on --retain-data at theta (0: off, the paper's objective)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=RATE, default=1e-5, help="defender learning rate, constant")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.01, help="defender AdamW weight decay")
    g.add_argument("--max-grad-norm", type=NONNEGATIVE, default=1.0, help="defender grad-norm clipping (0: none)")
    g.add_argument("--batch-size", type=POSITIVE_COUNT, default=4, help="defender global batch: sequences per update, all ranks")
    g.add_argument("--inner-lr", type=RATE, default=1e-5, help="inner attack learning rate, constant")
    g.add_argument("--inner-weight-decay", type=NONNEGATIVE, default=0.01, help="inner attack AdamW weight decay")
    g.add_argument("--inner-max-grad-norm", type=NONNEGATIVE, default=1.0, help="inner attack grad-norm clipping (0: none)")
    g.add_argument("--inner-batch-size", type=POSITIVE_COUNT, default=4, help="inner attack global batch")
    g.add_argument("--micro-batch-size", type=POSITIVE_COUNT,
                   help="sequences per rank per forward pass; updates accumulate micro-batches (default: the batch over the ranks)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch sequences of similar length: less padding, but batches become homogeneous (refusals are "
                        "short), which changed what the demo learned; off in every preset")
    g.add_argument("--seed", type=COUNT, default=0, help="data order and the demo world")
    g = p.add_argument_group("system")
    g.add_argument("--out", default="runs/patcher", help="run directory: final/, config.json, metrics.jsonl, checkpoints/")
    g.add_argument("--save-every", type=COUNT, default=0, help="resumable checkpoint every N steps (0: never)")
    g.add_argument("--resume", action="store_true", help="continue from --out/checkpoints/latest (same settings)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="fused AdamW kernels (default: on CUDA)")
    g.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    return p


# The demo's preset: its own small values, prepended so that any flag given overrides them.
DEMO_FLAGS = ["--warmup-steps", "40", "--rounds", "8", "--inner-steps", "20", "--defend-steps", "20", "--lr", "5e-4",
              "--inner-lr", "5e-4", "--batch-size", "16", "--inner-batch-size", "16", "--max-len", "64"]


def parse_args(argv=None, parser=None):
    p = parser or get_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = p.parse_args(argv)
    if args.model is None:
        args = p.parse_args(DEMO_FLAGS + argv)
        if args.safe_data or args.unsafe_data or args.retain_data:
            p.error("--safe-data/--unsafe-data/--retain-data need --model (without it the demo runs on its toy world)")
    else:
        if not Path(args.model).is_dir():
            p.error(f"--model {args.model}: not a directory")
        if args.safe_data is None:
            p.error("--safe-data is required with --model")
        if args.mode == "patcher" and args.unsafe_data is None:
            p.error("--unsafe-data is required with --mode patcher")
    for flag in ("safe_data", "unsafe_data", "retain_data"):
        f = getattr(args, flag)
        if f is not None and not Path(f).is_file():
            p.error(f"--{flag.replace('_', '-')} {f}: no such file")
    if args.model is not None and args.retain_weight > 0 and args.retain_data is None:
        p.error("--retain-weight > 0 needs --retain-data")
    check_out_dir(p, args.out)
    if args.system_prompt == "":
        args.system_prompt = None
    return args


def check_out_dir(p, out):
    """--out must be a directory this process can write (checked before any work)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        p.error(f"--out {out}: cannot write there ({e.strerror})")


# The built-in demo: the toy world (data.py) written as data files, and a tiny Llama-architecture base
# model trained from scratch to comply with every request, saved as a Hugging Face checkpoint.
DEMO_CONFIG = dict(model_type="llama", vocab_size=len(data.TOY_VOCAB), hidden_size=64, intermediate_size=192,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32",
                   bos_token_id=1, eos_token_id=3, pad_token_id=0, architectures=["LlamaForCausalLM"])
# Measured on 2 CPU cores: with 4 K/V heads and a 200-step lr warmup the base model learns the per-topic
# mapping exactly (100% of held-out requests) within ~600 steps for every seed tried (0-6).
BASE_STEPS, BASE_WARMUP, BASE_LR, BASE_BATCH = 800, 200, 3e-3, 32


def make_demo(args, out, rank):
    """Rank 0 writes the toy world's splits to out/data/*.jsonl and trains the base model into out/base
    (reused if present: train.sh shares one base between a seed's SFT and Patcher runs); then every rank
    points the flags at them."""
    base = out / "base"
    if rank == 0:
        paths = data.write_toy_world(out / "data", args.seed)
        if not (base / data.ToyTokenizer.FILE).exists():
            print(f"demo: training a tiny base model ({BASE_STEPS} steps) to comply with every toy request -> {base}",
                  flush=True)
            torch.manual_seed(args.seed)
            model = Transformer(ModelConfig.from_hf(DEMO_CONFIG))
            model.init_weights()
            optimizer = make_optimizer(model.parameters(), BASE_LR)
            tok = data.ToyTokenizer()
            examples, _, _ = data.tokenize_records(tok, data.load_records(paths["base"], role="safe"), 64, None)
            batches = data.BatchIterator(examples, BASE_BATCH, seed=args.seed)
            t = time.time()
            for step in range(BASE_STEPS):
                for group in optimizer.param_groups:  # linear warmup: full-lr first steps can stall it on a plateau
                    group["lr"] = BASE_LR * min(1.0, (step + 1) / BASE_WARMUP)
                loss = sft_step(model, optimizer, next(batches))["loss"]
                if (step + 1) % 200 == 0:
                    print(f"demo: base model step {step + 1}/{BASE_STEPS} | loss {loss:.3f} | {time.time() - t:.0f}s", flush=True)
            tmp = out / ".base.tmp"
            save_model(model, tmp)
            (tmp / data.ToyTokenizer.FILE).write_text(json.dumps({"toy_world_seed": args.seed}) + "\n")
            shutil.rmtree(base, ignore_errors=True)
            os.rename(tmp, base)
    barrier()
    args.model, args.safe_data, args.unsafe_data = str(base), str(out / "data" / "safe.jsonl"), str(out / "data" / "unsafe.jsonl")
    if args.retain_weight > 0 and args.retain_data is None:
        args.retain_data = str(out / "data" / "retain.jsonl")


USER_ERRORS = (data.DataError, CheckpointError, RunError, FloatingPointError, OSError)


def main(run_fn=None, parse=parse_args):
    """Parse, run, and report a user error (bad data, a bad checkpoint, NaN, a refused resume, a full disk)
    as one line and exit code 1; tracebacks are for bugs (or --debug / PATCHER_DEBUG=1)."""
    args = parse()
    try:
        (run_fn or run)(args)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("PATCHER_DEBUG"):
            raise
        stop = " (stopped before the update; the last checkpoint and export are intact)" if isinstance(e, FloatingPointError) else ""
        print(f"error: {e}{stop}", file=sys.stderr, flush=True)
        exit_now(1)
    exit_now(0)


def exit_now(code):
    """End the process. Under torchrun skip the interpreter's teardown: gloo's threads sometimes abort it
    ("terminate called without an active exception", about 1 run in 10 here), which would turn a finished
    run into a failed one, and a peer that is gone can block the process group's destruction."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "RANK" in os.environ or dist.is_initialized():
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
