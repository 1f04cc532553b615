"""The comparison that counts: CAD against every peer, each tuned on validation data.

For every setting: a learning-rate sweep of every algorithm on validation data (seed 0,
`cadfl sweep`'s code; the test set is never looked at), then each (seed, algorithm) with its
tuned settings in a run directory of its own. Everything is resumable: run the same command
again and finished points and runs are read back, a half-done one continues (`--resume`).
Then `OUT/results.md` gets one table per setting (mean +- std over seeds), and plots per
setting: curves, accuracy against bytes and against device FLOPs, and a Pareto plot (context
accuracy against device training GFLOPs and MB per round). `--readme` rewrites the README's
block between `<!-- compare:begin -->` and `<!-- compare:end -->` from the same tables.

    .venv/bin/python benchmarks/compare.py --plan            # time one round of each algorithm
    nohup .venv/bin/python benchmarks/compare.py --settings paper-flcnn --seeds 0 1 \\
        --out docs/results/compare > runs/compare.log 2>&1 &
    .venv/bin/python benchmarks/compare.py --report-only --readme --out docs/results/compare
    .venv/bin/python benchmarks/compare.py --settings xdev-2cls --resweep scaffold fedavg

`--resweep ALGO ...` sweeps only those algorithms again and runs them, writing their choices
into the setting's committed `tuned.toml` (`resweep.md` beside `sweep.md`); the other rows
keep their committed sweep and runs. For an algorithm fixed, or a sweep rule changed, after
a setting ran, when sweeping every algorithm again costs hours.

Every run computes at `--precision` (default auto: bf16 on a GPU or a CPU with AMX /
AVX512-BF16, else fp32); a run made at another precision is started again, and each table
says the precision its runs used. Run directories live in `runs/NAME-OF-OUT/` (not
committed); the report reads the metric lines it copied into `OUT/SETTING/metrics/` where
they are gone, so `--report-only` rebuilds the tables from a clean checkout. A setting whose
sweep folder is gone but whose choices are committed (`OUT/SETTING/tuned.toml`) is not swept
again (delete that file to sweep again). `--side-by-side BASE` writes, for the settings
given, this report's runs against those of the report folder BASE (e.g. fp32 against bf16)
into docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cadfl.config import Config, config_from_dict, load_config  # noqa: E402
from cadfl.device.compute import resolve_device  # noqa: E402
from cadfl.device.precision import PRECISIONS, resolve_precision  # noqa: E402
from cadfl.engine.run import read_metrics, run_experiment  # noqa: E402
from cadfl.fl import ALGORITHMS  # noqa: E402
from cadfl.report.summary import health  # noqa: E402
from cadfl.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "compare"  # run directories of the default OUT (not committed)
# Written by benchmarks/cad_variants.py: CAD's default variant, and each setting's best.
VARIANTS_BEST = ROOT / "docs" / "results" / "cad-variants" / "best.json"
PEERS = ["cad", "fed2", "heterofl", "fedrolex", "fedavg", "fedprox", "scaffold", "fedper",
         "fedrep", "ditto", "local"]


@dataclass(frozen=True)
class Setting:
    """One comparison: a preset, the choices that fit it to this CPU, and its sweep."""

    preset: str
    overrides: tuple[str, ...]
    algorithms: tuple[str, ...]
    lrs: tuple[float, ...]
    sweep_rounds: int
    what: str


# A sweep point runs as many rounds as the setting's runs (issue 24: an 8-round sweep chose
# rates that then diverged in 25), stopping early once clearly lost (`cadfl.sweep`).
EVAL = ("eval_every=2", "test_fraction=0.2")
# Scoring all 100 devices' own models costs more than a round's training there: a 15-round
# sweep point scored every 2nd round took 500 s, of which 186 s were its training rounds (the
# test suite ran beside it). So every 5th round.
XDEV = ("rounds=40", "eval_every=5", "test_fraction=0.2")
SETTINGS = {
    "digits": Setting(
        "digits-10x5.toml", ("seed=0",), tuple(PEERS), (), 0,
        "the built-in defaults (the embedded demo before issue 25): digits, 10 devices x 5 "
        "classes, all take part, 30 rounds, every algorithm at "
        "the learning rate its validation sweep chose (docs/results/sweep-digits)"),
    # 5 algorithms chose 0.01 of (0.01, 0.03, 0.1), the lower edge: 0.003 was added.
    "paper-flcnn": Setting(
        "cifar10-flcnn-5cls.toml", ("data_fraction=0.2", "rounds=25", *EVAL),
        (*PEERS, "central"), (0.003, 0.01, 0.03, 0.1), 25,
        "the CAD paper's setting with the small FL CNN: 10 devices x 5 random classes, all "
        "take part, 1 local epoch, 20% of the training images (1,000 per device)"),
    # Every algorithm chose 0.01 of (0.01, 0.02), the lower edge: 0.005 was added below it,
    # then 0.0025, when 8 chose 0.005.
    "paper-alexnet": Setting(
        "cifar10-alexnet-5cls.toml", ("data_fraction=0.05", "rounds=10", *EVAL),
        (*PEERS, "central"), (0.0025, 0.005, 0.01, 0.02), 10,
        "the CAD paper's setting with AlexNet at CPU scale: 10 devices x 5 classes, all take "
        "part, 1 local epoch, 5% of the training images (250 per device), 10 rounds"),
    # 6 algorithms chose 0.01 of (0.01, 0.03, 0.1), the lower edge: 0.003 was added.
    "xdev-2cls": Setting(
        "cifar10-flcnn-xdev.toml", ("partition.k=2", *XDEV), tuple(PEERS),
        (0.003, 0.01, 0.03, 0.1), 40,
        "cross-device: 100 devices x 2 classes, 10 per round, 2 local epochs, 40 rounds"),
    "xdev-5cls": Setting(
        "cifar10-flcnn-xdev.toml", ("partition.k=5", *XDEV), tuple(PEERS), (0.01, 0.03, 0.1),
        40, "cross-device: 100 devices x 5 classes, 10 per round, 2 local epochs, 40 rounds"),
}


def base_config(name: str, extra: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """The preset path and overrides of a setting (`extra` last). CAD runs as the paper's
    method; its variants are benchmarks/cad_variants.py's."""
    s = SETTINGS[name]
    algos = "[" + ", ".join(f'"{a}"' for a in s.algorithms) + "]"
    return str(ROOT / "configs" / s.preset), [*s.overrides, f"algorithms={algos}",
                                              'cad.variant="paper"', *extra]


