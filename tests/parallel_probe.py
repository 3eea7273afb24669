"""parallel.py with its four transfers recorded (for tests/test_parallel.py): every rank saves what it sent,
received and installed, as plain tensors, into $PROBE_DIR. Usage: torchrun ... parallel_probe.py ARGS..."""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import parallel  # noqa: E402
import patcher  # noqa: E402

FOLDER = Path(os.environ["PROBE_DIR"])


def dump(event, r, **items):
    plain = {k: {n: t.detach().cpu().clone() for n, t in v.items()} if isinstance(v, dict) else v for k, v in items.items()}
    FOLDER.mkdir(parents=True, exist_ok=True)
    torch.save(plain, FOLDER / f"rank{dist.get_rank()}-{event}-{r}.pt")


def params(model):
    return parallel.local_shards(dict(model.named_parameters()))


def probe(fn, record):
    def wrapped(*args):
        out = fn(*args)
        record(out, *args)
        return out
    return wrapped


sent = {"r": 0}  # the attacker numbers its sends of theta_att itself


def on_theta_att(out, partner, model, seconds, losses, device):
    dump("theta_att-sent", sent["r"], theta_att=params(model))
    sent["r"] += 1


parallel.send_theta = probe(parallel.send_theta, lambda out, partner, model, r, step: dump("theta-sent", r, step=step, theta=params(model)))
parallel.receive_theta = probe(parallel.receive_theta, lambda start, partner, model, r: dump("theta-received", r, step=start, theta=params(model)))
parallel.send_theta_att = probe(parallel.send_theta_att, on_theta_att)
parallel.install = probe(parallel.install, lambda out, partner, delta, reference, r, k1, device: dump(
    "installed", r, theta=parallel.local_shards(reference), delta=parallel.local_shards(delta)))

if __name__ == "__main__":
    patcher.main(parallel.run, parallel.parse_args)
