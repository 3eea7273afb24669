"""Run by test_defenses.py under torchrun (gloo, 2 ranks): one Vaccine and one Booster update of the tiny model
sharded with FSDP2, each rank holding half of the batch rows; rank 0 saves the whole weights after each, to be
compared with one process. Usage: defense_probe.py WORKDIR"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import patcher  # noqa: E402
from test_defenses import LR, args_for  # noqa: E402
from test_patcher import tiny_model, toy_batch  # noqa: E402


def main():
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode in ("vaccine", "booster"):
        model = tiny_model()
        patcher.fsdp_sharder("fp32")(model)
        p = model.model.layers[0].self_attn.q_proj.weight
        assert p.to_local().shape[0] < p.shape[0], "parameter is not sharded"
        safe, harmful = toy_batch(n=8), toy_batch(n=8, split="unsafe")
        mine = [{k: v[rank::world] for k, v in b.items()} for b in (safe, harmful)]  # this rank's rows
        getattr(patcher, f"{mode}_update")(model, torch.optim.SGD(model.parameters(), lr=LR), patcher.Batches(*mine),
                                           args_for("--mode", mode, "--max-grad-norm", 0),
                                           theta_buffer=patcher.snapshot(model))
        full = {n: p.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(full, work / f"{mode}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's interpreter-exit teardown, which sometimes aborts (see patcher.exit_now)


if __name__ == "__main__":
    main()
