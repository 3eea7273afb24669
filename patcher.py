"""
Patcher: keep an LLM's safety alignment through a full-parameter fine-tuning attack, beside the alignment-stage
defenses it is compared with (SFT, Vaccine, Booster).

    python patcher.py                                # the built-in demo: a tiny model in a toy world, CPU
    torchrun --nproc_per_node=8 patcher.py --model Qwen2.5-1.5B-Instruct \
        --safe-data d_safe.jsonl --unsafe-data d_unsafe.jsonl --out runs/qwen
    python patcher.py --mode vaccine                 # another defense on the same schedule (--help lists them)
    torchrun --nproc_per_node=8 parallel.py ...      # Patcher's parallel schedule, built on this file

The algorithm, as run() below runs it (theta: the weights; L: the mean next-token loss on D_safe):

    theta <- --warmup-steps steps of plain SFT on D_safe
    for round in range(M):                                        # M = --rounds
        delta = inner_attack(theta)    # k1 = --inner-steps steps of SFT on D_unsafe, minus theta; theta restored
        for k2 steps:                                             # k2 = --defend-steps
            theta <- AdamW step on  alpha * L(theta + delta) + (1 - alpha) * L(theta),  delta fixed (first order)

--mode picks the defender's update (section 2, DEFENSES); the schedule is the same for all, so every defense of a
comparison takes the same steps on the same data. sft: the baseline (alpha = 0, no inner attack). vaccine and booster:
the alignment-stage defenses of Huang et al. 2024, with no inner attack. The file reads top to bottom:
  1. the loss and the pieces: sft_step, moved(), the attacker (Attacker; attack, inner_attack)
  2. the defenses: one update function each (clean_step plain SFT's, defender_step Patcher's), and DEFENSES
  3. run(): the schedule above
  4. setup: distributed, FSDP2, data, optimizer
  5. the run's bookkeeping: Training (the log, resumable checkpoints, resume), kept out of run()
  6. the command line: flags, the built-in demo, main()
"""
if __name__ == "__main__":  # a program: a Ctrl-C or SIGTERM while the imports below load (torch takes seconds) is
    import os, signal       # reported as well, before main() installs its own handlers

    def starting(signum, frame):
        if os.environ.get("RANK", "0") == "0":
            os.write(2, f"interrupted{' by SIGTERM' if signum == signal.SIGTERM else ''} while starting; nothing was "
                        f"written: run the same command again\n".encode())
        os._exit(128 + signum)  # as a shell reports it: 130 for Ctrl-C, 143 for SIGTERM
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, starting)

import argparse
import copy
import difflib
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError

import data
from model import (DTYPES, CheckpointError, ModelConfig, Transformer, all_finite, checkpoint_files, compile_blocks,
                   load_model, read_config, save_model)

# -----------------------------------------------------------------------------
# 1. The loss and the pieces
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


# A GPU runs what the host queues, later. Every read of a device number on the host (.item(), .tolist(), float(),
# bool(), an `if` on a tensor), every result whose shape depends on the data (a boolean mask), and every copy of
# host memory that is not pinned makes the host wait until the device has run out of work: the queue drains, and
# the next kernels start only once the host has queued them. So an update reads its numbers once, at its end, and
# everything the host knows about a batch (which positions are scored, their targets, the token counts) is worked
# out on the host from the CPU batch and sent ahead without waiting. tests/test_host_syncs.py counts the waits.


def to_device(t, device):
    """The host tensor `t` (the CPU batch, numbers made from it) on `device`, queued without a wait: the copy goes
    from pinned (page-locked) memory, non_blocking; from pageable memory it would wait. On a CPU run it is already
    there (and pin_memory() needs a GPU build)."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def read(numbers):
    """{name: 0-dim tensor on the device} -> {name: float}, in one transfer: the update's one wait for the device."""
    values = torch.stack([v.detach().double() for v in numbers.values()]).tolist()
    return dict(zip(numbers, values))


def forward_backward(model, batch, scale=1.0, backward=True):
    """Accumulate scale * grad of the loss on `batch` into .grad (backward=False only evaluates).
    Returns {"loss", "tokens", "supervised", "flops"}: the loss and the global counts of token slots (padding
    included), supervised tokens and model flops (for throughput and MFU), as 0-dim float64 tensors on the model's
    device, not read here (the update reads all its numbers at once: read(); float(x) reads one)."""
    micro = batch if isinstance(batch, list) else [batch]
    group = process_group(model)
    world = dist.get_world_size(group) if group is not None else 1
    device = model.lm_head.weight.device
    # The positions the loss scores (t predicts token t + 1), their targets and the counts come from the CPU labels,
    # on the host: scored is (N,) flat indices into the (B, T) positions of each micro-batch
    scored = [F.pad(m["labels"][:, 1:] != data.IGNORE_INDEX, (0, 1)).flatten().nonzero().squeeze(1) for m in micro]
    flops = sum(m["input_ids"].numel() * model.flops_per_token(m["input_ids"].shape[1], backward) for m in micro)
    counts = torch.tensor([sum(len(s) for s in scored), sum(m["input_ids"].numel() for m in micro), flops],
                          dtype=torch.float64)
    supervised, tokens, flops = all_sum(to_device(counts, device), group)
    loss_sum = torch.zeros((), device=device)
    for m, positions in zip(micro, scored):
        targets = m["labels"].flatten()[positions + 1]  # the token after each scored position (never past its row)
        idx, positions, targets = (to_device(t, device) for t in (m["input_ids"], positions, targets))
        with nullcontext() if backward else torch.no_grad():
            logits = model(idx, only=positions)  # (N, vocab): only where the loss looks
            loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        if backward:
            # FSDP2 averages gradients over ranks; scaling by world makes the result the global mean
            (loss * (scale * world / supervised)).backward()
        loss_sum += loss.detach()
    if not backward and hasattr(model, "reshard"):
        model.reshard()  # FSDP2 keeps the root unsharded after a forward with no backward to follow
    return {"loss": all_sum(loss_sum, group) / supervised, "tokens": tokens, "supervised": supervised, "flops": flops}


def check_finite(value, what):
    """Stop before the update: one NaN would spread to every weight."""
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} is {value}")


def clip_and_step(model, optimizer, max_grad_norm, numbers, checked, more=None):
    """Clip the global gradient norm (0: no clipping; the norm is still reported), read `numbers` ({key: 0-dim
    device tensor}), the norm and `more` on the host at once (read()), and update, unless one of them is not
    finite: `checked` ({key: its name in the error}, in the order checked), then the gradient norm. Then the
    gradients are dropped and the first non-finite one named, before the step. Returns {key: float}."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    values = read({**numbers, "grad_norm": norm, **(more or {})})
    for key, what in {**checked, "grad_norm": "the gradient norm"}.items():
        if not math.isfinite(values[key]):
            optimizer.zero_grad(set_to_none=True)
            check_finite(values[key], what)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values


def sft_step(model, optimizer, batch, max_grad_norm=1.0):
    """One plain SFT update on `batch`."""
    return clip_and_step(model, optimizer, max_grad_norm, forward_backward(model, batch), {"loss": "the loss"})


def sft_steps(model, optimizer, batches, steps, max_grad_norm=1.0, first=1, should_stop=None):
    """`steps` SFT updates on the stream `batches`: the loop of every attack (Attacker.steps below). Returns the loss
    of each step, or None as soon as should_stop(), asked before each step, is true. A non-finite loss or gradient
    stops it with its step named (numbered from `first`)."""
    losses = []
    for i in range(first, first + steps):
        if should_stop is not None and should_stop():
            return None
        try:
            losses.append(sft_step(model, optimizer, next(batches), max_grad_norm)["loss"])
        except FloatingPointError as e:
            raise FloatingPointError(f"attack step {i}: {e}") from None
    return losses


def local(tensors):
    """This rank's part of each tensor, as a list: a DTensor's local shard (FSDP2), a plain tensor itself. A
    torch._foreach_ op on these lists is a few kernels for all the weights, not one DTensor dispatch per weight."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


@torch.no_grad()
def snapshot(model, into=None):
    """A copy of this rank's part of every parameter (one extra sharded copy of theta), written
    into the buffers of an earlier snapshot `into` when given, so that no new memory is allocated."""
    if into is None:
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    names, params = zip(*model.named_parameters())
    torch._foreach_copy_(local(into[n] for n in names), local(params))
    return into


@torch.no_grad()
def restore(model, saved):
    names, params = zip(*model.named_parameters())
    torch._foreach_copy_(local(params), local(saved[n] for n in names))


@contextmanager
def moved(model, direction, scale=1.0, theta_buffer=None, exact=True):
    """Inside: the weights are theta + scale * direction ({name: tensor}, sharded like the parameters), for a loss
    at moved weights (Patcher's L(theta + delta), Booster's harmful loss a step away). `scale`: a number, or a 0-dim
    tensor on the device (Booster's -alpha / |g|, never read on the host). On the way out theta is restored
    *exactly*, from a copy: subtracting again would round, and in bf16 each such round trip moves the weights by
    about one AdamW step. `theta_buffer` (from snapshot()) is reused for the copy when given. exact=False subtracts
    instead, as the official code does (--precision bf16-pure reproduces it: EXACT_RESTORE); then a non-finite
    direction leaves non-finite weights behind, as there (the update stops before its step all the same)."""
    names = [n for n, _ in model.named_parameters()]
    d = local(direction[n] for n in names)
    theta = snapshot(model, into=theta_buffer) if exact else None
    with torch.no_grad():
        p = local(model.parameters())
        if not isinstance(scale, torch.Tensor):
            torch._foreach_add_(p, d, alpha=scale)
        elif exact:  # theta + scale * direction, with theta's copy as the addend: no temporary the size of theta
            torch._foreach_copy_(p, d)
            torch._foreach_mul_(p, scale)
            torch._foreach_add_(p, local(theta[n] for n in names))
        else:
            torch._foreach_add_(p, torch._foreach_mul(d, scale))
    try:
        yield
    finally:
        with torch.no_grad():
            p = local(model.parameters())  # afresh: FSDP2 may move a shard's storage in its first forward
            if exact:
                restore(model, theta)
            elif isinstance(scale, torch.Tensor):
                torch._foreach_sub_(p, torch._foreach_mul(d, scale))  # the same products as on the way in
            else:
                torch._foreach_sub_(p, d, alpha=scale)


def sum_of_squares(tensors, group=None):
    """The sum of the squares of every entry of `tensors`, sharded over `group` (or whole): local sums, summed over
    it. A 0-dim fp32 tensor on their device: nothing is read on the host."""
    norms = torch._foreach_norm(local(tensors), 2, dtype=torch.float32)
    return all_sum(torch.stack(norms).square().sum(), group)


def global_norm(tensors, group=None):
    """The L2 norm of a dict of tensors sharded over `group` (or whole), read on the host (for the log)."""
    return sum_of_squares(tensors.values(), group).item() ** 0.5


def make_optimizer(params, lr, weight_decay=0.01, fused=None):
    """AdamW with torch's defaults but the learning rate (constant: no schedule), fused on CUDA unless
    fused=False (one kernel for all parameters instead of several per parameter)."""
    params = list(params)
    if fused is None:
        fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


class Attacker(NamedTuple):
    """The attacker: SFT steps on harmful data with an optimizer of its own, made fresh for each attack and thrown
    away after it (AdamW's two moment buffers are an attack's main memory cost). Every attack is this one: Patcher's
    inner attack (attack() below), parallel.py's attacker half (the same attack()) and eval.py's test-time attack,
    which steps one optimizer in slices between its evaluation points. Its fields are its settings: NAME is the flag
    --inner-NAME of patcher.py and parallel.py (INNER_FLAGS) and, where eval.py has one, --attack-NAME of eval.py
    (from_flags; without it the default here). Another attacker is an edit here: a field, its --inner- flag, and
    where it acts (new_optimizer, steps)."""
    lr: float
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still reported)
    # (a new attacker setting goes here)

    @classmethod
    def from_flags(cls, args, prefix):
        """The attacker the flags `prefix`NAME describe: "inner_" (patcher.py, parallel.py), "attack_" (eval.py)."""
        return cls(**{f: getattr(args, prefix + f) for f in cls._fields if hasattr(args, prefix + f)})

    def new_optimizer(self, params, fused=None):
        """A fresh optimizer over `params` (the weights, or eval.py's LoRA factors): AdamW at the constant lr, with
        weight_decay (make_optimizer)."""
        params = list(params)
        # (another optimizer goes here)
        return make_optimizer(params, self.lr, self.weight_decay, fused)

    def steps(self, model, optimizer, batches, n, first=1, should_stop=None):
        """n updates on the stream `batches` with `optimizer` (from new_optimizer), clipped at max_grad_norm: the
        loss of each step, or None if should_stop() said stop (sft_steps)."""
        return sft_steps(model, optimizer, batches, n, self.max_grad_norm, first, should_stop)


# the inner attack's flags (--mode patcher): its length, its batch and the attacker's settings
INNER_FLAGS = ("inner_steps", "inner_batch_size", *("inner_" + f for f in Attacker._fields))


def attack(model, batches, args, should_stop=None):
    """The inner attack's attacker: k1 = --inner-steps steps of the Attacker of the --inner- flags, in place, on the
    D_unsafe stream `batches`, with a fresh optimizer thrown away afterwards. Both schedules attack with this one
    function (inner_attack below; parallel.py's attacker half). Returns the loss of each step, or None if
    should_stop() said stop (see sft_steps)."""
    attacker = Attacker.from_flags(args, "inner_")
    optimizer = attacker.new_optimizer(model.parameters(), args.fused_adamw)
    return attacker.steps(model, optimizer, batches, args.inner_steps, should_stop=should_stop)


def inner_attack(model, batches, args, theta_buffer=None):
    """Patcher's inner attack: attack() from the current theta. Returns (delta, losses): the attack vector
    delta = theta_att - theta as {name: tensor}, named as model.named_parameters() and sharded like them, and the
    loss of every attack step. The parameters end bitwise as they started: copied back, never recomputed as
    theta_att - delta. `theta_buffer` (from snapshot()) is reused for the copy of theta when given."""
    theta = snapshot(model, into=theta_buffer)
    losses = attack(model, batches, args)
    with torch.no_grad():
        delta = {n: p.detach() - theta[n] for n, p in model.named_parameters()}
    restore(model, theta)
    return delta, losses


