"""The paper's decoupling of a trained model: filters assigned to classes by their activations.

1. `balanced_assignment`: each class gets the same number of filters, highest normalised
   preference first; filters left over are spare.
2. `permute_dense`: reorder each decoupled layer's filters into contiguous class groups (spare
   last), with the next layer's inputs and the batch-norm parameters permuted to match, so the
   dense network computes exactly the same function.
3. `to_decoupled`: keep only the within-group weights (cross-group weights are zeroed, i.e.
   dropped from the grouped layers) and move the spare filters out of the model into the
   spare pool (`spare_pool`), where they take part in nothing until a new class needs a path.
"""

from __future__ import annotations

import torch

from .decouple import Decoupling

State = dict[str, torch.Tensor]
SPARE_PREFIX = "spare/"


def balanced_assignment(means: torch.Tensor, per_class: int) -> torch.Tensor:
    """Class of every filter (-1: spare) from per-class mean activations `means` (K, F).

    A filter's normalised preference for class c is its mean activation on c divided by its
    mean over all classes. Pairs (class, filter) are taken in decreasing preference; a filter
    goes to a class while the class has fewer than `per_class` filters.
    """
    k, f = means.shape
    if per_class * k > f:
        raise ValueError(f"cannot give {k} classes {per_class} filters each out of {f}")
    norm = means / means.mean(0, keepdim=True).clamp_min(1e-12)
    owner = torch.full((f,), -1, dtype=torch.long)
    quota = [0] * k
    left = per_class * k
    for idx in torch.argsort(norm.flatten(), descending=True, stable=True).tolist():
        c, filt = divmod(idx, f)
        if owner[filt] < 0 and quota[c] < per_class:
            owner[filt] = c
            quota[c] += 1
            left -= 1
            if not left:
                break
    return owner


def group_permutation(owner: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Filter order putting class 0's filters first, then class 1's, ..., spare filters last."""
    groups = [torch.nonzero(owner == c).flatten() for c in range(num_classes)]
    return torch.cat(groups + [torch.nonzero(owner < 0).flatten()])


def _param_keys(state: State, name: str) -> list[str]:
    return [k for k in state if k.split(".", 1)[0] == name and not k.endswith("batches_tracked")]


def permute_dense(dec: Decoupling, state: State, perms: dict[str, torch.Tensor]) -> State:
    """The dense state with the filters of each layer in `perms` reordered (function kept).

    `perms` maps a dense conv/linear layer name to a permutation of its output filters.
    """
    spec = dec.spec  # same layer names and kinds as the dense spec
    shapes = spec.shapes()  # spatial sizes are those of the dense model
    out = dict(state)
    for name, perm in perms.items():
        i = spec.names.index(name)
        for j in range(i, len(spec.layers)):  # the layer itself and the batch norm after it
            if j > i and spec.layers[j].weighted:
                break
            if j == i or spec.layers[j].kind == "bn":
                for key in _param_keys(out, spec.names[j]):
                    out[key] = out[key].index_select(0, perm)
        nxt, spatial = _next_param_layer(dec, i, shapes)
        cols = (perm.unsqueeze(1) * spatial + torch.arange(spatial)).flatten()
        wkey = f"{spec.names[nxt]}.weight"
        out[wkey] = out[wkey].index_select(1, cols)
    return out


def _next_param_layer(dec: Decoupling, i: int, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """Index of the conv/linear layer reading layer i's filters, and features per filter."""
    spatial = 1
    for j in range(i + 1, len(dec.spec.layers)):
        kind = dec.spec.layers[j].kind
        if kind == "flatten":
            spatial = shapes[j - 1][1] * shapes[j - 1][2]
        if dec.spec.layers[j].weighted:
            return j, spatial
    raise ValueError(f"layer {dec.spec.names[i]} is the last layer: its outputs are the logits")


def to_decoupled(dec: Decoupling, state: State) -> State:
    """The decoupled state from a dense state whose filters are already grouped by class.

    Class c's filters are rows c*g..(c+1)*g of each decoupled layer; spare rows are dropped;
    a grouped layer keeps only the block that connects group c to group c.
    """
    out = dict(state)
    k = dec.num_classes
    for i in range(dec.first, len(dec.spec.layers)):
        layer, name = dec.spec.layers[i], dec.spec.names[i]
        if layer.kind not in ("conv", "linear", "bn"):
            continue
        for key in _param_keys(state, name):
            t = state[key][: layer.out_ch]
            if key.endswith(".weight") and layer.grouped_in:
                g_out, g_in = layer.out_ch // k, layer.in_ch // k
                t = torch.cat([t[c * g_out:(c + 1) * g_out, c * g_in:(c + 1) * g_in]
                               for c in range(k)])
            out[key] = t.contiguous()
    return out


def spare_pool(dec: Decoupling, state: State) -> State:
    """The filters left over by the equal split, from a dense state whose filters are grouped
    by class (spare last): weight and bias rows of each decoupled layer beyond its class
    groups, keyed `spare/<layer>.<param>`. A block's leftover filters are dropped instead: its
    tensors' rows are not all filters of its output."""
    out = {}
    for name, (_, spare) in dec.widths.items():
        if not spare or dec.spec.layer(name).kind not in ("conv", "linear"):
            continue
        used = dec.spec.layer(name).out_ch
        for key in _param_keys(state, name):
            out[SPARE_PREFIX + key] = state[key][used:].clone()
    return out
