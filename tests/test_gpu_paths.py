"""What a GPU run does differently, run on the CPU, so that a GPU user meets only what truly needs CUDA: the one
precision policy (--precision bf16: FSDP2 mixed precision over fp32 master weights, a one-rank process group for a
single process), the used-by commands on 8 ranks, two torchrun agents as two nodes, torch.compile and activation
checkpointing under bf16 FSDP2. Each at the smallest demo shapes that still take the path.

The bf16 tolerances. Two bf16 computations of one loss differ by bf16 rounding (8 significant bits: a relative 2^-9 per
rounding, thousands of roundings that mostly cancel): on the first step, with the same weights, we measured 1.0e-4
(SHAPE) to 2.6e-4 (the demo's FAST) relative between fp32 and bf16 and 2.3e-3 between compiled and eager bf16, all
under bf16's epsilon 2^-7 (FIRST_TOL). After that each AdamW step at the demo's lr 5e-4 turns gradients that differ in
their last bits into weights that differ by up to the lr, and the losses drift apart: at SHAPE by at most 0.006 (fp32
vs bf16; bf16 on 1 vs 2 ranks, where each rank rounds its partial gradient to bf16 before the fp32 reduction) and
0.011 (compiled vs eager), over FAST's 13 steps by 0.025. BF16_TOL = 0.05 is twice the largest. It cannot see a bf16
master weight (the demo still trains at lr 5e-4): the dtype checks below do. fp32 on other world sizes: the same sums
in another order, 1.3e-6 at most on 8 ranks, gradient norms 5e-7 relative (FP32_TOL 1e-5, as test_patcher's
two-rank test)."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from conftest import ROOT, run_script, with_base
import patcher
from test_parallel import free_port
from test_patcher import assert_rows_close, rows, toy_batch

# 2 warmup steps, 2 rounds of (an inner attack of 2 steps, 2 defender steps); batches of 6 rows, so that 8 ranks have
# 2 empty rows (6 = 8 x 1 - 2); examples cut at 8 tokens, so that a compiled block sees few shapes
SHAPE = ["--warmup-steps", "2", "--rounds", "2", "--inner-steps", "2", "--defend-steps", "2", "--batch-size", "6",
         "--inner-batch-size", "6", "--max-len", "8"]
KEYS = ("loss_clean", "loss_adv", "attack_loss_start", "attack_loss_end", "delta_norm")
BF16_TOL, FIRST_TOL, FP32_TOL = 0.05, 2 ** -7, 1e-5
BF16_HEADER = "bf16 compute over fp32 master weights, fp32 gradient reduction (FSDP2 MixedPrecisionPolicy)"


def demo(out, *flags, nproc=1, base=None):
    """patcher.py's demo at SHAPE in a fresh run directory holding the demo's base model -> (rows, stdout)."""
    r = run_script("patcher.py", ["--out", with_base(out, base), *SHAPE, *flags], nproc=nproc)
    return rows(out), r.stdout


@pytest.fixture(scope="module")
def fp32_one(tmp_path_factory, demo_base):
    """The reference: one process, fp32 (a plain module: no process group)."""
    rs, stdout = demo(tmp_path_factory.mktemp("fp32") / "run", base=demo_base)
    assert "world 1 | fp32 |" in stdout
    return rs


@pytest.fixture(scope="module")
def bf16_one(tmp_path_factory, demo_base):
    """One process in bf16: FSDP2 mixed precision on a one-rank gloo group."""
    rs, stdout = demo(tmp_path_factory.mktemp("bf16") / "run", "--precision", "bf16", base=demo_base)
    assert f"world 1 | {BF16_HEADER} |" in stdout
    return rs


def numbers(rs):
    """The rows without what a clock measured."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s", "supervised_per_s", "mfu")} for r in rs]


def assert_same_curve(ref, rs):
    """fp32 on another world size: the losses within FP32_TOL, and the gradient norms (up to 180 here) within FP32_TOL
    relative, so that a gradient scaled wrongly shows at once (AdamW mostly hides a scale from the losses)."""
    assert_rows_close(ref, rs, FP32_TOL, KEYS)
    for x, y in zip(ref, rs):
        assert abs(x.get("grad_norm", 0) - y.get("grad_norm", 0)) <= FP32_TOL * x.get("grad_norm", 0), (x["step"], x, y)


# --- --precision bf16 ----------------------------------------------------------------------------------------------

