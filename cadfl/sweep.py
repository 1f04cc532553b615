"""Fair tuning: every algorithm at every grid point, scored on validation data only.

`cadfl sweep CONFIG --grid train.lr=0.01,0.03,0.1 --rounds R` runs the config's algorithms
once per grid point (the cartesian product of the `--grid` settings), each run with
`validation_fraction` of every device's images held out and scored on those
(`eval_split = "validation"`): the test set is never looked at. Each algorithm is scored by
the metric it is judged by (`Strategy.judged_by`: context accuracy for personalised ones, the
mean of global and context accuracy for the rest), averaged over its last `LAST` evaluated
rounds so that one lucky round does not decide. The best point per algorithm becomes its
`[overrides.NAME]` in the tuned config, which `cadfl run` takes as it is. The config's own
`[overrides.*]` are left out of the sweep: every point starts from the base settings.
`--extend N` widens a one-key numeric grid (the learning rate) past an end that an
algorithm chose, up to N values per end.

A point is unstable for an algorithm when its updates were rejected or its last validation
accuracy fell more than `cadfl.report.summary.HEALTH_DROP` below its best
(`cadfl.report.summary.health`): it is marked in the table and not chosen while a stable
point exists that scores within `LOST_DROP` of the best (`best_point`). A point that is
clearly lost (updates rejected, or `LOST_DROP` below its best) stops early, so a sweep can
score over the run's whole horizon. A choice at the edge of a grid key says so in `sweep.md`.

Every point is a run directory of its own under the sweep's folder, so an interrupted sweep
continues where it stopped (finished points are read back, a half-done one resumed).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    merged,
    parse_override,
)
from .engine.run import read_metrics, run_experiment
from .fl import ALGORITHMS
from .report.summary import health, judged_accuracy

LAST = 3
LOST_DROP = 0.10  # a sweep point this far below its best stops early
DEFAULT_VALIDATION = 0.1


@dataclass
class SweepResult:
    """Scores per algorithm and grid point, and the best point of each algorithm."""

    keys: list[str]
    points: list[tuple[Any, ...]]
    scores: dict[str, list[float]]  # algorithm -> score per point (nan: no score)
    best: dict[str, int]  # algorithm -> index of its best point
    tuned: Config
    unstable: dict[str, list[str]]  # algorithm -> per point, why it is unstable ("": stable)

    def edges(self, algorithm: str) -> list[str]:
        """The grid keys whose lowest or highest value the algorithm's choice sits at (of
        keys with more than one value), e.g. "train.lr at its lowest value 0.01"."""
        point = self.points[self.best[algorithm]]
        out = []
        for i, key in enumerate(self.keys):
            values = sorted({p[i] for p in self.points})
            if len(values) > 1 and point[i] in (values[0], values[-1]):
                side = "lowest" if point[i] == values[0] else "highest"
                out.append(f"{key} at its {side} value {point[i]}")
        return out


def parse_grid(specs: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """`key=v1,v2,...` items (TOML values) as (dotted key, values); ConfigError if malformed."""
    grid = []
    for spec in specs:
        key, raw = parse_override(spec)[0], spec.split("=", 1)[1]
        values = [parse_override(f"x={item.strip()}")[1] for item in raw.split(",")
                  if item.strip()]
        if not values:
            raise ConfigError(f"--grid {spec!r}: give values, e.g. --grid train.lr=0.01,0.05")
        grid.append((".".join(key), values))
    if len({k for k, _ in grid}) != len(grid):
        raise ConfigError("--grid: a setting is given twice")
    return grid


def score(lines: Sequence[dict], algorithm: str, last: int = LAST) -> float:
    """The algorithm's validation score: its judged metric over its last `last` evaluated
    rounds (nan if it was never evaluated)."""
    judged = ALGORITHMS[algorithm].judged_by
    keys = ("global_acc", "context_acc") if judged == "both" else (judged,)
    values = []
    for m in lines:
        if m["algorithm"] != algorithm or m["context_acc"] is None:
            continue
        got = [m[k] for k in keys if m[k] is not None]
        values.append(sum(got) / len(got))
    tail = values[-last:]
    return sum(tail) / len(tail) if tail else math.nan


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _nested(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def tuned_overrides(algorithm: str, keys: Sequence[str], point: Sequence[Any]
                    ) -> dict[str, Any]:
    """The grid settings that apply to `algorithm` (its training, its own table), nested."""
    out: dict[str, Any] = {}
    for key, value in zip(keys, point, strict=True):
        section = key.split(".", 1)[0]
        if section in ("train", algorithm):
            out = merged(out, _nested(key, value))
    return out


def run_sweep(config: str | None, overrides: Sequence[str], grid: Sequence[tuple[str, list]],
              rounds: int, out: Path, quiet: bool = False, extend: int = 0) -> SweepResult:
    """Run the sweep into `out` (one run directory per point) and write `sweep.md`,
    `sweep.json`, `heatmap.png` and the tuned config `tuned.toml`.

    With `extend` > 0 and a grid of one numeric key, a choice at either end of the grid adds
    a value beyond it (one geometric step: v0^2 / v1 below, vn^2 / vn-1 above), at most
    `extend` per end, until no algorithm's choice sits at an end that may still grow."""
    # Every point starts from the base settings: tuned [overrides.*] of the config (the
    # embedded default has some) would hide the grid's values.
    overrides = [*overrides, "overrides={}"]
    base = load_config(config, overrides)
    validation = base.validation_fraction or DEFAULT_VALIDATION
    keys = [k for k, _ in grid]
    points = list(itertools.product(*(values for _, values in grid)))
    for key, values in grid:  # every grid value must be a valid setting before any work
        for value in values:
            load_config(config, [*overrides, f"{key}={_toml_value(value)}"])
    scores: dict[str, list[float]] = {a: [] for a in base.algorithms}
    unstable: dict[str, list[str]] = {a: [] for a in base.algorithms}
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(points), desc="sweep", unit="point", disable=None if not quiet else True)

    def run_point(i: int, point: tuple[Any, ...]) -> None:
        label = ", ".join(f"{k}={v}" for k, v in zip(keys, point, strict=True))
        cfg = load_config(config, [*overrides, f"rounds={rounds}",
                                   f"validation_fraction={validation}",
                                   'eval_split="validation"',
                                   *(f"{k}={_toml_value(v)}" for k, v in
                                     zip(keys, point, strict=True))])
        run_dir = out / f"point-{i:02d}"
        lines = read_metrics(run_dir / "metrics.jsonl")
        if len(lines) < rounds * len(cfg.algorithms) or not (run_dir / "summary.md").exists():
            lines = run_experiment(cfg, run_dir, resume=(run_dir / "config.toml").exists(),
                                   quiet=True, stop=clearly_lost)
        for a in base.algorithms:
            scores[a].append(score(lines, a))
            own = [m for m in lines if m["algorithm"] == a]
            flag = health(own)
            unstable[a].append("" if flag == "ok" else flag)
        bar.update()
        if not quiet:
            done = "  ".join(f"{a} {scores[a][-1]:.3f}" for a in base.algorithms)
            tqdm.write(f"[{i + 1}/{len(points)}] {label}: {done}")

    for i, point in enumerate(points):
        run_point(i, point)
    grown = {"lowest": 0, "highest": 0}
    while extend and (value := value_beyond(points, scores, unstable, grown, extend)) is not None:
        points.append((value,))  # run directories keep the order the points were made in
        bar.total += 1
        run_point(len(points) - 1, points[-1])
    bar.close()
    # Shown and chosen in the grid's order, lowest value first.
    order = sorted(range(len(points)), key=lambda j: points[j])
    points = [points[j] for j in order]
    scores = {a: [v[j] for j in order] for a, v in scores.items()}
    unstable = {a: [v[j] for j in order] for a, v in unstable.items()}
    best = {a: best_point(scores[a], unstable[a]) for a in base.algorithms}
    tuned_data = base.to_dict()
    tuned_data["validation_fraction"] = validation
    tuned_data["overrides"] = {a: tuned_overrides(a, keys, points[best[a]])
                               for a in base.algorithms}
    tuned_data["overrides"] = {a: o for a, o in tuned_data["overrides"].items() if o}
    tuned = config_from_dict(tuned_data)
    result = SweepResult(keys, points, scores, best, tuned, unstable)
    write_sweep(result, out, base, rounds, validation)
    return result


