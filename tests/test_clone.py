"""The repository stands alone: a copy of it in an empty folder (the files a clone has, nothing beside them) runs
`PRESET=smollm2-cpu ./train.sh` (dry run) and the SmolLM2 end-to-end test, and reads nothing outside itself and the
assets folder."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ASSETS, ROOT, asset_dir, with_base

# Every Python process of the run (pytest and the patcher.py it starts) logs each file it opens under the folder
# that holds the real repository (its siblings and the repository itself), unless the file is
# Python's own or an allowed folder's, or made new: tempfile's probe and TemporaryFile (a clone in /tmp watches /tmp).
# Loaded through PYTHONPATH, so it travels into subprocesses.
HOOK = '''
import os, sys
_watched = os.environ["CLONE_CHECK_WATCHED"] + os.sep
_allowed = tuple(os.path.realpath(p) + os.sep for p in
                 os.environ["CLONE_CHECK_ALLOWED"].split(os.pathsep) + [sys.prefix, sys.base_prefix, sys.exec_prefix])
_fresh = os.O_CREAT | os.O_EXCL  # a file made new: nothing beside the clone is read
def _hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) and (args[2] or 0) & _fresh != _fresh:
        path = os.path.realpath(os.fsdecode(args[0]))
        if (path + os.sep).startswith(_watched) and not (path + os.sep).startswith(_allowed) and \
                not os.path.isdir(path):  # a folder opened for an unnamed temporary file (O_TMPFILE)
            with open(os.environ["CLONE_CHECK_LOG"], "a") as f:  # fires the hook again: the log is not watched
                f.write(path + "\\n")
sys.addaudithook(_hook)
'''


def clone_into(dest: Path):
    """Copy the repository's own files (tracked, or untracked and not ignored: what a clone plus this working tree
    has) into dest; without git, the tree minus what never belongs to a clone."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        never = {".git", "runs", "out", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if not never & set(p.relative_to(ROOT).parts)]
    for name in sorted(set(filter(None, names))):
        if (ROOT / name).is_file():  # git still lists a tracked file deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)  # keeps train.sh executable


def clean_env(**extra):
    """The user's environment without any variable of ours (SAFETY, MODEL, PYTHONPATH, ...) that could point back."""
    keep = ("PATH", "HOME", "TMPDIR", "LANG", "OMP_NUM_THREADS")
    return {k: v for k, v in os.environ.items() if not k.isupper() or k in keep} | {"PATCHER_ASSETS": str(ASSETS), **extra}


def strings(x):
    """Every string in a JSON value."""
    if isinstance(x, dict):
        x = list(x.values())
    return [s for v in x for s in strings(v)] if isinstance(x, list) else [x] if isinstance(x, str) else []


def assert_inside(paths, *folders):
    for p in paths:
        assert any(p.resolve().is_relative_to(f.resolve()) for f in folders), f"{p} lies outside {folders}"


def test_a_clone_alone_runs_the_smollm2_preset_and_test(tmp_path):
    asset_dir("smollm2-135m-instruct")  # skips, naming the download, where it is absent
    clone = tmp_path / "alone" / "patcher"  # its folder holds nothing else: no sibling folder
    clone_into(clone)
    assert [p.name for p in clone.parent.iterdir()] == ["patcher"] and (clone / "tests" / "data" / "safety" / "align.jsonl").is_file()

    # (a) the preset resolves and starts from the clone: every path in its commands is the clone's or the assets'
    r = subprocess.run(["./train.sh"], cwd=clone, env=clean_env(DRY_RUN="1", PRESET="smollm2-cpu"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    commands = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("python ")]
    assert [c[1] for c in commands] == ["patcher.py", "patcher.py", "eval.py"]
    words = [w.split("=", 1)[-1] for c in commands for w in c[2:] if "/" in w]  # "eval=DIR/eval.jsonl" -> the path
    assert words and all(w.startswith(("tests/data/", "runs/smollm2/", str(ASSETS))) for w in words), words
    assert_inside([clone / w for w in words], clone, ASSETS)
    assert "tests/data/safety/attack.jsonl" in words and "runs/smollm2/benign_heldout.jsonl" in words
    assert not (clone / "runs").exists()  # (checked, with every stage, but written only when a run starts)

    # (b) the asset-dependent SmolLM2 test passes in the clone, opening no file beside it
    hook, log, basetemp = tmp_path / "hook", tmp_path / "opened-outside.txt", tmp_path / "basetemp"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = clean_env(PYTHONPATH=str(hook), CLONE_CHECK_WATCHED=str(ROOT.parent.resolve()), CLONE_CHECK_LOG=str(log),
                    CLONE_CHECK_ALLOWED=os.pathsep.join(map(str, [tmp_path, ASSETS])))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={basetemp}",
                        "tests/test_patcher.py::test_real_smollm2_end_to_end"], cwd=clone, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert not log.exists(), f"read outside the clone: {sorted(set(log.read_text().split()))[:20]}"
    # the run's recorded configuration names only the clone's data, the assets and its own folder
    (config,) = [p for p in basetemp.rglob("config.json") if p.parent.name != "final"]
    recorded = json.loads(config.read_text())
    paths = [Path(s) for s in strings(recorded) if s.startswith("/")]
    assert Path(recorded["safe_data"]) in paths and Path(recorded["inputs"]["unsafe_data"]["path"]) in paths
    assert_inside(paths, clone, ASSETS, basetemp)


