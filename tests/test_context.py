"""Context dynamics: New Class, context-change schedules, and the Others output.

New Class is checked against the model before the change: every existing logit must be the
same function of the input (up to float rounding), and devices without the new class must
receive the very same sub-model. Schedules are checked against contexts worked out by hand.
"""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cadfl.cad.assign import SPARE_PREFIX
from cadfl.cad.submodel import extract
from cadfl.config import ConfigError, load_config
from cadfl.config_tables import ContextChange
from cadfl.data.context import Schedule
from cadfl.data.partition import make_partition, share_classes
from cadfl.device.score import predict
from cadfl.engine.experiment import Experiment
from cadfl.engine.run import run_experiment
from cadfl.fl.cad import CAD
from cadfl.fl.fedavg import FedAvg
from cadfl.fl.payload import DeviceInfo, TrainConfig
from cadfl.models import build_model, get_model
from cadfl.models.spec import spec_from_config

pytestmark = pytest.mark.usefixtures("one_thread")
MEAN, STD = (0.5,), (0.25,)


def spare_spec():
    """4 classes; conv2 (7 filters) and fc1 (9) split 1 per class with spares left over."""
    return spec_from_config("tiny", [8, "M", 7], (1, 8, 8), 4, batch_norm=True, hidden=(9,))


def cad_with_state(spec, depth, others=None):
    devices = [DeviceInfo(0, tuple([3] * spec.num_classes))]
    cad = CAD(spec, TrainConfig(seed=3), devices, depth=depth, others=others)
    torch.manual_seed(0)
    return cad, cad.initial_state(build_model(spec).state_dict())


CASES = [(spare_spec, 1), (spare_spec, 0),
         (lambda: get_model("digits_cnn", 10, (1, 8, 8), True), 1),
         (lambda: get_model("digits_cnn", 10, (1, 8, 8), True), 2),
         (lambda: get_model("digits_cnn", 10, (1, 8, 8), False), 0)]


@settings(max_examples=10, deadline=None)
@given(case=st.sampled_from(CASES), seed=st.integers(0, 2**16),
       new=st.lists(st.integers(10, 20), min_size=1, max_size=3, unique=True))
def test_adding_a_class_leaves_every_existing_output_unchanged(case, seed, new):
    make_spec, depth = case
    cad, state = cad_with_state(make_spec(), depth)
    x = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.uint8)
    spec0, weights0 = cad.global_model(state)
    before = predict(spec0, weights0, x, MEAN, STD)
    old_classes = spec0.class_ids
    others_sub = extract(cad.decoupling, weights0, old_classes[1:3])

    grown = cad.add_classes(state, new, seed)

    spec1, weights1 = cad.global_model(grown)
    assert spec1.class_ids == (*old_classes, *new)
    after = predict(spec1, weights1, x, MEAN, STD)
    # Equal up to the float rounding of a wider matrix product (BLAS blocks by shape): a few
    # float32 ulps of logits of magnitude ~1 (3e-7 seen).
    assert torch.allclose(after[:, :len(old_classes)], before, rtol=1e-5, atol=1e-6)
    # A device without the new classes gets exactly the sub-model it got before.
    sub_spec, sub_state, _ = extract(cad.decoupling, weights1, old_classes[1:3])
    assert sub_spec == others_sub[0]
    assert sub_state.keys() == others_sub[1].keys()
    assert all(torch.equal(sub_state[k], others_sub[1][k]) for k in sub_state)
    # The new class is a class like the others: it has a sub-model of its own.
    spec_new, state_new, _ = extract(cad.decoupling, weights1, (new[0],))
    logits = predict(spec_new, state_new, x, MEAN, STD)
    assert torch.allclose(logits[:, 0], after[:, len(old_classes)], atol=1e-5)
    # Registering again (a resumed run) changes nothing.
    assert cad.add_classes(grown, new, seed) is grown


