"""Crash safety: `kill -9` at an arbitrary moment, then `--resume`, gives the metrics of an
uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cadfl.cli import main
from tests import BASE

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = ["run", BASE, "--quiet", "--set", "rounds=5", "--set", 'algorithms=["fedavg","cad"]',
        "--set", "devices=4", "--set", "data_fraction=0.5"]


def _metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lines_before_kill", [2, 7])
def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, lines_before_kill):
    reference = tmp_path / "reference"
    assert main([*ARGS, "--out", str(reference)]) == 0
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cadfl.cli", *ARGS, "--out", str(run)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        metrics = run / "metrics.jsonl"
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= lines_before_kill:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert main(["run", "--resume", str(run), "--quiet"]) == 0
    assert _metrics(run) == _metrics(reference)