# -----------------------------------------------------------------------------
# 2. The defenses: one update function each, with one signature
#
#     update(model, optimizer, batch, args, delta=None, theta_buffer=None) -> metrics
#
# batch: this step's Batches: a D_safe batch, a D_unsafe batch for the defenses that train against harmful data
# every step (Booster), a retain batch with --retain-weight. delta: the round's attack vector, for the defenses that
# have an inner attack (Patcher). args: the flags; each defense reads its own (Defense.reads). theta_buffer: a
# snapshot() reused for the copy of theta of a loss at moved weights. Each update accumulates its gradient, then
# finish() adds the optional retain term, clips, reads every number of the update at once (the numbers stay on the
# device until then) and takes the AdamW step. A new defense is a function here, its line in DEFENSES, its flags (an
# add_argument each, named in its Defense) and its test.


class Batches(NamedTuple):
    safe: list  # D_safe
    harmful: list | None = None  # D_unsafe, drawn every step for a defense with Defense.harmful
    retain: list | None = None  # benign answers for the retain term (--retain-data, --retain-weight > 0)


def finish(model, optimizer, passes, names, max_grad_norm, retain=None, retain_weight=0.0, more=None):
    """The end of every defense's update. `passes`: {metric: forward_backward result} of the passes it ran, their
    gradients accumulated in .grad; `names`: {metric: that loss's name in an error}, in the order they are checked;
    `more`: {metric: 0-dim device tensor} for other numbers it reports. The optional retain term (TAR's retain loss,
    Tamirisa et al. 2024) adds the gradient of the loss on a batch of benign prompt -> answer pairs at theta
    (`retain`, weighted; None or weight 0: nothing is computed); then clip_and_step() reads every number at once and
    steps if all are finite. Returns each pass's loss, their summed counts, the gradient norm and `more`, as floats."""
    if retain is not None and retain_weight > 0:
        passes["loss_retain"] = forward_backward(model, retain, scale=retain_weight)
        names = {**names, "loss_retain": "L_retain(theta)"}
    numbers = {k: p["loss"] for k, p in passes.items()}
    for k in ("tokens", "supervised", "flops"):
        numbers[k] = sum(p[k] for p in passes.values())
    return clip_and_step(model, optimizer, max_grad_norm, numbers, names, more)


def clean_step(model, optimizer, batch, max_grad_norm=1.0, retain=None, retain_weight=0.0):
    """One plain SFT update on a D_safe batch, on L(theta) [+ retain_weight * L_retain(theta)]: the warmup, the SFT
    baseline (sft_update), and Patcher's step while it has no attack vector (defender_step, alpha = 0)."""
    passes = {"loss_clean": forward_backward(model, batch)}
    return finish(model, optimizer, passes, {"loss_clean": "L(theta)"}, max_grad_norm, retain, retain_weight)


def defender_step(model, optimizer, batch, delta, alpha, max_grad_norm=1.0, theta_buffer=None, retain=None,
                  retain_weight=0.0, exact_restore=True):
    """Patcher's outer update on a D_safe batch, with gradient

        (1 - alpha) * grad L(theta) + alpha * grad L(theta + delta)  [+ retain_weight * grad L_retain(theta)]

    delta held fixed (first order); no delta yet (parallel.py's first steps) or alpha = 0 is a plain step
    (clean_step). The attacked loss is taken at moved weights, restored exactly after (moved(); by subtraction with
    exact_restore=False, as the official code). The losses stay on the device until finish() reads them, once, before
    the step."""
    if delta is None or alpha == 0:
        return clean_step(model, optimizer, batch, max_grad_norm, retain, retain_weight)
    passes = {"loss_clean": forward_backward(model, batch, scale=1 - alpha, backward=alpha < 1)}
    names = {"loss_clean": "L(theta)"}  # how an error names each loss that is not finite
    with moved(model, delta, theta_buffer=theta_buffer, exact=exact_restore):
        passes["loss_adv"] = forward_backward(model, batch, scale=alpha)
    names["loss_adv"] = "L(theta + delta)"
    metrics = finish(model, optimizer, passes, names, max_grad_norm, retain, retain_weight)
    metrics["gap"] = metrics["loss_adv"] - metrics["loss_clean"]
    return metrics


def sft_update(model, optimizer, batch, args, delta=None, theta_buffer=None):
    """Plain SFT on D_safe: the baseline, and every defense's warmup."""
    return clean_step(model, optimizer, batch.safe, args.max_grad_norm, batch.retain, args.retain_weight)


def patcher_update(model, optimizer, batch, args, delta=None, theta_buffer=None):
    """Patcher: alpha * L(theta + delta) + (1 - alpha) * L(theta) on D_safe, delta from the round's inner attack."""
    return defender_step(model, optimizer, batch.safe, delta, args.alpha, args.max_grad_norm, theta_buffer,
                         batch.retain, args.retain_weight, EXACT_RESTORE[args.precision])


@contextmanager
def attention_outputs(model, record=None, add=None):
    """Inside, on every forward pass of `model`: each block's attention output (the residual branch before it is added
    back) has its gradient stored in record[j][i] during backward (j: the forward pass inside, i: the block), or is
    shifted by add[j][i]. j counts the model's own forward calls, so activation checkpointing, which re-runs a
    block (not the model) in backward, finds its pass's perturbation. A perturbation is a constant: the gradient
    flows through it unchanged."""
    j, layers = -1, model.model.layers

    def count(module, inputs):
        nonlocal j
        j += 1
        if record is not None:
            record.append([None] * len(layers))

    def hook(i):
        def fn(module, inputs, out):
            if add is not None:
                return out + add[j][i]
            if out.requires_grad:
                out.register_hook(lambda g, j=j: record[j].__setitem__(i, g.detach()))
        return fn
    handles = [model.register_forward_pre_hook(count)]
    handles += [block.self_attn.register_forward_hook(hook(i)) for i, block in enumerate(layers)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


VACCINE_EPS = 1e-7  # added to the norm, as the official code does


def vaccine_update(model, optimizer, batch, args, delta=None, theta_buffer=None):
    """Vaccine (Huang et al. 2024, github git-disl/Vaccine, VaccineTrainer): perturbation-aware alignment. A first
    pass on the D_safe batch records g, the gradient of L(theta) with respect to every block's attention output; a
    second pass adds rho * g / ||g|| to those outputs (--vaccine-rho; one norm over all blocks, micro-batches and
    ranks), and its gradient updates the weights. The first pass's weight gradients are discarded."""
    grads = []
    with attention_outputs(model, record=grads):
        clean = forward_backward(model, batch.safe)
    optimizer.zero_grad(set_to_none=True)
    # the gradient of the global mean loss: forward_backward scaled each rank's loss by the world size (for FSDP2)
    group = process_group(model)
    world = dist.get_world_size(group) if group is not None else 1
    grads = [[g / world for g in micro] for micro in grads]
    norm = sum_of_squares((g for micro in grads for g in micro), group).double().sqrt()  # on the device, as all below
    scale = args.vaccine_rho / (norm + VACCINE_EPS)
    with attention_outputs(model, add=[[g * scale for g in micro] for micro in grads]):
        perturbed = forward_backward(model, batch.safe)
    return finish(model, optimizer, {"loss_clean": clean, "loss_perturbed": perturbed},
                  {"loss_clean": "L(theta)", "loss_perturbed": "L(theta) with perturbed attention"}, args.max_grad_norm,
                  batch.retain, args.retain_weight, more={"perturbation_grad_norm": norm})


BOOSTER_EPS = 1e-7  # added to the norm, as the official code does


def booster_update(model, optimizer, batch, args, delta=None, theta_buffer=None):
    """Booster (Huang et al. 2024, github git-disl/Booster, BoosterAlignmentTrainer): attenuate the harmful
    perturbation. With f the loss on the D_safe batch and h the loss on a D_unsafe batch,

        g = grad h(theta);  the update uses  grad f(theta) + lambda * (g - grad h(theta - alpha * g / ||g||))

    (--booster-lambda, --booster-alpha): it also lowers how much one normalised harmful step would reduce h. theta
    is restored exactly after the moved pass (moved()), where the official code adds the step back."""
    harmful = forward_backward(model, batch.harmful)
    params = dict(model.named_parameters())
    g = {n: p.grad for n, p in params.items()}  # taken out of .grad: the next pass accumulates afresh
    optimizer.zero_grad(set_to_none=True)
    norm = sum_of_squares(g.values(), process_group(model)).double().sqrt()  # on the device, as all below
    with moved(model, g, -args.booster_alpha / (norm + BOOSTER_EPS), theta_buffer, EXACT_RESTORE[args.precision]):
        stepped = forward_backward(model, batch.harmful)
    with torch.no_grad():
        # g - grad h(theta - alpha g / |g|)
        torch._foreach_sub_(local(g.values()), local(p.grad for p in params.values()))
    optimizer.zero_grad(set_to_none=True)
    clean = forward_backward(model, batch.safe)
    with torch.no_grad():
        torch._foreach_add_(local(p.grad for p in params.values()), local(g.values()), alpha=args.booster_lambda)
    del g
    passes = {"loss_clean": clean, "loss_harmful": harmful, "loss_harmful_stepped": stepped}
    names = {"loss_harmful": "h(theta)", "loss_harmful_stepped": "h(theta - alpha g / |g|)", "loss_clean": "f(theta)"}
    return finish(model, optimizer, passes, names, args.max_grad_norm, batch.retain, args.retain_weight,
                  more={"harmful_grad_norm": norm})


class Defense(NamedTuple):
    update: Callable  # one update step, with the signature above
    phase: str  # its name in the log (Patcher's "defend": the paper's defender steps)
    help: str  # what it is, in --mode's help (which adds its own flags)
    attacks_each_round: bool = False  # an inner attack each round gives it the attack vector delta (and INNER_FLAGS)
    harmful: bool = False  # it draws a D_unsafe batch (--batch-size) every step (its own stream: harmful_stream)
    flags: tuple = ()  # its own flags (argparse dests): given with another --mode, a usage error
    moves_theta: bool = False  # it takes a loss at moved weights: one copy of theta, reused every step
    hooks_blocks: bool = False  # it hooks into the blocks, which torch.compile'd blocks would skip: no --compile

    def reads(self):
        """Every flag only some modes read that this one does: its own, the inner attack's where it has one, and
        D_unsafe's where it reads D_unsafe."""
        unsafe = UNSAFE_FLAGS if self.attacks_each_round or self.harmful else ()
        return (*self.flags, *(INNER_FLAGS if self.attacks_each_round else ()), *unsafe)


UNSAFE_FLAGS = ("unsafe_data", "unsafe_format")
DEFENSES = {  # --mode: the defenses, by name
    "sft": Defense(sft_update, "sft", "the baseline, plain SFT on D_safe (alpha = 0, no inner attack)"),
    "patcher": Defense(patcher_update, "defend", "alpha * L(theta + delta) + (1 - alpha) * L(theta), delta from an "
                       "inner attack on D_unsafe each round", attacks_each_round=True, moves_theta=True, flags=("alpha",)),
    "vaccine": Defense(vaccine_update, "vaccine", "Vaccine, perturbation-aware alignment", hooks_blocks=True,
                       flags=("vaccine_rho",)),
    "booster": Defense(booster_update, "booster", "Booster, attenuating a harmful perturbation on D_unsafe",
                       harmful=True, moves_theta=True, flags=("booster_lambda", "booster_alpha")),
    # (a new defense goes here)
}


# -----------------------------------------------------------------------------
# 3. The schedule


def run(args):
    """The algorithm box (module docstring) for every defense: the warmup, then --rounds rounds of the inner attack
    (for the defenses that have one) and k2 defender steps. Training keeps the bookkeeping out of this loop: it
    logs and checkpoints every step, and a resumed run re-enters where it stopped (train() skips the steps taken,
    new_round() is false for a round begun before the checkpoint, whose attack vector the checkpoint holds)."""
    t = Training(args)  # distributed, model, data, optimizer, out/ (resumed from its checkpoint with --resume)
    defense = t.defense
    t.train(args.warmup_steps, "warmup", sft_update)  # plain SFT on D_safe
    for r in range(args.rounds):
        if t.new_round(r):
            t.delta = None  # free the last round's attack vector before the attack allocates the next
            if args.reset_optimizer:  # a fresh AdamW every round, as the official code's new process per round; made
                # now, its moments come at its first step: the attack runs without the old ones (8 bytes per weight)
                t.optimizer = make_optimizer(t.model.parameters(), args.lr, args.weight_decay, args.fused_adamw)
            if defense.attacks_each_round:  # delta = theta_att - theta: k1 steps of SFT on D_unsafe from theta
                t.delta = t.attack_round(r)
        t.train(args.defend_steps, defense.phase, defense.update, r)
    t.export()


# -----------------------------------------------------------------------------
# 4. Setup: distributed, FSDP2, data, optimizer


COLLECTIVE_TIMEOUT = 3600.0  # seconds: --collective-timeout's default


def init_distributed(precision="fp32", timeout=COLLECTIVE_TIMEOUT):
    """(rank, world_size, device). Under torchrun: NCCL on CUDA, gloo on CPU. Plain `python`: one process,
    which on CUDA, or in bf16 on the CPU, still gets a one-rank process group, so that FSDP2's mixed precision
    (the one precision policy) holds at every world size. Only a CPU run in fp32 stays a plain module.

    `timeout` (--collective-timeout) bounds every collective: a rank that waits longer for the others ends with an
    error. NCCL's own default, 10 minutes (gloo's: 30), is shorter than what the ranks legitimately wait for while one
    of them works alone: the DCP write of an 8B run's checkpoint (~100 GB with AdamW and delta) and its checksums on
    network storage, rank 0's export, loading the Llama Guard judge."""
    timeout = timedelta(seconds=timeout)
    if "RANK" in os.environ:
        if torch.cuda.is_available():
            local = int(os.environ["LOCAL_RANK"])
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
            return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local)
        dist.init_process_group("gloo", timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0),
                                timeout=timeout)
        return 0, 1, torch.device("cuda", 0)
    if precision == "bf16":
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return 0, 1, torch.device("cpu")