def test_bf16_in_one_process_is_fsdp2_mixed_precision_over_fp32_master_weights(demo_base):
    """In one process, as on one GPU: a one-rank process group, fp32 DTensor parameters, bf16 activations, fp32
    gradients and AdamW state; and the defender's L(theta + delta) pass still restores theta bit for bit (delta is
    added to the fp32 master weights; the bf16 cast happens in FSDP's pre-forward)."""
    args = patcher.get_parser().parse_args(["--precision", "bf16"])
    rank, world, device = patcher.init_distributed(args.precision)
    try:
        assert dist.is_initialized() and (rank, world) == (0, 1)
        model = patcher.build_model(demo_base, device, args)
        params = dict(model.named_parameters())
        assert all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in params.values())
        seen = []
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
        batch = toy_batch(n=6)
        patcher.forward_backward(model, batch)
        assert seen == [(torch.bfloat16, torch.bfloat16)]
        assert all(p.grad.dtype == torch.float32 for p in params.values())  # reduced (and kept) in fp32
        grads = {n: p.grad.full_tensor() for n, p in params.items()}
        # activation checkpointing: each block runs again in backward, with the same kernels, so the same gradients
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing, seen[:] = True, []
        patcher.forward_backward(model, batch)
        assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
        assert all(torch.equal(p.grad.full_tensor(), grads[n]) for n, p in params.items())
        model.activation_checkpointing = False
        model.zero_grad(set_to_none=True)
        delta = {n: 0.05 * p.detach() for n, p in params.items()}  # a DTensor sharded like theta
        before = {n: p.detach().clone() for n, p in params.items()}
        # the naive restore, theta + delta - delta, would move fp32 weights too
        assert sum(((p + delta[n]) - delta[n] != p).sum().item() for n, p in before.items()) > 0
        zero = torch.optim.SGD(model.parameters(), lr=0.0)  # a zero step: the weights must not move at all
        m = patcher.defender_step(model, zero, batch, delta, alpha=0.5)
        assert abs(m["loss_adv"] - m["loss_clean"]) > 1e-3  # the attacked pass saw theta + delta ...
        assert all(torch.equal(p, before[n]) for n, p in params.items())  # ... and theta is back exactly
        adamw = patcher.make_optimizer(model.parameters(), 1e-3)
        patcher.sft_step(model, adamw, batch)
        assert {s["exp_avg"].dtype for s in adamw.state.values()} == {torch.float32}
        assert all(p.dtype == torch.float32 for p in model.parameters())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_bf16_where_it_cannot_run_is_a_usage_error(monkeypatch, capsys, tmp_path):
    """A GPU without bf16 arithmetic (a V100): --precision bf16 is one line naming the flag, before any work; the
    default there is fp32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    assert patcher.get_parser().parse_args([]).precision == "fp32"
    with pytest.raises(SystemExit) as e:
        patcher.parse_args(["--out", str(tmp_path / "run"), "--precision", "bf16"])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after argparse's usage line, as every usage error
    assert e.value.code == 2 and "error: argument --precision: bf16 cannot run here: Tesla V100" in err, err
    assert not (tmp_path / "run").exists()


def test_bf16_on_two_ranks_matches_one_and_fp32_and_resumes_bitwise(tmp_path, demo_base, fp32_one, bf16_one):
    """bf16 on 2 ranks equals bf16 on one (the first loss up to summation order, the curve within BF16_TOL), stays
    within BF16_TOL of fp32 while really computing in bf16, keeps fp32 master weights and AdamW state in its
    checkpoints, exports in the base checkpoint's dtype (the demo's: fp32), and resumes bitwise."""
    out = tmp_path / "two"
    two, stdout = demo(out, "--precision", "bf16", "--save-every", "2", nproc=2, base=demo_base)
    assert f"world 2 | {BF16_HEADER} |" in stdout
    assert abs(two[0]["loss_clean"] - bf16_one[0]["loss_clean"]) < 1e-5  # the same bf16 weights, the same rows
    assert_rows_close(bf16_one, two, BF16_TOL, KEYS)
    first = abs(bf16_one[0]["loss_clean"] - fp32_one[0]["loss_clean"])
    assert 1e-5 < first < FIRST_TOL * fp32_one[0]["loss_clean"], first  # bf16 is used, and only rounds
    assert_rows_close(fp32_one, bf16_one, BF16_TOL, KEYS)
    config = json.loads((out / "final" / "config.json").read_text())
    with safe_open(out / "final" / "model.safetensors", "pt") as f:
        assert config["torch_dtype"] == "float32" and {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    from torch.distributed.checkpoint import FileSystemReader
    meta = FileSystemReader(out / "checkpoints" / "step-0000006").read_metadata().state_dict_metadata
    tensors = {k: m.properties.dtype for k, m in meta.items() if hasattr(m, "properties")}
    assert any(k.startswith("model.") for k in tensors) and any(k.endswith("exp_avg") for k in tensors)
    assert set(tensors.values()) == {torch.float32}, {k: v for k, v in tensors.items() if v != torch.float32}
    (out / "checkpoints" / "latest").write_text("step-0000004")  # the older of the two kept
    r = run_script("patcher.py", ["--out", out, *SHAPE, "--precision", "bf16", "--save-every", "2", "--resume"], nproc=2)
    assert "resumed at step 4" in r.stdout and numbers(rows(out)) == numbers(two)


def test_eval_attacks_in_bf16(tmp_path, demo_base):
    """eval.py --precision bf16: its test-time attack (patcher.build_model, patcher.sft_steps) takes the same path, in
    one process too: the header says bf16, and the attack's loss moves by bf16 rounding only."""
    d = demo_base.parent / "data"
    common = ["--model", demo_base, "--attack-data", d / "attack.jsonl", "--eval-data", d / "eval_harmful.jsonl",
              "--eval-at", "0,3", "--greedy", "--max-new-tokens", "4", "--attack-batch-size", "8", "--limit", "8"]
    losses = {}
    for p in ("fp32", "bf16"):
        r = run_script("eval.py", [*common, "--precision", p, "--out", tmp_path / p])
        assert f"| {patcher.precision(p)}" in r.stdout
        report = json.loads((tmp_path / p / "report.json").read_text())
        losses[p] = [s["attack_loss"] for s in report["attack_stats"] if s["attack_loss"] is not None]
    assert len(losses["bf16"]) == 1 and 0 < abs(losses["bf16"][0] - losses["fp32"][0]) < BF16_TOL, losses


