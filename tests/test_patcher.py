"""patcher.py: the algorithm pieces against independent computations, and the program end to end
(one process, two FSDP2 ranks, resume after kill -9, flags that must change what runs, the real SmolLM2)."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from conftest import ROOT, SAFETY, run_script, with_base
import data
import patcher
from model import ModelConfig, Transformer

TOK = data.ToyTokenizer()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(patcher.DEMO_CONFIG))
    model.init_weights()
    return model


def toy_examples(split="safe", seed=0):
    return data.tokenize_records(TOK, data.toy_world(seed)[split], 64, None)[0]


def toy_batch(seed=0, n=6, split="safe"):
    examples = toy_examples(split, seed)
    return data.collate(examples[:n // 2] + examples[-(n - n // 2):], pad_id=0)


def ref_loss(model, params, batch):
    logits = functional_call(model, params, (batch["input_ids"],))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def ref_grads(model, params, batch):
    names = list(params)
    p = {n: params[n].detach().clone().requires_grad_() for n in names}
    return dict(zip(names, torch.autograd.grad(ref_loss(model, p, batch), [p[n] for n in names])))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_defender_step_gradient_matches_independent_computation(alpha):
    model = tiny_model()
    batch = toy_batch()
    g = torch.Generator().manual_seed(1)
    delta = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    # independent: (1 - alpha) grad L(theta) + alpha grad L(theta + delta), via functional_call
    g_clean = ref_grads(model, theta, batch)
    g_adv = ref_grads(model, {n: theta[n] + delta[n] for n in theta}, batch)
    lr = 0.1
    want = {n: theta[n] - lr * ((1 - alpha) * g_clean[n] + alpha * g_adv[n]) for n in theta}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    metrics = patcher.defender_step(model, opt, batch, delta, alpha, max_grad_norm=0)
    for n, p in model.named_parameters():
        assert (p.detach() - want[n]).abs().max().item() <= 1e-6, n
    if alpha > 0:
        assert abs(metrics["loss_adv"] - ref_loss(model, {n: theta[n] + delta[n] for n in theta}, batch).item()) < 1e-5
        assert metrics["gap"] == metrics["loss_adv"] - metrics["loss_clean"]


def test_retain_term_gradient_matches_independent_computation():
    """alpha L(theta + delta) + (1 - alpha) L(theta) + w L_retain(theta): the retain loss only at theta."""
    model = tiny_model()
    batch, retain = toy_batch(), toy_batch(seed=3, n=4, split="retain")
    delta = {n: 0.05 * torch.randn_like(p) for n, p in model.named_parameters()}
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    alpha, w, lr = 0.5, 0.7, 0.1
    g_clean, g_adv, g_keep = (ref_grads(model, theta, batch), ref_grads(model, {n: theta[n] + delta[n] for n in theta}, batch),
                              ref_grads(model, theta, retain))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    metrics = patcher.defender_step(model, opt, batch, delta, alpha, 0, retain=retain, retain_weight=w)
    for n, p in model.named_parameters():
        want = theta[n] - lr * ((1 - alpha) * g_clean[n] + alpha * g_adv[n] + w * g_keep[n])
        assert (p.detach() - want).abs().max().item() <= 1e-6, n
    assert abs(metrics["loss_retain"] - ref_loss(model, theta, retain).item()) < 1e-5


def test_retain_term_off_is_bitwise_the_papers_step():
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    batch, retain = toy_batch(), toy_batch(seed=3, n=4, split="retain")
    delta = {n: 0.05 * torch.randn_like(p) for n, p in a.named_parameters()}
    opts = [patcher.make_optimizer(m.parameters(), 1e-3) for m in (a, b, c)]
    for _ in range(3):
        ma = patcher.defender_step(a, opts[0], batch, delta, 0.5)
        mb = patcher.defender_step(b, opts[1], batch, delta, 0.5, retain=retain, retain_weight=0.0)
        patcher.defender_step(c, opts[2], batch, delta, 0.5, retain=None, retain_weight=0.5)
        assert ma["loss_adv"] == mb["loss_adv"] and "loss_retain" not in mb
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n


def test_alpha_zero_and_no_delta_are_sft_step():
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    batch = toy_batch()
    delta = {n: torch.randn_like(p) for n, p in a.named_parameters()}
    oa, ob, oc = (patcher.make_optimizer(m.parameters(), 1e-3) for m in (a, b, c))
    for _ in range(3):
        ma = patcher.defender_step(a, oa, batch, delta, alpha=0.0)
        mb = patcher.sft_step(b, ob, batch)
        mc = patcher.defender_step(c, oc, batch, None, alpha=0.5)
        assert ma["loss_clean"] == mb["loss"] == mc["loss_clean"]
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n


@pytest.mark.parametrize("alpha,retain", [(0.5, False), (1.0, False), (0.5, True), (0.0, False)])
def test_defender_step_counts_every_pass(alpha, retain):
    """The tokens, supervised tokens and flops a defender step reports (the log's tok/s and MFU) are those of every
    pass it runs: L(theta) (forward only at alpha = 1), L(theta + delta) (none at alpha = 0), the retain loss."""
    model, batch, kept = tiny_model(), toy_batch(), toy_batch(split="retain", n=4)
    delta = {n: 0.01 * torch.randn_like(p) for n, p in model.named_parameters()}
    m = patcher.defender_step(model, patcher.make_optimizer(model.parameters(), 1e-3), batch, delta, alpha,
                              retain=kept if retain else None, retain_weight=1.0 if retain else 0.0)

    def counts(b, backward=True):
        T = b["input_ids"].shape[1]
        return (b["input_ids"].numel(), int((b["labels"][:, 1:] != -100).sum()),
                b["input_ids"].numel() * model.flops_per_token(T, backward))
    passes = [counts(batch, backward=alpha < 1)] + [counts(batch)] * (alpha > 0) + [counts(kept)] * retain
    assert (m["tokens"], m["supervised"], m["flops"]) == tuple(sum(x) for x in zip(*passes))


def test_micro_batches_accumulate_to_the_gradient_of_their_concatenation():
    """The loss is normalised by the supervised tokens of the whole batch, not per micro-batch: the gradient of
    [b1, b2] equals that of one batch holding both (b1 and b2 have different numbers of supervised tokens)."""
    examples = toy_examples("safe")
    b1, b2 = examples[:3], examples[-5:]  # 3 refusals (2 supervised tokens each), 5 answers (4 each)
    assert sum(sum(m) for _, m in b1) != sum(sum(m) for _, m in b2)
    one, two = tiny_model(), tiny_model()
    l1 = patcher.forward_backward(one, [data.collate(b1, 0), data.collate(b2, 0)])
    l2 = patcher.forward_backward(two, data.collate(b1 + b2, 0))
    l1, l2 = patcher.read(l1), patcher.read(l2)  # device tensors, read on the host
    assert abs(l1["loss"] - l2["loss"]) < 1e-6 and l1["supervised"] == l2["supervised"] == 26
    for (n, p), q in zip(one.named_parameters(), two.parameters()):
        assert (p.grad - q.grad).abs().max().item() <= 1e-6, n


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


@pytest.mark.parametrize("weight_decay", [0.01, 0.3])
def test_inner_attack_restores_weights_and_returns_displacement(weight_decay):
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # independent: the same k AdamW steps on a copy
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=weight_decay)
    it = data.BatchIterator(toy_examples("unsafe"), 8, seed=3)
    for _ in range(5):
        b = next(it)[0]
        logits = ref(b["input_ids"])
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    args = patcher.get_parser().parse_args(["--inner-steps", "5", "--inner-lr", "1e-3", "--inner-weight-decay", str(weight_decay)])
    delta, losses = patcher.inner_attack(model, data.BatchIterator(toy_examples("unsafe"), 8, seed=3), args)
    assert len(losses) == 5 and losses[-1] < losses[0]
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, before[n]), f"{n} changed"
        assert (delta[n] - (q.detach() - before[n])).abs().max().item() <= 1e-6, n
    assert set(delta) == {n for n, _ in model.named_parameters()}


def test_new_round_is_told_by_the_schedule_whenever_it_is_asked():
    """Training.new_round(r): round r starts afresh unless a resumed run's step is past the round's first step; the
    same answer before and after train() lays out the round's steps."""
    t = patcher.Training.__new__(patcher.Training)  # the bookkeeping alone: no model, no data
    t.args = patcher.get_parser().parse_args(["--warmup-steps", "3", "--defend-steps", "4"])
    for planned in (7, 11):  # round 1: steps 8 to 11, not yet laid out by train(), or laid out
        answers = []
        for step in (0, 7, 8, 11):
            t.planned, t.step = planned, step
            answers.append(t.new_round(1))
        assert answers == [True, True, False, False], planned


# --- the program ----------------------------------------------------------------------------------

FAST_SCHEDULE = ["--warmup-steps", "3", "--rounds", "2", "--defend-steps", "4"]
FAST = [*FAST_SCHEDULE, "--inner-steps", "3"]  # the inner attack's flag: Patcher's only


def run_patcher(args, nproc=1, timeout=300, check=True, script="patcher.py"):
    return run_script(script, args, nproc, timeout, check)


def rows(out, phase=None):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if phase in (None, r["phase"])]


