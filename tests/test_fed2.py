"""Fed2 with its own number of feature groups: the built network, group-wise averaging, runs."""

import json
from pathlib import Path

import pytest
import torch

from cadfl.config import ConfigError, load_config
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.experiment import Experiment
from cadfl.engine.run import run_experiment
from cadfl.fl.fed2 import Fed2
from cadfl.fl.payload import DeviceInfo, TrainConfig, Update
from cadfl.models import build_model, get_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Classes of each group, written out by hand: contiguous, the first groups one class larger.
GROUPS = {5: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]],
          3: [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]}


def fed2(groups: int, devices: list[DeviceInfo] | None = None, **kw) -> Fed2:
    spec = get_model("digits_cnn", 10)
    return Fed2(spec, TrainConfig(), devices or [DeviceInfo(0, (1,) * 10)], groups=groups, **kw)


@pytest.mark.parametrize("g", [5, 3])
def test_a_logit_reads_only_the_filters_of_its_classs_group(g):
    strategy = fed2(g)
    torch.manual_seed(0)
    state = strategy.global_model(strategy.initial_state(build_model(strategy.dense_spec)
                                                         .state_dict()))[1]
    width = 128 // g  # digits_cnn's last conv has 128 filters; the rest are spare
    assert state["conv3.weight"].shape[0] == g * width
    model = build_model(strategy.spec).eval()
    model.load_state_dict(state)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        for group, classes in enumerate(GROUPS[g]):
            rows = slice(group * width, (group + 1) * width)
            saved = model.conv3.weight[rows].clone()
            model.conv3.weight[rows] += torch.randn_like(saved)
            after = model(x)
            model.conv3.weight[rows] = saved
            others = [c for c in range(10) if c not in classes]
            torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=0)
            assert (after[:, classes] - before[:, classes]).abs().min() > 0, (group, classes)


def test_one_round_averages_a_group_over_the_holders_of_any_of_its_classes():
    counts = [{0: 10, 1: 4, 5: 6}, {2: 8, 3: 2}, {4: 5, 6: 7}]
    devices = [DeviceInfo(d, tuple(c.get(k, 0) for k in range(10))) for d, c in enumerate(counts)]
    strategy = fed2(3, devices)
    state = strategy.initial_state(build_model(strategy.dense_spec).state_dict())
    payloads = dict(strategy.configure_train(1, state, [0, 1, 2]))
    assert all(p.spec == strategy.spec for p in payloads.values())  # the whole model each
    # Device d sends every weight equal to d + 1: the average is the weighted mean of d + 1.
    updates = {d: Update({k: torch.full_like(v, d + 1.0) if v.is_floating_point() else v
                          for k, v in p.state.items()}, devices[d].num_samples,
                         list(devices[d].class_counts)) for d, p in payloads.items()}
    new = strategy.aggregate_train(1, state, updates.items())

    def held(d: int, group: int) -> int:
        return sum(counts[d].get(c, 0) for c in GROUPS[3][group])

    expected = []
    for group in range(3):
        total = sum(held(d, group) for d in range(3))
        expected.append(None if not total else
                        sum(held(d, group) * (d + 1) for d in range(3)) / total)
    assert expected[:2] == [(14 * 1 + 10 * 2) / 24, (6 * 1 + 12 * 3) / 18]
    assert expected[2] is None  # nobody holds classes 7-9
    trunk = sum(sum(c.values()) * (d + 1) for d, c in enumerate(counts)) / 42
    torch.testing.assert_close(new["conv1.weight"], torch.full_like(new["conv1.weight"], trunk))
    width = 128 // 3
    for group, classes in enumerate(GROUPS[3]):
        rows = {"conv3.weight": slice(group * width, (group + 1) * width),
                "bn3.weight": slice(group * width, (group + 1) * width),
                "fc1.weight": slice(classes[0], classes[-1] + 1),
                "fc1.bias": slice(classes[0], classes[-1] + 1)}
        for key, r in rows.items():
            want = state[key][r] if expected[group] is None else \
                torch.full_like(state[key][r], expected[group])
            torch.testing.assert_close(new[key][r], want, msg=f"{key} group {group}")
    # The per-row weights themselves: device 0 holds group 0 with 14 images, group 1 with 6.
    weights = strategy.contribution(1, state, 0, updates[0]).row_weights
    assert weights["conv3.weight"].tolist() == [14.0] * width + [6.0] * width + [0.0] * width
    assert weights["fc1.weight"].tolist() == [14.0] * 4 + [6.0] * 3 + [0.0] * 3