# --precision: what the forward and backward compute in. Master weights, gradients and AdamW's state are fp32 in
# fp32 and bf16: an AdamW update at lr 1e-5 is below bf16's resolution for most weights. bf16 is FSDP2's policy and
# nothing else (no autocast on top): the parameters stay fp32 DTensors, FSDP casts each block's shard to bf16 before
# its all-gather and reduces the gradients in fp32. So snapshot/restore and theta + delta act on fp32 master weights.
# bf16-pure is the other regime, on purpose: the weights themselves are bf16, and so are their gradients and AdamW's
# moments (no fp32 copy anywhere), and theta is restored after L(theta + delta) by subtracting delta. That is what the
# official code does under transformers 5, whose from_pretrained loads a bf16 checkpoint as bf16 (README: Differences).
PRECISIONS = {"fp32": "fp32",
              "bf16": "bf16 compute over fp32 master weights, fp32 gradient reduction (FSDP2 MixedPrecisionPolicy)",
              "bf16-pure": "bf16 weights, gradients and AdamW state (no fp32 master copy), theta restored by "
                           "subtraction: the official code under transformers 5"}
EXACT_RESTORE = {"fp32": True, "bf16": True, "bf16-pure": False}  # theta after a moved loss: copied back, or by subtraction


def bf16_unavailable():
    """Why this machine cannot train in bf16 (None if it can): a GPU without bf16 arithmetic (before Ampere), or a
    torch without bf16 CPU kernels (a tiny matmul, forward and backward, is tried)."""
    if torch.cuda.is_available():
        return (None if torch.cuda.is_bf16_supported(including_emulation=False) else
                f"{torch.cuda.get_device_name()} has no bf16 arithmetic")
    try:
        w = torch.ones(4, 4, dtype=torch.bfloat16, requires_grad=True)
        (w @ w).sum().backward()
    except RuntimeError as e:
        return f"torch {torch.__version__} cannot compute in bf16 on this CPU ({describe(e)})"
    return None


def default_precision():
    """bf16 on a CUDA GPU that has it, else fp32; on the CPU bf16 is there when asked for."""
    return "bf16" if torch.cuda.is_available() and bf16_unavailable() is None else "fp32"


def precision_flag(text):
    """The argparse type of --precision: a usage error naming the flag, before any work, where bf16 cannot run."""
    if text not in PRECISIONS:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(PRECISIONS)})")
    why = bf16_unavailable() if text.startswith("bf16") else None
    if why:
        raise argparse.ArgumentTypeError(f"bf16 cannot run here: {why}; use --precision fp32")
    return text


def precision(name):
    """The log header's words for --precision `name`."""
    return PRECISIONS[name]


def fsdp_sharder(precision="fp32", mesh=None):
    """FSDP2 the torchtitan way: fully_shard each block, then the root. bf16: compute in bf16 over fp32 master
    weights, reduce gradients in fp32; fp32: everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else MixedPrecisionPolicy())

    def shard(model):
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return shard


def build_model(path, device, args, mesh=None):
    """The checkpoint in fp32 master weights (bf16 ones with --precision bf16-pure), FSDP2-sharded whenever there is a
    process group (always in bf16: init_distributed gives a single process a one-rank group), computing in
    --precision."""
    if args.precision == "bf16" and not dist.is_initialized():
        raise RunError("--precision bf16 is FSDP2's mixed precision: call init_distributed('bf16') first")
    shard = fsdp_sharder(args.precision, mesh) if dist.is_initialized() else None
    dtype = torch.bfloat16 if args.precision == "bf16-pure" else torch.float32
    model = load_model(path, device=device, dtype=dtype, shard=shard)
    model.activation_checkpointing = args.activation_checkpointing
    if args.compile:
        compile_blocks(model)
    return model


def export_dtype(args):
    """final/'s dtype: the checkpoint's own storage dtype (None), or --export-dtype."""
    return None if args.export_dtype == "checkpoint" else DTYPES[args.export_dtype]


def stream_sets(args):
    """[(stream, file, format, global batch)] of a run's data streams: D_safe; D_unsafe for the inner attack
    (--inner-batch-size) and for a defense's batch each step (--batch-size), named "unsafe", and when a defense has
    both, the every-step one a stream of its own, "harmful" (harmful_stream); the retain set, if any. A stream's
    seed is --seed plus its place here."""
    defense = DEFENSES[args.mode]
    sets = [("safe", args.safe_data, args.safe_format, args.batch_size)]
    if defense.attacks_each_round:
        sets.append(("unsafe", args.unsafe_data, args.unsafe_format, args.inner_batch_size))
    if defense.harmful:
        sets.append(("harmful" if defense.attacks_each_round else "unsafe", args.unsafe_data, args.unsafe_format,
                     args.batch_size))
    if args.retain_data and args.retain_weight > 0:
        sets.append(("retain", args.retain_data, "auto", args.batch_size))
    return sets


def harmful_stream(streams):
    """The stream of a defense's D_unsafe batch each step (Defense.harmful): its own beside an inner attack's."""
    return streams["harmful"] if "harmful" in streams else streams["unsafe"]


def load_data(args, rank, world, context=None):
    """Endless, resumable batch streams (stream_sets: D_safe, D_unsafe for the defenses that use it, the retain set if
    any), each rank taking its share of every global batch; and a line about each set for the log."""
    tok = data.load_tokenizer(args.model)
    sets = stream_sets(args)
    # an example longer than the model's context is cut there too (its positions have no rotary angles beyond it)
    max_len = min(args.max_len, context or args.max_len)
    limit = f"--max-len {max_len}" if max_len == args.max_len else f"the model's context {max_len}"
    streams, notes = {}, []
    for i, (name, path, fmt, batch) in enumerate(sets):
        role = "unsafe" if name == "harmful" else name  # D_unsafe read as D_unsafe
        records = data.load_records(path, args.prompt_field, args.response_field, fmt, role=role,
                                    field_flags="--prompt-field/--response-field")
        examples, n_cut, n_dropped, longest = data.tokenize_records(tok, records, max_len, args.system_prompt,
                                                                    args.loss_mask)
        dropped = f", {n_dropped} of them dropped: the answer starts past {limit}" if n_dropped else ""
        if len(examples) < batch:  # BatchIterator would refuse too, naming neither the file nor the cause
            raise data.DataError(f"{path}: {len(examples)} of {len(records)} records left to train on"
                                 + (f" ({n_dropped} dropped: the answer starts past {limit})" if n_dropped
                                    else "") + f", too few for one global batch of {batch}")
        micro = min(args.micro_batch_size or batch, -(-batch // world))
        streams[name] = data.BatchIterator(examples, batch, rank, world, micro, seed=args.seed + i, pad_id=tok.pad_id,
                                           group_by_length=args.group_by_length)
        s = streams[name]
        notes.append(f"{name}: {path}: {len(records)} records, longest {longest} tokens, {n_cut} truncated at "
                     f"{limit}{dropped} | global batch {batch} = {s.accum} x {world} ranks x {s.micro}"
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
# The memory plan: what one rank holds at its peak, from config.json alone (no weight is read)
#
# --plan prints it; every run compares it with the device's free memory before it loads a weight and refuses in one
# line where it does not fit (--skip-memory-check runs anyway). A run's peak is the largest of its phases' (a warmup
# step, an inner attack step, a defender step, the export), not the sum of all it ever holds; a phase's peak is its
# largest moment (backward begins, the blocks' backward, the root's reduce-scatter, the AdamW step). Sizes are this
# rank's: FSDP2 shards every tensor's rows, padded to ceil(rows / world). tests/test_memory_plan.py checks plans
# against peaks measured on the CPU, and the activations against what autograd saves.

GiB = 2**30
PARTS = {  # every part of a plan, in the order printed, and why it is held
    "weights": "theta, this rank's shard: fp32 master weights (bf16 in bf16-pure)",
    "gradients": "one per weight, sharded, in the weights' dtype",
    "optimizer": "the defender's AdamW: two moments per weight (--reset-optimizer frees them before the inner attack)",
    "inner AdamW": "the attacker's AdamW: two moments per trainable weight, made for each attack",
    "θ copy": "theta_buffer: the copy of theta a loss at moved weights is restored from",
    "δ": "the attack vector, one per weight",
    "θ at the attack's start": "parallel --delta-ref start: the theta the attack in flight started from",
    "Booster's gradient": "g, the harmful gradient Booster holds through its other two passes",
    "Vaccine's perturbation": "the recorded attention-output gradients of every block, and their scaled copy",
    "unsharded blocks": "FSDP2: the block computing and the one prefetched, all-gathered in the compute dtype",
    "unsharded root": "FSDP2: embedding, lm_head and final norm, all-gathered through forward and backward",
    "unsharded gradients": "FSDP2: gradients before their reduce-scatter (a block's, lm_head's; the root's at the end)",
    "activations": "what autograd keeps for backward, at the stream's longest micro-batch (activation_bytes)",
    "logits and cross-entropy": "the scored positions' logits, their fp32 log-softmax and its gradient",
    "AdamW/clip temporaries": "the optimizer step's scratch (none when fused)",
    "LoRA factors": "eval.py --attack-kind lora: the factors, their gradients and AdamW moments, fp32, every rank",
    "LoRA inputs": "eval.py --attack-kind lora in bf16: each targeted layer's input, cast to fp32 for its factors",
    "export copy": "save_model: one shard file's tensors, gathered and converted to the export dtype",
    "inference copy": "eval.py: the unsharded model generation runs on, in --dtype, on every rank",
    "KV cache": "keys and values of a generation batch (and a copy of the keys when finished rows leave it)",
    "prefill": "a prompt batch's forward without autograd: one block's temporaries",
    "sampling buffers": "fp32 logits of a generation batch and their processed copies",
}


def param_shapes(cfg):
    """{name: shape} of the model's parameters (a tied lm_head listed once), from the model's own definition."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        return {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}


class Sizes(NamedTuple):
    """What the parts of a plan are made of: one model on one rank, sharded over `world` ranks, in one precision."""
    cfg: ModelConfig
    fsdp: bool  # FSDP2 (its unsharded copies count); False: a plain module (CPU, one process, fp32 or bf16-pure)
    staged: bool  # gloo (the CPU) stages every collective through a full-size copy (measured); NCCL does not
    w: int  # bytes of a weight, its gradient, an AdamW moment and a gradient in the reduce-scatter: 4 (bf16-pure: 2)
    c: int  # bytes of what the forward computes: activations, all-gathered weights (4 in fp32, 2 in bf16)
    params: int  # this rank's parameters (numel)
    largest: int  # this rank's largest tensor
    block: int  # one block's parameters, unsharded
    root: int  # the parameters outside the blocks, unsharded: embedding, lm_head (once if tied), final norm
    head: int  # lm_head's, unsharded
    total: int  # the model's parameters
    total_largest: int  # its largest tensor, unsharded


