"""Every flag of patcher.py and parallel.py changes exactly what it should. One case per flag, checked against a
baseline run of the demo (in this process, so that forty runs take a minute), and a test that fails when a flag has
no case: a flag added later must bring its own. parallel.py's inherited flags are checked all at once (--sync with
every one of them set equals patcher.py with the same flags), its own flags by the tests named in PARALLEL_OWN."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

from conftest import run_script, with_base
import data
import parallel
import patcher
import test_faults
import test_memory_plan
import test_parallel
from test_gpu_paths import BF16_HEADER, BF16_TOL, FIRST_TOL
from test_patcher import FAST, FAST_SCHEDULE, assert_rows_close, rows

# FAST: warmup 3, rounds 2, inner 3, defend 4. The rows of metrics.jsonl, by index:
#   0-2 warmup | 3 inner attack, round 0 | 4-7 defend | 8 inner attack, round 1 | 9-12 defend
FIRST_ATTACK, FIRST_DEFEND = 3, 4
KEYS = ("loss_clean", "loss_adv", "loss_retain", "grad_norm", "attack_losses", "delta_norm")


def flags_of(parser):
    return {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}


def first_difference(a, b, tol=1e-6):
    """The index of the first row where the two runs differ (phase, or a number by more than tol, relative to
    numbers above 1), or None."""
    def far(u, v):
        u, v = (u, v) if isinstance(u, list) else ([u], [v])
        return len(u) != len(v) or any(abs(p - q) > tol * max(1.0, abs(p)) for p, q in zip(u, v))
    for i, (x, y) in enumerate(zip(a, b)):
        if (x["step"], x["phase"]) != (y["step"], y["phase"]):
            return i
        for k in KEYS:
            u, v = x.get(k), y.get(k)
            if (u is None) != (v is None) or (u is not None and far(u, v)):
                return i
    return None if len(a) == len(b) else min(len(a), len(b))


def fast(argv):
    """FAST for the mode `argv` names: its inner attack flag only where there is an inner attack."""
    argv = list(map(str, argv))
    mode = argv[argv.index("--mode") + 1] if "--mode" in argv else "patcher"
    return FAST if patcher.DEFENSES[mode].attacks_each_round else FAST_SCHEDULE


def run_demo(out, argv, demo_base):
    """patcher.py in this process on a fresh --out holding the demo's base model -> (rows, the run's --out)."""
    out = with_base(out, demo_base)
    patcher.run(patcher.parse_args(["--out", str(out), *fast(argv), *map(str, argv)]))
    return rows(out), out


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, demo_base):
    """The plain demo run every case is compared with, and its data files (for the cases that name files)."""
    rs, out = run_demo(tmp_path_factory.mktemp("baseline") / "run", [], demo_base)
    return rs, out


def explicit(baseline, **files):
    """The baseline run's flags spelled out: its base model, data files and the demo's preset, with files replaced."""
    out = baseline[1]
    paths = {"safe-data": out / "data" / "safe.jsonl", "unsafe-data": out / "data" / "unsafe.jsonl"}
    paths.update({k.replace("_", "-"): v for k, v in files.items()})
    return ["--model", out / "base", *[w for k, v in paths.items() for w in (f"--{k}", v)], *patcher.DEMO_FLAGS, *FAST]


def renamed(src, dst, **names):
    """A copy of a JSONL data file with its fields renamed."""
    recs = [json.loads(line) for line in Path(src).read_text().splitlines()]
    Path(dst).write_text("".join(json.dumps({names.get(k, k): v for k, v in r.items()}) + "\n" for r in recs))
    return dst


# -----------------------------------------------------------------------------
# patcher.py: one case per flag. A case is (argv, check): check(base_rows, rows, ctx) with ctx = {"out", "stdout",
# "baseline", "calls"} asserts what the flag must change and what it must leave alone.

def differs_first_at(i):
    def check(base, rs, ctx):
        assert first_difference(base, rs) == i, f"first difference at row {first_difference(base, rs)}, expected {i}"
    return check


def unchanged(tol=1e-6):
    def check(base, rs, ctx):
        assert first_difference(base, rs, tol) is None
    return check


def phases(rs):
    return [r["phase"] for r in rs]


def check_rounds(base, rs, ctx):
    assert phases(rs).count("inner_attack") == 3 and first_difference(base, rs) == 13


def check_warmup(base, rs, ctx):
    assert phases(rs)[:6] == ["warmup"] * 5 + ["inner_attack"]


def check_inner_steps(base, rs, ctx):
    assert len(rs[FIRST_ATTACK]["attack_losses"]) == 5 and first_difference(base, rs) == FIRST_ATTACK


def check_defend_steps(base, rs, ctx):
    assert phases(rs)[FIRST_ATTACK:] == ["inner_attack", "defend", "defend"] * 2 and first_difference(base, rs) == 6


def check_mode_sft(base, rs, ctx):
    assert "inner_attack" not in phases(rs) and len(rs) == 3 + 2 * 4 and all("loss_adv" not in r for r in rs)
    assert first_difference(base[:FIRST_ATTACK], rs[:FIRST_ATTACK]) is None  # the warmup is the same plain SFT


def check_retain_weight(base, rs, ctx):
    assert all("loss_retain" in r for r in rs if r["phase"] != "inner_attack") and first_difference(base, rs) == 0


def check_micro_batch(base, rs, ctx):
    assert "global batch 16 = 4 x 1 ranks x 4" in ctx["stdout"]
    unchanged(1e-4)(base, rs, ctx)  # the same update, summed in another order: 11 AdamW steps apart by < 1e-4


def check_max_len(base, rs, ctx):
    assert "truncated at --max-len 8" in ctx["stdout"] and first_difference(base, rs) == 0


def refused_format(base, rs, ctx):
    assert isinstance(rs, data.DataError) and "is_safe" in str(rs)


def check_out(base, rs, ctx):
    assert (ctx["out"] / "metrics.jsonl").exists() and (ctx["out"] / "final" / "config.json").exists()


def check_save_every(base, rs, ctx):
    # every 5 steps, and at the last one before the export; the last two are kept
    assert sorted(p.name for p in (ctx["out"] / "checkpoints").glob("step-*")) == ["step-0000010", "step-0000011"]
    unchanged()(base, rs, ctx)


def check_resume(base, rs, ctx):
    assert "resumed at step 10" in ctx["stdout"]  # from the older checkpoint: one more step to train
    unchanged()(base, rs, ctx)


def check_fused(base, rs, ctx):
    assert ctx["calls"]["fused"] and all(ctx["calls"]["fused"]), ctx["calls"]  # every AdamW, defender and inner
    unchanged(1e-4)(base, rs, ctx)  # one kernel for all parameters: the same update up to rounding


def check_compile(base, rs, ctx):
    assert ctx["calls"]["compiled"] == 1  # (compiled runs are compared with eager ones in test_patcher)
    unchanged()(base, rs, ctx)


def check_export_dtype(base, rs, ctx):
    config = json.loads((ctx["out"] / "final" / "config.json").read_text())
    with safe_open(ctx["out"] / "final" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert config["torch_dtype"] == "bfloat16" and dtypes == {"BF16"}  # the demo's base is stored in fp32
    unchanged()(base, rs, ctx)


def check_debug(base, rs, ctx):
    assert isinstance(rs, data.DataError)  # raised with its traceback, not turned into one line and exit 1


def modes_reading(dest):
    """The --mode values that read flag `dest`, from DEFENSES as a reader states the rule: a defense reads its own
    flags, the inner attack's (INNER_FLAGS) if it has one, D_unsafe's if it draws D_unsafe; no defense's: all."""
    modes = [m for m, d in patcher.DEFENSES.items() if dest in d.flags or (d.attacks_each_round and dest in patcher.INNER_FLAGS)
             or ((d.attacks_each_round or d.harmful) and dest in patcher.UNSAFE_FLAGS)]
    return ",".join(modes) or "all"