def test_compile_and_activation_checkpointing_under_bf16_fsdp2(tmp_path, demo_base, bf16_one):
    """--compile --activation-checkpointing --precision bf16 (activation checkpointing alone: the first test). The
    compiled blocks fuse their kernels and so round to bf16 at other points than eager ones: not bitwise the eager run
    (as it would be if nothing were compiled), the first loss within bf16's epsilon, the curve within BF16_TOL."""
    both, stdout = demo(tmp_path / "both", "--precision", "bf16", "--activation-checkpointing", "--compile", base=demo_base)
    assert BF16_HEADER in stdout
    assert 0 < abs(both[0]["loss_clean"] - bf16_one[0]["loss_clean"]) < FIRST_TOL * bf16_one[0]["loss_clean"]
    assert_rows_close(bf16_one, both, BF16_TOL, KEYS)


# --- the used-by commands: 8 ranks, and two nodes ------------------------------------------------------------------

def test_the_used_by_commands_on_eight_ranks_equal_one_process(tmp_path, demo_base, fp32_one):
    """torchrun --standalone --nproc_per_node=8 patcher.py (batches of 6: 2 empty rows) and parallel.py on 8 ranks
    (4 defenders + 4 attackers, --sync so that the run is deterministic) give the one-process loss curve; parallel.py
    installs an attack vector every round."""
    seq, stdout = demo(tmp_path / "seq", nproc=8, base=demo_base)
    assert "global batch 6 = 1 x 8 ranks x 1 (2 empty rows" in stdout
    assert_same_curve(fp32_one, seq)
    par = with_base(tmp_path / "par", demo_base)
    r = run_script("parallel.py", ["--out", par, *SHAPE, "--sync"], nproc=8)
    assert "world 8 = 4 defender + 4 attacker ranks" in r.stdout and "2 attack vectors installed" in r.stdout
    assert_same_curve(fp32_one, rows(par))


