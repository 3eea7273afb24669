"""How often an update makes the host wait for the GPU, counted on a CPU, and what a non-finite update does now that
every number of it is read at once, right before its step.

A GPU runs what the host has queued, later. The host waits for it to run dry (a "host sync") when it reads a number
from the device (.item(), .tolist(), float(), bool(), an f-string, an `if` on a tensor), when a result's shape
depends on the device's data (nonzero, a boolean mask, masked_select, unique), and when it copies host memory there
from pageable memory or without non_blocking (only a non_blocking copy from pinned memory is queued like a kernel).
A waiting host has nothing queued when the GPU finishes, so every sync leaves the GPU idle for a while; an update
should wait once, for the numbers it reports, right before its optimizer step.

There is no GPU here, so HostSyncs plays one. It is a TorchFunctionMode that sees every torch call and keeps track
of where each tensor would live in a GPU run:
  - on the host: the batch's tensors (the data loader makes them on the CPU; they are registered with keep_on_host),
    tensors made without a device argument, copies to pinned memory, and whatever an op computes from host tensors
    alone;
  - on the GPU: everything else: parameters, gradients, optimizer state made from them, what autograd makes, what a
    host->device copy or a device= argument makes, whatever an op computes with one device input or more.
It answers `x.device` with cuda:0 for a tensor that would be on the GPU (and runs the op on the CPU), so the code
under test takes its CUDA branch: the `device.type == "cuda"` test in patcher.to_device pins the batch. pin_memory()
needs a GPU build, so the mode stands in for it (a host copy, remembered as pinned), and a `.to(device)` of a host
tensor becomes a copy, as on a GPU (on a CPU it would return the tensor itself). A call counts when the line that made
it is in one of the project's files (patcher.py, model.py, data.py, parallel.py; torch's own calls, as AdamW's reads
of its host step counters, are not the project's) and it is one of the waits above. torch.distributed calls are not
torch functions and are not seen: NCCL queues a collective like a kernel, and agree()'s gloo vote is on CPU tensors.
An op that mixes a host tensor (more than a number) with device tensors would fail on a GPU: the mode records it in
`mixed`, and the tests want none.

On the code as it was before this file (one micro-batch, no retain term), the counter finds per update: SFT 9 waits
(3 reads: the counts, the loss, the gradient norm; 4 pageable copies; 2 boolean masks), Patcher's defender step 17
(5 reads), Vaccine 18, Booster 26; and 2 in parallel.py's stop check before each attack step (a copy, a read). Now:
1 per update and per attack step (the read of its numbers before the step), 0 in the stop check.
"""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary

import parallel
import patcher
from conftest import ROOT
from test_patcher import tiny_model, toy_batch

PROJECT = {str(ROOT / f) for f in ("patcher.py", "model.py", "data.py", "parallel.py")}
GPU = torch.device("cuda", 0)
# the files a call passes through between the line that made it and the mode (a Python-level torch function that
# hands itself to the mode): the line that made the call is the first frame outside them
DISPATCH = {m.__file__ for m in (torch.overrides, torch._tensor, torch.functional, torch.nn.functional, torch._jit_internal)}
DEVICE = torch._C.TensorBase.__dict__["device"]  # the `x.device` property
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "__repr__", "__str__",
         "numpy", "__array__", "__contains__", "equal", "allclose"}
DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_return_output",
               "_return_inverse", "_return_counts", "_return_inverse_and_counts", "bincount"}


def tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def names(device_type, x):
    """Whether x is a device (or a device's name) of that type."""
    return (isinstance(x, torch.device) and x.type == device_type) or (isinstance(x, str) and x.startswith(device_type))