def plan(names: list[str], seeds: int, precision: str = "auto", rounds: int = 1) -> None:
    """Time `rounds` rounds of every algorithm per setting at `precision` and print the mean
    training time of a round and the estimated cost."""
    total = 0.0
    for name in names:
        s = SETTINGS[name]
        path, overrides = base_config(name, (f'precision="{precision}"',))
        cfg = load_config(path, overrides)
        out = ROOT / "runs" / "compare-plan" / name
        lines = run_experiment(load_config(path, [*overrides, f"rounds={rounds}",
                                                  f"eval_every={rounds}"]), out, quiet=True)
        per_round = {a: statistics.mean(m["wall_s"] for m in lines if m["algorithm"] == a)
                     for a in dict.fromkeys(m["algorithm"] for m in lines)}
        cost = sum(per_round.values()) * (len(s.lrs) * s.sweep_rounds + seeds * cfg.rounds)
        total += cost
        times = ", ".join(f"{a} {t:.2f}s" for a, t in per_round.items())
        print(f"{name} at {lines[0]['precision']}: one round ({rounds} timed) {times}; all "
              f"{sum(per_round.values()):.1f}s")
        print(f"  {len(s.lrs)} lrs x {s.sweep_rounds} sweep rounds + {seeds} seeds x "
              f"{cfg.rounds} rounds: about {cost / 60:.0f} min (evaluation not counted)")
    print(f"all: about {total / 3600:.1f} h")


