"""FLOP counts of a model, by torch's FlopCounterMode on the meta device: forward per layer,
and one training step (forward, loss, backward)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .spec import ModelSpec, build_model

_train_flops_cache: dict[tuple, int] = {}
_personal_cache: dict[tuple, tuple[int, int]] = {}


def _meta_copy(model: nn.Module) -> nn.Module:
    # On the meta device shapes propagate but nothing is computed, so counting is instant even
    # for big batches, and the caller's weights, grads and batch-norm statistics stay untouched.
    return copy.deepcopy(model).to("meta")


def count_forward(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs for one image, and the FLOPs of each direct child module."""
    meta = _meta_copy(model).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(torch.empty(1, *input_shape, device="meta"))
    # Keys are module paths prefixed by the root's class name, e.g. "Sequential.conv1".
    by_path = {fqn.split(".", 1)[1]: sum(ops.values())
               for fqn, ops in counter.get_flop_counts().items() if "." in fqn}
    per_child = {name: int(by_path.get(name, 0)) for name, _ in model.named_children()}
    return int(counter.get_total_flops()), per_child


def flops_per_layer(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Forward FLOPs for one image of each direct child of `model`, counted by FlopCounterMode."""
    return count_forward(model, input_shape)[1]


def train_flops(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1) -> int:
    """FLOPs of one training step (forward, cross-entropy loss, backward) on a batch.

    Counted by FlopCounterMode in training mode; typically about 3x the forward FLOPs (the first
    layer needs no gradient for its input, so shallow nets come out a little lower).
    """
    meta = _meta_copy(model).train()
    x = torch.empty(batch_size, *input_shape, device="meta")
    targets = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(meta(x), targets).backward()
    return int(counter.get_total_flops())


def train_flops_per_sample(spec: ModelSpec) -> int:
    """Forward + backward FLOPs of one training sample, counted by torch (cached per spec)."""
    # FLOPs depend on the layers, not on which classes the logits stand for: CAD sub-models
    # of different contexts with as many classes share one count.
    key = (spec.input_shape, spec.layers)
    if key not in _train_flops_cache:
        batch = 2  # batch norm needs more than one value per channel in training mode
        _train_flops_cache[key] = train_flops(build_model(spec), spec.input_shape, batch) // batch
    return _train_flops_cache[key]


def personal_fit_flops(spec: ModelSpec, first: int) -> tuple[int, int]:
    """Per sample, for fitting layers `first`.. of `spec` on frozen features: the forward
    FLOPs of the layers before them (the features, computed once) and the FLOPs of one
    training step of those layers on the features (no gradient for their input)."""
    key = (spec.input_shape, spec.layers, first)
    if key not in _personal_cache:
        with torch.device("meta"):
            model = build_model(spec)
            shape = model[:first](torch.empty(1, *spec.input_shape)).shape[1:]
        per_child = count_forward(model, spec.input_shape)[1]
        trunk = sum(per_child[name] for name in spec.names[:first])
        batch = 2  # as train_flops_per_sample
        _personal_cache[key] = trunk, train_flops(model[first:], tuple(shape), batch) // batch
    return _personal_cache[key]
