"""Loaded by every Python process that tests/test_restart.py starts with this folder on PYTHONPATH: with
PATCHER_TEST_GENERATION_MARKER set, model.generate first touches that file, then waits a little, so that the test can
kill a run while it generates (the demo's answers take milliseconds otherwise). Nothing else changes."""
import os
import time

if os.environ.get("PATCHER_TEST_GENERATION_MARKER"):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the project
    import model

    real = model.generate

    def generate(*args, **kwargs):
        with open(os.environ["PATCHER_TEST_GENERATION_MARKER"], "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return real(*args, **kwargs)
    model.generate = generate
