"""HeteroFL and FedRolex: width-scaled sub-models, checked against independent computations.

The reference of one aggregation round is plain numpy: HeteroFL's sub-models are prefixes of
every dimension (the first channels, and for the linear layer after the flatten the first
features), so a device's coordinates are a block `[:rows, :cols]` of the global tensor.
"""

import json
import math

import numpy as np
import pytest
import torch

from cadfl.config import ConfigError, load_config
from cadfl.engine.experiment import Experiment
from cadfl.engine.run import run_experiment
from cadfl.fl.cad import CAD
from cadfl.fl.fedrolex import FedRolex
from cadfl.fl.heterofl import HeteroFL
from cadfl.fl.payload import DeviceInfo, TrainConfig, Update
from cadfl.models import Layer, ModelSpec, build_model, get_model
from cadfl.models.flops import train_flops_per_sample

from .test_engine import Interrupt, assert_same_checkpoints, metrics, stop_after

# conv 1->4 (3x3) - bn - relu - pool (4x4 -> 2x2) - flatten (16) - fc 16->6 - relu - fc 6->3
TINY = ModelSpec("tiny", (1, 4, 4), (
    Layer("conv", 1, 4, kernel=3, padding=1), Layer("bn", 4, 4), Layer("relu"),
    Layer("maxpool", kernel=2, stride=2), Layer("flatten"), Layer("linear", 16, 6),
    Layer("relu"), Layer("linear", 6, 3)))
RATES = (1.0, 0.5, 0.25)
# Device d: class counts (its classes), and its rate RATES[d] (round robin).
COUNTS = ((5, 3, 0), (0, 4, 6), (7, 0, 0))


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = build_model(TINY).state_dict()
    state["bn1.running_mean"] = torch.randn(4)
    state["bn1.num_batches_tracked"] = torch.tensor(2)
    return state


