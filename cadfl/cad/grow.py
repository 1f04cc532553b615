"""New Class: a model that gains a class keeps every existing output unchanged.

A decoupled model gains a path: every decoupled layer gets one more group of filters and the
classifier one more logit. The new filters come from the spare pool where the layer reading
the trunk has enough spare filters left (they read the trunk's channels, like any path's
first layer); everywhere else they are new channels, initialised like `build_model` does
(He fan-in; logits N(0, 0.01); zero biases; unit batch-norm scales). Existing paths never read
the new group (grouped layers connect group c to group c only), so every existing logit is the
same function of the input as before.

A dense model (FedAvg and the other baselines) gains a logit: one more row of the classifier,
the other rows untouched.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from ..models import ModelSpec, build_model, state_shapes, with_classes
from .assign import SPARE_PREFIX
from .decouple import Decoupling
from .submodel import paths_spec

State = dict[str, torch.Tensor]
BN_FRESH = {"weight": 1.0, "bias": 0.0, "running_mean": 0.0, "running_var": 1.0}


def _fresh(shape: torch.Size, param: str, norm: bool, logits: bool,
           gen: torch.Generator) -> torch.Tensor:
    """New rows initialised as `build_model` initialises them: of a batch norm (`norm`), of
    the logits, or of a conv or linear layer."""
    if norm:
        return torch.full(shape, BN_FRESH[param])
    if param == "bias":
        return torch.zeros(shape)
    fan_in = math.prod(shape[1:])
    std = 0.01 if logits else math.sqrt(2.0 / fan_in)
    return torch.randn(shape, generator=gen) * std


def grow_dense(spec: ModelSpec, state: State, new: tuple[int, ...], seed: int
               ) -> tuple[ModelSpec, State]:
    """A dense model with one more logit per class of `new`: the classifier's new rows are
    drawn from `seed`, every other tensor is kept."""
    grown = with_classes(spec, new)
    last = grown.names[-1]
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for key, t in state.items():
        name, param = key.split(".", 1)
        if name != last:
            continue
        rows = _fresh(torch.Size((len(new), *t.shape[1:])), param, False, True, gen)
        out[key] = torch.cat([t, rows.to(t.dtype)])
    return grown, out


def grow_paths(dec: Decoupling, new: int) -> Decoupling:
    """The decoupling with a path for class `new` appended after the existing ones."""
    spec = paths_spec(dec, (*dec.spec.class_ids, new))
    return replace(dec, spec=spec, num_classes=dec.num_classes + 1)


def grow_state(dec: Decoupling, grown: Decoupling, state: State, seed: int) -> State:
    """`state` of `dec` with the rows of `grown`'s new path added (see the module docstring).

    Spare filters used for the new path leave the pool (`spare/` keys of `state`).
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = state_shapes(grown.spec)
    with torch.device("meta"):
        modules = dict(build_model(grown.spec).named_modules())
    out = dict(state)
    entry = grown.spec.names[grown.first]  # the first decoupled layer: reads the trunk
    g_entry = dec.spec.layer(entry).groups[0]
    pool = state.get(f"{SPARE_PREFIX}{entry}.weight")
    from_pool = pool is not None and len(pool) >= g_entry
    for key, shape in shapes.items():
        if not dec.is_path_key(key) or key.endswith("num_batches_tracked"):
            continue
        name = key.split(".", 1)[0]
        owner, param = key.rsplit(".", 1)
        old = state[key]
        rows = shape[0] - old.shape[0]
        spare = state.get(SPARE_PREFIX + key)
        if name == entry and from_pool and spare is not None:
            new = spare[:rows]
            out.pop(SPARE_PREFIX + key)
            if len(spare) > rows:
                out[SPARE_PREFIX + key] = spare[rows:].clone()
        else:
            new = _fresh(torch.Size((rows, *shape[1:])), param,
                         isinstance(modules[owner], nn.BatchNorm2d),
                         name == grown.spec.names[-1], gen)
        out[key] = torch.cat([old, new.to(old.dtype)]).contiguous()
    return out