def model_sizes(cfg, shapes, world, precision, device_type, sharded=None):
    """Sizes at `world` ranks; sharded None: FSDP2 where init_distributed gives a process group (True: parallel.py's
    halves, always sharded over their mesh)."""
    local = [-(-s[0] // world) * math.prod(s[1:]) for s in shapes.values()]  # FSDP2 pads dim 0 to ceil(rows / world)
    numel = {n: math.prod(s) for n, s in shapes.items()}
    fsdp = sharded if sharded is not None else world > 1 or device_type == "cuda" or precision == "bf16"
    return Sizes(cfg, fsdp=fsdp, staged=fsdp and device_type == "cpu",
                 w=2 if precision == "bf16-pure" else 4, c=4 if precision == "fp32" else 2, params=sum(local),
                 largest=max(local), block=sum(v for n, v in numel.items() if n.startswith("model.layers.0.")),
                 root=sum(v for n, v in numel.items() if not n.startswith("model.layers.")),
                 head=cfg.vocab_size * cfg.hidden_size, total=sum(numel.values()), total_largest=max(numel.values()))


class Shape(NamedTuple):
    """The largest micro-batch of a stream on one rank: rows x tokens (padded), the positions scored (through lm_head),
    and the micro-batches of one update."""
    rows: int
    tokens: int
    scored: int
    accum: int = 1


class Lengths(NamedTuple):
    """What a stream's examples ask of memory: its global batch and --micro-batch-size, each example's tokens and scored
    positions (longest first), or None where no tokenizer could tell: then every row is planned `limit` tokens long.
    `source` says which, for the printout."""
    batch: int
    micro: int | None
    tokens: list | None
    scored: list | None
    limit: int
    source: str

    def shape(self, world):
        m = min(self.micro or self.batch, -(-self.batch // world))  # as load_data and BatchIterator deal a batch
        accum = -(-self.batch // (world * m))
        if self.tokens is None:
            return Shape(m, self.limit, m * (self.limit - 1), accum)
        return Shape(m, self.tokens[0], sum(self.scored[:m]), accum)  # the longest rows padded to the longest


def lengths_of(examples, batch, micro, limit, source):
    """Lengths of tokenized examples [(ids, mask)]: a position scores when the next token is supervised."""
    return Lengths(batch, micro, sorted((len(ids) for ids, _ in examples), reverse=True),
                   sorted((sum(mask[1:]) for _, mask in examples), reverse=True), limit, source)


def has_tokenizer(path):
    """Whether data.load_tokenizer finds a tokenizer in checkpoint directory `path`."""
    return path is not None and any((Path(path) / f).exists() for f in
                                    (data.ToyTokenizer.FILE, "tokenizer.json", *data.TIKTOKEN_FILES))


def stream_lengths(args, streams, context):
    """{stream: Lengths} of patcher.py's streams (load_data's), or of --max-len where the model has no tokenizer."""
    limit = min(args.max_len, context)
    if streams is None:
        why = "no tokenizer in --model" if args.model else "the demo's data is not written yet"
        return {n: Lengths(b, args.micro_batch_size, None, None, limit, f"--max-len {limit}: {why}")
                for n, _, _, b in stream_sets(args)}
    return {n: lengths_of(s.examples, s.batch_size, args.micro_batch_size, limit, "the longest example, tokenized")
            for n, s in streams.items()}


def activation_bytes(z, s, checkpointing=False):
    """Bytes autograd keeps for the backward of micro-batch `s`, as our model saves them (tests/test_memory_plan.py
    counts them with saved_tensors_hooks): per token of every block an RMSNorm twice (its input in fp32, the normalised
    x, their scaled product), attention (q and k after RoPE, v, the output; SDPA's fused kernels keep no T x T scores,
    only a logsumexp), qwen3's per-head norms, the MLP (gate, up, silu(gate), their product); then the token ids, the
    scored mask, the final norm and lm_head's input at the scored positions. A checkpointed block keeps its input,
    and one block at a time is recomputed."""
    cfg, c = z.cfg, z.c
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    heads = cfg.num_attention_heads + cfg.num_key_value_heads
    norm = (4 + 2 * c) * d + 4
    attention = 2 * heads * cfg.head_dim * c + 4 * cfg.num_attention_heads
    qk_norm = ((4 + c) * hd + 4) * heads if cfg.qk_norm else 0
    block = 2 * norm + attention + qk_norm + 4 * f * c
    final = 8 + 1 + (4 + c) * d + 4
    per_token = cfg.num_hidden_layers * (c * d if checkpointing else block) + final + (block if checkpointing else 0)
    return s.rows * s.tokens * per_token + s.scored * d * c


class Pass(NamedTuple):
    """One forward (and backward) of an update: its micro-batch, whether the update's gradients are held meanwhile (an
    earlier pass of the same update, or an earlier micro-batch), and parts held during this pass only."""
    shape: Shape
    after_grads: bool = False
    backward: bool = True
    extra: dict | None = None


def pass_moments(z, p, checkpointing, frozen=False):
    """The moments of a pass where memory peaks: as backward begins (the activations whole, the loss's buffers), in
    the blocks' backward (lm_head's gradient made, a block's gradients before their reduce-scatter), and as it ends
    (every gradient; FSDP2 reduce-scatters the root's last). `logits` stays referenced through backward. frozen: the
    weights take no gradient (eval.py's LoRA attack: its factors' are counted with them)."""
    s, fsdp = p.shape, z.fsdp and not frozen
    grads = 0 if frozen else z.params * z.w
    before = grads if p.after_grads or s.accum > 1 else 0
    logits = s.scored * z.cfg.vocab_size
    # FSDP2 all-gathers into a flat buffer, then copies out into the unsharded parameters (two copies for a moment),
    # and reduce-scatters a gradient from a copy in the reduce dtype; gloo stages each collective through one more
    stage = 1 if z.staged else 0
    gathered = {"unsharded blocks": (2 + stage) * z.block * z.c, "unsharded root": z.root * z.c} if z.fsdp else {}
    moments = [{"unsharded root": (2 + stage) * z.root * z.c, "gradients": before}] if z.fsdp else []
    if not p.backward:  # no_grad: logits, their fp32 copy and log-softmax
        return moments + [{**gathered, "gradients": before, "logits and cross-entropy": logits * (z.c + 8)}]
    acts = activation_bytes(z, s, checkpointing)
    reduced = z.c + (1 + stage) * z.w  # a gradient unsharded, in its reduce-scatter (and gloo's stage)
    return moments + [
        {**gathered, "gradients": before, "activations": acts, "logits and cross-entropy": logits * (z.c + 12)},
        {**gathered, "gradients": before + (0 if fsdp or frozen else z.head * z.w), "activations": acts,
         "logits and cross-entropy": logits * z.c, **({"unsharded gradients": z.head * z.c + z.block * reduced}
                                                      if fsdp else {})},
        {"gradients": grads, "logits and cross-entropy": logits * z.c,
         **({"unsharded gradients": z.root * reduced} if fsdp else {})}]


def step_peak(z, held, passes, temporaries, checkpointing, step_extra=None, frozen=False):
    """{part: bytes} at the peak of one update: `held` throughout, then each pass's moments, then the AdamW step
    (every gradient, the optimizer's scratch, `step_extra`)."""
    moments = [{**held, **(p.extra or {}), **m} for p in passes for m in pass_moments(z, p, checkpointing, frozen)]
    moments.append({**held, **(step_extra or {}), "gradients": 0 if frozen else z.params * z.w,
                    "AdamW/clip temporaries": temporaries})
    return max(moments, key=lambda m: sum(m.values()))


def adamw_temporaries(z, device_type, fused, trainable=None):
    """Scratch of an AdamW step (make_optimizer's): none fused (CUDA's default); on CUDA unfused, torch's foreach
    kernels take the square root of every second moment at once; on the CPU one tensor at a time (two of the largest).
    `trainable`: (numel, largest) of the trainable parameters when not all are (LoRA)."""
    params, largest = trainable or (z.params, z.largest)
    if fused if fused is not None else device_type == "cuda":
        return 0
    return params * 4 if device_type == "cuda" else 2 * largest * 4


def export_copy(z, dtype, device_type):
    """save_model on the rank that writes: each tensor gathered whole (FSDP2) and converted to the export dtype,
    a shard file's (5 GB) at a time kept in host memory; on a GPU only the tensor being gathered."""
    e = torch.empty((), dtype=dtype).element_size()
    if device_type == "cuda":
        return z.total_largest * z.w
    if not z.fsdp and e == z.w:  # a plain module exported in its own dtype: its tensors are written as they are
        return 0
    return min(z.total * e, 5 * 10**9 + z.total_largest * e) + (z.total_largest * z.w if e != z.w and z.fsdp else 0)


def generation_parts(cfg, rows, prompt, new_tokens, dtype, compiled=False):
    """What generation adds on every rank (eval.py; model.generate): the KV cache of `rows` prompts of up to `prompt`
    tokens and `new_tokens` more, preallocated, and eagerly a copy of its keys when finished rows leave the batch
    (KVCache.keep copies the keys, then the values); the prefill's temporaries (one block's: the residual, norms, the
    MLP's three intermediates; the attention scores of SDPA's math kernel, which a masked grouped-query attention may
    take: an upper bound); the fp32 logits of a batch and their processed copies (repetition penalty, top-k, top-p's
    sort with its int64 indices: about ten)."""
    e = torch.empty((), dtype=dtype).element_size()
    slots = prompt + new_tokens
    if compiled:
        slots = -(-slots // 64) * 64
    kv = 2 * cfg.num_hidden_layers * rows * cfg.num_key_value_heads * slots * cfg.head_dim * e
    prefill = rows * prompt * (4 * cfg.hidden_size + 3 * cfg.intermediate_size + cfg.num_attention_heads * slots) * e
    return {"KV cache": kv if compiled else kv * 3 // 2, "prefill": prefill,
            "sampling buffers": rows * cfg.vocab_size * 40}


def training_plan(args, cfg, shapes, lengths, world, device_type):
    """{phase: {part: bytes}} of patcher.py's run at `world` ranks, each phase at its peak moment."""
    z = model_sizes(cfg, shapes, world, args.precision, device_type)
    defense, ckpt = DEFENSES[args.mode], args.activation_checkpointing
    theta = z.params * z.w  # one sharded copy of theta
    held = {"weights": theta, "optimizer": 2 * theta, **({"θ copy": theta} if defense.moves_theta else {})}
    temps = adamw_temporaries(z, device_type, args.fused_adamw)
    safe = lengths["safe"].shape(world)
    retain = [Pass(lengths["retain"].shape(world), after_grads=True)] if "retain" in lengths else []
    phases = {}
    if args.warmup_steps or args.mode == "sft":
        phases["warmup" if args.mode != "sft" else "sft step"] = step_peak(z, held, [Pass(safe)] + retain, temps, ckpt)
    if defense.attacks_each_round:  # run() makes the fresh AdamW of --reset-optimizer before the attack: none is held
        attacked = {**held, "optimizer": 0 if args.reset_optimizer else 2 * theta, "inner AdamW": 2 * theta}
        phases["inner attack"] = step_peak(z, attacked, [Pass(lengths["unsafe"].shape(world))], temps, ckpt)
        held["δ"] = theta
    phases.update(update_plan(args, z, held, safe, lengths, world, retain, temps))
    export = export_dtype(args) or DTYPES[cfg.torch_dtype]
    phases["export"] = {**held, "export copy": export_copy(z, export, device_type)}
    return phases


def update_plan(args, z, held, safe, lengths, world, retain, temps):
    """{phase: parts} of the defense's update, pass by pass as section 2 runs them. A defense without a case here is
    planned as Patcher's two passes when it moves theta, else as SFT's one."""
    ckpt, mode = args.activation_checkpointing, args.mode
    if mode == "sft":
        return {}
    if mode == "vaccine":  # the second pass holds the recorded gradients (divided by the world) and their scaled copy
        recorded = z.cfg.num_hidden_layers * safe.accum * safe.rows * safe.tokens * z.cfg.hidden_size * z.c
        passes = [Pass(safe), Pass(safe, extra={"Vaccine's perturbation": 2 * recorded})] + retain
        return {"vaccine step": step_peak(z, held, passes, temps, ckpt, step_extra={"Vaccine's perturbation": recorded})}
    if mode == "booster":  # g, the harmful gradient, is held through the moved pass and the clean one
        harmful, g = lengths["unsafe"].shape(world), {"Booster's gradient": z.params * z.w}
        passes = [Pass(harmful), Pass(harmful, extra=g), Pass(safe, extra=g)] + retain
        return {"booster step": step_peak(z, held, passes, temps, ckpt)}
    both = args.alpha < 1 if mode == "patcher" else True  # alpha 1: the clean pass only evaluates
    passes = [Pass(safe, backward=both), Pass(safe, after_grads=both)] if DEFENSES[mode].moves_theta else [Pass(safe)]
    return {"defender step" if mode == "patcher" else f"{mode} step": step_peak(z, held, passes + retain, temps, ckpt)}


class Budget(NamedTuple):
    """The memory a run may use: `free` bytes of one device, or of a host's RAM `shared` by its ranks; `where` it was
    read; the GPUs of this host (0: none)."""
    free: float
    shared: bool
    where: str
    gpus: int

    def per_rank(self, ranks):
        return self.free / ranks if self.shared else self.free


def memory_budget(device, stated=None):
    """This device's free memory: a GPU's (torch.cuda.mem_get_info), or the host's available RAM (MemAvailable), shared
    by the ranks of the host; `stated`: --plan-memory GiB per device instead."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if stated:
        return Budget(stated * GiB, False, f"per device (--plan-memory {stated:g})", gpus)
    if device.type == "cuda":
        return Budget(torch.cuda.mem_get_info(device)[0], False, f"on {device}", gpus)
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: no check
        available = float("inf")
    return Budget(available, True, "in this host's RAM, shared by its ranks", gpus)


def plan_peak(phases):
    """(phase, bytes): the phase whose peak is the run's."""
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    return phase, sum(phases[phase].values())


def smallest_world(plan_of, budget, step=1, limit=64):
    """The smallest number of ranks (a multiple of `step`, at most `limit`) whose plan fits `budget`, or None."""
    return next((w for w in range(step, limit + 1, step) if plan_peak(plan_of(w))[1] <= budget.per_rank(w)), None)


def gib(n, unit=GiB):
    return f"{n / unit:.2f}"


def size(n):
    """Bytes in words: GiB, or MiB below one."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def refusal(program, world, phases, budget, ranks_here, plan_of, step=1):
    """The one line that refuses a run its memory plan says will not fit: the estimate and its largest parts, what is
    free, and the number of ranks that would fit."""
    phase, peak = plan_peak(phases)
    top = ", ".join(f"{k} {size(v)}" for k, v in sorted(phases[phase].items(), key=lambda kv: -kv[1])[:4] if v)
    fit = smallest_world(plan_of, budget, step)
    advice = (f"{fit} ranks would fit ({size(plan_peak(plan_of(fit))[1])} each: torchrun --nproc_per_node={fit})"
              if fit else "no number of ranks fits: " + ("the ranks of a host share its RAM" if budget.shared else
                                                          "not even 64"))
    return (f"memory plan: {program} needs ~{size(peak)} per rank at world {world} ({phase}: {top}), but "
            f"{size(budget.per_rank(ranks_here))} are free {budget.where}; {advice}; --plan prints the whole plan, "
            f"--skip-memory-check runs it anyway")


def check_memory(args, plan_of, program, world, device, rank, step=1):
    """Before any weight is loaded: the plan's per-rank peak against this device's free memory, agreed by every rank
    (one that ran out alone would leave the others waiting in a collective). Rank 0 says the plan in one line, or the
    refusal; then every rank raises MemoryRefused (main exits 1 without saying it again)."""
    phases = plan_of(world)
    phase, peak = plan_peak(phases)
    budget = memory_budget(device, args.plan_memory)
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    ok = args.skip_memory_check or peak <= budget.per_rank(ranks_here)
    if dist.is_initialized():
        t = torch.tensor([float(ok)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        ok = t.item() > 0
    if rank == 0:
        print(f"memory plan: ~{size(peak)} per rank at its peak ({phase}), {size(budget.per_rank(ranks_here))} free "
              f"{budget.where}" + (" (--skip-memory-check)" if args.skip_memory_check else ""), flush=True)
        if not ok:
            print(f"error: {refusal(program, world, phases, budget, ranks_here, plan_of, step)}", file=sys.stderr,
                  flush=True)
    if not ok:
        barrier()  # rank 0 has said why before any rank exits (torchrun stops the others when one exits)
        raise MemoryRefused()


class MemoryRefused(Exception):
    """The memory plan refused the run; rank 0 has said why."""


def show_plan(program, phases_of, world, lengths, budget, step=1, header=""):
    """--plan: the table of parts by phase at `world` ranks, the peak, whether it fits `budget` and the smallest number
    of ranks that does; the last line is for scripts (train.sh): memory-plan world= peak_gib= free_gib= fits= smallest=
    gpus=. A plan that does not fit ends with the refusal a run would give, and exit code 1."""
    phases = phases_of(world)
    phase, peak = plan_peak(phases)
    names = list(phases)
    parts = [p for p in PARTS if any(phases[n].get(p) for n in names)]
    width = max(len(p) for p in parts + ["total"])
    unit, unit_name = (GiB, "GiB") if peak >= GiB else (2**20, "MiB")
    print(f"memory plan of {program} at world {world}, {unit_name} per rank{header}")
    for name, ls in lengths.items():
        s = ls.shape(world // step)  # parallel.py (step 2): each half deals its batches over world / 2 ranks
        print(f"  {name}: micro-batches of {s.rows} x {s.tokens} tokens, {s.scored} scored, {s.accum} per update "
              f"({ls.source})")
    cols = [max(len(n), 7) for n in names]
    print(f"{'':<{width}}  " + "  ".join(f"{n:>{c}}" for n, c in zip(names, cols)))
    for p in parts:
        print(f"{p:<{width}}  " + "  ".join(f"{gib(phases[n].get(p, 0), unit):>{c}}" for n, c in zip(names, cols))
              + f"  {PARTS[p]}")
    totals = [gib(sum(phases[n].values()), unit) for n in names]
    print(f"{'total':<{width}}  " + "  ".join(f"{t:>{c}}" for t, c in zip(totals, cols)))
    fit = smallest_world(phases_of, budget, step)
    ok = peak <= budget.per_rank(world)
    print(f"peak {size(peak)} per rank ({phase}); {size(budget.per_rank(world))} free {budget.where}: "
          f"{'fits' if ok else 'does NOT fit'}; the smallest number of ranks that fits: {fit or 'none'}")
    print(f"memory-plan world={world} peak_gib={peak / GiB:.3f} free_gib={budget.per_rank(world) / GiB:.3f} "
          f"fits={int(ok)} smallest={fit or 'none'} gpus={budget.gpus}", flush=True)
    if not ok:
        raise RunError(refusal(program, world, phases, budget, world, phases_of, step))


def plan_device():
    """The device a --plan is for: a GPU where there is one (or --plan-memory states one), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def plan_world(args, default=1):
    return args.plan_world or int(os.environ.get("WORLD_SIZE", default))


def model_config(path):
    """The config a checkpoint directory loads with (load_model's): no lm_head.weight in its safetensors means tied."""
    cfg = read_config(path)
    try:
        if "lm_head.weight" not in checkpoint_files(Path(path)) and not cfg.tie_word_embeddings:
            cfg.tie_word_embeddings = True
    except CheckpointError:  # no weights (a directory with config.json only): the config says
        pass
    return cfg


def plan_inputs(args):
    """What --plan reads (patcher.py, parallel.py): --model's config (the demo's without one) and parameter shapes, the
    streams' lengths (the data tokenized where the model has a tokenizer, else --max-len), the device on this machine
    and the kind planned for (cuda where --plan-memory states GPUs)."""
    cfg = model_config(args.model) if args.model else ModelConfig.from_hf(DEMO_CONFIG)
    streams = load_data(args, 0, 1, cfg.max_position_embeddings)[0] if has_tokenizer(args.model) else None
    device = plan_device()
    return (cfg, param_shapes(cfg), stream_lengths(args, streams, cfg.max_position_embeddings), device,
            "cuda" if args.plan_memory else device.type)


def plan(args):
    """--plan for patcher.py: its memory plan, nothing loaded, nothing written."""
    cfg, shapes, lengths, device, kind = plan_inputs(args)
    show_plan(f"patcher.py --mode {args.mode}", lambda w: training_plan(args, cfg, shapes, lengths, w, kind),
              plan_world(args), lengths, memory_budget(device, args.plan_memory),
              header=f", {precision(args.precision)}, {kind}{' (the demo)' if args.model is None else ''}")


# -----------------------------------------------------------------------------
# 5. The run's bookkeeping: Training; out/ with config.json, metrics.jsonl, checkpoints/, final/


class Log:
    """A line every `every` steps on rank 0 (--log-every; the first step, the last and every inner attack always), and
    the numbers of every step as one JSON row each in metrics.jsonl."""

    def __init__(self, out, rank, total, device, offset=None, every=1):
        self.rank, self.total, self.start, self.peak, self.every = rank, total, None, peak_flops(device), every
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
            with naming(self.file.name):
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
        first = self.start is None  # this process's first step: the run's, or the first after a resume
        if first:
            self.start = (step - 1, time.time())
        if not (first or step == self.total or self.every <= 1 or step % self.every == 0):
            return
        eta = (time.time() - self.start[1]) / (step - self.start[0]) * (self.total - step)
        # the defense's other losses (Patcher: "adv", the loss at theta + delta, and its gap to the clean loss)
        more = "".join(f" {k[5:]} {v:.4f}" + (f" gap {m['gap']:+.4f}" if k == "loss_adv" else "")
                       for k, v in m.items() if k.startswith("loss_") and k != "loss_clean")
        mfu = f" | mfu {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
        print(f"step {step:>5}/{self.total} | {phase:<6} | loss {m['loss_clean']:.4f}{more} | gnorm {m['grad_norm']:.3f} "
              f"| lr {lr:.1e} | {row['tokens_per_s']:.0f} tok/s ({row['supervised_per_s']:.0f} supervised){mfu} "
              f"| eta {eta / 60:.1f} min", flush=True)

    def attack(self, step, r, losses, dnorm, seconds, **extra):
        self.write({"step": step, "phase": "inner_attack", "round": r, "attack_loss_start": losses[0],
                    "attack_loss_end": losses[-1], "attack_losses": losses, "delta_norm": dnorm, "seconds": seconds, **extra})
        if self.rank == 0:
            more = "".join(f" | {k} {v:.4g}" for k, v in extra.items())
            print(f"inner attack, round {r} | k1 {len(losses)} | loss {losses[0]:.4f} -> {losses[-1]:.4f} | "
                  f"|delta| {dnorm:.4f} | {seconds:.1f}s{more}", flush=True)


class Training:
    """One run's state and bookkeeping, kept out of run(): the model, its optimizer, the data streams, the round's
    attack vector `delta`, and out/ (config.json, the log, resumable checkpoints, final/). A resumed run restores all
    of it from out/checkpoints/latest; `step` says how far it got, `planned` how far train() has laid out the
    schedule, so that train() skips the steps taken (and new_round() tells a fresh round from a re-entered one)."""

    def __init__(self, args):
        self.args = args
        self.rank, world, device = init_distributed(args.precision, args.collective_timeout)
        torch.manual_seed(args.seed)
        self.out = Path(args.out)
        check_resume(args, self.out)  # before the demo writes or trains anything, or a model is loaded
        if args.model is None:  # the built-in demo: a tiny base model and its toy world, written as files
            make_demo(args, self.out, self.rank)
        self.settings = settings(args, world)  # hashes the inputs once: what every checkpoint records
        if args.resume:
            check_finished(self.out, self.settings)  # a run that finished has nothing to do
        self.defense = DEFENSES[args.mode]
        cfg = model_config(args.model)
        self.streams, notes = load_data(args, self.rank, world, cfg.max_position_embeddings)
        lengths, shapes = stream_lengths(args, self.streams, cfg.max_position_embeddings), param_shapes(cfg)
        check_memory(args, lambda w: training_plan(args, cfg, shapes, lengths, w, device.type),
                     f"patcher.py --mode {args.mode}", world, device, self.rank)  # before any weight is loaded
        self.model = build_model(args.model, device, args)
        self.optimizer = make_optimizer(self.model.parameters(), args.lr, args.weight_decay, args.fused_adamw)
        self.total = args.warmup_steps + args.rounds * args.defend_steps
        self.step, self.delta, self.log, _ = start_run(args, self.out, self.model, self.optimizer, self.streams,
                                                       self.settings, self.rank, self.total, notes)
        # one copy of theta for every attack and step that moves the weights
        self.theta_buffer = snapshot(self.model) if self.defense.moves_theta else None
        self.planned = 0

    @contextmanager
    def naming_the_step(self, what):
        """A non-finite number inside is named by `what`."""
        try:
            yield
        except FloatingPointError as e:
            raise FloatingPointError(f"{what}{e}") from None

    @contextmanager
    def interruptible(self):
        """Ctrl-C or SIGTERM anywhere inside (an update, the log, a checkpoint being written, an inner attack) is an
        interruption at the step reached, which main() reports with how --resume continues."""
        try:
            yield
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise Interrupted(self.step) from None

    def new_round(self, r):
        """Whether round r starts afresh: False when a resumed run's checkpoint is past its start (the checkpoint holds
        its attack vector). From the schedule (the warmup, then k2 steps a round), so asked before or after train()."""
        return self.step <= self.args.warmup_steps + r * self.args.defend_steps

    def train(self, n, phase, update, r=-1):
        """The next n steps of the schedule, each with `update` (a defense's) on fresh batches, logged, and
        checkpointed every --save-every steps and at the last; the steps a resumed run had taken are skipped."""
        self.planned += n
        s, args = self.streams, self.args
        with self.interruptible():
            while self.step < self.planned:
                t = time.time()
                batch = Batches(next(s["safe"]), next(harmful_stream(s)) if self.defense.harmful else None,
                                next(s["retain"]) if "retain" in s else None)
                with self.naming_the_step(f"{phase} step {self.step + 1}: "):
                    metrics = update(self.model, self.optimizer, batch, args, self.delta, self.theta_buffer)
                self.step += 1
                self.log.step(self.step, phase, r, metrics, time.time() - t, args.lr)
                # the last step too: an export that fails (a full disk) must not lose the run
                if args.save_every and (self.step % args.save_every == 0 or self.step == self.total):
                    save_checkpoint(self.out, self.step, self.model, self.optimizer, self.delta, self.streams,
                                    self.settings, self.log.offset(), self.rank)

    def attack_round(self, r):
        """Round r's inner attack from the current theta (inner_attack()), logged; returns its attack vector."""
        t = time.time()
        with self.interruptible(), self.naming_the_step(f"round {r}, inner "):
            delta, losses = inner_attack(self.model, self.streams["unsafe"], self.args, self.theta_buffer)
        self.log.attack(self.step, r, losses, global_norm(delta, process_group(self.model)), time.time() - t)
        return delta

    def export(self):
        export_final(self.model, self.out, self.args, self.step, self.rank, self.settings)


class RunError(RuntimeError):
    """A run that cannot go on as asked (a resume with other settings, a checkpoint that cannot be written)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C once the run had reached `step`: main reports the step and how --resume continues."""

    def __init__(self, step):
        super().__init__(step)
        self.step = step


@contextmanager
def naming(path):
    """An OSError raised while writing `path` names it: write() and flush() on a full disk raise one that
    names no file, and main reports an OSError by its file."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def free_space(path):
    """'N GiB free there': the free space of the file system that holds `path` (or would)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free there"


def describe(e):
    """An exception in one line: its type and the first line of its message."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


# flags that do not change what a run computes: a resume may change them
NOT_RUN_SETTINGS = ("resume", "save_every", "out", "compile", "activation_checkpointing", "fused_adamw", "debug",
                    "peer_timeout", "collective_timeout", "plan", "plan_world", "plan_memory", "skip_memory_check",
                    "log_every", "check")
# Flags that name what a run reads. A resume compares what they hold (a fingerprint), not how the path is spelled:
# `./base` and `base`, a relative and an absolute path, a copied run directory are the same run; the same
# relative path from another working directory may name other data, and is refused.
INPUT_FLAGS = ("model", "safe_data", "unsafe_data", "retain_data")
# what in a model directory changes a run, besides its safetensors files: the config and the tokenizer's files
MODEL_FILES = ("config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", data.ToyTokenizer.FILE, *data.TIKTOKEN_FILES)


def sha256(file, safetensors_header=False):
    """sha256 of a file's bytes; with safetensors_header, of its header (every tensor's name, dtype, shape and
    offsets) and its size only: reading the weights would take minutes for every start of a large model."""
    h = hashlib.sha256()
    with open(file, "rb") as f:
        if safetensors_header:  # the format: an 8-byte little-endian length, then that many bytes of JSON
            n = f.read(8)
            h.update(n + f.read(int.from_bytes(n, "little")) + str(os.fstat(f.fileno()).st_size).encode())
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def fingerprint(path):
    """{"path", "sha256"} of an input: of a data file its bytes; of a model directory {file: sha256} of
    MODEL_FILES and of each safetensors file's header and size (weights rewritten with other values of the
    same shapes go unnoticed). The path is kept to be shown, never compared."""
    path = Path(path)
    if not path.is_dir():
        return {"path": str(path), "sha256": sha256(path)}
    files = [path / name for name in MODEL_FILES if (path / name).is_file()] + sorted(path.glob("*.safetensors"))
    return {"path": str(path), "sha256": {f.name: sha256(f, f.suffix == ".safetensors") for f in files}}


def settings(args, world, parser=None):
    """What a resume must match: the flags this run reads that change what it computes (a defense's own flags only
    under its --mode: mode_of), the world size and the fingerprint of each input (not its path). "defaults" holds
    each of those flags' default in the program that runs (`parser`, patcher.py's by default): a flag added after a
    run was made is missing from its settings, and compares as its default, which is how that run ran."""
    defaults = {a.dest: a.default for a in (parser or get_parser())._actions if a.option_strings}
    mode = getattr(args, "mode", None)
    flags = {k: v for k, v in vars(args).items() if k not in NOT_RUN_SETTINGS + INPUT_FLAGS
             and (not mode_of(k) or "all" in mode_of(k) or mode in mode_of(k))}  # none: parallel.py's own
    inputs = {k: fingerprint(getattr(args, k)) for k in INPUT_FLAGS if getattr(args, k) is not None}
    return {**flags, "world_size": world, "inputs": inputs, "defaults": {k: defaults.get(k) for k in flags}}


def changed_settings(saved, now):
    """How this run differs from a checkpoint's settings: ([each changed flag, with both values], [each input
    whose content differs, named by its flag and its path now, or given to only one of the two runs])."""
    flag = lambda k: k.replace("_", " ") if k == "world_size" else "--" + k.replace("_", "-")
    # what this run reads; a flag the saved run did not record (added since) ran as its default; a flag only the saved
    # run recorded (another mode's, or one since removed) is not read now
    default = now.get("defaults", {})
    was = {k: saved[k] if k in saved else default.get(k) for k in now if k not in ("inputs", "defaults")}
    flags = [f"{flag(k)} {was[k]!r} (now {now[k]!r})" for k in sorted(was) if was[k] != now[k]]
    inputs, then = [], saved.get("inputs", {})
    for k in sorted(set(then) | set(now["inputs"])):
        a, b = then.get(k), now["inputs"].get(k)
        if a is None or b is None:
            who = "this run" if b else "the checkpoint's run"
            inputs.append(f"{flag(k)} {(a or b)['path']} was given to {who} only")
        elif a["sha256"] == b["sha256"]:
            continue
        elif isinstance(a["sha256"], dict) and isinstance(b["sha256"], dict):  # model directories: name the files
            files = sorted(f for f in a["sha256"].keys() | b["sha256"].keys() if a["sha256"].get(f) != b["sha256"].get(f))
            inputs.append(f"{flag(k)} {b['path']}: its {', '.join(files)} changed since the checkpoint")
        else:
            inputs.append(f"{flag(k)} {b['path']}: its content changed since the checkpoint (whose run read {a['path']})")
    return flags, inputs


def check_resume(args, out):
    """Before anything is written: --resume needs a checkpoint, and a fresh run must not overwrite a resumable one."""
    if args.resume and not (out / "done.json").exists():
        latest_checkpoint(out)
    elif not args.resume and (out / "checkpoints" / "latest").exists():
        raise RunError(f"--out {out} holds a resumable run ({out / 'checkpoints' / 'latest'}): pass --resume to "
                       f"continue it, or another --out")


def start_run(args, out, model, optimizer, streams, run_settings, rank, total, notes, group=None, header=True):
    """Fresh, or resumed from out/checkpoints/latest (a resume with other settings is refused, before
    anything is written). Writes config.json, prints the header; returns (step, delta, log, the schedule's extra
    state of the checkpoint)."""
    step, delta, offset, extra = 0, None, None, {}
    if args.resume:
        delta_like = ({n: torch.zeros_like(p) for n, p in model.named_parameters()} if DEFENSES[args.mode].attacks_each_round
                      else None)
        step, delta, offset, extra = load_checkpoint(out, model, optimizer, delta_like, streams, run_settings, rank, group)
    device, world = model.lm_head.weight.device, run_settings["world_size"]
    if rank == 0:
        (out / "done.json").unlink(missing_ok=True)  # another run's (a resume of a finished one ended in Finished)
        write_config(out, args, run_settings["inputs"])
        for line in notes:
            print(line)
    if rank == 0 and header:
        print(f"mode {args.mode} | world {world} | {precision(args.precision)} | {total} steps = warmup {args.warmup_steps} + "
              f"{args.rounds} rounds x k2 {args.defend_steps}" + (f" | inner attack k1 {args.inner_steps} at lr "
              f"{args.inner_lr:g}" if DEFENSES[args.mode].attacks_each_round else "") + (f" | resumed at step {step}" if step else ""),
              flush=True)
    return step, delta, Log(out, rank, total, device, offset, args.log_every), extra


def write_config(out, args, inputs=None):
    """out/config.json: every resolved flag, and under "inputs" the fingerprint of what each input flag named
    (settings(); computed here if not given). Written only once a resume has been accepted."""
    inputs = inputs if inputs is not None else {k: fingerprint(getattr(args, k)) for k in INPUT_FLAGS if getattr(args, k)}
    with naming(out / "config.json"):
        (out / ".config.json.tmp").write_text(json.dumps({**vars(args), "inputs": inputs}, indent=2) + "\n")
        os.replace(out / ".config.json.tmp", out / "config.json")


def barrier(group=None):
    if dist.is_initialized():
        dist.barrier(group=group)


def dcp_cause(e):
    """The error behind a failed dcp.save or dcp.load: dcp wraps each rank's in CheckpointException.failures,
    as an (exception, traceback) pair on recent torch versions and as the exception itself on older ones."""
    cause = next(iter(getattr(e, "failures", {}).values()), e)
    return cause[0] if isinstance(cause, tuple) else cause


def save_checkpoint(out, step, model, optimizer, delta, streams, run_settings, log_offset, rank, keep=2, group=None,
                    extra=None):
    """Write out/checkpoints/step-XXXXXXX (torch.distributed.checkpoint: model, optimizer, delta; one JSON per
    rank: step, settings, data positions, RNG, the log's length, `extra`: a schedule's own state; nothing is ever
    unpickled; `group`: the ranks that hold the model, parallel.py's defender half). It is written
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
    barrier(group)
    np_state = np.random.get_state()
    state = {"format": 2, "step": step, "has_delta": delta is not None, "settings": run_settings, "metrics_bytes": log_offset,
             "data": {name: s.state_dict() for name, s in streams.items()}, "extra": extra or {},
             "rng": {"torch": torch.get_rng_state().tolist(), "python": list(random.getstate()[1]),
                     "numpy": [np_state[1].tolist(), int(np_state[2])]}}
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if delta is not None:
        sd["delta"] = delta
    try:
        dcp.save(sd, checkpoint_id=tmp, process_group=group)
        (tmp / f"state-rank{rank}.json").write_text(json.dumps(state))
        if rank == 0:  # the log up to this step: a resume restores it, whatever happened to out/metrics.jsonl since
            with open(out / "metrics.jsonl", "rb") as f:
                (tmp / "metrics.jsonl").write_bytes(f.read(log_offset))
        barrier(group)  # every rank's files are complete: each hashes its own
        (tmp / f"checksums-rank{rank}.json").write_text(json.dumps({f.name: sha256(f) for f in own_files(tmp, rank)}))
    except (Exception, KeyboardInterrupt, dcp.api.CheckpointException) as e:  # dcp's own is a BaseException
        cause = dcp_cause(e)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(cause, KeyboardInterrupt):  # Ctrl-C while writing: an interruption, not a failed disk
            raise Interrupted(step) from None
        raise RunError(f"could not write checkpoint {tmp}: {describe(cause)} ({free_space(root)}); the previous "
                       f"checkpoint is intact") from None
    barrier(group)
    if rank == 0:
        if final.exists():  # left by a run killed before it switched `latest`, which never names it
            shutil.rmtree(final)
        os.rename(tmp, final)
        (root / "latest.tmp").write_text(final.name)
        os.replace(root / "latest.tmp", root / "latest")
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old)
    barrier(group)


def latest_checkpoint(out):
    """The checkpoint directory that out/checkpoints/latest names; a RunError when there is none."""
    root = out / "checkpoints"
    if not (root / "latest").exists():
        raise RunError(f"--resume: no checkpoint in {root} (nothing was saved yet: see --save-every)")
    return root / (root / "latest").read_text().strip()


def own_files(path, rank):
    """The files of checkpoint `path` that `rank` wrote (dcp names its data files __RANK_N.distcp; rank 0 writes
    .metadata and the log's copy too), and its state file."""
    files = sorted(path.glob(f"__{rank}_*.distcp")) + [path / f"state-rank{rank}.json"]
    return files + ([path / ".metadata", path / "metrics.jsonl"] if rank == 0 else [])


def checkpoint_damage(path, ranks):
    """What makes checkpoint `path` unreadable, naming the file (missing, truncated, not JSON, other bytes than when
    written), or None. Checked before loading: dcp and json report such damage with errors that name no file, or
    none at all (bytes changed at the same size load silently)."""
    import torch.distributed.checkpoint as dcp
    for r in ranks:
        state = path / f"state-rank{r}.json"
        try:
            json.loads(state.read_text())
        except (OSError, ValueError) as e:
            return f"{state}: " + ("missing" if isinstance(e, FileNotFoundError) else f"not readable ({describe(e)})")
    try:
        items = dcp.FileSystemReader(path).read_metadata().storage_data.values()
    except Exception as e:
        return f"{path / '.metadata'}: not readable ({describe(e)})"
    need = {}  # each data file must reach the end of every item dcp wrote into it
    for item in items:
        need[item.relative_path] = max(need.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(need.items()):
        have = (path / name).stat().st_size if (path / name).exists() else None
        if have is None or have < size:
            return f"{path / name}: " + ("missing" if have is None else f"truncated ({have} of {size} bytes)")
    for r in ranks:
        if json.loads((path / f"state-rank{r}.json").read_text()).get("format", 1) < 2:
            continue  # written before checkpoints carried checksums
        try:
            sums = json.loads((path / f"checksums-rank{r}.json").read_text())
        except (OSError, ValueError) as e:
            return f"{path / f'checksums-rank{r}.json'}: " + ("missing" if isinstance(e, FileNotFoundError) else "not readable")
        for name, digest in sorted(sums.items()):
            if not (path / name).exists():
                return f"{path / name}: missing"
            if sha256(path / name) != digest:
                return f"{path / name}: its bytes changed since it was written (checksum)"
    return None


def agreed_damage(path, rank, world, group=None):
    """checkpoint_damage of this rank's files, the same answer on every rank (the first damage any rank found), so
    that all refuse together instead of some entering a collective load alone."""
    damage = checkpoint_damage(path, [rank])
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, damage, group=group)
        damage = next((d for d in found if d), None)
    return damage


def older_intact(path, ranks):
    """How to resume from the newest intact checkpoint older than `path` (save_checkpoint keeps two), in words."""
    for older in sorted(path.parent.glob("step-*"), reverse=True):
        if older.name < path.name and checkpoint_damage(older, ranks) is None:
            return (f"the older checkpoint {older.name} is intact: resume from it with "
                    f"`echo {older.name} > {path.parent / 'latest'}` and --resume")
    return "no older checkpoint is intact"


def load_checkpoint(out, model, optimizer, delta_like, streams, run_settings, rank, group=None):
    """Restore in place from out/checkpoints/latest -> (step, delta or None, the log's length then, the schedule's
    `extra` state). `group`: the ranks that hold the model (save_checkpoint's). A damaged
    checkpoint is named, with the older one to resume from; a run with other settings than the checkpoint's
    (flags, world size, mode, the content of an input) is refused, naming each change."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    path = latest_checkpoint(out)

    try:  # rank 0's state first: under other settings (another world size) the change is the answer, not damage
        saved = json.loads((path / "state-rank0.json").read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"--resume: checkpoint {path / 'state-rank0.json'}: " + ("missing" if isinstance(
            e, FileNotFoundError) else f"not readable ({describe(e)})") + f"; {older_intact(path, [0])}") from None
    flags, inputs = changed_settings(saved, run_settings)
    if flags or inputs:
        said = (["the checkpoint's run had " + ", ".join(flags)] if flags else []) + inputs
        raise RunError(f"--resume: {'; '.join(said)}; resume with its settings and inputs ({path}), or start a new "
                       f"run in another --out")
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    damage = agreed_damage(path, rank, world, group)
    if damage:
        raise CheckpointError(f"--resume: checkpoint {damage}; {older_intact(path, range(world))}")
    state = json.loads((path / f"state-rank{rank}.json").read_text())
    sd = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if state["has_delta"]:
        sd["delta"] = delta_like
    try:
        dcp.load(sd, checkpoint_id=path, process_group=group)
    except (Exception, dcp.api.CheckpointException) as e:  # damage that the files' sizes do not show
        cause = dcp_cause(e)
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        raise CheckpointError(f"--resume: checkpoint {path} cannot be read ({describe(cause)}); "
                              f"{older_intact(path, range(world))}") from None
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, sd["optimizer"])
    for name, s in streams.items():
        s.load_state_dict(state["data"][name])
    rng = state["rng"]
    torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
    np.random.set_state(("MT19937", np.array(rng["numpy"][0], dtype=np.uint32), rng["numpy"][1], 0, 0.0))
    random.setstate((3, tuple(rng["python"]), None))
    if rank == 0 and (path / "metrics.jsonl").exists():  # the log as it was at the checkpoint: cut back, or rebuilt
        with naming(out / "metrics.jsonl"):
            shutil.copyfile(path / "metrics.jsonl", out / ".metrics.jsonl.tmp")
            os.replace(out / ".metrics.jsonl.tmp", out / "metrics.jsonl")
    return state["step"], sd.get("delta"), state["metrics_bytes"], state.get("extra", {})


class Finished(Exception):
    """--resume of a run that has finished: nothing to do (main says so and exits 0)."""


def check_finished(out, run_settings):
    """Raise Finished if out/done.json says a run with these settings and inputs finished and exported final/ (and
    `latest` still names its last checkpoint, and final/ is still that export: its fingerprint); a finished run of other
    settings is refused, naming the changes. An export removed or changed since is made again from the last checkpoint
    (a line says so): "finished already" would send eval.py to a model that is not there."""
    done, latest = out / "done.json", out / "checkpoints" / "latest"
    if not done.exists():
        return
    try:
        saved = json.loads(done.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--resume: {done}: not readable ({describe(e)}); remove it to resume from the last "
                              f"checkpoint") from None
    if saved.get("checkpoint") != (latest.read_text().strip() if latest.exists() else None):
        return  # `latest` was pointed at another checkpoint since (an older one): resume from it
    flags, inputs = changed_settings(saved["settings"], run_settings)
    if flags or inputs:
        said = (["the finished run had " + ", ".join(flags)] if flags else []) + inputs
        raise RunError(f"--resume: {'; '.join(said)}; resume with its settings and inputs, or start a new run in "
                       f"another --out")
    final = out / "final"
    now = fingerprint(final)["sha256"] if final.is_dir() else None
    if now is None or now != saved.get("final", now):  # (a done.json written before it recorded the export's)
        what = "is missing" if now is None else "has changed since its export"
        if saved.get("checkpoint") is None:
            raise RunError(f"--resume: {final} {what}, and the run kept no checkpoint to export it again from "
                           f"(--save-every 0): start it again in a new --out")
        if os.environ.get("RANK", "0") == "0":
            print(f"{final} {what}: resuming from checkpoint {saved['checkpoint']} to export it again", flush=True)
        return
    raise Finished(f"finished already: {out / 'final'} is this run's export (step {saved['step']}); nothing to do")


def export_final(model, out, args, step, rank, run_settings=None):
    """out/final, then out/done.json (the step, the run's settings and the export's fingerprint: a later --resume of the
    same run has nothing to do). An export that fails (a full disk; safetensors' own error names no file) is one line
    that says where the trained weights are: with --save-every, in the checkpoint of this last step, taken just before,
    from which --resume goes straight to the export."""
    try:
        save_model(model, out / "final", like=args.model, dtype=export_dtype(args))
    except (OSError, SafetensorError) as e:
        kept = (f"the trained weights are in checkpoint step-{step:07d}: free space, then --resume exports them"
                if args.save_every else "the trained weights are lost (--save-every 0 keeps no checkpoint)")
        raise RunError(f"could not export {out / 'final'}: {describe(e)} ({free_space(out)}); {kept}") from e
    except KeyboardInterrupt:
        raise Interrupted(step) from None
    if rank == 0:
        if run_settings is not None:
            with naming(out / "done.json"):
                latest = out / "checkpoints" / "latest"
                (out / ".done.json.tmp").write_text(json.dumps({"step": step, "settings": run_settings, "checkpoint":
                                                                latest.read_text().strip() if latest.exists() else None,
                                                                "final": fingerprint(out / "final")["sha256"]}) + "\n")
                os.replace(out / ".done.json.tmp", out / "done.json")
        print(f"exported {out / 'final'}", flush=True)


# -----------------------------------------------------------------------------
# 6. The command line


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


# A rate (learning rates, and any other positive amount) must stay where AdamW's arithmetic fits in fp32: its
# first step size, lr / (1 - beta1) = 10 lr, is a Python number that torch converts to fp32, and an lr above
# ~3.4e37 made that a crash inside torch ("value cannot be converted to type float without overflow"; measured on
# torch 2.13, with weight decays up to 1e9 too) instead of a non-finite loss the run stops on, naming the step.
MAX_RATE = 1e30
COUNT, POSITIVE_COUNT = number(int, 0), number(int, 1)
RATE, NONNEGATIVE, FRACTION = number(float, 0, MAX_RATE, above=True), number(float, 0), number(float, 0, 1)


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, as every other error of these programs: the message, a guess where the
    word was mistyped (a flag, a choice), and where the flags are listed; exit code 2, as argparse's. (argparse prints
    its whole usage first: 30 lines for one wrong letter.)"""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}{self.guess(message)} ({self.prog} --help lists every flag)\n")

    def guess(self, message):
        """"; did you mean --lr?" for an unknown flag, "; did you mean patcher?" for a wrong choice, else ""."""
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        if message.startswith("unrecognized arguments: "):
            words = [w.split("=")[0] for w in message.split(": ", 1)[1].split() if w.startswith("--")]
            close = [m for w in words for m in difflib.get_close_matches(w, flags, n=1, cutoff=0.6)]
            return f"; did you mean {close[0]}?" if close else ""
        choice = re.match(r"argument (\S+?)(/\S+)?: invalid choice: '([^']*)'", message)
        action = next((a for a in self._actions if choice and choice[1] in a.option_strings), None)
        if action is None or not action.choices:
            return ""
        close = difflib.get_close_matches(choice[3], [str(c) for c in action.choices], n=1, cutoff=0.5)
        return f"; did you mean {close[0]}?" if close else ""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except where there is none to show (None, an off switch)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def defenses_help():
    """Each defense of DEFENSES for --mode's help: its name, what it is, its own flags."""
    flags = lambda d: f" (--{', --'.join(d.flags)})".replace("_", "-") if d.flags else ""  # noqa: E731
    return "; ".join(f"{m}: {d.help}{flags(d)}" for m, d in DEFENSES.items())


def get_parser():
    p = Parser(
        description="Patcher: alignment that survives fine-tuning attacks. Without --model it runs the built-in "
                    "demo, which prepends its own small flags: " + " ".join(DEMO_FLAGS) + ". The defaults below "
                    "are a small, fast setting for trying the method on a real model, NOT the paper's (loop 1: "
                    "1,000 SFT steps; then 14 rounds of k1 300 / k2 1,000, fresh AdamW each round, global batches "
                    "4 / 2): PRESET=paper ./train.sh runs those.",
        formatter_class=HelpFormatter)
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
    g.add_argument("--loss-mask", choices=list(data.LOSS_MASKS), default="answer",
                   help="tokens of an assistant turn in the loss: " + "; ".join(f"{k}: {v}" for k, v in data.LOSS_MASKS.items()))
    g = p.add_argument_group("algorithm")
    g.add_argument("--mode", choices=list(DEFENSES), default="patcher",
                   help="the defender's update (the schedule is the same for all): " + defenses_help())
    g.add_argument("--alpha", type=FRACTION, default=0.5, help="weight of the attacked loss L(theta + delta)")
    g.add_argument("--warmup-steps", type=COUNT, default=100, help="plain SFT steps on D_safe before the first round")
    g.add_argument("--rounds", type=POSITIVE_COUNT, default=5, help="M: rounds of (inner attack, k2 defender steps)")
    g.add_argument("--inner-steps", type=POSITIVE_COUNT, default=200, help="k1: steps of each inner attack")
    g.add_argument("--defend-steps", type=POSITIVE_COUNT, default=100, help="k2: defender steps per round")
    g.add_argument("--reset-optimizer", action="store_true", help="a fresh defender AdamW every round (the official code)")
    g.add_argument("--retain-weight", type=NONNEGATIVE, default=0.0,
                   help="weight of the retain loss on --retain-data at theta (0: off, the paper's objective)")
    g.add_argument("--vaccine-rho", type=RATE, default=2.0,
                   help="--mode vaccine: norm of the perturbation of the attention outputs (the official Vaccine.sh 2)")
    g.add_argument("--booster-lambda", type=NONNEGATIVE, default=5.0,
                   help="--mode booster: weight of the harmful-perturbation term (the official smooth_align.sh)")
    g.add_argument("--booster-alpha", type=RATE, default=0.1,
                   help="--mode booster: length of the normalised harmful step it attenuates (the official 0.1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=RATE, default=1e-5, help="defender learning rate, constant (<= 1e30: beyond, AdamW "
                                                           "overflows fp32)")
    g.add_argument("--weight-decay", type=NONNEGATIVE, default=0.01, help="defender AdamW weight decay")
    g.add_argument("--max-grad-norm", type=NONNEGATIVE, default=1.0, help="defender grad-norm clipping (0: none)")
    g.add_argument("--batch-size", type=POSITIVE_COUNT, default=4, help="defender global batch: sequences per update, all ranks")
    g.add_argument("--inner-lr", type=RATE, default=1e-5, help="inner attack learning rate, constant (<= 1e30)")
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
    g.add_argument("--export-dtype", choices=["checkpoint", *DTYPES], default="checkpoint",
                   help="dtype of final/: the base checkpoint's storage dtype, or another (float32: the official code's "
                        "export, whose transformers 4.x loads and saves in fp32)")
    g.add_argument("--save-every", type=COUNT, default=0, help="resumable checkpoint every N steps (0: never)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint named in --out/checkpoints/latest (same settings; inputs of the "
                        "same content, wherever their paths now point)")
    g.add_argument("--precision", type=precision_flag, choices=list(PRECISIONS), default=default_precision(),
                   help="compute precision over fp32 master weights (bf16: FSDP2's mixed precision, also for one "
                        "process and on the CPU), or bf16-pure: bf16 weights and AdamW state, no fp32 copy, theta "
                        "restored by subtraction (the official code under transformers 5); the default is bf16 on a "
                        "CUDA GPU that has it, else fp32")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in backward")
    g.add_argument("--compile", action="store_true", help="torch.compile each block")
    g.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="fused AdamW kernels (default: on CUDA)")
    g.add_argument("--collective-timeout", type=RATE, default=COLLECTIVE_TIMEOUT,
                   help="seconds a rank waits in a collective before it fails (NCCL's own default is 600: shorter than "
                        "a large checkpoint's write)")
    g.add_argument("--debug", action="store_true", help="show tracebacks for user errors too")
    add_memory_flags(g)
    g.add_argument("--check", action="store_true",
                   help="check the flags, --model's config.json and every data file (each record read, as the run "
                        "reads it), then exit: nothing trained, nothing written (train.sh runs it before any stage)")
    g.add_argument("--list-flags", action=ListFlags, modes=mode_of, same=lambda dest: dest in NOT_RUN_SETTINGS,
                   help="print every flag as 'NAME value|switch MODES same|changes' (MODES: the --mode values that take "
                        "it, or all; same: it does not change what the run computes), then exit: how train.sh learns "
                        "which flags this program takes")
    g.add_argument("--log-every", type=COUNT, default=10,
                   help="print a step line every N steps (0 or 1: every step); the first and the last step and every "
                        "inner attack are always printed, and metrics.jsonl holds every step")
    return p


def add_memory_flags(g):
    """The memory plan's flags (patcher.py, parallel.py and eval.py)."""
    g.add_argument("--plan", action="store_true",
                   help="print this run's memory plan per rank (weights, gradients, optimizer, activations, ... by "
                        "phase, from config.json and the data: no weight is read), whether it fits, the smallest "
                        "number of ranks that does, then exit (1 if it does not fit)")
    g.add_argument("--plan-world", type=POSITIVE_COUNT,
                   help="--plan: the number of ranks to plan for (default: this launch's, else 1; parallel.py: 2)")
    g.add_argument("--plan-memory", type=RATE,
                   help="GiB of memory per device to check the plan against, as GPUs of that size (default: the GPU's "
                        "free memory, or the host's available RAM shared by its ranks); --plan keeps this machine's "
                        "defaults (--precision): give them to plan for another machine")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="run even where the memory plan says the run does not fit")


