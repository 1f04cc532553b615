"""Scoring a round: the cloud's model on the test set, and every device's own model on its
classes' test images (one pass of the global model where that is each device's model, shared
layers once where the devices' models share them)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from ..data.augment import to_float
from ..device.executor import Job, Runtime, Scores
from ..device.model import load_model
from ..device.precision import autocast
from ..device.score import EVAL_BATCH, context_scores, global_scores, predict, shared_layers
from ..fl import Strategy
from ..fl.payload import State
from ..models import ModelSpec
from .experiment import Experiment

# Scores devices' own models where they are (`Executor.score`).
DeviceScorer = Callable[[Iterable[Job]], Iterator[tuple[int, Scores]]]
EVAL_KEYS = ("global_acc", "context_acc", "eval_devices", "test_loss", "class_acc",
             "others_reject", "others_in_acc", "context_open_acc")


def evaluation_devices(exp: Experiment, rnd: int) -> list[int]:
    """The devices whose own models are scored: all, or a seeded sample of
    `eval_devices` of them."""
    holding = exp.holding()
    if not exp.cfg.eval_devices or exp.cfg.eval_devices >= len(holding):
        return holding
    rng = np.random.default_rng([exp.cfg.seed, rnd, 0xE7A1])
    return sorted(rng.choice(np.asarray(holding, dtype=np.int64),
                             size=exp.cfg.eval_devices, replace=False).tolist())


def evaluate(exp: Experiment, strategy: Strategy, rnd: int, state: State,
             runtime: Runtime | None = None, score: DeviceScorer | None = None
             ) -> dict[str, float | None]:
    """Scores of round `rnd` (keys `EVAL_KEYS`).

    Of the cloud's model: global_acc, class_acc (per class) and test_loss, the argmax over
    its classes without Others (a class it does not know yet counts as wrong). Over the
    devices: context_acc, each device's accuracy within its own classes (`eval_devices`:
    how many were scored); with an Others output, others_reject (share of out-of-context
    test images a device answers "Others") and others_in_acc (accuracy on its own classes
    with "Others" among the answers); context_open_acc, each device's accuracy on its own
    classes' images with the argmax over all its model's outputs. When every device's
    model is the global one restricted to its classes, one pass of the global model scores
    all devices; otherwise each sampled device's own model (with what it keeps) is run: here, or by
    `score` where the devices keep their state themselves (Flower nodes); a device that
    does not answer `score` is left out of the mean.
    """
    ds, test_x = exp.dataset, exp.on_device.test_x
    runtime = runtime or exp.runtime()
    out: dict = dict.fromkeys(EVAL_KEYS)
    model = strategy.global_model(state)
    logits = None
    if model is not None:
        spec, weights = model
        logits = predict(spec, weights, test_x, ds.mean, ds.std, precision=exp.precision)
        out.update(global_scores(logits, ds.test_y, spec, exp.other, ds.num_classes))
    scores = []
    # Devices with images of their own (Flower nodes' own data) score on their own
    # held-out images, never on the server's test set.
    if logits is not None and strategy.device_model_is_global() and ds.owners is None:
        # One pass of the global model scores every device: restrict the argmax per
        # device, once per distinct class set.
        by_classes: dict[tuple, Scores] = {}
        for d in exp.devices:
            outputs = strategy.device_outputs(d.id)
            if (d.classes, outputs) not in by_classes:
                by_classes[d.classes, outputs] = context_scores(logits, ds.test_y, spec,
                                                                d.classes, exp.other, outputs)
            scores.append(by_classes[d.classes, outputs])
    else:
        jobs = strategy.configure_evaluate(rnd, state, evaluation_devices(exp, rnd))
        if score is not None:
            scores = [s for _, s in score(jobs)]
        else:
            scores = score_devices(exp, [(d, p.spec, runtime.own_state(d, p))
                                         for d, p in jobs])
    out["eval_devices"] = len(scores)
    if not scores:  # no device answered
        return out
    acc, reject, inside, opened = zip(*scores, strict=True)
    out["context_acc"] = float(np.nanmean(acc))
    out["context_open_acc"] = float(np.nanmean(opened))
    if not all(math.isnan(r) for r in reject):
        out["others_reject"] = float(np.nanmean(reject))
        out["others_in_acc"] = float(np.nanmean(inside))
    return out


def score_device(exp: Experiment, device: int, spec: ModelSpec, state: State
                 ) -> Scores:
    """`context_scores` of one device's own model (`spec`, `state`) on the test images
    of its classes in the current round (all test images when it answers Others)."""
    ds, test_x = exp.dataset, exp.on_device.test_x
    mask = _scored_images(exp, device, spec)
    logits = predict(spec, state, test_x[mask.to(test_x.device)], ds.mean, ds.std,
                     precision=exp.precision)
    return context_scores(logits, ds.test_y[mask], spec, exp.devices[device].classes,
                          exp.other)


def score_devices(exp: Experiment, models: list[tuple[int, ModelSpec, State]]
                  ) -> list[Scores]:
    """`score_device` of every (device, spec, state), in order, with the layers their
    models share computed once: devices whose models have the same layers and the same
    weights in the first of them (FedPer's and FedRep's body) run those layers once over
    the test images, and only their own layers each."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, spec, _) in enumerate(models):
        groups.setdefault((spec.input_shape, spec.layers), []).append(i)
    scores: list[Scores | None] = [None] * len(models)
    for members in groups.values():
        states = [models[i][2] for i in members]
        spec = models[members[0]][1]
        shared = shared_layers(spec, states) if len(members) > 1 else 0
        if shared == 0:
            for i in members:
                scores[i] = score_device(exp, *models[i])
            continue
        for i, logits in zip(members, _suffix_logits(exp,
                spec, shared, [models[i] for i in members]), strict=True):
            device, own_spec, _ = models[i]
            mask = _scored_images(exp, device, own_spec)
            scores[i] = context_scores(logits, exp.dataset.test_y[mask], own_spec,
                                       exp.devices[device].classes, exp.other)
    return scores  # type: ignore[return-value]


