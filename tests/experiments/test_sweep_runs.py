"""experiments/sweep_runs.py's Children: a signal to the sweep ends every run in flight, and a
run that ignores its SIGTERM is killed once the grace period has passed."""
import signal
import subprocess
import sys

import pytest

from experiment_script import load_experiment

HONOURS = "import time; print('up', flush=True); time.sleep(600)"
IGNORES = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
           "print('up', flush=True); time.sleep(600)")


def started(children, code):
    proc = children.start([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "up"      # its handler is in place
    return proc


def test_a_signal_ends_every_run_and_kills_one_that_ignores_it():
    sweep_runs = load_experiment("sweep_runs")
    children = sweep_runs.Children(grace_s=2.0)
    polite, stubborn = started(children, HONOURS), started(children, IGNORES)
    with pytest.raises(SystemExit, match="stopped by signal 15; run the same command again"):
        children.stop(signal.SIGTERM, None)
    assert polite.returncode == -signal.SIGTERM        # ended by the SIGTERM itself
    assert stubborn.returncode == -signal.SIGKILL      # still alive after the grace period
    with pytest.raises(RuntimeError, match="the sweep is stopping"):
        children.start([sys.executable, "-c", "pass"])
