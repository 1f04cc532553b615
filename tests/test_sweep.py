"""cadfl sweep: every algorithm at every grid point, scored on validation data only."""

from __future__ import annotations

import json
import math

import pytest

from cadfl.cli import main
from cadfl.config import ConfigError, load_config
from cadfl.sweep import best_point, parse_grid, run_sweep, score, value_beyond
from tests import BASE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grid_values_are_toml_and_bad_grids_are_refused():
    assert parse_grid(["train.lr=0.01, 0.1", 'bn="average","keep_local"']) == [
        ("train.lr", [0.01, 0.1]), ("bn", ["average", "keep_local"])]
    with pytest.raises(ConfigError, match="give values"):
        parse_grid(["train.lr="])
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["train.lr=0.1", "train.lr=0.2"])


def test_score_is_the_judged_metric_over_the_last_evaluations():
    lines = [{"algorithm": "fedavg", "global_acc": g, "context_acc": c}
             for g, c in [(0.1, 0.3), (0.5, 0.7), (None, None), (0.6, 0.8), (0.7, 0.9)]]
    lines += [{"algorithm": "fedper", "global_acc": None, "context_acc": c}
              for c in (0.2, 0.4)]
    assert score(lines, "fedavg") == pytest.approx((0.6 + 0.7 + 0.8) / 3)  # mean of g and c
    assert score(lines, "fedper", last=1) == pytest.approx(0.4)  # context only
    assert math.isnan(score(lines, "local"))


def test_a_sweep_picks_each_algorithms_best_point_on_validation_data(tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", BASE, "--grid", "train.lr=0.01,0.1", "--rounds", "2", "--quiet", "--out",
            str(out), "--set", "devices=4", "--set", "data_fraction=0.5",
            "--set", 'algorithms=["fedavg", "fedper"]']
    assert main(args) == 0
    assert "fedper" in capsys.readouterr().out
    found = json.loads((out / "sweep.json").read_text())
    lrs = [p[0] for p in found["points"]]
    assert lrs == sorted(lrs) and {0.01, 0.1} <= set(lrs)
    for d in sorted(out.glob("point-*")):
        cfg = load_config(d / "config.toml")
        assert (cfg.eval_split, cfg.validation_fraction) == ("validation", 0.1)
        i = lrs.index(cfg.train.lr)
        lines = [json.loads(s) for s in (d / "metrics.jsonl").read_text().splitlines()]
        for algo in ("fedavg", "fedper"):
            assert found["scores"][algo][i] == pytest.approx(score(lines, algo))
    assert load_config(out / "point-00" / "config.toml").train.lr == 0.01  # made in order
    tuned = load_config(out / "tuned.toml")
    assert tuned.eval_split == "test" and tuned.validation_fraction == 0.1
    for algo in ("fedavg", "fedper"):
        best = max(range(len(lrs)), key=lambda i, a=algo: (not found["unstable"][a][i],
                                                           found["scores"][a][i]))
        assert tuned.for_algorithm(algo).train.lr == lrs[best]
    for name in ("sweep.md", "heatmap.png"):
        assert (out / name).stat().st_size > 0
    # Run again: the finished points are read back, not trained again.
    stamp = (out / "point-00" / "metrics.jsonl").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "point-00" / "metrics.jsonl").stat().st_mtime_ns == stamp


def test_the_grid_is_not_hidden_by_the_configs_own_overrides(tmp_path):
    # The embedded demo carries tuned learning rates; the sweep's points must not.
    assert main(["sweep", "--grid", "train.lr=0.01,0.1", "--rounds", "1", "--quiet", "--out",
                 str(tmp_path), "--set", "devices=5", "--set", 'algorithms=["fedavg"]']) == 0
    for i, lr in enumerate((0.01, 0.1)):
        cfg = load_config(tmp_path / f"point-{i:02d}" / "config.toml")
        assert cfg.overrides == {} and cfg.for_algorithm("fedavg").train.lr == lr


def test_an_unstable_point_is_not_chosen_over_a_stable_one():
    assert best_point([0.5, 0.7, 0.6], ["", "updates rejected from round 3", ""]) == 2
    assert best_point([0.5, 0.7, 0.6], ["fell", "fell", "fell"]) == 1  # none stable
    # A stable point more than LOST_DROP (0.10) behind the best one never learned: it is not
    # preferred for its stability; one within it is.
    assert best_point([0.84, 0.80, 0.30], ["fell", "fell", ""]) == 0
    assert best_point([0.84, 0.75, 0.30], ["fell", "", ""]) == 1


def test_a_diverging_point_is_marked_and_an_edge_choice_says_so(tmp_path):
    out = tmp_path / "sweep"
    result = run_sweep(None, ["devices=4", "data_fraction=0.5", 'algorithms=["fedavg"]'],
                       [("train.lr", [0.05, 50.0])], 4, out, quiet=True)
    assert result.unstable["fedavg"][0] == ""
    assert result.unstable["fedavg"][1].startswith("updates rejected from round")
    assert result.best["fedavg"] == 0
    # The lost point stopped early, and stays stopped when the sweep is run again.
    lost = (out / "point-01" / "metrics.jsonl").read_text().splitlines()
    assert len((out / "point-00" / "metrics.jsonl").read_text().splitlines()) == 4
    assert 1 <= len(lost) < 4
    run_sweep(None, ["devices=4", "data_fraction=0.5", 'algorithms=["fedavg"]'],
              [("train.lr", [0.05, 50.0])], 4, out, quiet=True)
    assert (out / "point-01" / "metrics.jsonl").read_text().splitlines() == lost
    assert result.edges("fedavg") == ["train.lr at its lowest value 0.05"]
    text = (out / "sweep.md").read_text()
    assert "(unstable)" in text
    assert "- fedavg: chosen with train.lr at its lowest value 0.05, the edge of the grid" in text


def test_a_choice_at_an_end_widens_the_grid_a_bounded_number_of_times():
    points = [(0.01,), (0.1,)]
    grown = {"lowest": 0, "highest": 0}
    low = {"a": [0.9, 0.1], "b": [0.1, 0.2]}  # a chose 0.01 (low end), b chose 0.1 (high end)
    stable = {"a": ["", ""], "b": ["", ""]}
    assert value_beyond(points, low, stable, grown, 1) == 0.001  # 0.01^2 / 0.1
    assert value_beyond(points, low, stable, grown, 1) == 1.0  # then the high end: 0.1^2 / 0.01
    assert value_beyond(points, low, stable, grown, 1) is None  # both ends used up
    assert value_beyond([(1,), (2,)], low, stable, {"lowest": 0, "highest": 0}, 3) is None  # ints


def test_a_sweep_without_rounds_scores_over_the_configs_rounds(tmp_path):
    out = tmp_path / "sweep"
    assert main(["sweep", BASE, "--grid", "train.lr=0.05", "--extend", "0", "--quiet", "--out",
                 str(out), "--set", "devices=4", "--set", "data_fraction=0.3",
                 "--set", "rounds=3", "--set", 'algorithms=["fedavg"]']) == 0
    assert json.loads((out / "sweep.json").read_text())["rounds"] == 3
    lines = (out / "point-00" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["round"] for s in lines] == [1, 2, 3]