# The flags every --mode reads: the data, the schedule, the defender's optimisation, the system. Every other flag of
# patcher.py is read by some defenses only (Defense.reads); tests/test_flags.py fails on a flag that is neither, which
# --mode sft would take and ignore. A new flag every mode reads: its add_argument, and its name here.
EVERY_MODE = ("model", "safe_data", "safe_format", "retain_data", "prompt_field", "response_field", "system_prompt",
              "max_len", "loss_mask", "mode", "warmup_steps", "rounds", "defend_steps", "reset_optimizer",
              "retain_weight", "lr", "weight_decay", "max_grad_norm", "batch_size", "micro_batch_size",
              "group_by_length", "seed", "out", "export_dtype", "save_every", "resume", "precision",
              "activation_checkpointing", "compile", "fused_adamw", "collective_timeout", "debug", "plan", "plan_world",
              "plan_memory", "skip_memory_check", "log_every", "list_flags", "check")


def mode_of(dest):
    """The --mode values that read flag `dest`: ["all"] for a flag of EVERY_MODE, else the defenses that read it
    (Defense.reads), else none (a flag of no mode: parallel.py's own, or one a fork has not given to a mode yet)."""
    return ["all"] if dest in EVERY_MODE else [m for m, d in DEFENSES.items() if dest in d.reads()]


