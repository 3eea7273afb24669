"""parallel.py on the built-in demo, gloo on CPU: --sync against the sequential schedule, what travels between
partner ranks (recorded by tests/parallel_probe.py), and a dead attacker rank."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, with_base
from test_patcher import FAST, assert_rows_close, rows, rows_so_far

LONGER = ["--warmup-steps", "3", "--rounds", "4", "--inner-steps", "3", "--defend-steps", "10"]  # room for staleness


@pytest.mark.parametrize("nproc", [2, 4])
def test_sync_equals_sequential(nproc, tmp_path, demo_base):
    """--sync on 2h ranks (h defenders + h attackers) is the sequential run on h ranks: same batches, same
    attack vectors, same losses, same exported weights."""
    seq, par = tmp_path / "seq", tmp_path / "par"
    run_script("patcher.py", ["--out", with_base(seq, demo_base), "--mode", "patcher", *FAST], nproc=nproc // 2)
    r = run_script("parallel.py", ["--out", with_base(par, demo_base), "--sync", *FAST], nproc=nproc)
    assert f"{nproc // 2} defender + {nproc // 2} attacker ranks" in r.stdout
    a, b = rows(seq), rows(par)
    assert sum(x["phase"] == "inner_attack" for x in b) == 2
    assert_rows_close(a, b, 1e-5, keys=("loss_clean", "loss_adv", "grad_norm", "attack_loss_start", "attack_loss_end", "delta_norm"))
    for x, y in zip(a, b):
        if y["phase"] == "inner_attack":
            assert y["staleness"] == 0 and y["attack_losses"] == pytest.approx(x["attack_losses"], abs=1e-5)
    wa, wb = load_file(seq / "final" / "model.safetensors"), load_file(par / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= 1e-5, name


def test_parallel_resumes_from_its_checkpoint_as_if_never_stopped(tmp_path, demo_base):
    """parallel.py checkpoints the defender half every --save-every steps (the log, the attack vector, how many attacks
    it installed; the attacker's stream goes on with the batches of those attacks). With --sync, resumed from an earlier
    checkpoint, every number equals the uninterrupted run's; then the finished run has nothing more to do."""
    out, flags = with_base(tmp_path / "full", demo_base), ["--sync", *FAST, "--save-every", "4"]
    run_script("parallel.py", ["--out", out, *flags], nproc=2)
    full = rows(out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000008", "step-0000011"]
    (out / "checkpoints" / "latest").write_text("step-0000008")  # as if killed after step 8
    (out / "done.json").unlink()
    r = run_script("parallel.py", ["--out", out, *flags, "--resume"], nproc=2)
    assert "resumed at step 8" in r.stdout
    volatile = ("tokens_per_s", "supervised_per_s", "mfu", "seconds", "defender_wait_seconds")
    same = lambda rs: [{k: v for k, v in x.items() if k not in volatile} for x in rs]
    assert same(rows(out)) == same(full)
    r = run_script("parallel.py", ["--out", out, *flags, "--resume"], nproc=2)
    assert "finished already" in r.stdout


def load_dumps(folder):
    """{(rank, event, round): dump} recorded by parallel_probe.py."""
    dumps = {}
    for f in Path(folder).glob("rank*.pt"):
        rank, rest = f.stem.removeprefix("rank").split("-", 1)
        event, r = rest.rsplit("-", 1)
        dumps[int(rank), event, int(r)] = torch.load(f, weights_only=True)
    return dumps


def assert_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for n in a:
        assert torch.equal(a[n], b[n]), f"{what}: {n}"


@pytest.mark.parametrize("nproc,delta_ref", [(4, "current"), (2, "start")])
def test_partners_exchange_theta_and_install_delta(nproc, delta_ref, tmp_path, demo_base):
    """Asynchronous run: the theta an attacker receives is the defender's theta at send time, the theta_att the
    defender receives is the attacker's, and the installed delta is theta_att - theta per --delta-ref."""
    out = with_base(tmp_path / "run", demo_base)
    run_script("tests/parallel_probe.py", ["--out", out, "--delta-ref", delta_ref, "--batch-size", "32", "--inner-batch-size", "8", *LONGER],
               nproc=nproc, env={"PROBE_DIR": str(out / "probe")})
    half = nproc // 2
    installs = rows(out, "inner_attack")
    steps = {x["step"]: x for x in rows(out) if x["phase"] != "inner_attack"}
    assert len(installs) >= 2 and len(steps) == 3 + 4 * 10 and (out / "final" / "model.safetensors").exists()
    assert [x["round"] for x in installs] == list(range(len(installs)))
    d = load_dumps(out / "probe")
    for row in installs:
        r = row["round"]
        for k in ("staleness", "seconds", "defender_wait_seconds", "delta_norm"):
            assert row[k] >= 0, k
        for i in range(half):
            sent, received = d[i, "theta-sent", r], d[half + i, "theta-received", r]
            assert_equal(sent["theta"], received["theta"], f"theta of attack {r}, pair {i}")
            assert sent["step"] == received["step"] == row["step"] - row["staleness"]
            theta_att = d[half + i, "theta_att-sent", r]["theta_att"]
            assert any(not torch.equal(theta_att[n], sent["theta"][n]) for n in theta_att)  # the attack moved theta
            installed = d[i, "installed", r]
            # the reference theta: as sent (start), or theta at install, which the next attack then starts from
            reference = sent["theta"] if delta_ref == "start" else d[i, "theta-sent", r + 1]["theta"]
            assert d[i, "theta-sent", r + 1]["step"] == row["step"]  # the next theta leaves at once
            assert_equal(installed["theta"], reference, f"reference theta of attack {r}, pair {i}")
            assert_equal(installed["delta"], {n: theta_att[n] - reference[n] for n in theta_att}, f"delta {r}")
        # the defender steps after the install use it (the loss under attack is reported from then on)
        assert "loss_adv" in steps[row["step"] + 1] and steps[row["step"] + 1]["round"] == r
    if delta_ref == "current":
        assert any(x["staleness"] > 0 for x in installs)  # the defender did not wait for the attacker
    assert all("loss_adv" not in x for s, x in steps.items() if s <= installs[0]["step"])  # plain SFT before


def test_refresh_every_and_offset_set_when_the_defender_looks_and_sends(tmp_path, demo_base):
    """--refresh-every 4 --refresh-offset 1: every install happens at a step s with (s - warmup + 1) % 4 == 0, and
    every theta leaves at a multiple of 4 steps after the warmup, however fast the attacker is."""
    out = with_base(tmp_path / "run", demo_base)
    # each defender step at least 0.1 s: its 43 steps outlast two 2-step attacks even on a machine busy elsewhere
    run_script("parallel.py", ["--out", out, "--warmup-steps", "3", "--rounds", "4", "--defend-steps", "10",
                               "--inner-steps", "2", "--refresh-every", "4", "--refresh-offset", "1"], nproc=2,
               env={"PYTHONPATH": str(ROOT / "tests" / "hooks"), "PATCHER_TEST_STEP_SECONDS": "0.1"})
    installs = rows(out, "inner_attack")
    assert len(installs) >= 2, installs
    for x in installs:
        assert (x["step"] - 3 + 1) % 4 == 0, x["step"]  # looked for 1 step before a multiple of 4
        assert (x["step"] - x["staleness"] - 3) % 4 == 0, x  # its theta left at a multiple of 4


def test_the_official_parallel_schedule_installs_14_attack_vectors(tmp_path, monkeypatch):
    """PRESET=paper-parallel with an attacker that is always done in time, as the official run's is (500 attack steps
    against 1,000 defender steps of two passes each): the first delta is used from step 2,000 on after 1,999 SFT
    steps, 14 are installed, the last used for one step, and each attack starts from theta at a multiple of 1,000.
    parallel.defender's own loop runs all 15,000 steps, with stand-ins for the model, the transfers and the update
    (each defender step only counted), so that a change to its decisions changes what is asserted here."""
    import parallel
    import patcher
    args = parallel.parse_args(["--warmup-steps", "1000", "--rounds", "14", "--defend-steps", "1000",
                                "--refresh-every", "1000", "--refresh-offset", "1", "--out", str(tmp_path)])
    starts, installs, with_delta = [], [], []  # theta sent at; delta installed at (before the step numbered + 1)

    class Partner:  # an attacker whose attack is always ready when the defender looks
        rank = 0

        def key(self, name, r):
            return f"{name}/{r}"

        def has(self, key):
            return key.startswith("ready/")

        def set(self, key, value="1"):
            pass

        def check(self):
            pass

    class Log:
        def step(self, *a):
            pass

        def attack(self, step, r, losses, dnorm, seconds, **extra):
            installs.append(step)

    class Model:
        def named_parameters(self):
            return iter(())

        def parameters(self):
            return iter(())
    monkeypatch.setattr(parallel, "send_theta", lambda partner, model, r, step: starts.append(step))
    monkeypatch.setattr(parallel, "install", lambda partner, delta, reference, r, k1, device: (0.0, [0.0]))
    monkeypatch.setattr(parallel, "agree", lambda flag, votes, op: flag)  # one defender: its own vote
    monkeypatch.setattr(patcher, "snapshot", lambda model, into=None: None)
    monkeypatch.setattr(patcher, "global_norm", lambda tensors, group=None: 0.0)
    monkeypatch.setattr(patcher, "defender_step", lambda model, optimizer, batch, delta, *a: with_delta.append(delta is not None) or {})
    n = parallel.defender(args, Model(), None, {"safe": iter(range(10 ** 6))}, Partner(), None, None, "cpu", Log(),
                          (0, None, {}), {})
    total = 1000 + 14 * 1000
    assert len(with_delta) == total and n == 14 == len(installs)
    assert installs[0] == 1999 and total - installs[-1] == 1 and with_delta.index(True) == 1999 and all(with_delta[1999:])
    assert starts[:3] == [1000, 2000, 3000] and all(s % 1000 == 0 for s in starts)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(nproc, args, **popen):
    """The ranks of a parallel.py run as separate processes, without torchrun (whose agent would end the others
    itself when one dies): so the test sees what the ranks do on their own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    return [subprocess.Popen([sys.executable, str(ROOT / "parallel.py"), *map(str, args)],
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True, **popen) for r in range(nproc)]


@pytest.mark.parametrize("nproc", [2, 4])
def test_dead_attacker_stops_the_defenders(nproc, tmp_path, demo_base):
    """Kill an attacker rank mid-attack: every other rank exits non-zero with a message, within --peer-timeout
    (plus slack), instead of hanging."""
    out = with_base(tmp_path / "run", demo_base)
    timeout = 4
    # long attacks, so that the kill lands mid-attack and only the heartbeat can tell the defender
    procs = launch_ranks(nproc, ["--out", out, "--peer-timeout", timeout, "--warmup-steps", "2", "--rounds", "1000",
                                 "--inner-steps", "40", "--defend-steps", "5"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not any(r["phase"] == "inner_attack" for r in rows_so_far(out)):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "the run did not get going"
            time.sleep(0.05)
        procs[-1].send_signal(signal.SIGKILL)  # the last attacker, in its second attack
        killed = time.time()
        for rank, p in enumerate(procs[:-1]):
            err = p.communicate(timeout=timeout + 60)[1]
            assert p.returncode not in (0, None), (rank, err[-2000:])
            assert "error:" in err, (rank, err[-2000:])
        assert time.time() - killed < timeout + 30
        if nproc == 2:  # the defender names its partner: by the heartbeat, or by a transfer the kill cut short
            assert ("partner rank 1 did not respond within 4 s" in err
                    or "partner rank 1 was lost during a transfer" in err), err[-2000:]
            assert "Traceback" not in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_transfer_cut_by_the_partner_names_it():
    """gloo's own error for a partner that died mid-transfer ("Connection reset by peer") becomes one line that
    names the partner, like a missed heartbeat does."""
    import parallel

    class Cut:
        def wait(self):
            raise RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:29500\nmore")

    partner = object.__new__(parallel.Partner)
    partner.peer, partner.check = 3, lambda: None
    with pytest.raises(parallel.PeerLost, match=r"^partner rank 3 was lost during a transfer: \[gloo.*peer \[127.0.0.1\]:29500$"):
        partner._finish([Cut()])


class PolledWork:
    """A stand-in for an NCCL Work: wait() returns at once whatever the transfer's state (on NCCL it only orders the
    CUDA stream); is_completed() turns True after `after` polls, or never (a dead partner)."""

    def __init__(self, after=None):
        self.after, self.polls, self.waited = after, 0, False

    def is_completed(self):
        self.polls += 1
        return self.after is not None and self.polls > self.after

    def wait(self):
        self.waited = True
        return True


def test_nccl_waits_poll_completion_and_notice_a_dead_partner():
    """The NCCL path of parallel.wait_watching (CPU tests cannot run NCCL): a transfer is waited for by polling
    is_completed(), never by trusting wait(), which returns at once on NCCL; the partner is checked between polls, so
    a transfer that never completes ends with the partner's PeerLost instead of a hang."""
    import parallel
    works, checks = [PolledWork(after=3), PolledWork(after=0)], []
    parallel.wait_watching(works, lambda: checks.append(1), poll=True)
    assert works[0].polls == 4 and len(checks) == 3 and all(w.waited for w in works)  # then wait() orders the stream

    def check():
        checks.append(1)
        if len(checks) > 5:
            raise parallel.PeerLost("partner rank 1 did not respond within 1 s (no heartbeat)")
    checks.clear()
    stuck = PolledWork(after=None)
    with pytest.raises(parallel.PeerLost, match="partner rank 1 did not respond"):
        parallel.wait_watching([stuck], check, poll=True)
    assert stuck.polls == 6 and not stuck.waited
    # the gloo path would have believed the stuck transfer done: its wait() returns (as NCCL's does)
    parallel.wait_watching([PolledWork(after=None)], lambda: None, poll=False)
