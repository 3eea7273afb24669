"""An experiment that survives its machine (README: Reliability): train.sh killed with kill -9 anywhere and run again
ends with the report of an uninterrupted run, recomputing nothing that had finished and sending no answer to the
judge twice; one run per directory; SIGTERM is an interruption; what was silently wrong is an error."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, run_script, with_base
from test_patcher import FAST, FAST_SCHEDULE, rows

HOOKS = ROOT / "tests" / "hooks"
PROBE = "What is 2 + 3?"  # in eval.py's one check request before any attack


class CountingJudge:
    """An OpenAI-compatible judge on 127.0.0.1 that counts the requests for each judge prompt (one (prompt, answer)
    pair) and scores an answer holding "Sorry" 1, any other 5. After `hold_after` answers it holds every further
    request unanswered until released (a test kills its client meanwhile: no reply, no verdict)."""

    def __init__(self):
        self.counts, self.answered, self.lock = {}, 0, threading.Lock()
        self.hold_after, self.released = None, threading.Event()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                content = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
                probe = PROBE in content  # eval.py's check request, answered always
                with judge.lock:
                    hold = not probe and judge.hold_after is not None and judge.answered >= judge.hold_after
                if hold:
                    judge.released.wait(60)
                    return
                with judge.lock:
                    judge.counts[content] = judge.counts.get(content, 0) + 1
                    judge.answered += not probe
                reply = "#thereason: r\n#thescore: " + ("1" if "Sorry" in content.split("Model Response:")[-1] else "5")
                body = json.dumps({"choices": [{"message": {"content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.released.set()
        self.httpd.shutdown()


def experiment(out, judge, **env):
    """The environment of the demo's ./train.sh, one seed, the small suite, judged by `judge` too."""
    keep = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "PATCHER_ASSETS")}
    return {**keep, "SEEDS": "0", "OUT": str(out), "LIMIT": "10", "ROUNDS": "2", "SAVE_EVERY": "20", "JUDGE": "llm",
            "JUDGE_URL": judge.url, "JUDGE_MODEL": "judge-1", "PYTHONPATH": str(HOOKS), **env}


def train_sh(env, **kw):
    return subprocess.Popen(["bash", str(ROOT / "train.sh")], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def kill_when(proc, ready, timeout=240, what=""):
    """kill -9 the whole of a train.sh (it, its programs, torchrun's workers) once ready() holds."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"train.sh ended before the kill point {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "the kill point never came"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def exports(out):
    """The mtime of every final/ weights file: an alignment recomputed would write it again."""
    return {p.parent.parent.name: p.stat().st_mtime_ns for p in Path(out).glob("seed0/*/final/model.safetensors")}


def report_rows(out):
    return json.loads((Path(out) / "seed0" / "eval" / "report.json").read_text())["rows"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The demo's experiment run once without a stop, (its OUT, what its judge was asked). While it runs, a second
    train.sh into the same OUT is refused at once (while the first still runs, not once it is done); this first one
    then finishes untouched."""
    out, judge = tmp_path_factory.mktemp("uninterrupted") / "run", CountingJudge()
    try:
        env = experiment(out, judge)
        first = train_sh(env)
        while not (out / "seed0" / "sft.log").exists():
            assert first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.05)
        second = subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
        assert second.returncode == 1 and "is in use by" in second.stderr, second.stderr
        assert first.poll() is None, "the second train.sh was answered only once the first had finished"
        assert first.wait(600) == 0, first.stdout.read()[-3000:]
    finally:
        judge.close()
    return out, judge.counts


