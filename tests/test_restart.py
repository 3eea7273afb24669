"""An experiment that survives its machine (README: Reliability): train.sh killed with kill -9 anywhere and run again
ends with the report of an uninterrupted run, recomputing nothing that had finished and sending no answer to the
judge twice; one run per directory; SIGTERM is an interruption; what was silently wrong is an error."""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from argparse import Namespace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import ROOT, run_script, with_base
from test_patcher import FAST, FAST_SCHEDULE, rows
import patcher

evaluate = __import__("eval")

HOOKS = ROOT / "tests" / "hooks"
PROBE = "What is 2 + 3?"  # in eval.py's one check request before any attack


class CountingJudge:
    """An OpenAI-compatible judge on 127.0.0.1 that counts the requests for each judge prompt (one (prompt, answer)
    pair) and scores an answer holding "Sorry" 1, any other 5. After `hold_after` answers it holds every further
    request unanswered until released (a test kills its client meanwhile: no reply, no verdict)."""

    def __init__(self):
        self.counts, self.answered, self.held, self.lock = {}, 0, 0, threading.Lock()
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
                    judge.held += hold
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


def experiment(out, judge, base=None, lists=None, **env):
    """The environment of the demo's ./train.sh, one seed, the small suite, judged by `judge` too. `base`: the demo's
    base model of seed 0, put where the run finds it made (its training is another test's); `lists`: the programs'
    flag lists, asked once (flag_lists)."""
    if base is not None and not (Path(out) / "seed0" / "demo" / "base").exists():
        with_base(Path(out) / "seed0" / "demo", base)
    keep = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "PATCHER_ASSETS")}
    return {**keep, "SEEDS": "0", "OUT": str(out), "LIMIT": "10", "ROUNDS": "2", "SAVE_EVERY": "20", "JUDGE": "llm",
            "JUDGE_URL": judge.url, "JUDGE_MODEL": "judge-1", "PYTHONPATH": str(HOOKS),
            **({"TRAIN_SH_LISTS": str(lists)} if lists else {}), **env}


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
def uninterrupted(tmp_path_factory, demo_base):
    """The demo's experiment run once without a stop, (its OUT, what its judge was asked, its console). While it runs, a second
    train.sh into the same OUT is refused at once (while the first still runs, not once it is done); this first one
    then finishes untouched."""
    out, judge = tmp_path_factory.mktemp("uninterrupted") / "run", CountingJudge()
    try:
        env = experiment(out, judge, demo_base)  # (it asks for the flag lists itself, as a user's run)
        first = train_sh(env)
        while not (out / "seed0" / "sft.log").exists():
            assert first.poll() is None, first.stdout.read()[-3000:]
            time.sleep(0.05)
        second = subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, env=env, capture_output=True, text=True)
        assert second.returncode == 1 and "is in use by" in second.stderr, second.stderr
        assert first.poll() is None, "the second train.sh was answered only once the first had finished"
        console = first.communicate(timeout=600)[0]
        assert first.returncode == 0, console[-3000:]
    finally:
        judge.close()
    return out, judge.counts, console


@pytest.mark.xdist_group("uninterrupted")  # one worker runs the module fixture, not both
def test_train_sh_killed_anywhere_continues_to_the_report_of_an_uninterrupted_run(tmp_path, uninterrupted, demo_base,
                                                                                  flag_lists):
    """kill -9 during an alignment, during an attack, during generation and while judging, each time run again:
    the report equals an uninterrupted run's, no finished alignment is trained again, every (prompt, answer) reaches
    the judge exactly once over all the runs (besides the one check request each run that evaluates starts with)."""
    ref, ref_counts, _ = uninterrupted
    judge = CountingJudge()
    try:
        out, marker = tmp_path / "run", tmp_path / "generating"
        env = experiment(out, judge, demo_base, flag_lists)
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
    # the alignment killed and resumed is timed over both its attempts (the killed one up to its log's last line);
    # the one finished before the kills keeps its one line
    attempts = [line.split("\t") for line in (out / "timing.tsv").read_text().splitlines()]
    seconds = {name: [float(a[5]) for a in attempts if a[1] == name] for name in ("sft", "patcher")}
    assert len(seconds["sft"]) == 1 and len(seconds["patcher"]) == 2 and min(seconds["patcher"]) > 0, attempts
    timing = (out / "timing.md").read_text()
    for name, s in seconds.items():
        assert f"| {name} | patcher.py | 1 | {sum(s):.1f} ± 0.0 | {len(s)} |" in timing, timing
    probe = [c for c in judge.counts if PROBE in c]
    assert len(probe) == 1 and judge.counts[probe[0]] == 4  # one check request by each of the 4 runs that evaluated
    answers = {c: n for c, n in judge.counts.items() if c not in probe}
    assert answers.keys() == {c for c in ref_counts if PROBE not in c}
    assert set(answers.values()) == {1}, {c[-80:]: n for c, n in answers.items() if n != 1}


