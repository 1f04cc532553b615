"""Per-round wall time of one job on cadfl's own engine, on Flower's simulation engine and on a
local Flower deployment, measured side by side in one run of this script.

The job is the same for all three (one config, one partition, one seed): the engine's
`wall_s` of a round covers configure -> train every participant -> aggregate, so it includes
all message passing (for Flower: encoding, the SuperLink round trip, the ClientApp decoding,
training and replying). Evaluation is not in `wall_s` and is the same code everywhere.
Start-up (Ray, or SuperLink + SuperNodes + `flwr run`) is reported separately, as the total
time minus the rounds.

cadfl's engine trains devices one after another in this process; Flower runs one ClientApp
per CPU side by side (simulation: Ray actors with 1 CPU each; deployment: one SuperNode
process per device). Every worker uses one compute thread (OMP_NUM_THREADS=1), and so does
the own engine here, so the comparison is of engines, not of thread counts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flower_overhead.py --devices 4 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def per_round(lines: list[dict], skip_first: bool) -> float:
    walls = [m["wall_s"] for m in lines]
    if skip_first and len(walls) > 1:
        walls = walls[1:]  # the first round also pays one-off costs (data loading, imports)
    return statistics.median(walls)


def breakdown(cfg) -> dict[str, float]:
    """What a deployment pays per message besides training, measured here one at a time:
    starting a fresh Python that imports the ClientApp (what `flwr-clientapp` does for every
    message), building the node's experiment (data, partition), and one device's training."""
    import subprocess
    import sys

    from cadfl.device.train import run_task
    from cadfl.engine.experiment import Experiment

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cadfl.flower.client_app"], check=True)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    exp = Experiment.setup(cfg)
    setup = time.perf_counter() - start
    strategy = exp.strategy("fedavg")
    state = strategy.initial_state(exp.init)
    (d, payload), = strategy.configure_train(1, state, [0])
    start = time.perf_counter()
    run_task(payload, exp.data(d))
    return {"fresh process + imports": imports, "experiment setup (data)": setup,
            "one device's training": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--algorithms", default="cad,fedavg")
    p.add_argument("--data-fraction", type=float, default=1.0)
    p.add_argument("--skip", default="", help="comma-separated engines to skip "
                   "(cadfl, simulation, deployment, breakdown)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    from cadfl.config import load_config
    from cadfl.engine.run import run_experiment
    from cadfl.flower.deploy import deploy_experiment
    from cadfl.flower.simulation import run_flower_simulation

    torch.set_num_threads(1)
    algos = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    overrides = [f"devices={args.devices}", f"rounds={args.rounds}",
                 f"data_fraction={args.data_fraction}", f"algorithms={json.dumps(algos)}"]
    cfg = load_config(None, overrides)
    skip = set(args.skip.split(","))
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cadfl-flower-bench-") as tmp:
        runs = {
            "cadfl": lambda out: run_experiment(cfg, out, quiet=True),
            "simulation": lambda out: run_flower_simulation(cfg, out, quiet=True),
            "deployment": lambda out: deploy_experiment(None, overrides, out, timeout=1800),
        }
        for name, fn in runs.items():
            if name in skip:
                continue
            start = time.perf_counter()
            lines = fn(Path(tmp) / name)
            total = time.perf_counter() - start
            accs = {a: [m["global_acc"] for m in lines if m["algorithm"] == a] for a in algos}
            results[name] = {"per_round_s": per_round(lines, skip_first=True),
                             "first_round_s": lines[0]["wall_s"],
                             "total_s": total,
                             "startup_s": total - sum(m["wall_s"] for m in lines),
                             "final_global_acc": {a: v[-1] for a, v in accs.items()}}
    base = results.get("cadfl", {}).get("per_round_s")
    print(f"\njob: digits, digits_cnn, {args.devices} devices x 5 classes, "
          f"data_fraction {args.data_fraction}, {args.rounds} rounds of {', '.join(algos)}; "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          "one thread per worker\n")
    print("| engine | per round (median, s) | vs cadfl | first round (s) | start-up + "
          "evaluation (s) | total (s) | final global_acc |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['per_round_s'] / base:.1f}x" if base else "-"
        acc = ", ".join(f"{a} {v:.4f}" for a, v in r["final_global_acc"].items())
        print(f"| {name} | {r['per_round_s']:.3f} | {ratio} | {r['first_round_s']:.2f} | "
              f"{r['startup_s']:.1f} | {r['total_s']:.1f} | {acc} |")
    if "breakdown" not in skip:
        print("\n| per message, in a deployment | s |\n|---|---|")
        for what, secs in breakdown(cfg).items():
            print(f"| {what} | {secs:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