def check_list_flags(base, rs, ctx):
    """One line per flag of the parser, 'NAME value|switch MODES same|changes', the modes from the defenses
    (modes_reading): what train.sh reads. A flag of no mode is missing from the list, and fails here too."""
    lines = ctx["stdout"].splitlines()
    want = {f"{o[2:]} {'switch' if a.nargs == 0 else 'value'} {modes_reading(a.dest)} "
            f"{'same' if a.dest in patcher.NOT_RUN_SETTINGS else 'changes'}"
            for a in patcher.get_parser()._actions for o in a.option_strings
            if o.startswith("--") and a.dest not in ("help", "list_flags")}
    assert sorted(lines) == sorted(want), set(lines) ^ want
    for line in ("lr value all changes", "no-fused-adamw switch all same", "save-every value all same"):
        assert line in lines, line  # what same and changes mean


def check_precision(base, rs, ctx):
    """bf16 moves every loss by rounding only: the first already (by more than fp32's rounding), none by more than the
    tolerance stated in test_gpu_paths.py; the steps are the same."""
    assert f"world 1 | {BF16_HEADER} |" in ctx["stdout"] and phases(rs) == phases(base)
    assert first_difference(base, rs) == 0 and abs(rs[0]["loss_clean"] - base[0]["loss_clean"]) < FIRST_TOL * base[0]["loss_clean"]
    assert_rows_close(base, rs, BF16_TOL, ("loss_clean", "loss_adv", "attack_loss_start", "attack_loss_end", "delta_norm"))


