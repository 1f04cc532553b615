"""A device's local training in ExecuTorch's runtime instead of PyTorch: what a phone runs.

A Flower SuperNode started with `--node-config 'trainer="executorch"'` trains each round's model
this way (`cadfl.flower.client_app`). The payload's model, with its received weights, becomes
an ExecuTorch training program (`cadfl.export.trainable`: forward, restricted loss and
backward in one graph, batch norm in training mode, uint8 N x H x W x C input normalised
inside); ExecuTorch's SGD steps it through the same batches, in the same order, that
`train_local` would draw; the weights and statistics are read back by name and leave as the
usual update. The server sees the same update, plus `TRAINER_METRIC` in its metrics.

The program is exported every round, with that round's weights inside: a fresh ClientApp
process serves each message of a deployment, so there is nothing to cache across rounds, and
the weights inside the program are where the runtime's batch-norm statistics start.

What differs from PyTorch, by design:
- Plain local SGD only (epochs, batch size, lr, momentum, weight decay, the straggler's share
  of the steps): the hooks that change the objective or the schedule (FedProx, FedRep,
  Ditto, SCAFFOLD, the label split, CAD's personal paths and path learning rate) are refused
  with a one-line error.
- Augmentation runs on the uint8 images the program takes: the random crop's padding is the
  dataset's mean colour rounded to a whole grey level (PyTorch pads exactly the mean); the
  crop offsets and mirrors are the same draws.
- The program computes in float32 whatever the run's precision; dropout masks come from the
  runtime's own generator.
- Other tasks (CAD's activation report) and evaluation stay in PyTorch: they train nothing.
"""

from __future__ import annotations

import torch

from ..data.augment import crop_flip
from ..export.trainable import Trainer, require_executorch, step_program, training_step
from ..fl.payload import Payload, TrainConfig, Update, model_part
from ..models.flops import train_flops_per_sample
from .train import DeviceData, LocalSGD, own_samples, run_task

# In the update's metrics of a device that trained in ExecuTorch (1.0): how the server can
# tell.
TRAINER_METRIC = "trainer_executorch"


def unsupported_hooks(cfg: TrainConfig) -> list[str]:
    """The training hooks `cfg` switches on beyond plain local SGD (none: it can run in
    ExecuTorch); changes nothing."""
    asks = {"a local objective (FedProx's proximal term)": bool(cfg.objective),
            "a head-then-body schedule (FedRep)": cfg.head_epochs > 0,
            "a personal model (Ditto)": cfg.personal_lambda > 0,
            "control variates (SCAFFOLD)": cfg.control,
            "a label split (HeteroFL)": cfg.mask_absent,
            "personal paths (CAD's cad.personal)": cfg.personal_epochs > 0,
            "per-layer learning rates (CAD's cad.path_lr)":
                any(f != 1 for _, f in cfg.lr_scales)}
    return [hook for hook, on in asks.items() if on]


def train_executorch(payload: Payload, data: DeviceData) -> Update:
    """Do what the payload asks, training in ExecuTorch's runtime (see the module docstring);
    ValueError when its training needs more than plain local SGD."""
    if payload.task != "train":
        return run_task(payload, data)
    cfg, spec = payload.config, payload.spec
    hooks = unsupported_hooks(cfg)
    if hooks:
        raise ValueError(f"trainer=executorch runs plain local SGD, and this round's training "
                         f"also asks for {', '.join(hooks)}: use the PyTorch trainer")
    require_executorch()
    rows, y, global_y = own_samples(spec, data)
    received = model_part(payload.state)
    loop = LocalSGD(payload, data, rows, y, torch.Generator(data.compute).manual_seed(cfg.seed))
    state = {k: v.clone() for k, v in received.items()}
    if len(y):
        step = training_step(spec, received, data.mean, data.std)
        trainer = Trainer(step_program(step, spec, max(2, cfg.batch_size)), step.buffer_names,
                          cfg)
        # The crop's padding in uint8: the mean colour, to the nearest grey level.
        fill = torch.tensor(data.mean, device=data.compute).mul(255).round().view(1, -1, 1, 1)
        for idx, draws in loop.batches(cfg.epochs):
            x = data.images[rows[idx]]
            if draws is not None:
                x = (crop_flip(x.float() - fill, data.crop_padding, *draws) + fill).to(torch.uint8)
            loss = trainer.step(x.permute(0, 2, 3, 1).contiguous().cpu(), y[idx].cpu())
            loop.record(loss, len(idx))
        if loop.steps_done:
            state = trainer.state()
    missing = set(received) - set(state)
    if missing:
        raise RuntimeError(f"the training program did not return {sorted(missing)}")
    return Update(
        state=state, num_samples=len(y),
        class_counts=torch.bincount(global_y, minlength=data.num_classes).tolist(),
        metrics={"train_loss": loop.mean_loss(),
                 "train_flops": float(train_flops_per_sample(spec) * loop.seen),
                 TRAINER_METRIC: 1.0})
