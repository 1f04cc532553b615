"""Batched device training equals training the devices one by one with `train_local`."""

from __future__ import annotations

from dataclasses import Field, fields, replace

import pytest
import torch

from cadfl.cad.decouple import decouple
from cadfl.cad.submodel import extract
from cadfl.device.batched import BATCHED_FIELDS, batch_key, train_batched
from cadfl.device.train import DeviceData, train_local
from cadfl.fl.payload import Payload, TrainConfig, Update
from cadfl.models import ModelSpec, build_model, get_model

SIZES = (23, 9, 16, 0)  # samples per device: ragged last batches, one device without data


def dataset(spec: ModelSpec, rows: int, device: str = "cpu", seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images of the spec's input shape and random labels of 10 classes."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (rows, *spec.input_shape), dtype=torch.uint8, generator=g)
    return images.to(device), torch.randint(0, 10, (rows,), generator=g).to(device)


def device_jobs(specs_states: list[tuple[ModelSpec, dict]], config: TrainConfig,
                device: str = "cpu") -> list[tuple[Payload, DeviceData]]:
    """One job per (spec, state), device i holding SIZES[i] rows of one shared dataset and
    training with seed 10 + i."""
    spec = specs_states[0][0]
    images, labels = dataset(spec, sum(SIZES), device)
    channels = spec.input_shape[0]
    color = channels == 3
    jobs, start = [], 0
    for i, (s, state) in enumerate(specs_states):
        index = torch.arange(start, start + SIZES[i], device=device)
        start += SIZES[i]
        data = DeviceData(images, labels, 10, (0.4,) * channels, (0.3,) * channels,
                          crop_padding=2 if color else 1, flip=color, index=index)
        jobs.append((Payload(s, state, replace(config, seed=10 + i)), data))
    return jobs


def dense_jobs(spec: ModelSpec, config: TrainConfig, device: str = "cpu"
               ) -> list[tuple[Payload, DeviceData]]:
    """Jobs with the same dense model, each device its own initial weights."""
    states = []
    for i in range(len(SIZES)):
        torch.manual_seed(i)
        states.append(build_model(spec).state_dict())
    return device_jobs([(spec, s) for s in states], config, device)


def assert_same_update(batched: Update, reference: Update) -> None:
    assert batched.num_samples == reference.num_samples
    assert batched.class_counts == reference.class_counts
    assert batched.metrics["train_flops"] == reference.metrics["train_flops"]
    assert batched.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"],
                                                          rel=1e-5, abs=1e-6)
    assert list(batched.state) == list(reference.state)
    for key, value in reference.state.items():
        got = batched.state[key]
        assert got.dtype == value.dtype and got.device.type == "cpu"
        if key.endswith("num_batches_tracked"):
            assert torch.equal(got, value)
        else:
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=key)


def check(jobs: list[tuple[Payload, DeviceData]]) -> None:
    reference = [train_local(p, d) for p, d in jobs]
    for got, ref in zip(train_batched(jobs), reference, strict=True):
        assert_same_update(got, ref)


CONFIG = TrainConfig(epochs=2, batch_size=8, lr=0.05, momentum=0.9, weight_decay=5e-4,
                     objective="prox", objective_args=(("mu", 0.1),), fraction=0.8, augment=True)


@pytest.mark.parametrize(("name", "batch_norm"), [("lenet5", False), ("lenet5", True),
                                                  ("digits_cnn", True),
                                                  ("digits_cnn", False), ("fl_cnn", False)])
def test_dense_models_match_sequential_training(name: str, batch_norm: bool) -> None:
    spec = get_model(name, 10, batch_norm=batch_norm)
    if name == "fl_cnn":  # the same layers on a smaller input keep the test fast
        spec = get_model(name, 10, input_shape=(3, 16, 16), batch_norm=batch_norm)
    check(dense_jobs(spec, CONFIG))