def trained(payload, seed: int) -> dict[str, torch.Tensor]:
    """A stand-in for local training: the received tensors plus seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in payload.state.items():
        out[k] = (v + torch.randn(v.shape, generator=gen) if v.is_floating_point()
                  else v + 3 + seed)
    return out


def held_block(key: str, rate: float) -> tuple[slice, ...]:
    """The global coordinates a device of `rate` holds, written out by hand for TINY."""
    conv, fc = math.ceil(rate * 4), math.ceil(rate * 6)
    return {"conv1.weight": (slice(0, conv),), "conv1.bias": (slice(0, conv),),
            "bn1.weight": (slice(0, conv),), "bn1.bias": (slice(0, conv),),
            "bn1.running_mean": (slice(0, conv),), "bn1.running_var": (slice(0, conv),),
            "bn1.num_batches_tracked": (),
            # the flatten puts channel c's 2x2 features at 4c..4c+3: the first `conv`
            # channels are the first 4 * conv features
            "fc1.weight": (slice(0, fc), slice(0, 4 * conv)), "fc1.bias": (slice(0, fc),),
            "fc2.weight": (slice(None), slice(0, fc)), "fc2.bias": (slice(None),)}[key]


def numpy_round(state, updates) -> tuple[dict, dict]:
    """Per coordinate: the holders' sample-weighted mean (logit rows: holders of the class
    only), and the number of holders; coordinates nobody held keep their value."""
    means, holders = {}, {}
    for key, g in state.items():
        total = np.zeros(g.shape)
        weight = np.zeros(g.shape)
        count = np.zeros(g.shape, dtype=int)
        for d, u in updates:
            block = held_block(key, RATES[d])
            w = np.full(u.state[key].shape, float(u.num_samples))
            if key.startswith("fc2."):  # label split: rows of classes the device holds
                held = np.array(COUNTS[d]) > 0
                w = w * held.reshape(-1, *[1] * (w.ndim - 1))
            total[block] += w * u.state[key].double().numpy()
            weight[block] += w
            count[block] += w > 0
        old = g.double().numpy()
        mean = np.where(weight > 0, total / np.maximum(weight, 1e-300), old)
        means[key] = np.rint(mean) if not g.is_floating_point() else mean
        holders[key] = count
    return means, holders


def tiny_round(cls, rnd: int = 1):
    devices = [DeviceInfo(d, c) for d, c in enumerate(COUNTS)]
    strategy = cls(TINY, TrainConfig(), devices, rates=RATES)
    state = tiny_state()
    payloads = dict(strategy.configure_train(rnd, state, [0, 1, 2]))
    updates = [(d, Update(trained(p, seed=d), sum(COUNTS[d]), list(COUNTS[d])))
               for d, p in payloads.items()]
    return strategy, state, payloads, updates


def test_one_round_averages_every_coordinate_over_its_holders():
    strategy, state, payloads, updates = tiny_round(HeteroFL)
    # Payloads are smaller dense models; the device trains with the label split.
    assert [p.spec.layers[0].out_ch for p in payloads.values()] == [4, 2, 1]
    assert [p.spec.layers[5].in_ch for p in payloads.values()] == [16, 8, 4]
    assert [p.spec.layers[-1].in_ch for p in payloads.values()] == [6, 3, 2]
    assert all(p.config.mask_absent for p in payloads.values())
    for p in payloads.values():
        build_model(p.spec).load_state_dict(p.state)  # the state fits the spec

    result = strategy.aggregate_train(1, state, iter(updates))

    expected, holders = numpy_round(state, updates)
    for key, value in expected.items():
        assert result[key].dtype == state[key].dtype, key
        np.testing.assert_allclose(result[key].double().numpy(), value, rtol=1e-6, atol=1e-6,
                                   err_msg=key)
    # The holder counts themselves, spelled out: output channels 0 | 1 | 2, 3 of conv1 are
    # held by 3 | 2 | 1 devices; fc1's (row 1, feature 5) by devices 0 and 1, (row 5, 0)
    # by device 0 only; logit row 2 (class 2, device 1 only) on device 1's 3 columns.
    assert holders["conv1.weight"][:, 0, 0, 0].tolist() == [3, 2, 1, 1]
    assert holders["fc1.weight"][1, 5] == 2 and holders["fc1.weight"][5, 0] == 1
    assert holders["fc2.weight"][2].tolist() == [1, 1, 1, 0, 0, 0]
    # Coordinates nobody held keep their value bit for bit.
    assert torch.equal(result["fc2.weight"][2, 3:], state["fc2.weight"][2, 3:])


def test_label_split_rows_are_averaged_over_the_holders_of_the_class_only():
    strategy, state, _, updates = tiny_round(HeteroFL)
    result = strategy.aggregate_train(1, state, iter(updates))
    u = {d: up.state for d, up in updates}
    # Class 2 is held by device 1 alone: its bias is device 1's, however large the other
    # devices' samples counts.
    assert torch.equal(result["fc2.bias"][2], u[1]["fc2.bias"][2])
    # Class 0: devices 0 (8 samples) and 2 (7), not device 1 (10 samples, no class 0).
    b = (8 * u[0]["fc2.bias"][0].double() + 7 * u[2]["fc2.bias"][0].double()) / 15
    assert result["fc2.bias"][0].item() == pytest.approx(b.item(), rel=1e-6)
    # Column 0 of row 1 (class 1: devices 0 and 1); device 2 has column 0 but not class 1.
    w = (8 * u[0]["fc2.weight"][1, 0].double() + 10 * u[1]["fc2.weight"][1, 0].double()) / 18
    assert result["fc2.weight"][1, 0].item() == pytest.approx(w.item(), rel=1e-6)


def test_fedrolex_window_rolls_with_the_round_and_wraps_around():
    strategy = FedRolex(TINY, TrainConfig(), [DeviceInfo(0, (1, 1, 1))], rates=(0.5,))
    conv1 = {rnd: strategy.kept_channels(rnd, 0.5)["conv1"].tolist() for rnd in (1, 2, 4, 5)}
    assert conv1 == {1: [0, 1], 2: [1, 2], 4: [0, 3], 5: [0, 1]}  # width 4: round 4 wraps
    assert strategy.kept_channels(4, 0.5)["fc1"].tolist() == [3, 4, 5]  # 3 of 6 from 3

    # Round 4: the device gets channels 3 and 0 and is put back there.
    state = tiny_state()
    (_, payload), = strategy.configure_train(4, state, [0])
    assert torch.equal(payload.state["conv1.weight"], state["conv1.weight"][[0, 3]])
    features = [0, 1, 2, 3, 12, 13, 14, 15]  # channel 0's and channel 3's 2x2 features
    assert torch.equal(payload.state["fc1.weight"], state["fc1.weight"][3:][:, features])
    update = Update(trained(payload, seed=9), 3, [1, 1, 1])
    result = strategy.aggregate_train(4, state, iter([(0, update)]))
    assert torch.equal(result["conv1.weight"][[0, 3]], update.state["conv1.weight"])
    assert torch.equal(result["conv1.weight"][[1, 2]], state["conv1.weight"][[1, 2]])
    assert torch.equal(result["fc1.weight"][3:][:, features], update.state["fc1.weight"])
    assert torch.equal(result["fc1.weight"][:, 4:12], state["fc1.weight"][:, 4:12])

    # HeteroFL's channels never move.
    hetero = HeteroFL(TINY, TrainConfig(), [DeviceInfo(0, (1, 1, 1))], rates=(0.5,))
    assert hetero.kept_channels(4, 0.5)["conv1"].tolist() == [0, 1]


def test_the_auto_rate_follows_its_depth_setting_not_cads(digits):
    deep = Experiment.setup(load_config(None, ["devices=4", "heterofl.depth=2"]), digits)
    shallow = Experiment.setup(load_config(None, ["devices=4", "heterofl.depth=0",
                                                  "cad.depth=2"]), digits)
    rates = [exp.strategy("heterofl").notes for exp in (deep, shallow)]
    assert [n["cad_depth"] for n in rates] == [2, 0]
    assert rates[0]["auto_rate"] != rates[1]["auto_rate"]


def test_auto_rate_matches_the_training_flops_of_cads_sub_models():
    spec = get_model("digits_cnn", 10)
    devices = [DeviceInfo(d, tuple(10 if (c - d) % 10 < 5 else 0 for c in range(10)))
               for d in range(4)]
    hetero = HeteroFL(spec, TrainConfig(), devices)
    cad = CAD(spec, TrainConfig(), devices, depth=1)
    state = cad.initial_state(build_model(spec).state_dict())
    cad_flops = np.mean([train_flops_per_sample(p.spec)
                         for _, p in cad.configure_train(1, state, range(4))])
    weights = build_model(spec).state_dict()
    flops = [train_flops_per_sample(p.spec)
             for _, p in hetero.configure_train(1, weights, range(4))]
    assert 0 < hetero.rates[0] < 1
    assert flops[0] == pytest.approx(cad_flops, rel=0.03)
    assert hetero.notes["auto_rate"] == hetero.rates[0]
    assert hetero.notes["train_flops_per_sample"] == flops[0] == flops[3]


def test_config_checks():
    with pytest.raises(ConfigError, match=r"heterofl.rates\[1\]: 1.5 is out of range"):
        load_config(None, ["heterofl.rates=[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="heterofl.depth: -1 is out of range"):
        load_config(None, ["heterofl.depth=-1"])
    for name in ("heterofl", "fedrolex"):
        with pytest.raises(ConfigError, match=f"'keep_local' does not fit {name}"):
            load_config(None, [f'algorithms=["{name}"]', 'bn="keep_local"'])
    load_config(None, ['algorithms=["fedavg"]', 'bn="keep_local"'])  # only when they run


def small(*overrides: str):
    return load_config(None, ["devices=4", "rounds=3", "data_fraction=0.5",
                              'algorithms=["heterofl", "fedrolex"]', "overrides={}",
                              "fedrolex.rates=[1.0, 0.5]", *overrides])


@pytest.mark.usefixtures("one_thread")
def test_engine_run_and_resume_equals_uninterrupted(tmp_path, digits):
    reference = tmp_path / "reference"
    lines = run_experiment(small(), reference, quiet=True, dataset=digits)
    assert [(m["algorithm"], m["round"]) for m in lines] == [
        (a, r) for a in ("heterofl", "fedrolex") for r in (1, 2, 3)]
    assert all(m["global_acc"] > 0.1 and m["device_train_flops"] > 0 for m in lines)
    notes = json.loads((reference / "notes-heterofl.json").read_text())
    assert 0 < notes["auto_rate"] < 1

    out = tmp_path / "run"
    with pytest.raises(Interrupt):
        run_experiment(small(), out, quiet=True, dataset=digits,
                       on_round=stop_after("fedrolex", 1))
    run_experiment(small(), out, resume=True, quiet=True, dataset=digits)
    assert metrics(out) == metrics(reference)
    assert_same_checkpoints(out, reference, ["heterofl", "fedrolex"])
