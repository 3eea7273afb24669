"""patcher.py: the algorithm pieces against independent computations, and the program end to end
(one process, two FSDP2 ranks, resume after kill -9, NaN handling, the real SmolLM2 checkpoint)."""
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import ROOT, run_script
import data
import patcher
from model import ModelConfig, Transformer

SAFETY = ROOT.parent / "shared" / "data" / "safety"


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(patcher.DEMO_CONFIG))
    model.init_weights()
    return model


def toy_batch(seed=0, n=6):
    world = patcher.toy_world(seed)
    return data.collate(world["align"][:n // 2] + world["align"][-(n - n // 2):], pad_id=0)


def ref_loss(model, params, batch):
    logits = functional_call(model, params, (batch["input_ids"],))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_defender_step_gradient_matches_independent_computation(alpha):
    model = tiny_model()
    batch = toy_batch()
    g = torch.Generator().manual_seed(1)
    delta = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    # independent: (1 - alpha) grad L(theta) + alpha grad L(theta + delta), via functional_call
    names = list(theta)
    p0 = {n: theta[n].clone().requires_grad_() for n in names}
    g_clean = torch.autograd.grad(ref_loss(model, p0, batch), [p0[n] for n in names])
    p1 = {n: (theta[n] + delta[n]).requires_grad_() for n in names}
    g_adv = torch.autograd.grad(ref_loss(model, p1, batch), [p1[n] for n in names])
    lr = 0.1
    want = {n: theta[n] - lr * ((1 - alpha) * gc + alpha * ga) for n, gc, ga in zip(names, g_clean, g_adv)}

    opt = torch.optim.SGD(model.parameters(), lr=lr)
    metrics = patcher.defender_step(model, opt, batch, delta, alpha, max_grad_norm=0)
    for n, p in model.named_parameters():
        assert (p.detach() - want[n]).abs().max().item() <= 1e-6, n
    if alpha > 0:
        assert abs(metrics["loss_adv"] - ref_loss(model, {n: theta[n] + delta[n] for n in names}, batch).item()) < 1e-5
        assert metrics["gap"] == metrics["loss_adv"] - metrics["loss_clean"]


def test_alpha_zero_is_sft_step():
    a, b = tiny_model(), tiny_model()
    batch = toy_batch()
    delta = {n: torch.randn_like(p) for n, p in a.named_parameters()}
    oa, ob = patcher.make_optimizer(a, 1e-3), patcher.make_optimizer(b, 1e-3)
    for _ in range(3):
        ma = patcher.defender_step(a, oa, batch, delta, alpha=0.0)
        mb = patcher.sft_step(b, ob, batch)
        assert ma["loss_clean"] == mb["loss_clean"]
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


def test_defender_step_restores_theta_exactly_in_bf16():
    """After the attacked pass the weights are theta again bit for bit, also in bf16, where
    theta + delta - delta would not round-trip."""
    model = tiny_model().to(torch.bfloat16)
    batch = toy_batch()
    delta = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    drift = sum(((p + delta[n]) - delta[n] != p).sum().item() for n, p in before.items())
    assert drift > 0  # the naive way would move weights
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # a zero step: weights must not move at all
    patcher.defender_step(model, opt, batch, delta, alpha=0.5)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_attack_restores_weights_and_returns_displacement():
    model = tiny_model()
    world = patcher.toy_world(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # independent: the same k AdamW steps on a copy
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    it = data.batches(world["attack"], 8, seed=3)
    for _ in range(5):
        b = next(it)
        logits = ref(b["input_ids"])
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    stats = {}
    delta = patcher.attack(model, data.batches(world["attack"], 8, seed=3), steps=5, lr=1e-3, stats=stats)
    assert len(stats["attack_losses"]) == 5 and stats["attack_losses"][-1] < stats["attack_losses"][0]
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, before[n]), f"{n} changed"
        assert (delta[n] - (q.detach() - before[n])).abs().max().item() <= 1e-6, n
    assert set(delta) == {n for n, _ in model.named_parameters()}


# --- the program ----------------------------------------------------------------------------------

FAST = ["--warmup-steps", "3", "--rounds", "2", "--attack-steps", "3", "--defend-steps", "4"]


def run_patcher(args, nproc=1, timeout=300, check=True):
    return run_script("patcher.py", args, nproc, timeout, check)


def rows(out, phase=None):
    """metrics.jsonl rows, the last one for each (step, phase): a resumed run repeats some steps."""
    by_step = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step[(r["step"], r["phase"])] = r
    order = sorted(by_step, key=lambda k: (k[0], k[1] == "attack"))  # an attack row follows step s's row
    return [by_step[k] for k in order if phase is None or k[1] == phase]


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory):
    """The demo's base model, trained once and shared by the runs below (same base for all)."""
    out = tmp_path_factory.mktemp("base-run")
    run_patcher(["--out", out, "--mode", "sft", "--warmup-steps", "1", "--rounds", "1", "--defend-steps", "1"])
    return out / "base"


def with_base(out, base):
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base, out / "base")
    return out


