"""CAD's variants against plain CAD and every peer: one ablation table per setting.

A variant is a set of `[cad]` options (`VARIANTS`). In each setting of benchmarks/compare.py
every variant is tuned like every peer: a learning-rate sweep on validation data (seed 0,
every point over the run's rounds, unstable points not chosen, the grid grown past a chosen
edge), then its runs at the chosen rate, scored on the test images. Each table puts the
variants next to the peers' committed rows (`docs/results/compare`) and says, for the variant
that validated best, whether each goal of issue 25 holds. Resumable like compare.py.

    nohup .venv/bin/python benchmarks/cad_variants.py --settings xdev-2cls \\
        > runs/cad-variants.log 2>&1 &
    .venv/bin/python benchmarks/cad_variants.py --report-only   # docs/results/cad-variants.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

from cadfl.config import config_from_dict, load_config  # noqa: E402
from cadfl.engine.run import read_metrics  # noqa: E402
from cadfl.fl.cad import PAPER  # noqa: E402
from cadfl.sweep import run_sweep  # noqa: E402

ROOT = compare.ROOT
RUNS = ROOT / "runs" / "cad-variants"
OUT = ROOT / "docs" / "results" / "cad-variants"
PEERS_OUT = ROOT / "docs" / "results" / "compare"
VARIANTS = {
    "paper": (),  # plain CAD, the paper's method
    "personal": ("cad.personal=1",),  # its classes' logit rows personal
    "personal-2": ("cad.personal=2",),  # and its paths' last conv layer
    "fast-paths": ("cad.path_lr=3",),  # class paths at 3x the rate (faster early rounds)
    "calibrated": ("cad.calibrate=1",),  # the global logit rows over their norms
    "groups-5": ("cad.groups=5",),  # 5 paths, each for 2 classes devices hold together
    # the combination: groups for what devices learn together, personal for each one's own
    "groups-5+personal-2": ("cad.groups=5", "cad.personal=2"),
}
SETTINGS = ("digits", "xdev-2cls", "xdev-5cls", "paper-flcnn", "paper-alexnet")
DIGITS_LRS = (0.03, 0.1, 0.3)  # compare.py's digits setting was tuned into its preset


def _base(name: str, variant: str) -> tuple[str, list[str], tuple[float, ...], int]:
    """Preset, overrides (CAD alone, the variant's options), lr grid and rounds."""
    s = compare.SETTINGS[name]
    # Each variant is plain CAD with its own options: never the defaults beyond the paper.
    plain = ('cad.variant="cadfl"', *(f"cad.{k}={v}" for k, v in PAPER.items()))
    path, overrides = compare.base_config(name, ('algorithms=["cad"]', *plain,
                                                 *VARIANTS[variant]))
    rounds = s.sweep_rounds or load_config(path, overrides).rounds
    return path, overrides, s.lrs or DIGITS_LRS, rounds


def run_variant(name: str, variant: str, seeds: list[int]) -> None:
    """Sweep one variant in one setting, then its runs, each resumable."""
    path, overrides, lrs, rounds = _base(name, variant)
    where = RUNS / name / variant
    print(f"{time.strftime('%H:%M:%S')} {name} {variant}: sweep", flush=True)
    tuned = compare.timed(where / "sweep", run_sweep, path, overrides, [("train.lr", list(lrs))],
                          rounds, where / "sweep", quiet=True, extend=2).tuned
    for seed in seeds:
        run_dir = where / f"seed-{seed}"
        cfg = compare.single_config(tuned, "cad", seed)
        if not compare.SETTINGS[name].sweep_rounds:
            # Its peers ran from the preset, tuned into it, on all images: so do the variants.
            cfg = config_from_dict({**cfg.to_dict(), "validation_fraction": 0.0})
        compare.run_once(run_dir, cfg, f"{name} {variant} seed {seed}")


def collect(name: str) -> dict[str, tuple[dict[int, list[dict]], dict | None]]:
    """Per variant: metric lines per seed (finished runs, else the report's copies) and its
    sweep record (sweep.json)."""
    found = {}
    for variant in VARIANTS:
        where, kept = RUNS / name / variant, OUT / name / variant
        per_seed = {int(p.parent.name.split("-")[1]): read_metrics(p.parent / "metrics.jsonl")
                    for p in sorted(where.glob("seed-*/summary.md"))}
        if not per_seed:
            per_seed = {int(p.stem.split("-")[1]): read_metrics(p)
                        for p in sorted(kept.glob("seed-*.jsonl"))}
        sweep = next((json.loads(p.read_text()) for p in (where / "sweep" / "sweep.json",
                                                          kept / "sweep.json") if p.exists()),
                     None)
        if per_seed:
            found[variant] = per_seed, sweep
    return found


def _validated(sweep: dict) -> float:
    return sweep["scores"]["cad"][sweep["best"]["cad"]]


def _verdict(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def goals(best: dict, peers: list[dict]) -> list[str]:
    """Issue 25's goals for CAD's best validated variant (a row) against the peers' rows;
    a reference row (central training, not a federated peer) is left out."""
    peers = [r for r in peers if r["family"] != "reference"]
    by = {r["algorithm"]: r for r in peers}
    top = max(peers, key=lambda r: r["last_context_value"])
    mine, theirs = best["last_context_value"], top["last_context_value"]
    out = [f"leads every peer on last context accuracy: {_verdict(mine > theirs)} "
           f"({mine:.3f} against {top['algorithm']}'s {theirs:.3f})"]
    if "fedrep" in by:
        flops, mb = best["gflops"] / by["fedrep"]["gflops"], best["mb"] / by["fedrep"]["mb"]
        out.append(f"at most 0.5x FedRep's device FLOPs and 0.2x its bytes: "
                   f"{_verdict(flops <= 0.5 and mb <= 0.2)} ({flops:.2f}x, {mb:.2f}x)")
    if "fedavg" in by:
        avg = by["fedavg"]
        ours, theirs = best["last_global_value"], avg["last_global_value"]
        out.append(f"global accuracy at least FedAvg's: {_verdict(ours >= theirs)} "
                   f"(last {ours:.3f} against {theirs:.3f})")

        def latest(row: dict) -> float:
            return max(math.inf if r is None else r for r in row["reached_rounds"])

        mine, theirs = latest(best), latest(avg)
        said = ("cannot tell: neither reaches it in every seed" if math.isinf(mine) and
                math.isinf(theirs) else _verdict(mine <= theirs))
        out.append(f"reaches the target no later than FedAvg: {said} "
                   f"(rounds {best['reached']} against {avg['reached']})")
    return out


def default_variant(validated: dict[str, dict[str, float]]) -> tuple[str, dict[str, float]]:
    """The variant that wins on validation across settings, from each setting's validated
    scores per variant: the highest mean gain over plain CAD (`paper`) across the settings
    where both were swept; plain CAD where no variant gains on average. Also each variant's
    mean gain (accuracy points)."""
    gains = {}
    for variant in dict.fromkeys(v for scores in validated.values() for v in scores):
        diffs = [s[variant] - s["paper"] for s in validated.values()
                 if variant in s and "paper" in s]
        if diffs:
            gains[variant] = 100 * sum(diffs) / len(diffs)
    best = max(gains, key=gains.get, default="paper")
    return (best if gains.get(best, 0.0) > 0 else "paper"), gains


def across(validated: dict[str, dict[str, float]]) -> str:
    """The report's closing section: validated scores per variant and setting, the mean
    gain over plain CAD, and the variant that becomes CAD's default."""
    chosen, gains = default_variant(validated)
    names = list(validated)
    head = ("| CAD variant | " + " | ".join(names) + " | mean gain over plain (points) |\n|"
            + "---|" * (len(names) + 2))
    body = [f"| {v} | " + " | ".join(f"{validated[n][v]:.3f}" if v in validated[n] else "-"
                                     for n in names) + f" | {gains[v]:+.2f} |"
            for v in gains]
    return ("## Across settings: CAD's default\n\n"
            "The variant that wins on validation across settings becomes CAD's default: the "
            "highest mean gain of the validated score over plain CAD's across the settings "
            "(the rule was fixed before the last setting ran; plain CAD stays the default "
            "where no variant gains on average). Validated scores (the sweep's score of the "
            "chosen rate: the mean of global and context accuracy on held-out images):\n\n"
            f"{head}\n" + "\n".join(body) + f"\n\nDefault: `{chosen}`.\n")


def report(names: list[str]) -> str:
    """docs/results/cad-variants.md: per setting, the variants' rows, the peers', the goals."""
    parts = ["# CAD variants\n",
             "Written by `benchmarks/cad_variants.py`. Each variant of CAD (a set of `[cad]` "
             "options) is tuned on validation data like every peer (its own learning-rate "
             "sweep over the run's rounds, seed 0), then run with the seeds listed and scored "
             "on the test images; mean ± std over seeds. 'validated' is the sweep's score of "
             "the chosen rate, which picks the best variant (never the test set). The peers' "
             "rows are those of `docs/results/compare` (their own tuned runs).\n",
             "Variants: " + "; ".join(f"`{v}`: {' '.join(o) or 'plain CAD (the paper)'}"
                                      for v, o in VARIANTS.items()) + ".\n"]
    validated: dict[str, dict[str, float]] = {}
    chosen: dict[str, dict] = {}  # per setting: the best validated variant and its rate
    for name in names:
        found = collect(name)
        parts.append(f"## {name}\n\n{compare.SETTINGS[name].what}.\n")
        if not found:
            parts.append("Not run yet.\n")
            continue
        rows = []
        for variant, (per_seed, sweep) in found.items():
            path, overrides, _, _ = _base(name, variant)
            kept = OUT / name / variant
            kept.mkdir(parents=True, exist_ok=True)
            for seed, lines in per_seed.items():
                (kept / f"seed-{seed}.jsonl").write_text(
                    "".join(json.dumps(m) + "\n" for m in lines))
            if sweep is not None:
                (kept / "sweep.json").write_text(json.dumps(sweep, indent=1))
            cfg = load_config(str(RUNS / name / variant / f"seed-{min(per_seed)}" /
                                  "config.toml")) if (RUNS / name / variant).exists() else \
                load_config(path, [*overrides, "overrides={}",
                                   f"train.lr={sweep['points'][sweep['best']['cad']][0]}"])
            row = compare.summary_row("cad", per_seed, cfg)
            row.update(variant=variant, validated=_validated(sweep) if sweep else math.nan)
            rows.append(row)
            if sweep:
                validated.setdefault(name, {})[variant] = row["validated"]
        peers = compare.table(PEERS_OUT, name)[1] if (PEERS_OUT / name).exists() else []
        peers = [p for p in peers if p["family"] != "cad"]  # CAD's rows are the variants'
        head = ("| CAD variant | validated | tuned lr | best global | last global | best context "
                "| last context | round reaching target | MB/device/round | "
                "device GFLOPs/round | health |\n|" + "---|" * 11)
        body = [f"| **{r['variant']}** | {r['validated']:.3f} | {r['lr']:g} | {r['best_global']} "
                f"| {r['last_global']} | {r['best_context']} | {r['last_context']} | "
                f"{r['reached']} | {r['mb']:.2f} | {r['gflops']:.2f} | {r['health']} |"
                for r in rows]
        body += [f"| {r['algorithm']} (peer) | | {r['lr']:g} | {r['best_global']} | "
                 f"{r['last_global']} | {r['best_context']} | {r['last_context']} | "
                 f"{r['reached']} | {r['mb']:.2f} | {r['gflops']:.2f} | {r['health']} |"
                 for r in peers]
        best = max(rows, key=lambda r: -math.inf if math.isnan(r["validated"]) else
                   r["validated"])
        chosen[name] = {"variant": best["variant"], "lr": best["lr"]}
        said = goals(best, peers) if peers else []
        parts.append(f"{head}\n" + "\n".join(body) + "\n\n"
                     f"Best validated variant: `{best['variant']}`, seeds {best['seeds']}.\n"
                     + "".join(f"- {g}\n" for g in said))
    parts.append(across(validated))
    text = "\n".join(parts)
    OUT.mkdir(parents=True, exist_ok=True)
    # What benchmarks/compare.py puts beside plain CAD in the main results tables.
    (OUT / "best.json").write_text(json.dumps(
        {"default": default_variant(validated)[0], "settings": chosen}, indent=1) + "\n")
    (OUT.parent / "cad-variants.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        choices=list(compare.SETTINGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--report-only", action="store_true", help="only write the report")
    args = parser.parse_args(argv)
    shown = list(dict.fromkeys([*SETTINGS, *args.settings]))  # every section, not just these
    if not args.report_only:
        for name in args.settings:
            for variant in args.variants:
                run_variant(name, variant, args.seeds)
            report(shown)
    report(shown)


if __name__ == "__main__":
    main()