def run_setting(name: str, seeds: list[int], out: Path, precision: str = "auto",
                resweep: tuple[str, ...] = ()) -> None:
    """Sweep, then every (seed, algorithm), each resumable, all at `precision`. With
    `resweep`, only those algorithms are swept again and run (see `resweep_setting`)."""
    s = SETTINGS[name]
    at = (f'precision="{precision}"',)
    path, overrides = base_config(name, at)
    committed = out / name / "tuned.toml"
    if resweep:
        tuned = resweep_setting(name, resweep, out, at)
    elif s.sweep_rounds and not (RUNS / name / "sweep").exists() and committed.exists():
        print(f"{name}: the sweep's committed choices {committed} (delete it to sweep again)",
              flush=True)
        tuned = load_config(str(committed), list(at))
    elif s.sweep_rounds:
        print(f"{time.strftime('%H:%M:%S')} {name}: sweep", flush=True)
        tuned = timed(RUNS / name / "sweep", run_sweep, path, overrides,
                       [("train.lr", list(s.lrs))], s.sweep_rounds, RUNS / name / "sweep",
                       quiet=False, extend=2).tuned
    else:  # tuned already: the preset carries its sweep's choices as [overrides.*]
        tuned = load_config(path, overrides)
    for seed in seeds:
        for algo in resweep or s.algorithms:
            run_dir = RUNS / name / f"seed-{seed}" / algo
            cfg = single_config(tuned, algo, seed)
            stale = _stale(run_dir, cfg)
            if stale:
                print(f"{time.strftime('%H:%M:%S')} {name} seed {seed} {algo}: run at {stale}: "
                      "started again", flush=True)
                shutil.rmtree(run_dir)
            run_once(run_dir, cfg, f"{name} seed {seed} {algo}")


def run_once(run_dir: Path, cfg: Config, label: str) -> None:
    """Run `cfg` into `run_dir`, timed (`timed`), unless it finished there already; a run
    stopped half way continues."""
    done = read_metrics(run_dir / "metrics.jsonl")
    if len(done) >= cfg.rounds and (run_dir / "summary.md").exists():
        return
    print(f"{time.strftime('%H:%M:%S')} {label}", flush=True)
    timed(run_dir, run_experiment, cfg, run_dir, resume=(run_dir / "config.toml").exists(),
          quiet=True)


def resweep_setting(name: str, algorithms: tuple[str, ...], out: Path,
                    at: tuple[str, ...]) -> Config:
    """Sweep `algorithms` of a setting again (into `RUNS/name/resweep`, resumable) and write
    their choices into its committed `tuned.toml`; the other algorithms keep theirs, and
    their committed runs stay in the report. For when the sweep's rule or an algorithm
    changed after the setting ran (issue 24: SCAFFOLD and Fed2 fixed, points scored over
    the run's rounds) and sweeping every algorithm again costs hours."""
    s = SETTINGS[name]
    committed = out / name / "tuned.toml"
    if not committed.exists():
        raise SystemExit(f"{name}: --resweep needs the setting's committed {committed}; "
                         "sweep it whole first")
    unknown = sorted(set(algorithms) - set(s.algorithms))
    if unknown:
        raise SystemExit(f"{name}: --resweep {' '.join(unknown)}: not in this setting "
                         f"({', '.join(s.algorithms)})")
    path, overrides = base_config(name, (*at, f"algorithms={json.dumps(list(algorithms))}"))
    print(f"{time.strftime('%H:%M:%S')} {name}: sweep of {', '.join(algorithms)} again",
          flush=True)
    where = RUNS / name / "resweep"
    found = timed(where, run_sweep, path, overrides, [("train.lr", list(s.lrs))],
                   s.sweep_rounds, where, quiet=False, extend=2).tuned
    data = load_config(str(committed), list(at)).to_dict()
    for algo in algorithms:
        data["overrides"].pop(algo, None)
        if algo in found.overrides:
            data["overrides"][algo] = found.overrides[algo]
    tuned = config_from_dict(data)
    committed.write_text(
        "# Written by benchmarks/compare.py: the sweep's choices (sweep.md), those of\n"
        f"# {', '.join(algorithms)} from their sweep again (resweep.md).\n" + tuned.to_toml())
    return tuned


def timed(where: Path, fn, *args, **kwargs):
    """Call fn, adding the wall-clock seconds it took to `where/wall_s.txt` (a resumed run
    adds to what its earlier sessions spent)."""
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        record = where / "wall_s.txt"
        spent = float(record.read_text()) if record.exists() else 0.0
        where.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{spent + time.perf_counter() - start:.1f}\n")


