"""Loaded by every Python process that tests/test_restart.py starts with this folder on PYTHONPATH: with
PATCHER_TEST_GENERATION_MARKER set, model.generate first touches that file, then waits a little, so that the test can
kill a run while it generates (the demo's answers take milliseconds otherwise); with PATCHER_TEST_STEP_SECONDS set,
each of patcher's updates (clean_step, defender_step) takes at least that long, so that a parallel.py defender's
steps outlast its attacker's however busy the machine. Nothing else changes."""
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

if os.environ.get("PATCHER_TEST_STEP_SECONDS"):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the project
    import patcher

    def slowed(update, seconds=float(os.environ["PATCHER_TEST_STEP_SECONDS"])):
        def step(*args, **kwargs):
            time.sleep(seconds)
            return update(*args, **kwargs)
        return step
    patcher.clean_step, patcher.defender_step = slowed(patcher.clean_step), slowed(patcher.defender_step)