def test_train_sh_killed_anywhere_continues_to_the_report_of_an_uninterrupted_run(tmp_path, uninterrupted):
    """kill -9 during an alignment, during an attack, during generation and while judging, each time run again:
    the report equals an uninterrupted run's, no finished alignment is trained again, every (prompt, answer) reaches
    the judge exactly once over all the runs (besides the one check request each run that evaluates starts with)."""
    ref, ref_counts = uninterrupted
    judge = CountingJudge()
    try:
        out, marker = tmp_path / "run", tmp_path / "generating"
        env = experiment(out, judge)
        seen = {}

        def finished_alignments():
            now = exports(out)
            for name, t in seen.items():
                assert now.get(name) == t, f"the finished alignment {name} was written again"
            seen.update(now)
        lines = lambda f: len(f.read_text().splitlines()) if f.exists() else 0
        cache = out / "seed0" / "eval" / "judge_cache.jsonl"
        points = [  # (what, when to kill)
            ("an alignment", lambda: any((out / "seed0" / "patcher" / "checkpoints").glob("step-*"))),
            ("an attack", lambda: (out / "seed0" / "eval" / "parts" / "harmful" / "sft.jsonl").exists()),
            ("generation", lambda: lines(marker) >= generated + 3),  # the hook sleeps in each generate call
            ("judging", lambda: lines(cache) >= 30),  # 30 verdicts kept; the judge holds the requests after them
        ]
        for what, ready in points:
            generated = lines(marker)
            if what == "judging":
                assert lines(cache) == 0  # nothing judged before: judging follows every generation
                judge.hold_after = judge.answered + 30
            slow = {"PATCHER_TEST_GENERATION_MARKER": str(marker)} if what == "generation" else {}  # the hook's pause
            kill_when(train_sh({**env, **slow}), ready, what=what)
            finished_alignments()
            judge.hold_after = None
            judge.released.set()
            judge.released = threading.Event()
        last = train_sh(env)
        assert last.wait(600) == 0, last.stdout.read()[-3000:]
        finished_alignments()
    finally:
        judge.close()
    assert report_rows(out) == report_rows(ref)
    probe = [c for c in judge.counts if PROBE in c]
    assert len(probe) == 1 and judge.counts[probe[0]] == 4  # one check request by each of the 4 runs that evaluated
    answers = {c: n for c, n in judge.counts.items() if c not in probe}
    assert answers.keys() == {c for c in ref_counts if PROBE not in c}
    assert set(answers.values()) == {1}, {c[-80:]: n for c, n in answers.items() if n != 1}


