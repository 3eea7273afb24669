"""Run by test_model.py under torchrun (gloo): load a checkpoint straight into FSDP2 shards, compute logits,
export it and a tiny checkpoint (rows that do not split evenly, a rank with none) with no rank but the first ever
holding a whole tensor, then LoRA gradients on this rank's half of a batch, two micro-batches, counting the
all-reduces of each backward. Usage: dist_model.py CHECKPOINT TINY_CHECKPOINT WORKDIR"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import add_lora, load_model, save_model  # noqa: E402


def shard(model):
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def add_test_lora(model):
    """LoRA on q_proj and v_proj, with B random (at its initial zero, A would get no gradient)."""
    lora = add_lora(model, rank=4, alpha=8.0, targets=["q_proj", "v_proj"], seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in lora[1::2]:  # add_lora returns A, B of each layer in turn
            b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return lora


def next_token_loss(model, idx):
    logits = model(idx)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())


def export_on_first_rank_only(model, out):
    """save_model, with every way of assembling a whole tensor on all ranks made to fail."""
    def refuse(*args, **kwargs):
        raise AssertionError("save_model gathered a whole tensor onto every rank")

    saved = DTensor.full_tensor, dist.all_gather, dist.all_gather_into_tensor
    DTensor.full_tensor, dist.all_gather, dist.all_gather_into_tensor = refuse, refuse, refuse
    try:
        save_model(model, out, dtype=torch.float32)
    finally:
        DTensor.full_tensor, dist.all_gather, dist.all_gather_into_tensor = saved


def main():
    src, tiny, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = load_model(src, shard=shard)
    # every parameter is sharded: this rank holds only its rows
    p = model.model.layers[0].self_attn.q_proj.weight
    assert p.to_local().shape[0] < p.shape[0], "parameter is not sharded"
    idx = torch.load(work / "idx.pt", weights_only=True)
    with torch.no_grad():
        logits = model(idx)
    torch.save(logits, work / f"logits{rank}.pt")
    export_on_first_rank_only(model, work / "sharded")
    small = load_model(tiny, shard=shard)
    assert small.model.embed_tokens.weight.to_local().shape[0] == 1 - rank  # one row: rank 1 holds none
    export_on_first_rank_only(small, work / "tiny-sharded")

    lora = add_test_lora(model)
    mine = torch.load(work / "lora_idx.pt", weights_only=True).chunk(2)[rank]
    calls, all_reduce = [], dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: calls.append(1) or all_reduce(*args, **kwargs)
    per_backward = []
    for micro in mine.chunk(2):  # gradient accumulation: one backward per micro-batch
        n = len(calls)
        (next_token_loss(model, micro) / 2).backward()
        per_backward.append(len(calls) - n)
    dist.all_reduce = all_reduce
    torch.save({"grads": [p.grad for p in lora], "all_reduces": per_backward}, work / f"lora{rank}.pt")
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's interpreter-exit teardown, which sometimes aborts (see patcher.exit_cleanly)


if __name__ == "__main__":
    main()
