"""What a new user's run ends with and how fast it goes: train.sh's summary after the seeds (the comparison of a sweep
over --mode, one line on the figures matplotlib could not draw) and patcher.py's threads on a shared CPU."""
import os
import subprocess
from argparse import Namespace

import pytest

from conftest import ROOT
import patcher
from test_eval import defense_reports

NO_FIGURES = ("train.sh: no figures drawn (matplotlib is not installed): sweep.png, worst_case.png, each seed's "
              "robustness.png; pip install matplotlib, then run the same command again: it draws them from the kept answers")


def test_train_sh_summary_writes_the_comparison_and_ends_with_one_line_on_missing_figures(tmp_path):
    """train.sh's last block (what follows the seeds), run alone on two seeds' reports of SWEEP=mode=... with an attack
    suite, where `import matplotlib` fails: sweep.md and worst_case.md are written, no PNG, the console holds the
    verdict and the files to open but no table, and the figures are named once, in the last line, with how to get them."""
    paths, out = defense_reports(tmp_path)
    block = (ROOT / "train.sh").read_text().split('[[ "${DRY_RUN:-0}" == 1 ]] && exit 0\n', 1)[1]
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('matplotlib is hidden by the test')\n")
    script = (f"set -euo pipefail\nOUT={out} SWEEP=mode=sft,patcher SEEDS='0 1' sweep_flag=mode ATTACKS=suite.txt "
              f"cpu=test OMP_NUM_THREADS=1 t0=0\nreports=({' '.join(map(str, paths))})\n{block}")
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(shim.parent), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == NO_FIGURES and not [line for line in lines[:-1] if "matplotlib" in line]
    assert lines[-2].split() == [f"{paths[0].parent}/report.md", "one", "seed's", "report,", "every", "row", "(the",
                                 "others:", f"{paths[1].parent}/report.md)"]  # (outside OUT: whole)
    assert [line.split()[0] for line in lines[-7:-2]] == ["files", *(f"{out}/{f}" for f in ("summary.md", "sweep.md",
                                                                                            "worst_case.md", "timing.md"))]
    assert lines[-10].startswith("verdict: patcher held to k=10") and not [line for line in lines if "|" in line]
    assert (out / "sweep.md").read_text().startswith("# 3 models compared: sft, patcher, base")
    assert "| patcher | 0.0 ± 0.0 | 20.0 ± 10.0 |" in (out / "sweep.md").read_text() and not list(out.glob("*.png"))


def test_cpu_threads_stay_within_the_free_cores(monkeypatch, capsys):
    """Unless OMP_NUM_THREADS is set, torch's threads are capped at the cores other work leaves free (cores minus the
    load average), shared among the host's ranks, with one line; OMP_NUM_THREADS and a CUDA machine leave them be."""
    threads = []
    monkeypatch.setattr(patcher.torch, "set_num_threads", threads.append)
    monkeypatch.setattr(patcher.torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(patcher.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(patcher.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for load, ranks, want in ((7.2, 1, 1), (3.0, 1, 5), (0.1, 2, 4), (0.0, 1, None)):
        monkeypatch.setattr(patcher.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
        assert patcher.cpu_threads() == want, (load, ranks)
    assert threads == [1, 5, 4]
    assert capsys.readouterr().out.splitlines()[0] == ("cpu: 1 thread per process, not 8: 8 cores, 7.2 busy with other work "
                                                       "(load average), 1 rank on this host; OMP_NUM_THREADS=N chooses")
    monkeypatch.setattr(patcher.os, "getloadavg", lambda: (7.0, 7.0, 7.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert patcher.cpu_threads() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(patcher.torch.cuda, "is_available", lambda: True)
    assert patcher.cpu_threads() is None and threads == [1, 5, 4]
    called = []  # and every program's main() applies it
    monkeypatch.setattr(patcher, "cpu_threads", lambda: called.append(1))
    with pytest.raises(SystemExit):
        patcher.main(run_fn=lambda args: None, parse=lambda: Namespace(debug=False, out="unused", check=True),
                     check_fn=lambda args: None)
    assert called == [1]
