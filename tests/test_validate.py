"""Update validation: every rejection reason, and rejected updates kept out of aggregation."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cadfl.config import load_config
from cadfl.device.executor import Executor
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.experiment import Experiment
from cadfl.engine.run import run_experiment
from cadfl.fl.aggregate import Contribution, Robustness, aggregate
from cadfl.fl.payload import Payload, TrainConfig, Update
from cadfl.fl.validate import rejection
from cadfl.models import build_model, get_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(classes=(0, 1, 2)):
    spec = get_model("digits_cnn", 10)
    state = build_model(spec).state_dict()
    counts = [4 if c in classes else 0 for c in range(10)]
    update = Update({k: v.clone() for k, v in state.items()}, sum(counts), counts,
                    {"train_loss": 1.0, "train_flops": 1.0})
    return Payload(spec, state, TrainConfig()), update


def test_a_well_formed_update_is_accepted():
    payload, update = _pair()
    assert rejection(payload, update, 10, 12) is None


@pytest.mark.parametrize("spoil, reason", [
    (lambda u: u.state.pop("conv1.weight"), "missing ['conv1.weight']"),
    (lambda u: u.state.__setitem__("extra", torch.zeros(1)), "unexpected ['extra']"),
    (lambda u: u.state.__setitem__("conv1.weight", torch.zeros(2, 2)), "conv1.weight: got"),
    (lambda u: u.state.__setitem__("bn1.bias", u.state["bn1.bias"].double()),
     "bn1.bias: got torch.float64"),
    (lambda u: u.state["fc1.weight"].__setitem__((0, 0), float("nan")), "non-finite"),
    (lambda u: u.state["fc1.bias"].__setitem__(0, float("inf")), "non-finite"),
    (lambda u: setattr(u, "num_samples", 0), "num_samples=0 is impossible"),
    (lambda u: setattr(u, "num_samples", 13), "num_samples=13 is impossible"),
    (lambda u: setattr(u, "class_counts", [1] * 9), "class_counts must be 10"),
    (lambda u: setattr(u, "class_counts", [-1, 13] + [0] * 8), "non-negative"),
    (lambda u: setattr(u, "class_counts", [12] + [0] * 9 + []), None),
    (lambda u: setattr(u, "class_counts", [5, 5, 5] + [0] * 7), "add up to 15"),
])
def test_each_bad_update_is_rejected_with_its_reason(spoil, reason):
    payload, update = _pair()
    spoil(update)
    got = rejection(payload, update, 10, 12)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got, got


def test_counts_for_classes_the_sub_model_does_not_have_are_rejected():
    payload, update = _pair()
    payload = replace(payload, spec=payload.spec.replace_layers(
        list(payload.spec.layers), (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)))
    assert rejection(payload, update, 10, 12) is None
    small = get_model("digits_cnn", 3).replace_layers(list(get_model("digits_cnn", 3).layers),
                                                      (0, 1, 5))
    state = build_model(small).state_dict()
    update = Update({k: v.clone() for k, v in state.items()}, 8, [4, 0, 4] + [0] * 7)
    assert "classes [2]" in rejection(Payload(small, state), update, 10, 12)


def _corrupting(exp: Experiment, bad: set[int]) -> Executor:
    runtime = exp.runtime()

    class Corrupting(Executor):
        def __call__(self, jobs):
            for d, p, u in runtime(jobs):
                if d in bad:
                    u.state = {k: torch.full_like(v, float("nan")) if v.is_floating_point()
                               else v for k, v in u.state.items()}
                yield d, p, u
    return Corrupting()


def test_rejected_updates_are_counted_and_kept_out_of_the_global_state(tmp_path: Path):
    cfg = load_config(None, ["devices=4", "rounds=2", 'algorithms=["fedavg","cad"]',
                             "data_fraction=0.5"])
    exp = Experiment.setup(cfg)
    lines = run_experiment(cfg, tmp_path, quiet=True, execute=_corrupting(exp, {1}))
    assert [m["rejected"] for m in lines] == [1, 1, 1, 1]
    for algo in ("fedavg", "cad"):
        state, _ = load_checkpoint(tmp_path / "checkpoints", algo)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert all(m["global_acc"] > 0.2 for m in lines)


def test_a_round_with_too_few_valid_updates_keeps_the_global_state(tmp_path: Path):
    cfg = load_config(None, ["devices=4", "rounds=1", 'algorithms=["fedavg"]',
                             "data_fraction=0.5", "min_devices=2"])
    exp = Experiment.setup(cfg)
    run_experiment(cfg, tmp_path, quiet=True, execute=_corrupting(exp, {0, 1, 2}))
    state, _ = load_checkpoint(tmp_path / "checkpoints", "fedavg")
    for key, value in exp.strategy("fedavg").initial_state(exp.init).items():
        assert torch.equal(state[key], value), key


MUTATIONS = ["drop_key", "extra_key", "shape", "dtype", "nan", "inf", "samples_low",
             "samples_high", "counts_len", "counts_negative", "counts_sum", "foreign_class"]


def _mutate(update: Update, kind: str, data) -> None:
    keys = sorted(update.state)
    key = data.draw(st.sampled_from([k for k in keys if update.state[k].is_floating_point()]))
    if kind == "drop_key":  # a key of the model: dropping an extra key would undo that mutation
        update.state.pop(data.draw(st.sampled_from([k for k in keys if not k.endswith("!")])))
    elif kind == "extra_key":
        update.state[data.draw(st.text(min_size=1, max_size=8)) + "!"] = torch.zeros(2)
    elif kind == "shape":
        update.state[key] = torch.zeros(update.state[key].numel() + data.draw(st.integers(1, 5)))
    elif kind == "dtype":
        update.state[key] = update.state[key].double()
    elif kind in ("nan", "inf"):
        t = update.state[key].clone().flatten()
        t[data.draw(st.integers(0, t.numel() - 1))] = float(kind)
        update.state[key] = t.view_as(update.state[key])
    elif kind == "samples_low":
        update.num_samples = data.draw(st.integers(-10**6, 0))
    elif kind == "samples_high":
        update.num_samples = data.draw(st.integers(13, 10**9))
    elif kind == "counts_len":
        update.class_counts = update.class_counts + [0] * data.draw(st.integers(1, 3))
    elif kind == "counts_negative":
        update.class_counts = [-1] + update.class_counts[1:]
    elif kind == "counts_sum":
        # Every count grows, so no other mutation can bring the sum back to num_samples.
        update.class_counts = [c + 1 for c in update.class_counts]
    elif kind == "foreign_class":
        update.class_counts = update.class_counts[:-1] + [update.class_counts[0]]
        update.class_counts[0] = 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(MUTATIONS), max_size=3), st.data())
def test_fuzzed_updates_are_rejected_and_never_reach_the_global_state(mutations, data):
    spec = get_model("digits_cnn", 3)
    spec = spec.replace_layers(list(spec.layers), (0, 1, 2))  # a 3-class sub-model
    payloads, updates = [], []
    for d in range(3):
        state = build_model(spec).state_dict() if d == 0 else payloads[0].state
        payload = Payload(spec, state)
        update = Update({k: v.clone() for k, v in state.items()}, 12, [4, 4, 4] + [0] * 7)
        update.state = {k: v + 0.01 * d if v.is_floating_point() else v
                        for k, v in update.state.items()}
        if d == 1:  # one device misbehaves in up to three ways
            for kind in mutations:
                _mutate(update, kind, data)
        payloads.append(payload)
        updates.append(update)
    reasons = [rejection(p, u, 10, 12) for p, u in zip(payloads, updates, strict=True)]
    assert reasons[0] is None and reasons[2] is None
    assert (reasons[1] is None) == (not mutations), (mutations, reasons[1])
    valid = [Contribution(u.state, u.num_samples) for u, r in zip(updates, reasons, strict=True)
             if r is None]
    for rule in ("mean", "median", "trimmed_mean"):
        state = aggregate(payloads[0].state, valid, Robustness(rule))
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