def check_collective_timeout(base, rs, ctx):
    """The process group gets the timeout (bf16 gives one process a one-rank group); the numbers are bf16's."""
    assert ctx["calls"]["timeouts"] == [123.0] and phases(rs) == phases(base)


def check_log_every(base, rs, ctx):
    """A step line every 5 steps, and always the first, the last and each inner attack's; metrics.jsonl keeps every step."""
    printed = [int(line.split()[1].split("/")[0]) for line in ctx["stdout"].splitlines() if line.startswith("step ")]
    assert printed == [1, 5, 10, 11] and ctx["stdout"].count("inner attack, round") == 2, ctx["stdout"]
    unchanged()(base, rs, ctx)


# flag -> (argv, check); argv may be a function of the baseline (for the cases that name its files) and of tmp_path
CASES = {
    "model": (lambda b, t: explicit(b), unchanged()),
    "safe_data": (lambda b, t: explicit(b, safe_data=b[1] / "data" / "retain.jsonl"), differs_first_at(0)),
    "unsafe_data": (lambda b, t: explicit(b, unsafe_data=b[1] / "data" / "attack.jsonl"), differs_first_at(FIRST_ATTACK)),
    "safe_format": (lambda b, t: [*explicit(b), "--safe-format", "beavertails"], refused_format),
    "unsafe_format": (lambda b, t: [*explicit(b), "--unsafe-format", "beavertails"], refused_format),
    "retain_data": (lambda b, t: [*explicit(b), "--retain-weight", "1", "--retain-data", b[1] / "data" / "eval_benign.jsonl"],
                    "retain_weight"),  # compared with --retain-weight 1 on the demo's own retain set
    "prompt_field": (lambda b, t: [*explicit(b, safe_data=renamed(b[1] / "data" / "safe.jsonl", t / "s.jsonl", prompt="q"),
                                             unsafe_data=renamed(b[1] / "data" / "unsafe.jsonl", t / "u.jsonl", prompt="q")),
                                   "--prompt-field", "q"], unchanged()),
    "response_field": (lambda b, t: [*explicit(b, safe_data=renamed(b[1] / "data" / "safe.jsonl", t / "s.jsonl", response="a"),
                                               unsafe_data=renamed(b[1] / "data" / "unsafe.jsonl", t / "u.jsonl", response="a")),
                                     "--response-field", "a"], unchanged()),
    "system_prompt": "text",  # the toy world has no system turn: test_flags_that_need_a_chat_template
    "loss_mask": "text",
    "max_len": (["--max-len", "8"], check_max_len),
    "mode": (["--mode", "sft"], check_mode_sft),
    "alpha": (["--alpha", "0.9"], differs_first_at(FIRST_DEFEND)),  # same losses at the first defender step, other gradient
    "warmup_steps": (["--warmup-steps", "5"], check_warmup),
    "rounds": (["--rounds", "3"], check_rounds),
    "inner_steps": (["--inner-steps", "5"], check_inner_steps),
    "defend_steps": (["--defend-steps", "2"], check_defend_steps),
    "reset_optimizer": (["--reset-optimizer"], differs_first_at(FIRST_DEFEND + 1)),  # a fresh AdamW's first update
    "retain_weight": (["--retain-weight", "1"], check_retain_weight),
    # a defense's own flags: compared with that defense's run at its defaults; its first update (row 3) changes
    "vaccine_rho": (["--mode", "vaccine", "--vaccine-rho", "4"], ("reference", ["--mode", "vaccine"], differs_first_at(3))),
    "booster_lambda": (["--mode", "booster", "--booster-lambda", "1"], ("reference", ["--mode", "booster"], differs_first_at(3))),
    "booster_alpha": (["--mode", "booster", "--booster-alpha", "0.5"], ("reference", ["--mode", "booster"], differs_first_at(3))),
    "lr": (["--lr", "1e-3"], differs_first_at(1)),
    "weight_decay": (["--weight-decay", "5"], differs_first_at(1)),
    "max_grad_norm": (["--max-grad-norm", "0.01"], differs_first_at(1)),  # the reported norm is the one before clipping
    "batch_size": (["--batch-size", "8"], differs_first_at(0)),
    "inner_lr": (["--inner-lr", "1e-3"], differs_first_at(FIRST_ATTACK)),
    "inner_weight_decay": (["--inner-weight-decay", "5"], differs_first_at(FIRST_ATTACK)),
    # the demo's inner gradients are below the default bound, and a bound below them only rescales every step, which
    # AdamW undoes (0.01 changed the losses by less than the tolerance until row 8); at 1e-7 AdamW's eps dominates
    "inner_max_grad_norm": (["--inner-max-grad-norm", "1e-7"], differs_first_at(FIRST_ATTACK)),
    "inner_batch_size": (["--inner-batch-size", "8"], differs_first_at(FIRST_ATTACK)),
    "micro_batch_size": (["--micro-batch-size", "4"], check_micro_batch),
    "group_by_length": (["--group-by-length"], differs_first_at(0)),
    "seed": (lambda b, t: [*explicit(b), "--seed", "1"], differs_first_at(0)),  # the data order (the demo: its base)
    "out": ([], check_out),
    "save_every": (["--save-every", "5"], check_save_every),
    "resume": ("resume", check_resume),  # a --save-every 5 run, then --resume on it
    "activation_checkpointing": (["--activation-checkpointing"], unchanged()),
    "compile": (["--compile"], check_compile),
    "fused_adamw": (["--fused-adamw"], check_fused),
    "debug": ("debug", check_debug),
    "export_dtype": (["--export-dtype", "bfloat16"], check_export_dtype),
    "precision": (["--precision", "bf16"], check_precision),  # a one-rank gloo group in this process: closed after
    "collective_timeout": (["--collective-timeout", "123", "--precision", "bf16"], check_collective_timeout),
    "list_flags": ("list_flags", check_list_flags),
    "log_every": (["--log-every", "5"], check_log_every),
    # (a new flag's case goes here)
    "check": "check",  # it trains nothing: tests/test_refusals.py::test_check_reads_config_and_data_and_writes_nothing
    "plan": "memory", "plan_world": "memory", "plan_memory": "memory", "skip_memory_check": "memory",
}
MEMORY = {  # the memory plan's flags -> the test of tests/test_memory_plan.py that shows each one's effect
    "plan": test_memory_plan.test_an_8b_patcher_run_does_not_fit_one_80gb_gpu_but_fits_eight,
    "plan_world": test_memory_plan.test_an_8b_patcher_run_does_not_fit_one_80gb_gpu_but_fits_eight,
    "plan_memory": test_memory_plan.test_a_run_that_would_not_fit_is_refused_before_its_weights_are_read,
    "skip_memory_check": test_memory_plan.test_a_run_that_would_not_fit_is_refused_before_its_weights_are_read,
}


