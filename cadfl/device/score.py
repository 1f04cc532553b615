"""Scoring, the one way: a model's logits, and predictions restricted to a device's classes.

A device answers among its own classes only (and "Others" where the model has that output):
`restricted_predictions` is that argmax, used by the engine's evaluation, the Flower
ClientApp's own-data scores and export's accuracy check. `predict` runs a model over uint8
images at a precision; `shared_prefix_logits` runs the layers several models share once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data.augment import to_float
from ..fl.payload import State
from ..models import ModelSpec
from .model import load_model
from .precision import autocast

EVAL_BATCH = 1000


def label_map(spec: ModelSpec, num_classes: int, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """Global class id -> logit index of `spec` (-1 for classes the model does not have)."""
    lut = torch.full((num_classes,), -1, dtype=torch.long)
    lut[torch.tensor(spec.class_ids)] = torch.arange(spec.num_classes)
    return lut.to(device)


def restricted_predictions(logits: torch.Tensor, outputs: Sequence[int],
                           answers: Sequence[int]) -> torch.Tensor:
    """The class id each row of `logits` predicts when only `answers` may be chosen: the
    argmax over the columns of those classes (`outputs`: the class id of every column)."""
    column = {c: i for i, c in enumerate(outputs)}
    missing = [c for c in answers if c not in column]
    if missing:
        raise ValueError(f"classes {tuple(answers)} are not all among the model's {tuple(outputs)}")
    cols = torch.tensor([column[c] for c in answers], dtype=torch.long)
    return torch.tensor(list(answers))[logits[:, cols].argmax(1)]


def accuracy(logits: torch.Tensor, y: torch.Tensor, spec: ModelSpec,
             classes: tuple[int, ...] | None = None) -> float:
    """Accuracy of `logits` (from `spec`'s model) on global labels `y`.

    With `classes`, the prediction is restricted to those classes' logits and only samples of
    those classes count: a device's accuracy within its own context.
    """
    if classes is None:
        pred = torch.tensor(spec.class_ids)[logits.argmax(1)] if len(y) else y
    else:
        mask = torch.isin(y, torch.tensor(classes))
        y = y[mask]
        pred = restricted_predictions(logits[mask], spec.class_ids, classes)
    if len(y) == 0:
        return float("nan")
    return (pred == y).float().mean().item()


def global_scores(logits: torch.Tensor, y: torch.Tensor, spec: ModelSpec, other: int | None,
                  num_classes: int) -> dict:
    """global_acc, class_acc and test_loss of a model's logits on labels `y` (Others left out
    of the argmax; samples of classes the model lacks count as wrong, not in the loss)."""
    ids = torch.tensor(spec.class_ids)
    real = ids != (-1 if other is None else other)
    logits, ids = logits[:, real], ids[real]
    correct = (ids[logits.argmax(1)] == y).float()
    pos = torch.full((max(num_classes, int(ids.max()) + 1),), -1, dtype=torch.long)
    pos[ids] = torch.arange(len(ids))  # class id -> column of `logits`
    known = pos[y] >= 0
    loss = F.cross_entropy(logits[known], pos[y[known]]).item() if known.any() else None
    return {"global_acc": correct.mean().item(), "test_loss": loss,
            "class_acc": [correct[y == c].mean().item() if (y == c).any() else None
                          for c in range(num_classes)]}


def context_scores(logits: torch.Tensor, y: torch.Tensor, spec: ModelSpec,
                   classes: tuple[int, ...], other: int | None,
                   outputs: Sequence[int] | None = None) -> tuple[float, float, float, float]:
    """A device's (context accuracy, Others rejection rate, in-context accuracy with Others
    competing, open context accuracy) from its model's logits on labels `y`; the middle two
    are nan without Others. The open one takes the argmax over all the outputs the device's
    model has (`outputs`, class ids; default all of `spec`'s), Others among them and counting
    as wrong, on the images of the device's classes, as personalised-FL papers score a client
    (FedRep, Collins et al. 2021, models/test.py)."""
    acc = accuracy(logits, y, spec, classes)
    own = torch.isin(y, torch.tensor(classes))
    answers = tuple(outputs) if outputs is not None else spec.class_ids
    opened = (restricted_predictions(logits[own], spec.class_ids, answers) == y[own]
              ).float().mean().item() if own.any() else math.nan
    if other not in spec.class_ids:
        return acc, math.nan, math.nan, opened
    pred = restricted_predictions(logits, spec.class_ids, (*classes, other))
    inside = torch.isin(y, torch.tensor(classes))
    reject = (pred[~inside] == other).float().mean().item() if (~inside).any() else math.nan
    in_acc = (pred[inside] == y[inside]).float().mean().item() if inside.any() else math.nan
    return acc, reject, in_acc, opened


def shared_layers(spec: ModelSpec, states: Sequence[State]) -> int:
    """How many of the first layers of `spec` have equal tensors in every one of `states`."""
    for i, name in enumerate(spec.names):
        keys = [k for k in states[0] if k.rsplit(".", 1)[0] == name]
        if any(not torch.equal(s[k], states[0][k]) for s in states[1:] for k in keys):
            return i
    return len(spec.names)


def predict(spec: ModelSpec, state: State, x: torch.Tensor, mean: tuple[float, ...],
            std: tuple[float, ...], batch_size: int = EVAL_BATCH, precision: str = "fp32"
            ) -> torch.Tensor:
    """Logits (N, spec.num_classes) of the model on uint8 images, batched, in inference mode
    at `precision`, computed where the images are; returned on the CPU in float32."""
    model = load_model(spec, state, x.device).eval()
    out = []
    with torch.inference_mode(), autocast(precision, x.device):
        for start in range(0, len(x), batch_size):
            xb = to_float(x[start:start + batch_size], mean, std)
            out.append(model(xb.contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out).cpu() if out else torch.zeros(0, spec.num_classes)
