"""benchmarks/compare.py: a setting is swept, run per (seed, algorithm), resumed without
redoing work, and reported as mean ± std over seeds of the runs' own metric lines."""

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import compare  # noqa: E402

from cadfl.config import load_config  # noqa: E402

TINY = compare.Setting(
    "digits-10x5.toml", ("devices=4", "rounds=2", "data_fraction=0.3", "eval_every=1"),
    ("cad", "fedavg"), (0.05, 0.2), 1, "digits, 4 devices, 2 rounds (a test)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny setting swept and run once for this module (the last test changes it)."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare, "RUNS", root / "runs")
        patch.setitem(compare.SETTINGS, "tiny", TINY)
        compare.run_setting("tiny", [0, 1], root / "out")
        yield root


def lines_of(root: Path, seed: int, algo: str, wall: bool = True) -> list[dict]:
    path = root / "runs" / "tiny" / f"seed-{seed}" / algo / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return lines if wall else [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]


def test_the_table_is_mean_and_std_over_seeds_of_the_runs_metric_lines(tiny):
    _, rows = compare.table(tiny / "out", "tiny")
    assert [r["algorithm"] for r in rows] == ["cad", "fedavg"]
    for r in rows:
        last = [lines_of(tiny, s, r["algorithm"])[-1]["global_acc"] for s in (0, 1)]
        best = [max(m["context_acc"] for m in lines_of(tiny, s, r["algorithm"]))
                for s in (0, 1)]
        assert r["last_global"] == f"{statistics.mean(last):.3f} ± {statistics.stdev(last):.3f}"
        assert r["best_context"] == f"{statistics.mean(best):.3f} ± {statistics.stdev(best):.3f}"
        assert r["seeds"] == [0, 1] and r["lr"] in TINY.lrs
        tuned = load_config(str(tiny / "runs" / "tiny" / "sweep" / "tuned.toml"))
        assert r["lr"] == tuned.for_algorithm(r["algorithm"]).train.lr
    compare.report(tiny / "out", ["tiny"], readme=False)
    text = (tiny / "out" / "results.md").read_text()
    assert "### tiny" in text and rows[0]["last_global"] in text
    assert sorted(p.name for p in (tiny / "out" / "tiny" / "metrics").iterdir()) == [
        "seed-0-cad.jsonl", "seed-0-fedavg.jsonl", "seed-1-cad.jsonl", "seed-1-fedavg.jsonl"]


def test_the_report_is_rebuilt_from_its_copies_when_the_run_directories_are_gone(tiny,
                                                                              monkeypatch):
    compare.report(tiny / "out", ["tiny"], readme=False)
    before = (tiny / "out" / "results.md").read_text()
    assert "precision " in before
    monkeypatch.setattr(compare, "RUNS", tiny / "gone")  # a clean checkout: no runs/
    compare.report(tiny / "out", ["tiny"], readme=False)
    assert (tiny / "out" / "results.md").read_text() == before
    table = compare.side_by_side(tiny / "out", tiny / "out", "tiny")
    assert table.count("| yes |") == 2 and table.count("| 1.00x |") == 2


def test_a_second_call_redoes_nothing_and_a_run_at_another_rate_starts_again(tiny, capsys):
    before = {(s, a): lines_of(tiny, s, a, wall=False) for s in (0, 1)
              for a in TINY.algorithms}
    stale = tiny / "runs" / "tiny" / "seed-1" / "cad"
    chosen = load_config(str(stale / "config.toml")).train.lr
    other = next(lr for lr in TINY.lrs if lr != chosen)
    # As if seed 1's CAD ran before the grid grew and the sweep chose another rate.
    config = (stale / "config.toml").read_text()
    (stale / "config.toml").write_text(config.replace(f"lr = {chosen}\n", f"lr = {other}\n", 1))
    assert load_config(str(stale / "config.toml")).train.lr == other
    capsys.readouterr()
    compare.run_setting("tiny", [0, 1], tiny / "out")
    printed = capsys.readouterr().out
    assert f"tiny seed 1 cad: run at another learning rate than the sweep's choice {chosen}" \
        in printed
    assert printed.count(" seed ") == 2  # that run's restart, nothing else redone
    assert load_config(str(stale / "config.toml")).train.lr == chosen
    after = {(s, a): lines_of(tiny, s, a, wall=False) for s in (0, 1)
             for a in TINY.algorithms}
    assert after == before  # the restarted run is the same run again


def test_a_run_at_another_precision_starts_again(tiny, capsys):
    run = tiny / "runs" / "tiny" / "seed-0" / "fedavg"
    config = (run / "config.toml").read_text()
    ran = load_config(str(run / "config.toml")).precision
    other = "fp32" if ran == "bf16" else "bf16"
    (run / "config.toml").write_text(config.replace(f'precision = "{ran}"',
                                                    f'precision = "{other}"'))
    capsys.readouterr()
    compare.run_setting("tiny", [0], tiny / "out", precision=ran)
    printed = capsys.readouterr().out
    assert "tiny seed 0 fedavg: run at another precision" in printed
    assert printed.count(" seed ") == 2  # that restart and its run, nothing else redone
    assert load_config(str(run / "config.toml")).precision == ran


@pytest.mark.parametrize("name", [n for n, s in compare.SETTINGS.items() if s.sweep_rounds])
def test_a_setting_is_swept_over_the_rounds_its_runs_go(name):
    path, overrides = compare.base_config(name)
    assert compare.SETTINGS[name].sweep_rounds == load_config(path, overrides).rounds


def test_a_sweep_again_of_one_algorithm_replaces_only_its_choice_and_its_runs(tiny, capsys):
    committed = tiny / "out" / "tiny" / "tuned.toml"
    compare.report(tiny / "out", ["tiny"], readme=False)
    cad_before = {s: lines_of(tiny, s, "cad", wall=False) for s in (0, 1)}
    # The committed choice of FedAvg made wrong on purpose: the sweep again must replace it.
    first = load_config(str(committed))
    wrong = next(lr for lr in TINY.lrs if lr != first.for_algorithm("fedavg").train.lr)
    text = committed.read_text()
    head, tail = text.split("[overrides.fedavg", 1)
    committed.write_text(head + "[overrides.fedavg" + tail.replace(
        f"lr = {first.for_algorithm('fedavg').train.lr}", f"lr = {wrong}", 1))
    capsys.readouterr()
    compare.run_setting("tiny", [0, 1], tiny / "out", resweep=("fedavg",))
    printed = capsys.readouterr().out
    again = json.loads((tiny / "runs" / "tiny" / "resweep" / "sweep.json").read_text())
    assert list(again["scores"]) == ["fedavg"]
    chosen = again["points"][again["best"]["fedavg"]][0]
    tuned = load_config(str(committed))
    assert tuned.for_algorithm("fedavg").train.lr == chosen
    assert tuned.for_algorithm("cad").train.lr == first.for_algorithm("cad").train.lr
    assert "seed 0 cad" not in printed and "seed 1 cad" not in printed
    assert {s: lines_of(tiny, s, "cad", wall=False) for s in (0, 1)} == cad_before
    compare.report(tiny / "out", ["tiny"], readme=False)
    text = (tiny / "out" / "results.md").read_text()
    assert "fedavg were swept again" in text and (tiny / "out" / "tiny" / "resweep.md").exists()
    _, rows = compare.table(tiny / "out", "tiny")
    assert {r["algorithm"]: r["lr"] for r in rows}["fedavg"] == chosen
