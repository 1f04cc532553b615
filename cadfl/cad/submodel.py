"""Context sub-models: the trunk plus the paths of a device's classes, physically smaller.

For a class set S, every decoupled layer keeps only the groups of S (and |S| logits, in S's
order), so the sub-model has fewer channels, FLOPs and bytes than the full model. Each of its
tensors is a set of rows (dim 0) of the global tensor: the index map says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ..models.spec import ModelSpec, SpecError
from .decouple import Decoupling

State = dict[str, torch.Tensor]


def _check_classes(dec: Decoupling, classes: Sequence[int]) -> tuple[int, ...]:
    s = tuple(int(c) for c in classes)
    if not s or len(set(s)) != len(s) or not set(s) <= set(dec.spec.class_ids):
        raise SpecError(f"class set {list(classes)} must be distinct class ids among the "
                        f"model's {list(dec.spec.class_ids)}")
    return s


def paths_spec(dec: Decoupling, classes: Sequence[int]) -> ModelSpec:
    """The decoupled spec with one path per class of `classes` (any ids, logits in that order):
    fewer paths for a sub-model, more for a model that gains classes."""
    s = tuple(int(c) for c in classes)
    layers = list(dec.spec.layers)
    for i in range(dec.first, len(layers)):
        layer = layers[i]
        if layer.groups is None:
            continue
        g = layer.groups[0]
        in_ch = layer.in_ch // dec.num_classes * len(s) if layer.grouped_in else layer.in_ch
        if layer.kind == "bn":
            in_ch = g * len(s)
        layers[i] = replace(layer, in_ch=in_ch, out_ch=g * len(s), groups=(g,) * len(s))
    return dec.spec.replace_layers(layers, s)


def submodel_spec(dec: Decoupling, classes: Sequence[int]) -> ModelSpec:
    """The spec of the sub-model holding the paths of `classes` (logits in that order)."""
    return paths_spec(dec, _check_classes(dec, classes))


def class_rows(dec: Decoupling, key: str, classes: Sequence[int]) -> torch.Tensor:
    """Global rows of state tensor `key` that belong to the paths of `classes`, in order."""
    g = dec.group_size(key)
    return torch.cat([torch.arange(i * g, (i + 1) * g) for i in map(dec.group_of, classes)])


def sliced_keys(dec: Decoupling, state: State) -> list[str]:
    """State keys whose rows are class paths (num_batches_tracked is shared, not sliced)."""
    return [k for k in state if dec.is_path_key(k) and not k.endswith("num_batches_tracked")]


def index_map(dec: Decoupling, state: State, classes: Sequence[int]) -> dict[str, torch.Tensor]:
    """For every sliced key, the global rows the sub-model of `classes` holds."""
    s = _check_classes(dec, classes)
    return {k: class_rows(dec, k, s) for k in sliced_keys(dec, state)}


def extract(dec: Decoupling, state: State, classes: Sequence[int]
            ) -> tuple[ModelSpec, State, dict[str, torch.Tensor]]:
    """The sub-model of `classes`: its spec, its state (copies), and its index map."""
    rows = index_map(dec, state, classes)
    sub = {k: (v.index_select(0, rows[k]) if k in rows else v.clone()) for k, v in state.items()}
    return submodel_spec(dec, classes), sub, rows


def row_classes(dec: Decoupling, key: str, classes: Sequence[int]) -> torch.Tensor:
    """The class each row of a sub-model tensor belongs to (for path-paired weights)."""
    g = dec.group_size(key)
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(g)
