"""What one evaluation costs in the cross-device setting (100 devices scored), before and after.

Before: float32, every device's own model run on its own test images one device at a time
(the evaluation as it was). After: at `--precision` (default auto), with the layers that the
devices' models share (FedPer's and FedRep's body) run once over the test images and only each
device's own layers per device (`Experiment.score_devices`). Models scored with the global
model (FedAvg, CAD) take one pass of it either way and differ only by precision. Each
algorithm trains `--rounds` rounds first so that devices hold models of their own; then both
evaluations of a round run alternately `--repeats` times, medians reported, in this process.

    CADFL_DATA=data/cifar10 .venv/bin/python benchmarks/scoring.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from throughput import machine_header

from cadfl.config import load_config
from cadfl.device.precision import PRECISIONS, resolve_precision
from cadfl.engine.run import Experiment, set_threads

ROOT = Path(__file__).resolve().parent.parent
XDEV = ("partition.k=5", "test_fraction=0.2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", nargs="+",
                        default=["fedavg", "cad", "fedper", "fedrep", "ditto", "local"])
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--rounds", type=int, default=2, help="training rounds before scoring")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_threads()
    cfg = load_config(ROOT / "configs" / "cifar10-flcnn-xdev.toml",
                      [*XDEV, f"algorithms={json.dumps(args.algorithms)}"])
    exp = Experiment.setup(cfg)
    after_precision = resolve_precision(args.precision, exp.compute)
    before = replace(exp, precision="fp32", _on_device=None, _cache={})
    # The evaluation as it was: each device's model on its own images, one after another.
    before.score_devices = lambda models: [before.score_device(*m) for m in models]
    after = replace(exp, precision=after_precision, _on_device=None, _cache={})
    print(machine_header(exp.compute))
    print(f"xdev-5cls: {cfg.devices} devices scored on {len(exp.dataset.test_y)} test images; "
          f"before fp32 one device at a time, after {after_precision} with shared layers once; "
          f"medians of {args.repeats}")
    print(f"{'algorithm':<10} {'before s':>9} {'after s':>8} {'speed-up':>8} "
          f"{'context acc before':>18} {'after':>7}")
    for name in args.algorithms:
        strategy = after.strategy(name)
        runtime = after.runtime()
        state = strategy.initial_state(exp.init)
        for rnd in range(1, args.rounds + 1):
            state, _ = after.train_round(strategy, rnd, state, runtime)
        times: dict[str, list[float]] = {"before": [], "after": []}
        accs = {}
        for _ in range(args.repeats):
            for label, e in (("before", before), ("after", after)):
                start = time.perf_counter()
                accs[label] = e.evaluate(strategy, args.rounds, state, runtime)["context_acc"]
                times[label].append(time.perf_counter() - start)
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"{name:<10} {b:>9.2f} {a:>8.2f} {b / a:>7.2f}x {accs['before']:>18.4f} "
              f"{accs['after']:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
