"""Per-layer profile of a model: output shape, parameters, forward FLOPs, activations, energy.

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`, not by hand formulas, with
torch's convention that one multiply-add is 2 FLOPs. Torch counts only matrix products and
convolutions, so batch norm, ReLU and pooling show 0 FLOPs in the `flops` column.

Energy model (rough, first-order figures, the kind used by Han et al. in their pruning and
deep-compression papers), with per-operation costs from Horowitz, "Computing's energy problem
(and what we can do about it)", ISSCC 2014, for a 45 nm process:

- 32-bit float multiply 3.7 pJ, 32-bit float add 0.9 pJ;
- 32-bit SRAM read (small 8 KB cache) 5 pJ, 32-bit DRAM access 640 pJ.

Energy of a layer for one image = MACs * (3.7 + 0.9) pJ, where MACs = torch's FLOPs / 2,
+ every parameter read once from DRAM (640 pJ per 32-bit word)
+ its input and output activations accessed once through SRAM (5 pJ per word).
Layers torch counts 0 FLOPs for (batch norm, ReLU, max-pool) are charged 1 elementwise op per
output element, priced as a float add, in the energy model only. Flatten and dropout are the
identity (or a view) in an inference pass: no arithmetic, memory traffic or new activation.
A residual block is one row, counted with the conv layers; the batch norms and activations
inside it are not charged elementwise ops, and only its output counts as activation memory.
Real hardware re-reads activations and weights through a cache hierarchy, so treat the numbers
as a way to compare layers and models, not as measurements.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cadfl.models import ModelSpec, build_model, get_model
from cadfl.models.flops import count_forward
from cadfl.models.layers import KINDS

FP_MULT_PJ = 3.7  # 32-bit float multiply
FP_ADD_PJ = 0.9  # 32-bit float add
SRAM_WORD_PJ = 5.0  # 32-bit read from an 8 KB SRAM
DRAM_WORD_PJ = 640.0  # 32-bit DRAM access
BYTES_PER_VALUE = 4  # float32


@dataclass
class LayerProfile:
    """One layer's figures, all for one input image."""

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    flops: int
    activation_bytes: int
    energy_pj: float