def setting_wall(out: Path, name: str) -> tuple[float, float, bool]:
    """Wall-clock seconds of a setting's sweep and of its runs on this machine, and whether
    part of it is estimated: runs from before compare.py timed them count from their first
    file to their summary's modification time. Kept in `out/name/wall.json` for when the run
    directories are gone."""
    kept = out / name / "wall.json"
    # After a sweep again the run directories hold only its algorithms: keep the first count.
    if kept.exists() and (not (RUNS / name).exists() or (out / name / "resweep.json").exists()):
        record = json.loads(kept.read_text())
        return record["sweep_s"], record["runs_s"], record["estimated"]
    sweep = runs = 0.0
    estimated = False
    for summary in (RUNS / name).glob("**/summary.md"):
        if "sweep" in summary.relative_to(RUNS / name).parts:
            continue
        spent, guessed = _run_wall(summary.parent)
        runs += spent
        estimated |= guessed
    record = RUNS / name / "sweep" / "wall_s.txt"
    if record.exists():
        sweep = float(record.read_text())
    else:
        for summary in (RUNS / name / "sweep").glob("point-*/summary.md"):
            spent, _ = _run_wall(summary.parent)
            sweep += spent
            estimated = True
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps({"sweep_s": round(sweep, 1), "runs_s": round(runs, 1),
                                "estimated": estimated}) + "\n")
    return sweep, runs, estimated


def _run_wall(run_dir: Path) -> tuple[float, bool]:
    record = run_dir / "wall_s.txt"
    if record.exists():
        return float(record.read_text()), False
    first = min((run_dir / f).stat().st_mtime for f in ("config.toml", "partition.json"))
    return (run_dir / "summary.md").stat().st_mtime - first, True


def _stale(run_dir: Path, cfg: Config) -> str | None:
    """What makes the run in `run_dir` another than `cfg`'s, if anything: another learning
    rate (a sweep whose grid grew chose another one since) or another precision."""
    saved = run_dir / "config.toml"
    if not saved.exists():
        return None
    ran = load_config(str(saved))
    if ran.train.lr != cfg.train.lr:
        return f"another learning rate than the sweep's choice {cfg.train.lr}"
    wanted = resolve_precision(cfg.precision, resolve_device(cfg.device))
    if ran.precision != wanted:
        return f"another precision ({ran.precision}) than {wanted}"
    return None


def single_config(tuned: Config, algo: str, seed: int) -> Config:
    """The config of one run: `algo` alone at `seed`, with its tuned settings applied."""
    data = tuned.for_algorithm(algo).to_dict()
    data.update(algorithms=[algo], seed=seed, overrides={})
    return config_from_dict(data)


def mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """"mean ± std" of the values (times `scale`) that are numbers, "-" if none are."""
    values = [scale * v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def collect(out: Path, name: str) -> dict[str, dict[int, list[dict]]]:
    """Metric lines per algorithm and seed of a setting: of its finished runs, and for an
    algorithm without any there (run directories gone, or not swept again), the copies the
    report keeps in `out/name/metrics/`."""
    def read(files: list[tuple[int, Path]]) -> dict[str, dict[int, list[dict]]]:
        found: dict[str, dict[int, list[dict]]] = {}
        for seed, path in files:
            for m in read_metrics(path):
                found.setdefault(m["algorithm"], {}).setdefault(seed, []).append(m)
        return found

    kept = read([(int(p.stem.split("-")[1]), p)
                 for p in sorted((out / name).glob("metrics/seed-*"))])
    fresh = read([(int(p.relative_to(RUNS / name).parts[0].split("-")[1]),
                   p.parent / "metrics.jsonl")
                  for p in sorted((RUNS / name).glob("seed-*/**/summary.md"))])
    return {a: fresh.get(a) or kept[a] for a in {**kept, **fresh}}


def _run_config(out: Path, name: str, algo: str) -> Config:
    """The config an algorithm of the setting ran with (its own run directory's, or the
    shared one of a run of several algorithms; where they are gone, the committed sweep's
    tuned config or the preset)."""
    for path in sorted((RUNS / name).glob("seed-*/**/config.toml")):
        cfg = load_config(path)
        if algo in cfg.algorithms:
            return cfg
    if (out / name / "tuned.toml").exists():
        return load_config(str(out / name / "tuned.toml"))
    return load_config(*base_config(name))


def summary_row(algo: str, per_seed: dict[int, list[dict]], cfg: Config) -> dict:
    """One results-table row of an algorithm's runs (metric lines per seed) made with `cfg`:
    mean ± std over the seeds of best and last accuracies, rounds to the target per seed,
    costs per device and round, and health."""
    first = next(iter(per_seed.values()))

    def pick(key: str, how) -> list[float]:
        return [how([m[key] for m in lines if m[key] is not None] or [math.nan])
                for lines in per_seed.values()]

    target = cfg.target_acc
    key = "global_acc" if first[-1]["global_acc"] is not None else "context_acc"
    reached = [next((m["round"] for m in lines if m[key] is not None and m[key] >= target),
                    None) for lines in per_seed.values()]
    return {
        "algorithm": algo, "shown": "cad (paper)" if algo == "cad" else algo,
        "family": ALGORITHMS[algo].family,
        "judged_by": ALGORITHMS[algo].judged_by,
        "lr": cfg.for_algorithm(algo).train.lr,
        "seeds": sorted(per_seed), "rounds": cfg.rounds,
        "best_global": mean_std(pick("global_acc", max)),
        "last_global": mean_std(pick("global_acc", lambda v: v[-1])),
        "best_context": mean_std(pick("context_acc", max)),
        "last_context": mean_std(pick("context_acc", lambda v: v[-1])),
        "last_context_value": statistics.mean(pick("context_acc", lambda v: v[-1])),
        "last_global_value": statistics.mean(pick("global_acc", lambda v: v[-1])),
        "target": f"{target} ({key.split('_')[0]})",
        "reached_rounds": reached,
        "reached": ", ".join("-" if r is None else str(r) for r in reached),
        "mb": statistics.mean((m["bytes_down"] + m["bytes_up"]) / 1e6
                              for lines in per_seed.values() for m in lines),
        "gflops": statistics.mean(m["device_train_flops"] / 1e9
                                  for lines in per_seed.values() for m in lines),
        "wall": statistics.mean(sum(m["wall_s"] for m in lines) / len(lines)
                                for lines in per_seed.values()),
        "health": "; ".join(f"seed {seed}: {h}" for seed, lines in per_seed.items()
                            if (h := health(lines)) != "ok") or "ok",
    }


def variant_row(out: Path, name: str) -> dict | None:
    """The row of CAD's default variant in the setting (the one that won on validation across
    settings: benchmarks/cad_variants.py's runs, kept in docs/results/cad-variants), when it
    is not plain CAD and ran there; None otherwise."""
    if not VARIANTS_BEST.exists():
        return None
    variant = json.loads(VARIANTS_BEST.read_text())["default"]
    kept = VARIANTS_BEST.parent / name / variant
    if variant == "paper" or not (kept / "sweep.json").exists():
        return None
    per_seed = {int(p.stem.split("-")[1]): read_metrics(p) for p in sorted(kept.glob("seed-*"))}
    sweep = json.loads((kept / "sweep.json").read_text())
    row = summary_row("cad", per_seed, _run_config(out, name, "cad"))
    row.update(shown=f"cad, {variant} (cadfl's default)",
               lr=sweep["points"][sweep["best"]["cad"]][0])
    return row


def table(out: Path, name: str) -> tuple[str, list[dict]]:
    """The setting's results table (markdown) and its rows: plain CAD's (the paper's method,
    `cad.variant = "paper"`) and, beside it, that of cadfl's default variant of CAD."""
    runs = collect(out, name)
    rows = [summary_row(algo, runs[algo], _run_config(out, name, algo))
            for algo in SETTINGS[name].algorithms if algo in runs]
    extra = variant_row(out, name) if rows else None
    if extra is not None:
        rows.insert(1, extra)
    head = ("| algorithm | family | judged by | tuned lr | best global | last global | "
            "best context | last context | round reaching target | MB/device/round | "
            "device GFLOPs/round | train s/round | health |\n|" + "---|" * 13)
    body = "\n".join(
        f"| {r['shown']} | {r['family']} | {r['judged_by']} | {r['lr']:g} | "
        f"{r['best_global']} | {r['last_global']} | {r['best_context']} | "
        f"{r['last_context']} | {r['reached']} | {r['mb']:.2f} | {r['gflops']:.2f} | "
        f"{r['wall']:.1f} | {r['health']} |" for r in rows)
    return f"{head}\n{body}", rows


def plots(out: Path, name: str) -> None:
    """curves.png (mean over seeds), cost.png (accuracy vs cumulative MB and GFLOPs) and
    pareto.png (last context accuracy vs GFLOPs and MB per round) of a setting."""
    runs = collect(out, name)
    if not runs:
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for algo, per_seed in runs.items():
        for ax, key in zip(axes[:2], ("global_acc", "context_acc"), strict=True):
            series = _mean_series(per_seed, key)
            if series:
                ax.plot(*zip(*series, strict=True), label=algo, color=_color(algo))
        key = "global_acc" if ALGORITHMS[algo].judged_by != "context_acc" else "context_acc"
        for ax, cost in zip(axes[2:], ("bytes", "flops"), strict=True):
            lines = next(iter(per_seed.values()))
            total, pts = 0.0, []
            for m in lines:
                total += ((m["bytes_down"] + m["bytes_up"]) / 1e6 if cost == "bytes"
                          else m["device_train_flops"] / 1e9)
                if m[key] is not None:
                    pts.append((total, m[key]))
            if pts and total > 0:
                ax.plot(*zip(*pts, strict=True), label=algo, color=_color(algo))
    titles = [("global accuracy", "round"), ("context accuracy", "round"),
              ("accuracy (judged metric) vs communication", "cumulative MB per device"),
              ("accuracy (judged metric) vs device compute", "cumulative GFLOPs per device")]
    for ax, (t, xl) in zip(axes, titles, strict=True):
        ax.set(title=t, xlabel=xl, ylabel="accuracy")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{name}: {SETTINGS[name].what}", fontsize=9)
    fig.tight_layout()
    (out / name).mkdir(parents=True, exist_ok=True)
    fig.savefig(out / name / "curves.png", dpi=100)
    plt.close(fig)
    _, rows = table(out, name)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "gflops", "device training GFLOPs per round"),
                           (axes[1], "mb", "MB per device per round")):
        for r in rows:
            ax.scatter(r[key], r["last_context_value"], color=_color(r["algorithm"]))
            ax.annotate(r["algorithm"], (r[key], r["last_context_value"]), fontsize=8)
        ax.set(xlabel=label, ylabel="last context accuracy (mean over seeds)",
               title="cheaper and better: up and to the left")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: context accuracy against device cost", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / name / "pareto.png", dpi=100)
    plt.close(fig)


