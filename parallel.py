"""
Parallel Patcher: the defender keeps training on a stale attack vector while the attacker computes the next one.

    torchrun --nproc_per_node=2 parallel.py --model DIR --safe-data A --unsafe-data B   # 1 defender + 1 attacker GPU
    torchrun --nproc_per_node=8 parallel.py ...                                         # 4 + 4, each half FSDP2-sharded
    torchrun --standalone --nproc_per_node=2 parallel.py                                # the built-in demo (gloo, CPU)

Every patcher.py flag it honours (HONOURED, below; any other is refused) applies, plus its own five. A two-dimensional
device mesh (role x fsdp) splits the world: ranks 0..h-1 are the defender half, ranks h..2h-1 the attacker half
(h = world/2), and each half FSDP2-shards the model over its own row of the mesh. Both halves shard the same model
the same way, so defender i (rank i) and attacker i (rank h + i) hold the same rows of every parameter: theta and
theta_att travel between these partners as local shards, point to point, never gathered and never written to disk.
The defender half alone writes the resumable checkpoints (--save-every; --resume): an attack in flight is not kept.

    defender  warmup | send theta_0 | sft sft ... sft | install delta_0, send theta_1 | defend ... | install delta_1 ...
    attacker  (idle) | recv theta_0 | k1 attack steps | send theta_att_0  recv theta_1 | k1 attack steps ...

The defender's budget is the sequential one, --warmup-steps + --rounds x --defend-steps steps, so the two schedules
compare at equal defender steps; the attacker runs as many attacks as fit. Every --refresh-every steps the defender
looks, without blocking, whether the attack in flight has finished; if so it installs delta = theta_att - theta
(--delta-ref current: theta now; start: the theta the attack started from), and at the next multiple of
--refresh-every steps after the warmup (at once by default) it sends its current theta off for the next attack.
--refresh-offset k looks k steps before each multiple: the official code looks at (step + 1) % 1000 == 0 and
publishes theta at the multiples of 1000. Until the first delta arrives it takes plain SFT steps. --sync waits for
each attack at every k2-th step instead: that is exactly the sequential schedule of patcher.py.

Signals go through the rendezvous store that torchrun already runs (a gloo irecv cannot be polled), tensors through
send/recv. Every transfer is announced by a key and received only once announced, so no send is ever left
unmatched, also when the run stops with an attack in flight. The keys (i: the pair, r: the attack):

    first/0/{i}      defender i numbers its attacks from this one (0; a resumed run: its count), and attacker i
                     skips the batches of the attacks before it
    theta/{r}/{i}    defender i sends the theta of attack r (value: the defender step it was taken at)
    ready/{r}/{i}    attacker i has finished attack r
    go/{r}/{i}       defender i receives theta_att of attack r now
    stop             the defender's budget is spent: the attacker abandons its attack
    done/{rank}      that rank has finished its part (the defenders: their export is complete)
    alive/{rank}     a heartbeat counter, so that a dead or frozen partner is told from a busy one
    abort/{rank}     why that rank failed

Every wait on the partner, the last one included, watches its heartbeat: a partner silent for --peer-timeout
seconds ends the wait with an error naming it and a non-zero exit (an export that was complete stays).
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
        self._finish([dist.isend(t, self.peer) for t in tensors if t.numel()])  # a tiny tensor can leave a rank no rows

    def recv(self, tensors):
        self._finish([dist.irecv(t, self.peer) for t in tensors if t.numel()])

    def _finish(self, works):
        """Wait for the transfers, watching the partner meanwhile: a partner that dies or freezes mid-transfer
        would block a plain wait() forever (wait_watching)."""
        try:
            wait_watching(works, self.check, poll=dist.is_initialized() and dist.get_backend() == "nccl")
        except PeerLost:
            raise
        except Exception as e:  # noqa: BLE001 (gloo's own error for a partner that died mid-transfer: "Connection reset")
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PeerLost(f"partner rank {self.peer} was lost during a transfer: {first[:300]}") from e

    def abort(self, why):
        try:  # best effort: the store may be gone with the job
            self.store.set(f"abort/{self.rank}", why)
        except Exception:
            pass


def wait_watching(works, check, poll):
    """Block until every transfer in `works` is done, calling check() (which raises on a dead or silent partner)
    every POLL seconds meanwhile. The two backends need two ways of waiting:

    - NCCL (poll=True): work.wait() returns to the host at once (it only makes the current CUDA stream wait on the
      transfer), so a thread blocked in wait() would report a transfer from a dead partner as done, and the next
      host sync would hang until NCCL's watchdog killed the rank with no message. is_completed() reports the GPU-side
      completion without blocking: poll it, then wait() to order the current stream after the transfer.
    - gloo (poll=False): is_completed() of a receive stays False even after the data has arrived (NOTES.md), and
      wait() blocks until it has: wait() runs in a thread (it releases the GIL) while this one checks the partner.

    The CPU tests run gloo only; the NCCL branch is exercised here with stand-in works (tests/test_parallel.py) and on
    GPUs by tests/gpu_check.py with two or more of them."""
    if poll:
        while not all(work.is_completed() for work in works):
            check()
            time.sleep(POLL)
        for work in works:
            work.wait()
        return
    done, failed = threading.Event(), []

    def wait():
        try:
            for work in works:
                work.wait()
        except Exception as e:  # noqa: BLE001 (handed to the calling thread)
            failed.append(e)
        done.set()
    threading.Thread(target=wait, daemon=True).start()
    while not done.wait(POLL):
        check()
    if failed:
        raise failed[0]


def agree(flag, votes, op):
    """One decision for the whole half (op MIN: all ranks say yes; MAX: any rank does). Ranks of a half that
    decided differently would deadlock in their next FSDP collective. `votes`: the half's gloo group (run()), so the
    vote is a CPU tensor: on a GPU run, one on the device would make the host wait for the device's queue, twice
    (the copy there, the read back), before every attack step."""
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, op=op, group=votes)
    return t.item() > 0


@torch.no_grad()
def local_shards(tensors):
    """{name: this rank's rows} of a dict of DTensors, as views: receiving into them writes the parameters.
    Taken afresh for every transfer (FSDP2 may move a parameter's storage at its lazy initialisation)."""
    return {n: t.to_local() for n, t in tensors.items()}


# The four transfers, one function each (tests/parallel_probe.py records what each one moves).

def send_theta(partner, model, r, step):
    partner.set(partner.key("theta", r), step)  # announced first: the attacker posts its receive only then
    partner.send(local_shards(dict(model.named_parameters())).values())


def receive_theta(partner, model, r):
    """theta of attack r, straight into the attacker's parameters; returns the defender step it was taken at."""
    partner.recv(local_shards(dict(model.named_parameters())).values())
    return int(partner.get(partner.key("theta", r)))


def send_theta_att(partner, model, seconds, losses, device):
    header = torch.tensor([seconds, *losses], dtype=torch.float64, device=device)
    partner.send([header, *local_shards(dict(model.named_parameters())).values()])


@torch.no_grad()
def install(partner, delta, reference, r, k1, device):
    """Receive theta_att of attack r into `delta`, then delta -= reference (theta now, or as sent).
    Returns the attacker's seconds and losses."""
    partner.set(partner.key("go", r))
    header = torch.empty(1 + k1, dtype=torch.float64, device=device)
    partner.recv([header, *local_shards(delta).values()])
    for n, d in delta.items():
        d.sub_(reference[n])
    seconds, *losses = header.tolist()
    return seconds, losses


# -----------------------------------------------------------------------------
# 2. The attacker half


def attacker(args, model, batches, partner, votes, device):
    """Receive theta, attack it in place (k1 steps on D_unsafe) into theta_att, send theta_att back; until stop.
    Returns the number of attacks delivered."""
    lead = partner.pair == 0  # attacker 0 speaks for the half

    def should_stop():  # asked before every attack step
        partner.check()
        return agree(partner.has("stop"), votes, dist.ReduceOp.MAX)

    partner.wait(partner.key("first", 0), stop=False)
    r = int(partner.get(partner.key("first", 0)))  # a resumed defender goes on with its count ...
    for _ in range(r * args.inner_steps):  # ... and this stream with the batches its earlier attacks drew (--sync: exact)
        next(batches)
    while partner.wait(partner.key("theta", r)):
        start = receive_theta(partner, model, r)
        t = time.time()
        losses = patcher.attack(model, batches, args, should_stop)  # the inner attack's attacker, in place
        if losses is None:
            if lead:
                print(f"attacker: attack {r} abandoned, the defender is done", flush=True)
            break
        seconds = time.time() - t
        partner.set(partner.key("ready", r))
        if lead:
            print(f"attacker: attack {r} from defender step {start} | k1 {args.inner_steps} | loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f} | {seconds:.1f}s", flush=True)
        if not partner.wait(partner.key("go", r)):
            break
        send_theta_att(partner, model, seconds, losses, device)
        r += 1
    return r


# -----------------------------------------------------------------------------
# 3. The defender half


def looks(args, step):
    """Whether the defender, after `step` steps, looks for a finished attack: every --refresh-every steps after the
    warmup, --refresh-offset steps early (the official code: (global_step + 1) % 1000 == 0, offset 1)."""
    return (step - args.warmup_steps + args.refresh_offset) % args.refresh_every == 0


def sends(args, step):
    """Whether theta may leave for the next attack after `step` steps (when none is in flight): at the multiples of
    --refresh-every after the warmup, where the official code saves the checkpoint its attacker picks up."""
    return (step - args.warmup_steps) % args.refresh_every == 0


def defender(args, model, optimizer, streams, partner, group, votes, device, log, resumed, run_settings):
    """Defender steps on D_safe for the sequential budget; each attack vector is installed as it arrives (looked for
    when looks()) and theta is sent off for the next attack when sends() (--sync: at the start of each round, then
    waited for). Every --save-every steps (and at the last) the half writes a checkpoint; `resumed`: (step, delta,
    extra) of the one --resume loaded. An attack in flight at a checkpoint is not in it: the resumed run starts the
    next one."""
    warmup, k2 = args.warmup_steps, args.defend_steps
    total = warmup + args.rounds * k2
    theta_buffer = patcher.snapshot(model)  # reused by every defender step
    params = dict(model.named_parameters())
    safe, retain = streams["safe"], streams.get("retain")
    step, delta, extra = resumed  # delta: the attack vector in use (None: plain SFT steps)
    installed, r = extra.get("installed", -1), extra.get("attack", 0)  # the last attack installed, the next to run
    sent = None  # the step the theta of attack r was sent at (None: no attack in flight)
    theta_start = None  # --delta-ref start: the theta the attack in flight started from
    partner.set(partner.key("first", 0), r)  # the attacker numbers its attacks from here
    while step < total:
        partner.check()  # two small store reads: a dead attacker is noticed within --peer-timeout, even in warmup
        # 1. has the attack in flight finished? Look every --refresh-every steps (--refresh-offset steps before
        # each multiple); wait for it with --sync
        t = time.time()
        if sent is not None and (args.sync or looks(args, step)):
            if args.sync:
                partner.wait(partner.key("ready", r), stop=False)
            if agree(partner.has(partner.key("ready", r)), votes, dist.ReduceOp.MIN):
                if delta is None:
                    delta = {n: torch.empty_like(p) for n, p in params.items()}  # sharded like theta
                reference = theta_start if args.delta_ref == "start" else params
                seconds, losses = install(partner, delta, reference, r, args.inner_steps, device)
                if args.reset_optimizer:
                    optimizer = patcher.make_optimizer(model.parameters(), args.lr, args.weight_decay, args.fused_adamw)
                log.attack(step, r, losses, patcher.global_norm(delta, group), seconds, staleness=step - sent,
                                 defender_wait_seconds=time.time() - t)
                installed, r, sent = r, r + 1, None
        # 2. no attack in flight: start the next one from the current theta, at a multiple of --refresh-every steps
        # after the warmup (the official code publishes theta then); --sync: attack r at the start of round r
        if sent is None and step >= warmup and (r == (step - warmup) // k2 if args.sync else sends(args, step)):
            send_theta(partner, model, r, step)
            sent = step
            if args.delta_ref == "start":
                theta_start = patcher.snapshot(model, into=theta_start)
            if args.sync:
                continue  # wait for it right away, at this same step
        # 3. one defender step (plain SFT until the first attack vector arrives)
        t = time.time()
        phase = "defend" if delta is not None else "warmup" if step < warmup else "sft"
        try:
            metrics = patcher.defender_step(model, optimizer, next(safe), delta, args.alpha, args.max_grad_norm,
                                            theta_buffer, next(retain) if retain else None, args.retain_weight,
                                            patcher.EXACT_RESTORE[args.precision])
        except FloatingPointError as e:
            raise FloatingPointError(f"{phase} step {step + 1}: {e}") from None
        step += 1
        log.step(step, phase, installed, metrics, time.time() - t, args.lr)
        if args.save_every and (step % args.save_every == 0 or step == total):  # within this half: its group
            patcher.save_checkpoint(Path(args.out), step, model, optimizer, delta, streams, run_settings, log.offset(),
                                    partner.rank, group=group, extra={"installed": installed, "attack": r})
    partner.set("stop")  # any defender may say it: all of them are past their last step
    return installed + 1


# -----------------------------------------------------------------------------
# 4. The program


def get_parser():
    p = patcher.get_parser()
    own = {"refresh_every", "refresh_offset", "sync", "delta_ref", "peer_timeout"}
    for a in p._actions:  # --list-flags lists what this program takes: the flags it honours and its own
        if isinstance(a, patcher.ListFlags):
            a.modes = lambda dest: ["all"] if dest in HONOURED | own else []
    p.description = "Parallel Patcher: half the ranks defend while the other half attack. " + p.description
    g = p.add_argument_group("parallel schedule")
    g.add_argument("--refresh-every", type=patcher.POSITIVE_COUNT, default=1,
                   help="every N defender steps, look (without blocking) whether a new attack vector has arrived")
    g.add_argument("--refresh-offset", type=patcher.COUNT, default=0,
                   help="look that many steps before each multiple of --refresh-every (the official code looks at "
                        "(global_step + 1) %% 1000 == 0: offset 1), while theta is still sent at the multiples")
    g.add_argument("--sync", action="store_true",
                   help="wait for each attack at the start of each round: exactly the sequential schedule")
    g.add_argument("--delta-ref", choices=["start", "current"], default="current",
                   help="delta = theta_att - theta at install time (current, as the official code), or - the theta "
                        "the attack started from (start: one more sharded copy of theta)")
    g.add_argument("--peer-timeout", type=patcher.RATE, default=300.0,
                   help="seconds without a heartbeat from the partner rank before exiting with an error")
    return p


def memory_plan(args, cfg, shapes, lengths, world, device_type):
    """{phase: {part: bytes}} of one rank of this program at `world` ranks (patcher.py's memory plan): each half
    FSDP2-shards the model over world / 2 ranks; a rank's peak is its role's, the larger of the defender's (weights,
    AdamW, theta_buffer, delta, and with --delta-ref start the theta the attack started from; Patcher's two passes) and
    the attacker's (weights, its AdamW, one pass on D_unsafe)."""
    half = world // 2
    z = patcher.model_sizes(cfg, shapes, half, args.precision, device_type, sharded=True)
    theta, ckpt = z.params * z.w, args.activation_checkpointing
    temps = patcher.adamw_temporaries(z, device_type, args.fused_adamw)
    safe = lengths["safe"].shape(half)
    retain = [patcher.Pass(lengths["retain"].shape(half), after_grads=True)] if "retain" in lengths else []
    held = {"weights": theta, "optimizer": 2 * theta, "θ copy": theta}
    phases = {}
    if args.warmup_steps:  # plain SFT steps until the first delta arrives
        phases["defender warmup"] = patcher.step_peak(z, held, [patcher.Pass(safe)] + retain, temps, ckpt)
    held = {**held, "δ": theta, **({"θ at the attack's start": theta} if args.delta_ref == "start" else {})}
    both = args.alpha < 1
    passes = [patcher.Pass(safe, backward=both), patcher.Pass(safe, after_grads=both)] + retain
    phases["defender step"] = patcher.step_peak(z, held, passes, temps, ckpt)
    export = patcher.export_dtype(args) or patcher.DTYPES[cfg.torch_dtype]
    phases["defender export"] = {**held, "export copy": patcher.export_copy(z, export, device_type)}
    attacker = {"weights": theta, "inner AdamW": 2 * theta}
    phases["attacker step"] = patcher.step_peak(z, attacker, [patcher.Pass(lengths["unsafe"].shape(half))], temps, ckpt)
    return phases


def plan(args):
    """--plan for parallel.py: its memory plan (patcher.plan's, for this program's two halves)."""
    world = patcher.plan_world(args, default=2)
    if world < 2 or world % 2:
        raise patcher.RunError(f"--plan-world {world}: parallel.py runs on an even number of ranks")
    cfg, shapes, lengths, device, kind = patcher.plan_inputs(args)
    patcher.show_plan("parallel.py", lambda w: memory_plan(args, cfg, shapes, lengths, w, kind), world, lengths,
                      patcher.memory_budget(device, args.plan_memory), step=2,
                      header=f", {patcher.precision(args.precision)}, {kind}, {world // 2} defender + {world // 2} "
                             f"attacker ranks")


def run(args):
    rank, world, device = patcher.init_distributed(args.precision, args.collective_timeout)
    if world < 2 or world % 2:
        raise patcher.RunError(f"parallel.py needs an even number of ranks, half defender and half attacker "
                               f"(torchrun --nproc_per_node=2|4|8 parallel.py ...); got {world}")
    torch.manual_seed(args.seed)
    out = Path(args.out)
    patcher.check_resume(args, out)  # before the demo writes anything
    if args.model is None:
        patcher.make_demo(args, out, rank)
    run_settings = patcher.settings(args, world, get_parser())
    if args.resume:
        patcher.check_finished(out, run_settings)  # every rank: a finished run has nothing to do
    half = world // 2
    cfg, pair = patcher.model_config(args.model), rank % half  # the mesh below puts rank r at (r // half, r % half)
    # each half draws its batches as a sequential run over `half` ranks would (sharded by pair)
    streams, notes = patcher.load_data(args, pair, half, cfg.max_position_embeddings)
    lengths, shapes = patcher.stream_lengths(args, streams, cfg.max_position_embeddings), patcher.param_shapes(cfg)
    patcher.check_memory(args, lambda w: memory_plan(args, cfg, shapes, lengths, w, device.type), "parallel.py", world,
                         device, rank, step=2)  # before any weight is loaded
    mesh = init_device_mesh(device.type, (2, half), mesh_dim_names=("role", "fsdp"))
    role, pair = mesh.get_coordinate()
    group = mesh["fsdp"].get_group()  # this half: the FSDP collectives and losses stay within it
    # ... and its decisions (agree): a gloo group of the same ranks, on CPU tensors (every rank makes both halves')
    votes = [dist.new_group(list(range(h * half, (h + 1) * half)), backend="gloo") for h in (DEFENDER, ATTACKER)][role]
    who = f"{('defender', 'attacker')[role]} {pair} (rank {rank})"
    partner = Partner(rank, world, args.peer_timeout)
    try:
        model = patcher.build_model(args.model, device, args, mesh=mesh["fsdp"])
        total = args.warmup_steps + args.rounds * args.defend_steps
        if role == DEFENDER:  # fresh, or resumed from its checkpoint (the defender half's alone)
            optimizer = patcher.make_optimizer(model.parameters(), args.lr, args.weight_decay, args.fused_adamw)
            step, delta, log, extra = patcher.start_run(args, out, model, optimizer, streams, run_settings, rank, total,
                                                        notes, group=group, header=False)
            if rank == 0:
                print(f"parallel{' --sync' if args.sync else ''} | world {world} = {half} defender + {half} attacker "
                      f"ranks | {patcher.precision(args.precision)} | {total} defender steps = warmup {args.warmup_steps} "
                      f"+ {args.rounds} rounds x k2 {args.defend_steps} | inner attack k1 {args.inner_steps} at lr "
                      f"{args.inner_lr:g} | refresh every {args.refresh_every} steps | delta-ref {args.delta_ref}"
                      + (f" | resumed at step {step}" if step else ""), flush=True)
            n = defender(args, model, optimizer, streams, partner, group, votes, device, log, (step, delta, extra),
                         run_settings)
            patcher.export_final(model, out, args, total, rank, run_settings)  # within this half only
            if rank == 0:
                print(f"defender: {total} steps, {n} attack vectors installed", flush=True)
        else:
            n = attacker(args, model, streams["unsafe"], partner, votes, device)
            if pair == 0:
                print(f"attacker: {n} attacks delivered", flush=True)
        partner.set(f"done/{rank}")
        # the last wait on the partner: it may not have finished its part (a defender: its export) or be gone
        partner.wait(f"done/{partner.peer}", stop=False)
    except Exception as e:
        partner.abort(f"{who}: {e}")
        if not isinstance(e, (PeerLost, *patcher.USER_ERRORS)) or args.debug:
            traceback.print_exc()
        print(f"{who}: error: {e}", file=sys.stderr, flush=True)
        patcher.exit_now(1)
    partner.close()


# The patcher.py flags this program honours (tests/test_flags.py shows each): these, and every flag of the inner attack
# (patcher.INNER_FLAGS, an attacker setting a fork adds included), which its attacker half reads through patcher.attack
# and load_data as patcher.py does. Any other patcher.py flag, one added by a fork included, is refused when given:
# parallel.py never accepts a flag it would ignore (and train.sh refuses to drop one from a parallel run).
HONOURED = {"model", "safe_data", "unsafe_data", "safe_format", "unsafe_format", "retain_data", "prompt_field",
            "response_field", "system_prompt", "max_len", "loss_mask", "mode", "alpha", "warmup_steps", "rounds",
            "defend_steps", "reset_optimizer", "retain_weight", "lr", "weight_decay", "max_grad_norm", "batch_size",
            "micro_batch_size", "group_by_length", "seed", "out", "export_dtype", "precision",
            "activation_checkpointing", "compile", "fused_adamw", "debug", "list_flags", "save_every", "resume",
            "collective_timeout", "plan", "plan_world", "plan_memory", "skip_memory_check", "log_every", "check",
            *patcher.INNER_FLAGS}
WHY_NOT = {}  # dest -> why parallel.py refuses it, where there is more to say than that it does not honour it


def parse_args(argv=None):
    p = get_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = patcher.parse_args(argv, parser=p)
    inherited = {a.dest for a in patcher.get_parser()._actions}
    for dest in sorted(patcher.given_flags(p, argv) & inherited - HONOURED):
        p.error(f"--{dest.replace('_', '-')}: " + WHY_NOT.get(dest, "a patcher.py flag that parallel.py does not honour"))
    if args.mode != "patcher":
        p.error(f"--mode {args.mode}: parallel.py is Patcher's parallel schedule; the other defenses run in patcher.py")
    if args.refresh_offset >= args.refresh_every:
        p.error(f"--refresh-offset {args.refresh_offset} must be smaller than --refresh-every {args.refresh_every}")
    return args


if __name__ == "__main__":
    patcher.main(run, parse_args, plan_fn=plan)