class ListFlags(argparse.Action):
    """--list-flags: one line per flag, 'NAME value|switch MODES same|changes', then exit (as --help does). `modes`:
    dest -> the modes that take it (none: the flag is not listed); `same`: whether it leaves what the program computes
    the same (a rerun may change it). train.sh reads this instead of keeping lists of its own."""

    def __init__(self, option_strings, dest, modes=lambda dest: ["all"], same=lambda dest: False, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)
        self.modes, self.same = modes, same

    def __call__(self, parser, namespace, values, option_string=None):
        for a in parser._actions:
            if a.dest in ("help", self.dest) or not a.option_strings:
                continue
            kind, modes = "switch" if a.nargs == 0 else "value", self.modes(a.dest)
            for name in a.option_strings:
                if name.startswith("--") and modes:
                    print(f"{name[2:]} {kind} {','.join(modes)} {'same' if self.same(a.dest) else 'changes'}")
        parser.exit()


def given_flags(parser, argv):
    """The dests of the flags on the command line `argv`, as `parser` reads it (abbreviations included)."""
    p = copy.deepcopy(parser)
    for a in p._actions:
        a.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


# The demo's preset: its own small values, prepended so that any flag given overrides them.
DEMO_FLAGS = ["--warmup-steps", "40", "--rounds", "8", "--inner-steps", "20", "--defend-steps", "20", "--lr", "5e-4",
              "--inner-lr", "5e-4", "--batch-size", "16", "--inner-batch-size", "16", "--max-len", "64",
              "--log-every", "40"]  # about 25 lines on the console; metrics.jsonl holds every step