def test_every_flag_of_patcher_belongs_to_a_mode():
    """Each flag is read by every mode (patcher.EVERY_MODE) or by some defenses (Defense.reads: their own flags, the
    inner attack's, D_unsafe's): never neither (--mode sft would take it and ignore it, train.sh never pass it), never
    both; and each name there is a flag."""
    flags, every = flags_of(patcher.get_parser()), set(patcher.EVERY_MODE)
    some = {f for d in patcher.DEFENSES.values() for f in d.reads()}
    assert not flags - every - some, f"flags of no mode: {flags - every - some} (a Defense's flags, the Attacker's " \
                                     f"settings or EVERY_MODE)"
    assert not every & some and every | some <= flags, (every & some, (every | some) - flags)


def test_mode_help_names_every_defense_with_its_flags():
    help = next(a.help for a in patcher.get_parser()._actions if a.dest == "mode")
    for m, d in patcher.DEFENSES.items():
        assert f"{m}: {d.help}" in help and all("--" + f.replace("_", "-") in help for f in d.flags), m


def test_every_flag_of_patcher_has_a_case():
    missing, extra = flags_of(patcher.get_parser()) - set(CASES), set(CASES) - flags_of(patcher.get_parser())
    assert not missing and not extra, f"patcher.py flags without a case: {missing}; cases of no flag: {extra}"
    assert {f for f, c in CASES.items() if c == "memory"} == set(MEMORY)


