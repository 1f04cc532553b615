"""Width-scaled sub-models (HeteroFL, FedRolex): every hidden layer keeps some of its channels.

A sub-model keeps, in every conv and hidden linear layer, a chosen set of output channels (the
logits layer keeps every class); the next layer keeps the matching input channels (dim 1 of its
weight; for the first linear layer after a flatten, the features of the kept channels at every
spatial position) and batch norm the kept channels. It is a physically smaller dense network.
Each of its tensors is a block of rows (dim 0) and columns (dim 1) of the global tensor: the
index maps say which (see `cadfl.fl.aggregate.Contribution`).
"""

from __future__ import annotations

import math

import torch

from ..models.spec import ModelSpec, SpecError

State = dict[str, torch.Tensor]
Maps = dict[str, torch.Tensor]


def kept_width(width: int, rate: float) -> int:
    """ceil(rate * width) channels, at least one."""
    # round() first: 0.3 * 10 is 3.0000000000000004 in floating point, whose ceiling is 4.
    return max(1, math.ceil(round(rate * width, 9)))


def hidden_layers(spec: ModelSpec) -> list[str]:
    """The layers a sub-model narrows: every conv and linear layer and block but the logits."""
    return [name for name, layer in zip(spec.names[:-1], spec.layers[:-1], strict=True)
            if layer.weighted]


def channel_window(spec: ModelSpec, rate: float, offset: int = 0) -> Maps:
    """For every hidden layer, the output channels a sub-model of `rate` keeps: the
    ceil(rate * width) channels from `offset` on, wrapping around (mod width), ascending.
    Offset 0 is HeteroFL's first channels; FedRolex rolls the offset with the round. An
    inverted residual block's expanded channels get a window of their own, `NAME.hidden`."""
    def window(width: int) -> torch.Tensor:
        return ((offset + torch.arange(kept_width(width, rate))) % width).sort().values

    out = {}
    for name in hidden_layers(spec):
        layer = spec.layer(name)
        out[name] = window(layer.out_ch)
        if layer.hidden:
            out[f"{name}.hidden"] = window(layer.hidden)
    return out


def width_maps(spec: ModelSpec, keep: Maps) -> tuple[ModelSpec, Maps, Maps]:
    """The sub-model keeping output channels `keep[layer]` of every hidden layer: its spec, and
    per state key the global rows (dim 0) and columns (dim 1) its tensors hold. Keys a map
    leaves out are whole along that dimension."""
    if any(layer.groups is not None for layer in spec.layers):
        raise SpecError(f"model {spec.name!r} has channel groups: width scaling needs a dense "
                        "model")
    shapes = [spec.input_shape, *spec.shapes()]
    layers = list(spec.layers)
    rows: Maps = {}
    cols: Maps = {}
    current: torch.Tensor | None = None  # kept channels of the incoming feature map; None: all
    for i, (name, layer) in enumerate(zip(spec.names, spec.layers, strict=True)):
        if layer.kind == "flatten" and current is not None:
            # Flattening (C, H, W) puts channel c's H*W features at c*H*W onwards.
            plane = math.prod(shapes[i][1:])
            current = (current[:, None] * plane + torch.arange(plane)[None, :]).reshape(-1)
        elif layer.weighted or layer.kind == "bn":
            def fail(msg: str, name: str = name) -> SpecError:
                return SpecError(f"{spec.name}'s {name} cannot be width-sliced: {msg}")

            kept = current if layer.kind == "bn" else keep.get(name)
            layers[i], r, c = layer.behaviour.slice_width(layer, current, kept,
                                                          keep.get(f"{name}.hidden"), fail)
            rows.update({f"{name}.{k}": v for k, v in r.items()})
            cols.update({f"{name}.{k}": v for k, v in c.items()})
            current = kept
    return spec.replace_layers(layers, spec.classes), rows, cols


def slice_state(state: State, rows: Maps, cols: Maps) -> State:
    """The sub-model's tensors: copies of the global rows and columns the maps name."""
    out = {}
    for key, t in state.items():
        if key in rows:
            t = t.index_select(0, rows[key])
        if key in cols:
            t = t.index_select(1, cols[key])
        out[key] = t.clone() if key not in rows and key not in cols else t
    return out
