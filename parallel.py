"""
Parallel Patcher: the defender keeps training on a stale attack vector while the attacker computes the next one.

    torchrun --nproc_per_node=8 patcher.py --mode parallel --model DIR --align-data A --attack-data B   # 4 + 4 ranks
    torchrun --nproc_per_node=2 patcher.py --mode parallel ...       # the paper's setup: one GPU per half

patcher.py's run() hands over to run() below once the job is up. A two-dimensional device mesh (role x fsdp)
splits the world: ranks 0..h-1 are the defender half, ranks h..2h-1 the attacker half (h = world / 2), and
each half FSDP2-shards the model over its own row of the mesh. Both halves shard the same model the same way,
so defender i (rank i) and attacker i (rank h + i) hold the same rows of every parameter: theta and theta_att
travel between these partners as local shards, point to point, never gathered and never written to disk.

    defender  warmup | send theta_0 | sft sft ... sft | install delta_0, send theta_1 | defend ... | install delta_1 ...
    attacker  (idle) | recv theta_0 | k1 attack steps | send theta_att_0  recv theta_1 | k1 attack steps ...

The defender's budget is the sequential one, --warmup-steps + --rounds x --defend-steps steps, so the two modes
compare at equal defender steps; the attacker runs as many attacks as fit. Every --refresh-every steps the
defender looks, without blocking, whether the attack in flight has finished; if so it installs
delta = theta_att - theta (--delta-ref current: theta now; start: the theta the attack started from) and at once
sends its current theta off for the next attack. Until the first delta arrives it takes plain SFT steps.
--sync waits for each attack at every k2-th step instead: that is exactly the sequential schedule of patcher.py.

Signals go through the rendezvous store that torchrun already runs (a gloo irecv cannot be polled: NOTES.md),
tensors through send/recv. Every transfer is announced by a key and received only once announced, so no send is
ever left unmatched, also when the run stops with an attack in flight. The keys (i: the pair, r: the attack):

    theta/{r}/{i}    defender i sends the theta of attack r (value: the defender step it was taken at)
    ready/{r}/{i}    attacker i has finished attack r
    go/{r}/{i}       defender i receives theta_att of attack r now
    stop             the defender's budget is spent: the attacker abandons its attack and exits
    alive/{rank}     a heartbeat counter, so that a dead partner is told from a busy one
    abort/{rank}     why that rank failed
"""
import json
import os
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import patcher
from model import save_model

DEFENDER, ATTACKER = 0, 1  # the "role" coordinate of the device mesh
POLL = 0.01  # seconds between looks at the store while waiting for a key

# -----------------------------------------------------------------------------
# 1. The line between partners: store keys for signals, send/recv for tensors, a heartbeat for liveness


class PeerLost(RuntimeError):
    """The partner rank reported a failure or stopped sending heartbeats."""