def _color(algo: str):
    """One colour per algorithm, the same in every plot (12 algorithms: tab20)."""
    return plt.cm.tab20(sorted(ALGORITHMS).index(algo) % 20)


def _mean_series(per_seed: dict[int, list[dict]], key: str) -> list[tuple[int, float]]:
    by_round: dict[int, list[float]] = {}
    for lines in per_seed.values():
        for m in lines:
            if m[key] is not None:
                by_round.setdefault(m["round"], []).append(m[key])
    return sorted((r, statistics.mean(v)) for r, v in by_round.items())


def report(out: Path, names: list[str], readme: bool) -> None:
    """results.md with one table per setting, the plots, and (with `readme`) the README
    block regenerated from the same tables."""
    parts = ["# CAD against every peer, tuned on validation data\n",
             "Written by `benchmarks/compare.py`. Each algorithm's learning rate is the best "
             "of its sweep on validation data (seed 0, a share of every device's images held "
             "out of training; see each setting's `sweep.md` and `tuned.toml`; the digits "
             "setting was tuned by `cadfl sweep` into its preset). The runs then train with "
             "the tuned config (a sweep's keeps the validation share out of training; the "
             "digits preset trains on all images) and are scored on the test images. "
             "Mean ± std over the seeds listed; 'round reaching target' per seed. Every "
             "run's metric lines are in its setting's `metrics/` folder.\n"]
    for name in names:
        tab, rows = table(out, name)
        if not rows:
            parts.append(f"### {name}\n\nNot run yet ({SETTINGS[name].what}).\n")
            continue
        plots(out, name)
        for kept in ("sweep.md", "heatmap.png", "tuned.toml"):
            source = RUNS / name / "sweep" / kept
            if source.exists():
                (out / name / kept).write_bytes(source.read_bytes())
        again = RUNS / name / "resweep"
        if (again / "sweep.json").exists():
            (out / name / "resweep.md").write_text(
                (again / "sweep.md").read_text().replace("](heatmap.png)",
                                                         "](resweep-heatmap.png)"))
            (out / name / "resweep-heatmap.png").write_bytes((again / "heatmap.png").read_bytes())
            record = json.loads((again / "sweep.json").read_text())
            (out / name / "resweep.json").write_text(json.dumps({
                "algorithms": list(record["scores"]), "rounds": record["rounds"],
                "sweep_s": float((again / "wall_s.txt").read_text()),
                "runs_s": round(sum(_run_wall(p.parent)[0] for a in record["scores"]
                                    for p in (RUNS / name).glob(f"seed-*/{a}/summary.md")), 1),
                "precision": sorted({m.get("precision", "fp32") for a in record["scores"]
                                     for lines in collect(out, name).get(a, {}).values()
                                     for m in lines}),
            }, indent=1) + "\n")
        # The metric lines behind the table (run directories are not committed).
        (out / name / "metrics").mkdir(exist_ok=True)
        for source in sorted((RUNS / name).glob("seed-*/**/metrics.jsonl")):
            run = "-".join(source.relative_to(RUNS / name).parent.parts)  # seed-0-cad
            (out / name / "metrics" / f"{run}.jsonl").write_bytes(source.read_bytes())
        path, overrides = base_config(name)
        sweep_s, runs_s, estimated = setting_wall(out, name)
        precisions = sorted({m.get("precision", "fp32") for seeds in collect(out, name).values()
                             for lines in seeds.values() for m in lines})
        parts.append(f"### {name}\n\n{SETTINGS[name].what}; preset `configs/"
                     f"{SETTINGS[name].preset}` with `{' '.join(overrides)}`; seeds "
                     f"{sorted({s for r in rows for s in r['seeds']})}; precision "
                     f"{', '.join(precisions)}. Wall time on this "
                     f"2-core CPU: {f'sweep {sweep_s / 60:.0f} min, ' if sweep_s else ''}runs "
                     f"{runs_s / 60:.0f} min"
                     f"{' (estimated from file times)' if estimated else ''}."
                     f"{_resweep_note(out, name)}\n\n{tab}\n\n"
                     f"![curves]({name}/curves.png)\n\n![pareto]({name}/pareto.png)\n")
    text = "\n".join(parts)
    (out / "results.md").write_text(text)
    if readme:
        # The same tables in the README and in docs/results.md, between the markers; the
        # image links are relative to the results folder.
        for doc in (ROOT / "README.md", ROOT / "docs" / "results.md"):
            link = out.relative_to(doc.parent).as_posix()
            block = "\n".join(parts[2:]).replace("](", f"]({link}/")
            _replace_block(doc, block)


