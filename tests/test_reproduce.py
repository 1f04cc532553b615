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


def test_published_reproduction_reports_the_final_rounds_open_accuracy_of_each_run(
        tmp_path, monkeypatch, capsys):
    import json

    import reproduce

    tiny = reproduce.Setting(
        paper="a test", column="digits (5, 2)", preset="digits-10x5.toml",
        common=("devices=5", "partition.k=2", "rounds=4", "eval_every=1", "overrides={}"),
        algorithms={"fedavg": reproduce.Algorithm(("train.epochs=1",), "here"),
                    "fedper": reproduce.Algorithm(("train.epochs=2",), "there")},
        setup="digits", published={"fedavg": 12.5}, last_rounds=2)
    monkeypatch.setitem(reproduce.SETTINGS, "tiny", tiny)
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "OUT", tmp_path / "docs" / "reproductions")
    reproduce.main(["--settings", "tiny", "--algorithms", "fedavg", "fedper"])
    text = (tmp_path / "docs" / "reproductions.md").read_text()
    for algo in ("fedavg", "fedper"):
        lines = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "seed-0" / algo /
                                         "metrics.jsonl").read_text().splitlines()]
        final = [m["context_open_acc"] for m in lines if m["round"] in (3, 4)]
        assert len(final) == 2
        assert f"| {algo} | {100 * sum(final) / 2:.2f} ± 0.00 |" in text
    assert "| 12.50 |" in text and "there |" in text
    capsys.readouterr()
    reproduce.main(["--settings", "tiny"])  # finished runs are not run again
    assert " seed 0 " not in capsys.readouterr().out
    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "gone")  # a clean checkout
    assert reproduce.report(["tiny"]).split("![curves]")[0] == text.split("![curves]")[0]