@pytest.mark.parametrize("config", [
    TrainConfig(epochs=3, batch_size=8, lr=0.05, momentum=0.0, weight_decay=0.0,
                augment=False),
    TrainConfig(epochs=1, batch_size=32, lr=0.02, objective="prox",
                objective_args=(("mu", 0.5),), fraction=0.5),
])
def test_training_settings_match_sequential_training(config: TrainConfig) -> None:
    check(dense_jobs(get_model("digits_cnn", 10), config))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_cad_submodels_of_different_classes_train_together(batch_norm: bool) -> None:
    dec = decouple(get_model("lenet5", 10, batch_norm=batch_norm), 10, depth=1)
    torch.manual_seed(0)
    full = build_model(dec.spec).state_dict()
    subs = [extract(dec, full, classes)[:2] for classes in [(0, 3, 5), (1, 2, 9), (4, 6, 8),
                                                           (7, 0, 2)]]
    assert len({s.class_ids for s, _ in subs}) == len(subs)
    assert any(layer.grouped_in for layer in subs[0][0].layers)
    jobs = device_jobs(subs, CONFIG)
    assert len({batch_key(p) for p, _ in jobs}) == 1
    check(jobs)


def test_batch_key_separates_what_cannot_train_together() -> None:
    spec = get_model("lenet5", 10)
    state = build_model(spec).state_dict()
    payload = Payload(spec, state, CONFIG)
    assert batch_key(payload) == batch_key(replace(payload, config=replace(CONFIG, seed=99)))
    assert batch_key(payload) != batch_key(replace(payload, config=replace(CONFIG, lr=0.1)))
    assert batch_key(payload) != batch_key(Payload(get_model("lenet5", 5), {}, CONFIG))
    assert batch_key(replace(payload, task="activations")) is None
    assert batch_key(Payload(get_model("alexnet", 10), {}, CONFIG)) is None  # dropout


def test_mixed_keys_are_refused() -> None:
    jobs = dense_jobs(get_model("digits_cnn", 10), CONFIG)
    payload, data = jobs[1]
    jobs[1] = (replace(payload, config=replace(payload.config, lr=0.2)), data)
    with pytest.raises(ValueError, match="batch_key"):
        train_batched(jobs)
    assert train_batched([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_sequential_training_on_cuda() -> None:
    check(dense_jobs(get_model("lenet5", 10, batch_norm=True), CONFIG, device="cuda"))


def _changed(field: Field, default: object) -> object:
    """A value of `field` other than its default."""
    if field.name == "objective":  # CONFIG trains with the proximal term: without it
        return "" if default else "prox"
    if field.name == "objective_args":
        return (("mu", 0.3),)
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    if isinstance(default, float):
        return default / 2 if default > 0 else 0.1
    if isinstance(default, tuple):
        return ("fc*",)
    if field.name == "precision":
        return "bf16"
    raise AssertionError(f"TrainConfig.{field.name}: no test value for {type(default)}")


def test_every_train_config_field_is_batched_or_refused() -> None:
    """Walks every field of TrainConfig: one that `train_batched` claims to implement gives a
    batch key of its own value and, set away from its default, still trains as
    `train_local` does; any other (a hook, today's or a new one) set away from its default
    makes the payload train one device at a time (fail closed), as does a local objective
    without a batched gradient (tests/test_objective.py). bf16 is compared within its own
    tolerance in tests/test_precision.py."""
    payload = Payload(get_model("lenet5", 10), {}, CONFIG)
    assert {f.name for f in fields(TrainConfig)} >= BATCHED_FIELDS
    for field in fields(TrainConfig):
        value = _changed(field, getattr(CONFIG, field.name))
        key = batch_key(replace(payload, config=replace(CONFIG, **{field.name: value})))
        if field.name not in BATCHED_FIELDS:
            assert key is None, f"TrainConfig.{field.name} would be ignored by train_batched"
        elif field.name != "seed":
            assert key is not None and key != batch_key(payload), field.name
            if field.name != "precision":
                check(dense_jobs(get_model("digits_cnn", 10),
                                 replace(CONFIG, **{field.name: value})))
