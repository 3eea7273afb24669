"""Shared test fixtures.

Real assets (SmolLM2-135M-Instruct, the Llama 3 and Qwen tokenizers) live in $PATCHER_ASSETS (default
~/.cache/patcher-assets), downloaded from the hub as the README says. Tests that need them skip with the
reason below, which names the download, when they are absent. The small safety data set is part of the
repository (tests/data/safety/): nothing outside the clone is read.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# torch.compile in the tests (and in the programs they start) compiles in its own process: inductor's default pool
# of compile workers is one more Python process per core, each importing torch, for kernels this small
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the project is a flat directory of modules, not a package

ASSETS = Path(os.environ.get("PATCHER_ASSETS", Path.home() / ".cache" / "patcher-assets"))
SAFETY = ROOT / "tests" / "data" / "safety"
# where each asset comes from (README: "Tests and assets")
DOWNLOAD = {
    "smollm2-135m-instruct": "huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir {path}",
    "llama3-tokenizer": "huggingface-cli download meta-llama/Meta-Llama-3-8B-Instruct tokenizer.json "
                        "tokenizer_config.json original/tokenizer.model --local-dir {path} && mv {path}/original/tokenizer.model {path}/",
    "qwen2-tokenizer": "huggingface-cli download Qwen/Qwen2-7B-Instruct tokenizer.json tokenizer_config.json --local-dir {path} "
                       "&& huggingface-cli download Qwen/Qwen-7B qwen.tiktoken --local-dir {path}",
}


def asset_dir(name: str) -> Path:
    """Path of one real asset directory, or skip the test with a clear reason."""
    path = ASSETS / name
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"real asset {path} is absent: {DOWNLOAD[name].format(path=path)}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return asset_dir("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def llama3_tok_dir() -> Path:
    return asset_dir("llama3-tokenizer")


@pytest.fixture(scope="session")
def qwen2_tok_dir() -> Path:
    return asset_dir("qwen2-tokenizer")


def run_script(script, args, nproc=1, timeout=300, check=True, env=None, launcher="torchrun"):
    """Run one of the project's programs (one process, or nproc ranks under torchrun) as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / script)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / script)]
    r = subprocess.run(cmd + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """The demo's base model (seed 0), trained once per test session by patcher.py itself."""
    out = tmp_path_factory.mktemp("demo-base")
    run_script("patcher.py", ["--out", out, "--mode", "sft", "--warmup-steps", "1", "--rounds", "1", "--defend-steps", "1"])
    return out / "base"


@pytest.fixture(scope="session")
def flag_lists(tmp_path_factory):
    """The programs' --list-flags, asked once: train.sh takes them from TRAIN_SH_LISTS instead of asking again."""
    lists = tmp_path_factory.mktemp("lists")
    for program in ("patcher", "parallel", "eval"):
        (lists / program).write_text(subprocess.run([sys.executable, f"{program}.py", "--list-flags"], cwd=ROOT,
                                                    capture_output=True, text=True, check=True).stdout)
    return lists


@pytest.fixture(autouse=True)
def signal_handlers():
    """A test that runs a program's main() in this process (which installs its own SIGINT and SIGTERM handlers) leaves
    the session's handlers as they were: Ctrl-C and a CI's SIGTERM still end the session."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in handlers.items():
        signal.signal(s, h)


def with_base(out, base):
    """A fresh run directory that already holds the demo's base model (so the demo skips training it)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(base, out / "base")
    return out


# The suite's longest tests, by their --durations on 2 cores (30-130 s each; the rest take seconds). pytest-xdist hands
# tests out in collection order, so a long one collected last can leave one worker busy long after the other is done:
# these go first, the xdist_group chain (one worker, several minutes) before them. Only the order changes.
LONGEST = ("test_a_fifth_defense_and_another_attacker_need_no_edit_beyond_their_own",
           "test_gpu_check_runs_on_the_cpu_at_tiny_shapes", "test_guard_judge_end_to_end",
           "test_a_clone_alone_runs_the_smollm2_preset_and_test",
           "test_the_readmes_quick_start_on_a_clone_writes_every_file_it_names",
           "test_the_used_by_commands_on_eight_ranks_equal_one_process", "test_real_smollm2_end_to_end",
           "test_the_plan_matches_the_measured_peak_of_every_defense_program_and_world",
           "test_parallel_takes_every_inherited_flag_as_patcher_does", "test_two_ranks_lora_and_full_match_one_process",
           "test_two_nodes_run_both_programs")


# Tests that another test runs again, whole, on a copy of the project: where both are selected, the copy's run is the
# one kept (the same assertions on the same code, plus the copy's own), so the suite runs each once. Run alone, each
# runs as usual. {the test that runs them: what it runs}
RUN_IN_A_COPY = {
    "test_fork.py::test_a_fifth_defense_and_another_attacker_need_no_edit_beyond_their_own":  # the whole flag suite
        ("test_flags.py::", "test_train_sh.py::test_every_flag_of_the_programs_reaches_them_from_its_variable"),
    "test_clone.py::test_a_clone_alone_runs_the_smollm2_preset_and_test": ("test_patcher.py::test_real_smollm2_end_to_end",),
}


def pytest_collection_modifyitems(config, items):
    names = {item.nodeid.split("/")[-1] for item in items}
    again = tuple(n for runner, ran in RUN_IN_A_COPY.items() if runner in names for n in ran)
    copied = [item for item in items if again and item.nodeid.split("/")[-1].startswith(again)]
    if copied:
        config.hook.pytest_deselected(items=copied)
        items[:] = [item for item in items if item not in copied]

    def rank(item):
        return 0 if item.get_closest_marker("xdist_group") else 1 if item.originalname in LONGEST else 2
    items.sort(key=rank)  # stable: the order within each rank is pytest's
