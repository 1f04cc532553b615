"""Published results reproduced: one setting per paper, each following the authors' own setup
as their code has it (the file is cited per setting and per algorithm), run with cadfl.

    .venv/bin/python benchmarks/reproduce.py --list                 # settings and their setups
    nohup .venv/bin/python benchmarks/reproduce.py --settings fedrep-100x2 \\
        > runs/reproduce.log 2>&1 &                                  # resumable: run it again
    .venv/bin/python benchmarks/reproduce.py --report-only          # docs/results/reproductions.md

Every run lives in `runs/reproduce/SETTING/seed-S/ALGO/` (not committed); a run stopped half
way continues where it stopped. The report copies each run's metric lines next to it
(`docs/results/reproductions/SETTING/`) and is rebuilt from those copies on a clean checkout.

The number compared with a paper is the one the paper's code prints: for FedRep, the mean
over the evaluations of the final 10 rounds of the devices' accuracy on the test images of
their own classes, the argmax taken over all the model's outputs (`context_open_acc`;
lgcollins/FedRep models/test.py `test_img_local_all`). cadfl's own `context_acc`, the argmax
among the device's classes only, is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import mean_std, run_once  # noqa: E402

from cadfl.config import load_config  # noqa: E402
from cadfl.engine.run import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "reproduce"
OUT = ROOT / "docs" / "results" / "reproductions"
FEDREP = "lgcollins/FedRep@d82e629"
CHEAPEST_FIRST = ["fedavg", "cad", "local", "fedrep", "fedper"]  # FedRep's settings, measured


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of a setting: its overrides on the setting's, and where they come from."""

    overrides: tuple[str, ...]
    source: str
    last_rounds: int | None = None  # its own span of final rounds scored (else the setting's)


@dataclass(frozen=True)
class Setting:
    """One published table column: the paper, the setup shared by its algorithms (overrides
    of a cadfl preset), each algorithm's own, and the published numbers where read."""

    paper: str
    column: str
    preset: str
    common: tuple[str, ...]
    algorithms: dict[str, Algorithm]
    setup: str
    published: dict[str, float] = field(default_factory=dict)
    published_from: str = ""
    last_rounds: int = 10  # the score is the mean of the evaluations in these final rounds
    differences: tuple[str, ...] = ()  # where ours departs from the authors' code, and why


# The FedRep paper's CIFAR-10 setup (scripts/FedRep_cifar10_2shards.sh, utils/options.py,
# models/Update.py LocalUpdate, utils/train_utils.py, utils/sampling.py noniid): 100 users,
# 10% of them per round, each with 2 (or 5) classes and 500 training images; SGD lr 0.01,
# momentum 0.5, weight decay 1e-4, batch 10; random crop (4) and flip; 100 rounds.
FEDREP_COMMON = (
    'model="cnn64"', "devices=100", "sample=10", "data_fraction=1.0", "rounds=100",
    "train.batch_size=10", "train.lr=0.01", "train.momentum=0.5", "train.weight_decay=0.0001",
    "train.augment=true", "validation_fraction=0.0", "overrides={}",
    # Scored every 2nd round on 20% of the test images (400 of a device's 2 classes): every
    # device's own model, 50 times per run, is most of a run's time otherwise.
    "eval_every=2", "test_fraction=0.2")
FEDREP_SETUP = (
    "CIFAR-10, 100 devices x {k} classes, each class held by {h} devices (500 training "
    "images per device, as utils/sampling.py `noniid`), 10 devices per round, 100 rounds, "
    "FedRep's CNN (`cnn64`: conv 5x5 64 - pool - conv 5x5 64 - pool - fc 1600-120-64-10), "
    "SGD lr 0.01, momentum 0.5, weight decay 1e-4, batch 10, random crop 4 + flip. Scored on "
    "the test images of each device's own classes (20% of the test set, every 2nd round).")
PUBLISHED_NOT_READ = (
    "not read: the paper's text (arXiv 2102.07078, Table 1) was not reachable from this "
    "machine (its stored copies hold only the abstract; the authors' README and scripts, and "
    "the Flower baseline's README, quote no numbers)")


FEDREP_DIFFERENCES = (
    "Normalisation by CIFAR-10's own mean and std (theirs: ImageNet's, utils/train_utils.py).",
    "Weight decay on every parameter (theirs: weights only, models/Update.py).",
    "Scored on 20% of the test images of a device's classes (400) every 2nd round, the final "
    "10 rounds' 5 evaluations averaged (theirs: the user's own 100 test images every one of "
    "the last 10 rounds, main_fedrep.py); the cost of scoring 100 own models every round.",
    "FedAvg is scored with its global model; the paper's code also fine-tunes every user's "
    "head for 10 epochs in an extra final round (FedAvg+FT), not run here.",
    "Local trains 10 rounds of 1 epoch (SGD's momentum restarts each round) where "
    "main_local.py trains 10 epochs in one go.",
    "One seed (theirs: 5 runs) and bf16 autocast on the CPU (theirs: fp32 on a GPU).",
)