class HostSyncs(TorchFunctionMode):
    """Counts the host syncs a GPU would take in the calls made from `files` (see the module docstring).
    syncs: [(kind, "file:line")]; mixed: ["file:line"] of ops that mix host and device tensors."""

    def __init__(self, files=PROJECT):
        super().__init__()
        self.files = set(files)
        self.host = WeakIdKeyDictionary()  # tensor -> whether it is pinned
        self.syncs, self.mixed = [], []

    def keep_on_host(self, tree, pinned=False):
        for t in tensors(tree):
            self.host.setdefault(t, pinned)

    def on_host(self, t):
        return t in self.host

    def caller(self):
        """The line that made the call, "file:line", if it is in one of self.files."""
        f = sys._getframe(2)
        while f is not None and f.f_code.co_filename in DISPATCH:
            f = f.f_back
        if f is not None and f.f_code.co_filename in self.files:
            return f"{Path(f.f_code.co_filename).name}:{f.f_lineno}"
        return None

    def count(self, kind, where):
        if where is not None:
            self.syncs.append((kind, where))

    def kinds(self):
        return sorted({k for k, _ in self.syncs})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is DEVICE:  # x.device: where it would be on a GPU run
            return torch.device("cpu") if self.on_host(args[0]) else GPU
        name, where = getattr(func, "__name__", ""), self.caller()
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if name == "pin_memory":  # needs a GPU build: a host copy stands in, remembered as pinned
            out = src.clone()
            self.keep_on_host(out, pinned=True)
            return out
        if name == "is_pinned":
            return self.host.get(src, False)
        rest = tree_flatten((args[1:], kwargs))[0]
        to_gpu = any(names("cuda", a) for a in rest) or name == "cuda" or (
            name == "to" and any(isinstance(a, torch.Tensor) and not self.on_host(a) for a in args[1:]))
        to_cpu = name == "cpu" or (name == "to" and any(names("cpu", a) for a in rest))
        inputs = tensors((args, kwargs))
        on_device = [t for t in inputs if not self.on_host(t)]
        out = func(*tree_map(lambda a: "cpu" if names("cuda", a) else a, args),  # and run it on the CPU
                   **tree_map(lambda a: "cpu" if names("cuda", a) else a, kwargs))
        # host -> device: from Python data (torch.tensor), or a host tensor's copy
        if name in ("tensor", "as_tensor") and to_gpu:
            self.count("copy from pageable memory", where)
            return out
        if name in ("to", "cuda") and to_gpu and src is not None and self.on_host(src):
            if not (kwargs.get("non_blocking") and self.host[src]):
                self.count("copy from pageable memory" if not self.host[src] else "blocking copy", where)
            return out.clone() if out is src else out  # a copy, as on a GPU; not the host tensor itself
        if name == "copy_" and self.on_host(src) != self.on_host(args[1]):
            if self.on_host(src):  # into host memory: the host has to wait for the value
                self.count("read", where)
            elif not (kwargs.get("non_blocking") and self.host[args[1]]):
                self.count("copy from pageable memory", where)
            return out
        # device -> host
        if on_device and to_cpu:
            self.count("read", where)
            out = out.clone() if out is src else out
            self.keep_on_host(out)
            return out
        if on_device and name in READS:
            self.count("read", where)
        elif on_device and name in DATA_SHAPED:
            self.count("data-dependent shape", where)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put"):
            index = tensors(args[1])
            if any(t.dtype == torch.bool for t in index) and on_device:
                self.count("boolean mask", where)
            elif not self.on_host(src) and any(self.on_host(t) and t.dim() > 0 for t in index):
                self.count("copy from pageable memory", where)  # a host index for a device tensor is copied there
        elif on_device and any(self.on_host(t) and t.dim() > 0 for t in inputs) and where is not None:
            self.mixed.append(f"{name} at {where}")
        if not on_device and not to_gpu:
            self.keep_on_host(out)
        return out


def host_batch(counter, *batches):
    for b in batches:
        counter.keep_on_host(b)
    return batches


# --- the counter counts what a GPU would wait for, and nothing else ----------------------------------------------

def test_the_counter_counts_what_a_gpu_waits_for():
    model, batch = tiny_model(), toy_batch()
    w = model.lm_head.weight
    with HostSyncs(PROJECT | {__file__}) as c:
        c.keep_on_host(batch)
        labels = batch["labels"]
        assert w.device == GPU and labels.device.type == "cpu" and (labels + 1).device.type == "cpu"
        labels.sum().item(), float(labels[0, 0]), bool((labels > 0).any()), labels[labels > 0], (labels > 0).nonzero()
        assert c.syncs == []  # all on the host: no wait
        x = torch.zeros(3, device=w.device)  # made there: no wait
        ids = batch["input_ids"].to(w.device)  # pageable: a wait
        pinned = batch["input_ids"].pin_memory().to(w.device, non_blocking=True)  # queued
        assert ids.device == pinned.device == GPU and batch["input_ids"].device.type == "cpu"
        assert c.kinds() == ["copy from pageable memory"] and len(c.syncs) == 1
        torch.tensor([1.0], device=w.device)  # from a Python list: pageable
        pinned.sum().item()
        f"{w.norm():.3f}"
        if w.sum() > 0:
            pass
        math.isfinite(x[0])
        w[w > 0], pinned.flatten().nonzero(), ids.flatten().index_select(0, batch["input_ids"].flatten()[:2])
        assert [k for k, _ in c.syncs[1:]] == ["copy from pageable memory"] + ["read"] * 4 + [
            "boolean mask", "data-dependent shape"]
        assert all(where.startswith("test_host_syncs.py:") for _, where in c.syncs)
        assert [m.split(" at ")[0] for m in c.mixed] == ["index_select"]  # a GPU refuses a host index there
    with HostSyncs() as c:  # the same calls from a file not listed: not counted
        w.sum().item()
    assert c.syncs == []


def test_to_device_queues_the_copy_from_pinned_memory():
    """patcher.to_device on a GPU: pinned, non_blocking, no wait; the result lives there. On a CPU run: the tensor."""
    t = toy_batch()["input_ids"]
    with HostSyncs() as c:
        c.keep_on_host(t)
        out = patcher.to_device(t, GPU)
        assert out.device == GPU and out is not t and torch.equal(out, t)
    assert c.syncs == [] and c.mixed == []
    assert patcher.to_device(t, torch.device("cpu")) is t


