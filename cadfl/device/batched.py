"""Batched device training: several same-shape device models trained at once, as one network.

Small CNNs on a GPU are bound by the fixed cost of every operator call, not by arithmetic.
N devices whose models share their layers train together as one wide
network: their weights are stacked along a leading device dimension, a conv layer is one
grouped convolution whose group i holds device i's channels (device i's input channels are
channels i*C..(i+1)*C-1 of the stacked batch), a linear layer is one `torch.baddbmm` over the
device dimension, and SGD is one fused (`torch._foreach_*`) update over the stacked tensors.
Every step costs the operator calls of one model instead of N.

Each device keeps its own semantics exactly as `cadfl.device.train.train_local` defines them:
its own sample order and augmentation from its own `config.seed` (the same generator calls in
the same sequence), its own mean cross-entropy over its own batch, its local objective (one
with a batched gradient: FedProx's proximal term), torch's SGD (weight decay added to the
gradient, momentum buffer starting at the first d_p, no dampening, no nesterov), and its own
number of steps. Ragged work is handled so:

- A device's last batch of an epoch may be smaller than the others': the missing rows are
  filler (row 0 of the images) with loss weight 0, and batch norm then takes its statistics
  over each device's real rows only (a masked batch norm; steps where every device has a full
  batch use torch's own kernel).
- Devices that run out of steps stop changing: jobs are sorted by their number of steps, so
  the devices still training are always a prefix of the stack and the step trains views of
  that prefix (no masking of updates, no copies).

Activations are channels-last: PyTorch's CPU grouped convolution and max-pooling are 1.5-3x
faster than in NCHW on these shapes (NCHW made the whole step 0.65x the sequential loop).

What did not pay, measured on 2 shared CPU cores, one thread (10 devices x 256 images, batch 64,
against `train_local` one device after another):
- `torch.func.vmap(grad(...))` over the stacked weights: 0.6x the sequential loop.
- On a CPU the batched step gains little in any form: the sequential loop of these models is
  already bound by its convolutions, not by per-call overhead, and a grouped convolution over
  10 devices costs as much as 10 small ones (the first conv, with 3 input channels per group,
  up to 2x more for fl_cnn), while the 10x larger activations fall out of cache, so element-wise
  passes (ReLU backward, pooling, the optimizer) cost more per element. Measured: LeNet-5
  1.05-1.1x, digits_cnn 1.0x, fl_cnn 0.6x. The formulation is for accelerators, where one
  kernel launch per layer instead of N is what counts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..data.augment import crop_flip, crop_flip_draws
from ..fl.payload import Payload, TrainConfig, Update
from ..models import Layer, ModelSpec
from ..models.flops import train_flops_per_sample
from .objective import objective_of
from .precision import autocast
from .train import DeviceData, own_samples

BATCHED_KINDS = frozenset({"conv", "bn", "relu", "maxpool", "flatten", "linear", "dropout"})
BN_MOMENTUM = 0.1  # torch's BatchNorm2d defaults, as `build_model` creates them
BN_EPS = 1e-5


# The `TrainConfig` fields `train_batched` implements (a local objective only where it has a
# batched gradient). A payload whose config sets any other field away from its default (a
# hook: FedRep's head epochs, Ditto's personal model, SCAFFOLD's control variates, the label
# split, or any hook added later) trains one device at a time: batched training fails
# closed, it never silently ignores a hook.
BATCHED_FIELDS = frozenset({"epochs", "batch_size", "lr", "momentum", "weight_decay", "seed",
                            "augment", "fraction", "objective", "objective_args", "precision"})
_DEFAULTS = TrainConfig()


def batch_key(payload: Payload) -> tuple | None:
    """Jobs whose payloads have equal keys can train together in `train_batched`: the same
    layers, input shape and training config except the seed (class ids may differ).

    None when the payload cannot be batched: a task other than training, a layer kind the
    stacked forward below does not know (blocks), dropout with
    p > 0 (its masks come from torch's global generator, which batched devices cannot share),
    a local objective without a batched gradient, or a config field outside `BATCHED_FIELDS`
    that is not at its default.
    """
    spec, cfg = payload.spec, payload.config
    if payload.task != "train" or any(layer.kind == "dropout" and layer.p > 0
                                      for layer in spec.layers):
        return None
    if any(layer.kind not in BATCHED_KINDS for layer in spec.layers):
        return None  # residual blocks: one device at a time
    if any(getattr(cfg, f.name) != getattr(_DEFAULTS, f.name) for f in fields(TrainConfig)
           if f.name not in BATCHED_FIELDS):
        return None  # hooks train one device at a time
    if cfg.objective and objective_of(cfg.objective).add_gradient is None:
        return None
    if any(layer.groups is not None and len(set(layer.groups)) > 1 for layer in spec.layers):
        return None  # unequal channel groups (Fed2 with uneven groups): one at a time
    config = payload.config.to_dict()
    del config["seed"]
    return spec.input_shape, spec.layers, tuple(sorted(config.items()))


@dataclass
class _Job:
    """One device's prepared work: its samples and its whole schedule of random draws."""

    position: int  # index in the caller's job list
    payload: Payload
    data: DeviceData
    rows: torch.Tensor  # rows of data.images holding its samples of the model's classes
    y: torch.Tensor  # their logit-index labels
    global_y: torch.Tensor
    batches: list[int]  # size of every batch it trains, in order


def train_batched(jobs: Sequence[tuple[Payload, DeviceData]]) -> list[Update]:
    """Train every (payload, data) job at once and return their updates in order.

    Each update equals `train_local(payload, data)` up to float round-off (the same seeds,
    samples, augmentation, SGD and metrics). All payloads must have the same `batch_key`
    (not None) and all data the same compute device, crop padding and flip setting.
    """
    if not jobs:
        return []
    keys = {batch_key(p) for p, _ in jobs}
    if None in keys or len(keys) > 1:
        raise ValueError("train_batched needs payloads with one equal, non-None batch_key")
    first = jobs[0][1]
    dev = first.compute
    for _, data in jobs:
        if (data.compute, data.crop_padding, data.flip) != (dev, first.crop_padding,
                                                            first.flip):
            raise ValueError("train_batched needs data on one device with one augmentation")
    spec, cfg = jobs[0][0].spec, jobs[0][0].config
    prepared = sorted((_prepare(i, p, d, cfg) for i, (p, d) in enumerate(jobs)),
                      key=lambda j: -len(j.batches))
    trainer = _Trainer(spec, cfg, prepared, dev)
    trainer.run()
    updates: list[Update | None] = [None] * len(jobs)
    flops = train_flops_per_sample(spec)
    for slot, job in enumerate(prepared):
        seen = sum(job.batches)
        updates[job.position] = Update(
            state=trainer.state(slot), num_samples=len(job.y),
            class_counts=torch.bincount(job.global_y,
                                        minlength=job.data.num_classes).tolist(),
            metrics={"train_loss": float(trainer.loss_sum[slot]) / max(seen, 1),
                     "train_flops": float(flops * seen)})
    return updates  # type: ignore[return-value]


def _prepare(position: int, payload: Payload, data: DeviceData, cfg: TrainConfig) -> _Job:
    # Rows of the shared tensor: batches are gathered from it and normalised step by step,
    # so no job copies its data.
    rows, y, global_y = own_samples(payload.spec, data)
    n = len(y)
    per_epoch = [min(cfg.batch_size, n - s) for s in range(0, n, cfg.batch_size)]
    steps = math.ceil(cfg.fraction * cfg.epochs * len(per_epoch))
    batches = (per_epoch * cfg.epochs)[:steps]
    return _Job(position, payload, data, rows, y, global_y, batches)


class _Trainer:
    """The stacked state of all jobs (slot i = i-th job by descending number of steps) and the
    per-step tables of rows, labels, loss weights and augmentation draws."""

    def __init__(self, spec: ModelSpec, cfg: TrainConfig, jobs: list[_Job],
                 dev: torch.device):
        self.spec, self.cfg, self.jobs, self.dev = spec, cfg, jobs, dev
        self.steps = [len(j.batches) for j in jobs]
        n_jobs, steps = len(jobs), self.steps[0]
        width = max((b for j in jobs for b in j.batches), default=0)
        self.width = [max(j.batches[t] for j in jobs if len(j.batches) > t)
                      for t in range(steps)]
        self.full = [all(j.batches[t] == self.width[t] for j in jobs if len(j.batches) > t)
                     for t in range(steps)]
        self.keys = _state_keys(spec)
        self.stack = {k: torch.stack([j.payload.state[k].to(dev) for j in jobs])
                      for k in self.keys}
        self.params = [k for k in self.keys if not _is_buffer(k)]
        self.objective = objective_of(cfg.objective) if cfg.objective else None
        self.anchor = ({k: self.stack[k].clone() for k in self.params}
                       if self.objective is not None else None)
        self.momentum = ({k: torch.zeros_like(self.stack[k]) for k in self.params}
                         if cfg.momentum else None)
        self.loss_sum = torch.zeros(n_jobs, dtype=torch.float64, device=dev)

        # The jobs' image tensors (one when they share a dataset, the usual case); rows of a
        # short batch are filled with row 0, which the loss and batch norm leave out.
        sources = list({id(j.data.images): j.data.images for j in jobs}.values())
        self.images = sources[0] if len(sources) == 1 else torch.cat(sources)
        starts = dict(zip(map(id, sources), itertools.accumulate(
            (len(s) for s in sources[:-1]), initial=0), strict=True))
        # to_float's shift and scale, per job: x.float().sub_(shift).div_(scale)
        self.shift = torch.tensor([j.data.mean for j in jobs], dtype=torch.float32,
                                  device=dev).mul_(255)[:, :, None, None]
        self.scale = torch.tensor([j.data.std for j in jobs], dtype=torch.float32,
                                  device=dev).mul_(255)[:, :, None, None]
        shape = (n_jobs, steps, width)
        self.rows = torch.zeros(shape, dtype=torch.long, device=dev)
        self.labels = torch.zeros(shape, dtype=torch.long, device=dev)
        self.weight = torch.zeros(shape, device=dev)
        self.counts = torch.zeros(n_jobs, steps, dtype=torch.float64, device=dev)
        self.augment = cfg.augment and (jobs[0].data.crop_padding > 0 or jobs[0].data.flip)
        if self.augment:
            self.dy = torch.zeros(shape, dtype=torch.long, device=dev)
            self.dx = torch.zeros(shape, dtype=torch.long, device=dev)
            self.mirror = (torch.zeros(shape, dtype=torch.bool, device=dev)
                           if jobs[0].data.flip else None)
        for slot, job in enumerate(jobs):
            self._schedule(slot, job, starts[id(job.data.images)], width)

    def _schedule(self, slot: int, job: _Job, offset: int, width: int) -> None:
        """Draw the job's sample orders and augmentations exactly as `train_local` does (the
        same generator calls in the same sequence) and write them into its slot's tables."""
        cfg, data, n = self.cfg, job.data, len(job.y)
        if not job.batches:
            return
        gen = torch.Generator(self.dev).manual_seed(job.payload.config.seed)
        orders, draws, taken = [], [], 0
        for _ in range(cfg.epochs):
            if taken == len(job.batches):
                break
            orders.append(torch.randperm(n, generator=gen, device=self.dev))
            for _ in range(0, n, cfg.batch_size):
                if taken == len(job.batches):
                    break
                if self.augment:
                    draws.append(crop_flip_draws(job.batches[taken], data.crop_padding,
                                                 data.flip, gen))
                taken += 1
        seen = sum(job.batches)
        # Where each trained sample sits in the (steps, width) table: row t holds step t.
        dest = torch.tensor([t * width + i for t, b in enumerate(job.batches) for i in range(b)],
                            device=self.dev)
        order = torch.cat(orders)[:seen]
        self.rows[slot].view(-1)[dest] = job.rows[order] + offset
        self.labels[slot].view(-1)[dest] = job.y[order]
        self.weight[slot].view(-1)[dest] = torch.tensor(
            [1 / b for b in job.batches for _ in range(b)], device=self.dev)
        self.counts[slot, :len(job.batches)] = torch.tensor(job.batches, dtype=torch.float64)
        if self.augment:
            self.dy[slot].view(-1)[dest] = torch.cat([d[0] for d in draws]).view(-1)
            self.dx[slot].view(-1)[dest] = torch.cat([d[1] for d in draws]).view(-1)
            if self.mirror is not None:
                self.mirror[slot].view(-1)[dest] = torch.cat([d[2] for d in draws]).view(-1)

    def run(self) -> None:
        """All SGD steps: step t trains the jobs that have more than t steps (a prefix)."""
        alive, leaves = 0, {}
        for t in range(len(self.width)):
            now = sum(s > t for s in self.steps)
            if now != alive:  # some jobs are done: train views of the remaining prefix
                alive = now
                leaves = {k: self.stack[k][:alive].detach().requires_grad_()
                          for k in self.params}
            self._step(t, alive, leaves)

    def _step(self, t: int, k: int, leaves: dict[str, torch.Tensor]) -> None:
        b = self.width[t]
        rows = self.rows[:k, t, :b].T  # (b, k): batch-major, as the stacked input needs
        x = self.images[rows].to(torch.float32).sub_(self.shift[:k]).div_(self.scale[:k])
        if self.augment:
            flat = x.reshape(b * k, *x.shape[2:])
            mirror = None if self.mirror is None else self.mirror[:k, t, :b].T.reshape(-1, 1)
            x = crop_flip(flat, self.jobs[0].data.crop_padding,
                          self.dy[:k, t, :b].T.reshape(-1, 1),
                          self.dx[:k, t, :b].T.reshape(-1, 1), mirror)
        x = x.reshape(b, -1, *x.shape[-2:]).contiguous(memory_format=torch.channels_last)
        weight = self.weight[:k, t, :b]  # (k, b)
        with autocast(self.cfg.precision, self.dev):
            logits = self._forward(x, k, leaves, None if self.full[t] else weight > 0)
            ce = F.cross_entropy(logits.reshape(k * b, -1).float(),
                                 self.labels[:k, t, :b].reshape(-1), reduction="none").view(k, b)
        per_job = (ce * weight).sum(1)
        per_job.sum().backward()
        with torch.no_grad():
            self.loss_sum[:k] += per_job.double() * self.counts[:k, t]
            self._sgd(k, leaves)

    def _sgd(self, k: int, leaves: dict[str, torch.Tensor]) -> None:
        """torch.optim.SGD's update on the stacked tensors of the first k jobs, with the local
        objective's gradient added as autograd would add it."""
        cfg = self.cfg
        params = [leaves[name] for name in self.params]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        if self.objective is not None:
            self.objective.add_gradient(grads, params, [self.anchor[n][:k] for n in self.params],
                                        **dict(cfg.objective_args))
        if cfg.weight_decay:
            torch._foreach_add_(grads, params, alpha=cfg.weight_decay)
        if self.momentum is not None:
            # A zero buffer times momentum plus d_p is d_p exactly: torch's first step.
            bufs = [self.momentum[n][:k] for n in self.params]
            torch._foreach_mul_(bufs, cfg.momentum)
            torch._foreach_add_(bufs, grads)
            grads = bufs
        torch._foreach_add_(params, grads, alpha=-cfg.lr)

    def _forward(self, x: torch.Tensor, k: int, leaves: dict[str, torch.Tensor],
                 real: torch.Tensor | None) -> torch.Tensor:
        """Logits (k, b, K) of the k stacked models on the stacked batch x (b, k*C, H, W);
        `real` (k, b) marks the real rows when some job's batch is short (else None)."""
        for name, layer in zip(self.spec.names, self.spec.layers, strict=True):
            w, bias = leaves.get(f"{name}.weight"), leaves.get(f"{name}.bias")
            if layer.kind == "conv":
                groups = len(layer.groups) if layer.grouped_in else 1
                x = F.conv2d(x, w.reshape(-1, *w.shape[2:]),
                             None if bias is None else bias.reshape(-1),
                             layer.stride, layer.padding, groups=k * groups)
            elif layer.kind == "bn":
                x = self._batch_norm(x, name, k, w, bias, real)
            elif layer.kind == "relu":
                # In place: no layer before a ReLU keeps its output for backward, and a fresh
                # activation-sized output costs more than the ReLU itself on a CPU.
                x = F.relu_(x)
            elif layer.kind == "maxpool":
                x = F.max_pool2d(x, layer.kernel, layer.stride, layer.padding)
            elif layer.kind == "flatten":
                x = x.reshape(x.shape[0], k, -1).transpose(0, 1)  # (k, b, features)
            elif layer.kind == "linear":
                x = _linear(x, layer, w, bias)
        return x

    def _batch_norm(self, x: torch.Tensor, name: str, k: int, w: torch.Tensor,
                    bias: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Training-mode batch norm of each job's channels over its real rows, updating its
        running statistics as torch does (unbiased variance for the running one)."""
        mean_run = self.stack[f"{name}.running_mean"][:k]
        var_run = self.stack[f"{name}.running_var"][:k]
        if real is None:  # every batch full: torch's kernel on the k*C channels
            return F.batch_norm(x, mean_run.view(-1), var_run.view(-1), w.reshape(-1),
                                bias.reshape(-1), True, BN_MOMENTUM, BN_EPS)
        b, _, h, wd = x.shape
        xs = x.view(b, k, -1, h, wd).float()  # statistics in float32 at any precision
        mask = real.T[:, :, None, None, None].to(x.dtype)  # (b, k, 1, 1, 1)
        count = real.sum(1).to(x.dtype)[:, None] * (h * wd)  # (k, 1) values per channel
        mean = (xs * mask).sum((0, 3, 4)) / count  # (k, C)
        centred = xs - mean[None, :, :, None, None]
        var = (centred.square() * mask).sum((0, 3, 4)) / count
        scale = torch.rsqrt(var + BN_EPS) * w
        with torch.no_grad():
            mean_run.mul_(1 - BN_MOMENTUM).add_(mean, alpha=BN_MOMENTUM)
            var_run.mul_(1 - BN_MOMENTUM).add_(var * count / (count - 1), alpha=BN_MOMENTUM)
        out = centred * scale[None, :, :, None, None] + bias[None, :, :, None, None]
        return out.view_as(x)

    def state(self, slot: int) -> dict[str, torch.Tensor]:
        """The trained state of job `slot` on the CPU, keys in state-dict order."""
        out = {}
        for key in self.keys:
            value = self.stack[key][slot]
            if key.endswith("num_batches_tracked"):  # one per step taken
                value = value + self.steps[slot]
            out[key] = value.detach().to("cpu", copy=True).contiguous()
        return out


def _state_keys(spec: ModelSpec) -> list[str]:
    """The state-dict keys of `spec`'s model, in state-dict order."""
    keys = []
    for name, layer in zip(spec.names, spec.layers, strict=True):
        if layer.kind in ("conv", "linear"):
            keys += [f"{name}.weight"] + ([f"{name}.bias"] if layer.bias else [])
        elif layer.kind == "bn":
            keys += [f"{name}.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                              "num_batches_tracked")]
    return keys


def _is_buffer(key: str) -> bool:
    return key.rsplit(".", 1)[1] in ("running_mean", "running_var", "num_batches_tracked")


def _linear(x: torch.Tensor, layer: Layer, w: torch.Tensor, bias: torch.Tensor | None
            ) -> torch.Tensor:
    """The stacked linear layer on x (k, b, in): one batched matmul over the jobs, or for a
    grouped layer (weight (k, out, in/g)) each group of outputs from its group of inputs."""
    if layer.grouped_in:
        k, b, _ = x.shape
        g = len(layer.groups)
        y = torch.einsum("kbgi,kgoi->kbgo", x.reshape(k, b, g, -1),
                         w.view(k, g, -1, w.shape[-1])).reshape(k, b, -1)
        return y if bias is None else y + bias[:, None, :]
    if bias is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(bias[:, None, :], x, w.transpose(1, 2))
