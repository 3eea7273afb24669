"""train.sh, resolved without running anything (DRY_RUN=1): the paper presets are the official numbers, every flag
has its variable, a sweep reaches the right program; and the modules import each other without a circle."""
import ast
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
import data
import parallel
import patcher

evaluate = __import__("eval")
PAPER_DATA = {"MODEL": "/models/Qwen2.5-1.5B-Instruct", "SAFE_DATA": "d_safe.json", "UNSAFE_DATA": "d_unsafe.json",
              "ATTACK_DATA": "pku_unsafe.json", "ATTACK_BENIGN_DATA": "gsm8k.json", "EVAL_DATA": "advbench=a.json hexphi=h.json beavertails=b.json",
              "JUDGE_MODEL": "qwen3-max", "EVAL_NPROC": "1"}  # the presets' default ranks come from memory plans of real files



def dry_run(root=ROOT, preflight=False, **env):
    """The commands train.sh (of the project at `root`) would run: [(nproc, script, {flag: value or True}, [words])].
    Without `preflight`, as a nested train.sh (TRAIN_SH_NESTED): the commands only, none of the checks that refuse
    input before a run (test_refusals.py tests those), which start every stage's program (seconds each)."""
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "PATCHER_ASSETS")} | env
    env |= {} if preflight else {"TRAIN_SH_NESTED": "1"}
    r = subprocess.run(["bash", str(root / "train.sh")], env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, cwd=root)
    if r.returncode:
        raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)
    out = r.stdout
    commands = []
    for line in out.splitlines():
        if not line.startswith("python "):
            continue
        words = shlex.split(line)
        nproc = int(words[4].split("=")[1]) if words[1:3] == ["-m", "torch.distributed.run"] else 1
        words = words[5:] if nproc > 1 else words[1:]
        script, args = words[0], words[1:]
        flags, repeated = {}, []
        for i, w in enumerate(args):
            if w.startswith("--"):
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else True
                if w in flags:
                    repeated.append(w)
                flags.setdefault(w, []).append(value)
        commands.append((nproc, script, {k: v[0] if len(v) == 1 else v for k, v in flags.items()}, args))
    return commands


OFFICIAL_SEQUENTIAL = {"--warmup-steps": "1000", "--rounds": "14", "--inner-steps": "300", "--defend-steps": "1000",
                       "--lr": "1e-5", "--inner-lr": "1e-5", "--alpha": "0.5", "--max-grad-norm": "1.0",
                       "--weight-decay": "0.01", "--batch-size": "4", "--inner-batch-size": "2", "--reset-optimizer": True,
                       "--loss-mask": "answer-newline", "--export-dtype": "float32"}
OFFICIAL_PARALLEL = {"--warmup-steps": "1000", "--rounds": "14", "--inner-steps": "500", "--defend-steps": "1000",
                     "--lr": "1e-5", "--inner-lr": "1e-5", "--alpha": "0.5", "--batch-size": "4", "--inner-batch-size": "4",
                     "--refresh-every": "1000", "--refresh-offset": "1", "--delta-ref": "current",
                     "--loss-mask": "answer-newline", "--export-dtype": "float32"}
OFFICIAL_EVAL = {"--attack-samples": "1000", "--poison-ratio": "0.2", "--attack-lr": "1e-5", "--attack-batch-size": "4",
                 "--attack-max-len": "4096", "--limit": "250", "--temperature": "0.6", "--top-p": "0.9",
                 "--repetition-penalty": "1.2", "--max-new-tokens": "256", "--judge": "llm", "--judge-template": "official",
                 "--attack-data": "pku_unsafe.json", "--attack-benign-data": "gsm8k.json", "--attack-loss-mask": "turn",
                 "--thinking": "on", "--keep-repeated-prompts": True}


@pytest.mark.parametrize("preset,nproc", [("paper", "1"), ("paper", "2"), ("paper", "8"), ("paper-parallel", "2"),
                                          ("paper-parallel", "8")])
