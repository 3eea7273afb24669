"""Faults and bad inputs, as a user meets them: each test asserts the exit code, that the message names the flag,
file or partner, and that nothing on disk was lost or corrupted. (The README's reliability promises point here.)"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, with_base
from test_eval import SECRET, FakeJudgeServer, demo_checkpoint, toy, toy_args  # noqa: F401 (toy is a fixture)
from test_parallel import launch_ranks
from test_patcher import FAST, rows, tiny_model
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
        while not ((out / "metrics.jsonl").exists() and any(r["step"] >= 90 for r in rows(out) if r["phase"] != "inner_attack")):
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

def test_resume_refuses_changed_settings_and_keeps_config(tmp_path, demo_base):
    out = with_base(tmp_path / "run", demo_base)
    args = [*FAST, "--save-every", "5"]
    run(["--out", out, *args], check=True)
    config = (out / "config.json").read_text()
    r = run(["--out", out, "--resume", *args, "--alpha", "0.3", "--lr", "1e-3", "--rounds", "3"])
    line = one_line_error(r, "--alpha 0.5 (now 0.3)", "--lr 0.0005 (now 0.001)", "--rounds 2 (now 3)")
    assert "--save-every" not in line and (out / "config.json").read_text() == config
    r = run(["--out", out, "--resume", *args, "--mode", "sft"])
    one_line_error(r, "--mode 'patcher' (now 'sft')")
    r = run_script("patcher.py", ["--out", out, "--resume", *args], nproc=2, check=False)
    assert r.returncode != 0 and "error: --resume: the checkpoint's run had world size 1 (now 2)" in r.stderr
    assert 'patcher.py", line' not in r.stderr  # (torchrun's agent adds its own report of the failed workers)
    r = run(["--out", out, *args])  # a fresh run over a resumable one would destroy it
    one_line_error(r, "holds a resumable run", "--resume")
    r = run(["--out", out, "--resume", *FAST, "--save-every", "3"], check=True)  # what does not change the run may change
    assert "resumed at step 10" in r.stdout and json.loads((out / "config.json").read_text())["save_every"] == 3


# --- 4. resume after a kill between a checkpoint's rename and the switch of `latest` -------------

def test_resume_passes_a_checkpoint_that_latest_never_named(tmp_path, demo_base):
    """The state a kill leaves after renaming step-0000009 into place but before `latest` names it: the resumed
    run reaches step 9 again, replaces that directory, and logs each step once, with the same losses."""
    out = with_base(tmp_path / "run", demo_base)
    args = ["--warmup-steps", "2", "--rounds", "2", "--inner-steps", "2", "--defend-steps", "4", "--save-every", "3"]
    run(["--out", out, *args], check=True)  # checkpoints at 3, 6, 9 (the last two kept)
    uninterrupted = rows(out)
    ckpts = out / "checkpoints"
    (ckpts / "latest").write_text("step-0000006")
    (ckpts / "step-0000009" / "stale").write_text("from the killed run")
    (ckpts / ".step-0000012.tmp").mkdir()  # and a half-written one
    r = run(["--out", out, "--resume", *args], check=True)
    assert "resumed at step 6" in r.stdout and (ckpts / "latest").read_text() == "step-0000009"
    assert not (ckpts / "step-0000009" / "stale").exists() and (ckpts / "step-0000009" / ".metadata").exists()
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
    assert r.returncode == 2 and "argument --inner-lr: must be a finite number > 0, got -1" in r.stderr
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
    from its step-2 checkpoint cannot write the next one, says so in one line, and step 2 stays intact."""
    out = smol_like
    data.write_toy_world(out / "data")  # (the demo would write its data files under the limit too)
    args = ["--out", out, "--model", out / "base", "--safe-data", out / "data" / "safe.jsonl", "--mode", "sft",
            "--warmup-steps", "0", "--rounds", "1", "--defend-steps", "6", "--save-every", "2"]
    run(args, check=True)
    ckpts = out / "checkpoints"
    shutil.rmtree(ckpts / "step-0000004")
    (ckpts / "latest").write_text("step-0000002")  # as if the run had stopped at step 3
    before = {p.name: p.read_bytes() for p in (ckpts / "step-0000002").iterdir()}

    def limit():  # the model alone is ~450 kB, its AdamW state twice that: the optimizer's file cannot be written
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (600_000, 600_000))
    r = subprocess.run([sys.executable, str(ROOT / "patcher.py"), *map(str, args), "--resume"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit, timeout=300)
    line = one_line_error(r, "could not write checkpoint", ".step-0000004.tmp", "File too large", "GiB free there",
                          "previous checkpoint is intact")
    assert (ckpts / "latest").read_text() == "step-0000002" and sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000002"]
    assert {p.name: p.read_bytes() for p in (ckpts / "step-0000002").iterdir()} == before and line