def rows_so_far(out):
    """The complete rows of a run that is still writing metrics.jsonl (the line being written is left out)."""
    path = Path(out) / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def assert_rows_close(a, b, tol, keys=("loss_clean", "loss_adv", "attack_loss_start", "attack_loss_end", "delta_norm")):
    assert [(x["step"], x["phase"]) for x in a] == [(y["step"], y["phase"]) for y in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in x:
                assert abs(x[key] - y[key]) <= tol, (x["step"], x["phase"], key, x[key], y[key])


@pytest.mark.parametrize("mode", ["patcher", "sft"])
def test_two_ranks_match_one_process_and_export_loads(mode, tmp_path, demo_base):
    fast = FAST if mode == "patcher" else FAST_SCHEDULE
    one = run_patcher(["--out", with_base(tmp_path / "one", demo_base), "--mode", mode, *fast])
    two = run_patcher(["--out", with_base(tmp_path / "two", demo_base), "--mode", mode, *fast], nproc=2)
    assert "global batch 16 = 1 x 1 ranks x 16" in one.stdout and "global batch 16 = 1 x 2 ranks x 8" in two.stdout
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert sum(r["phase"] == "defend" for r in r1) == (8 if mode == "patcher" else 0) and len(r1) == 11 + 2 * (mode == "patcher")
    assert_rows_close(r1, r2, 1e-5)
    transformers = pytest.importorskip("transformers")
    for out in ("one", "two"):
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / out / "final")
        assert hf.config.vocab_size == len(data.TOY_VOCAB)
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    assert config["mode"] == mode and config["defend_steps"] == 4