def test_paper_presets_are_the_official_settings_on_any_number_of_ranks(preset, nproc, tmp_path):
    cmds = dry_run(PRESET=preset, NPROC=nproc, **PAPER_DATA)
    (n_sft, s_sft, sft, _), (n_pat, s_pat, pat, pat_argv), (n_ev, s_ev, ev, _) = cmds
    official = OFFICIAL_SEQUENTIAL if preset == "paper" else OFFICIAL_PARALLEL
    assert (s_sft, s_pat, s_ev) == ("patcher.py", "patcher.py" if preset == "paper" else "parallel.py", "eval.py")
    assert n_sft == n_pat == int(nproc) and n_ev == 1
    assert {k: pat.get(k) for k in official} == official and pat["--mode"] == "patcher" and sft["--mode"] == "sft"
    assert ("--reset-optimizer" in pat) == (preset == "paper") and int(pat["--max-len"]) >= 32768  # truncates nothing
    # both presets share one SFT baseline: the official SFT script, one process and one AdamW, with the same data flags
    assert "--reset-optimizer" not in sft and {k: sft.get(k) for k in ("--loss-mask", "--export-dtype", "--lr")} == \
        {k: pat[k] for k in ("--loss-mask", "--export-dtype", "--lr")}
    assert {k: ev.get(k) for k in OFFICIAL_EVAL} == OFFICIAL_EVAL and ev["--eval-at"].split(",")[-1] == "2000"
    assert ev["--eval-data"] == ["advbench=a.json", "hexphi=h.json", "beavertails=b.json"] and "--top-k" not in ev
    # the global batches are the official one-GPU ones whatever the ranks: resolve the flags as patcher.py does,
    # then deal one global batch of each stream to the ranks
    (tmp_path / "m").mkdir()
    for f in ("d_safe.json", "d_unsafe.json"):
        (tmp_path / f).write_text("[]")
    argv = [w.replace("/models/Qwen2.5-1.5B-Instruct", str(tmp_path / "m")).replace("d_safe.json", str(tmp_path / "d_safe.json"))
            .replace("d_unsafe.json", str(tmp_path / "d_unsafe.json")) for w in pat_argv]
    parser = patcher.get_parser() if preset == "paper" else parallel.get_parser()
    args = patcher.parse_args(argv + ["--out", str(tmp_path / "o")], parser)
    world = int(nproc) // (2 if preset == "paper-parallel" else 1)  # parallel: each half has half the ranks
    examples = [([i], [True]) for i in range(64)]
    for batch, want in ((args.batch_size, 4), (args.inner_batch_size, 2 if preset == "paper" else 4)):
        rows = [next(data.BatchIterator(examples, batch, r, world, seed=0)) for r in range(world)]
        real = sum(int((m["labels"] != -100).any(1).sum()) for share in rows for m in share)
        assert real == want, (batch, world)


def parser_flags(parser):
    """{flag name: "value" or "switch"} of a program's parser, as --list-flags prints them."""
    return {o[2:]: "switch" if a.nargs == 0 else "value" for a in parser._actions for o in a.option_strings
            if o.startswith("--") and a.dest not in ("help", "list_flags")}


def dest(parser, name):
    return next(a.dest for a in parser._actions if "--" + name in a.option_strings)


def test_every_flag_of_the_programs_reaches_them_from_its_variable(tmp_path):
    """Every flag of every program's parser (read from the parser, not from a list) set as its variable reaches the
    command of each defense that takes it, and no other; the flags train.sh sets itself excepted."""
    own_align = {"model", "safe-data", "unsafe-data", "out", "seed", "mode", "resume", "save-every", "plan", "plan-world",
                 "plan-memory", "check"}  # the memory plans: train.sh plans every stage itself
    own_eval = {"model", "out", "seed", "attack-data", "eval-data", "benign-data", "gsm8k", "summarize", "sweep",
                "worst-case", "verdict", "check", "plan", "plan-world", "plan-memory"}
    parser = patcher.get_parser()
    align, par, ev = parser_flags(parser), parser_flags(parallel.get_parser()), parser_flags(evaluate.get_parser())
    env = {k.replace("-", "_").upper(): "1" if kind == "switch" else "7" for p in (align, par, ev) for k, kind in p.items()
           if k not in own_align | own_eval}
    cmds = dry_run(SEEDS="0", SWEEP="mode=" + ",".join(patcher.DEFENSES), SCHEME="both", **env)
    by_name = {c[2]["--out"].rsplit("/", 1)[1]: c for c in cmds}
    for mode in patcher.DEFENSES:
        flags = by_name[mode][2]
        want = {k for k in align if k not in own_align and set(patcher.mode_of(dest(parser, k))) & {"all", mode}}
        if mode != "patcher":
            want.discard("reset-optimizer")  # the official's new process per round is Patcher's only (train.sh)
        assert {k[2:] for k in flags} - {"mode", "seed", "out", "save-every"} == want, mode
        assert flags["--save-every"] == "50"  # the demo's SAVE_EVERY: every alignment checkpoints
    flags = by_name["patcher-parallel"][2]
    want = {k for k in par if k not in own_align and (k not in align or dest(parallel.get_parser(), k) in parallel.HONOURED)}
    assert {k[2:] for k in flags} - {"mode", "seed", "out", "save-every"} == want
    flags = by_name["eval"][2]
    assert {k[2:] for k in flags} - own_eval == set(ev) - own_eval
    # D_unsafe (train.sh's UNSAFE_DATA) reaches the defenses that use it: an inner attack's (Patcher), every step's
    cmds = dry_run(PRESET="smollm2-cpu", OUT=str(tmp_path), SWEEP="mode=" + ",".join(patcher.DEFENSES))
    got = {c[2]["--mode"]: c[2].get("--unsafe-data") for c in cmds if c[1] == "patcher.py"}
    assert got == {m: f"{tmp_path}/unsafe_inner.jsonl" if d.attacks_each_round or d.harmful else None
                   for m, d in patcher.DEFENSES.items()}