def value_beyond(points: list[tuple[Any, ...]], scores: dict[str, list[float]],
                 unstable: dict[str, list[str]], grown: dict[str, int], most: int
                 ) -> float | None:
    """The value to add beyond an end of a one-key grid of positive floats where some
    algorithm's choice sits (the lower end first), counted in `grown`; None when there is
    none, the grid has another shape, or both ends have grown `most` times."""
    values = sorted(p[0] for p in points)
    if len(points[0]) != 1 or len(values) < 2 or not all(
            isinstance(v, float) and v > 0 for v in values):
        return None
    chosen = {points[best_point(scores[a], unstable[a])][0] for a in scores}
    for side, end, inner in (("lowest", values[0], values[1]),
                             ("highest", values[-1], values[-2])):
        if end in chosen and grown[side] < most:
            grown[side] += 1
            return float(f"{end * end / inner:.3g}")  # 0.01, 0.03 -> 0.00333
    return None


def clearly_lost(lines: Sequence[dict]) -> bool:
    """Whether a sweep point's algorithm (its metric lines so far) can stop early: updates
    were rejected, or its validation accuracy fell more than `LOST_DROP` below its best.
    Either marks the point unstable (`best_point`)."""
    if any(m.get("rejected") for m in lines):
        return True
    scored = [v for _, v in judged_accuracy(lines)]
    return bool(scored) and max(scored) - scored[-1] > LOST_DROP