def _fedrep_setting(k: int, fedrep_epochs: tuple[int, int], script: str) -> Setting:
    head, body = fedrep_epochs
    return Setting(
        paper="FedRep (Collins et al., ICML 2021)", column=f"CIFAR-10 (100, {k})",
        preset="cifar10-flcnn-xdev.toml", common=(*FEDREP_COMMON, f"partition.k={k}"),
        algorithms={
            "fedrep": Algorithm((f"train.epochs={body}", f"fedrep.head_epochs={head}"),
                                f"{FEDREP} {script}: --local_ep {head + body} "
                                f"--local_rep_ep {body} ({head} head + {body} body epochs)"),
            "fedper": Algorithm(("train.epochs=5",),
                                f"{FEDREP} main_fedrep.py --alg fedper; no script sets its "
                                "epochs, so utils/options.py's default --local_ep 5"),
            "fedavg": Algorithm(("train.epochs=1",),
                                f"{FEDREP} scripts/FedAvg_cifar10_{k}shards.sh: --local_ep 1; "
                                "scored with its global model"),
            "local": Algorithm(("train.epochs=1", "sample=100", "rounds=10", "eval_every=1",
                                "train.weight_decay=0.0"),
                               f"{FEDREP} main_local.py: each user alone for --epochs "
                               "(utils/options.py default 10) epochs, momentum 0.5, no weight "
                               "decay, scored once after; here 10 rounds of 1 epoch, every "
                               "device each round, the last scored", last_rounds=1),
            "cad": Algorithm(("train.epochs=1",),
                             "not in the paper: cadfl's CAD given FedAvg's local work (1 "
                             "epoch), the preset's depth 1 (the last conv layer in class "
                             "paths)"),
        },
        setup=FEDREP_SETUP.format(k=k, h=100 * k // 10),
        published_from=PUBLISHED_NOT_READ, differences=FEDREP_DIFFERENCES)


SETTINGS = {
    "fedrep-100x2": _fedrep_setting(2, (10, 1), "scripts/FedRep_cifar10_2shards.sh"),
    "fedrep-100x5": _fedrep_setting(5, (10, 5), "scripts/FedRep_cifar10_5shards.sh"),
}


def config_of(name: str, algo: str, seed: int):
    """The cadfl config of one algorithm of a setting at `seed`."""
    s = SETTINGS[name]
    return load_config(ROOT / "configs" / s.preset,
                       [*s.common, *s.algorithms[algo].overrides, f'algorithms=["{algo}"]',
                        f"seed={seed}"])


def run_setting(name: str, seeds: list[int], algorithms: list[str]) -> None:
    """Every (seed, algorithm) of a setting, each resumable."""
    for seed in seeds:
        for algo in algorithms:
            run_once(RUNS / name / f"seed-{seed}" / algo, config_of(name, algo, seed),
                     f"{name} seed {seed} {algo}")


def collect(name: str) -> dict[str, dict[int, list[dict]]]:
    """Metric lines per algorithm and seed: of finished runs, else the report's copies."""
    found: dict[str, dict[int, list[dict]]] = {}
    for path in sorted((OUT / name).glob("seed-*.jsonl")):
        seed, algo = path.stem.split("-")[1], path.stem.split("-", 2)[2]
        found.setdefault(algo, {})[int(seed)] = read_metrics(path)
    for summary in sorted((RUNS / name).glob("seed-*/*/summary.md")):
        seed = int(summary.parent.parent.name.split("-")[1])
        found.setdefault(summary.parent.name, {})[seed] = read_metrics(
            summary.parent / "metrics.jsonl")
    return found


def final_score(lines: list[dict], key: str, last_rounds: int) -> float:
    """Mean of `key` over the evaluations in the final `last_rounds` rounds."""
    end = max(m["round"] for m in lines)
    values = [m[key] for m in lines if m.get(key) is not None and m["round"] > end - last_rounds]
    return statistics.mean(values) if values else math.nan


def _wall(name: str, algo: str, seed: int) -> float | None:
    record = RUNS / name / f"seed-{seed}" / algo / "wall_s.txt"
    kept = OUT / name / "wall.json"
    if record.exists():
        return float(record.read_text())
    walls = json.loads(kept.read_text()) if kept.exists() else {}
    return walls.get(f"seed-{seed}-{algo}")


def report(names: list[str]) -> str:
    """docs/results/reproductions.md: per setting, ours next to the published numbers, with
    the setup, seeds, rounds, sources and wall times; the curves and metric copies beside."""
    parts = ["# Published results reproduced\n",
             "Written by `benchmarks/reproduce.py`. Each setting follows the paper's setup as "
             "the authors' code has it (the file is named per algorithm). Scores are accuracy "
             "in % on the test images of each device's own classes, the mean of the "
             "evaluations in the final 10 rounds (as the paper's code prints it), mean ± std "
             "over the seeds listed. *open*: the argmax over all the model's outputs, the "
             "paper's metric; *within classes*: the argmax among the device's classes only "
             "(cadfl's `context_acc`). The wall time is this machine's, at the precision "
             "listed.\n"]
    for name in names:
        s = SETTINGS[name]
        found = collect(name)
        parts.append(f"## {s.paper}, {s.column} (`{name}`)\n\n{s.setup}\n")
        if not found:
            parts.append("Not run yet.\n")
            continue
        (OUT / name).mkdir(parents=True, exist_ok=True)
        walls = {}
        rows = []
        for algo, a in s.algorithms.items():
            per_seed = found.get(algo, {})
            for seed, lines in per_seed.items():
                (OUT / name / f"seed-{seed}-{algo}.jsonl").write_text(
                    "".join(json.dumps(m) + "\n" for m in lines))
                walls[f"seed-{seed}-{algo}"] = _wall(name, algo, seed)
            if not per_seed:
                rows.append(f"| {algo} | not run yet | | | | | | {a.source} |")
                continue
            cfg = config_of(name, algo, next(iter(per_seed)))
            span = a.last_rounds or s.last_rounds
            opened = [final_score(v, "context_open_acc", span) for v in per_seed.values()]
            within = [final_score(v, "context_acc", span) for v in per_seed.values()]
            published = s.published.get(algo)
            spent = [w for seed in per_seed if (w := walls[f"seed-{seed}-{algo}"]) is not None]
            precision = ", ".join(sorted({m["precision"] for v in per_seed.values() for m in v}))
            rounds = max(m["round"] for v in per_seed.values() for m in v)
            wall = (f"{statistics.mean(spent) / 60:.1f} min, {precision}" if spent else "-")
            rows.append(
                f"| {algo} | {mean_std(opened, 100, 2)} | {mean_std(within, 100, 2)} | "
                f"{'-' if published is None else f'{published:.2f}'} | "
                f"{sorted(per_seed)} | {rounds} of {cfg.rounds} | {wall} | {a.source} |")
        (OUT / name / "wall.json").write_text(json.dumps(walls, indent=1) + "\n")
        _plot(name, found)
        departs = "".join(f"- {d}\n" for d in s.differences)
        parts.append(
            "| algorithm | ours, open | ours, within classes | published | seeds | rounds | "
            "wall per seed | setup from |\n|" + "---|" * 8 + "\n" + "\n".join(rows) + "\n\n"
            f"Published: {s.published_from or 'see the table'}.\n\n"
            + (f"How ours departs from the authors' code:\n\n{departs}\n" if departs else "")
            + f"![curves](reproductions/{name}/curves.png)\n")
    text = "\n".join(parts)
    (OUT.parent / "reproductions.md").write_text(text)
    return text


def _plot(name: str, found: dict[str, dict[int, list[dict]]]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("context_open_acc", "context_acc"), strict=True):
        for algo, per_seed in found.items():
            lines = next(iter(per_seed.values()))
            points = [(m["round"], m[key]) for m in lines if m.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=algo)
        ax.set(title=f"{key} (seed {min(next(iter(found.values())))})", xlabel="round",
               ylabel="accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{SETTINGS[name].paper}, {SETTINGS[name].column}", fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT / name / "curves.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--algorithms", nargs="+", metavar="ALGO",
                        help="only these of each setting (default: all, cheapest first)")
    parser.add_argument("--list", action="store_true", help="print each setting's setup")
    parser.add_argument("--report-only", action="store_true", help="only write the report")
    args = parser.parse_args(argv)
    if args.list:
        for name, s in SETTINGS.items():
            print(f"{name}: {s.paper}, {s.column}\n  {s.setup}")
            for algo, a in s.algorithms.items():
                print(f"  {algo}: {' '.join(a.overrides)}  ({a.source})")
        return
    for name in args.settings:
        unknown = sorted(set(args.algorithms or ()) - set(SETTINGS[name].algorithms))
        if unknown:
            parser.error(f"{name} has no {', '.join(unknown)}; it has "
                         f"{', '.join(SETTINGS[name].algorithms)}")
    if not args.report_only:
        for name in args.settings:
            run_setting(name, args.seeds, args.algorithms or sorted(
                SETTINGS[name].algorithms, key=lambda a: (CHEAPEST_FIRST + [a]).index(a)))
            report(args.settings)
    report(args.settings)


if __name__ == "__main__":
    main()
