"""The memory plan (patcher.py, "The memory plan"; --plan): its activations against what autograd saves, its per-rank
peaks against peaks measured on the CPU (tests/memory_probe.py: every defense at one and two ranks, eval.py,
parallel.py, SmolLM2), and what it refuses: a run that would not fit (before any weight is read), an 8B model on one
80 GB GPU, train.sh's paper preset at NPROC=1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SAFETY, with_base
import data
import parallel
import patcher
from model import ModelConfig, Transformer, save_model

evaluate = __import__("eval")

TOLERANCE = 0.2  # plan / measured within 1 +- 0.2
# Random-weight checkpoints with the toy world's tokenizer (which uses only the first len(TOY_VOCAB) ids). SMALL: 12M
# parameters, two thirds of them in a 16,000-word embedding and an untied lm_head, so that the root FSDP2 keeps
# unsharded and the logits count; TOY: 16M parameters and the toy vocabulary itself, for eval.py, whose answers are
# decoded by the toy tokenizer.
SMALL = dict(patcher.DEMO_CONFIG, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=16000, max_position_embeddings=1024, torch_dtype="bfloat16")
TOY = dict(SMALL, hidden_size=512, intermediate_size=2048, vocab_size=len(data.TOY_VOCAB))
WORDS = [f"w{i}" for i in range(data.TOY_N_WORDS)]
FAST = ["--warmup-steps", "1", "--rounds", "1", "--inner-steps", "1", "--defend-steps", "1"]  # the demo, briefly
# the probes' shared flags: every row 128 tokens (62 prompt words, 63 answer words), so the plan's longest micro-batch
# is every micro-batch; the fewest steps that reach each phase's plan, which holds an AdamW's moments from its second
# step on: a warmup step and a defender step (one AdamW), two inner attack steps (a fresh one)
STEPS = ["--warmup-steps", "1", "--rounds", "1", "--defend-steps", "1", "--batch-size", "4", "--system-prompt", "",
         "--lr", "1e-4"]
INNER = {"--unsafe-data": None, "--inner-steps": "2", "--inner-batch-size": "4", "--inner-lr": "1e-4"}


def checkpoint(path, config):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(config))
    model.init_weights()
    save_model(model, path)
    (path / data.ToyTokenizer.FILE).write_text(json.dumps({"toy_world_seed": 0}))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The two checkpoints and a data file of 16 toy conversations of 128 tokens each."""
    root = tmp_path_factory.mktemp("memory")
    g = torch.Generator().manual_seed(0)
    pick = lambda n: " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=g))
    (root / "d.jsonl").write_text("".join(json.dumps({"prompt": pick(62), "response": pick(63)}) + "\n" for _ in range(16)))
    return {"root": root, "small": checkpoint(root / "small", SMALL), "toy": checkpoint(root / "toy", TOY),
            "data": root / "d.jsonl"}


def patcher_argv(mode, model, data_file, out, *extra):
    """patcher.py's flags for a probe of `mode`: the unsafe and inner-attack flags only where the mode takes them
    (patcher.mode_of), as a user's command would have them."""
    own = {k: v or str(data_file) for k, v in INNER.items() if mode in patcher.mode_of(k[2:].replace("-", "_"))}
    return ["--model", str(model), "--safe-data", str(data_file), *STEPS, "--mode", mode, "--out", str(out),
            *[w for kv in own.items() for w in kv], *extra]