def two_nodes(script, args, nproc_per_node=2, timeout=300):
    """Two torchrun agents on this host as two nodes, started side by side, meeting at a c10d rendezvous as on two
    machines -> their (stdout, stderr). Under c10d the agents' order comes from the rendezvous (torchrun ignores
    --node_rank there), and each agent's ranks are consecutive."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc_per_node}",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=patcher-test-{port}",
           str(ROOT / script), *map(str, args)]
    nodes = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    try:
        outs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:  # an agent that did not finish: end it with its ranks (its own process group)
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, out[-3000:] + err[-5000:]
    return outs


def test_two_nodes_run_both_programs(tmp_path, demo_base, fp32_one):
    """patcher.py over 2 nodes x 2 ranks gives the one-process curve; parallel.py over 2 nodes x 2 ranks puts the
    defender half (ranks 0-1) on one node and the attacker half (ranks 2-3) on the other, so that theta and theta_att
    cross between the nodes, and gives the sequential curve (--sync)."""
    seq = with_base(tmp_path / "seq", demo_base)
    outs = two_nodes("patcher.py", ["--out", seq, *SHAPE])
    assert "world 4 |" in outs[0][0] + outs[1][0]
    assert_same_curve(fp32_one, rows(seq))
    par = with_base(tmp_path / "par", demo_base)
    (out0, _), (out1, _) = two_nodes("parallel.py", ["--out", par, *SHAPE, "--sync"])
    # rank 0 (a defender) reports the installs, rank 2 (attacker pair 0) the attacks: each on its own node
    defender_node = [i for i, out in enumerate((out0, out1)) if "attack vectors installed" in out]
    attacker_node = [i for i, out in enumerate((out0, out1)) if "attacks delivered" in out]
    assert len(defender_node) == len(attacker_node) == 1 and defender_node != attacker_node, (out0[-2000:], out1[-2000:])
    assert "2 attack vectors installed" in (out0, out1)[defender_node[0]]
    assert_same_curve(fp32_one, rows(par))


# --- --compile and --activation-checkpointing, through build_model as the programs take them ----------------------

def built(demo_base, *flags):
    """The demo's base model as patcher.py builds it from these flags (fp32, one process: a plain module)."""
    args = patcher.get_parser().parse_args([*flags])
    return patcher.build_model(demo_base, torch.device("cpu"), args)


def block_forwards(model):
    """{block index: forward calls}, counted from now on by pre-forward hooks (a recomputation in backward is a call;
    it may stop early, once it has recomputed what backward needs, so a post-forward hook would not see it)."""
    calls = {}
    for i, block in enumerate(model.model.layers):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    return calls


def test_activation_checkpointing_recomputes_every_block_in_backward(demo_base):
    """--activation-checkpointing, as build_model applies it: every block runs its forward twice per forward-backward
    pass (the recomputation in backward), without it once, and the gradients are the same either way."""
    batch, grads = toy_batch(n=6), {}
    for flags in ((), ("--activation-checkpointing",)):
        model = built(demo_base, *flags)
        calls = block_forwards(model)
        patcher.forward_backward(model, batch)
        assert calls == {i: 1 + len(flags) for i in range(len(model.model.layers))}, (flags, calls)
        grads[flags] = {n: p.grad for n, p in model.named_parameters()}
    plain, checkpointed = grads.values()
    assert all(torch.equal(plain[n], checkpointed[n]) for n in plain)


def test_compile_in_fp32_equals_eager(demo_base):
    """--compile, as build_model applies it (torch.compile of each block, inductor on the CPU), against eager in fp32:
    something really was compiled; the gradients of one pass agree within fp32 rounding of reordered sums (1e-5 of
    each tensor's norm), and so do the losses of two SFT steps and a defender step after them (AdamW turns the last
    bits of near-zero gradients into whole steps of the weights, which is why the weights themselves are not compared).
    The flag tests swap compile_blocks out (they run forty cases in one process): this is where --compile meets eager."""
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    graphs = counts["stats"]["unique_graphs"]
    runs = {}
    for flags in ((), ("--compile",)):
        model, batch = built(demo_base, *flags), toy_batch(n=6)
        patcher.forward_backward(model, batch)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        opt = patcher.make_optimizer(model.parameters(), 1e-3)
        delta = {n: 0.01 * torch.ones_like(p) for n, p in model.named_parameters()}
        losses = [patcher.sft_step(model, opt, batch)["loss"] for _ in range(2)]
        m = patcher.defender_step(model, opt, batch, delta, 0.5, theta_buffer=patcher.snapshot(model))
        runs[flags] = (grads, losses + [m["loss_clean"], m["loss_adv"]])
    assert counts["stats"]["unique_graphs"] > graphs, "--compile compiled nothing"
    (g_eager, eager), (g_compiled, compiled) = runs.values()
    assert all((g_eager[n] - g_compiled[n]).norm() <= 1e-5 * g_eager[n].norm() for n in g_eager)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(eager, compiled)), (eager, compiled)
    torch._dynamo.reset()