def _resweep_note(out: Path, name: str) -> str:
    """What a sweep again of some algorithms changed in a setting ('' if none)."""
    record = out / name / "resweep.json"
    if not record.exists():
        return ""
    r = json.loads(record.read_text())
    return (f" {', '.join(r['algorithms'])} were swept again ([resweep.md]({name}/resweep.md): "
            f"every point over all {r['rounds']} rounds, unstable points not chosen, the grid "
            f"grown past a chosen edge) and run again at {', '.join(r['precision'])}: sweep "
            f"{r['sweep_s'] / 60:.0f} min, runs "
            f"{r['runs_s'] / 60:.0f} min; the other rows keep the first sweep "
            f"([sweep.md]({name}/sweep.md)) and runs.")


def side_by_side(base: Path, out: Path, name: str) -> str:
    """A markdown table of setting `name`: each algorithm's last accuracies and training
    seconds per round in the report folder `base` against those in `out` (each mean ± std
    over its seeds), whether the last accuracies of `out` lie within the spread of `base`'s
    seeds (min to max), and the speed-up of the training time per round.

    With two seeds a per-seed check would ask more of `out` than `base`'s own seeds meet,
    so the test is whether each mean of `out` lies within `base`'s seed range, and the
    largest change of a mean is shown beside it (in accuracy points)."""
    global RUNS
    runs, RUNS = RUNS, ROOT / "runs" / base.name
    try:
        before = collect(base, name)
    finally:
        RUNS = runs
    after = collect(out, name)

    def last(lines: list[dict], key: str) -> float:
        return [m[key] for m in lines if m[key] is not None][-1]

    def label(per_seed: dict[int, list[dict]]) -> str:
        return ", ".join(sorted({m.get("precision", "fp32") for lines in per_seed.values()
                                 for m in lines}))

    rows = []
    for algo in SETTINGS[name].algorithms:
        if algo not in before or algo not in after:
            continue
        cells, inside, change = [], [], []
        for key in ("global_acc", "context_acc"):
            if all(m[key] is None for lines in before[algo].values() for m in lines):
                cells += ["-", "-"]  # a personalised algorithm has no global model
                continue
            a = [last(v, key) for v in before[algo].values()]
            b = [last(v, key) for v in after[algo].values()]
            cells += [mean_std(a), mean_std(b)]
            inside.append(min(a) <= statistics.mean(b) <= max(a))
            change.append(100 * (statistics.mean(b) - statistics.mean(a)))
        wall = [statistics.mean(statistics.mean(m["wall_s"] for m in lines)
                                for lines in found[algo].values()) for found in (before, after)]
        worst = max(change, key=abs)
        rows.append(f"| {algo} | {' | '.join(cells)} | {'yes' if all(inside) else 'no'} | "
                    f"{worst:+.1f} | "
                    f"{wall[0]:.2f} | {wall[1]:.2f} | {wall[0] / wall[1]:.2f}x |")
    if not rows:
        return f"### {name}\n\nNo runs in both {base} and {out}.\n"
    a, b = label(before[next(iter(before))]), label(after[next(iter(after))])
    return (f"### {name}: {a} ({base.name}) against {b} ({out.name})\n\n"
            f"| algorithm | last global {a} | last global {b} | last context {a} | "
            f"last context {b} | {b} mean within {a}'s seed range | largest change (points) | "
            f"train s/round {a} | train s/round {b} | speed-up |\n|" + "---|" * 10 + "\n"
            + "\n".join(rows) + "\n")


