"""Run summaries: per-algorithm best/last accuracy, rounds to a target, bytes and FLOPs."""

from __future__ import annotations

import math
from collections.abc import Sequence

HEALTH_DROP = 0.05  # a last accuracy this far below the best is flagged


def _clean(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


def judged_accuracy(lines: Sequence[dict]) -> list[tuple[int, float]]:
    """(round, accuracy) of every evaluated round of one algorithm's run: its global
    accuracy, or its context accuracy when it has no global model."""
    key = "global_acc" if _clean([m["global_acc"] for m in lines]) else "context_acc"
    return [(m["round"], m[key]) for m in lines if m[key] is not None and not math.isnan(m[key])]


def health(lines: Sequence[dict]) -> str:
    """The word "ok", or what went wrong in one algorithm's run (its metric lines) and when:
    updates rejected (from the first round with any), or a last accuracy (global, or context
    without a global model) more than `HEALTH_DROP` below its best (the round of the best)."""
    flags = []
    rejected = [m["round"] for m in lines if m.get("rejected")]
    if rejected:
        flags.append(f"updates rejected from round {rejected[0]}")
    scored = judged_accuracy(lines)
    if scored:
        best_round, best = max(scored, key=lambda rv: rv[1])
        drop = best - scored[-1][1]
        if drop > HEALTH_DROP:
            which = "global" if _clean([m["global_acc"] for m in lines]) else "context"
            flags.append(f"last {which} {100 * drop:.1f} points below its best "
                         f"(round {best_round})")
    return "; ".join(flags) or "ok"


def summarize(lines: Sequence[dict], target: float, participants: int) -> list[dict]:
    """One row per algorithm (in first-seen order) from metrics lines.

    `rounds_to_target` is the first round whose accuracy reaches `target` (global accuracy, or
    context accuracy for algorithms without a global model), None if never. `total_mb` is all
    bytes moved, down and up, over all participants and rounds.
    """
    rows = []
    for algo in dict.fromkeys(m["algorithm"] for m in lines):
        ms = [m for m in lines if m["algorithm"] == algo]
        g, c = _clean(m["global_acc"] for m in ms), _clean(m["context_acc"] for m in ms)
        key = "global_acc" if g else "context_acc"
        reached = [m["round"] for m in ms if m[key] is not None and m[key] >= target]
        rows.append({
            "algorithm": algo,
            "rounds": max(m["round"] for m in ms),
            "best_global_acc": max(g) if g else None,
            "last_global_acc": g[-1] if g else None,
            "best_context_acc": max(c) if c else None,
            "last_context_acc": c[-1] if c else None,
            "rounds_to_target": reached[0] if reached else None,
            "mb_per_device_round": sum(m["bytes_down"] + m["bytes_up"] for m in ms)
            / len(ms) / 1e6,
            "total_mb": sum(m["bytes_down"] + m["bytes_up"] for m in ms) * participants / 1e6,
            "gflops_per_device_round": sum(m["device_train_flops"] for m in ms) / len(ms) / 1e9,
            "wall_s": sum(m["wall_s"] for m in ms),
            "health": health(ms),
        })
    return rows


COLUMNS = [("algorithm", "algorithm", "{}"), ("best_global_acc", "best global", "{:.3f}"),
           ("last_global_acc", "last global", "{:.3f}"),
           ("best_context_acc", "best context", "{:.3f}"),
           ("last_context_acc", "last context", "{:.3f}"),
           ("rounds_to_target", "rounds to target", "{}"),
           ("mb_per_device_round", "MB/device/round", "{:.3f}"),
           ("total_mb", "total MB", "{:.1f}"),
           ("gflops_per_device_round", "GFLOP/device/round", "{:.3f}"),
           ("wall_s", "train s", "{:.1f}"), ("health", "health", "{}")]


def _cells(row: dict) -> list[str]:
    return ["-" if row[k] is None else fmt.format(row[k]) for k, _, fmt in COLUMNS]


def markdown_table(rows: Sequence[dict]) -> str:
    """The summary as a Markdown table."""
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


def text_table(rows: Sequence[dict]) -> str:
    """The summary as an aligned plain-text table for the terminal."""
    table = [[h for _, h, _ in COLUMNS]] + [_cells(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in table)


# Which way is better for each metric the closing lines compare.
LEADS = [("best_global_acc", "best global accuracy", max, "{:.3f}"),
         ("best_context_acc", "best context accuracy", max, "{:.3f}"),
         ("mb_per_device_round", "MB per device per round", min, "{:.3f}"),
         ("gflops_per_device_round", "device GFLOPs per round", min, "{:.3f}")]


def leaders(rows: Sequence[dict]) -> str:
    """One line per metric: which algorithm leads, and by how much over the next one
    (algorithms that communicate nothing are left out of the bytes line)."""
    out = []
    for key, label, best, fmt in LEADS:
        have = [r for r in rows if r[key] is not None
                and not (key == "mb_per_device_round" and r[key] == 0)]
        if len(have) < 2:
            continue
        ranked = sorted(have, key=lambda r: r[key], reverse=best is max)
        first, second = ranked[0], ranked[1]
        gap = abs(first[key] - second[key])
        margin = (f"by {gap:.3f} over {second['algorithm']}" if key.endswith("acc")
                  else f"{first[key] / second[key]:.2f}x of {second['algorithm']}'s"
                  if second[key] else "")
        out.append(f"{label}: {first['algorithm']} ({fmt.format(first[key])}), {margin}")
    return "\n".join(out)
