"""Personalised peers: FedPer, FedRep and Ditto keep their personal parts on the device."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from cadfl.config import load_config
from cadfl.device.store import DeviceStore
from cadfl.device.train import DeviceData, train_local
from cadfl.engine.checkpoint import load_checkpoint
from cadfl.engine.experiment import Experiment
from cadfl.engine.run import run_experiment
from cadfl.engine.sampling import sample_devices
from cadfl.fl.fedper import head_patterns
from cadfl.fl.payload import PERSONAL, Payload, TrainConfig, model_part
from cadfl.models import build_model, get_model

pytestmark = pytest.mark.usefixtures("one_thread")


def small(*overrides: str):
    return load_config(None, ["devices=4", "rounds=3", "data_fraction=0.5", "sample=0.5",
                              *overrides])


def device_payload(digits, config: TrainConfig):
    spec = get_model("digits_cnn", 10)
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    idx = torch.nonzero(digits.train_y < 5).flatten()[:200]
    data = DeviceData(digits.train_x, digits.train_y, 10, digits.mean, digits.std,
                      index=idx)
    return Payload(spec, state, config), data


def test_the_head_is_the_last_weighted_layers_with_their_batch_norm():
    spec = get_model("digits_cnn", 10)  # conv1 bn1 .. conv3 bn3 .. fc1
    assert head_patterns(spec, 1) == ("fc1.*",)
    assert head_patterns(spec, 2) == ("conv3.*", "bn3.*", "fc1.*")


def test_fedrep_trains_the_head_first_and_only_then_the_body(digits):
    config = TrainConfig(batch_size=50, lr=0.05, augment=False, head=("fc1.*",),
                         head_epochs=2, epochs=1)
    payload, data = device_payload(digits, config)
    # A straggler whose step budget ends with the head phase: 2 of 3 epochs.
    head_only = train_local(replace(payload, config=replace(config, fraction=2 / 3)), data)
    both = train_local(payload, data)
    for key, before in payload.state.items():
        if not before.is_floating_point() or key.endswith(("running_mean", "running_var")):
            continue
        in_head = key.startswith("fc1.")
        assert torch.equal(head_only.state[key], before) != in_head, key
        assert not torch.equal(both.state[key], before), key
    # The body phase started from the trained head, which it left alone.
    assert torch.equal(both.state["fc1.weight"], head_only.state["fc1.weight"])


def test_ditto_personal_model_is_pulled_towards_the_received_one(digits):
    config = TrainConfig(batch_size=50, lr=0.05, augment=False, epochs=2)
    payload, data = device_payload(digits, config)
    plain = train_local(payload, data).state

    def distance(lam: float) -> float:
        update = train_local(replace(payload, config=replace(config, personal_lambda=lam)),
                             data)
        # The global model's training is FedAvg's, whatever the personal model does.
        assert all(torch.equal(update.state[k], plain[k]) for k in plain)
        personal = model_part(update.state, PERSONAL)
        return sum(float((personal[k] - v).pow(2).sum()) for k, v in payload.state.items()
                   if v.is_floating_point() and not k.endswith(("mean", "var")))

    assert distance(5.0) < distance(0.01) / 10  # lr * lam < 2: a stable pull


def test_fedper_never_sends_the_head_and_scores_each_device_with_its_own(tmp_path, digits):
    cfg = small('algorithms=["fedper"]', "rounds=2")
    run_experiment(cfg, tmp_path, quiet=True, dataset=digits)
    exp = Experiment.setup(cfg, digits)
    state, _ = load_checkpoint(tmp_path / "checkpoints", "fedper")
    # The cloud's head is still the initial one: no device ever sent its head.
    assert torch.equal(state["fc1.weight"], exp.init["fc1.weight"])
    assert not torch.equal(state["conv1.weight"], exp.init["conv1.weight"])
    store = DeviceStore(tmp_path / "devices" / "fedper")
    trained = set(sample_devices(0, 1, range(4), 2)) | set(sample_devices(0, 2, range(4), 2))
    for d in range(4):
        kept = store.get(d)
        assert (d in trained) == any(k.startswith("fc1.") for k in kept), d
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["global_acc"] is None and line["context_acc"] > 0.3
    model_bytes = sum(t.numel() * t.element_size() for t in exp.init.values())
    head_bytes = sum(exp.init[k].numel() * 4 for k in ("fc1.weight", "fc1.bias"))
    assert line["bytes_up"] == model_bytes - head_bytes


@pytest.mark.parametrize("algorithm", ["fedper", "fedrep", "ditto", "scaffold"])
def test_personal_state_survives_resume(tmp_path, digits, algorithm):
    cfg = small(f'algorithms=["{algorithm}"]', "rounds=4")
    run_experiment(cfg, tmp_path / "ref", quiet=True, dataset=digits)

    class Stop(Exception):
        pass

    def stop(line):
        if line["round"] == 2:
            raise Stop

    with pytest.raises(Stop):
        run_experiment(cfg, tmp_path / "run", quiet=True, dataset=digits, on_round=stop)
    run_experiment(cfg, tmp_path / "run", resume=True, quiet=True, dataset=digits)

    def lines(out):
        return [{k: v for k, v in json.loads(s).items() if k != "wall_s"}
                for s in (out / "metrics.jsonl").read_text().splitlines()]

    assert lines(tmp_path / "run") == lines(tmp_path / "ref")