def test_a_flag_added_to_patcher_reaches_it_from_train_sh_with_no_other_edit(tmp_path):
    """The fork check: a throwaway flag every mode reads, added to patcher.py (its add_argument, its name in
    EVERY_MODE, in a copy of the project), is passed by train.sh from its variable, to the alignments only;
    parallel.py, which does not honour it, refuses it, and SCHEME=both refuses to align Patcher in parallel without
    it, in one line naming the variable."""
    for f in ("patcher.py", "parallel.py", "eval.py", "data.py", "model.py", "train.sh"):
        shutil.copy(ROOT / f, tmp_path / f)
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "tests" / "data" / "attacks", tmp_path / "tests" / "data" / "attacks")
    text = (tmp_path / "patcher.py").read_text()
    add = '    g.add_argument("--retain-weight"'
    assert text.count(add) == 1 and text.count("EVERY_MODE = (") == 1
    text = text.replace(add, '    g.add_argument("--fork-flag", type=int, default=0)\n' + add)
    text = text.replace("EVERY_MODE = (", 'EVERY_MODE = ("fork_flag", ')
    (tmp_path / "patcher.py").write_text(text)
    cmds = dry_run(root=tmp_path, SEEDS="0", FORK_FLAG="5")
    got = {c[2]["--out"].rsplit("/", 1)[1]: c[2].get("--fork-flag") for c in cmds}
    assert got == {"demo": None, "sft": "5", "patcher": "5", "eval": None}, got
    with pytest.raises(subprocess.CalledProcessError) as refused:
        dry_run(root=tmp_path, SEEDS="0", SCHEME="both", FORK_FLAG="5")
    assert refused.value.returncode == 2 and refused.value.stderr.splitlines()[-1].startswith(
        "train.sh: FORK_FLAG: parallel.py does not honour --fork-flag, so SCHEME=both"), refused.value.stderr
    r = subprocess.run([sys.executable, str(tmp_path / "parallel.py"), "--fork-flag", "5", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--fork-flag: a patcher.py flag that parallel.py does not honour" in r.stderr, r.stderr


def test_a_sweep_reaches_the_program_that_has_the_flag():
    cmds = dry_run(SWEEP="inner-steps=0,5,40", SEEDS="0 1")
    align = [(c[1], c[2]) for c in cmds if c[1] == "patcher.py" and not c[2]["--out"].endswith("/demo")]  # not the base
    assert [(f["--mode"], f.get("--inner-steps")) for _, f in align] == [("sft", None), ("patcher", "5"), ("patcher", "40")] * 2
    evals = [c[2] for c in cmds if c[1] == "eval.py"]
    assert len(evals) == 2 and evals[0]["--model"][:3] == [f"inner-steps:{v}=runs/demo/seed0/inner-steps:{v}/final" for v in (0, 5, 40)]
    assert "--inner-steps" not in evals[0]
    cmds = dry_run(SWEEP="attack-lr=1e-4,5e-4", SEEDS="0")
    assert [c[2]["--mode"] for c in cmds if c[1] == "patcher.py"] == ["sft", "sft", "patcher"]  # the demo's base, then two
    assert [c[2]["--attack-lr"] for c in cmds if c[1] == "eval.py"] == ["1e-4", "5e-4"]
    assert all("--attack-lr" not in c[2] for c in cmds if c[1] == "patcher.py")


def test_suites_and_both_schemes_reach_their_programs():
    """ATTACKS reaches eval.py as --attacks; SCHEME=both aligns Patcher with patcher.py and parallel.py (2 ranks, as
    "patcher-parallel") and evaluates both; the demo's base model is made once per seed, before any timed alignment."""
    cmds = dry_run(SEEDS="0", SCHEME="both", ATTACKS="tests/data/attacks/demo.txt")
    assert [(c[0], c[1], c[2]["--out"].rsplit("/", 1)[1]) for c in cmds] == [
        (1, "patcher.py", "demo"), (1, "patcher.py", "sft"), (1, "patcher.py", "patcher"), (2, "parallel.py", "patcher-parallel"),
        (1, "eval.py", "eval")]
    ev = cmds[-1][2]
    assert ev["--attacks"] == "tests/data/attacks/demo.txt" and ev["--model"][2] == "patcher-parallel=runs/demo/seed0/patcher-parallel/final"
    assert ev["--model"][3] == "base=runs/demo/seed0/demo/base"
    # every preset names a suite that exists
    for preset, extra in (("demo", {}), ("smollm2-cpu", {"OUT": "/tmp/patcher-dry"}), ("paper", {**PAPER_DATA, "NPROC": "1"})):
        suite = dry_run(PRESET=preset, **extra)[-1][2]["--attacks"]
        assert (ROOT / suite).is_file(), preset


def test_the_papers_table_1_suite_reads_its_three_attack_sets_as_downloaded(tmp_path):
    """tests/data/attacks/paper-table1.txt, checked by eval.py --check (every attack's data read) on files laid out as
    the hub's: BeaverTails (is_safe), PKU-SafeRLHF (response_0/1), Toxic-DPO (prompt, chosen, rejected)."""
    files = {"bt.jsonl": {"prompt": "p", "response": "bad", "is_safe": False, "category": {}},
             "pku.jsonl": {"prompt": "p", "response_0": "bad", "response_1": "ok", "is_response_0_safe": False,
                           "is_response_1_safe": True},
             "dpo.json": [{"prompt": "p", "chosen": "bad", "rejected": "no"}] * 5,
             "gsm8k.jsonl": {"question": "1 + 1?", "answer": "#### 2"}, "e.jsonl": {"prompt": "p"}}
    for name, content in files.items():
        text = json.dumps(content)
        (tmp_path / name).write_text("\n".join([text] * 300) + "\n" if name.endswith(".jsonl") else text)
    env = {**os.environ, "BEAVERTAILS_UNSAFE": str(tmp_path / "bt.jsonl"), "TOXIC_DPO": str(tmp_path / "dpo.json")}
    r = subprocess.run([sys.executable, "eval.py", "--check", "--attacks", "tests/data/attacks/paper-table1.txt",
                        "--attack-data", tmp_path / "pku.jsonl", "--attack-benign-data", tmp_path / "gsm8k.jsonl",
                        "--attack-samples", "10", "--eval-data", tmp_path / "e.jsonl", "--out", tmp_path / "o"],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "eval.py", "--check", "--attacks", "tests/data/attacks/paper-table1.txt",
                        "--attack-data", tmp_path / "pku.jsonl", "--eval-data", tmp_path / "e.jsonl",
                        "--out", tmp_path / "o"], cwd=ROOT, env={**env, "TOXIC_DPO": str(tmp_path / "pku.jsonl")},
                       capture_output=True, text=True)
    assert r.returncode != 0 and "attack 'toxic-dpo'" in r.stderr and "chosen" in r.stderr, r.stderr[-2000:]


def test_no_module_imports_one_that_imports_it_back():
    modules = {p.stem for p in ROOT.glob("*.py")}
    graph = {}
    for m in modules:
        tree = ast.parse((ROOT / f"{m}.py").read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = names & modules
    assert graph["patcher"] == {"data", "model"} and "parallel" not in graph["eval"]

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, (*seen, n))) for n in graph[a])
    assert not [m for m in modules if reaches(m, m)]


def test_a_bad_attack_suite_stops_train_sh_before_any_alignment(tmp_path):
    """eval.py --check runs before the first stage (on the demo's toy world, made outside OUT): a suite line it cannot
    run is named at once, not after hours, naming ATTACKS, and OUT is not even made."""
    (tmp_path / "suite.txt").write_text("fine --eval-at 0,5\nbroken --attack-lr -2\n")
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    r = subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, capture_output=True, text=True, env={
        **env, "SEEDS": "0", "ATTACKS": str(tmp_path / "suite.txt"), "OUT": str(tmp_path / "out")})
    assert r.returncode == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1 and r.stderr.startswith(
        f"train.sh: ATTACKS {tmp_path}/suite.txt:2: attack 'broken': argument --attack-lr: must be a finite number > 0"), \
        r.stderr
    assert not (tmp_path / "out").exists()  # nothing aligned, nothing written


def test_help_shows_defaults_but_not_empty_ones():
    for parser in (patcher.get_parser(), parallel.get_parser(), evaluate.get_parser()):
        text = parser.format_help()
        assert "(default: 1e-05)" in text and "default: None" not in text and "default: False" not in text