@dataclass
class ModelProfile:
    """A model's per-layer profile and its totals (sums and conv/FC shares)."""

    model: str
    input_shape: tuple[int, int, int]
    layers: list[LayerProfile]
    totals: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: model, input_shape, layers and totals."""
        layers = [{**asdict(lp), "output_shape": list(lp.output_shape)} for lp in self.layers]
        return {"model": self.model, "input_shape": list(self.input_shape), "layers": layers,
                "totals": dict(self.totals)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _energy_pj(kind: str, flops: int, params: int, in_values: int, out_values: int) -> float:
    """Energy of one layer for one image, by the model in the module docstring."""
    if KINDS[kind].free:  # the identity or a view in an inference pass
        return 0.0
    macs = flops / 2
    elementwise = out_values if flops == 0 else 0
    compute = macs * (FP_MULT_PJ + FP_ADD_PJ) + elementwise * FP_ADD_PJ
    memory = params * DRAM_WORD_PJ + (in_values + out_values) * SRAM_WORD_PJ
    return compute + memory


def _share(layers: list[LayerProfile], family: str, field: str, total: float) -> float:
    part = sum(getattr(lp, field) for lp in layers if KINDS[lp.kind].family == family)
    return part / total if total else 0.0


def profile_spec(spec: ModelSpec) -> ModelProfile:
    """Profile every layer of `spec` for one input image."""
    # Built on the meta device: no weight initialisation, so the global RNG is not consumed.
    with torch.device("meta"):
        model = build_model(spec)
    total_flops, flops = count_forward(model, spec.input_shape)
    layers = []
    in_shape: tuple[int, ...] = spec.input_shape
    for name, layer, out_shape, module in zip(spec.names, spec.layers, spec.shapes(),
                                              model.children(), strict=True):
        params = sum(p.numel() for p in module.parameters())
        energy = _energy_pj(layer.kind, flops[name], params, _numel(in_shape), _numel(out_shape))
        layers.append(LayerProfile(name=name, kind=layer.kind, output_shape=tuple(out_shape),
                                   params=params, flops=flops[name],
                                   activation_bytes=_numel(out_shape) * BYTES_PER_VALUE,
                                   energy_pj=energy))
        in_shape = out_shape
    totals: dict[str, Any] = {
        "params": sum(lp.params for lp in layers),
        "flops": total_flops,
        # Flatten and dropout outputs alias their input, so they add no activation memory.
        "activation_bytes": sum(lp.activation_bytes for lp in layers
                                if not KINDS[lp.kind].free),
        "energy_pj": sum(lp.energy_pj for lp in layers),
    }
    for what, field in (("flops", "flops"), ("energy", "energy_pj"), ("params", "params")):
        total = totals[field]
        totals[f"conv_{what}_share"] = _share(layers, "conv", field, total)
        totals[f"fc_{what}_share"] = _share(layers, "fc", field, total)
    return ModelProfile(model=spec.name, input_shape=spec.input_shape, layers=layers,
                        totals=totals)


def profile_model(name: str, num_classes: int = 10,
                  input_shape: tuple[int, int, int] | None = None) -> ModelProfile:
    """Profile a zoo model by name (default input shape: the model's own)."""
    return profile_spec(get_model(name, num_classes=num_classes, input_shape=input_shape))


def plot_compare(profiles: list[ModelProfile], path: str | Path) -> None:
    """Bar chart PNG: per model, the share of forward FLOPs and of energy in conv vs FC layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p.model for p in profiles]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8), sharey=True)
    for ax, what, title in ((axes[0], "flops", "Forward FLOPs"), (axes[1], "energy", "Energy")):
        conv = [100 * p.totals[f"conv_{what}_share"] for p in profiles]
        fc = [100 * p.totals[f"fc_{what}_share"] for p in profiles]
        other = [max(0.0, 100 - c - f) for c, f in zip(conv, fc, strict=True)]
        segments = (("conv", conv, "tab:blue"), ("FC", fc, "tab:orange"),
                    ("BN / ReLU / pool", other, "tab:gray"))
        bottom = [0.0] * len(profiles)
        for label, values, color in segments:
            bars = ax.bar(names, values, bottom=bottom, color=color, label=label, width=0.6)
            # Label segments tall enough to hold text; small FC shares are written above the bar.
            ax.bar_label(bars, labels=[f"{v:.1f}%" if v >= 6 else "" for v in values],
                         label_type="center", color="white", fontsize=9)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        for i, f in enumerate(fc):
            if f < 6:
                ax.text(i, 101, f"FC {f:.2g}%", ha="center", va="bottom", fontsize=9)
        ax.set_title(title)
        ax.set_xlabel("model")
        ax.set_ylim(0, 112)
    axes[0].set_ylabel("share of total (%)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle("Where the work goes: conv vs fully-connected layers (one image, forward pass)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Left-align the first column and right-align the others."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def _print_profile(p: ModelProfile) -> None:
    shape = "x".join(map(str, p.input_shape))
    print(f"{p.model}  (input {shape}, one image)")
    rows = [[lp.name, lp.kind, "x".join(map(str, lp.output_shape)), f"{lp.params:,}",
             f"{lp.flops / 1e6:.3f}", f"{lp.activation_bytes / 1024:.1f}",
             f"{lp.energy_pj / 1e6:.3f}"] for lp in p.layers]
    t = p.totals
    rows.append(["total", "", "", f"{t['params']:,}", f"{t['flops'] / 1e6:.3f}",
                 f"{t['activation_bytes'] / 1024:.1f}", f"{t['energy_pj'] / 1e6:.3f}"])
    print(_format_table(["layer", "type", "output", "params", "MFLOPs", "act KB", "energy uJ"],
                        rows))
    print()
    for what in ("flops", "energy", "params"):
        print(f"{what:>6}: conv {100 * t[f'conv_{what}_share']:7.3f}%   "
              f"FC {100 * t[f'fc_{what}_share']:7.3f}%")


def _print_compare(profiles: list[ModelProfile]) -> None:
    rows = []
    for p in profiles:
        t = p.totals
        rows.append([p.model, f"{t['params']:,}", f"{t['flops'] / 1e6:.1f}",
                     f"{t['energy_pj'] / 1e6:.1f}",
                     *(f"{100 * t[f'{part}_{what}_share']:.3f}"
                       for what in ("flops", "energy", "params") for part in ("conv", "fc"))])
    print(_format_table(["model", "params", "MFLOPs", "energy uJ", "conv FLOPs %", "FC FLOPs %",
                         "conv energy %", "FC energy %", "conv params %", "FC params %"], rows))


def profile_command(args: argparse.Namespace) -> int:
    """Implements `cadfl profile`: a table (or JSON) for one model, or a comparison of several."""
    names = ([args.model] if args.model else []) + (args.compare or [])
    profiles = [profile_model(n, args.num_classes, args.input_shape) for n in names]
    compare = bool(args.compare)
    if args.json:
        out = {"models": [p.to_dict() for p in profiles]} if compare else profiles[0].to_dict()
        print(json.dumps(out, indent=2))
    elif compare:
        _print_compare(profiles)
    else:
        _print_profile(profiles[0])
    if args.plot:
        plot_compare(profiles, args.plot)
        if not args.json:  # keep --json output a single JSON object
            print(f"\nwrote {args.plot}")
    return 0
