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


def _cad_payload(digits, personal: int, **train):
    """A CAD sub-model payload (depth 1, classes 0-4) and that device's data."""
    from cadfl.fl.cad import CAD
    from cadfl.fl.payload import DeviceInfo

    spec = get_model("digits_cnn", 10)
    torch.manual_seed(0)
    dense = build_model(spec).state_dict()
    config = TrainConfig(**{"batch_size": 50, "lr": 0.05, "augment": False, **train})
    cad = CAD(spec, config, [DeviceInfo(0, (40,) * 5 + (0,) * 5)], personal=personal,
              personal_epochs=1)
    payload = dict(cad.configure_train(1, cad.initial_state(dense), [0]))[0]
    idx = torch.nonzero(digits.train_y < 5).flatten()[:200]
    return payload, DeviceData(digits.train_x, digits.train_y, 10, digits.mean, digits.std,
                               index=idx)


def test_cad_personal_copy_is_sgd_on_frozen_features_and_leaves_the_shared_training_alone(
        digits):
    import torch.nn.functional as F

    from cadfl.data.augment import to_float
    from cadfl.device.model import load_model
    from cadfl.models.flops import flops_per_layer

    # One full-batch step, no momentum or weight decay: the copy can be computed by hand.
    payload, data = _cad_payload(digits, 1, batch_size=200, lr=0.5, momentum=0.0,
                                 weight_decay=0.0)
    plain, _ = _cad_payload(digits, 0, batch_size=200, lr=0.5, momentum=0.0, weight_decay=0.0)
    spec, state = payload.spec, payload.state
    update = train_local(payload, data)
    without = train_local(plain, data)
    shared = {k: v for k, v in update.state.items() if not k.startswith(PERSONAL)}
    assert shared.keys() == without.state.keys()
    assert all(torch.equal(shared[k], without.state[k]) for k in shared)
    # By hand in float64: features of the received model's layers before the logits, then
    # W - lr * (softmax(z) - onehot)^T f / n on the device's own classes' logits, where
    # class c's logit reads its own path's features only (CAD's block-diagonal logits).
    first = spec.names.index("fc1")
    x = to_float(digits.train_x[data.index], digits.mean, digits.std)
    with torch.no_grad():
        f = load_model(spec, state).eval()[:first](x).double()
    w, b = state["fc1.weight"].double(), state["fc1.bias"].double()
    k, width = w.shape
    paths = f.reshape(len(f), k, width)  # (n, class, its path's features)
    y = torch.tensor([spec.class_ids.index(int(c)) for c in digits.train_y[data.index]])
    g = F.softmax(torch.einsum("nkw,kw->nk", paths, w) + b, 1) - F.one_hot(y, k).double()
    assert torch.allclose(update.state[PERSONAL + "fc1.weight"].double(),
                          w - 0.5 * torch.einsum("nk,nkw->kw", g, paths) / len(y), atol=1e-5)
    assert torch.allclose(update.state[PERSONAL + "fc1.bias"].double(),
                          b - 0.5 * g.mean(0), atol=1e-5)
    # Its FLOPs: one forward of the layers before the logits, and a step of the logit
    # layer that needs no gradient of its input (forward + weight gradient: 2x forward).
    per_layer = flops_per_layer(build_model(spec), spec.input_shape)
    extra = len(y) * (sum(per_layer[n] for n in spec.names[:first]) + 2 * per_layer["fc1"])
    assert update.metrics["train_flops"] - without.metrics["train_flops"] == extra


def test_cad_personal_rows_are_kept_per_class_never_sent_and_predicted_with(digits):
    from cadfl.device.executor import Runtime

    payload, data = _cad_payload(digits, 1)
    runtime = Runtime(lambda d: data, DeviceStore())
    update = runtime.run(0, payload)
    assert not any(k.startswith(PERSONAL) for k in update.state)
    kept = runtime.store.get(0)
    assert sorted(kept) == sorted(f"{PERSONAL}fc1.{p}@{c}" for p in ("weight", "bias")
                                  for c in range(5))
    own = runtime.own_state(0, payload)
    assert not torch.equal(own["fc1.weight"], payload.state["fc1.weight"])  # fitted
    for c in range(5):
        assert torch.equal(own["fc1.weight"][c:c + 1], kept[f"{PERSONAL}fc1.weight@{c}"])
    assert torch.equal(own["conv1.weight"], payload.state["conv1.weight"])


def test_cad_with_personal_paths_is_plain_cad_to_the_cloud_and_scores_each_device_own(
        tmp_path, digits):
    def lines(*extra):
        cfg = small('algorithms=["cad"]', *extra)
        out = tmp_path / "-".join(extra or ("plain",))
        run_experiment(cfg, out, quiet=True, dataset=digits)
        return [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]

    plain, personal = lines(), lines("cad.personal=1")
    for a, b in zip(plain, personal, strict=True):
        assert (a["global_acc"], a["bytes_up"], a["bytes_down"]) == \
            (b["global_acc"], b["bytes_up"], b["bytes_down"])
    assert [m["context_acc"] for m in plain] != [m["context_acc"] for m in personal]