@pytest.fixture
def process_group_closed():
    """--precision bf16 gives this process a one-rank process group (patcher.init_distributed): closed after the case,
    so that the next cases run as plain modules again."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("flag", [f for f, c in CASES.items() if c not in ("text", "memory", "check")])
def test_flag_changes_exactly_what_it_should(flag, baseline, demo_base, tmp_path, capsys, monkeypatch, process_group_closed):
    argv, check = CASES[flag]
    base_rows = baseline[0]
    if check == "retain_weight":  # the reference is the retain term on the demo's own retain set
        base_rows, _ = run_demo(tmp_path / "ref", [*explicit(baseline), "--retain-weight", "1", "--retain-data",
                                                   baseline[1] / "data" / "retain.jsonl"], demo_base)
        check = differs_first_at(0)
    elif isinstance(check, tuple):  # ("reference", its flags, check): compared with another run than the baseline
        base_rows, _ = run_demo(tmp_path / "ref", check[1], demo_base)
        check = check[2]
    calls = {"fused": [], "compiled": 0, "timeouts": []}
    real_adamw, real_init = torch.optim.AdamW, dist.init_process_group

    def adamw(params, **kw):
        calls["fused"].append(bool(kw.get("fused")))
        return real_adamw(params, **kw)

    def compile_blocks(model):
        calls["compiled"] += 1
        return model
    def init_process_group(*args, **kw):
        calls["timeouts"].append(kw["timeout"].total_seconds())
        return real_init(*args, **kw)
    monkeypatch.setattr(patcher.torch.optim, "AdamW", adamw)
    monkeypatch.setattr(patcher.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(patcher, "compile_blocks", compile_blocks)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # patcher.main (the debug case) leaves this process's threads as they are
    out = tmp_path / "run"
    capsys.readouterr()
    if argv == "list_flags":
        with pytest.raises(SystemExit) as exited:
            patcher.parse_args(["--list-flags"])
        assert exited.value.code == 0
        rs = None
    elif argv == "resume":
        run_demo(out, ["--save-every", "5"], demo_base)
        (out / "checkpoints" / "latest").write_text("step-0000010")  # the older of the two kept
        patcher.run(patcher.parse_args(["--out", str(out), *FAST, "--save-every", "5", "--resume"]))
        rs = rows(out)
    elif argv == "debug":
        bad = tmp_path / "bad.jsonl"
        bad.write_text("{not json\n")
        args = patcher.parse_args(["--out", str(out), *explicit(baseline, safe_data=bad), "--debug"])
        with pytest.raises(data.DataError) as raised:
            patcher.main(parse=lambda: args)
        rs = raised.value
        with pytest.raises(SystemExit) as exited:  # without --debug: one line and exit 1
            patcher.main(parse=lambda: patcher.parse_args(["--out", str(out), *explicit(baseline, safe_data=bad)]))
        assert exited.value.code == 1 and "error: " in capsys.readouterr().err
    else:
        argv = argv(baseline, tmp_path) if callable(argv) else argv
        try:
            rs, out = run_demo(out, argv, demo_base)
        except data.DataError as e:
            rs = e
    check(base_rows, rs, {"out": out, "stdout": capsys.readouterr().out, "baseline": baseline, "calls": calls})


# --- the two flags that only a real chat template shows ----------------------------------------------------------

TEXT_RECORDS = [{"prompt": f"How do I do thing {i}?", "response": f"I can't help with thing {i}. Ask a professional."}
                for i in range(8)]


@pytest.mark.parametrize("flag,value", [("--system-prompt", ""), ("--loss-mask", "turn"), ("--loss-mask", "answer-newline")])
def test_flags_that_need_a_chat_template(flag, value, tmp_path, smollm2_dir):
    """--system-prompt and --loss-mask on a tiny random model with SmolLM2's tokenizer (ChatML): each changes the
    first step's loss, the system prompt by the context it adds, the mask by the tokens it supervises."""
    model = make_text_checkpoint(tmp_path / "model", smollm2_dir)
    records = tmp_path / "d.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in TEXT_RECORDS))
    common = ["--model", model, "--safe-data", records, "--mode", "sft", "--warmup-steps", "1", "--rounds", "1",
              "--defend-steps", "1", "--batch-size", "4"]
    runs = {}
    for name, extra in (("base", []), ("flag", [flag, value])):
        patcher.run(patcher.parse_args([*map(str, common), "--out", str(tmp_path / name), *extra]))
        runs[name] = rows(tmp_path / name)
    assert first_difference(runs["base"], runs["flag"]) == 0