def test_the_structure_carries_the_groups_and_a_new_class_gets_a_group_of_its_own():
    three = fed2(3)
    other = fed2(0)
    other.restore(three.structure())
    assert other.spec == three.spec and other.decoupling.group_of(5) == 1
    assert three.spec.layers[-1].groups == (4, 3, 3)
    nine = Fed2(get_model("digits_cnn", 9), TrainConfig(), [DeviceInfo(0, (1,) * 9)], groups=3)
    state = nine.global_model(nine.initial_state(build_model(nine.dense_spec).state_dict()))[1]
    before = nine.spec
    grown = nine.global_model(nine.add_classes(state, [9], seed=1))[1]
    assert nine.spec.layers[-1].groups == (3, 3, 3, 1) and nine.spec.class_ids[-1] == 9
    old, new = build_model(before).eval(), build_model(nine.spec).eval()
    old.load_state_dict(state)
    new.load_state_dict(grown)
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(new(x)[:, :9], old(x))


def lines_of(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(s).items() if k != "wall_s"}
            for s in (out / "metrics.jsonl").read_text().splitlines()]


class Interrupt(Exception):
    pass


def test_an_engine_run_with_five_groups_resumes_like_an_uninterrupted_one(tmp_path, digits):
    cfg = load_config(None, ["devices=4", "rounds=2", "data_fraction=0.5",
                             'algorithms=["fed2"]', "fed2.groups=5"])
    run_experiment(cfg, tmp_path / "ref", quiet=True, dataset=digits)

    def stop(line: dict) -> None:
        if line["round"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_experiment(cfg, tmp_path / "run", quiet=True, dataset=digits, on_round=stop)
    run_experiment(cfg, tmp_path / "run", resume=True, quiet=True, dataset=digits)

    lines = lines_of(tmp_path / "run")
    assert lines == lines_of(tmp_path / "ref") and [m["round"] for m in lines] == [1, 2]
    assert all(m["global_acc"] > 0.1 for m in lines)  # learns: chance is 0.1
    (state, record), (ref, _) = (load_checkpoint(tmp_path / p / "checkpoints", "fed2")
                                 for p in ("run", "ref"))
    logits = record["structure"]["decoupling"]["spec"]["layers"][-1]
    # 5 groups of 25 filters at 2x2 positions: each logit reads 100 features.
    assert logits["groups"] == [2] * 5 and state["fc1.weight"].shape == (10, 100)
    assert all(torch.equal(state[k], ref[k]) for k in ref)


def test_more_groups_than_classes_are_refused_naming_the_setting(digits):
    exp = Experiment.setup(load_config(None, ['algorithms=["fed2"]', "fed2.groups=11"]), digits)
    with pytest.raises(ConfigError, match=r"fed2\.groups=11 .* 1 to 10") as info:
        exp.strategy("fed2")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"fed2\.groups"):
        load_config(None, ["fed2.groups=-1"])


def test_logits_stay_bounded_when_devices_lack_most_classes(tmp_path, digits):
    """20 devices x 2 classes, half of them per round, 30 rounds at lr 0.1. Trained with every
    logit in the softmax, a device pushed down the logits of the classes it lacks, and those
    rows, averaged over their holders only, dropped that push while keeping every holder's
    push up: the logits layer's norm grew to ~800 and the training loss to ~1e4 (updates went
    non-finite on xdev-2cls). With the absent classes' logits out of the loss it stays bounded."""
    cfg = load_config(None, ['algorithms=["fed2"]', "overrides={}", "devices=20",
                             "partition.k=2", "sample=0.5", "rounds=30", "eval_every=10",
                             "train.lr=0.1"])
    lines = run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    assert sum(m["rejected"] for m in lines) == 0
    assert max(m["train_loss"] for m in lines) < 3.0
    state, _ = load_checkpoint(tmp_path / "checkpoints", "fed2")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert float(state["fc1.weight"].norm()) < 10.0
    assert lines[-1]["global_acc"] > 0.3  # 10 classes: chance is 0.1


def test_devices_train_without_the_logits_of_classes_they_lack():
    counts = [{0: 10, 1: 4}, {2: 8, 3: 2}]
    devices = [DeviceInfo(d, tuple(c.get(k, 0) for k in range(10))) for d, c in enumerate(counts)]
    strategy = fed2(3, devices)
    state = strategy.initial_state(build_model(strategy.dense_spec).state_dict())
    assert all(p.config.mask_absent for _, p in strategy.configure_train(1, state, [0, 1]))