def best_point(scores: Sequence[float], unstable: Sequence[str]) -> int:
    """The index of the best point: the highest score among the stable points (`unstable`
    empty there) that score within `LOST_DROP` of the best point, or among all when there
    is none. A stable point that far behind never learned (FedAvg at a rate too high to move
    in the demo's sweep: stable at 0.30 where every learning point scored 0.75-0.84), and
    being stable there says nothing."""
    top = max(_finite(s) for s in scores)
    stable = [j for j, s in enumerate(scores)
              if not unstable[j] and _finite(s) >= top - LOST_DROP]
    return max(stable or range(len(scores)), key=lambda j: _finite(scores[j]))


def _finite(x: float) -> float:
    return x if not math.isnan(x) else -math.inf


def write_sweep(result: SweepResult, out: Path, base: Config, rounds: int,
                validation: float) -> None:
    """sweep.md (the grid as a table, best marked), sweep.json, heatmap.png, tuned.toml."""
    from .report.plots import plot_heatmap

    labels = [", ".join(f"{k}={v}" for k, v in zip(result.keys, p, strict=True))
              for p in result.points]
    header = "| algorithm | judged by | " + " | ".join(labels) + " | best |"
    rows = [header, "|" + "---|" * (len(labels) + 3)]
    notes = []
    for a, values in result.scores.items():
        cells = [("**{:.3f}**" if j == result.best[a] else "{:.3f}").format(v)
                 + (" (unstable)" if result.unstable[a][j] else "")
                 for j, v in enumerate(values)]
        rows.append(f"| {a} | {ALGORITHMS[a].judged_by} | " + " | ".join(cells)
                    + f" | {labels[result.best[a]]} |")
        notes += [f"- {a} at {labels[j]}: unstable, {why}"
                  for j, why in enumerate(result.unstable[a]) if why]
        if result.unstable[a][result.best[a]]:
            notes.append(f"- {a}: every point is unstable; the best score is taken")
        notes += [f"- {a}: chosen with {edge}, the edge of the grid: widen it there"
                  for edge in result.edges(a)]
    title = (f"{base.dataset} / {base.model}, {base.devices} devices, {rounds} rounds per "
             f"point, seed {base.seed}; scores on the validation split ({validation:.0%} of "
             f"every device's images, never trained on), mean of the last {LAST} evaluations")
    (out / "sweep.md").write_text(f"# Sweep\n\n{title}.\n\n" + "\n".join(rows)
                                  + ("\n\n" + "\n".join(notes) if notes else "")
                                  + "\n\n![heatmap](heatmap.png)\n\nTuned config: "
                                  "`tuned.toml` (`cadfl run tuned.toml`).\n")
    (out / "sweep.json").write_text(json.dumps({
        "keys": result.keys, "points": [list(p) for p in result.points],
        "scores": result.scores, "best": result.best, "unstable": result.unstable,
        "rounds": rounds,
        "validation_fraction": validation}, indent=1))
    (out / "tuned.toml").write_text(
        "# Written by cadfl sweep: the base config with each algorithm's best settings on\n"
        "# validation data as [overrides.NAME]. See sweep.md beside it.\n"
        + result.tuned.to_toml())
    plot_heatmap([list(result.scores[a]) for a in result.scores], list(result.scores),
                 labels, [result.best[a] for a in result.scores], out / "heatmap.png", title)


def print_table(result: SweepResult) -> None:
    """The grid as a plain-text table on stdout (best point of each algorithm starred, an
    unstable point marked !), and every choice at the edge of the grid."""
    labels = [", ".join(f"{k}={v}" for k, v in zip(result.keys, p, strict=True))
              for p in result.points]
    width = max(12, *(len(label) for label in labels))
    print(f"{'algorithm':<10} " + " ".join(f"{label:>{width}}" for label in labels))
    for a, values in result.scores.items():
        cells = [f"{v:.3f}{'*' if j == result.best[a] else ' '}"
                 f"{'!' if result.unstable[a][j] else ' '}" for j, v in enumerate(values)]
        print(f"{a:<10} " + " ".join(f"{c:>{width}}" for c in cells))
    for a in result.scores:
        for edge in result.edges(a):
            print(f"{a}: chosen with {edge}, the edge of the grid: widen it there")