def make_text_checkpoint(path, smollm2_dir):
    from model import ModelConfig, Transformer, save_model
    torch.manual_seed(0)
    cfg = dict(patcher.DEMO_CONFIG, vocab_size=49152, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = Transformer(ModelConfig.from_hf(cfg))
    model.init_weights()
    save_model(model, path, like=smollm2_dir)
    return path


# -----------------------------------------------------------------------------
# parallel.py: its own flags, and every flag it inherits from patcher.py

PARALLEL_OWN = {  # flag -> the test that shows its effect
    "sync": test_parallel.test_sync_equals_sequential,
    "delta_ref": test_parallel.test_partners_exchange_theta_and_install_delta,
    "peer_timeout": test_faults.test_parallel_frozen_attacker_is_named_within_the_timeout,
    "refresh_every": test_parallel.test_refresh_every_and_offset_set_when_the_defender_looks_and_sends,
    "refresh_offset": test_parallel.test_refresh_every_and_offset_set_when_the_defender_looks_and_sends,
}
# Set all at once in a --sync run that must equal patcher.py with the same flags: a flag parallel.py ignored (or
# wired to another) would tell the two apart. Each value changes the run on its own (the cases above).
INHERITED_IN_SYNC = {
    "alpha": "0.7", "warmup_steps": "2", "rounds": "2", "inner_steps": "4", "defend_steps": "3", "reset_optimizer": None,
    "retain_weight": "0.5", "lr": "8e-4", "weight_decay": "0.5", "max_grad_norm": "0.5", "batch_size": "12",
    "inner_lr": "1e-3", "inner_weight_decay": "0.3", "inner_max_grad_norm": "0.3", "inner_batch_size": "6",
    "micro_batch_size": "3", "group_by_length": None, "seed": "1", "max_len": "9", "export_dtype": "bfloat16",
    "precision": "bf16",
}
INHERITED_ELSEWHERE = {  # flag -> why it is not in the combined run
    "model": "the demo sets it (and the data flags) for both programs alike",
    "safe_data": "set by the demo", "unsafe_data": "set by the demo", "retain_data": "set by the demo with --retain-weight",
    "safe_format": "read by patcher.load_data, which parallel.py calls", "unsafe_format": "as --safe-format",
    "prompt_field": "as --safe-format", "response_field": "as --safe-format",
    "system_prompt": "as --safe-format (and the toy world has no system turn)", "loss_mask": "as --system-prompt",
    "mode": "parallel.py is Patcher's parallel schedule: any other mode is refused", "out": "each program its own",
    "list_flags": "lists what parallel.py takes (test_train_sh.py reads it)",
    "save_every": "the defender half's checkpoints: test_parallel_resumes_from_its_checkpoint_as_if_never_stopped",
    "resume": "test_parallel_resumes_from_its_checkpoint_as_if_never_stopped",
    "activation_checkpointing": "the same numbers: patcher.build_model, which parallel.py calls",
    "compile": "patcher.build_model, which parallel.py calls", "fused_adamw": "patcher.make_optimizer, called with it",
    "debug": "patcher.main, which parallel.py runs under",
    "check": "patcher.main and patcher.check: test_refusals.py::test_check_reads_config_and_data_and_writes_nothing",
    "collective_timeout": "patcher.init_distributed, called with it",
    "plan": "parallel.plan: test_memory_plan (a parallel.py run checks its plan there)", "plan_world": "as --plan",
    "plan_memory": "patcher.check_memory, which parallel.py calls", "skip_memory_check": "as --plan-memory",
    "log_every": "patcher.Log, which parallel.py's defender logs with (patcher.start_run)",
}


def in_sync():
    """INHERITED_IN_SYNC, and every other attacker flag (an Attacker setting a fork adds) with its case's value:
    parallel.py honours the inner attack's flags by construction (its attacker half calls patcher.attack)."""
    added = {f: CASES[f][0] for f in patcher.INNER_FLAGS if f not in INHERITED_IN_SYNC}
    assert all(isinstance(argv, list) and argv[0] == "--" + f.replace("_", "-") for f, argv in added.items()), added
    return {**INHERITED_IN_SYNC, **{f: argv[1] if len(argv) > 1 else None for f, argv in added.items()}}


def test_every_flag_of_parallel_has_a_case():
    own = flags_of(parallel.get_parser()) - flags_of(patcher.get_parser())
    assert own == set(PARALLEL_OWN), f"parallel.py flags without a case: {own - set(PARALLEL_OWN)}"
    honoured = flags_of(patcher.get_parser()) & parallel.HONOURED
    covered = set(in_sync()) | set(INHERITED_ELSEWHERE)
    assert honoured == covered and not set(in_sync()) & set(INHERITED_ELSEWHERE), honoured ^ covered


def test_parallel_refuses_every_patcher_flag_it_does_not_honour(tmp_path, capsys):
    """Each patcher.py flag outside parallel.HONOURED (a flag a fork adds included) is a usage error naming it."""
    refused = flags_of(patcher.get_parser()) - parallel.HONOURED
    assert {f for m, d in patcher.DEFENSES.items() if m != "patcher" for f in d.flags} <= refused  # other defenses'
    for dest in sorted(refused):
        argv = CASES[dest][0] if isinstance(CASES[dest][0], list) else ["--" + dest.replace("_", "-")]
        with pytest.raises(SystemExit) as exited:
            parallel.parse_args([*map(str, argv), "--out", str(tmp_path)])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and "--" + dest.replace("_", "-") in err.splitlines()[-1], err
    with pytest.raises(SystemExit):
        parallel.parse_args(["--mode", "sft", "--out", str(tmp_path)])
    assert "--mode sft: parallel.py is Patcher's parallel schedule" in capsys.readouterr().err


def test_parallel_takes_every_inherited_flag_as_patcher_does(tmp_path, demo_base):
    flags = [w for k, v in in_sync().items() for w in ("--" + k.replace("_", "-"), *([v] if v else []))]
    seq, par = with_base(tmp_path / "seq", demo_base), with_base(tmp_path / "par", demo_base)
    run_script("patcher.py", ["--out", seq, *flags])
    run_script("parallel.py", ["--out", par, "--sync", *flags], nproc=2)
    a, b = rows(seq), rows(par)
    assert sum(r["phase"] == "inner_attack" for r in b) == 2 and all("loss_retain" in r for r in b if "loss_clean" in r)
    assert_rows_close(a, b, 1e-5, keys=("loss_clean", "loss_adv", "loss_retain", "grad_norm", "attack_loss_start",
                                         "attack_loss_end", "delta_norm"))
    for out in (seq, par):
        assert json.loads((out / "final" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_parallel_refuses_what_it_cannot_do(tmp_path, demo_base):
    for i, (flags, needle) in enumerate(((["--vaccine-rho", "1"], "--vaccine-rho is a flag of --mode vaccine"),
                                         (["--refresh-every", "3", "--refresh-offset", "3"], "--refresh-offset 3 must be smaller"))):
        r = run_script("parallel.py", ["--out", with_base(tmp_path / str(i), demo_base), *FAST, *flags], check=False)
        assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]