# --- every update waits once ------------------------------------------------------------------------------------

MAX_SYNCS = 3  # per update, per attack step: the bound (the code reaches 1)


def updates_counted(mode, n=2):
    """The host syncs of each of n updates of --mode `mode` on two micro-batches, with the retain term."""
    defense = patcher.DEFENSES[mode]
    model = tiny_model()
    args = patcher.get_parser().parse_args(["--mode", mode])
    args.retain_weight = 0.5
    delta = {k: 0.01 * torch.randn_like(p) for k, p in model.named_parameters()} if defense.attacks_each_round else None
    buf = patcher.snapshot(model) if defense.moves_theta else None
    optimizer = patcher.make_optimizer(model.parameters(), 1e-3)
    counts = []
    for step in range(n):
        with HostSyncs() as c:
            safe, harmful, retain = host_batch(c, [toy_batch(seed=step, n=4), toy_batch(seed=step, n=3)],
                                               [toy_batch(seed=step, n=4, split="unsafe")], [toy_batch(n=2, split="retain")])
            metrics = defense.update(model, optimizer, patcher.Batches(safe, harmful if defense.harmful else None, retain),
                                     args, delta, buf)
        assert c.mixed == []
        assert all(isinstance(v, float) for v in metrics.values())  # what the log writes: numbers, read already
        counts.append(c.syncs)
    return counts


@pytest.mark.parametrize("mode", list(patcher.DEFENSES))
def test_an_update_waits_for_the_gpu_at_most_three_times(mode):
    for syncs in updates_counted(mode):
        assert len(syncs) <= MAX_SYNCS, syncs


@pytest.fixture
def votes():
    """A one-rank gloo group, as parallel.run makes one per half for agree()."""
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group([0], backend="gloo")
    finally:
        if made:
            dist.destroy_process_group()


def test_an_attack_step_with_parallel_stop_check_waits_at_most_three_times(votes):
    """sft_steps, the loop of the inner, the parallel and the test-time attack, with parallel.py's attacker check
    before each step (agree() on whether the defender said stop)."""
    model = tiny_model()
    optimizer = patcher.make_optimizer(model.parameters(), 1e-3)
    with HostSyncs() as c:
        batches = iter(host_batch(c, *[toy_batch(seed=s, n=4, split="unsafe") for s in range(4)]))
        marks = []
        stop = lambda: marks.append(len(c.syncs)) or parallel.agree(False, votes, dist.ReduceOp.MAX)  # noqa: E731
        losses = patcher.sft_steps(model, optimizer, batches, 4, should_stop=stop)
        marks.append(len(c.syncs))
        assert parallel.agree(True, votes, dist.ReduceOp.MAX) and not parallel.agree(False, votes, dist.ReduceOp.MIN)
    assert len(losses) == 4 and all(isinstance(x, float) for x in losses) and c.mixed == []
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    assert len(per_step) == 4 and max(per_step) <= MAX_SYNCS, c.syncs


# --- a non-finite update still stops before its step ------------------------------------------------------------

def bits(model):
    return {n: p.detach().clone().view(torch.int32) for n, p in model.named_parameters()}  # NaN == NaN, bit for bit


def update_once(mode, model, delta=None):
    defense = patcher.DEFENSES[mode]
    optimizer = patcher.make_optimizer(model.parameters(), 1e-3)
    batch = patcher.Batches(toy_batch(n=4), toy_batch(n=4, split="unsafe") if defense.harmful else None)
    if defense.attacks_each_round and delta is None:
        delta = {k: 0.01 * torch.randn_like(p) for k, p in model.named_parameters()}
    before = bits(model)
    with pytest.raises(FloatingPointError) as e:
        defense.update(model, optimizer, batch, patcher.get_parser().parse_args(["--mode", mode]), delta,
                       patcher.snapshot(model) if defense.moves_theta else None)
    assert all(torch.equal(p.detach().view(torch.int32), before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state  # no step, no gradient left
    return str(e.value)


@pytest.mark.parametrize("mode", list(patcher.DEFENSES))
def test_a_non_finite_loss_stops_the_update_before_its_step(mode):
    """NaN in the final norm: every loss is NaN; the first one the update computes is named."""
    model = tiny_model()
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    first = {"booster": "h(theta)"}.get(mode, "L(theta)")  # Booster starts with the harmful loss
    assert update_once(mode, model) == f"{first} is nan"


def test_the_first_non_finite_number_is_named():
    """L(theta) finite, L(theta + delta) not: Patcher names the attacked loss; finite losses with a gradient whose
    norm overflows fp32: the gradient norm."""
    model = tiny_model()
    delta = {k: torch.full_like(p, float("inf")) for k, p in model.named_parameters()}
    assert update_once("patcher", model, delta) == "L(theta + delta) is nan"
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e20)  # logits ~1e20: a finite loss, gradients that overflow fp32 in backward
    assert update_once("sft", model) in ("the gradient norm is inf", "the gradient norm is nan")