def _replace_block(doc: Path, block: str, marker: str = "compare") -> None:
    """Put `block` between the `marker` markers of `doc` (nothing if it has none)."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = doc.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        doc.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "compare")
    parser.add_argument("--plan", action="store_true", help="time rounds, estimate cost")
    parser.add_argument("--plan-rounds", type=int, default=1, help="rounds --plan times")
    parser.add_argument("--report-only", action="store_true", help="only write the report")
    parser.add_argument("--readme", action="store_true", help="regenerate the README block")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="how devices compute (default auto: bf16 where it is fast)")
    parser.add_argument("--resweep", nargs="+", default=(), choices=PEERS, metavar="ALGO",
                        help="sweep only these algorithms again and run them (each setting "
                             "needs its committed tuned.toml; the other rows keep theirs)")
    parser.add_argument("--side-by-side", type=Path, metavar="BASE",
                        help="also write the settings' runs against those of the report folder "
                             "BASE into docs/results.md (e.g. BASE at fp32, OUT at bf16)")
    args = parser.parse_args()
    global RUNS
    RUNS = ROOT / "runs" / args.out.name  # runs/compare for the default OUT
    if args.plan:
        plan(args.settings, len(args.seeds), args.precision, args.plan_rounds)
        return
    if not args.report_only:
        for name in args.settings:
            run_setting(name, args.seeds, args.out, args.precision, tuple(args.resweep))
            report(args.out, args.settings, args.readme)
    report(args.out, args.settings, args.readme)
    if args.side_by_side:
        block = "\n".join(side_by_side(args.side_by_side, args.out, name)
                          for name in args.settings)
        _replace_block(ROOT / "docs" / "results.md", block, "side-by-side")


if __name__ == "__main__":
    main()
