"""The fork test: what a week of ablations starts with, done to a copy of the project as a forker does it, and the
copy's flag suite run on it. The fork adds

  - a fifth defense, gradient ascent on D_unsafe (--mode ascent, its own --ascent-beta): each step descends
    L_safe(theta) - beta * L_unsafe(theta), a D_unsafe batch each step. Edited: its function, its DEFENSES line, its
    add_argument, its case in tests/test_flags.py and its test against an independent computation;
  - another attacker (--inner-optimizer adamw|sgd, read by the one Attacker). Edited: the Attacker's field, where it
    acts (new_optimizer), its add_argument, its case in tests/test_flags.py.

Nothing else: every list of modes (--mode's help, --list-flags, train.sh, parallel.py's refusals and its honoured
attacker flags, the flag tests' expectations) must follow by itself. Each edit is a text insertion at an anchor the
code keeps for readers too ("# (a new defense goes here)"), never a line number. Expensive (the copy's flag suite: a
demo base model, ~45 patcher.py runs in process, a parallel.py --sync run, train.sh dry runs): one test, one process."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT

ASCENT = '''def ascent_update(model, optimizer, batch, args, delta=None, theta_buffer=None):
    """Gradient ascent on D_unsafe: L_safe(theta) - beta * L_unsafe(theta) (--ascent-beta), a D_unsafe batch a step."""
    passes = {"loss_clean": forward_backward(model, batch.safe),
              "loss_harmful": forward_backward(model, batch.harmful, scale=-args.ascent_beta)}
    return finish(model, optimizer, passes, {"loss_clean": "L(theta)", "loss_harmful": "L_unsafe(theta)"},
                  args.max_grad_norm, batch.retain, args.retain_weight)


'''
ASCENT_TEST = '''

@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_ascent_update_matches_independent_computation(beta):
    model, safe, harmful = tiny_model(), toy_batch(n=6), toy_batch(n=6, split="unsafe")
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    g_safe, g_unsafe = ref_grads(model, theta, safe), ref_grads(model, theta, harmful)
    m = patcher.ascent_update(model, torch.optim.SGD(model.parameters(), lr=LR), patcher.Batches(safe, harmful),
                              args_for("--mode", "ascent", "--ascent-beta", beta, "--max-grad-norm", 0))
    assert max_diff(model, {n: theta[n] - LR * (g_safe[n] - beta * g_unsafe[n]) for n in theta}) <= 1e-6
    assert abs(m["loss_harmful"] - ref_loss(model, theta, harmful).item()) < 1e-5
'''
EDITS = {  # file -> [(anchor, text inserted before it)]; "" as the anchor: appended at the end
    "patcher.py": [
        ("class Defense(NamedTuple):", ASCENT),
        ("    # (a new defense goes here)\n",
         '    "ascent": Defense(ascent_update, "ascent", "gradient ascent on D_unsafe", harmful=True,\n'
         '                      flags=("ascent_beta",)),\n'),
        ('    g = p.add_argument_group("optimisation")\n',
         '    g.add_argument("--ascent-beta", type=NONNEGATIVE, default=0.5, help="--mode ascent: weight of L_unsafe")\n'),
        ("    # (a new attacker setting goes here)\n", '    optimizer: str = "adamw"  # or sgd\n'),
        ("        # (another optimizer goes here)\n",
         '        if self.optimizer == "sgd":\n'
         '            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)\n'),
        ('    g.add_argument("--inner-batch-size"',
         '    g.add_argument("--inner-optimizer", choices=["adamw", "sgd"], default="adamw", help="inner attack optimizer")\n'),
    ],
    "tests/test_flags.py": [
        ("    # (a new flag's case goes here)\n",
         '    "ascent_beta": (["--mode", "ascent", "--ascent-beta", "2"], ("reference", ["--mode", "ascent"], '
         'differs_first_at(3))),\n'
         '    "inner_optimizer": (["--inner-optimizer", "sgd"], differs_first_at(FIRST_ATTACK)),\n'),
    ],
    "tests/test_defenses.py": [("", ASCENT_TEST)],
}
SUITE = ["tests/test_flags.py", "tests/test_train_sh.py::test_every_flag_of_the_programs_reaches_them_from_its_variable",
         "tests/test_defenses.py::test_ascent_update_matches_independent_computation"]


def fork(root):
    """The project's *.py, train.sh and tests/ (with its data) copied to `root`, and EDITS applied there."""
    for f in [*ROOT.glob("*.py"), ROOT / "train.sh"]:
        shutil.copy(f, root / f.name)
    shutil.copytree(ROOT / "tests", root / "tests", ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    for name, edits in EDITS.items():
        text = (root / name).read_text()
        for anchor, insert in edits:
            assert anchor == "" or text.count(anchor) == 1, f"{name}: the anchor {anchor!r} is gone or not unique"
            text = text + insert if anchor == "" else text.replace(anchor, insert + anchor)
        (root / name).write_text(text)


def test_a_fifth_defense_and_another_attacker_need_no_edit_beyond_their_own(tmp_path):
    fork(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", "-rA", *SUITE],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    passed = [line for line in r.stdout.splitlines() if line.startswith("PASSED ")]
    for case in ("test_flag_changes_exactly_what_it_should[ascent_beta]",
                 "test_flag_changes_exactly_what_it_should[inner_optimizer]", "test_ascent_update_matches_independent"):
        assert any(case in line for line in passed), case  # the fork's own cases ran, and passed
