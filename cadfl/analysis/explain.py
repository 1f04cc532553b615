"""`cadfl visualize` and `cadfl analyze`: look inside any run's checkpoint.

visualize: activation maximisation images of a layer's filters.
analyze: per-class mean activation of every filter (the statistic CAD's assignment uses),
heatmaps, selectivity against depth, the decoupling depth it suggests, and, for a decoupled
model, its class paths.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..cad.decouple import decouple
from ..cad.preference import class_activation_sums, class_means, selectivity, suggest_depth
from ..data.datasets import load_dataset
from ..device.compute import resolve_device
from ..device.precision import resolve_precision
from ..engine.checkpoint import checkpoint_dataset, load_model_checkpoint
from ..models import ModelSpec, build_loaded
from ..report.interpret import critical_paths, filter_grid, preference_heatmap, selectivity_plot
from .maximize import Regularizer, maximize


def _out_dir(args: argparse.Namespace, checkpoint: Path, what: str) -> Path:
    out = Path(args.out) if args.out else checkpoint.parent.parent / what / checkpoint.stem
    out.mkdir(parents=True, exist_ok=True)
    return out


def _compute(args: argparse.Namespace) -> torch.device:
    """The compute device of `--device` (ValueError, said in one line, if it is not here)."""
    return resolve_device(args.device)


def visualize_command(args: argparse.Namespace) -> int:
    """Draw what the chosen filters of one layer respond to; writes a PNG grid."""
    ckpt = Path(args.checkpoint)
    spec, state, record = load_model_checkpoint(ckpt)
    ds = checkpoint_dataset(ckpt, record, args.data_dir)
    width = spec.layer(args.layer).out_ch if args.layer in spec.names else 0
    filters = args.filters if args.filters else list(range(min(16, width)))
    if any(not 0 <= f < width for f in filters):
        raise ValueError(f"filters must be in 0..{width - 1} for {args.layer}")
    dev = _compute(args)
    model = build_loaded(spec, state, dev)
    precision = resolve_precision(args.precision, dev)
    reg = Regularizer(decay=args.decay, blur_every=args.blur_every, blur_sigma=args.blur_sigma,
                      jitter=args.jitter)
    with tqdm(total=args.steps, desc=f"maximising {args.layer}", disable=args.quiet) as bar:
        images = maximize(model, spec, args.layer, filters, ds.mean, ds.std, steps=args.steps,
                          eta=args.eta, reg=reg, progress=bar.update, precision=precision)
    out = _out_dir(args, ckpt, "filters")
    path = out / f"filters-{args.layer}.png"
    filter_grid(images, [f"filter {f}" for f in filters], path,
                f"{spec.name} {args.layer}: activation maximisation, {args.steps} steps")
    print(f"wrote {path}")
    return 0


def analyze_spec(spec: ModelSpec, state: dict, x: torch.Tensor, y: torch.Tensor,
                 num_classes: int, mean: tuple[float, ...], std: tuple[float, ...],
                 threshold: float, precision: str = "fp32") -> dict:
    """Class means per layer, selectivity per layer, and the suggested decoupling depth, with
    the activations computed at `precision`."""
    sums, counts = class_activation_sums(spec, state, x, y, num_classes, mean, std,
                                         precision=precision)
    means = class_means(sums, counts)
    sel = {name: selectivity(m) for name, m in means.items()}
    convs = [n for n in sel if spec.layer(n).behaviour.unit]
    return {"means": means, "selectivity": sel,
            "suggested_depth": suggest_depth([sel[n] for n in convs], threshold)}


def path_agreement(spec: ModelSpec, means: dict[str, torch.Tensor]) -> dict[str, float]:
    """For each decoupled layer (class paths, logits excluded), the share of filters whose
    preferred class is the class of the path they belong to (chance: 1/K)."""
    out = {}
    for name, m in means.items():
        groups = spec.layer(name).groups
        if groups is None or groups[0] == 1:
            continue
        owner = torch.tensor(spec.class_ids).repeat_interleave(groups[0])
        out[name] = float((m.argmax(0) == owner).float().mean())
    return out


def analyze_command(args: argparse.Namespace) -> int:
    """Preferences, selectivity by depth, suggested depth, and critical paths of a checkpoint."""
    ckpt = Path(args.checkpoint)
    spec, state, record = load_model_checkpoint(ckpt)
    ds = (load_dataset(args.dataset, args.data_dir) if args.dataset
          else checkpoint_dataset(ckpt, record, args.data_dir))
    n = min(args.samples, len(ds.test_y))
    dev = _compute(args)
    result = analyze_spec(spec, state, ds.test_x[:n].to(dev), ds.test_y[:n].to(dev),
                          ds.num_classes, ds.mean, ds.std, args.threshold,
                          resolve_precision(args.precision, dev))
    result["means"] = {k: v.cpu() for k, v in result["means"].items()}
    out = _out_dir(args, ckpt, "analysis")
    for name, m in tqdm(result["means"].items(), desc="heatmaps", disable=args.quiet):
        preference_heatmap(m, ds.classes, name, out / f"preference-{name}.png")
    selectivity_plot(result["selectivity"], out / "selectivity.png", args.threshold,
                     result["suggested_depth"])
    grouped = [i for i, layer in enumerate(spec.layers) if layer.groups is not None]
    if grouped:
        depth = sum(1 for i in range(grouped[0], len(spec.layers))
                    if spec.layers[i].behaviour.unit)
        # Decoupling an already decoupled spec gives it back, with its path description.
        dec = decouple(spec, spec.num_classes, depth)
        critical_paths(dec, ds.classes, args.cls, out / f"critical-paths-{args.cls}.png")
    agreement = path_agreement(spec, result["means"])
    summary = {"checkpoint": str(ckpt), "images": n, "selectivity": result["selectivity"],
               "threshold": args.threshold, "suggested_depth": result["suggested_depth"],
               "path_agreement": agreement}
    (out / "analysis.json").write_text(json.dumps(summary, indent=1))
    print(f"{'layer':<8} selectivity")
    for name, s in result["selectivity"].items():
        print(f"{name:<8} {s:.3f}")
    for name, a in agreement.items():
        print(f"{name}: {a:.0%} of its filters prefer their own path's class")
    print(f"suggested decoupling depth (threshold {args.threshold}): "
          f"{result['suggested_depth']} conv layer(s) from the end")
    print(f"wrote {out}")
    return 0
