"""The defenses of --mode (patcher.DEFENSES): Vaccine's and Booster's updates against independent computations on one
process and on two FSDP2 ranks, their weights restored bit for bit, resume for every mode, and bad input."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import ROOT, run_script, with_base
import data
import patcher
from test_patcher import FAST, FAST_SCHEDULE, ref_grads, ref_loss, rows, tiny_model, toy_batch

LR = 0.1


def args_for(*argv):
    return patcher.get_parser().parse_args([str(a) for a in argv])


def attention_forward(model, idx, perturbation=None, outputs=None):
    """The model's forward written out by hand, block by block, with each attention output exposed: appended to
    `outputs` (its .grad kept) and shifted by perturbation[i]. An independent path: no hooks."""
    T = idx.shape[1]
    freqs = torch.arange(T)[None, :, None].float() * model.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    cos, sin = emb.cos(), emb.sin()
    x = model.model.embed_tokens(idx)
    for i, block in enumerate(model.model.layers):
        a = block.self_attn(block.input_layernorm(x), cos, sin)
        if outputs is not None:
            a.retain_grad()
            outputs.append(a)
        if perturbation is not None:
            a = a + perturbation[i]
        x = x + a
        x = x + block.mlp(block.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


def mean_loss(logits, batch):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def vaccine_reference(model, batch, rho):
    """theta - LR * grad of the loss with rho * g / (||g|| + 1e-7) added to every attention output, g the gradient of
    the loss with respect to those outputs (one norm over all blocks)."""
    ref = copy.deepcopy(model)
    outs = []
    mean_loss(attention_forward(ref, batch["input_ids"], outputs=outs), batch).backward()
    g = [a.grad for a in outs]
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g)).item()
    ref.zero_grad()
    loss = mean_loss(attention_forward(ref, batch["input_ids"], perturbation=[rho * x / (norm + 1e-7) for x in g]), batch)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    return {n: p.detach() - LR * gr for (n, p), gr in zip(ref.named_parameters(), grads)}, norm


def booster_reference(model, safe, harmful, lam, alpha):
    """theta - LR * (grad f + lam * (g - grad h(theta - alpha g / (||g|| + 1e-7)))), g = grad h(theta), by functional_call."""
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = ref_grads(model, theta, harmful)
    norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g.values())).item()
    g_moved = ref_grads(model, {n: theta[n] - alpha * g[n] / (norm + 1e-7) for n in theta}, harmful)
    g_f = ref_grads(model, theta, safe)
    return {n: theta[n] - LR * (g_f[n] + lam * (g[n] - g_moved[n])) for n in theta}, norm


def max_diff(model, want):
    return max((p.detach() - want[n]).abs().max().item() for n, p in model.named_parameters())


@pytest.mark.parametrize("rho", [2.0, 0.5])
def test_vaccine_update_matches_independent_computation(rho):
    model, batch = tiny_model(), toy_batch(n=8)
    want, norm = vaccine_reference(model, batch, rho)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    m = patcher.vaccine_update(model, opt, patcher.Batches(batch), args_for("--mode", "vaccine", "--vaccine-rho", rho,
                                                                           "--max-grad-norm", 0))
    assert max_diff(model, want) <= 1e-6
    assert abs(m["perturbation_grad_norm"] - norm) <= 1e-6 * norm
    assert abs(m["loss_clean"] - ref_loss(tiny_model(), dict(tiny_model().named_parameters()), batch).item()) < 1e-5
    assert m["loss_perturbed"] > m["loss_clean"]  # the perturbation ascends the loss


def test_vaccine_norm_is_one_over_all_micro_batches():
    """Two micro-batches of one global batch: one perturbation norm over both, so the update equals the one of the
    whole batch in one piece (rows are independent, padding gets no gradient)."""
    examples = data.tokenize_records(data.ToyTokenizer(), data.toy_world(0)["safe"], 64, None)[0]
    whole = data.collate(examples[:3] + examples[-5:], 0)
    parts = [data.collate(examples[:3], 0), data.collate(examples[-5:], 0)]
    want, _ = vaccine_reference(tiny_model(), whole, 2.0)
    model = tiny_model()
    patcher.vaccine_update(model, torch.optim.SGD(model.parameters(), lr=LR), patcher.Batches(parts),
                           args_for("--mode", "vaccine", "--max-grad-norm", 0))
    assert max_diff(model, want) <= 1e-6


@pytest.mark.parametrize("lam,alpha", [(5.0, 0.1), (1.0, 0.5)])
def test_booster_update_matches_independent_computation(lam, alpha):
    model, safe, harmful = tiny_model(), toy_batch(n=6), toy_batch(n=6, split="unsafe")
    want, norm = booster_reference(model, safe, harmful, lam, alpha)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    m = patcher.booster_update(model, opt, patcher.Batches(safe, harmful), args_for(
        "--mode", "booster", "--booster-lambda", lam, "--booster-alpha", alpha, "--max-grad-norm", 0))
    assert max_diff(model, want) <= 1e-6
    assert abs(m["harmful_grad_norm"] - norm) <= 1e-6 * norm
    assert m["loss_harmful_stepped"] < m["loss_harmful"]  # a normalised step down the harmful gradient lowers h


@pytest.mark.parametrize("mode", ["vaccine", "booster"])
def test_the_perturbed_pass_restores_the_weights_bit_for_bit_in_bf16(mode):
    """A zero step leaves every weight as it was, bit for bit, also in bf16, where Booster's official restore (adding
    the step back) would not round-trip."""
    model = tiny_model().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    m = getattr(patcher, f"{mode}_update")(model, opt, patcher.Batches(toy_batch(), toy_batch(split="unsafe")),
                                            args_for("--mode", mode, "--booster-alpha", 0.5) if mode == "booster"
                                            else args_for("--mode", mode), theta_buffer=patcher.snapshot(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    if mode == "booster":  # the weights were moved for the harmful loss a step away, and came back
        assert m["loss_harmful_stepped"] != m["loss_harmful"]


def probe_delta(model):
    """An attack vector for the defenses with an inner attack, the same in every process (tests/defense_probe.py)."""
    g = torch.Generator().manual_seed(1)
    return {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def test_defenses_on_two_ranks_equal_one_process(tmp_path):
    """Every defense of DEFENSES under FSDP2 on two ranks (each rank half the batch rows; the norms global over shards
    and ranks) updates the weights as one process does, and returns the same numbers: every key of its metrics (a
    norm off by the world size, which the normalised update hides, shows there)."""
    script = ROOT / "tests" / "defense_probe.py"
    run_script(script.relative_to(ROOT), [tmp_path], nproc=2)
    for mode, defense in patcher.DEFENSES.items():
        model, safe, harmful = tiny_model(), toy_batch(n=8), toy_batch(n=8, split="unsafe")
        one = defense.update(model, torch.optim.SGD(model.parameters(), lr=LR), patcher.Batches(safe, harmful),
                             args_for("--mode", mode, "--max-grad-norm", 0),
                             probe_delta(model) if defense.attacks_each_round else None, patcher.snapshot(model))
        assert max_diff(model, load_file(tmp_path / f"{mode}.safetensors")) <= 2e-6, mode
        two = json.loads((tmp_path / f"{mode}.json").read_text())
        apart = {k: (one.get(k), two.get(k)) for k in one.keys() | two.keys()
                 if k not in one or k not in two or abs(one[k] - two[k]) > 1e-5 * max(1.0, abs(one[k]))}
        assert not apart, (mode, apart)  # {key: (one process, two ranks)}


@pytest.mark.parametrize("mode,precision", [(mode, "fp32") for mode in patcher.DEFENSES] + [("patcher", "bf16-pure")])
def test_an_interrupted_run_resumes_bitwise_for_every_mode(mode, precision, tmp_path, demo_base, monkeypatch):
    """Stopped at step 7 (its checkpoint: step 5) and resumed: every logged number equals an uninterrupted run's, bit
    for bit (the defense's state: the streams it draws, Patcher's attack vector; in bf16-pure, bf16 weights and AdamW
    state). Patcher's kill -9: test_patcher."""
    inner = patcher.DEFENSES[mode].attacks_each_round
    argv = ["--mode", mode, *(FAST if inner else FAST_SCHEDULE), "--save-every", "5", "--precision", precision]
    full, cut = with_base(tmp_path / "full", demo_base), with_base(tmp_path / "cut", demo_base)
    patcher.run(patcher.parse_args([*argv, "--out", str(full)]))
    update, calls = patcher.DEFENSES[mode].update, []

    def stopped(*a, **k):
        calls.append(1)
        if len(calls) == 4:  # the defense's 4th update: step 7, after the 3 warmup steps
            raise KeyboardInterrupt
        return update(*a, **k)
    monkeypatch.setitem(patcher.DEFENSES, mode, patcher.DEFENSES[mode]._replace(update=stopped))
    with pytest.raises(patcher.Interrupted):
        patcher.run(patcher.parse_args([*argv, "--out", str(cut)]))
    monkeypatch.undo()
    patcher.run(patcher.parse_args([*argv, "--out", str(cut), "--resume"]))
    volatile = ("tokens_per_s", "supervised_per_s", "mfu", "seconds")
    a, b = ([{k: v for k, v in r.items() if k not in volatile} for r in rows(out)] for out in (full, cut))
    assert a == b and len(a) == 11 + 2 * inner
    assert {r["phase"] for r in a} == {"warmup", patcher.DEFENSES[mode].phase} | ({"inner_attack"} if inner else set())


