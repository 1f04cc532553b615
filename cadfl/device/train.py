"""The device side: build the network from a payload, train it on local tensors, evaluate.

Nothing here knows which algorithm sent the payload. Labels are global class ids; the payload's
spec says which class each logit stands for, and samples of other classes are left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..cad.preference import class_activation_sums
from ..data.augment import crop_flip, crop_flip_draws, to_float
from ..fl.payload import (
    CONTROL,
    OWN_CONTROL,
    PERSONAL,
    TASKS,
    Payload,
    State,
    TrainConfig,
    Update,
    matches,
    model_part,
)
from ..models import ModelSpec
from ..models.flops import personal_fit_flops, train_flops_per_sample
from .model import load_model
from .objective import objective_of
from .precision import autocast
from .score import EVAL_BATCH, label_map

# Ditto's personal model is pulled towards the received model by FedProx's proximal term: the
# local objective `cadfl.fl.fedprox` registers under this name.
PERSONAL_OBJECTIVE = "prox"

# Mixed into a device's seed for the batch order of its personal copy's fit.
PERSONAL_SEED = 0x5EED_CAD

# A local objective's penalty with its arguments bound: (params, anchor) -> scalar tensor.
BoundPenalty = Callable[[dict[str, nn.Parameter], State], torch.Tensor]


@dataclass
class DeviceData:
    """A device's local samples: rows `index` of shared dataset tensors (all rows when None),
    with the dataset's normalisation and augmentation.

    The tensors are the whole dataset's, not copies: thousands of devices cost one dataset.
    They may live on a GPU, where the device's training then runs.
    """

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 global labels (N,)
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    flip: bool = False
    index: torch.Tensor | None = None

    @property
    def x(self) -> torch.Tensor:
        """The device's images (a gathered copy)."""
        return self.images if self.index is None else self.images[self.index]

    @property
    def y(self) -> torch.Tensor:
        """The device's labels."""
        return self.labels if self.index is None else self.labels[self.index]

    @property
    def compute(self) -> torch.device:
        """Where the data live, and so where the device's model runs."""
        return self.images.device

    def __len__(self) -> int:
        return len(self.labels) if self.index is None else len(self.index)

    def class_counts(self) -> list[int]:
        """Samples per global class."""
        return torch.bincount(self.y, minlength=self.num_classes).tolist()


def own_samples(spec: ModelSpec, data: DeviceData) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """The device's samples of the model's classes (others are left out): their rows in
    `data.images`, their logit-index labels and their global labels."""
    lut = label_map(spec, data.num_classes, data.compute)
    own = (lut[data.y] >= 0).nonzero().squeeze(1)
    rows = own if data.index is None else data.index[own]
    global_y = data.labels[rows]
    return rows, lut[global_y], global_y


def train_local(payload: Payload, data: DeviceData) -> Update:
    """Train the payload's model on the device's data and return the update.

    Local SGD for `config.epochs` epochs with cross-entropy over the model's own classes,
    plus the penalty of the local objective the config names (FedProx's proximal term); a
    straggler (`config.fraction` < 1) stops after that share of the SGD steps. The config's
    other hooks (FedRep's head-then-body schedule, Ditto's personal model, SCAFFOLD's control
    variates, HeteroFL's label split: see `TrainConfig`) change the objective or the
    schedule, never the algorithm-free shape of this function. All randomness (order,
    augmentation, dropout) comes from `config.seed`, so a device's training is a pure
    function of its payload and data.
    """
    cfg, spec = payload.config, payload.spec
    rows, y, global_y = own_samples(spec, data)
    dev = data.compute
    received = model_part(payload.state)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        loop = LocalSGD(payload, data, rows, y, torch.Generator(dev).manual_seed(cfg.seed))
        model = load_model(spec, received, dev).train()
        out: State = {}
        control = _control_terms(payload.state, dev) if cfg.control else None
        penalty = (partial(objective_of(cfg.objective).penalty, **dict(cfg.objective_args))
                   if cfg.objective else None)
        fitted = 0.0
        if cfg.personal_epochs:  # CAD's personal paths: the device's copy, on frozen features
            personal, fitted = _fit_personal(payload, data, loop, received)
            out.update({PERSONAL + k: v for k, v in personal.items()})
        start_steps = loop.steps_done
        if cfg.head_epochs:  # FedRep: the head alone, then the body alone
            head = {n: p for n, p in loop.named(model).items() if matches(n, cfg.head)}
            body = {n: p for n, p in loop.named(model).items() if n not in head}
            loop.run(model, head, cfg.head_epochs, penalty, received)
            loop.run(model, body, cfg.epochs, penalty, received)
        else:
            loop.run(model, loop.named(model), cfg.epochs, penalty, received, control=control)
        state = _cpu_state(model)
        if cfg.personal_lambda > 0:  # Ditto: then the personal model, anchored at w_received
            kept = model_part(payload.state, PERSONAL)
            own = {k: _grown(kept[k], v, v) if k in kept else v for k, v in received.items()}
            personal = load_model(spec, own, dev).train()
            pull = partial(objective_of(PERSONAL_OBJECTIVE).penalty, mu=cfg.personal_lambda)
            loop.run(personal, loop.named(personal), cfg.epochs, pull, received)
            out.update({PERSONAL + k: v for k, v in _cpu_state(personal).items()})
        if control is not None:
            # SCAFFOLD option II: c_i+ = c_i - c + (x - y) / (K lr), the mean step the device
            # took per unit of learning rate (with momentum and weight decay in it).
            k = max(loop.steps_done - start_steps, 1)
            for name, (c, ci) in control.items():
                ci = ci.cpu()
                new_ci = ci - c.cpu() + (received[name] - state[name]) / (k * cfg.lr)
                out[CONTROL + name] = new_ci - ci
                out[OWN_CONTROL + name] = new_ci
    return Update(
        state={**state, **out}, num_samples=len(y),
        class_counts=torch.bincount(global_y, minlength=data.num_classes).tolist(),
        metrics={"train_loss": loop.mean_loss(),
                 "train_flops": float(train_flops_per_sample(spec) * loop.seen) + fitted})


