"""Context dynamics on digits: classes that appear late (New Class), and the Others output.

1. New Class: classes 8 and 9 are removed from every device in round 1 and appear on devices
   0-4 in round `--new-round`. The global model starts with classes 0-7; CAD gives 8 and 9
   paths of their own, FedAvg grows its classifier by two logits. Curves: accuracy of the
   global model on the old classes (mean over 0-7) and on the new ones (8, 9), per round.
2. Others: CAD with `cad.others = true` and `partition.other_fraction`, each device holding
   out-of-context images (that share of its own count) labelled "Others". Curves: the share of
   out-of-context test images a device answers "Others" (rejection), its in-context accuracy
   with "Others" among the answers, and its accuracy within its classes alone.

Writes `newclass.png`, `others.png` and `results.md` (tables, mean ± std over seeds, and the
command) into `--out`; run directories go to `--out/runs/` (git-ignored).

    .venv/bin/python benchmarks/context_dynamics.py --seeds 0 1 2 --out docs/context
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cadfl.config import load_config  # noqa: E402
from cadfl.engine.run import run_experiment  # noqa: E402

OLD, NEW = list(range(8)), [8, 9]


def new_class_config(seed: int, rounds: int, new_round: int):
    """Digits, 10 devices x 5 classes; 8 and 9 unseen until `new_round` on devices 0-4."""
    return load_config(None, [
        f"seed={seed}", f"rounds={rounds}", 'algorithms=["cad", "fedavg"]',
        f"context=[{{round=1, remove=[8, 9]}}, "
        f"{{round={new_round}, devices=[0, 1, 2, 3, 4], add=[8, 9]}}]"])


def others_config(seed: int, rounds: int, fraction: float):
    """Digits, 10 devices x 5 classes, CAD with Others trained on `fraction` out-of-context
    images per device."""
    return load_config(None, [f"seed={seed}", f"rounds={rounds}", 'algorithms=["cad"]',
                              "cad.others=true", f"partition.other_fraction={fraction}"])


def curve(lines: list[dict], algo: str, value) -> list[float]:
    """`value(line)` for each round of `algo` (every round is evaluated here)."""
    return [value(m) for m in lines if m["algorithm"] == algo]


def mean_acc(classes: list[int]):
    """Mean per-class accuracy of the global model over `classes`."""
    return lambda m: statistics.mean(m["class_acc"][c] for c in classes)


def spread(values: list[float]) -> str:
    """mean ± std (or the single value)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def band(ax, runs: list[list[float]], label: str, **style) -> None:
    """Mean over seeds, with a min..max band."""
    xs = range(1, len(runs[0]) + 1)
    cols = list(zip(*runs, strict=True))
    line, = ax.plot(xs, [statistics.mean(c) for c in cols], label=label, **style)
    if len(runs) > 1:
        ax.fill_between(xs, [min(c) for c in cols], [max(c) for c in cols],
                        color=line.get_color(), alpha=0.15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--new-round", type=int, default=15,
                        help="round in which classes 8 and 9 appear (default 15)")
    parser.add_argument("--other-fraction", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=Path("results/context"))
    args = parser.parse_args(argv)
    if not 1 < args.new_round <= args.rounds:
        parser.error(f"--new-round must be in 2..{args.rounds}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    new, others = [], []
    for seed in args.seeds:
        print(f"seed {seed}: new class ...", flush=True)
        new.append(run_experiment(new_class_config(seed, args.rounds, args.new_round),
                                  runs / f"newclass-seed{seed}", quiet=True))
        print(f"seed {seed}: others ...", flush=True)
        others.append(run_experiment(others_config(seed, args.rounds, args.other_fraction),
                                     runs / f"others-seed{seed}", quiet=True))

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, classes, title in ((axes[0], OLD, "old classes 0-7"), (axes[1], NEW,
                                                                    "new classes 8, 9")):
        for algo, colour in (("cad", "C0"), ("fedavg", "C1")):
            band(ax, [curve(lines, algo, mean_acc(classes)) for lines in new],
                 "FedAvg (grown head)" if algo == "fedavg" else "CAD (new paths)", color=colour)
        ax.axvline(args.new_round, color="grey", ls="--", lw=1)
        ax.set(title=f"global model, {title}", xlabel="round", ylabel="test accuracy",
               ylim=(0, 1))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out / "newclass.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label in (("others_reject", "out-of-context images answered 'Others'"),
                       ("others_in_acc", "in-context accuracy, 'Others' among the answers"),
                       ("context_acc", "in-context accuracy within the device's classes")):
        band(ax, [curve(lines, "cad", lambda m, k=key: m[k]) for lines in others], label)
    ax.axhline(1 / 6, color="grey", ls=":", lw=1, label="chance rejection (1 in 6 answers)")
    ax.set(title=f"CAD with Others (other_fraction {args.other_fraction})", xlabel="round",
           ylabel="share of test images", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "others.png", dpi=110)
    plt.close(fig)

    r0 = args.new_round - 1  # index of the last round before the new classes
    rows = ["| algorithm | old classes, round before | old, lowest after | old, last | "
            "new classes, 5 rounds after | new, last | global, last |",
            "|---|---|---|---|---|---|---|"]
    for algo in ("cad", "fedavg"):
        old = [curve(lines, algo, mean_acc(OLD)) for lines in new]
        fresh = [curve(lines, algo, mean_acc(NEW)) for lines in new]
        glob = [curve(lines, algo, lambda m: m["global_acc"]) for lines in new]
        rows.append(f"| {algo} | {spread([o[r0 - 1] for o in old])} | "
                    f"{spread([min(o[r0:]) for o in old])} | {spread([o[-1] for o in old])} | "
                    f"{spread([f[r0 + 4] for f in fresh])} | {spread([f[-1] for f in fresh])} "
                    f"| {spread([g[-1] for g in glob])} |")
    last = [lines[-1] for lines in others]
    command = "python benchmarks/context_dynamics.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    (args.out / "results.md").write_text(
        f"# Context dynamics on digits\n\nProduced by `{command}`; digits, 10 devices x 5 "
        f"classes, {args.rounds} rounds, seeds {args.seeds} (mean ± std over seeds).\n\n"
        f"## New Class (classes 8 and 9 from round {args.new_round} on devices 0-4)\n\n"
        + "\n".join(rows) + "\n\n![new class](newclass.png)\n\n"
        f"## Others (other_fraction {args.other_fraction}), round {args.rounds}\n\n"
        "| out-of-context rejected | in-context accuracy with Others | "
        "in-context accuracy within own classes |\n|---|---|---|\n"
        f"| {spread([m['others_reject'] for m in last])} | "
        f"{spread([m['others_in_acc'] for m in last])} | "
        f"{spread([m['context_acc'] for m in last])} |\n\n![others](others.png)\n")
    print(f"wrote {args.out}/results.md, newclass.png, others.png")


if __name__ == "__main__":
    main()
