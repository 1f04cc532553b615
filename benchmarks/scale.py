"""Does a round cost the same with 100, 1,000 or 10,000 devices? Per-round time and peak memory.

Runs CAD and FedAvg on the `synthetic` dataset (1x8x8 images, 10 classes; partition 5 classes
per device) with the same number of participants per round (`--sample`, default 10) and the
same number of images per device (`--images-per-device`, default 20: the synthetic default of
200,000 images for 10,000 devices), so that a round does the same training work and only the
number of devices changes. Each device count runs in a
fresh child process, one after another, so that its peak resident memory (`ru_maxrss`) is its
own; rounds are timed inside the run (`wall_s` of metrics.jsonl: training and aggregation) and
around it (the whole round, evaluation over all devices included). Medians over rounds 2..R.

    .venv/bin/python benchmarks/scale.py --devices 100 1000 10000 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cadfl.config import load_config
from cadfl.engine.run import run_experiment


def child(devices: int, rounds: int, sample: int, per_device: int, out: Path) -> dict:
    """One run in this process: per-round times and this process's peak memory."""
    cfg = load_config(None, ['dataset="synthetic"', f"devices={devices}", f"sample={sample}",
                             f"synthetic.images={per_device * devices}",
                             f"rounds={rounds}", 'algorithms=["cad", "fedavg"]'])
    start = time.perf_counter()
    stamps: list[float] = []
    lines = run_experiment(cfg, out, quiet=True,
                           on_round=lambda _line: stamps.append(time.perf_counter()))
    result = {"devices": devices, "setup_s": None, "peak_rss_mb":
              resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    for algo in ("cad", "fedavg"):
        mine = [i for i, m in enumerate(lines) if m["algorithm"] == algo]
        walls = [lines[i]["wall_s"] for i in mine[1:]]
        rounds_s = [stamps[i] - stamps[i - 1] for i in mine[1:]]
        result[algo] = {"train_s": statistics.median(walls),
                        "round_s": statistics.median(rounds_s),
                        "last_global_acc": lines[mine[-1]]["global_acc"]}
    result["setup_s"] = stamps[0] - start - lines[0]["wall_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--sample", type=int, default=10, help="participants per round")
    parser.add_argument("--images-per-device", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.rounds, args.sample, args.images_per_device,
                               args.out)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            cmd = [sys.executable, __file__, "--child", str(n), "--rounds", str(args.rounds),
                   "--sample", str(args.sample), "--images-per-device",
                   str(args.images_per_device), "--out", str(Path(tmp) / str(n))]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{n} devices done", file=sys.stderr, flush=True)
    base = rows[0]
    print(f"synthetic 1x8x8, 10 classes, {args.images_per_device} images per device, "
          f"digits_cnn, {args.sample} participants per round, {args.rounds} rounds, medians "
          f"of rounds 2..{args.rounds}")
    print(f"| devices | CAD train s/round | CAD round s (with eval) | FedAvg train s/round | "
          f"FedAvg round s (with eval) | peak RSS MB | setup s | vs {base['devices']} "
          "(CAD round, FedAvg round, RSS) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratios = (r["cad"]["round_s"] / base["cad"]["round_s"],
                  r["fedavg"]["round_s"] / base["fedavg"]["round_s"],
                  r["peak_rss_mb"] / base["peak_rss_mb"])
        print(f"| {r['devices']:,} | {r['cad']['train_s']:.3f} | {r['cad']['round_s']:.3f} | "
              f"{r['fedavg']['train_s']:.3f} | {r['fedavg']['round_s']:.3f} | "
              f"{r['peak_rss_mb']:.0f} | {r['setup_s']:.1f} | "
              f"{ratios[0]:.2f}x, {ratios[1]:.2f}x, {ratios[2]:.2f}x |")


if __name__ == "__main__":
    main()
