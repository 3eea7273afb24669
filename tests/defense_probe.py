"""Run by test_defenses.py under torchrun (gloo, 2 ranks): one update of every defense of patcher.DEFENSES on the tiny
model sharded with FSDP2, each rank holding half of the batch rows (an attack vector for those with an inner attack,
sharded like the weights); rank 0 saves the whole weights after each ({mode}.safetensors) and every number the update
returned ({mode}.json), to be compared with one process. Usage: defense_probe.py WORKDIR"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import patcher  # noqa: E402
from test_defenses import LR, args_for, probe_delta  # noqa: E402
from test_patcher import tiny_model, toy_batch  # noqa: E402


def main():
    work = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for mode, defense in patcher.DEFENSES.items():
        model = tiny_model()
        delta = probe_delta(model) if defense.attacks_each_round else None  # the whole tensors, before sharding
        patcher.fsdp_sharder("fp32")(model)
        p = model.model.layers[0].self_attn.q_proj.weight
        assert p.to_local().shape[0] < p.shape[0], "parameter is not sharded"
        if delta is not None:
            params = dict(model.named_parameters())
            delta = {n: distribute_tensor(d, params[n].device_mesh, params[n].placements) for n, d in delta.items()}
        safe, harmful = toy_batch(n=8), toy_batch(n=8, split="unsafe")
        mine = [{k: v[rank::world] for k, v in b.items()} for b in (safe, harmful)]  # this rank's rows
        metrics = defense.update(model, torch.optim.SGD(model.parameters(), lr=LR), patcher.Batches(*mine),
                                 args_for("--mode", mode, "--max-grad-norm", 0), delta, patcher.snapshot(model))
        full = {n: p.full_tensor().contiguous() for n, p in model.named_parameters()}
        if rank == 0:
            save_file(full, work / f"{mode}.safetensors")
            (work / f"{mode}.json").write_text(json.dumps(metrics))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip gloo's interpreter-exit teardown, which sometimes aborts (see patcher.exit_now)


if __name__ == "__main__":
    main()
