"""The device side: build the network from a payload, train it on local tensors, evaluate.

Nothing here knows which algorithm sent the payload. Labels are global class ids; the payload's
spec says which class each logit stands for, and samples of other classes are left out.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.preference import class_activation_sums
from ..data.augment import random_crop_flip, to_float
from ..models import ModelSpec, build_model
from .payload import TASKS, Payload, State, Update

EVAL_BATCH = 1000
_train_flops_cache: dict[tuple, int] = {}
# Meta-device model of each spec seen, and its state's dtypes.
_skeletons: dict[ModelSpec, tuple[nn.Module, dict[str, torch.dtype]]] = {}


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


def label_map(spec: ModelSpec, num_classes: int, device: torch.device | str = "cpu"
              ) -> torch.Tensor:
    """Global class id -> logit index of `spec` (-1 for classes the model does not have)."""
    lut = torch.full((num_classes,), -1, dtype=torch.long)
    lut[torch.tensor(spec.class_ids)] = torch.arange(spec.num_classes)
    return lut.to(device)


def own_samples(spec: ModelSpec, data: DeviceData) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """The device's samples of the model's classes (others are left out): their rows in
    `data.images`, their logit-index labels and their global labels."""
    lut = label_map(spec, data.num_classes, data.compute)
    own = (lut[data.y] >= 0).nonzero().squeeze(1)
    rows = own if data.index is None else data.index[own]
    global_y = data.labels[rows]
    return rows, lut[global_y], global_y


def train_flops_per_sample(spec: ModelSpec) -> int:
    """Forward + backward FLOPs of one training sample, counted by torch (cached per spec)."""
    from ..analysis.profile import train_flops

    # FLOPs depend on the layers, not on which classes the logits stand for: CAD sub-models
    # of different contexts with as many classes share one count.
    key = (spec.input_shape, spec.layers)
    if key not in _train_flops_cache:
        batch = 2  # batch norm needs more than one value per channel in training mode
        _train_flops_cache[key] = train_flops(build_model(spec), spec.input_shape, batch) // batch
    return _train_flops_cache[key]


def train_local(payload: Payload, data: DeviceData) -> Update:
    """Train the payload's model on the device's data and return the update.

    Local SGD for `config.epochs` epochs with cross-entropy over the model's own classes, plus
    FedProx's proximal term (mu/2)||w - w_global||^2 when `config.mu` > 0; a straggler
    (`config.fraction` < 1) stops after that share of the SGD steps. All randomness
    (order, augmentation, dropout) comes from `config.seed`, so a device's training is a pure
    function of its payload and data.
    """
    cfg = payload.config
    # Each batch is gathered from the shared tensor and normalised on its own (the same
    # values as normalising the device's images at once, less copying).
    rows, y, global_y = own_samples(payload.spec, data)
    n, dev = len(y), data.compute
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator(dev).manual_seed(cfg.seed)
        model = load_model(payload.spec, payload.state, dev).train()
        params = list(model.parameters())
        anchor = [p.detach().clone() for p in params] if cfg.mu > 0 else None
        # foreach: one fused update over all tensors (torch's default only on CUDA)
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, foreach=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        steps = math.ceil(cfg.fraction * cfg.epochs * math.ceil(n / cfg.batch_size))
        seen = 0
        for _ in range(cfg.epochs):
            order = torch.randperm(n, generator=gen, device=dev)
            for start in range(0, n, cfg.batch_size):
                if steps <= 0:
                    break
                steps -= 1
                idx = order[start:start + cfg.batch_size]
                xb = to_float(data.images[rows[idx]], data.mean, data.std)
                if cfg.augment:
                    xb = random_crop_flip(xb, data.crop_padding, data.flip, gen)
                ce = F.cross_entropy(model(xb), y[idx])
                loss = ce
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = ce + cfg.mu / 2 * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += ce.detach() * len(idx)
                seen += len(idx)
    state = {k: v.detach().to("cpu", copy=True).contiguous()
             for k, v in model.state_dict().items()}
    return Update(
        state=state, num_samples=n,
        class_counts=torch.bincount(global_y, minlength=data.num_classes).tolist(),
        metrics={"train_loss": float(loss_sum) / max(seen, 1),
                 "train_flops": float(train_flops_per_sample(payload.spec) * seen)})


def report_activations(payload: Payload, data: DeviceData) -> Update:
    """Per-class sums of every filter's mean post-ReLU activation on the device's data.

    Only these class-level sums (and the class counts) leave the device, as the update's
    tensors keyed by layer name.
    """
    rows, _, y = own_samples(payload.spec, data)
    sums, counts = class_activation_sums(payload.spec, payload.state, data.images[rows], y,
                                         data.num_classes, data.mean, data.std)
    return Update(state={k: v.cpu() for k, v in sums.items()}, num_samples=len(y),
                  class_counts=counts.long().tolist())


def run_task(payload: Payload, data: DeviceData) -> Update:
    """Do what the payload asks: train, or report activation statistics."""
    if payload.task == "train":
        return train_local(payload, data)
    if payload.task == "activations":
        return report_activations(payload, data)
    raise ValueError(f"unknown payload task {payload.task!r}; valid: {', '.join(TASKS)}")


def predict(spec: ModelSpec, state: State, x: torch.Tensor, mean: tuple[float, ...],
            std: tuple[float, ...], batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Logits (N, spec.num_classes) of the model on uint8 images, batched, in inference mode,
    computed where the images are; returned on the CPU."""
    model = load_model(spec, state, x.device).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = to_float(x[start:start + batch_size], mean, std)
            out.append(model(xb.contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out).cpu() if out else torch.zeros(0, spec.num_classes)


def accuracy(logits: torch.Tensor, y: torch.Tensor, spec: ModelSpec,
             classes: tuple[int, ...] | None = None) -> float:
    """Accuracy of `logits` (from `spec`'s model) on global labels `y`.

    With `classes`, the prediction is restricted to those classes' logits and only samples of
    those classes count: a device's accuracy within its own context.
    """
    ids = torch.tensor(spec.class_ids)
    if classes is not None:
        size = max(*spec.class_ids, *classes) + 1
        pos = label_map(spec, size)[torch.tensor(classes)]
        if (pos < 0).any():
            raise ValueError(f"classes {classes} are not all among the model's {spec.class_ids}")
        mask = torch.isin(y, torch.tensor(classes))
        logits, y, ids = logits[mask][:, pos], y[mask], ids[pos]
    if len(y) == 0:
        return float("nan")
    return (ids[logits.argmax(1)] == y).float().mean().item()