def parse_args(argv=None, parser=None):
    p = parser or get_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = p.parse_args(argv)
    defense = DEFENSES[args.mode]
    for dest in sorted(given_flags(p, argv)):  # the user's flags, not the demo's preset
        if mode_of(dest) and "all" not in mode_of(dest) and args.mode not in mode_of(dest):
            p.error(f"--{dest.replace('_', '-')} is a flag of --mode {'/'.join(mode_of(dest))}: --mode {args.mode} "
                    f"does not use it")
    if args.compile and defense.hooks_blocks:  # compiled blocks run no module hook added after compilation, silently
        p.error(f"--compile: --mode {args.mode} hooks into the blocks, which compiled blocks would skip; run it without")
    if args.model is None:
        args = p.parse_args(DEMO_FLAGS + argv)
        if args.safe_data or args.unsafe_data or args.retain_data:
            p.error("--safe-data/--unsafe-data/--retain-data need --model (without it the demo runs on its toy world)")
    else:
        if not Path(args.model).is_dir():
            p.error(f"--model {args.model}: not a directory")
        if args.safe_data is None:
            p.error("--safe-data is required with --model")
        if (defense.attacks_each_round or defense.harmful) and args.unsafe_data is None:
            p.error(f"--unsafe-data is required with --mode {args.mode}")
    for flag in ("safe_data", "unsafe_data", "retain_data"):
        f = getattr(args, flag)
        if f is not None and not Path(f).is_file():
            p.error(f"--{flag.replace('_', '-')} {f}: no such file")
    if args.model is not None and args.retain_weight > 0 and args.retain_data is None:
        p.error("--retain-weight > 0 needs --retain-data")
    check_out_dir(p, args.out, create=not (args.plan or args.check))  # a plan and a check write nothing
    if args.system_prompt == "":
        args.system_prompt = None
    return args


