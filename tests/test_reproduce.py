"""The CAD reproduction script runs end to end and writes its figures and table."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reproduce_cad  # noqa: E402


def _run(model, out):
    reproduce_cad.main(["--scale", "smoke", "--models", model, "--seeds", "0", "1",
                        "--algorithms", "cad", "fedavg", "--out", str(out)])


def _check(model, out):
    for name in ("curves.png", "bytes.png", "flops.png", "results.md"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text()
    assert f"| {model} | cad |" in text and f"| {model} | fedavg |" in text
    assert "--scale smoke" in text  # the exact command is recorded
    return text


def test_reproduce_script_writes_results_and_resumes_without_redoing(tmp_path):
    out = tmp_path / "results"
    _run("digits", out)
    text = _check("digits", out)
    _run("digits", out)  # finished runs are resumed: nothing redone, the same table
    assert (out / "results.md").read_text() == text


@pytest.mark.slow  # about 3 minutes: every round scores the full 10,000-image test set
@pytest.mark.skipif(not os.environ.get("CADFL_DATA"),
                    reason="set CADFL_DATA to a folder containing cifar-10-batches-py")
def test_reproduce_script_runs_the_cifar10_preset(tmp_path):
    _run("alexnet", tmp_path)
    _check("alexnet", tmp_path)