def test_the_readmes_quick_start_on_a_clone_writes_every_file_it_names(tmp_path, demo_base):
    """The Quick start's four commands, run in a clone with the fewest steps (its demo base model: the session's, as
    a second run finds it made; the test suite collected, not run): every file the README says each writes, and
    every file `--help` names for it, is there, and train.sh's "files to open" too."""
    from test_readme import quick_start_files, section
    block = section("Quick start")
    commands = [line.split("  #")[0].strip() for line in block[block.index("```bash") + 1:block.index("```")]]
    assert [c.split()[:3] for c in commands] == [["pip", "install", "-r"], ["python", "patcher.py"], ["./train.sh"],
                                                 ["pip", "install", "-r"]], commands
    clone = tmp_path / "patcher"
    clone_into(clone)
    env = clean_env(OMP_NUM_THREADS="1")
    run = lambda argv, **more: subprocess.run(argv, cwd=clone, env={**env, **more}, capture_output=True, text=True,
                                              timeout=300)
    r = run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-r", "requirements.txt"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]  # (installed here: nothing to fetch)

    out, named = quick_start_files("python patcher.py")
    with_base(clone / out, demo_base)
    few = ["--warmup-steps", "1", "--rounds", "1", "--inner-steps", "1", "--defend-steps", "1", "--save-every", "2"]
    r = run([sys.executable, "patcher.py", *few])
    assert r.returncode == 0 and "demo: training" not in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    helped = run([sys.executable, "patcher.py", "--help"]).stdout
    helped = " ".join(helped.split("run directory:", 1)[1].split("\n  --")[0].split())  # --out's help
    names = named + [w for w in (w.strip(",") for w in helped.split()) if re.fullmatch(r"\w+/|\w+\.\w+", w)]
    assert {"final/", "metrics.jsonl", "config.json", "checkpoints/"} <= set(names), names
    assert not [n for n in names if not (clone / out / n).exists()], names

    out, named = quick_start_files("./train.sh")
    with_base(clone / out / "seed0" / "demo", demo_base)
    suite = tmp_path / "suite.txt"  # the demo suite's two attacks, two steps each
    suite.write_text("harmful --eval-at 0,2\npoisoned --attack-benign-data $TOY/attack_benign.jsonl --poison-ratio 0.2 "
                     "--attack-samples 16 --eval-at 0,2\n")
    r = run(["./train.sh"], SEEDS="0", WARMUP_STEPS="2", ROUNDS="1", INNER_STEPS="2", DEFEND_STEPS="2", LIMIT="8",
            ATTACKS=str(suite))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    opened = [line.split()[0] for line in r.stdout.split("files to open:\n")[1].splitlines() if line.startswith("  ")]
    helped = run(["./train.sh", "--help"]).stdout  # the outputs its help names: OUT/NAME
    names = named + [n.removeprefix("OUT/") for n in re.findall(r"OUT/[\w*/]+\.(?:md|png)", helped)]
    assert {"summary.md", "sweep.md", "timing.md", "worst_case.md"} <= set(names) and len(opened) == 5, (names, opened)
    assert not [n for n in names if not list((clone / out).glob(n))], names
    assert all((clone / f).is_file() for f in opened), opened

    r = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests"])
    assert r.returncode == 0 and " tests collected" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
