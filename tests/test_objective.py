"""A local objective belongs to its algorithm's file: a new algorithm registers its own term and
strategy (here, in this test module alone) and the one training loop trains with it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
from torch import nn

from cadfl.checks import check_range
from cadfl.config import load_config
from cadfl.device.batched import batch_key
from cadfl.device.objective import LOCAL_OBJECTIVES, local_objective
from cadfl.device.train import DeviceData, train_local
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.run import run_experiment
from cadfl.fl import ALGORITHMS
from cadfl.fl.fedavg import FedAvg
from cadfl.fl.payload import Payload, State, TrainConfig
from cadfl.fl.registry import register
from cadfl.models import Layer, ModelSpec, build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def l1_term(params: dict[str, nn.Parameter], anchor: State, mu: float) -> torch.Tensor:
    """mu * ||w - w_received||_1: the new algorithm's own local objective."""
    return mu * sum((p - anchor[name]).abs().sum() for name, p in params.items())


@dataclass
class L1ProxOptions:
    mu: float = 0.05

    def check(self, cfg: Any) -> None:
        check_range("l1prox.mu", self.mu, 0)


@pytest.fixture
def l1prox():
    """The algorithm "l1prox" (FedAvg with the L1 term "l1"), unregistered afterwards."""
    local_objective("l1")(l1_term)

    @register
    class L1Prox(FedAvg):
        """FedAvg whose devices train with an L1 pull towards the received model."""

        name = "l1prox"
        summary = "a test algorithm"
        Options = L1ProxOptions

        def __init__(self, *args, mu: float = 0.05, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.mu = mu

        def device_config(self, rnd: int, device: int) -> TrainConfig:
            return replace(super().device_config(rnd, device), objective="l1",
                           objective_args=(("mu", self.mu),))

    try:
        yield L1Prox
    finally:
        ALGORITHMS.pop("l1prox")
        LOCAL_OBJECTIVES.pop("l1")


TINY = ModelSpec("tiny", (1, 2, 2), (Layer("flatten"), Layer("linear", 4, 3)))


def tiny_job(config: TrainConfig) -> tuple[Payload, DeviceData]:
    """The tiny linear model on 12 random 2x2 images of 3 classes."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 1, 2, 2), dtype=torch.uint8, generator=g)
    labels = torch.arange(12) % 3
    torch.manual_seed(1)
    state = build_model(TINY).state_dict()
    return Payload(TINY, state, config), DeviceData(images, labels, 3, (0.5,), (0.25,))


def test_a_device_trains_with_the_algorithms_own_objective(l1prox):
    """Three full-batch SGD steps of CE + mu * ||w - w0||_1, the gradient written out by hand
    in float64: softmax minus one-hot for the cross-entropy, mu * sign(w - w0) for the term
    (zero at w0, as autograd's)."""
    mu, lr, steps = 0.2, 0.1, 3
    config = TrainConfig(epochs=steps, batch_size=12, lr=lr, momentum=0.0, weight_decay=0.0,
                         augment=False, objective="l1", objective_args=(("mu", mu),))
    payload, data = tiny_job(config)
    update = train_local(payload, data)

    x = ((data.images.double() / 255 - 0.5) / 0.25).reshape(12, 4)
    onehot = torch.nn.functional.one_hot(data.labels, 3).double()
    w0, b0 = payload.state["fc1.weight"].double(), payload.state["fc1.bias"].double()
    w, b, losses = w0.clone(), b0.clone(), []
    for _ in range(steps):
        probs = torch.softmax(x @ w.T + b, dim=1)
        losses.append(-(probs * onehot).sum(1).log().mean().item())
        error = (probs - onehot) / len(x)
        w, b = (w - lr * (error.T @ x + mu * torch.sign(w - w0)),
                b - lr * (error.sum(0) + mu * torch.sign(b - b0)))
    torch.testing.assert_close(update.state["fc1.weight"].double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update.state["fc1.bias"].double(), b, rtol=1e-5, atol=1e-6)
    assert update.metrics["train_loss"] == pytest.approx(sum(losses) / steps, rel=1e-5)
    without = train_local(replace(payload, config=replace(config, objective="")), data)
    assert not torch.allclose(without.state["fc1.weight"], update.state["fc1.weight"])


def test_the_new_algorithm_runs_end_to_end_and_trains_one_device_at_a_time(
        tmp_path, digits, l1prox):
    """Two rounds of "l1prox" beside FedAvg on digits: it differs from FedAvg only by its
    objective, and batched training, which has no gradient for it, falls back to training the
    devices one by one with the same result."""
    args = ['algorithms=["fedavg", "l1prox"]', "rounds=2", "devices=4", "overrides={}",
            "l1prox.mu=0.01"]
    cfg = load_config(None, args)
    assert cfg.options_of("l1prox").mu == 0.01
    lines = [m for m in run_experiment(cfg, tmp_path / "seq", quiet=True, dataset=digits)
             if m["algorithm"] == "l1prox"]
    run_experiment(load_config(None, [*args, "batch_devices=4"]), tmp_path / "batched",
                   quiet=True, dataset=digits)
    assert [m["round"] for m in lines] == [1, 2]
    assert all(0 < m["global_acc"] <= 1 and m["train_loss"] > 0 for m in lines)
    mine, _ = load_checkpoint(tmp_path / "seq" / "checkpoints", "l1prox")
    fedavg, _ = load_checkpoint(tmp_path / "seq" / "checkpoints", "fedavg")
    assert not torch.equal(mine["conv1.weight"], fedavg["conv1.weight"])
    batched, _ = load_checkpoint(tmp_path / "batched" / "checkpoints", "l1prox")
    assert all(torch.equal(batched[k], v) for k, v in mine.items())


def test_batching_takes_only_objectives_with_a_batched_gradient(l1prox):
    payload, _ = tiny_job(TrainConfig(objective="l1", objective_args=(("mu", 0.1),)))
    assert batch_key(payload) is None
    assert batch_key(replace(payload, config=replace(payload.config, objective="prox"))) \
        is not None


def test_an_objective_travels_as_json_and_unknown_ones_are_refused(l1prox):
    config = TrainConfig(objective="l1", objective_args=(("mu", 0.25),), head=("fc*",))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    payload, data = tiny_job(replace(config, objective="l2"))
    with pytest.raises(ValueError, match="objective: unknown 'l2'; valid: .*l1"):
        train_local(payload, data)
    with pytest.raises(ValueError, match="'l1' is registered twice"):
        local_objective("l1")(l1_term)
