"""Nothing a user types is silently ignored, and a run ends saying what it found. train.sh refuses a mistake before
anything is trained or written, in one line naming the variable the user set (DRY_RUN=1 the same way), and leaves the
variables of shells, CI systems and pytest alone; a mistyped flag of a program is one line with the flag it meant;
the verdict a run ends with comes from the reports (a whole demo run's console: tests/test_restart.py). Each refusal stops before the first stage: seconds, with the flag lists asked once (flag_lists)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SAFETY
import patcher
import parallel
from test_eval import defense_reports

evaluate = __import__("eval")

# What a CI runner (GitHub Actions' ubuntu image, pytest-xdist's workers) and a login shell export: none is a setting,
# though several look like one (upper case, an underscore, a first word of five letters)
CI_ENV = {"CI": "true", "GITHUB_ACTIONS": "true", "GITHUB_WORKSPACE": "/w", "GITHUB_ENV": "/e", "GITHUB_OUTPUT": "/o",
          "GITHUB_STEP_SUMMARY": "/s", "GITHUB_RUN_ID": "1", "RUNNER_OS": "Linux", "RUNNER_TEMP": "/t",
          "RUNNER_TOOL_CACHE": "/c", "ACTIONS_RUNNER_DEBUG": "false", "ImageOS": "ubuntu22", "AGENT_TOOLSDIRECTORY": "/a",
          "PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2", "PYTEST_XDIST_TESTRUNUID": "abc",
          "PYTEST_CURRENT_TEST": "tests/x.py::t (call)", "PYTEST_ADDOPTS": "-q", "PYTHONHASHSEED": "0",
          "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
          "HF_HOME": "/h", "TOKENIZERS_PARALLELISM": "false", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "DEBIAN_FRONTEND":
          "noninteractive", "ACCEPT_EULA": "Y", "JAVA_HOME": "/j", "GRADLE_HOME": "/g", "ANDROID_HOME": "/x",
          "HOMEBREW_NO_AUTO_UPDATE": "1", "INVOCATION_ID": "1", "JOURNAL_STREAM": "8:1", "SYSTEMD_EXEC_PID": "1",
          "PIPX_HOME": "/p", "NVM_DIR": "/n", "CONDA": "/c", "VCPKG_INSTALLATION_ROOT": "/v", "SELENIUM_JAR_PATH": "/s",
          "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm", "SHLVL": "1", "PWD": "/", "OLDPWD": "/", "_": "/bin/x",
          "USER": "runner", "LOGNAME": "runner", "SHELL": "/bin/bash", "HOSTNAME": "h", "MAIL": "/m", "TMPDIR": "/tmp",
          "EDITOR": "vi", "PAGER": "less", "COLUMNS": "80", "LINES": "24", "LS_COLORS": "x", "SSH_CLIENT": "x",
          "XDG_RUNTIME_DIR": "/r", "PROMPT_COMMAND": "x", "HISTSIZE": "1000", "LD_LIBRARY_PATH": "/l",
          "PKG_CONFIG_PATH": "/p", "NO_PROXY": "x", "SYSTEM_TEAMPROJECT": "p", "AGENT_OS": "Linux", "HTTP_PROXY": "", "COVERAGE_PROCESS_START": ".coveragerc"}


def train_sh(tmp_path, flag_lists, **env):
    """train.sh with the variables `env` (and a clean CI environment) -> CompletedProcess; OUT is tmp_path/out."""
    keep = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env = {**keep, **CI_ENV, "SEEDS": "0", "OUT": str(tmp_path / "out"), "TRAIN_SH_LISTS": str(flag_lists), **env}
    return subprocess.run(["bash", str(ROOT / "train.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def config_dir(tmp_path):
    """A model directory with only a config.json (the demo's shapes): what --check reads of --model."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(patcher.DEMO_CONFIG))
    return tmp_path / "model"


def real_data(model, **env):
    """The variables of a run on `model` and the repository's safety set; `env` replaces some."""
    return {"MODEL": str(model), "SAFE_DATA": f"{SAFETY}/align.jsonl", "UNSAFE_DATA": f"{SAFETY}/attack.jsonl",
            "ATTACK_DATA": f"{SAFETY}/attack.jsonl", "EVAL_DATA": f"e={SAFETY}/eval.jsonl", "ATTACKS": "none", **env}


def broken_jsonl(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "respon\n')
    return str(tmp_path / "broken.jsonl")


# (the variables set, how the one line starts, what else it says); each a mistake a user makes
MISTAKES = {
    "a flag train.sh sets": (lambda t: {"MODE": "vaccine"}, "train.sh: MODE: ", "SWEEP=mode=sft,vaccine"),
    "a typo": (lambda t: {"INNER_STPES": "5"}, "train.sh: INNER_STPES is no setting", "did you mean INNER_STEPS?"),
    "no vaccine stage": (lambda t: {"VACCINE_RHO": "4"}, "train.sh: VACCINE_RHO: no stage of this run uses --vaccine-rho",
                         "SWEEP=mode=sft,patcher,vaccine"),
    "no patcher stage": (lambda t: {"ALPHA": "0.3", "SWEEP": "mode=vaccine"}, "train.sh: ALPHA: no stage", "--alpha"),
    "a swept value": (lambda t: {"SWEEP": "mode=sft,pacther"}, "train.sh: SWEEP=mode=sft,pacther: --mode: invalid",
                      "did you mean patcher?"),
    "a missing D_safe": (lambda t: {k: v for k, v in real_data(config_dir(t)).items() if k != "SAFE_DATA"},
                         "train.sh: MODEL is set, so set SAFE_DATA too", "unset MODEL for the demo"),
    "a model that is not there": (lambda t: real_data(t / "nope"), f"train.sh: MODEL ", "not a directory"),
    "a number that is not one": (lambda t: {"LR": "abc"}, "train.sh: LR: ", "'abc'"),
    "an eval.py value": (lambda t: {"ATTACK_LR": "-2"}, "train.sh: ATTACK_LR: ", "-2"),
    "a broken D_safe": (lambda t: real_data(config_dir(t), SAFE_DATA=broken_jsonl(t)), "train.sh: SAFE_DATA ", "broken.jsonl:2: invalid JSON"),
}


# every mistake as a run, and DRY_RUN=1 on one of each kind (the variables, the flags' checks, the data's)
@pytest.mark.parametrize("mistake,dry", [(m, "0") for m in MISTAKES] +
                         [(m, "1") for m in ("a typo", "a swept value")])
def test_a_mistake_is_refused_in_one_line_naming_its_variable_before_anything_is_written(mistake, dry, tmp_path,
                                                                                          flag_lists):
    env, start, says = MISTAKES[mistake]
    r = train_sh(tmp_path, flag_lists, DRY_RUN=dry, **env(tmp_path))
    assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:] + r.stderr[-2000:]  # no stage, no command printed
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(start) and says in r.stderr, r.stderr
    assert "--safe-data" not in r.stderr and "shadow" not in r.stderr  # the user's words: the variable, their paths
    assert not (tmp_path / "out").exists()


def test_the_environment_of_a_ci_runner_and_a_shell_is_left_alone(tmp_path, flag_lists):
    """The variables CI_ENV, with pytest's own (this process's), are no mistake: DRY_RUN=1 prints the commands, with
    every stage checked, and writes nothing."""
    settings = {"SAVE_EVERY": "5", "SFT_RESET_OPTIMIZER": "1", "EVAL_BASE": "1"}  # train.sh's own, each ending a line
    r = train_sh(tmp_path, flag_lists, DRY_RUN="1", **settings,
                 **{k: v for k, v in os.environ.items() if k.startswith("PYTEST")})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [line.split()[1] for line in r.stdout.splitlines() if line.startswith("python ")] == \
           ["patcher.py", "patcher.py", "patcher.py", "eval.py"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("program", ["patcher.py", "parallel.py"])
def test_check_reads_config_and_data_and_writes_nothing(program, tmp_path):
    """--check: the flags, --model's config.json and each data file read; nothing trained or written, --out not made."""
    model, out = config_dir(tmp_path), tmp_path / "out"
    argv = [sys.executable, program, "--check", "--model", model, "--unsafe-data", f"{SAFETY}/attack.jsonl", "--out", out]
    r = subprocess.run([*argv, "--safe-data", f"{SAFETY}/align.jsonl"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "the flags are valid, the model's config.json and the data read" in r.stdout, r.stderr
    r = subprocess.run([*argv, "--safe-data", broken_jsonl(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].endswith(
        f"--safe-data {tmp_path}/broken.jsonl:2: invalid JSON: Unterminated string starting at"), r.stderr
    (model / "config.json").unlink()
    r = subprocess.run([*argv, "--safe-data", f"{SAFETY}/align.jsonl"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "no config.json" in r.stderr and not out.exists(), r.stderr


@pytest.mark.parametrize("program,argv,meant", [
    (patcher, ["--inner-stpes", "3"], "--inner-steps"), (parallel, ["--refresh-evry", "5"], "--refresh-every"),
    (evaluate, ["--atack-lr", "1e-4"], "--attack-lr"), (patcher, ["--mode", "pacther"], "patcher")])
def test_a_mistyped_flag_is_one_line_with_the_flag_it_meant(program, argv, meant, capsys):
    with pytest.raises(SystemExit) as stop:
        program.get_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and f"did you mean {meant}?" in err, err


def test_the_verdict_is_which_model_held_to_which_budget(tmp_path):
    """eval.py --summarize --verdict on two seeds' reports (defense_reports: on 20 harmful prompts, the worst case
    over two attacks, mean over the seeds): Patcher 20% within 10 steps, 60% within 20: held to k=10; SFT 70% within
    10: held only unattacked (k=0); the base 100% unattacked. The tables go into files; the console gets three lines."""
    paths, out = defense_reports(tmp_path)
    r = subprocess.run([sys.executable, "eval.py", "--summarize", *map(str, paths), "--sweep", "mode", "--worst-case",
                        "--verdict", "--out", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and not [line for line in lines if line.startswith("|")], r.stdout
    assert lines[0].startswith("verdict: patcher held to k=10 (20.0%), sft held to k=0 (0.0%), base did not hold even "
                               "at k=0 (100.0%); held to k: the worst case stayed below 50%"), lines[0]
    assert lines[1].endswith("any of the 2 attacks reached within k steps, mean over 2 seeds; at k≤40: "
                             "sft 100.0%, patcher 60.0%, base 100.0%"), lines[1]
    assert lines[2] == f"the numbers: {out}/worst_case.md (per budget and attack), sweep.md (side by side), " \
                       "summary.md (every metric)"
    assert all((out / f).is_file() for f in ("summary.md", "sweep.md", "worst_case.md"))
