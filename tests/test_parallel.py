"""parallel.py on the built-in demo, gloo on CPU: --sync against the sequential schedule, what travels between
partner ranks (dumped with the hidden --debug-dir), and a dead attacker rank."""
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

from conftest import ROOT
from test_patcher import rows, run_patcher, with_base

FAST = ["--warmup-steps", "3", "--rounds", "2", "--attack-steps", "3", "--defend-steps", "4"]
LONGER = ["--warmup-steps", "3", "--rounds", "4", "--attack-steps", "3", "--defend-steps", "10"]  # room for staleness


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """The demo's base model, trained once for the runs below."""
    out = tmp_path_factory.mktemp("base-run")
    run_patcher(["--out", out, "--mode", "sft", "--warmup-steps", "1", "--rounds", "1", "--defend-steps", "1"])
    return out / "base"


@pytest.mark.parametrize("nproc", [2, 4])
def test_sync_equals_sequential(nproc, tmp_path, demo_base):
    """--sync on 2h ranks (h defenders + h attackers) is the sequential run on h ranks: same batches, same
    attack vectors, same losses, same exported weights."""
    seq = tmp_path / "seq"
    run_patcher(["--out", with_base(seq, demo_base), "--mode", "patcher", *FAST], nproc=nproc // 2)
    par = tmp_path / "par"
    r = run_patcher(["--out", with_base(par, demo_base), "--mode", "parallel", "--sync", *FAST], nproc=nproc)
    assert f"{nproc // 2} defender + {nproc // 2} attacker ranks" in r.stdout
    a, b = rows(seq), rows(par)
    assert [(x["step"], x["phase"]) for x in a] == [(x["step"], x["phase"]) for x in b]
    assert sum(x["phase"] == "attack" for x in b) == 2
    for x, y in zip(a, b):
        for key in ("loss_clean", "loss_adv", "grad_norm", "attack_loss_start", "attack_loss_end", "delta_norm"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-5, (x["step"], x["phase"], key, x[key], y[key])
        if y["phase"] == "attack":
            assert y["staleness"] == 0 and y["attack_losses"] == pytest.approx(x["attack_losses"], abs=1e-5)
    wa, wb = load_file(seq / "final" / "model.safetensors"), load_file(par / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert (wa[name] - wb[name]).abs().max().item() <= 1e-5, name


def load_dumps(folder):
    """{(rank, event, round): dump} from --debug-dir."""
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
    run_patcher(["--out", out, "--mode", "parallel", "--delta-ref", delta_ref, "--debug-dir", out / "debug",
                 "--batch-size", "8", *LONGER], nproc=nproc)
    half = nproc // 2
    installs = rows(out, "attack")
    steps = {x["step"]: x for x in rows(out) if x["phase"] != "attack"}
    assert len(installs) >= 2 and len(steps) == 3 + 4 * 10 and (out / "final" / "model.safetensors").exists()
    assert [x["round"] for x in installs] == list(range(len(installs)))
    d = load_dumps(out / "debug")
    for row in installs:
        r = row["round"]
        for k in ("staleness", "attack_seconds", "defender_wait_seconds", "delta_norm"):
            assert row[k] >= 0, k
        for i in range(half):
            sent, received = d[i, "theta-sent", r], d[half + i, "theta-received", r]
            assert_equal(sent["theta"], received["theta"], f"theta of attack {r}, pair {i}")
            theta_att = d[half + i, "theta_att-sent", r]["theta_att"]
            assert_equal(theta_att, d[i, "theta_att-received", r]["theta_att"], f"theta_att of attack {r}, pair {i}")
            assert any(not torch.equal(theta_att[n], sent["theta"][n]) for n in theta_att)  # the attack moved theta
            installed = d[i, "installed", r]
            assert installed["sent_step"] == sent["step"] == received["step"]
            assert row["staleness"] == installed["step"] - installed["sent_step"] == row["step"] - sent["step"]
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nproc", [2, 4])
def test_dead_attacker_stops_the_defenders(nproc, tmp_path, demo_base):
    """Kill an attacker rank mid-run: every other rank exits non-zero with a message, within --peer-timeout
    (plus slack), instead of hanging. Launched without torchrun, whose agent would kill the others itself."""
    out = with_base(tmp_path / "run", demo_base)
    timeout = 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}
    # long attacks, so that the kill lands mid-attack and only the heartbeat can tell the defender
    args = ["--out", out, "--mode", "parallel", "--peer-timeout", timeout, "--debug-dir", out / "debug",
            "--warmup-steps", "2", "--rounds", "1000", "--attack-steps", "40", "--defend-steps", "5"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "patcher.py"), *map(str, args)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in range(nproc)]
    try:
        deadline = time.time() + 120
        while not (out / "debug" / f"rank{nproc - 1}-theta-received-1.pt").exists():  # attack 1 has begun
            assert time.time() < deadline and all(p.poll() is None for p in procs), "the run did not get going"
            time.sleep(0.05)
        procs[-1].send_signal(signal.SIGKILL)  # the last attacker
        killed = time.time()
        for rank, p in enumerate(procs[:-1]):
            err = p.communicate(timeout=timeout + 60)[1]
            assert p.returncode not in (0, None), (rank, err[-2000:])
            assert "error:" in err, (rank, err[-2000:])
        assert time.time() - killed < timeout + 30
        if nproc == 2:  # nothing else connects the two halves: the heartbeat alone must tell
            assert "partner rank 1 did not respond within 4 s" in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
