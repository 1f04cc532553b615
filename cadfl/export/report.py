"""`cadfl export --report`: size, parameters, multiply-adds, onnxruntime latency and context
accuracy of the exported files, side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..analysis.profile import profile_spec
from ..device.score import restricted_predictions
from ..models import ModelSpec, count_params
from .files import file_logits, session
from .model import ExportModel


def accuracy(logits: torch.Tensor, labels: torch.Tensor, outputs: Sequence[int],
             classes: Sequence[int]) -> float:
    """Share of images whose highest logit among `classes` (class ids; a subset of the
    file's `outputs`) is their label."""
    pred = restricted_predictions(logits, outputs, classes)
    return float((pred == labels).double().mean())

def latency_ms(paths: dict[str, Path], image: torch.Tensor, repeats: int,
               warmup: int = 10) -> dict[str, float]:
    """Median onnxruntime latency of one image (batch 1, one thread) for each file, measured
    side by side: the files take turns in every repetition, so machine load hits all alike."""
    feed = {"images": image.permute(1, 2, 0).unsqueeze(0).contiguous().numpy()}
    sessions = {name: session(p, threads=1) for name, p in paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}

def multiply_adds(spec: ModelSpec) -> int:
    """Multiply-adds of one forward pass of one image (FLOPs counted by torch / 2)."""
    return int(profile_spec(spec).totals["flops"]) // 2

def measure(files: dict[str, Path], models: dict[str, ExportModel], test_x: torch.Tensor,
             test_y: torch.Tensor, repeats: int) -> dict[str, dict[str, Any]]:
    """Per file: size, parameters, multiply-adds, context accuracy (the highest logit among
    the context file's outputs, Others included), and latency when `repeats`."""
    lat = latency_ms(files, test_x[0], repeats) if repeats else {}
    rows = {}
    for name, path in files.items():
        model = models[name.split()[0]]
        logits = file_logits(path, test_x)
        rows[name] = {"file_bytes": path.stat().st_size, "params": count_params(model.spec),
                      "multiply_adds": multiply_adds(model.spec),
                      "accuracy": accuracy(logits, test_y, model.classes,
                                           models["context"].classes)}
        if name in lat:
            rows[name]["latency_ms"] = lat[name]
    return rows

def report_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'model':<14} {'file MB':>8} {'params':>11} {'MMACs':>8} {'latency ms':>10} "
             f"{'accuracy':>8}"]
    for name, r in rows.items():
        lines.append(f"{name:<14} {r['file_bytes'] / 1e6:>8.2f} {r['params']:>11,} "
                     f"{r['multiply_adds'] / 1e6:>8.1f} {r.get('latency_ms', 0):>10.3f} "
                     f"{r['accuracy']:>8.4f}")
    full, ctx = rows.get("full"), rows["context"]
    if full:
        lines.append(f"context / full: file {ctx['file_bytes'] / full['file_bytes']:.2f}x, "
                     f"multiply-adds {ctx['multiply_adds'] / full['multiply_adds']:.2f}x, "
                     f"latency {ctx['latency_ms'] / full['latency_ms']:.2f}x")
    return "\n".join(lines)