def check_out_dir(p, out, create=True):
    """--out must be a directory this process can write (checked before any work). create=False (--check, --plan):
    checked without writing, as far as that goes: it, or the folder it would be made in, is writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a directory")
    if not create:
        there = next(d for d in (out.absolute(), *out.absolute().parents) if d.exists())
        if not there.is_dir() or not os.access(there, os.W_OK | os.X_OK):
            p.error(f"--out {out}: cannot write there ({there} is not a writable folder)")
        return
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
    (reused if it was trained for this --seed: train.sh shares one base between a seed's alignments); then every rank
    points the flags at them. A resume writes nothing: it reads what its run wrote, which the checkpoint's
    fingerprints then check (a refused resume leaves the run directory as it was)."""
    base = out / "base"
    if rank == 0 and not args.resume:
        with naming(out / "data"):  # a full disk: write() names no file
            paths = data.write_toy_world(out / "data", args.seed)
        made = base / data.ToyTokenizer.FILE  # records the seed of the toy world the base model was trained for
        if not made.exists() or json.loads(made.read_text() or "{}").get("toy_world_seed") != args.seed:
            print(f"demo: training a tiny base model ({BASE_STEPS} steps) to comply with every toy request -> {base}",
                  flush=True)
            torch.manual_seed(args.seed)
            model = Transformer(ModelConfig.from_hf(DEMO_CONFIG))
            model.init_weights()
            optimizer = make_optimizer(model.parameters(), BASE_LR)
            tok = data.ToyTokenizer()
            examples = data.tokenize_records(tok, data.load_records(paths["base"], role="safe"), 64, None)[0]
            batches = data.BatchIterator(examples, BASE_BATCH, seed=args.seed)
            t = time.time()
            for step in range(BASE_STEPS):
                for group in optimizer.param_groups:  # linear warmup: full-lr first steps can stall it on a plateau
                    group["lr"] = BASE_LR * min(1.0, (step + 1) / BASE_WARMUP)
                loss = sft_step(model, optimizer, next(batches))["loss"]
                if (step + 1) % 200 == 0:
                    print(f"demo: base model step {step + 1}/{BASE_STEPS} | loss {loss:.3f} | {time.time() - t:.0f}s", flush=True)
            tmp = out / ".base.tmp"
            try:
                save_model(model, tmp)
                (tmp / data.ToyTokenizer.FILE).write_text(json.dumps({"toy_world_seed": args.seed}) + "\n")
            except (OSError, SafetensorError) as e:  # a full disk: safetensors' own error names no file
                raise RunError(f"could not write the demo's base model {tmp}: {describe(e)} ({free_space(out)})") from e
            shutil.rmtree(base, ignore_errors=True)
            os.rename(tmp, base)
    barrier()
    args.model, args.safe_data, args.unsafe_data = str(base), str(out / "data" / "safe.jsonl"), str(out / "data" / "unsafe.jsonl")
    if args.retain_weight > 0 and args.retain_data is None:
        args.retain_data = str(out / "data" / "retain.jsonl")


def check(args):
    """--check: what a run would refuse, found now and in seconds (train.sh runs it for every stage before the first
    starts): the flags (parse_args has checked them), --model's config.json, and every data file the run reads, read as
    it reads it, record by record, and large enough for one global batch. Nothing is loaded, trained or written. The
    demo's data and base model are made by its run: there is only the flags to check."""
    if args.model is not None:
        if not (Path(args.model) / "config.json").is_file():
            raise data.DataError(f"--model {args.model}: not a checkpoint directory (no config.json)")
        try:
            model_config(args.model)
        except (OSError, ValueError, KeyError, TypeError) as e:  # a cut config.json, or one of another architecture
            raise data.DataError(f"--model {args.model}: {e}") from None
        for name, path, fmt, batch in stream_sets(args):
            flag = "--retain-data" if name == "retain" else "--safe-data" if name == "safe" else "--unsafe-data"
            try:
                records = data.load_records(path, args.prompt_field, args.response_field, fmt,
                                            role="unsafe" if name == "harmful" else name,
                                            field_flags="--prompt-field/--response-field")
            except data.DataError as e:
                raise data.DataError(f"{flag} {e}") from None
            if len(records) < batch:
                raise data.DataError(f"{flag} {path}: {len(records)} records, too few for one global batch of {batch}")
    print(f"{Path(sys.argv[0]).name}: the flags are valid" + (", the model's config.json and the data read" if args.model
                                                               else " (the demo makes its data when it runs)"), flush=True)


USER_ERRORS = (data.DataError, CheckpointError, RunError, FloatingPointError, OSError)
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def interruption(args, step):
    """The line for Ctrl-C or SIGTERM: the step the run reached, and whether and from where --resume continues."""
    latest = Path(args.out) / "checkpoints" / "latest"
    if latest.exists():
        how = f"--resume continues from checkpoint {latest.read_text().strip()} ({latest.parent})"
    elif args.save_every:
        how = f"no checkpoint to resume from yet (--save-every {args.save_every})"
    else:
        how = "no checkpoint to resume from: --save-every is 0"
    return f"{f' at step {step}' if step is not None else ''}; {how}"


SIGNALLED = []  # the signals main() received, in order; the first interrupted the run: SIGINT (Ctrl-C) or SIGTERM


def on_signal(signum, frame):
    """SIGTERM is handled as Ctrl-C: a KeyboardInterrupt wherever the run is, which main() reports. Only the first
    one raises: a second (Ctrl-C reaches train.sh's whole process group, and train.sh then sends SIGTERM too) must not
    cut short what the first started, the way out that gives the lock back and says how to continue."""
    SIGNALLED.append(signum)
    if len(SIGNALLED) == 1:
        raise KeyboardInterrupt


def hold_signals():
    """From here on a Ctrl-C or SIGTERM is only recorded: main() is saying how the run ended."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: SIGNALLED.append(signum))


def watch_parent():
    """Under train.sh (env PATCHER_PARENT_PID): end this process as SIGTERM would once train.sh is gone, so that a
    train.sh killed with kill -9 leaves no program running into its directories."""
    pid = int(os.environ.get("PATCHER_PARENT_PID") or 0)

    def watch():
        while alive(pid):
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
    if pid:
        threading.Thread(target=watch, daemon=True).start()


def cpu_threads():
    """torch's threads on a machine without CUDA, unless OMP_NUM_THREADS sets them: at most the cores that other work
    leaves free (the cores this process may use minus the 1-minute load average), shared among this host's ranks, with
    one line saying so when that is fewer than torch's default (a thread per core). Threads beyond the free cores wait
    for one: `python patcher.py` with 2 threads took 372 s instead of 10 s on 2 cores that another job kept busy.
    Changes nothing under torchrun with several ranks (it sets OMP_NUM_THREADS=1) nor on a GPU machine. Returns the
    threads it set, or None."""
    if os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    ranks, default = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))), torch.get_num_threads()
    n = max(1, min(default, round((cores - busy) / ranks)))
    if n == default:
        return None
    torch.set_num_threads(n)
    if os.environ.get("RANK", "0") == "0":
        print(f"cpu: {n} thread{'s' * (n > 1)} per process, not {default}: {cores} cores, {busy:.1f} busy with other work "
              f"(load average), {ranks} rank{'s' * (ranks > 1)} on this host; OMP_NUM_THREADS=N chooses", flush=True)
    return n


def main(run_fn=None, parse=parse_args, interrupted=interruption, program=None, plan_fn=None, check_fn=None):
    """Parse, run (or --plan: plan_fn; --check: check_fn), and report a user error (bad data, a bad checkpoint, NaN, a refused resume, a
    full disk, an --out in use) as one line and exit code 1, and Ctrl-C or SIGTERM as one line saying how to continue
    (interrupted()), exit code 130 or 143 (as shells report SIGINT and SIGTERM); tracebacks are for bugs (or --debug /
    PATCHER_DEBUG=1). One run per --out: the run holds out/.lock (take_lock) while it runs, and gives it back however
    it ends."""
    SIGNALLED.clear()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    program = program or Path(sys.argv[0]).name
    args, debug = None, os.environ.get("PATCHER_DEBUG")
    try:
        args = parse()
        debug = debug or args.debug
        cpu_threads()
        watch_parent()
        if getattr(args, "plan", False):
            (plan_fn or plan)(args)
            exit_now(0)
        if getattr(args, "check", False):
            (check_fn or check)(args)
            exit_now(0)
        if os.environ.get("RANK", "0") == "0":  # rank 0 speaks for the run
            take_lock(args.out, program)
        (run_fn or run)(args)
    except MemoryRefused:  # rank 0 has said why
        exit_now(1)
    except USER_ERRORS as e:
        hold_signals()
        if debug:
            raise
        stop = " (stopped before the update; the last checkpoint and export are intact)" if isinstance(e, FloatingPointError) else ""
        full = f" ({free_space(e.filename)})" if isinstance(e, OSError) and e.filename and e.errno in FULL_DISK else ""
        print(f"error: {e}{full}{stop}", file=sys.stderr, flush=True)
        exit_now(1)
    except Finished as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, flush=True)
    except KeyboardInterrupt as e:
        hold_signals()
        if debug:
            raise
        term = SIGNALLED[:1] == [signal.SIGTERM]
        how = (interrupted(args, getattr(e, "step", None)) if args is not None else
               " before the run started; nothing was written: run the same command again")
        print(f"interrupted{' by SIGTERM' if term else ''}{how}", file=sys.stderr, flush=True)
        exit_now(143 if term else 130)
    finally:
        release_lock()  # whatever ended the run (a traceback too)
    exit_now(0)


def alive(pid):
    """Whether process `pid` of this host is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def process_start(pid):
    """When process `pid` started, in clock ticks after boot (/proc/PID/stat, its 22nd field), or None where that is
    not known (no /proc: not Linux; no such process). With the pid it names one process: pids are reused, not this."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # the fields after the name (which may hold spaces)
    except (OSError, ValueError, IndexError):
        return None


def lock_holder(text):
    """The run a lock's bytes name ({"host", "pid", "program", "started", "pid_start"}), or None if they are not a
    run's lock (empty, not JSON, no host or pid)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int)
    return holder if ok and holder["pid"] > 0 else None


def still_running(holder):
    """Whether the run that wrote a lock of this host still runs: its pid is alive and is still that run's process (the
    start time the lock recorded; a lock without one: the run's program in the pid's command line)."""
    pid = holder["pid"]
    if not alive(pid):
        return False
    recorded, now = holder.get("pid_start"), process_start(pid)
    if recorded is not None and now is not None:
        return recorded == now
    try:
        return str(holder.get("program")) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True  # no /proc (not Linux): a live pid is all there is to go by


def take_over(path, seen):
    """Remove the stale lock `path`, whose bytes were `seen`, unless another run got there first (True: this one did).
    Two runs that find the same stale lock must not both remove "it": the second would remove the lock the first has
    just taken. So the stale lock is first linked to a claim named after its bytes, which only one run can create; that
    one removes the lock if the claim holds those bytes (the lock was not replaced meanwhile)."""
    claim = path.with_name(f"{path.name}.stale-{hashlib.sha256(seen).hexdigest()[:16]}")
    try:
        os.link(path, claim)
    except (FileExistsError, FileNotFoundError):  # another run is taking it over, or has
        return False
    try:
        if claim.read_bytes() != seen:
            return False
        path.unlink()
        return True
    finally:
        claim.unlink()


def take_lock(out, program):
    """Hold out/.lock (host, pid and its start time, program, start) for this run: a second run into the same directory
    is refused at once, naming the holder. A lock whose holder is gone (this host: no such process, or its pid is now
    another process's) is taken over (take_over), with a line saying so; a lock that is not a run's (empty, not JSON)
    is refused, naming the fix. The lock is created by a hard link of a complete file: it is never seen half written,
    and nothing is left behind on any failure."""
    out, host = Path(out), socket.gethostname()
    path, tmp = out / ".lock", out / f".lock.{os.getpid()}"
    me = {"host": host, "pid": os.getpid(), "pid_start": process_start(os.getpid()), "program": program,
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out.mkdir(parents=True, exist_ok=True)
    try:
        with naming(tmp):
            tmp.write_text(json.dumps(me) + "\n")
        for _ in range(10):
            try:
                os.link(tmp, path)
                HELD_LOCK.append(path)
                return path
            except FileExistsError:
                pass
            try:
                seen = path.read_bytes()
            except FileNotFoundError:
                continue  # given back meanwhile: try again
            holder = lock_holder(seen)
            if holder is None:
                raise RunError(f"--out {out}: its lock {path} is not a run's lock ({seen[:60]!r}): remove it if no run "
                               f"is using {out}")
            said = (f"{holder.get('program', '?')} (host {holder['host']}, pid {holder['pid']}, started "
                    f"{holder.get('started')})")
            if holder["host"] != host or still_running(holder):
                raise RunError(f"--out {out} is in use by {said}: one run per directory; wait for it, or use another "
                               f"--out" + (f" (if it is gone, remove {path})" if holder["host"] != host else ""))
            if take_over(path, seen):
                print(f"{program}: --out {out} was locked by {said}, which is no longer running: taking it over",
                      flush=True)
            else:
                time.sleep(0.05)  # another run is taking it over: look at what it leaves
        raise RunError(f"--out {out}: could not take its lock {path} (other runs kept taking it); if no run is using "
                       f"{out}, remove {path}")
    finally:
        tmp.unlink(missing_ok=True)


HELD_LOCK = []  # the lock this process holds (exit_now gives it back)


def release_lock():
    """Give out/.lock back, if it is still this process's."""
    while HELD_LOCK:
        path = HELD_LOCK.pop()
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass


def exit_now(code):
    """End the process (giving its lock back). Under torchrun skip the interpreter's teardown: gloo's threads sometimes
    abort it ("terminate called without an active exception", about 1 run in 10 here), which would turn a finished
    run into a failed one, and a peer that is gone can block the process group's destruction."""
    release_lock()
    sys.stdout.flush()
    sys.stderr.flush()
    if "RANK" in os.environ or dist.is_initialized():
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