@pytest.mark.parametrize("mode", ["patcher", "sft"])
def test_two_ranks_match_one_process_and_export_loads(mode, tmp_path, demo_base):
    one = run_patcher(["--out", with_base(tmp_path / "one", demo_base), "--mode", mode, *FAST])
    two = run_patcher(["--out", with_base(tmp_path / "two", demo_base), "--mode", mode, "--batch-size", "8", *FAST], nproc=2)
    assert "global batch 16" in one.stdout and "global batch 16" in two.stdout
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r["phase"] for r in r1] == [r["phase"] for r in r2]
    n_defend = sum(r["phase"] == "defend" for r in r1)
    assert n_defend == (8 if mode == "patcher" else 0) and len(r1) == 11 + (2 if mode == "patcher" else 0)
    for a, b in zip(r1, r2):
        for key in ("loss_clean", "loss_adv", "attack_loss_start", "attack_loss_end", "delta_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
    transformers = pytest.importorskip("transformers")
    for out in ("one", "two"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out / "final")
        assert hf.config.vocab_size == patcher.DEMO_VOCAB
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["mode"] == mode and config["attack_steps"] == 3


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, demo_base):
    args = ["--warmup-steps", "5", "--rounds", "6", "--attack-steps", "4", "--defend-steps", "10", "--save-every", "7"]
    run_patcher(["--out", with_base(tmp_path / "full", demo_base), *args])
    out = with_base(tmp_path / "killed", demo_base)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "patcher.py"), "--out", str(out), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step-0000014"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    run_patcher(["--out", out, "--resume", *args])
    full, resumed = rows(tmp_path / "full"), rows(out)
    assert [(r["step"], r["phase"]) for r in full] == [(r["step"], r["phase"]) for r in resumed]
    for a, b in zip(full, resumed):
        for key in ("loss_clean", "loss_adv", "attack_loss_end", "delta_norm"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])


def test_nan_stops_run_and_keeps_last_checkpoint(tmp_path, demo_base):
    out = with_base(tmp_path / "nan", demo_base)
    r = run_patcher(["--out", out, "--mode", "sft", "--lr", "1e6", "--max-grad-norm", "0", "--warmup-steps", "0",
                     "--rounds", "1", "--defend-steps", "20", "--save-every", "1"], check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "loss is nan" in r.stderr or "loss is inf" in r.stderr
    last = rows(out)[-1]["step"]
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    assert ckpt.name == f"step-{last:07d}" and (ckpt / ".metadata").exists()
    assert not (out / "final").exists()


@pytest.mark.parametrize("argv,match", [
    (["--model", "/nonexistent"], "--model /nonexistent"),
    (["--align-data", "x.jsonl"], "--align-data"),
    (["--alpha", "1.5"], "--alpha"),
    (["--attack-steps", "0"], "--attack-steps"),
])
def test_bad_flags_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        patcher.parse_args(argv)
    assert match in capsys.readouterr().err


def test_bad_data_file_named(tmp_path, smollm2_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": \n')
    r = run_patcher(["--model", smollm2_dir, "--align-data", bad, "--mode", "sft", "--out", tmp_path / "o"], check=False)
    assert r.returncode != 0 and "bad.jsonl" in r.stderr and ":2" in r.stderr


def test_real_smollm2_end_to_end(tmp_path, smollm2_dir):
    out = tmp_path / "smol"
    r = run_patcher(["--model", smollm2_dir, "--align-data", SAFETY / "align.jsonl", "--attack-data", SAFETY / "attack.jsonl",
                     "--out", out, "--max-len", "96", "--batch-size", "2", "--warmup-steps", "1", "--rounds", "1",
                     "--attack-steps", "2", "--defend-steps", "2", "--lr", "1e-5", "--attack-lr", "1e-4"])
    assert "truncated" in r.stdout
    rs = rows(out)
    assert [r["phase"] for r in rs] == ["warmup", "attack", "defend", "defend"]
    assert rs[1]["delta_norm"] > 0 and "loss_adv" in rs[2]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "final" / "tokenizer.json").exists() and hf.config.torch_dtype == torch.bfloat16