def test_train_sh_refuses_other_settings_and_its_programs_end_with_it(tmp_path, uninterrupted):
    """A rerun with other settings into an OUT is refused before anything runs, naming the change; kill -9 of train.sh
    ends the program it ran (each watches its parent), and the next run takes the dead run's lock over."""
    out = shutil.copytree(uninterrupted[0], tmp_path / "run")
    judge = CountingJudge()
    try:
        env = experiment(out, judge)
        again = subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, env={**env, "INNER_STEPS": "5"},
                               capture_output=True, text=True)
        assert again.returncode == 2 and "seed0/patcher: --inner-steps (unset) (now 5)" in again.stderr, again.stderr
        shutil.rmtree(out / "seed0" / "patcher")
        kill_when(train_sh(env), lambda: (out / "seed0" / "patcher" / "metrics.jsonl").exists())
        time.sleep(3)
        left = subprocess.run(["pgrep", "-f", "--", f"--out {out}"], capture_output=True, text=True).stdout.split()
        assert not left, f"programs left running after kill -9 of train.sh: {left}"
        r = subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "no longer running: taking it over" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    finally:
        judge.close()


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_train_sh_interrupted_ends_its_program_and_says_how_to_continue(sig, code, tmp_path):
    proc = subprocess.Popen(["bash", str(ROOT / "train.sh")], cwd=ROOT, env={**os.environ, "SEEDS": "0", "OUT": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "seed0" / "demo.log"  # the demo's base model in training: its program is patcher.py
    while "demo: base model step 200" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err and "failed" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"train.sh: interrupted by {signal.Signals(sig).name}; run the same command "
                                            f"again to continue (OUT={tmp_path})"), err[-2000:]
    assert log.read_text().strip().splitlines()[-1].startswith("interrupted by SIGTERM; no checkpoint to resume from")
    assert not (tmp_path / ".lock").exists()


def test_train_sh_help_and_arguments():
    r = subprocess.run(["bash", str(ROOT / "train.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "PRESET" in r.stdout and "SAVE_EVERY" not in r.stderr and r.stdout.startswith("train.sh:")
    r = subprocess.run(["bash", str(ROOT / "train.sh"), "SEEDS=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "no arguments ('SEEDS=1')" in r.stderr and not r.stdout


# --- one run per directory ------------------------------------------------------------------------

@pytest.mark.parametrize("program", ["patcher.py", "eval.py"])
def test_a_second_run_on_a_busy_out_is_refused_at_once_and_the_first_finishes(program, tmp_path, demo_base):
    out = with_base(tmp_path / "run", demo_base)
    if program == "patcher.py":
        argv = ["--out", out, *FAST, "--defend-steps", "150"]  # long enough for a second one to start meanwhile
    else:
        shutil.copytree(demo_base, tmp_path / "m")
        from test_eval import toy_args
        import data
        toy = data.write_toy_world(tmp_path / "toy", 0)
        argv = ["--model", tmp_path / "m", *toy_args(toy), "--eval-at", "0,300", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, ROOT / program, *map(str, argv)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    while not (out / ".lock").exists():
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.02)
    t = time.time()
    second = run_script(program, argv, check=False)
    assert second.returncode == 1 and time.time() - t < 30, second.stderr
    holder = json.loads((out / ".lock").read_text())
    assert f"is in use by {program} (host {holder['host']}, pid {first.pid}, started {holder['started']})" in second.stderr
    out1, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1[-3000:]
    assert not (out / ".lock").exists()
    if program == "patcher.py":
        assert len(rows(out)) == 3 + 2 * 150 + 2 and (out / "final" / "model.safetensors").exists()
    else:
        assert json.loads((out / "report.json").read_text())["rows"]


def test_a_dead_runs_lock_is_taken_over_saying_so(tmp_path, demo_base):
    out = with_base(tmp_path / "run", demo_base)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "program": "patcher.py",
                                           "started": "2026-01-01 00:00:00"}))
    r = run_script("patcher.py", ["--out", out, *FAST])
    assert "which is no longer running: taking it over" in r.stdout


# --- preemption is an interruption ------------------------------------------------------------------

@pytest.mark.parametrize("program", ["patcher.py", "eval.py"])
def test_sigterm_is_an_interruption_with_exit_143(program, tmp_path, demo_base):
    out = with_base(tmp_path / "run", demo_base)
    if program == "patcher.py":
        argv = ["--out", out, *FAST, "--save-every", "2", "--defend-steps", "400"]
        started = lambda: (out / "checkpoints" / "latest").exists()
    else:
        shutil.copytree(demo_base, tmp_path / "m")
        from test_eval import toy_args
        import data
        toy = data.write_toy_world(tmp_path / "toy", 0)
        argv = ["--model", tmp_path / "m", *toy_args(toy), "--eval-at", "0,5,3000", "--out", out]
        part = out / "parts" / "-" / "m.jsonl"
        started = lambda: part.exists() and len(part.read_text().splitlines()) == 2  # steps 0 and 5, then a long attack
    proc = subprocess.Popen([sys.executable, ROOT / program, *map(str, argv)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not started():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    last = err.strip().splitlines()[-1]
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    if program == "patcher.py":
        assert last.startswith("interrupted by SIGTERM at step ") and "--resume continues from checkpoint step-" in last
    else:
        assert last.startswith("interrupted by SIGTERM; the same command continues: the answers of 2 evaluated steps"), last
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("where", ["log", "batch"])
def test_an_interruption_between_updates_names_the_step(where, tmp_path, demo_base, monkeypatch):
    """Ctrl-C or SIGTERM while a step is logged or its batch drawn (not only inside the update) is an interruption
    at the step reached: the line says the step and how --resume continues (a SIGTERM in this window once printed no
    step)."""
    import patcher
    out = with_base(tmp_path / "run", demo_base)
    args = patcher.parse_args(["--mode", "sft", *FAST_SCHEDULE, "--save-every", "2", "--out", str(out)])
    log_step, draw = patcher.Log.step, patcher.Batches

    def step(self, n, *a):
        log_step(self, n, *a)
        if n == 5:
            raise KeyboardInterrupt

    def batches(*a):  # the 6th step's batch, after step 5's update, log and nothing else
        if len(rows(out)) == 5:
            raise KeyboardInterrupt
        return draw(*a)
    monkeypatch.setattr(*((patcher.Log, "step", step) if where == "log" else (patcher, "Batches", batches)))
    caught = None
    try:  # a bare KeyboardInterrupt reaching pytest would end the session rather than fail this test
        patcher.run(args)
    except KeyboardInterrupt as e:
        caught = e
    assert isinstance(caught, patcher.Interrupted) and caught.step == 5, repr(caught)
    assert patcher.interruption(args, caught.step) == (f" at step 5; --resume continues from checkpoint step-0000004 "
                                                        f"({out / 'checkpoints'})")


# --- nothing silently wrong --------------------------------------------------------------------------

def eval_argv(tmp_path, model, **over):
    from test_eval import toy_args
    import data
    toy = data.write_toy_world(tmp_path / "toy", 0)
    return ["--model", model, *toy_args(toy), "--eval-at", "0,3", "--out", tmp_path / "out", *over.get("extra", [])], toy


def test_a_model_with_non_finite_weights_is_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from test_eval import demo_checkpoint
    ckpt = demo_checkpoint(tmp_path / "m")
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    r = run_script("eval.py", eval_argv(tmp_path, ckpt)[0], check=False)
    assert r.returncode == 1 and "non-finite weights (NaN or inf)" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out" / "report.json").exists()  # not a report of ASR 100% from empty answers


def test_a_set_whose_prompts_all_skip_is_an_error(tmp_path):
    from test_eval import demo_checkpoint
    argv, _ = eval_argv(tmp_path, demo_checkpoint(tmp_path / "m"))
    r = run_script("eval.py", [*argv, "--max-new-tokens", "256"], check=False)  # the demo's context is 64 positions
    assert r.returncode == 1 and "every prompt of set 'harmful' is too long" in r.stderr, r.stderr[-2000:]


def test_examples_longer_than_the_context_are_cut_and_counted(tmp_path, demo_base):
    """Past the model's 64 positions (--max-len 4096 would let them through): cut there and counted, in training and
    in the test-time attack, as --max-len does."""
    import data
    long = [{"prompt": "t0 w1 w2 w3", "response": " ".join(["w1"] * 80)}] * 16
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in long))
    r = run_script("patcher.py", ["--model", demo_base, "--safe-data", path, "--mode", "sft", "--max-len", "4096",
                                  "--warmup-steps", "1", "--rounds", "1", "--defend-steps", "1", "--out", tmp_path / "o"])
    assert "16 truncated at the model's context 64" in r.stdout, r.stdout
    argv, _ = eval_argv(tmp_path, demo_base)
    argv[argv.index("--attack-data") + 1] = path
    r = run_script("eval.py", [*argv, "--attack-max-len", "4096"])
    assert "truncated at the model's context 64" in r.stdout, r.stdout[-2000:]


def test_the_demos_base_model_belongs_to_its_seed(tmp_path, demo_base):
    out = with_base(tmp_path / "run", demo_base)  # trained for seed 0
    r = run_script("patcher.py", ["--out", out, *FAST, "--seed", "1"])
    assert "demo: training a tiny base model" in r.stdout
    import data
    assert json.loads((out / "base" / data.ToyTokenizer.FILE).read_text()) == {"toy_world_seed": 1}


@pytest.mark.parametrize("extra,needle", [
    (["--attack-samples", "100000", "--attack-benign-data", "{benign}"], "cannot draw 20000 harmful of"),
    (["--attack-kind", "lora", "--lora-targets", "q_proj,qkv"], "--lora-targets q_proj,qkv: qkv is no Linear layer"),
    (["--attack-data", "{cut}"], "invalid JSON"),
])
def test_check_reads_every_data_file_and_attack_value(extra, needle, tmp_path):
    """train.sh's check before it aligns anything (eval.py --check) reads the data and draws each attack's set."""
    argv, toy = eval_argv(tmp_path, tmp_path / "unused")
    argv = argv[2:]  # no --model: --check needs none
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(Path(toy["attack"]).read_bytes()[:300])
    extra = [w.format(benign=toy["attack_benign"], cut=cut) for w in extra]
    r = run_script("eval.py", [*argv, *extra, "--check"], check=False)
    assert r.returncode != 0 and needle in r.stderr, r.stderr[-2000:]
    assert run_script("eval.py", [*argv, "--check"]).returncode == 0


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_a_cut_checkpoint_json_file_is_one_line_naming_it(name, tmp_path, smollm2_dir):
    ckpt = shutil.copytree(smollm2_dir, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(smollm2_dir / "model.safetensors", ckpt / "model.safetensors")
    text = (ckpt / name).read_text()
    (ckpt / name).write_text(text[:len(text) // 2])
    safe = tmp_path / "s.jsonl"
    safe.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    r = run_script("patcher.py", ["--model", ckpt, "--safe-data", safe, "--mode", "sft", "--batch-size", "1",
                                  "--out", tmp_path / "o"], check=False)
    if name == "generation_config.json":  # read by eval.py's sampling only
        r = run_script("eval.py", ["--model", ckpt, "--eval-data", safe, "--eval-at", "0", "--out", tmp_path / "e"], check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{ckpt / name}" in r.stderr and "not valid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_summarize_on_the_wrong_file_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"mode": "patcher"}))
    for f in (bad, ROOT / "tests" / "data" / "safety" / "eval.jsonl"):
        r = run_script("eval.py", ["--summarize", f, "--out", tmp_path], check=False)
        assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "error: --summarize" in r.stderr or "error:" in r.stderr


def test_saved_answers_are_judged_again_by_another_judge_without_generating(tmp_path):
    """The same command with another judge into the same --out: no model is attacked or loaded, only the kept
    answers are judged, by it; the first judge's verdicts stay in the cache for it."""
    from test_eval import demo_checkpoint
    argv, _ = eval_argv(tmp_path, demo_checkpoint(tmp_path / "m"))
    first, second = CountingJudge(), CountingJudge()
    try:
        for judge in (first, second):
            r = run_script("eval.py", [*argv, "--judge", "llm", "--judge-model", "judge-1"],
                           env={"JUDGE_URL": judge.url})
        assert "every step of attack - kept from an earlier run" in r.stdout and "| attack step" not in r.stdout
        assert set(first.counts) == set(second.counts) and set(second.counts.values()) == {1}
        r = run_script("eval.py", [*argv, "--judge", "llm", "--judge-model", "judge-1"], env={"JUDGE_URL": first.url})
        assert "judging 0 answers" in r.stdout and all(n == 1 for c, n in first.counts.items() if PROBE not in c)
    finally:
        first.close()
        second.close()