def test_a_new_path_takes_spare_filters_where_the_entry_layer_has_enough():
    cad, state = cad_with_state(spare_spec(), depth=1)  # conv2: 1 per class, 3 spare
    pool = state[SPARE_PREFIX + "conv2.weight"]
    assert len(pool) == 3
    grown = cad.add_classes(state, [7], seed=0)
    assert torch.equal(grown["conv2.weight"][-1], pool[0])
    assert torch.equal(grown[SPARE_PREFIX + "conv2.weight"], pool[1:])
    # fc1 reads conv2's groups only through its own group: a new channel, not a spare row.
    assert grown["fc1.weight"].shape[0] == state["fc1.weight"].shape[0] + 2
    # Three more classes use up the pool, then new channels take over.
    grown = cad.add_classes(grown, [8, 9, 11], seed=0)
    assert SPARE_PREFIX + "conv2.weight" not in grown
    assert grown["conv2.weight"].shape[0] == 4 + 4


def test_a_dense_model_gains_a_logit_and_keeps_the_others():
    spec = get_model("digits_cnn", 10, (1, 8, 8), True)
    fedavg = FedAvg(spec, TrainConfig(), [DeviceInfo(0, (1,) * 10)])
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    before = predict(spec, state, x, MEAN, STD)
    grown = fedavg.add_classes(state, [12], seed=1)
    assert fedavg.spec.class_ids == (*range(10), 12)
    after = predict(fedavg.spec, grown, x, MEAN, STD)[:, :10]
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-7)
    assert fedavg.add_classes(grown, [12], seed=1) is grown


def test_schedule_contexts_follow_the_changes_in_round_order():
    held = [{0, 1, 2, 8}, {3, 4, 8, 9}, {5, 6, 7}]
    changes = [ContextChange(round=5, devices=[0, 1], add=[8, 9]),
               ContextChange(round=3, devices=[2], remove=[5]),
               ContextChange(round=7, devices=[], remove=[0]),
               ContextChange(round=9, devices=[0], add=[0])]
    s = Schedule(held, changes)
    assert [s.context(d, 1) for d in range(3)] == [(0, 1, 2), (3, 4), (5, 6, 7)]
    assert s.context(2, 3) == (6, 7)
    # Device 0 has no images of 9: it gains 8 only.
    assert [s.context(d, 5) for d in range(3)] == [(0, 1, 2, 8), (3, 4, 8, 9), (6, 7)]
    assert s.context(0, 7) == (1, 2, 8)
    assert s.context(0, 9) == (0, 1, 2, 8)
    assert s.model_classes(1) == (0, 1, 2, 3, 4, 5, 6, 7)
    assert s.model_classes(4) == s.model_classes(1)
    assert s.model_classes(5) == (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)


