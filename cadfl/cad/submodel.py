"""Context sub-models: the trunk plus the paths of a device's classes, physically smaller.

For a class set S, every decoupled layer keeps only the groups of S's classes (and |S| logits,
in S's order), so the sub-model has fewer channels, FLOPs and bytes than the full model. Each
of its tensors is a set of rows (dim 0) of the global tensor: the index map says which.

In CAD every group is one class's path. Fed2's groups may hold several classes; its devices
take every class, i.e. the whole model, whose groups are those of the global model.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def class_groups(dec: Decoupling, classes: Sequence[int]) -> tuple[int, ...]:
    """Classes per group of the model holding `classes`: consecutive classes of one group of
    `dec` share a group; a class `dec` lacks (New Class) gets a group of its own. The classes
    of a group must be consecutive in `classes` (SpecError otherwise)."""
    sizes: list[int] = []
    seen: list[int | None] = [None]
    for c in classes:
        group = dec.group_of(c) if c in dec.spec.class_ids else None
        if group is not None and group == seen[-1]:
            sizes[-1] += 1
            continue
        if group is not None and group in seen:
            raise SpecError(f"classes {list(classes)}: the classes of group {group} must be "
                            "consecutive")
        sizes.append(1)
        seen.append(group)
    return tuple(sizes)


def paths_spec(dec: Decoupling, classes: Sequence[int]) -> ModelSpec:
    """The decoupled spec with the groups of `classes` (any ids, logits in that order): fewer
    groups for a sub-model, more for a model that gains classes (see `class_groups`)."""
    s = tuple(int(c) for c in classes)
    sizes = class_groups(dec, s)
    n = len(sizes)
    layers = list(dec.spec.layers)
    for i in range(dec.first, len(layers)):
        layer = layers[i]
        if layer.groups is None:
            continue
        groups = sizes if i == len(layers) - 1 else (layer.groups[0],) * n
        layers[i] = layer.behaviour.narrow(layer, dec.num_groups, groups)
    return dec.spec.replace_layers(layers, s)


def submodel_spec(dec: Decoupling, classes: Sequence[int]) -> ModelSpec:
    """The spec of the sub-model holding the paths of `classes` (logits in that order)."""
    return paths_spec(dec, _check_classes(dec, classes))


def class_rows(dec: Decoupling, key: str, classes: Sequence[int]) -> torch.Tensor:
    """Global rows of state tensor `key` that belong to the paths of `classes`, in order: the
    logits of `classes`, or the rows of their groups."""
    if key.split(".", 1)[0] == dec.spec.names[-1]:
        return torch.tensor([dec.logit_of(c) for c in classes], dtype=torch.long)
    g = dec.group_size(key)
    groups = dict.fromkeys(map(dec.group_of, classes))  # each group once, in order
    return torch.cat([torch.arange(i * g, (i + 1) * g) for i in groups])


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


def row_weights(dec: Decoupling, key: str, classes: Sequence[int], counts: torch.Tensor
                ) -> torch.Tensor:
    """Path-paired weight of every row of the sub-model tensor `key` of `classes`: the
    device's count (`counts`, indexed by class id) of the classes of the row's group."""
    sizes = class_groups(dec, classes)
    ids = torch.tensor(classes, dtype=torch.long)
    per_group = torch.stack([part.sum() for part in counts[ids].split(sizes)])
    name = key.split(".", 1)[0]
    if name == dec.spec.names[-1]:  # the logits: one row per class of each group
        return per_group.repeat_interleave(torch.tensor(sizes))
    return per_group.repeat_interleave(dec.group_size(key))