def _lr_groups(params: dict[str, nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """Optimizer parameter groups: each parameter at `cfg.lr` times the factor of the first
    `cfg.lr_scales` pattern its name matches (1 if none), in the parameters' order."""
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in params.items():
        factor = next((f for pattern, f in cfg.lr_scales if matches(name, (pattern,))), 1.0)
        groups.setdefault(factor, []).append(p)
    return [{"params": ps, "lr": cfg.lr * f} for f, ps in groups.items()]


def _fit_personal(payload: Payload, data: DeviceData, loop: LocalSGD, received: State
                  ) -> tuple[State, float]:
    """The device's copy of its `personal_head` layers (the received ones the first time)
    fitted for `personal_epochs` epochs of SGD on the features that the received model's
    earlier layers give its images, and the FLOPs that took. The features are computed once,
    without augmentation, so an epoch costs only the copy's own layers. Its batch order has
    a generator of its own: the training after it is the same as without it."""
    cfg, spec, dev = payload.config, payload.spec, data.compute
    kept = model_part(payload.state, PERSONAL)
    mine = {k: kept.get(k, v) for k, v in received.items() if matches(k, cfg.personal_head)}
    first = min(spec.names.index(k.split(".", 1)[0]) for k in mine)
    model = load_model(spec, {**received, **mine}, dev)
    trunk, head = model[:first].eval(), model[first:].train()
    n = len(loop.y)
    with torch.no_grad(), autocast(cfg.precision, dev):
        features = torch.cat([
            trunk(to_float(data.images[loop.rows[s:s + EVAL_BATCH]], data.mean, data.std)
                  .contiguous(memory_format=torch.channels_last)).float()
            for s in range(0, n, EVAL_BATCH)])
    for p in head.parameters():
        p.requires_grad_(False)
    params = [p for name, p in head.named_parameters() if name in mine]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, foreach=True)
    gen = torch.Generator(dev).manual_seed(cfg.seed ^ PERSONAL_SEED)
    for _ in range(cfg.personal_epochs):
        order = torch.randperm(n, generator=gen, device=dev)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            with autocast(cfg.precision, dev):
                logits = head(features[idx])
                if loop.mask is not None:
                    logits = logits + loop.mask
                loss = F.cross_entropy(logits.float(), loop.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    trunk_forward, head_step = personal_fit_flops(spec, first)
    fitted = {k: v for k, v in _cpu_state(head).items() if k in mine}
    return fitted, float(n * (trunk_forward + cfg.personal_epochs * head_step))


def _cpu_state(model: nn.Module) -> State:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _control_terms(state: State, dev: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per parameter: the server's control variate and the device's own (zero at first, and
    for the rows of a class the model gained since)."""
    server, own = model_part(state, CONTROL), model_part(state, OWN_CONTROL)
    zeros = {n: torch.zeros_like(c) for n, c in server.items()}
    return {n: (c.to(dev), _grown(own.get(n, zeros[n]), c, zeros[n]).to(dev))
            for n, c in server.items()}


def _grown(mine: torch.Tensor, like: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """A tensor the device kept, with the rows the model gained since (New Class: appended
    logits) taken from `fill`."""
    if mine.shape == like.shape:
        return mine
    if mine.shape[1:] != like.shape[1:] or len(mine) > len(like):
        raise ValueError(f"a kept tensor of shape {tuple(mine.shape)} does not fit the model's "
                         f"{tuple(like.shape)}")
    return torch.cat([mine.to(fill.dtype), fill[len(mine):]])


class LocalSGD:
    """The local SGD loop over one device's samples, shared by every phase of `train_local`:
    it draws batch order and augmentation from one generator and counts steps, samples and
    loss across phases (the straggler's step budget included)."""

    def __init__(self, payload: Payload, data: DeviceData, rows: torch.Tensor, y: torch.Tensor,
                 gen: torch.Generator) -> None:
        self.cfg, self.data, self.rows, self.y, self.gen = payload.config, data, rows, y, gen
        n, cfg = len(y), payload.config
        epochs = cfg.epochs * (1 + (cfg.personal_lambda > 0)) + cfg.head_epochs
        self.budget = math.ceil(cfg.fraction * epochs * math.ceil(n / cfg.batch_size))
        self.steps_done = self.seen = 0
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=data.compute)
        # Label split: logits of the classes the device has no samples of take no part.
        self.mask = None
        if cfg.mask_absent:
            present = torch.zeros(payload.spec.num_classes, dtype=torch.bool, device=y.device)
            present[y] = True
            self.mask = torch.where(present, 0.0, float("-inf"))

    @staticmethod
    def named(model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters by state-dict name."""
        return dict(model.named_parameters())

    def run(self, model: nn.Module, params: dict[str, nn.Parameter], epochs: int,
            penalty: BoundPenalty | None = None, anchor: State | None = None,
            control: dict[str, tuple[torch.Tensor, ...]] | None = None) -> None:
        """`epochs` epochs of SGD on `params` only (the others stay as they are), with
        `penalty(params, anchor)` added to the cross-entropy when given and, with `control`,
        SCAFFOLD's correction w -= lr (c - c_i) after every optimizer step. The correction
        stays out of the momentum buffer: fed through it (added to the gradient) it diverged
        on paper-flcnn at lr 0.01 and momentum 0.9, where the same correction after the step
        (as NIID-Bench's `train_net_scaffold` applies it) and plain SGD are stable."""
        cfg, data = self.cfg, self.data
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        names, plist = list(params), list(params.values())
        # The anchor on the compute device once, not at every step.
        centre = ({k: anchor[k].to(data.compute) for k in names} if penalty is not None
                  else None)
        # foreach: one fused update over all tensors (torch's default only on CUDA)
        opt = torch.optim.SGD(_lr_groups(params, cfg), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, foreach=True)
        drift = ([control[k][0] - control[k][1] for k in names] if control is not None
                 else None)  # c - c_i, the same at every step of the round
        for idx, draws in self.batches(epochs):
            xb = to_float(data.images[self.rows[idx]], data.mean, data.std)
            if draws is not None:
                xb = crop_flip(xb, data.crop_padding, *draws)
            with autocast(cfg.precision, data.compute):
                logits = model(xb)
                if self.mask is not None:
                    logits = logits + self.mask
                ce = F.cross_entropy(logits.float(), self.y[idx])
            loss = ce if centre is None else ce + penalty(params, centre)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if drift is not None:
                with torch.no_grad():
                    for w, d in zip(plist, drift, strict=True):
                        w.sub_(d, alpha=cfg.lr)
            self.record(ce.detach(), len(idx))

    def batches(self, epochs: int) -> Iterator[tuple[torch.Tensor, tuple | None]]:
        """`epochs` epochs of batches, as each step's sample indices (into `rows` and `y`) and
        its augmentation draws (`crop_flip_draws`; None without augmentation), drawn from the
        loop's generator as they are taken; counts the steps and ends at the step budget."""
        cfg, data, n = self.cfg, self.data, len(self.y)
        augment = cfg.augment and (data.crop_padding > 0 or data.flip)
        for _ in range(epochs):
            order = torch.randperm(n, generator=self.gen, device=data.compute)
            for start in range(0, n, cfg.batch_size):
                if self.steps_done >= self.budget:
                    return
                self.steps_done += 1
                idx = order[start:start + cfg.batch_size]
                yield idx, (crop_flip_draws(len(idx), data.crop_padding, data.flip, self.gen)
                            if augment else None)

    def record(self, loss: torch.Tensor | float, samples: int) -> None:
        """Count a step's mean cross-entropy `loss` over `samples` samples."""
        self.loss_sum += loss * samples
        self.seen += samples

    def mean_loss(self) -> float:
        """Mean cross-entropy per sample seen."""
        return float(self.loss_sum) / max(self.seen, 1)


def report_activations(payload: Payload, data: DeviceData) -> Update:
    """Per-class sums of every filter's mean post-ReLU activation on the device's data.

    Only these class-level sums (and the class counts) leave the device, as the update's
    tensors keyed by layer name.
    """
    rows, _, y = own_samples(payload.spec, data)
    sums, counts = class_activation_sums(payload.spec, payload.state, data.images[rows], y,
                                         data.num_classes, data.mean, data.std,
                                         precision=payload.config.precision)
    return Update(state={k: v.cpu() for k, v in sums.items()}, num_samples=len(y),
                  class_counts=counts.long().tolist())


def run_task(payload: Payload, data: DeviceData) -> Update:
    """Do what the payload asks: train, or report activation statistics."""
    if payload.task == "train":
        return train_local(payload, data)
    if payload.task == "activations":
        return report_activations(payload, data)
    raise ValueError(f"unknown payload task {payload.task!r}; valid: {', '.join(TASKS)}")