def connect_store(timeout):
    """A client of the rendezvous store: torchrun's agent runs it (or rank 0, when launched without torchrun)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout))
    # a torchrun restart keeps the agent's store: its keys must not be taken for this attempt's
    return dist.PrefixStore(f"patcher/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


class Partner:
    """This rank's line to its partner in the other half: defender i <-> attacker i."""

    def __init__(self, rank, world, timeout):
        half = world // 2
        self.rank, self.peer, self.pair, self.timeout = rank, (rank + half) % world, rank % half, timeout
        self.store = connect_store(timeout)
        self.beats, self.beats_at = -1, time.monotonic()  # the partner's heartbeat count, and when it last changed
        self.stopped = threading.Event()
        # a thread with its own store client, so that a rank deep in a long step still counts as alive
        self.heart = threading.Thread(target=self._beat, args=(connect_store(timeout),), daemon=True)
        self.heart.start()

    def _beat(self, store):
        while True:
            try:
                store.add(f"alive/{self.rank}", 1)
            except Exception:  # the store is gone, and with it the job: the main thread will notice
                return
            if self.stopped.wait(min(1.0, self.timeout / 4)):
                return

    def close(self):
        self.stopped.set()
        self.heart.join()

    def key(self, name, r):
        return f"{name}/{r}/{self.pair}"

    def set(self, key, value="1"):
        self.store.set(key, str(value))

    def has(self, key):
        return self.store.check([key])

    def get(self, key):
        return self.store.get(key).decode()

    def check(self):
        """Raise PeerLost if the partner reported a failure or has not beaten for --peer-timeout seconds."""
        if self.has(f"abort/{self.peer}"):
            raise PeerLost(f"partner rank {self.peer} failed: {self.get(f'abort/{self.peer}')}")
        beats, now = self.store.add(f"alive/{self.peer}", 0), time.monotonic()
        if beats != self.beats:
            self.beats, self.beats_at = beats, now
        elif now - self.beats_at > self.timeout:
            raise PeerLost(f"partner rank {self.peer} did not respond within {self.timeout:g} s (no heartbeat)")

    def wait(self, key, stop=True):
        """Block until `key` is set (True), or with stop=True until the defender says stop (False),
        watching the partner meanwhile."""
        while not self.has(key):
            if stop and self.has("stop"):
                # All defenders set their keys at the same step and "stop" only after their last step,
                # so once "stop" is visible every key sent before it is too: this answer is final.
                return self.has(key)
            self.check()
            time.sleep(POLL)
        return True

    def send(self, tensors):
        works = [dist.isend(t, self.peer) for t in tensors if t.numel()]  # a tiny tensor can leave a rank no rows
        for work in works:
            work.wait()

    def recv(self, tensors):
        works = [dist.irecv(t, self.peer) for t in tensors if t.numel()]
        for work in works:
            work.wait()

    def abort(self, why):
        try:  # best effort: the store may be gone with the job
            self.store.set(f"abort/{self.rank}", why)
        except Exception:
            pass


