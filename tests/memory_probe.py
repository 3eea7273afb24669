"""Peak memory of real runs against their memory plans, per rank (for tests/test_memory_plan.py).

    MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 python tests/memory_probe.py CASES.json OUT
    ... torchrun --standalone --nproc_per_node=2 tests/memory_probe.py CASES.json OUT

CASES.json: [{"name", "program": "patcher" | "parallel" | "eval", "argv": [...]}]. Each case runs the program's own
run() in this process, one after the other, and every rank writes OUT/NAME-rankR.json: {"measured", "phases",
"inner attack", "file pages"}. `phases` is {phase: bytes} of the plan that the run itself checked
(patcher.check_memory, wrapped here); "inner attack" is the measured peak of the last inner attack (patcher.py's);
"file pages" how much of the resident memory that ended the case was mapped files (libraries, checkpoints) beyond
what it was at the start: resident memory counts them, and a machine short of memory evicts and reloads them;
`measured` is the peak resident memory of this process while the case ran (VmHWM in /proc/self/status) minus its
resident memory just before the model was built (patcher.build_model, wrapped here), where the high-water mark is
reset (writing 5 to /proc/self/clear_refs), so that one process measures several cases. (Not ru_maxrss: it cannot be
reset, and it survives exec.)

glibc must not keep freed tensors: with its default dynamic mmap threshold, a freed block of a few MB raises the
threshold, later tensors of that size come from the heap, and freed heap memory stays resident, so RSS would keep the
highest it ever reached instead of following the tensors alive. MALLOC_MMAP_THRESHOLD_=65536 (which also turns the
dynamic threshold off) gives every tensor above 64 KiB its own mapping, returned to the system when it is freed;
MALLOC_TRIM_THRESHOLD_=0 trims the heap's top as well. The caller sets both (they are read when the process starts).
"""
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import parallel  # noqa: E402
import patcher  # noqa: E402

evaluate = __import__("eval")


def status(field):
    """A field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


seen = {}  # what the wrapped functions saw of the case running


def reset_peak():
    """The peak so far into seen["peak"], then the high-water mark starts again from the resident memory now."""
    seen["peak"] = max(seen.get("peak", 0), status("VmHWM"))
    Path("/proc/self/clear_refs").write_text("5")


def build_model(*args, **kwargs):
    if "rss" not in seen:  # the first model of the case (eval.py builds one per model)
        gc.collect()
        seen["rss"], seen["file"] = status("VmRSS"), status("RssFile")
        Path("/proc/self/clear_refs").write_text("5")
    return real_build_model(*args, **kwargs)


def inner_attack(*args, **kwargs):
    """Round r's inner attack, its own peak measured too."""
    reset_peak()
    try:
        return real_inner_attack(*args, **kwargs)
    finally:
        seen["inner attack"] = status("VmHWM") - seen["rss"]
        reset_peak()


def check_memory(args, plan_of, program, world, device, rank, step=1):
    seen["phases"] = {phase: sum(parts.values()) for phase, parts in plan_of(world).items()}
    return real_check_memory(args, plan_of, program, world, device, rank, step)


def init_distributed(precision="fp32", timeout=patcher.COLLECTIVE_TIMEOUT):
    """The process group of the first case for all: one initialised again after its destruction waits forever on
    torchrun's store."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    return real_init_distributed(precision, timeout)


real_build_model, real_check_memory, real_init_distributed = patcher.build_model, patcher.check_memory, \
    patcher.init_distributed
real_inner_attack = patcher.inner_attack
patcher.build_model, patcher.check_memory, patcher.init_distributed = build_model, check_memory, init_distributed
patcher.inner_attack = inner_attack

PROGRAMS = {"patcher": (patcher.run, patcher.parse_args), "parallel": (parallel.run, parallel.parse_args),
            "eval": (evaluate.run, evaluate.parse_args)}


def main():
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    for case in cases:
        seen.clear()
        run, parse = PROGRAMS[case["program"]]
        run(parse(case["argv"]))
        reset_peak()
        rank = dist.get_rank() if dist.is_initialized() else 0
        (out / f"{case['name']}-rank{rank}.json").write_text(json.dumps({
            "measured": seen["peak"] - seen["rss"], "phases": seen["phases"], "inner attack": seen.get("inner attack"),
            "file pages": status("RssFile") - seen["file"]}))
        gc.collect()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's interpreter-exit teardown, which sometimes aborts (see patcher.exit_now)


if __name__ == "__main__":
    main()
