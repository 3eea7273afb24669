"""What the benchmarks share (tests/bench_model.py, tests/gpu_check.py): timing, and the training step
that ours and transformers' models are compared on."""
import time

import torch

import patcher


def sync(device):
    """Wait for the device's queued work, so that a clock reading covers it (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, iters, device):
    """The fastest of `iters` timed calls of fn, after one untimed call (warm-up, and compilation)."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def forward_backward_steps(ours, hf, batch):
    """(ours, transformers'): one forward + backward of each model on `batch`, gradients then cleared. Ours is
    patcher.forward_backward, as training runs it (the vocabulary projection only where the loss looks)."""
    def step_ours():
        patcher.forward_backward(ours, batch)
        ours.zero_grad(set_to_none=True)

    def step_hf():
        hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
        hf.zero_grad(set_to_none=True)
    return step_ours, step_hf