def probe(cases, out, nproc=1):
    """Start tests/memory_probe.py on `cases` (one process, or nproc ranks under torchrun), glibc told to return freed
    tensors at once (see its docstring)."""
    out.mkdir(parents=True)
    (out / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return subprocess.Popen([*launcher, str(ROOT / "tests" / "memory_probe.py"), str(out / "cases.json"), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def results(proc, out, timeout=600):
    """{(case, rank): (measured, planned, file pages)} of a finished probe, and (case, rank, "inner attack") for the
    inner attack's own peak; a parallel.py rank is compared with its role's plan."""
    log = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, log[-4000:]
    found = {}
    for f in sorted(out.glob("*-rank*.json")):
        case, rank = f.stem.rsplit("-rank", 1)
        r = json.loads(f.read_text())
        phases = r["phases"]
        if "attacker step" in phases:  # parallel.py at world 2: rank 0 defends, rank 1 attacks
            phases = {k: v for k, v in phases.items() if k.startswith("attacker" if rank == "1" else "defender")}
        found[case, int(rank)] = (r["measured"], max(phases.values()), r["file pages"])
        if r["inner attack"] is not None:
            found[case + " (inner attack)", int(rank)] = (r["inner attack"], phases["inner attack"], r["file pages"])
    return found


def table(found):
    """One line per case and rank (a failure shows them all). `files`: the growth of mapped files in the resident
    memory (a machine short of memory evicts and reloads them, which moves the measurement)."""
    return "\n".join(f"{c:<32} rank {r}: measured {m / 2**20:7.1f} MiB, planned {p / 2**20:7.1f} MiB ({p / m:.2f}), "
                     f"files {f / 2**20:+.0f} MiB" for (c, r), (m, p, f) in sorted(found.items()))


def test_the_plan_matches_the_measured_peak_of_every_defense_program_and_world(world, tmp_path):
    """Per rank, plan and measured peak agree within 20%: every defense of patcher.DEFENSES at one rank (a plain module)
    and at two (FSDP2 over gloo), eval.py's attack and generation, parallel.py --sync (a defender and an attacker);
    among them --reset-optimizer (the paper's; its inner attack planned without the defender's AdamW, which run()
    frees first), --activation-checkpointing and --precision bf16. Two processes side by side, a few cases each."""
    small, d = world["small"], world["data"]
    extra = {"patcher": ["--reset-optimizer", "--defend-steps", "2"],  # a fresh AdamW's moments from its 2nd step
             "booster": ["--activation-checkpointing"]}
    one = [{"name": mode, "program": "patcher",
            "argv": patcher_argv(mode, small, d, tmp_path / f"1-{mode}", *extra.get(mode, []))} for mode in patcher.DEFENSES]
    one.append({"name": "eval", "program": "eval", "argv": [
        "--model", str(world["toy"]), "--attack-data", str(d), "--eval-data", str(d), "--eval-at", "1",
        "--attack-batch-size", "4", "--gen-batch-size", "4", "--max-new-tokens", "8", "--greedy", "--limit", "4",
        "--system-prompt", "", "--out", str(tmp_path / "1-eval")]})
    extra = {"sft": ["--precision", "bf16"]}
    two = [{"name": mode, "program": "patcher",
            "argv": patcher_argv(mode, small, d, tmp_path / f"2-{mode}", *extra.get(mode, []))} for mode in patcher.DEFENSES]
    parallel_argv = patcher_argv("patcher", small, d, tmp_path / "2-parallel", "--sync")
    two.append({"name": "parallel", "program": "parallel", "argv": [w for w in parallel_argv if w not in ("--mode", "patcher")]})
    procs = [probe(one, tmp_path / "one"), probe(two, tmp_path / "two", nproc=2)]  # side by side
    found = {**{(f"1 {c}", r): v for (c, r), v in results(procs[0], tmp_path / "one").items()},
             **{(f"2 {c}", r): v for (c, r), v in results(procs[1], tmp_path / "two").items()}}
    print(table(found))
    attacks = [c for c in one if "--inner-steps" in c["argv"]] + 2 * [c for c in two if c["name"] == "patcher"]
    assert len(found) == len(one) + 2 * len(two) + len(attacks), table(found)  # patcher.py's inner attacks measured too
    assert all(abs(p / m - 1) <= TOLERANCE for m, p, _ in found.values()), table(found)


def test_the_plan_matches_the_measured_peak_of_smollm2(smollm2_dir, tmp_path):
    """The real checkpoint (135M parameters, a tied 49,152-word embedding, GQA): SFT at one rank, on the repository's
    safety data cut to 64 tokens."""
    argv = patcher_argv("sft", smollm2_dir, SAFETY / "attack.jsonl", tmp_path / "run", "--max-len", "64",
                        "--batch-size", "2", "--lr", "1e-5")
    found = results(probe([{"name": "smollm2", "program": "patcher", "argv": argv}], tmp_path / "probe"),
                    tmp_path / "probe")
    print(table(found))
    assert len(found) == 1 and all(abs(p / m - 1) <= TOLERANCE for m, p, _ in found.values()), table(found)


@pytest.mark.parametrize("model_type,precision", [("llama", torch.float32), ("llama", torch.bfloat16),
                                                  ("qwen3", torch.float32), ("qwen3", torch.bfloat16)])
def test_activation_bytes_are_what_autograd_saves(model_type, precision):
    """patcher.activation_bytes against the bytes autograd keeps for backward (saved_tensors_hooks, each storage once,
    the weights not counted): GQA, qwen3's per-head norms, fp32 and bf16 compute, a scored subset of positions."""
    cfg = ModelConfig.from_hf(dict(patcher.DEMO_CONFIG, model_type=model_type, vocab_size=100, num_attention_heads=4,
                                   num_key_value_heads=2, num_hidden_layers=3))
    model = Transformer(cfg).to(precision)
    model.init_weights()
    B, T = 3, 20
    only = torch.zeros(B, T, dtype=torch.bool)
    only[:, 7:] = True
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(100, (B, T)), only=only)
    rope = 2 * T * cfg.head_dim * (4 if precision == torch.float32 else 2)  # cos and sin: not planned (T x head_dim)
    z = patcher.model_sizes(cfg, patcher.param_shapes(cfg), 1, "fp32" if precision == torch.float32 else "bf16-pure", "cpu")
    assert patcher.activation_bytes(z, patcher.Shape(B, T, int(only.sum()))) == sum(saved.values()) - rope


def test_an_8b_patcher_run_does_not_fit_one_80gb_gpu_but_fits_eight(tmp_path, capsys):
    """tests/configs/llama-3-8b.json alone (no weights, no tokenizer): in bf16 at the defaults, one 80 GB GPU is far
    too small, eight are enough."""
    model = tmp_path / "llama-3-8b"
    model.mkdir()
    (model / "config.json").write_text((ROOT / "tests" / "configs" / "llama-3-8b.json").read_text())
    d = tmp_path / "d.jsonl"
    d.write_text('{"prompt": "p", "response": "r"}\n')
    flags = ["--model", model, "--safe-data", d, "--unsafe-data", d, "--precision", "bf16", "--plan", "--plan-memory", 80,
             "--out", tmp_path / "out"]
    with pytest.raises(patcher.RunError) as refused:
        patcher.plan(patcher.parse_args([*flags, "--plan-world", 1]))
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("memory-plan world=1 ") and "fits=0" in line and float(line.split("peak_gib=")[1].split()[0]) > 200
    assert "would fit" in str(refused.value) and "\n" not in str(refused.value)
    patcher.plan(patcher.parse_args([*flags, "--plan-world", 8]))
    line = capsys.readouterr().out.splitlines()[-1]
    assert "fits=1" in line and float(line.split("peak_gib=")[1].split()[0]) < 80
    # the other two programs plan from the config alone as well: parallel.py's halves, eval.py's attack and generation
    parallel.plan(parallel.parse_args([*map(str, flags), "--plan-world", "16"]))
    assert "fits=1" in capsys.readouterr().out.splitlines()[-1]
    ev = ["--model", model, "--attack-data", d, "--eval-data", d, "--precision", "bf16", "--plan", "--plan-memory", 80,
          "--out", tmp_path / "out"]
    with pytest.raises(patcher.RunError):
        evaluate.plan(evaluate.parse_args([*map(str, ev), "--plan-world", "1"]))
    evaluate.plan(evaluate.parse_args([*map(str, ev), "--plan-world", "8"]))
    text = capsys.readouterr().out
    assert "inference copy" in text and "KV cache" in text and "fits=1" in text.splitlines()[-1]
    assert not (tmp_path / "out").exists()  # a plan writes nothing


def paper(tmp_path, flag_lists, **env):
    """train.sh under PRESET=paper with a model directory holding only the 8B config.json, tiny data files, the
    keyword judge and Patcher alone -> CompletedProcess."""
    model = tmp_path / "llama-3-8b"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text((ROOT / "tests" / "configs" / "llama-3-8b.json").read_text())
    records = tmp_path / "d.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"p{i}", "response": f"r{i}"}) + "\n" for i in range(10)))
    base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env = {**base, "PRESET": "paper", "MODEL": str(model), "OUT": str(tmp_path / "out"), "SWEEP": "mode=patcher",
           "JUDGE": "keyword", "ATTACKS": "none", "ATTACK_SAMPLES": "10", "TRAIN_SH_LISTS": str(flag_lists),
           **{v: str(records) for v in ("SAFE_DATA", "UNSAFE_DATA", "ATTACK_DATA", "ATTACK_BENIGN_DATA", "EVAL_DATA")},
           **env}
    return subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, env=env, capture_output=True, text=True)


def test_train_sh_refuses_a_paper_run_that_does_not_fit_before_any_stage(tmp_path, flag_lists):
    """PRESET=paper with NPROC=1 for an 8B model on 80 GiB GPUs (PLAN_MEMORY, as this CPU has none): one line naming
    the estimate, the memory and the NPROC that would fit, before any alignment; nothing trained, nothing recorded
    as this OUT's run."""
    r = paper(tmp_path, flag_lists, NPROC="1", EVAL_NPROC="1", PLAN_MEMORY="80", PRECISION="bf16", MAX_LEN="1024",
              ATTACK_MAX_LEN="1024")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert err[0].startswith("train.sh: NPROC=1: patcher.py --mode patcher needs ~") and "GiB per rank, but 80.0 GiB are" \
        " free per rank; NPROC=" in err[0] and " would fit; SKIP_MEMORY_CHECK=1 runs it anyway" in err[0], err
    seed = tmp_path / "out" / "seed0"
    assert not (seed / "patcher").exists() and not (tmp_path / "out" / "plan.txt").exists()


def test_train_sh_takes_the_presets_nproc_from_the_plan_or_refuses_naming_it(tmp_path, flag_lists):
    """Left unset under a paper preset, NPROC and EVAL_NPROC become the fewest processes whose plans fit (DRY_RUN=1
    prints the commands with them); where none fits (this CPU's RAM, shared by its ranks) train.sh says so, naming the
    variable, and runs nothing."""
    r = paper(tmp_path, flag_lists, DRY_RUN="1", PLAN_MEMORY="80", PRECISION="bf16", MAX_LEN="1024", ATTACK_MAX_LEN="1024")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    chosen = dict(line.split(":")[1].strip().split("=") for line in r.stdout.splitlines() if line.startswith("train.sh: "))
    launched = {w[5]: int(w[4].split("=")[1]) for w in map(str.split, r.stdout.splitlines())
                if w[:3] == ["python", "-m", "torch.distributed.run"]}
    assert set(chosen) == {"NPROC", "EVAL_NPROC"} and launched == {"patcher.py": int(chosen["NPROC"]),
                                                                  "eval.py": int(chosen["EVAL_NPROC"])}, r.stdout
    assert 1 < int(chosen["NPROC"]) <= 8 and not (tmp_path / "out").exists()
    r = paper(tmp_path, flag_lists, DRY_RUN="1", EVAL_NPROC="1")  # (the alignment alone left to its plan)
    assert r.returncode == 1 and "python " not in r.stdout and r.stderr.startswith("train.sh: NPROC: no number of processes fits"), \
        r.stdout[-2000:] + r.stderr[-2000:]
    assert "the ranks of a CPU host share its RAM" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_run_that_would_not_fit_is_refused_before_its_weights_are_read(demo_base, tmp_path, capsys, monkeypatch):
    """A plan above the device's memory (--plan-memory states a tiny one): the run stops before build_model, rank 0
    saying in one line the estimate, what is free, what would fit and the escape hatch, and main() exits 1 without a
    second line; --skip-memory-check runs the same command."""
    built, real = [], patcher.build_model
    monkeypatch.setattr(patcher, "build_model", lambda *a, **k: built.append(1) or real(*a, **k))
    out = with_base(tmp_path / "run", demo_base)
    argv = ["--out", str(out), *FAST, "--plan-memory", "0.001"]  # 1 MiB
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        patcher.main(parse=lambda: patcher.parse_args(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 1 and built == [] and len(err) == 1, err
    assert err[0].startswith("error: memory plan: patcher.py --mode patcher needs ~") and "MiB per rank at world 1" in err[0]
    assert "1.0 MiB are free per device (--plan-memory 0.001)" in err[0] and "--skip-memory-check runs it" in err[0]
    patcher.run(patcher.parse_args([*argv, "--skip-memory-check"]))
    assert built == [1] and (out / "final" / "config.json").exists()


def test_the_plan_against_this_hosts_ram_counts_its_ranks_sharing_it(tmp_path):
    """On the CPU the budget is the host's available RAM shared by the ranks of the host: a world of W gets 1/W each,
    so where one rank does not fit no number does, and the refusal says why."""
    budget = patcher.memory_budget(torch.device("cpu"))
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert budget.shared and abs(budget.free / 1024 - int(meminfo["MemAvailable"].split()[0])) < 2**20  # within 1 GiB
    assert budget.per_rank(4) == budget.free / 4
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((ROOT / "tests" / "configs" / "llama-3-8b.json").read_text())
    args = patcher.parse_args(["--model", model, "--safe-data", __file__, "--unsafe-data", __file__, "--plan",
                               "--out", tmp_path / "o"])
    with pytest.raises(patcher.RunError) as refused:
        patcher.plan(args)
    assert "no number of ranks fits: the ranks of a host share its RAM" in str(refused.value)
