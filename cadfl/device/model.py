"""The network of a payload: a spec's model with a state's tensors, on a compute device."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..fl.payload import State
from ..models import ModelSpec, build_model

# Meta-device model of each spec seen, and its state's dtypes.
_skeletons: dict[ModelSpec, tuple[nn.Module, dict[str, torch.dtype]]] = {}


def load_model(spec: ModelSpec, state: State, device: torch.device | str = "cpu") -> nn.Module:
    """The network of `spec` with `state` loaded on `device`, channels-last for speed."""
    # Building a model, even on the meta device, runs its initialisers: milliseconds that a
    # small model's whole local epoch can be worth. A copy of a cached meta-device skeleton
    # takes the state's (copied) tensors as its own instead.
    if spec not in _skeletons:
        with torch.device("meta"):
            skeleton = build_model(spec)
        _skeletons[spec] = skeleton, {k: v.dtype for k, v in skeleton.state_dict().items()}
    skeleton, dtypes = _skeletons[spec]
    model = copy.deepcopy(skeleton)
    own = {k: v.to(device=device, dtype=dtypes[k], copy=True,
                   memory_format=torch.channels_last if v.dim() == 4 else torch.preserve_format)
           for k, v in state.items()}
    model.load_state_dict(own, assign=True)
    return model
