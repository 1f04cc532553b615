"""What one evaluation costs in the cross-device setting (100 devices scored), before and after.

Before: float32, every device's own model run on its own test images one device at a time
(the evaluation as it was). After: at `--precision` (default auto), with the layers that the
devices' models share (FedPer's and FedRep's body) run once over the test images and only each
device's own layers per device (`cadfl.engine.evaluate.score_devices`). Models scored with
the global model (FedAvg, CAD) take one pass of it either way and differ only by precision. Each
algorithm trains `--rounds` rounds first so that devices hold models of their own; then both
evaluations of a round run alternately `--repeats` times, medians reported, in this process.

    CADFL_DATA=data/cifar10 .venv/bin/python benchmarks/scoring.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from throughput import machine_header

import cadfl.engine.evaluate as evaluation
from cadfl.config import load_config
from cadfl.device.precision import PRECISIONS, resolve_precision
from cadfl.engine.evaluate import evaluate, score_device
from cadfl.engine.experiment import Experiment
from cadfl.engine.rounds import train_round
from cadfl.engine.run import set_threads

ROOT = Path(__file__).resolve().parent.parent
XDEV = ("partition.k=5", "test_fraction=0.2")


@contextlib.contextmanager
def one_by_one(on: bool) -> Iterator[None]:
    """The evaluation as it was, when `on`: each device's own model on its own images, one
    device after another (no shared layers)."""
    shared = evaluation.score_devices
    if on:
        evaluation.score_devices = lambda exp, models: [score_device(exp, *m) for m in models]
    try:
        yield
    finally:
        evaluation.score_devices = shared


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
            state, _ = train_round(after, strategy, rnd, state, runtime)
        times: dict[str, list[float]] = {"before": [], "after": []}
        accs = {}
        for _ in range(args.repeats):
            for label, e in (("before", before), ("after", after)):
                start = time.perf_counter()
                with one_by_one(label == "before"):
                    accs[label] = evaluate(e, strategy, args.rounds, state,
                                           runtime)["context_acc"]
                times[label].append(time.perf_counter() - start)
        b, a = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"{name:<10} {b:>9.2f} {a:>8.2f} {b / a:>7.2f}x {accs['before']:>18.4f} "
              f"{accs['after']:>7.4f}", flush=True)


if __name__ == "__main__":
    main()
