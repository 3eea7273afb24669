"""Run by test_model.py under torchrun (gloo): load a checkpoint straight into FSDP2 shards,
compute logits, export. Usage: dist_model.py CHECKPOINT WORKDIR"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import load_model, save_model  # noqa: E402


def shard(model):
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def main():
    src, work = Path(sys.argv[1]), Path(sys.argv[2])
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
    save_model(model, work / "sharded", dtype=torch.float32)
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's interpreter-exit teardown, which sometimes aborts (see patcher.exit_cleanly)


if __name__ == "__main__":
    main()