def test_a_defense_with_an_inner_attack_and_a_harmful_batch_draws_them_from_two_streams(tmp_path, demo_base, monkeypatch):
    """A defense with both an inner attack and a D_unsafe batch each step (Defense.harmful) gets each step's batch at
    --batch-size from a stream of its own: the inner attack's stream (--inner-batch-size) is left as Patcher's run
    leaves it, so this run's attacks equal Patcher's (here the update is Patcher's, so the whole run does)."""
    harmful_rows = []

    def update(model, optimizer, batch, args, delta=None, theta_buffer=None):
        harmful_rows.append(sum(int((m["labels"] != -100).any(1).sum()) for m in batch.harmful))
        return patcher.patcher_update(model, optimizer, batch, args, delta, theta_buffer)
    both = patcher.DEFENSES["patcher"]._replace(update=update, harmful=True)
    monkeypatch.setitem(patcher.DEFENSES, "both", both)
    argv = [*FAST, "--batch-size", "6", "--inner-batch-size", "4"]
    for mode in ("patcher", "both"):
        patcher.run(patcher.parse_args([*argv, "--mode", mode, "--out", str(with_base(tmp_path / mode, demo_base))]))
    assert harmful_rows == [6] * 8  # 2 rounds x 4 defender steps, each a D_unsafe batch of --batch-size
    volatile = ("tokens_per_s", "supervised_per_s", "mfu", "seconds")
    a, b = ([{k: v for k, v in r.items() if k not in volatile} for r in rows(tmp_path / m)] for m in ("patcher", "both"))
    assert sum(r["phase"] == "inner_attack" for r in b) == 2 and a == b