def _scored_images(exp: Experiment, device: int, spec: ModelSpec) -> torch.Tensor:
    """Mask of the test images a device is scored on: its classes' (all of them when it
    answers Others, whose rejection needs the other images too)."""
    mask = torch.isin(exp.dataset.test_y, torch.tensor(exp.devices[device].classes))
    if exp.other in spec.class_ids:
        mask[:] = True
    return mask


def _suffix_logits(exp: Experiment, spec: ModelSpec, shared: int,
                   models: list[tuple[int, ModelSpec, State]]) -> list[torch.Tensor]:
    """Each model's logits on its scored images: the first `shared` layers (the same in
    every model) run once per batch of test images, each model's own layers on its rows
    of that batch. Batch by batch, so memory stays that of one batch's activations."""
    ds, test_x = exp.dataset, exp.on_device.test_x
    dev = test_x.device
    trunk = load_model(spec, models[0][2], dev).eval()[:shared]
    heads = [load_model(spec, state, dev).eval()[shared:]
             for _, _, state in models]
    masks = [_scored_images(exp, d, s).to(dev) for d, s, _ in models]
    out: list[list[torch.Tensor]] = [[] for _ in models]
    with torch.inference_mode(), autocast(exp.precision, dev):
        for start in range(0, len(test_x), EVAL_BATCH):
            xb = to_float(test_x[start:start + EVAL_BATCH], ds.mean, ds.std)
            features = trunk(xb.contiguous(memory_format=torch.channels_last))
            for head, mask, logits in zip(heads, masks, out, strict=True):
                rows = mask[start:start + EVAL_BATCH]
                if rows.any():
                    logits.append(head(features[rows]).float())
    return [torch.cat(parts).cpu() if parts else torch.zeros(0, spec.num_classes)
            for parts in out]
