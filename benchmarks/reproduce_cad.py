"""Reproduce the CAD paper's experiment: CIFAR-10, AlexNet and VGG-16, 5 classes per device.

Runs CAD, Fed2, FedAvg and FedProx on the presets `configs/cifar10-{alexnet,vgg16}-5cls.toml`
(identical partition and initial weights for every algorithm of a seed), for several seeds,
then writes into the results folder:

- `curves.png`: global and context accuracy against communication rounds, one column per
  model (mean over seeds, band = min..max), drawn like the paper's figure;
- `bytes.png` and `flops.png`: global accuracy against cumulative MB and device FLOPs per device;
- `results.md`: best and last accuracy (mean and spread over seeds), rounds to reach FedAvg's
  best, MB and GFLOP per device per round, and the exact command.

Scales: `cpu` fits 2 CPU cores in about 25 minutes per model and seed, so that two seeds of
both models take under two hours: AlexNet on 10% of the training images (500 per device
per round) for 16 rounds, VGG-16 on 5% (250) for 12 rounds, evaluated every 2 rounds on a stratified
20% of the test images (2,000);
`paper` is the paper's setting (all images, 70 rounds, evaluation every round) for a GPU or a
long run. `--models digits` runs the same comparison on the embedded digits preset.
Run directories are kept under `OUT/runs/` and resumed if interrupted.

    .venv/bin/python benchmarks/reproduce_cad.py --scale cpu --models alexnet vgg16 \\
        --seeds 0 1 --out docs/results/cifar10-cpu
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
from cadfl.engine.run import read_metrics, run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = ["cad", "fed2", "fedavg", "fedprox"]
PRESETS = {"alexnet": "cifar10-alexnet-5cls.toml", "vgg16": "cifar10-vgg16-5cls.toml",
           "digits": "digits-10x5.toml"}
SCALES = {
    "cpu": {"alexnet": ["data_fraction=0.1", "rounds=16", "eval_every=2", "test_fraction=0.2"],
            "vgg16": ["data_fraction=0.05", "rounds=12", "eval_every=2", "test_fraction=0.2"],
            "digits": []},
    "paper": {"alexnet": ["rounds=70"], "vgg16": ["rounds=70"], "digits": []},
    # Seconds, for the tests: that the whole pipeline runs, not what it finds.
    "smoke": {"alexnet": ["data_fraction=0.004", "rounds=2"],
              "vgg16": ["data_fraction=0.004", "rounds=2"], "digits": ["rounds=2"]},
}


def run_one(model: str, seed: int, scale: str, algorithms: list[str], out: Path) -> list[dict]:
    """One seed of one model (resumed if its directory already holds part of the run)."""
    if (out / "config.toml").exists():
        cfg = load_config(out / "config.toml")
        return run_experiment(cfg, out, resume=True, quiet=True)
    overrides = [*SCALES[scale][model], f"seed={seed}", 'cad.variant="paper"',  # as published
                 "algorithms=[" + ",".join(f'"{a}"' for a in algorithms) + "]"]
    cfg = load_config(ROOT / "configs" / PRESETS[model], overrides)
    return run_experiment(cfg, out, quiet=True)


def series(lines: list[dict], algo: str, key: str) -> list[tuple[int, float, float, float]]:
    """(round, cumulative MB, cumulative GFLOP, value) for the evaluated rounds of one run."""
    mb = gflop = 0.0
    out = []
    for m in lines:
        if m["algorithm"] != algo:
            continue
        mb += (m["bytes_down"] + m["bytes_up"]) / 1e6
        gflop += m["device_train_flops"] / 1e9
        if m[key] is not None:
            out.append((m["round"], mb, gflop, m[key]))
    return out


def _spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def plot(runs: dict[str, list[list[dict]]], algorithms: list[str], x: int, xlabel: str,
         keys: list[str], path: Path) -> None:
    """Accuracy (mean over seeds, band min..max) against column `x` of `series`."""
    models = list(runs)
    fig, axes = plt.subplots(len(keys), len(models), figsize=(6 * len(models), 4 * len(keys)),
                             squeeze=False)
    for j, model in enumerate(models):
        for i, key in enumerate(keys):
            ax = axes[i][j]
            for algo in algorithms:
                per_seed = [series(lines, algo, key) for lines in runs[model]]
                if not per_seed or not per_seed[0]:
                    continue
                xs = [p[x] for p in per_seed[0]]
                ys = list(zip(*[[p[3] for p in s] for s in per_seed], strict=True))
                mean = [statistics.mean(v) for v in ys]
                line, = ax.plot(xs, mean, label=algo, marker="o", markersize=3)
                if len(per_seed) > 1:
                    ax.fill_between(xs, [min(v) for v in ys], [max(v) for v in ys],
                                    color=line.get_color(), alpha=0.15)
            ax.set_title(f"{model}: {key.replace('_', ' ')}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(runs: dict[str, list[list[dict]]], algorithms: list[str]) -> str:
    """The results table of `results.md`."""
    rows = ["| model | algorithm | best global | last global | best context | last context | "
            "rounds to FedAvg's best | MB/device/round | GFLOP/device/round |",
            "|---|---|---|---|---|---|---|---|---|"]
    for model, seeds in runs.items():
        fedavg_best = [max(p[3] for p in series(lines, "fedavg", "global_acc"))
                       for lines in seeds] if "fedavg" in algorithms else None
        for algo in algorithms:
            g = [series(lines, algo, "global_acc") for lines in seeds]
            c = [series(lines, algo, "context_acc") for lines in seeds]
            reach = "-"
            if fedavg_best:
                hits = [next((p[0] for p in s if p[3] >= best), None)
                        for s, best in zip(g, fedavg_best, strict=True)]
                reach = ", ".join("never" if h is None else str(h) for h in hits)
            ms = [m for lines in seeds for m in lines if m["algorithm"] == algo]
            mb = statistics.mean((m["bytes_down"] + m["bytes_up"]) / 1e6 for m in ms)
            gf = statistics.mean(m["device_train_flops"] / 1e9 for m in ms)
            rows.append(
                f"| {model} | {algo} | {_spread([max(p[3] for p in s) for s in g])} | "
                f"{_spread([s[-1][3] for s in g])} | {_spread([max(p[3] for p in s) for s in c])}"
                f" | {_spread([s[-1][3] for s in c])} | {reach} | {mb:.2f} | {gf:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--scale", choices=list(SCALES), default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(PRESETS),
                        default=["alexnet", "vgg16"],
                        help="paper presets (CIFAR-10) and the digits demo preset")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=ALGORITHMS)
    parser.add_argument("--out", type=Path, default=Path("results/cifar10"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[list[dict]]] = {}
    for model in args.models:
        runs[model] = []
        for seed in args.seeds:
            print(f"{model} seed {seed} ...", flush=True)
            d = args.out / "runs" / f"{model}-seed{seed}"
            run_one(model, seed, args.scale, args.algorithms, d)
            runs[model].append(read_metrics(d / "metrics.jsonl"))
    plot(runs, args.algorithms, 0, "communication round", ["global_acc", "context_acc"],
         args.out / "curves.png")
    plot(runs, args.algorithms, 1, "cumulative MB per device (down + up)", ["global_acc"],
         args.out / "bytes.png")
    plot(runs, args.algorithms, 2, "cumulative device training GFLOP", ["global_acc"],
         args.out / "flops.png")
    command = "python benchmarks/reproduce_cad.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    (args.out / "results.md").write_text(
        f"# CAD vs FedAvg, scale `{args.scale}`\n\n"
        f"Produced by `{command}` (CIFAR-10 read from `$CADFL_DATA`). Settings: "
        + "; ".join(f"`configs/{PRESETS[m]}` with "
                    f"`{' '.join(SCALES[args.scale][m]) or 'no changes'}`" for m in args.models)
        + f"; algorithms {args.algorithms}; seeds {args.seeds}. Accuracy: mean ± standard "
        "deviation over seeds; rounds to FedAvg's best: per seed.\n\n"
        f"{table(runs, args.algorithms)}\n\n"
        "![accuracy vs rounds](curves.png)\n\n![accuracy vs bytes](bytes.png)\n\n"
        "![accuracy vs device FLOPs](flops.png)\n")
    print(f"wrote {args.out}/results.md, curves.png, bytes.png, flops.png")


if __name__ == "__main__":
    main()
