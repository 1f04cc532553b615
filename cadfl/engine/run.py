"""The in-process simulation engine: devices trained one after another on shared tensors.

One `Experiment` holds the data, the partition and the initial weights; every algorithm of
the config runs on exactly those, round after round, and each round appends one JSON line to
`metrics.jsonl`. Deterministic for a seed: no Ray, no ports, no worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.datasets import Dataset
from ..device.executor import Executor
from ..report.summary import markdown_table, summarize
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import EVAL_KEYS, evaluate
from .experiment import Experiment
from .rounds import train_round

log = logging.getLogger("cadfl")
METRIC_KEYS = ("round", "algorithm", "global_acc", "context_acc", "eval_devices", "test_loss",
               "train_loss", "bytes_down", "bytes_up", "device_train_flops", "wall_s",
               "rejected", "class_acc", "others_reject", "others_in_acc", "context_open_acc",
               "precision")




def set_threads() -> int:
    """Use every core this process may run on, unless OMP_NUM_THREADS says otherwise (torch
    already applied it at import); returns the count."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, n or 1))
    return torch.get_num_threads()


def _round_line(algorithm: str, rnd: int, stats: dict, evals: dict, precision: str) -> dict:
    line = {"round": rnd, "algorithm": algorithm, **stats, **(evals or dict.fromkeys(EVAL_KEYS)),
            "precision": precision}
    return {k: line[k] for k in METRIC_KEYS}


def read_metrics(path: Path) -> list[dict]:
    """All lines of a metrics.jsonl file."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            # A process killed while appending leaves half a last line; its round is redone.
    return out


def run_experiment(cfg: Config, out: Path, resume: bool = False, quiet: bool = False,
                   dataset: Dataset | None = None,
                   on_round: Callable[[dict], None] | None = None,
                   execute: Executor | None = None,
                   experiment: Experiment | None = None,
                   stop: Callable[[list[dict]], bool] | None = None) -> list[dict]:
    """Run every algorithm of `cfg` into run directory `out`; returns all metric lines.

    `execute` runs each round's payloads on the devices (default: in this process).
    `experiment` is the set-up experiment to run (default: `Experiment.setup(cfg, dataset)`;
    a Flower executor passes its own, into which devices with their own images join late).

    With `resume`, algorithms continue from their last checkpoint, and metric lines written
    after that checkpoint are dropped, so the result equals an uninterrupted run.

    `stop(lines)`, given an algorithm's metric lines so far, ends that algorithm's run early
    when it says so (a sweep point that is clearly lost).
    """
    set_threads()
    out.mkdir(parents=True, exist_ok=True)
    exp = experiment or Experiment.setup(cfg, dataset)
    # What "auto" chose is recorded, so the run directory says how it was computed.
    (out / "config.toml").write_text(replace(cfg, precision=exp.precision).to_toml())
    exp.partition.save(out / "partition.json")
    if not quiet:
        print(exp.partition.summary(exp.dataset.classes))
    metrics_path, ckpt_dir = out / "metrics.jsonl", out / "checkpoints"
    done: dict[str, int] = {}
    if resume:
        for a in cfg.algorithms:
            loaded = load_checkpoint(ckpt_dir, a)
            done[a] = loaded[1]["round"] if loaded else 0
    kept = [m for m in read_metrics(metrics_path) if m["round"] <= done.get(m["algorithm"], 0)]
    metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    lines = list(kept)
    strategies = {a: exp.strategy(a) for a in cfg.algorithms}  # every setting checked first
    for a, strategy in strategies.items():
        runtime = exp.runtime(out / "devices" / a)
        state = strategy.initial_state(exp.init)
        if done.get(a):
            state, record = load_checkpoint(ckpt_dir, a)
            strategy.restore(record.get("structure") or {})
        runtime.store.resume(done.get(a, 0))
        # Piped into a log, a bar would write a line per update: one line per algorithm then.
        bar = tqdm(range(done.get(a, 0) + 1, cfg.rounds + 1), desc=f"{a:>8}", unit="round",
                   disable=quiet or not sys.stderr.isatty(), initial=done.get(a, 0),
                   total=cfg.rounds)
        devices = execute or runtime
        for rnd in bar:
            if stop is not None and stop([m for m in lines if m["algorithm"] == a]):
                break  # checked before each round, so a resumed run stops where it stopped
            runtime.store.begin_round(rnd)
            devices.begin_round(a, rnd)
            state, stats = train_round(exp, strategy, rnd, state, devices)
            evals = None
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                evals = evaluate(exp, strategy, rnd, state, runtime,
                                 devices.score if devices.scores_devices else None)
                bar.set_postfix({k: f"{v:.3f}" for k, v in evals.items()
                                 if k.endswith("acc") and isinstance(v, float)})
            line = _round_line(a, rnd, stats, evals, exp.precision)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
            model = strategy.global_model(state)
            runtime.store.flush(rnd)
            save_checkpoint(ckpt_dir, a, state, {
                "algorithm": a, "round": rnd, "dataset": cfg.dataset,
                "spec": model[0].to_dict() if model else None,
                "structure": strategy.structure()})
            if strategy.notes:
                (out / f"notes-{a}.json").write_text(json.dumps(strategy.notes, indent=1))
            lines.append(line)
            if on_round:
                on_round(line)
        if bar.disable and not quiet:
            last = [m for m in lines if m["algorithm"] == a and m["context_acc"] is not None]
            accs = {k: last[-1][k] for k in ("global_acc", "context_acc")} if last else {}
            print(f"{a:>8}: {cfg.rounds} rounds, " + ", ".join(
                f"{k} {v:.3f}" for k, v in accs.items() if v is not None), flush=True)
    write_report(out, cfg, lines)
    return lines


def write_report(out: Path, cfg: Config, lines: list[dict]) -> list[dict]:
    """summary.md and curves.png of a run directory; returns the summary rows."""
    rows = summarize(lines, cfg.target_acc, cfg.sampled_per_round())
    title = (f"{cfg.dataset} / {cfg.model}: {cfg.devices} devices, partition "
             f"{cfg.partition.scheme}, {cfg.rounds} rounds, seed {cfg.seed}")
    (out / "summary.md").write_text(
        f"# Run summary\n\n{title}; target accuracy {cfg.target_acc}.\n\n"
        f"{markdown_table(rows)}\n\n![curves](curves.png)\n")
    # Imported here: matplotlib is half a second of import that a Flower node, which
    # imports this module for every message it runs, never needs.
    from ..report.plots import plot_curves

    plot_curves(lines, out / "curves.png", title)
    return rows