def test_alpha_one_on_two_ranks_equals_one_process(tmp_path, demo_base):
    """alpha = 1 (only the attacked loss): on FSDP2 the L(theta) forward without backward used to leave the root
    unsharded, and adding delta crashed ("mixed torch.Tensor and DTensor")."""
    args = [*FAST, "--alpha", "1", "--batch-size", "3", "--inner-batch-size", "1"]  # rank 1 gets an empty row
    run_patcher(["--out", with_base(tmp_path / "one", demo_base), *args])
    two = run_patcher(["--out", with_base(tmp_path / "two", demo_base), *args], nproc=2)
    assert "global batch 1 = 1 x 2 ranks x 1 (1 empty rows" in two.stdout
    assert_rows_close(rows(tmp_path / "one"), rows(tmp_path / "two"), 1e-4)  # float sums in another order


def test_resume_after_kill_equals_uninterrupted_run(tmp_path, demo_base):
    """With length grouping on, killed mid-run (kill -9) and resumed: the same losses as an uninterrupted run,
    and metrics.jsonl holds each step once."""
    args = ["--warmup-steps", "5", "--rounds", "6", "--inner-steps", "4", "--defend-steps", "10", "--save-every", "7",
            "--group-by-length"]
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
    resumed = run_patcher(["--out", out, "--resume", *args])
    assert "resumed at step" in resumed.stdout
    full, again = rows(tmp_path / "full"), rows(out)
    assert len({(r["step"], r["phase"]) for r in again}) == len(again)  # each step once
    assert_rows_close(full, again, 1e-6)


def test_real_smollm2_end_to_end(tmp_path, smollm2_dir):
    out = tmp_path / "smol"
    r = run_patcher(["--model", smollm2_dir, "--safe-data", SAFETY / "align.jsonl", "--unsafe-data", SAFETY / "attack.jsonl",
                     "--out", out, "--max-len", "96", "--batch-size", "2", "--inner-batch-size", "2", "--warmup-steps", "1",
                     "--rounds", "1", "--inner-steps", "2", "--defend-steps", "2", "--lr", "1e-5", "--inner-lr", "1e-4"])
    assert "truncated at --max-len 96" in r.stdout and "longest" in r.stdout
    rs = rows(out)
    assert [r["phase"] for r in rs] == ["warmup", "inner_attack", "defend", "defend"]
    assert rs[1]["delta_norm"] > 0 and "loss_adv" in rs[2]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final")
    assert (out / "final" / "tokenizer.json").exists() and hf.config.torch_dtype == torch.bfloat16
