"""The CAD reproduction script runs end to end and writes its figures and table."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import reproduce_cad  # noqa: E402


@pytest.mark.skipif(not os.environ.get("CADFL_DATA"),
                    reason="set CADFL_DATA to a folder containing cifar-10-batches-py")
def test_reproduce_script_writes_results_for_every_algorithm(tmp_path):
    out = tmp_path / "results"
    reproduce_cad.main(["--scale", "smoke", "--models", "alexnet", "--seeds", "0", "1",
                        "--algorithms", "cad", "fedavg", "--out", str(out)])
    for name in ("curves.png", "bytes.png", "flops.png", "results.md"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "results.md").read_text()
    assert "| alexnet | cad |" in text and "| alexnet | fedavg |" in text
    assert "--scale smoke" in text  # the exact command is recorded
    # Resuming a finished run redoes nothing and gives the same table.
    reproduce_cad.main(["--scale", "smoke", "--models", "alexnet", "--seeds", "0", "1",
                        "--algorithms", "cad", "fedavg", "--out", str(out)])
    assert (out / "results.md").read_text() == text