@pytest.mark.xdist_group("uninterrupted")  # one worker runs the module fixture, not both
def test_train_sh_refuses_other_settings_and_its_programs_end_with_it(tmp_path, uninterrupted, flag_lists):
    """A rerun with other settings into an OUT is refused before anything runs, naming the change; kill -9 of train.sh
    ends the program it ran (each watches its parent), and the next run takes the dead run's lock over."""
    out = shutil.copytree(uninterrupted[0], tmp_path / "run")
    judge = CountingJudge()
    try:
        env = experiment(out, judge, lists=flag_lists)
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
    """The signal to train.sh's whole process group (Ctrl-C in a terminal, a scheduler's SIGTERM), twice: train.sh and
    its program each report the first, ignore the second (it killed train.sh mid-report, silently), and end."""
    proc = subprocess.Popen(["bash", str(ROOT / "train.sh")], cwd=ROOT, env={**os.environ, "SEEDS": "0", "OUT": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = tmp_path / "seed0" / "demo.log"  # the demo's base model in training: its program is patcher.py
    while "demo: base model step 200" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    time.sleep(0.05)
    os.killpg(proc.pid, sig)  # pressed again
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and "Traceback" not in err and "failed" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"train.sh: interrupted by {signal.Signals(sig).name}; run the same command "
                                            f"again to continue (OUT={tmp_path})"), err[-2000:]
    assert log.read_text().strip().splitlines()[-1] == (f"interrupted{' by SIGTERM' if sig == signal.SIGTERM else ''}; no "
                                                        f"checkpoint to resume from yet (--save-every 1)")
    assert not (tmp_path / ".lock").exists()


def test_train_sh_sigterm_in_its_first_seconds_is_an_interruption_too(tmp_path):
    """SIGTERM while train.sh still asks its programs for their flags (its first seconds) ended it with no word: exit
    143 and the line saying how to continue, as later."""
    proc = subprocess.Popen(["bash", str(ROOT / "train.sh")], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def listing():  # a program started with --list-flags: train.sh is past its first lines
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        return any(b"--list-flags" in Path(f"/proc/{c}/cmdline").read_bytes() for c in children
                   if Path(f"/proc/{c}/cmdline").exists())
    while not listing():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler ends a job: train.sh and its programs
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, (proc.returncode, err)
    assert f"train.sh: interrupted by SIGTERM; run the same command again to continue (OUT={tmp_path})" in err, err


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
    (out / ".lock").write_text(lock_of(dead_pid()))
    r = run_script("patcher.py", ["--out", out, *FAST])
    assert "which is no longer running: taking it over" in r.stdout


def dead_pid():
    """The pid of a process that has ended."""
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def lock_of(pid, program="patcher.py", **more):
    """A lock's bytes, as a run of `program` as process `pid` of this host writes them."""
    return json.dumps({"host": socket.gethostname(), "pid": pid, "program": program, "started": "2026-01-01 00:00:00",
                       **more}) + "\n"


@pytest.fixture()
def live_process():
    """A process that runs meanwhile and is no run of ours (as a pid reused since a run died would be)."""
    p = subprocess.Popen(["sleep", "120"])
    yield p
    p.kill()
    p.wait()


@pytest.fixture()
def releasing():
    yield
    patcher.release_lock()


def test_two_runs_that_find_the_same_stale_lock_take_it_once(tmp_path, monkeypatch, live_process, releasing):
    """Runs A and B find the same dead holder's lock. B takes it over while A is still deciding (here: while A checks
    whether the holder is alive, as another process would on a busy machine). A must not remove B's fresh lock as
    the stale one it had read: B alone holds the lock, A is refused naming B. (They both ran, 2 times in 5, when the
    stale lock was removed outright.)"""
    lock, dead = tmp_path / ".lock", dead_pid()
    lock.write_text(lock_of(dead))
    real_alive, real_getpid, b_went = patcher.alive, os.getpid, []

    def alive(pid):
        if not b_went:  # A's look at the dead holder: B, whose process is live_process, takes the lock now
            b_went.append(True)
            monkeypatch.setattr(os, "getpid", lambda: live_process.pid)
            try:
                patcher.take_lock(tmp_path, "B")
            finally:
                monkeypatch.setattr(os, "getpid", real_getpid)
        return real_alive(pid)
    monkeypatch.setattr(patcher, "alive", alive)
    with pytest.raises(patcher.RunError, match=rf"is in use by B \(host .*, pid {live_process.pid},"):
        patcher.take_lock(tmp_path, "A")
    assert json.loads(lock.read_text())["pid"] == live_process.pid and sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


@pytest.mark.parametrize("lock", ["empty", "not JSON", "pid now another process's", "pid now another program's"])
def test_a_damaged_lock_names_its_fix_and_a_reused_pid_is_no_holder(lock, tmp_path, live_process, releasing, capsys):
    """A lock that is not a run's (empty, not JSON) was refused on every run with no way out named: the error names the
    fix. A lock whose pid now belongs to another process (its start time differs from the one the lock recorded, here
    the first tick after boot; a lock without one: not the program it names) was refused as in use: it is taken over."""
    text = {"empty": "", "not JSON": "{not json",
            "pid now another process's": lock_of(live_process.pid, pid_start=1),
            "pid now another program's": lock_of(live_process.pid)}[lock]  # (`sleep` is no patcher.py)
    (tmp_path / ".lock").write_text(text)
    if lock.startswith("pid"):
        patcher.take_lock(tmp_path, "patcher.py")
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
        assert "which is no longer running: taking it over" in capsys.readouterr().out
    else:
        with pytest.raises(patcher.RunError, match=f"its lock {tmp_path / '.lock'} is not a run's lock .*: remove it if "
                                                   f"no run is using {tmp_path}$"):
            patcher.take_lock(tmp_path, "patcher.py")
        assert (tmp_path / ".lock").read_text() == text


def test_a_lock_that_cannot_be_written_leaves_no_file(tmp_path, monkeypatch):
    """A full disk while the lock's file is written: one error naming the file, and no .lock.PID left behind (one
    stayed, empty, on every such run)."""
    write_text = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".lock."):
            write_text(self, "")  # created, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, *a, **k)
    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        patcher.take_lock(tmp_path, "patcher.py")
    assert e.value.filename == str(tmp_path / f".lock.{os.getpid()}") and not list(tmp_path.iterdir())


def train_sh_take_lock(out, hold=0.0, pause=0.0):
    """train.sh's own take_lock (and the functions it calls), run alone on OUT=out: prints "held by PID" and holds it
    `hold` s. `pause`: s that each check of a pid's liveness (kill -0) waits first, as on a busy machine."""
    script = f"""OUT={out}; lock=
        kill() {{ [[ $1 != -0 ]] || sleep {pause}; command kill "$@"; }}
        eval "$(sed -n '/^pid_start() {{/,/^}}/p; /^running() {{/,/^}}/p; /^take_lock() {{/,/^}}/p' {ROOT / 'train.sh'})"
        take_lock && echo "held by $$" && sleep {hold}"""
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_train_sh_two_runs_that_find_the_same_stale_lock_take_it_once(tmp_path):
    """train.sh's lock, as patcher.py's: two train.sh find the same dead holder's lock, both look at it for half a
    second; exactly one takes it, the other is refused naming it."""
    (tmp_path / ".lock").write_text(lock_of(dead_pid(), "train.sh"))
    runs = [train_sh_take_lock(tmp_path, hold=2, pause=0.5) for _ in range(2)]
    said = [p.communicate(timeout=60) for p in runs]
    held = [out for out, _ in said if out.strip().endswith(f"held by {json.loads((tmp_path / '.lock').read_text())['pid']}")]
    refused = [err for _, err in said if "is in use by" in err]
    assert len(held) == 1 and len(refused) == 1 and sorted(p.returncode for p in runs) == [0, 1], said


@pytest.mark.parametrize("lock", ["not JSON", "pid now another process's", "pid now another program's"])
def test_train_sh_names_a_damaged_lock_and_takes_over_a_reused_pid(lock, tmp_path, live_process):
    text = {"not JSON": "garbage",
            "pid now another process's": lock_of(live_process.pid, "train.sh",
                                                 pid_start=1),
            "pid now another program's": lock_of(live_process.pid, "train.sh")}[lock]
    (tmp_path / ".lock").write_text(text)
    out, err = train_sh_take_lock(tmp_path).communicate(timeout=60)
    if lock == "not JSON":
        assert f"its lock {tmp_path}/.lock is not a run's lock ('garbage'): remove it if no run is using {tmp_path}" in err
    else:
        assert "which is no longer running: taking it over" in out and "held by" in out, out + err


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


@pytest.fixture()
def signals(monkeypatch):
    """patcher.main() run in this process ends with sys.exit (SystemExit), as a plain `python` run does (conftest puts
    its signal handlers back afterwards)."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("PATCHER_PARENT_PID", raising=False)
    monkeypatch.setattr(patcher.dist, "is_initialized", lambda: False)


def signalled(sig, wait=5.0):
    """Send `sig` to this process; its handler raises where Python next looks (at the latest, in this sleep)."""
    os.kill(os.getpid(), sig)
    time.sleep(wait)


@pytest.mark.parametrize("when", ["while parsing", "while reporting", "while unwinding"])
def test_a_signal_anywhere_in_main_is_one_line_and_a_second_one_is_ignored(when, tmp_path, signals, capsys):
    """Ctrl-C reaches train.sh's whole process group, and train.sh then sends SIGTERM too: a second signal arrives while
    the program unwinds from the first, or reports it. It is ignored (it raised a second KeyboardInterrupt there, 1
    time in 4: a traceback and a stale lock); the first decides: one line, exit 130, the lock given back. A signal
    while the flags are read (before any lock) is one line too (it was a traceback)."""
    args = Namespace(out=str(tmp_path), debug=False)

    def parse():
        if when == "while parsing":
            signalled(signal.SIGTERM)
        return args

    def run(_):
        try:
            signalled(signal.SIGINT)
        finally:
            if when == "while unwinding":  # (a pool that shuts down, a checkpoint's cleanup)
                signalled(signal.SIGTERM, 0.5)

    def interrupted(_, step):
        if when == "while reporting":
            signalled(signal.SIGTERM, 0.5)
        return "; reported"
    try:
        with pytest.raises(SystemExit) as e:
            patcher.main(run, parse, interrupted, program="test")
    except KeyboardInterrupt as e:
        pytest.fail(f"a signal escaped main(): {e!r}")
    err = capsys.readouterr().err.strip().splitlines()
    if when == "while parsing":
        assert e.value.code == 143 and err == ["interrupted by SIGTERM before the run started; nothing was written: run "
                                               "the same command again"]
    else:
        assert e.value.code == 130 and err == ["interrupted; reported"]
    assert not list(tmp_path.iterdir())  # the lock given back


@pytest.mark.parametrize("program", ["patcher.py", "eval.py", "parallel.py"])
def test_sigterm_while_starting_is_an_interruption_too(program, tmp_path):
    """SIGTERM in a run's first seconds, while torch is imported, ended it with no word (the default action): exit 143
    and one line now."""
    proc = subprocess.Popen([sys.executable, str(ROOT / program), "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while "torch" not in Path(f"/proc/{proc.pid}/maps").read_text():  # importing torch: past the program's first lines
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and not out, (proc.returncode, out, err)
    assert err == "interrupted by SIGTERM while starting; nothing was written: run the same command again\n"


def test_sigterm_while_the_judge_hangs_ends_judging_at_once(signals):
    """A judge that answers nothing held a SIGTERM for --judge-timeout (59 s of 60): judge_all waited for its requests
    in flight. They are cut now, and no thread of the judge's outlives judge_all but daemons, which never hold the
    program's exit."""
    server = CountingJudge()
    server.hold_after = 0  # every request held unanswered
    judge = evaluate.LLMJudge(server.url, "judge-1", timeout=30, retries=0, concurrency=4)
    before = set(threading.enumerate())
    signal.signal(signal.SIGTERM, patcher.on_signal)
    patcher.SIGNALLED.clear()
    sent = []

    def preempt():  # once the four requests hang
        while server.held < 4:
            time.sleep(0.01)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=preempt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            judge.judge_all([("p", f"answer {i}") for i in range(8)])
        took = time.monotonic() - sent[0]
        assert took < judge.timeout / 5, f"judge_all returned {took:.1f} s after SIGTERM (--judge-timeout {judge.timeout:g})"
        for _ in range(100):  # and nothing is left that the program's exit would wait for
            left = [t for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
            if not left:
                break
            time.sleep(0.05)
        assert not left, left
    finally:
        server.close()


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


@pytest.mark.xdist_group("uninterrupted")
def test_train_sh_ends_with_a_verdict_and_names_only_files_that_exist(uninterrupted):
    """The demo run's console: stage lines i/n, no table row (the tables are in files), three lines of verdict, and
    every file it says to open there."""
    console = uninterrupted[2]
    lines = console.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("== stage")] == [f"== stage {i}/4" for i in range(1, 5)]
    assert not [line for line in lines if line.lstrip().startswith("|")], console
    verdict = next(i for i, line in enumerate(lines) if line.startswith("verdict: "))
    assert lines[verdict + 1].startswith("worst case = ") and lines[verdict + 2].startswith("the numbers: ")
    assert lines[verdict + 3] == "files to open:"
    files = [line.split()[0] for line in lines[verdict + 4:] if line.startswith("  ")]
    assert len(files) == 5 and all(os.path.isfile(f) for f in files), files
