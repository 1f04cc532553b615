"""A first look at CAD and three peers on the block models (issue 26): ResNet-18 and
MobileNetV2 in the cross-device setting xdev-5cls, at a budget small enough for this CPU.

xdev-5cls is benchmarks/compare.py's setting (100 devices x 5 random classes of CIFAR-10, 10
per round, 2 local epochs, 20% of the training images: 100 per device), here for `--rounds`
rounds with one evaluation every `--eval-every` rounds on a share `--test-fraction` of the
test images. Not tuned: every algorithm trains at lr 0.03 (the fl_cnn preset's rate), one
seed. CAD's decoupling depth is `MODELS` below; FedRolex's width is matched to those
sub-models' FLOPs (`fedrolex.depth` the same). The full, tuned comparison is issue
28's.

Each run is resumable (run directories under runs/block-models/); the table goes into
docs/results.md between the `block-models` markers, and docs/results/block-models/ keeps the
metric lines.

    CADFL_DATA=data/cifar10 .venv/bin/python benchmarks/block_models.py
    .venv/bin/python benchmarks/block_models.py --report-only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
from throughput import machine_header  # noqa: E402

from cadfl.config import load_config  # noqa: E402
from cadfl.engine.run import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "block-models"
KEPT = ROOT / "docs" / "results" / "block-models"
DOC = ROOT / "docs" / "results.md"
# CAD's decoupling depth: from the last block that changes shape (ResNet-18: the last 2
# blocks, 51 channels per class path) or the last stage (MobileNetV2: the three 160-channel
# blocks, the 320-channel block and the 1x1 conv: 16 to 128 channels per class path).
MODELS = {"resnet18": 2, "mobilenet_v2": 5}
ALGORITHMS = ("cad", "fedavg", "fedrolex", "fedrep")


def config(model: str, rounds: int, eval_every: int, test_fraction: float, seed: int):
    """The xdev-5cls preset on `model` at this script's budget."""
    path = ROOT / "configs" / "cifar10-flcnn-xdev.toml"
    algos = "[" + ", ".join(f'"{a}"' for a in ALGORITHMS) + "]"
    return load_config(str(path), [
        f'model="{model}"', "batch_norm=true", "partition.k=5", f"rounds={rounds}",
        f"eval_every={eval_every}", f"test_fraction={test_fraction}", "train.lr=0.03",
        f"cad.depth={MODELS[model]}", f"fedrolex.depth={MODELS[model]}",
        f"algorithms={algos}", f"seed={seed}"])


def run(args: argparse.Namespace) -> None:
    """Every (model, algorithm) run, each resumable, one after another."""
    print(machine_header(torch.device("cpu")), flush=True)
    for model in args.models:
        cfg = config(model, args.rounds, args.eval_every, args.test_fraction, args.seed)
        for algo in ALGORITHMS:
            one = compare.single_config(cfg, algo, args.seed)
            compare.run_once(RUNS / model / algo, one, f"{model} {algo}")


def report(models: list[str], rounds: int, eval_every: int, test_fraction: float,
           seed: int) -> str:
    """The markdown table of the runs found (finished ones, else the kept copies)."""
    head = ("| model | algorithm | last global | last context | MB/device/round | "
            "device GFLOPs/round | train s/round | health |\n|" + "---|" * 8)
    lines = []
    for model in models:
        cfg = config(model, rounds, eval_every, test_fraction, seed)
        for algo in ALGORITHMS:
            done = RUNS / model / algo / "metrics.jsonl"
            kept = KEPT / model / f"{algo}.jsonl"
            if (RUNS / model / algo / "summary.md").exists():
                KEPT.joinpath(model).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(done, kept)
            if not kept.exists():
                continue
            r = compare.summary_row(algo, {seed: read_metrics(kept)}, cfg)
            lines.append(f"| {model} | {algo} | {r['last_global']} | {r['last_context']} | "
                         f"{r['mb']:.2f} | {r['gflops']:.2f} | {r['wall']:.1f} | "
                         f"{r['health']} |")
    return f"{head}\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table")
    args = parser.parse_args()
    if not args.report_only:
        start = time.time()
        run(args)
        print(f"all runs: {(time.time() - start) / 60:.1f} min", flush=True)
    table = report(list(MODELS), args.rounds, args.eval_every, args.test_fraction, args.seed)
    compare._replace_block(DOC, table, "block-models")
    print(table)


if __name__ == "__main__":
    main()
