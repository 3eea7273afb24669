"""Faults and bad inputs, as a user meets them: each test asserts the exit code, that the message names the flag,
file or partner, and that nothing on disk was lost or corrupted. (The README's reliability promises point here.)"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, with_base
from test_eval import SECRET, FakeJudgeServer, demo_checkpoint, toy, toy_args  # noqa: F401 (toy is a fixture)
from test_parallel import launch_ranks
from test_patcher import FAST, FAST_SCHEDULE, rows, rows_so_far, tiny_model
import data
import model as model_py
import patcher

evaluate = __import__("eval")


def run(args, check=False, **kw):
    return run_script("patcher.py", args, check=check, **kw)


def one_line_error(r, *needles):
    """Exit code 1, one line starting with "error:" that names each needle, and no traceback."""
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, demo_base):
    """A demo run with --save-every 5, finished (checkpoints at steps 10 and 11, the last step's): the tests that
    resume or damage one take a copy (a copied run resumes by content: section 9)."""
    out = with_base(tmp_path_factory.mktemp("finished") / "run", demo_base)
    run(["--out", out, *FAST, "--save-every", "5"], check=True)
    return out


# --- 1. non-finite losses and gradients stop before the update; nothing non-finite is written -------

@pytest.mark.parametrize("flags,where", [
    (["--mode", "sft", "--warmup-steps", "1", "--rounds", "1", "--defend-steps", "1", "--lr", "1e30"], "sft step 2"),
    ([*FAST, "--inner-lr", "1e30"], "round 0, inner attack step"),
])
def test_non_finite_stops_the_run_and_writes_nothing_non_finite(flags, where, tmp_path, demo_base):
    out = with_base(tmp_path / "run", demo_base)
    r = run(["--out", out, *flags, "--save-every", "1"])
    line = one_line_error(r, where)
    assert "is nan" in line or "is inf" in line, line
    assert not (out / "final").exists()
    latest = out / "checkpoints" / "latest"
    if latest.exists():  # every checkpoint written is finite: the run resumes from it, and stops at the same step
        r = run(["--out", out, *flags, "--save-every", "1", "--resume"])
        assert "resumed at step" in r.stdout and where in one_line_error(r)


def test_non_finite_in_the_test_time_attack_stops_eval(tmp_path, toy):
    ckpt = demo_checkpoint(tmp_path / "m")
    r = run_script("eval.py", ["--model", ckpt, *toy_args(toy, 4), "--eval-at", "0,3", "--attack-lr", "1e30",
                               "--out", tmp_path / "e"], check=False)
    one_line_error(r, "attack step 2", "stopped before the update")
    assert not (tmp_path / "e" / "report.json").exists()


# --- 2. parallel: every wait on a partner ends within --peer-timeout, the last one too -----------

@pytest.mark.parametrize("when", ["after its last transfer", "while transfers go on"])
def test_parallel_frozen_attacker_is_named_within_the_timeout(when, tmp_path, demo_base):
    """SIGSTOP the attacker at defender step 90 of 100. With no transfer left (one attack vector, --refresh-every
    1000), the defender finishes, exports, then waits for its partner only as long as --peer-timeout, names it
    and exits non-zero; the export stays complete. With transfers going on, the one it is in (a send or a
    receive, which would block forever) ends the same way."""
    out = with_base(tmp_path / "run", demo_base)
    refresh = "1000" if when == "after its last transfer" else "1"
    procs = launch_ranks(2, ["--out", out, "--rounds", "3", "--inner-steps", "3", "--defend-steps", "20", "--warmup-steps", "40",
                             "--refresh-every", refresh, "--peer-timeout", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not any(r["step"] >= 90 for r in rows_so_far(out) if r["phase"] != "inner_attack"):
            assert time.time() < deadline and procs[0].poll() is None, "the run did not get going"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        err = procs[0].communicate(timeout=60)[1]
        assert procs[0].returncode == 1 and "partner rank 1 did not respond within 4 s" in err, err[-2000:]
        assert time.time() - stopped < 4 + 30
        if when == "after its last transfer":
            assert sorted(p.name for p in (out / "final").iterdir()) == ["config.json", "model.safetensors", "toy_tokenizer.json"]
            assert load_file(out / "final" / "model.safetensors")
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()


# --- 3. resume: only with the run's own settings; config.json survives a refused resume ----------

def test_resume_refuses_changed_settings_and_keeps_config(tmp_path, finished_run):
    out = shutil.copytree(finished_run, tmp_path / "run")
    args = [*FAST, "--save-every", "5"]
    config = (out / "config.json").read_text()
    r = run(["--out", out, "--resume", *args, "--alpha", "0.3", "--lr", "1e-3", "--rounds", "3"])
    line = one_line_error(r, "--alpha 0.5 (now 0.3)", "--lr 0.0005 (now 0.001)", "--rounds 2 (now 3)")
    assert "--save-every" not in line and (out / "config.json").read_text() == config
    r = run(["--out", out, "--resume", *FAST_SCHEDULE, "--save-every", "5", "--mode", "sft"])
    one_line_error(r, "--mode 'patcher' (now 'sft')")
    r = run_script("patcher.py", ["--out", out, "--resume", *args], nproc=2, check=False)
    assert r.returncode != 0 and "error: --resume: the finished run had world size 1 (now 2)" in r.stderr
    assert 'patcher.py", line' not in r.stderr  # (torchrun's agent adds its own report of the failed workers)
    r = run(["--out", out, *args])  # a fresh run over a resumable one would destroy it
    one_line_error(r, "holds a resumable run", "--resume")
    r = run(["--out", out, "--resume", *FAST, "--save-every", "3"], check=True)  # what does not change the run may change
    assert r.stdout.strip() == f"finished already: {out / 'final'} is this run's export (step 11); nothing to do"
    (out / "done.json").unlink()  # as if killed during the export: from the last step's checkpoint, straight to it
    r = run(["--out", out, "--resume", *FAST, "--save-every", "3"], check=True)
    assert "resumed at step 11" in r.stdout and json.loads((out / "config.json").read_text())["save_every"] == 3
    assert (out / "done.json").exists()


def test_a_run_made_before_a_new_flag_resumes_after_it(tmp_path, finished_run, monkeypatch):
    """A fork adds a flag with a default (here --probe): a run made before it resumes, finished or not (its settings
    miss the flag: it ran as the default does), and the flag set to another value is refused, naming it. A run's
    identity is what its mode reads: --mode sft's settings hold no Patcher or Vaccine flag."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    real = patcher.get_parser

    def forked():
        p = real()
        p.add_argument("--probe", type=float, default=0.5, help="a flag a fork added")
        return p
    monkeypatch.setattr(patcher, "get_parser", forked)
    args = ["--out", str(out), *map(str, FAST), "--save-every", "5", "--resume"]

    def settings(argv):  # of the demo run in `out` (make_demo points the flags at its files)
        a = patcher.parse_args(argv)
        a.model, a.safe_data, a.unsafe_data = str(out / "base"), str(out / "data" / "safe.jsonl"), str(out / "data" / "unsafe.jsonl")
        return patcher.settings(a, 1)
    with pytest.raises(patcher.Finished):  # finished before the flag existed: nothing to do
        patcher.check_finished(out, settings(args))
    (out / "checkpoints" / "latest").write_text("step-0000010")  # resumed from its older checkpoint
    (out / "done.json").unlink()
    patcher.run(patcher.parse_args(args))
    assert [r["step"] for r in rows(out) if r["phase"] != "inner_attack"] == list(range(1, 12))
    with pytest.raises(patcher.RunError, match=r"--probe 0.5 \(now 0.7\)"):
        patcher.check_finished(out, settings([*args, "--probe", "0.7"]))
    sft = patcher.settings(patcher.parse_args(["--out", str(tmp_path / "sft"), "--mode", "sft"]), 1)
    assert "alpha" not in sft and "inner_steps" not in sft and "vaccine_rho" not in sft and sft["lr"] == 5e-4


def test_a_finished_run_whose_export_is_gone_or_changed_exports_it_again(tmp_path, finished_run, capsys):
    """done.json alone made "finished already", on every rerun, after final/ was removed (then eval.py failed on the
    missing model). The export's fingerprint in done.json is checked first: an export removed or changed since is made
    again from the last checkpoint, saying so; then the run has finished again."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    done = json.loads((out / "done.json").read_text())
    with pytest.raises(patcher.Finished):
        patcher.check_finished(out, done["settings"])
    config = out / "final" / "config.json"
    config.write_text(config.read_text() + " ")
    patcher.check_finished(out, done["settings"])  # no Finished: --resume goes on from the last checkpoint
    assert capsys.readouterr().out == f"{out / 'final'} has changed since its export: resuming from checkpoint step-0000011 to export it again\n"
    shutil.rmtree(out / "final")
    args = ["--out", out, *FAST, "--save-every", "5", "--resume"]
    r = run(args, check=True)
    assert f"{out / 'final'} is missing: resuming from checkpoint step-0000011 to export it again" in r.stdout
    assert "resumed at step 11" in r.stdout and "\nstep " not in r.stdout and same_export(finished_run, out)
    assert run(args, check=True).stdout.startswith("finished already")


# --- 4. resume after a kill between a checkpoint's rename and the switch of `latest` -------------

def test_resume_passes_a_checkpoint_that_latest_never_named(tmp_path, demo_base):
    """The state a kill leaves after renaming step-0000010 into place but before `latest` names it: the resumed
    run reaches step 10 again, replaces that directory, and logs each step once, with the same losses."""
    out = with_base(tmp_path / "run", demo_base)
    args = ["--warmup-steps", "2", "--rounds", "2", "--inner-steps", "2", "--defend-steps", "4", "--save-every", "3"]
    run(["--out", out, *args], check=True)  # checkpoints at 3, 6, 9 and the last step, 10 (the last two kept)
    uninterrupted = rows(out)
    ckpts = out / "checkpoints"
    (ckpts / "latest").write_text("step-0000009")
    (ckpts / "step-0000010" / "stale").write_text("from the killed run")
    (ckpts / ".step-0000012.tmp").mkdir()  # and a half-written one
    r = run(["--out", out, "--resume", *args], check=True)
    assert "resumed at step 9" in r.stdout and (ckpts / "latest").read_text() == "step-0000010"
    assert not (ckpts / "step-0000010" / "stale").exists() and (ckpts / "step-0000010" / ".metadata").exists()
    again = rows(out)
    assert [(x["step"], x["phase"]) for x in again] == [(x["step"], x["phase"]) for x in uninterrupted]  # each step once
    for x, y in zip(uninterrupted, again):
        assert abs(x.get("loss_clean", 0) - y.get("loss_clean", 0)) <= 1e-6


# --- 5. final/ never vanishes; a crashed export's leftovers are cleaned at the next export ------

def test_final_is_always_a_complete_export(tmp_path, monkeypatch):
    """After every file-system step of an export that replaces final/, final/ holds a complete export."""
    m, final = tiny_model(), tmp_path / "final"
    model_py.save_model(m, final)
    checked = []

    def complete():
        names = sorted(p.name for p in final.iterdir()) if final.is_dir() else []
        checked.append(names == ["config.json", "model.safetensors"] and len(load_file(final / "model.safetensors")) > 0)

    def after(fn):
        def step(*args, **kw):
            out = fn(*args, **kw)
            complete()
            return out
        return step
    for owner, name in ((model_py.os, "rename"), (model_py.os, "replace"), (model_py.shutil, "rmtree"), (model_py, "_rename_exchange")):
        monkeypatch.setattr(owner, name, after(getattr(owner, name)))
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    model_py.save_model(m, final)
    assert len(checked) >= 2 and all(checked), checked
    assert not torch.equal(load_file(final / "model.safetensors")["model.embed_tokens.weight"], m.model.embed_tokens.weight - 1)


def test_a_crashed_export_keeps_the_old_one_and_is_cleaned_next_time(tmp_path, monkeypatch):
    m, final = tiny_model(), tmp_path / "final"
    model_py.save_model(m, final)
    old = load_file(final / "model.safetensors")

    def crash(tensors, path, metadata=None):  # dies with half a file written
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(model_py, "save_file", crash)
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        model_py.save_model(m, final)
    assert [p.name for p in tmp_path.glob(".final.tmp-*")] and torch.equal(load_file(final / "model.safetensors")[
        "model.embed_tokens.weight"], old["model.embed_tokens.weight"])
    monkeypatch.undo()
    model_py.save_model(m, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # the leftover is gone
    assert not torch.equal(load_file(final / "model.safetensors")["model.embed_tokens.weight"], old["model.embed_tokens.weight"])


def test_where_directories_cannot_be_swapped_a_crash_between_renames_is_repaired(tmp_path, monkeypatch):
    m, final = tiny_model(), tmp_path / "final"
    model_py.save_model(m, final)
    monkeypatch.setattr(model_py, "_rename_exchange", lambda a, b: False)
    real_rename, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the crash: the old export is moved aside, the new one not yet in place
            raise KeyboardInterrupt
        real_rename(a, b)
    monkeypatch.setattr(model_py.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        model_py.save_model(m, final)
    assert not final.exists() and list(tmp_path.glob(".final.old-*"))
    monkeypatch.setattr(model_py.os, "rename", real_rename)
    model_py._clean_leftovers(final)  # what the next export does first: the complete old one comes back
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    model_py.save_model(m, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_export_files_have_the_users_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        model_py.save_model(tiny_model(), tmp_path / "final")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "final").iterdir()} == {
        "config.json": 0o644, "model.safetensors": 0o644}


def test_non_finite_weights_are_never_exported(tmp_path):
    m = tiny_model()
    with torch.no_grad():
        next(m.parameters())[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        model_py.save_model(m, tmp_path / "final")
    assert not (tmp_path / "final").exists() and not list(tmp_path.iterdir())


# --- 6. every numeric flag is checked at parse time ----------------------------------------------

def numeric_options(parser):
    return [a for a in parser._actions if a.option_strings and a.type not in (None, str)]


@pytest.mark.parametrize("program", ["patcher", "parallel", "eval"])
def test_every_numeric_flag_rejects_nan_and_negatives_at_parse_time(program, capsys, tmp_path):
    parser = {"patcher": patcher.get_parser, "parallel": __import__("parallel").get_parser, "eval": evaluate.get_parser}[program]()
    options = numeric_options(parser)
    assert len(options) >= (18 if program != "eval" else 16)
    for action in options:
        flag = action.option_strings[0]
        for bad in ("nan", "-1", "inf", "1e39"):  # 1e39 overflows fp32 inside the optimizer
            with pytest.raises(SystemExit) as e:
                parser.parse_args([flag, bad, "--out", str(tmp_path)])
            assert e.value.code == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert f"error: argument {flag}" in err[-1] and sum("error" in line for line in err) == 1, err  # usage, one line


def test_flag_errors_come_before_any_work(tmp_path, demo_base):
    out = with_base(tmp_path / "run", demo_base)
    t = time.time()
    r = run(["--out", out, "--inner-lr", "-1"])
    assert r.returncode == 2 and "argument --inner-lr: must be a finite number > 0 and <= 1e+30, got -1" in r.stderr
    assert not (out / "metrics.jsonl").exists() and time.time() - t < 30


@pytest.mark.parametrize("out,match", [("{file}", "exists and is not a directory"), ("{file}/sub", "cannot write there"),
                                       ("/proc/patcher-test", "cannot write there")])
def test_out_must_be_a_writable_directory(out, match, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit):
        patcher.parse_args(["--out", out.format(file=tmp_path / "f")])
    assert match in capsys.readouterr().err


# --- 7. the judge's key, and a judge that always fails --------------------------------------------

def test_a_long_key_echoed_by_the_judge_never_reaches_the_log_or_disk(tmp_path):
    key = "sk-" + "abcdefghij" * 12  # longer than the 60 characters of a reply kept in an error message
    recs = [{"model": "m", "attack_step": 0, "set": "s", "kind": "harmful", "prompt": "p", "answer": "[echo] x",
             "reference": None, "n_tokens": 1}]
    with FakeJudgeServer() as srv:
        evaluate.score_records(recs, Namespace(refusal_phrases="extended"), evaluate.LLMJudge(srv.url, "judge-1", key, retries=0))
    error = recs[0]["judge_error"]
    assert "malformed" in error and not any(key[i:i + 8] in error for i in range(len(key) - 8)), error


# --- 8. user errors: one line naming the file and line, no traceback -----------------------------

@pytest.fixture()
def smol_like(tmp_path, demo_base):
    """A run directory with the demo base model and a place for bad data files."""
    return with_base(tmp_path / "run", demo_base)


@pytest.mark.parametrize("content,needles", [
    (b'{"prompt": "t0 w1 w2 w3", "response": "Sorry"}\n{"prompt": "t0 w\xff", "response": "Sorry"}\n', ["bad.jsonl:2", "not UTF-8"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", ["bad.jsonl:1", "not UTF-8"]),
    (b'{"messages": [{"role": "assistant", "content": "Sorry"}, {"role": "user", "content": "t0 w1 w2 w3"}]}\n',
     ["bad.jsonl:1", "starting with user"]),
    (b'{"messages": [{"role": "system", "content": "s"}]}\n', ["bad.jsonl:1", "roles ['system']"]),
    (b'{"prompt": "t0 w1 w2 w3", "answer": "Sorry"}\n', ["bad.jsonl:1", "'response'", "['answer', 'prompt']", "--response-field"]),
])
def test_bad_data_is_one_line_naming_file_and_line(content, needles, smol_like):
    (smol_like / "bad.jsonl").write_bytes(content)
    r = run(["--model", smol_like / "base", "--safe-data", smol_like / "bad.jsonl", "--mode", "sft", "--out", smol_like / "o"])
    one_line_error(r, *needles)


def test_truncated_safetensors_is_named(smol_like):
    ckpt = smol_like / "cut"
    shutil.copytree(smol_like / "base", ckpt)
    blob = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(blob[:len(blob) // 2])
    data.write_toy_world(smol_like / "data")
    r = run(["--model", ckpt, "--safe-data", smol_like / "data" / "safe.jsonl", "--mode", "sft", "--out", smol_like / "o"])
    one_line_error(r, str(ckpt / "model.safetensors"))


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(smol_like):
    """Writes beyond a file-size limit fail as on a full disk (RLIMIT_FSIZE: no privileges needed): a run resumed
    from its step-4 checkpoint cannot write the next one, says so in one line with the real cause (not dcp's
    (exception, traceback) pair), and step 4 stays intact."""
    out = smol_like
    data.write_toy_world(out / "data")  # (the demo would write its data files under the limit too)
    args = ["--out", out, "--model", out / "base", "--safe-data", out / "data" / "safe.jsonl", "--mode", "sft",
            "--warmup-steps", "0", "--rounds", "1", "--defend-steps", "6", "--save-every", "2"]
    run(args, check=True)  # checkpoints at 2, 4 and 6, the last step's (the last two kept)
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-0000006")
    (ckpts / "latest").write_text("step-0000004")  # as if the run had stopped at step 5
    before = {p.name: p.read_bytes() for p in (ckpts / "step-0000004").iterdir()}

    def limit():  # the model alone is ~450 kB, its AdamW state twice that: the optimizer's file cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))
    r = subprocess.run([sys.executable, str(ROOT / "patcher.py"), *map(str, args), "--resume"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit, timeout=300)
    line = one_line_error(r, "could not write checkpoint", ".step-0000006.tmp", "OSError: [Errno 27] File too large",
                          "GiB free there", "previous checkpoint is intact")
    assert "FrameSummary" not in line
    assert (ckpts / "latest").read_text() == "step-0000004" and sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000004"]
    assert {p.name: p.read_bytes() for p in (ckpts / "step-0000004").iterdir()} == before


# --- 9. resume by content; corrupt checkpoints; full disks, Ctrl-C and data that --max-len cuts away ----------

def patched(args, patch="", cwd=None):
    """patcher.py run as a user runs it (from `cwd`), with `patch` (Python source) applied first: a fault injected
    where it happens (a full disk inside a write, Ctrl-C inside a step)."""
    # SIGINT handled as in a terminal: a test run started in the background of a script inherits it ignored
    code = (f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport errno, os, pathlib, signal, model, patcher\n"
            f"signal.signal(signal.SIGINT, signal.default_int_handler)\n{textwrap.dedent(patch)}\npatcher.main()\n")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def same_export(a, b):
    x, y = load_file(Path(a) / "final" / "model.safetensors"), load_file(Path(b) / "final" / "model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_recognises_inputs_by_content_not_by_how_the_path_is_spelled(tmp_path, demo_base):
    """A run started with relative paths resumes from another working directory, with `./base` for `base` and an
    absolute --out, to the same model; the same relative paths from a directory that holds other data or another
    model are refused, naming the flag and the file, and nothing is written."""
    def inputs(where=""):
        return ["--safe-data", f"{where}data/safe.jsonl", "--unsafe-data", f"{where}data/unsafe.jsonl", *FAST, "--save-every", "5"]
    w = with_base(tmp_path / "w", demo_base)
    data.write_toy_world(w / "data")
    r = patched(["--model", "base", "--out", "run", *inputs()], cwd=w)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copytree(w / "run", tmp_path / "first")
    for cwd, spelled in ((w, ["--model", "./base", "--out", "./run", *inputs("./")]),
                         (tmp_path, ["--model", "w/base", "--out", w / "run", *inputs("w/")])):
        (w / "run" / "checkpoints" / "latest").write_text("step-0000010")
        r = patched([*spelled, "--resume"], cwd=cwd)
        assert r.returncode == 0 and "resumed at step 10" in r.stdout, r.stderr[-2000:]
        assert same_export(tmp_path / "first", w / "run")
    v = with_base(tmp_path / "v", demo_base)  # the same relative names, other data
    data.write_toy_world(v / "data", seed=1)
    config, metrics = (w / "run" / "config.json").read_text(), (w / "run" / "metrics.jsonl").read_text()
    r = patched(["--model", "base", "--out", w / "run", *inputs(), "--resume"], cwd=v)
    one_line_error(r, "--safe-data data/safe.jsonl: its content changed", "--unsafe-data data/unsafe.jsonl: its content changed")
    shutil.rmtree(v / "data")
    shutil.copytree(w / "data", v / "data")  # the same data, another model
    cfg = json.loads((v / "base" / "config.json").read_text())
    (v / "base" / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-6}))
    r = patched(["--model", "base", "--out", w / "run", *inputs(), "--resume"], cwd=v)
    line = one_line_error(r, "--model base: its config.json changed")
    assert "--safe-data" not in line and "--unsafe-data" not in line
    assert (w / "run" / "config.json").read_text() == config and (w / "run" / "metrics.jsonl").read_text() == metrics
    assert "sha256" in json.loads(config)["inputs"]["safe_data"]  # config.json records each input's fingerprint


def test_a_copied_demo_run_resumes_and_a_refused_resume_writes_nothing(tmp_path, finished_run):
    """A demo run directory copied elsewhere resumes (a relative --out, from another working directory) to the
    same model. A resume into an empty --out stops before the demo trains a base model; a refused resume, or a
    fresh run over a resumable one, leaves the demo's data files as they were."""
    a = shutil.copytree(finished_run, tmp_path / "a")
    shutil.copytree(a, tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step-0000010")
    r = patched(["--out", "b", *FAST, "--save-every", "5", "--resume"], cwd=tmp_path)
    assert r.returncode == 0 and "resumed at step 10" in r.stdout, r.stderr[-2000:]
    assert same_export(a, tmp_path / "b")
    r = run(["--out", tmp_path / "empty", "--resume"])
    one_line_error(r, "--resume: no checkpoint in")
    assert not (tmp_path / "empty" / "base").exists() and not (tmp_path / "empty" / "data").exists()
    written = {p.name: p.read_bytes() for p in (a / "data").iterdir()}
    one_line_error(run(["--out", a, *FAST, "--save-every", "5", "--resume", "--seed", "1"]), "--seed 0 (now 1)")
    one_line_error(run(["--out", a, *FAST, "--seed", "1"]), "holds a resumable run")
    assert {p.name: p.read_bytes() for p in (a / "data").iterdir()} == written


@pytest.mark.parametrize("damage,how", [("__0_0.distcp", "cut"), ("state-rank0.json", "cut"), ("__0_0.distcp", "flip"),
                                        ("metrics.jsonl", "flip")])
def test_a_corrupt_checkpoint_is_named_with_the_older_one_to_resume_from(damage, how, tmp_path, finished_run):
    """Cut short, or other bytes at the same size (found by the checksums written with every file; such a file used
    to load without a word, with other numbers): one line naming the file and the older checkpoint to resume from."""
    out = shutil.copytree(finished_run, tmp_path / "run")  # checkpoints at 10 and 11 (the last step's)
    args = ["--out", out, *FAST, "--save-every", "5"]
    (out / "done.json").unlink()  # as if killed before its export: --resume loads the last checkpoint
    broken = out / "checkpoints" / "step-0000011" / damage
    blob = broken.read_bytes()
    broken.write_bytes(blob[:len(blob) // 2] if how == "cut" else blob[:100] + bytes([blob[100] ^ 1]) + blob[101:])
    assert how == "cut" or broken.stat().st_size == len(blob)
    latest = out / "checkpoints" / "latest"
    line = one_line_error(run([*args, "--resume"]), str(broken), "step-0000010 is intact", f"echo step-0000010 > {latest}")
    assert {"cut": "truncated" if damage.endswith("distcp") else "not readable", "flip": "bytes changed"}[how] in line
    latest.write_text("step-0000010\n")  # what the message says to do
    r = run([*args, "--resume"], check=True)
    assert "resumed at step 10" in r.stdout


@pytest.mark.parametrize("what", ["deleted", "shortened", "longer"])
def test_metrics_jsonl_is_rebuilt_from_the_checkpoint_never_padded(what, tmp_path, finished_run):
    """The log as the checkpoint saw it comes back on --resume: deleted, cut short (it used to be padded with NUL
    bytes, which --summarize could not read) or holding rows of steps after the checkpoint; each step once."""
    out = shutil.copytree(finished_run, tmp_path / "run")
    want = (out / "metrics.jsonl").read_text()
    (out / "done.json").unlink()
    (out / "checkpoints" / "latest").write_text("step-0000010")
    log = out / "metrics.jsonl"
    {"deleted": log.unlink, "shortened": lambda: log.write_text(want[:len(want) // 3]),
     "longer": lambda: log.write_text(want + want[-200:])}[what]()
    r = run(["--out", out, *FAST, "--save-every", "5", "--resume"], check=True)
    assert "resumed at step 10" in r.stdout
    text = log.read_text()
    assert "\0" not in text and [json.loads(line)["step"] for line in text.splitlines()] == \
        [json.loads(line)["step"] for line in want.splitlines()]
    assert run_script("eval.py", ["--summarize", log, "--out", tmp_path / "s"]).returncode == 0


def test_a_full_disk_during_the_export_keeps_the_trained_weights(tmp_path, demo_base):
    """With --save-every, the last step's checkpoint is taken before the export: an export that fails on a full disk
    is one line naming it and the free space, and --resume then only exports. Without, the line says the weights
    are lost (here a real EFBIG from a file-size limit)."""
    out = with_base(tmp_path / "run", demo_base)
    full = """
        from safetensors import SafetensorError
        def save_file(tensors, path, metadata=None):  # as safetensors fails on a full disk: half a file, no name
            pathlib.Path(path).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        model.save_file = save_file
    """
    r = patched(["--out", out, *FAST, "--save-every", "5"], full)
    one_line_error(r, f"could not export {out / 'final'}", "No space left on device", "GiB free there",
                   "checkpoint step-0000011", "--resume")
    r = run(["--out", out, *FAST, "--save-every", "5", "--resume"], check=True)
    assert "resumed at step 11" in r.stdout and "\nstep " not in r.stdout and (out / "final" / "model.safetensors").exists()
    assert len(rows(out)) == 13  # 11 steps and 2 inner attacks, each once
    plain = with_base(tmp_path / "plain", demo_base)
    data.write_toy_world(plain / "data")

    def limit():  # config.json and metrics.jsonl fit, the ~450 kB model does not
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    r = subprocess.run([sys.executable, str(ROOT / "patcher.py"), "--out", plain, "--model", plain / "base", "--safe-data",
                        plain / "data" / "safe.jsonl", "--mode", "sft", *FAST_SCHEDULE], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit, timeout=300)
    one_line_error(r, "could not export", "File too large", "GiB free there", "trained weights are lost", "--save-every 0")


@pytest.mark.parametrize("where", ["config.json", "metrics.jsonl", "data"])
def test_a_full_disk_outside_checkpoints_names_the_file(where, tmp_path, demo_base):
    """write() on a full disk raises an OSError that names no file: the one line names it (the demo's data: its
    folder), with the free space there."""
    out = with_base(tmp_path / "run", demo_base)
    enospc = "raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))"
    patch = {"config.json": f"""
        write_text = pathlib.Path.write_text
        def full(self, *a, **k):
            if self.name == ".config.json.tmp":
                {enospc}
            return write_text(self, *a, **k)
        pathlib.Path.write_text = full
    """, "metrics.jsonl": f"""
        class Full:  # metrics.jsonl on a full disk: its first row cannot be written
            def __init__(self, f):
                self.f, self.name = f, f.name
            def write(self, text):
                {enospc}
            def __getattr__(self, name):
                return getattr(self.f, name)
        init = patcher.Log.__init__
        def log_init(self, *a, **k):
            init(self, *a, **k)
            self.file = self.file and Full(self.file)
        patcher.Log.__init__ = log_init
    """, "data": f"""
        write_text = pathlib.Path.write_text
        def full(self, *a, **k):
            if self.name == ".safe.jsonl.tmp":
                {enospc}
            return write_text(self, *a, **k)
        pathlib.Path.write_text = full
    """}[where]
    r = patched(["--out", out, *FAST], patch)
    one_line_error(r, str(out / where), "No space left on device", "GiB free there")


def test_ctrl_c_is_an_interruption_that_says_how_to_resume(tmp_path, demo_base):
    """Ctrl-C in a step: one line with the step reached and the checkpoint --resume continues from (or that there is
    none), exit code 130. Ctrl-C while a checkpoint is written: the same, and the previous checkpoint stays intact."""
    ctrl_c_at_step_7 = """
        calls = []
        def counted(update):  # the 7th update of either kind (3 warmup SFT steps, then Patcher's)
            def interrupted_step(*a, **k):
                calls.append(1)
                if len(calls) == 7:
                    os.kill(os.getpid(), signal.SIGINT)
                return update(*a, **k)
            return interrupted_step
        patcher.clean_step, patcher.defender_step = counted(patcher.clean_step), counted(patcher.defender_step)
    """
    out = with_base(tmp_path / "run", demo_base)
    r = patched(["--out", out, *FAST, "--save-every", "5"], ctrl_c_at_step_7)
    assert r.returncode == 130 and "Traceback" not in r.stderr, (r.returncode, r.stdout[-1500:], r.stderr[-3000:])
    assert r.stderr.strip().splitlines()[-1] == (f"interrupted at step 6; --resume continues from checkpoint step-0000005 "
                                                 f"({out / 'checkpoints'})")
    assert "resumed at step 5" in run(["--out", out, *FAST, "--save-every", "5", "--resume"], check=True).stdout
    r = patched(["--out", with_base(tmp_path / "plain", demo_base), *FAST], ctrl_c_at_step_7)
    assert r.returncode == 130 and r.stderr.strip().splitlines()[-1] == (
        "interrupted at step 6; no checkpoint to resume from: --save-every is 0"), r.stderr[-3000:]
    ctrl_c_in_the_second_checkpoint = """
        import torch.distributed.checkpoint as dcp
        write_data, calls = dcp.FileSystemWriter.write_data, []
        def interrupted_write(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return write_data(self, *a, **k)
        dcp.FileSystemWriter.write_data = interrupted_write
    """
    out = with_base(tmp_path / "ckpt", demo_base)
    r = patched(["--out", out, *FAST, "--save-every", "5"], ctrl_c_in_the_second_checkpoint)
    assert r.returncode == 130 and "Traceback" not in r.stderr and "error" not in r.stderr, r.stderr[-3000:]
    assert "interrupted at step 10; --resume continues from checkpoint step-0000005" in r.stderr
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000005"] and (ckpts / "latest").read_text() == "step-0000005"
    assert "resumed at step 5" in run(["--out", out, *FAST, "--save-every", "5", "--resume"], check=True).stdout


def test_answers_past_max_len_are_counted_as_dropped_and_named(tmp_path, toy):
    """A record whose answer starts past --max-len is dropped: the log says how many and why (patcher.py and
    eval.py); a set left too small for one batch is an error naming the file and --max-len."""
    ckpt = demo_checkpoint(tmp_path / "m")
    short = [{"prompt": "t0 w1 w2 w3", "response": "w4 w5 w6"}] * 24  # 6 prompt tokens + 4 answer tokens: cut, kept
    long = [{"prompt": "t0 " + " ".join(f"w{i}" for i in range(9)), "response": "w4"}] * 8  # 12 prompt tokens: dropped
    mixed, cut = tmp_path / "mixed.jsonl", tmp_path / "cut.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in short + long))
    cut.write_text("".join(json.dumps(r) + "\n" for r in long))
    flags = ["--model", ckpt, "--mode", "sft", "--max-len", "8", "--batch-size", "4", "--out", tmp_path / "o"]
    _, notes = patcher.load_data(patcher.parse_args([*flags, "--safe-data", mixed]), 0, 1)
    assert "32 truncated at --max-len 8, 8 of them dropped: the answer starts past --max-len" in notes[0]
    with pytest.raises(data.DataError) as e:
        patcher.load_data(patcher.parse_args([*flags, "--safe-data", cut]), 0, 1)
    assert str(cut) in str(e.value) and "8 dropped: the answer starts past --max-len 8" in str(e.value)
    r = run_script("eval.py", ["--model", ckpt, *toy_args(toy, 2), "--attack-data", mixed, "--attack-max-len", "8",
                               "--attack-batch-size", "4", "--eval-at", "0,1", "--out", tmp_path / "e"])
    assert "32 truncated at --attack-max-len 8, 8 of them dropped: the answer starts past --attack-max-len" in r.stdout


def test_eval_data_errors_suggest_only_its_own_flags(tmp_path):
    bad = tmp_path / "attack.jsonl"
    bad.write_text('{"prompt": "t0 w1 w2 w3", "answer": "w4"}\n')
    with pytest.raises(data.DataError) as e:
        evaluate.attack_set(Namespace(eval_at=[0, 4], attack_data=bad, attack_format="auto", attack_benign_data=None,
                                      attack_samples=None))
    assert "attack.jsonl:1" in str(e.value) and "'response'" in str(e.value) and "--prompt-field" not in str(e.value)


@pytest.mark.parametrize("program,flag", [("patcher", "--lr"), ("patcher", "--inner-lr"), ("eval", "--attack-lr")])
def test_learning_rates_are_bounded_where_adamw_overflows(program, flag, capsys, tmp_path):
    """An lr of 1e38 passed the parser and crashed inside AdamW (its step size, 10 lr, overflows fp32): a usage error
    now. At the bound, AdamW steps without crashing (the weights may overflow: the run stops on that, naming the step)."""
    parser = {"patcher": patcher.get_parser, "eval": evaluate.get_parser}[program]()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([flag, "1e38", "--out", str(tmp_path)])
    assert e.value.code == 2 and f"argument {flag}: must be a finite number > 0 and <= 1e+30" in capsys.readouterr().err
    m = tiny_model()
    before = [p.detach().clone() for p in m.parameters()]
    optimizer = patcher.make_optimizer(m.parameters(), patcher.MAX_RATE)
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()  # (above the bound, as at 1e38: "value cannot be converted to type float without overflow")
    assert all(int(optimizer.state[p]["step"]) == 3 for p in m.parameters())  # three steps taken, by every weight
    assert not any(torch.equal(p, b) for p, b in zip(m.parameters(), before))


# --- 10. what eval.py keeps, and --summarize ------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["judge_cache.jsonl", "parts"])
def test_a_torn_last_line_is_cut_so_the_next_row_appended_is_kept(what, tmp_path):
    """A kill (or a full disk) in the middle of an append tears the last line. The next row was appended to it and lost
    with it on every rerun: the same verdict asked of the paid judge again each time, the same attack restarted each
    time. The torn line is cut before anything is appended."""
    if what == "judge_cache.jsonl":
        path, judge = tmp_path / what, Namespace(identity=lambda: ["judge-1"])
        evaluate.JudgeCache(path, judge).add("a", (5, None))
        read = lambda: {k: evaluate.JudgeCache(path, judge).get(k) for k in "ab"}
        torn, row = '{"key": "b", "verd', ("b", (1, None))
    else:
        kept = object.__new__(evaluate.Kept)
        kept.parts, kept.rank = tmp_path / "parts", 0
        path = kept.file("harmful", "m")
        kept.saver("harmful", "m")(0, [{"answer": "x"}], {"attack_step": 0})
        read = lambda: {k: v[1] for k, v in kept.load("harmful", "m").items()}
        torn, row = '{"records": [{"answer": "y"}], "stats": {"attack', (10, [{"answer": "y"}], {"attack_step": 10})
    with open(path, "a") as f:
        f.write(torn)
    first = read()  # the rerun: the torn row is not there ...
    (evaluate.JudgeCache(path, judge).add if what == "judge_cache.jsonl" else kept.saver("harmful", "m"))(*row)
    again = read()  # ... and once made again, it is kept
    if what == "judge_cache.jsonl":
        assert first == {"a": (5, None), "b": None} and again == {"a": (5, None), "b": (1, None)}
    else:
        assert first == {0: {"attack_step": 0}} and again == {0: {"attack_step": 0}, 10: {"attack_step": 10}}
    assert [json.loads(line) for line in path.read_text().splitlines()]  # every line whole


def summarize(tmp_path, monkeypatch, capsys, *argv):
    """eval.py --summarize ARGV --out tmp_path: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", "--summarize", *map(str, argv), "--out", str(tmp_path)])
    try:
        evaluate.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_summarize_reads_every_valid_report_and_names_what_it_cannot(tmp_path, monkeypatch, capsys):
    """Valid reports of every kind summarize (seeds, a sweep, the worst case; a sweep of reports that scored no harmful
    set used to be "not report.json files"). What cannot be read is named: a sweep over a flag that nothing swept,
    a report without rows or with a row short of a field."""
    def report(name, asr, rows=None, **settings):
        rows = rows or [{"model": m, "attack": "", "attack_step": k, "set": "harmful", "kind": "harmful", "n": 10,
                         "asr_keyword": v * k / 10} for m, v in (("sft", asr), ("patcher", asr / 4)) for k in (0, 10)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"settings": {"eval_at": [0, 10], **settings}, "attacks": {"": {"harmful_per_step": 1.0}},
                                    "models": {}, "rows": rows}))
        return path
    a, b = report("a", 0.8, attack_lr=1e-4), report("b", 0.4, attack_lr=5e-4)
    benign = report("benign", 0, [{"model": "m", "attack": "", "attack_step": 0, "set": "b", "kind": "benign", "n": 10,
                                   "over_refusal": 0.1}], attack_lr=1e-4)
    for argv, needle in (([a, b], "| sft | asr_keyword | 0.0 ± 0.0 (0, 0) | 60.0 ± 20.0 (80, 40) |"),
                         ([a, b, "--sweep", "attack-lr"], "| T \\ --attack-lr | 0.0001 | 0.0005 |"),
                         ([a, b, "--worst-case"], "| patcher | harmful | 0.0 ± 0.0 (0, 0) before any attack | 15.0 ± 5.0 "
                                                  "(20, 10) by attack |"),
                         ([benign, "--sweep", "attack-lr"], "over_refusal (%): m, eval set b\n\n| T \\ --attack-lr | 0.0001 "
                                                            "|\n|---|---:|\n| T=0 | 10.0 |")):
        code, out, err = summarize(tmp_path, monkeypatch, capsys, *argv)
        assert code == 0 and needle in out, (argv, out, err)
    rowless = tmp_path / "rowless.json"
    rowless.write_text(json.dumps({"settings": {}}))
    short = report("short", 0.5, [{"model": "m", "set": "harmful", "kind": "harmful", "asr_keyword": 0.5}])
    for argv, said in (([a, "--sweep", "alpha"], f"error: --sweep alpha: nothing in {a} was swept over it (no model named "
                                                  f"alpha:VALUE, as train.sh names an alignment's, and no --alpha in a "
                                                  f"report's settings)"),
                       ([rowless], f"error: {rowless}: not a report.json of eval.py (it has no list of \"rows\")"),
                       ([a, short, "--worst-case"], f"error: {short}: row 0 of its \"rows\" has no attack_step")):
        code, out, err = summarize(tmp_path, monkeypatch, capsys, *argv)
        assert code == 1 and err.strip() == said, (argv, err)