def agree(flag, group, device, op):
    """One decision for the whole half (op MIN: all ranks say yes; MAX: any rank does). Ranks of a half that
    decided differently would deadlock in their next FSDP collective."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=op, group=group)
    return t.item() > 0


@torch.no_grad()
def local_shards(tensors):
    """{name: this rank's rows} of a dict of DTensors, as views: receiving into them writes the parameters.
    Taken afresh for every transfer (FSDP2 may move a parameter's storage at its lazy initialisation)."""
    return {n: t.to_local() for n, t in tensors.items()}


class Dumps:
    """--debug-dir (for the tests): each rank saves what it sent, received and installed, as plain tensors."""

    def __init__(self, folder, rank):
        self.folder, self.rank = (Path(folder) if folder else None), rank
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def __call__(self, event, r, **items):
        if self.folder is None:
            return
        plain = {k: {n: t.detach().cpu().clone() for n, t in v.items()} if isinstance(v, dict) else v
                 for k, v in items.items()}
        torch.save(plain, self.folder / f"rank{self.rank}-{event}-{r}.pt")


# -----------------------------------------------------------------------------
# 2. The attacker half


def attacker(args, model, batches, partner, group, device, dump):
    """Receive theta, attack it in place (k1 steps on D_unsafe) into theta_att, send theta_att back; until stop.
    Returns the number of attacks delivered."""
    params = dict(model.named_parameters())
    lead = partner.pair == 0  # attacker 0 speaks for the half

    def should_stop():  # asked before every attack step
        partner.check()
        return agree(partner.has("stop"), group, device, dist.ReduceOp.MAX)

    r = 0
    while partner.wait(partner.key("theta", r)):
        start = int(partner.get(partner.key("theta", r)))
        partner.recv(local_shards(params).values())  # theta, straight into the parameters
        dump("theta-received", r, step=start, theta=local_shards(params))
        t = time.time()
        losses = patcher.attack_in_place(model, batches, args.attack_steps, args.attack_lr, args.attack_max_grad_norm,
                                         args.attack_weight_decay, should_stop)
        if losses is None:
            if lead:
                print(f"attacker: attack {r} abandoned, the defender is done", flush=True)
            break
        seconds = time.time() - t
        partner.set(partner.key("ready", r))
        if lead:
            print(f"attacker: attack {r} from defender step {start} | k1 {args.attack_steps} | loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f} | {seconds:.1f}s", flush=True)
        if not partner.wait(partner.key("go", r)):
            break
        dump("theta_att-sent", r, theta_att=local_shards(params))
        header = torch.tensor([seconds, *losses], dtype=torch.float64, device=device)
        partner.send([header, *local_shards(params).values()])
        r += 1
    return r


# -----------------------------------------------------------------------------
# 3. The defender half


class Logger(patcher.Logger):
    """patcher.Logger; an install row also reports how stale the attack vector was and what it cost."""

    def log(self, row):
        if self.rank != 0 or row["phase"] != "attack":
            return super().log(row)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        print(f"attack  round {row['round']} | k1 {row['attack_steps']} | loss {row['attack_loss_start']:.4f} -> "
              f"{row['attack_loss_end']:.4f} | |delta| {row['delta_norm']:.4f} | {row['attack_seconds']:.1f}s | "
              f"staleness {row['staleness']} steps | defender waited {row['defender_wait_seconds']:.2f}s", flush=True)


def send_theta(partner, model, r, step, dump):
    partner.set(partner.key("theta", r), step)  # announced first: the attacker posts its receive only then
    theta = local_shards(dict(model.named_parameters()))
    dump("theta-sent", r, step=step, theta=theta)
    partner.send(theta.values())


@torch.no_grad()
def install(partner, delta, reference, r, k1, device, dump):
    """Receive theta_att of attack r into `delta`, then delta -= reference (theta now, or as sent).
    Returns the attacker's seconds and losses."""
    partner.set(partner.key("go", r))
    header = torch.empty(1 + k1, dtype=torch.float64, device=device)
    partner.recv([header, *local_shards(delta).values()])
    dump("theta_att-received", r, theta_att=local_shards(delta))
    for n, d in delta.items():
        d.sub_(reference[n])
    seconds, *losses = header.tolist()
    return seconds, losses


def defender(args, model, batches, partner, group, device, logger, dump):
    """Defender steps on D_safe for the sequential budget; each attack vector is installed as it arrives and
    theta is sent off for the next attack at once (--sync: at the start of each round, then waited for)."""
    warmup, k2 = args.warmup_steps, args.defend_steps
    total = warmup + args.rounds * k2
    optimizer = patcher.make_optimizer(model, args.lr, args.weight_decay)
    theta_buffer = patcher.snapshot(model)  # reused by every defender step
    params = dict(model.named_parameters())
    delta, installed = None, -1  # the attack vector in use and its attack (None: plain SFT steps)
    r, sent = 0, None  # the attack in flight and the step its theta was sent at (None: no attack in flight)
    theta_start = None  # --delta-ref start: the theta the attack in flight started from
    step = 0
    while step < total:
        partner.check()  # two small store reads: a dead attacker is noticed within --peer-timeout, even in warmup
        # 1. has the attack in flight finished? Look every --refresh-every steps; wait for it with --sync
        t = time.time()
        if sent is not None and (args.sync or (step - warmup) % args.refresh_every == 0):
            if args.sync:
                partner.wait(partner.key("ready", r), stop=False)
            if agree(partner.has(partner.key("ready", r)), group, device, dist.ReduceOp.MIN):
                if delta is None:
                    delta = {n: torch.empty_like(p) for n, p in params.items()}  # sharded like theta
                reference = theta_start if args.delta_ref == "start" else params
                seconds, losses = install(partner, delta, reference, r, args.attack_steps, device, dump)
                dump("installed", r, step=step, sent_step=sent, theta=local_shards(reference), delta=local_shards(delta))
                if args.reset_optimizer:
                    optimizer = patcher.make_optimizer(model, args.lr, args.weight_decay)
                logger.log({"step": step, "phase": "attack", "round": r, "attack_steps": args.attack_steps,
                            "attack_loss_start": losses[0], "attack_loss_end": losses[-1], "attack_losses": losses,
                            "delta_norm": patcher.delta_norm(delta, group), "staleness": step - sent,
                            "attack_seconds": seconds, "defender_wait_seconds": time.time() - t})
                installed, r, sent = r, r + 1, None
        # 2. no attack in flight: start the next one from the current theta (--sync: attack r at the start of round r)
        if sent is None and step >= warmup and (not args.sync or r == (step - warmup) // k2):
            send_theta(partner, model, r, step, dump)
            sent = step
            if args.delta_ref == "start":
                theta_start = patcher.snapshot(model, into=theta_start)
            if args.sync:
                continue  # wait for it right away, at this same step
        # 3. one defender step, or plain SFT until the first attack vector arrives
        t = time.time()
        batch = next(batches)
        if delta is None:
            metrics = patcher.sft_step(model, optimizer, batch, args.max_grad_norm)
            phase = "warmup" if step < warmup else "sft"
        else:
            metrics = patcher.defender_step(model, optimizer, batch, delta, args.alpha, args.max_grad_norm, theta_buffer)
            phase = "defend"
        step += 1
        logger.log({"step": step, "phase": phase, "round": installed, **metrics,
                    "lr": optimizer.param_groups[0]["lr"], "tokens_per_s": metrics.pop("tokens") / (time.time() - t)})
    partner.set("stop")  # any defender may say it: all of them are past their last step
    return installed + 1


# -----------------------------------------------------------------------------
# 4. The program


def run(args, rank, world, device, out):
    if world < 2 or world % 2:
        raise SystemExit(f"--mode parallel needs an even number of ranks, half defender and half attacker "
                         f"(torchrun --nproc_per_node=2|4|8 ...); got {world}")
    half = world // 2
    mesh = init_device_mesh(device.type, (2, half), mesh_dim_names=("role", "fsdp"))
    role, pair = mesh.get_coordinate()
    group = mesh["fsdp"].get_group()  # this half: the FSDP collectives, losses and decisions stay within it
    who = f"{('defender', 'attacker')[role]} {pair} (rank {rank})"
    partner = Partner(rank, world, args.peer_timeout)
    dump = Dumps(args.debug_dir, rank)
    try:
        model = patcher.build_model(args.model, device, half, mesh=mesh["fsdp"],
                                    activation_checkpointing=args.activation_checkpointing, compile=args.compile)
        align, attack_set, pad_id, notes = patcher.load_datasets(args)
        # each half draws its batches as a sequential run over `half` ranks would (seed, seed + 1; sharded by pair)
        iters = patcher.make_iterators(args, pair, half, align, attack_set, pad_id)
        total = args.warmup_steps + args.rounds * args.defend_steps
        if rank == 0:
            for line in notes:
                print(line)
            print(f"mode parallel{' --sync' if args.sync else ''} | world {world} = {half} defender + {half} attacker "
                  f"ranks | global batch {args.batch_size * args.grad_accum * half} sequences per half | {total} "
                  f"defender steps = warmup {args.warmup_steps} + {args.rounds} rounds x k2 {args.defend_steps} | "
                  f"inner attack k1 {args.attack_steps} at lr {args.attack_lr} | refresh every {args.refresh_every} "
                  f"steps | delta-ref {args.delta_ref}", flush=True)
            patcher.write_config(out, args)
        if role == DEFENDER:
            logger = Logger(out, rank, total, resume=False)
            n = defender(args, model, patcher.Accumulated(iters["align"], args.grad_accum), partner, group, device,
                         logger, dump)
            save_model(model, out / "final", like=args.model)  # gathers within this half; its barrier is global
            if rank == 0:
                print(f"defender: {total} steps, {n} attack vectors installed | exported {out / 'final'}", flush=True)
        else:
            n = attacker(args, model, patcher.Accumulated(iters["attack"], args.grad_accum), partner, group, device, dump)
            if pair == 0:
                print(f"attacker: {n} attacks delivered", flush=True)
            dist.barrier()  # meets the barrier that ends save_model on the defender half
    except Exception as e:
        partner.abort(f"{who}: {e}")
        if not isinstance(e, (PeerLost, FloatingPointError)):
            traceback.print_exc()
        print(f"{who}: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # not sys.exit: tearing down a process group whose peer is gone can block or abort
    partner.close()
    dist.destroy_process_group()