def modes(which):
    """'/'.join of the modes whose Defense `which` says yes: how a usage error names the modes that take a flag."""
    return "/".join(m for m, d in patcher.DEFENSES.items() if which(d))


@pytest.mark.parametrize("argv,message", [
    (["--mode", "tar"], "argument --mode: invalid choice: 'tar'"),
    (["--mode", "vaccine", "--booster-lambda", "3"], "--booster-lambda is a flag of --mode booster: --mode vaccine does not use it"),
    (["--mode", "sft", "--inner-steps", "3"],
     f"--inner-steps is a flag of --mode {modes(lambda d: d.attacks_each_round)}: --mode sft does not use it"),
    (["--mode", "booster", "--vaccine-rho", "1"], "--vaccine-rho is a flag of --mode vaccine: --mode booster does not use it"),
    (["--mode", "vaccine", "--unsafe-data", "x"],
     f"--unsafe-data is a flag of --mode {modes(lambda d: d.attacks_each_round or d.harmful)}"),
    (["--mode", "booster", "--model", "{base}", "--safe-data", "{safe}"], "--unsafe-data is required with --mode booster"),
    (["--mode", "patcher", "--model", "{base}", "--safe-data", "{safe}"], "--unsafe-data is required with --mode patcher"),
    (["--mode", "vaccine", "--compile"], "--compile: --mode vaccine hooks into the blocks"),
])
def test_bad_mode_input_is_one_usage_line_before_any_work(argv, message, tmp_path, demo_base):
    safe = tmp_path / "safe.jsonl"
    safe.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    argv = [w.format(base=demo_base, safe=safe) for w in argv]
    r = run_script("patcher.py", [*argv, "--out", tmp_path / "o"], check=False)
    assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_bf16_pure_keeps_no_fp32_copy_and_restores_by_subtraction(tmp_path, demo_base):
    """--precision bf16-pure: the weights, their gradients, AdamW's moments and the copy of theta are all bf16; theta
    comes back from L(theta + delta) by subtraction, as the official code's add_/sub_ does (it rounds: a zero step
    moves weights), where the other precisions copy it back exactly."""
    out = with_base(tmp_path / "run", demo_base)
    t = patcher.Training(patcher.parse_args(["--out", str(out), *FAST, "--precision", "bf16-pure"]))
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    assert {v.dtype for v in t.theta_buffer.values()} == {torch.bfloat16}
    t.train(3, "warmup", patcher.sft_update)
    state = [v for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    assert len(state) == 2 * len(list(t.model.parameters())) and {v.dtype for v in state} == {torch.bfloat16}
    delta = {n: 0.01 * torch.randn_like(p) for n, p in t.model.named_parameters()}
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    zero = torch.optim.SGD(t.model.parameters(), lr=0.0)
    for exact in (True, False):
        patcher.defender_step(t.model, zero, toy_batch(), delta, 0.5, exact_restore=exact)
        moved = sum((p != before[n]).sum().item() for n, p in t.model.named_parameters())
        assert (moved == 0) == exact, (exact, moved)
    assert patcher.EXACT_RESTORE == {"fp32": True, "bf16": True, "bf16-pure": False}