def test_shared_classes_keep_the_partition_disjoint_and_reach_the_gaining_devices(digits):
    y = digits.train_y
    part = make_partition(y, "classes", 6, seed=0, k=2)
    lacking = {d: {c for c in range(10) if not part.class_counts[d][c]} for d in (0, 1)}
    extra = {0: set(sorted(lacking[0])[:2]), 1: set(sorted(lacking[1])[:1])}
    shared = share_classes(part, y, extra, seed=0)
    shared.check_labels(y)  # disjoint, covers every image once, counts match the labels
    for d, classes in extra.items():
        assert classes <= set(shared.classes(d))
    for d in range(6):  # nobody loses a class
        assert set(part.classes(d)) <= set(shared.classes(d))
    sizes = [shared.class_counts[d][c] for c in extra[0] for d in range(6)
             if shared.class_counts[d][c]]
    assert max(sizes) - min(sizes) <= int(np.bincount(y.numpy()).max() // 2)


@pytest.mark.parametrize("entry, needles", [
    ("{round=0, add=[1]}", ["context[0].round", "[1,"]),
    ("{round=2, devices=[10], add=[1]}", ["context[0].devices", "10"]),
    ("{round=2, add=[1], remove=[1]}", ["both added and removed"]),
    ("{round=2, add=[12]}", ["12", "0..9"]),
    ("{round=2, remove=[0,1,2,3,4,5,6,7,8,9]}", ["no class left", "round 2"]),
])
def test_bad_context_changes_are_refused_with_the_reason(entry, needles, digits):
    with pytest.raises(ConfigError) as err:
        cfg = load_config(None, [f"context=[{entry}]", "rounds=4"])
        Experiment.setup(cfg, digits)
    for needle in needles:
        assert needle in str(err.value)


def test_context_change_schedule_gives_the_expected_submodels(digits):
    cfg = load_config(None, ["devices=4", "rounds=6", 'algorithms=["cad"]', "cad.depth=1",
                             'context=[{round=1, remove=[8, 9]}, '
                             '{round=3, devices=[0, 1], add=[8, 9]}, '
                             '{round=5, devices=[2], remove=[0, 1, 2, 3]}]'])
    exp = Experiment.setup(cfg, digits)
    cad = exp.strategy("cad")
    state = cad.initial_state(exp.init)
    assert exp.spec.class_ids == tuple(range(8))
    per_class = cad.decoupling.spec.layer("conv3").groups[0]
    for rnd in range(1, 7):
        exp.enter_round(rnd)
        cad.devices = {d.id: d for d in exp.devices}
        state = cad.add_classes(state, exp.schedule.model_classes(rnd), seed=rnd)
        payloads = dict(cad.configure_train(rnd, state, [0, 1, 2, 3]))
        for d, p in payloads.items():
            held = set(exp.partition.classes(d))
            expected = held - {8, 9} if rnd < 3 or d > 1 else held
            if rnd >= 5 and d == 2:
                expected -= {0, 1, 2, 3}
            assert p.spec.class_ids == tuple(sorted(expected)), (rnd, d)
            assert p.state["conv3.weight"].shape[0] == per_class * len(expected)
            assert p.state["fc1.weight"].shape[0] == len(expected)
            assert set(exp.data(d).y.unique().tolist()) == expected
        model_classes = cad.global_model(state)[0].class_ids
        assert model_classes == (tuple(range(8)) if rnd < 3 else tuple(range(10)))


def test_resume_across_a_new_class_equals_the_uninterrupted_run(tmp_path, digits):
    cfg = load_config(None, ["devices=4", "rounds=4", "data_fraction=0.5",
                             'algorithms=["cad", "fedavg"]',
                             'context=[{round=1, remove=[9]}, {round=3, devices=[0], add=[9]}]'])
    whole = run_experiment(cfg, tmp_path / "whole", quiet=True, dataset=digits)

    class Stop(Exception):
        pass

    def stop(line):
        if (line["algorithm"], line["round"]) == ("fedavg", 3):
            raise Stop

    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "cut", quiet=True, dataset=digits, on_round=stop)
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, quiet=True, dataset=digits)

    def strip(lines):
        return [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]

    assert strip(resumed) == strip(whole)
    assert whole[-1]["class_acc"][9] is not None
    assert json.loads((tmp_path / "cut" / "checkpoints" / "cad.json").read_text())[
        "spec"]["classes"][-1] == 9


def test_others_rejection_beats_chance_on_digits(tmp_path, digits):
    cfg = load_config(None, ["rounds=10", 'algorithms=["cad"]', "eval_every=5",
                             "cad.others=true", "partition.other_fraction=0.3"])
    last = run_experiment(cfg, tmp_path, quiet=True, dataset=digits)[-1]
    # Answering at random among a device's 5 classes and "Others" rejects 1 image in 6.
    assert last["others_reject"] > 3 / 6
    assert last["others_in_acc"] > 0.8
    assert last["others_in_acc"] <= last["context_acc"]


def test_every_algorithm_runs_with_context_changes_and_others(tmp_path, digits):
    cfg = load_config(None, [
        "devices=4", "rounds=3", "data_fraction=0.5", "cad.others=true", "fed2.others=true",
        "partition.other_fraction=0.2",
        'algorithms=["cad", "fed2", "fedavg", "fedprox", "local", "central", "scaffold",'
        ' "fedper", "fedrep", "ditto"]',
        'context=[{round=1, remove=[9]}, {round=3, devices=[0], add=[9]}]'])
    lines = run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    assert all(m["rejected"] == 0 for m in lines)
    last = {m["algorithm"]: m for m in lines if m["round"] == 3}
    assert set(last) == set(cfg.algorithms)
    for algo, m in last.items():
        assert m["context_acc"] > 0.3, algo
        has_others = algo in ("cad", "fed2")
        assert (m["others_reject"] is not None) == has_others, algo
        if algo not in ("local", "fedper", "fedrep"):  # they have no global model
            assert len(m["class_acc"]) == 10 and m["global_acc"] > 0.2, algo
