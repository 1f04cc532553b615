"""CAD: decoupled models, context sub-models, path-paired aggregation, and their costs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cadfl.cad.decouple import decouple
from cadfl.cad.submodel import extract, index_map
from cadfl.fl.aggregate import Contribution, aggregate
from cadfl.fl.cad import CAD
from cadfl.fl.fed2 import Fed2
from cadfl.fl.payload import DeviceInfo, TrainConfig, Update, state_bytes
from cadfl.models import SpecError, build_model, get_model
from cadfl.models.flops import train_flops_per_sample
from cadfl.models.spec import spec_from_config


@st.composite
def decoupled_cases(draw):
    """A random small CNN, class count, decoupling depth, class subset (in random order)."""
    k = draw(st.integers(2, 5))
    n_convs = draw(st.integers(1, 3))
    config: list = []
    for i in range(n_convs):
        config.append(draw(st.integers(k, 3 * k)))
        if i < 2 and draw(st.booleans()):
            config.append("M")
    hidden = tuple(draw(st.lists(st.integers(k, 3 * k), max_size=2)))
    spec = spec_from_config("random", config, (draw(st.integers(1, 3)), 8, 8), k,
                            batch_norm=draw(st.booleans()), hidden=hidden)
    depth = draw(st.integers(0, n_convs))
    classes = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True))
    return spec, k, depth, classes, draw(st.integers(0, 2**16))


def _eval_model(spec, state):
    model = build_model(spec).eval()
    model.load_state_dict(state)
    return model


@settings(max_examples=60, deadline=None)
@given(decoupled_cases())
def test_submodel_logits_equal_full_model_logits_of_its_classes(case):
    spec, k, depth, classes, seed = case
    dec = decouple(spec, k, depth)
    torch.manual_seed(seed)
    full = build_model(dec.spec)
    for m in full.modules():  # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    full.eval()
    sub_spec, sub_state, _ = extract(dec, full.state_dict(), classes)
    sub = _eval_model(sub_spec, sub_state)
    x = torch.randn(4, *spec.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), full(x)[:, classes], rtol=1e-5, atol=1e-5)
    assert sub_spec.class_ids == tuple(classes)
    assert sum(v.numel() for v in sub_state.values()) <= sum(
        v.numel() for v in full.state_dict().values())


@settings(max_examples=40, deadline=None)
@given(decoupled_cases())
def test_extract_then_merge_with_one_device_returns_global_state_exactly(case):
    spec, k, depth, classes, seed = case
    dec = decouple(spec, k, depth)
    torch.manual_seed(seed)
    state = build_model(dec.spec).state_dict()
    _, sub, rows = extract(dec, state, classes)
    merged = aggregate(state, [Contribution(sub, 7.0, rows)])
    assert merged.keys() == state.keys()
    for key in state:
        assert torch.equal(merged[key], state[key]), key


@settings(max_examples=40, deadline=None)
@given(decoupled_cases(), st.data())
def test_a_path_changes_only_when_a_holder_of_its_class_took_part(case, data):
    spec, k, depth, _, seed = case
    torch.manual_seed(seed)
    devices = [DeviceInfo(d, tuple(data.draw(st.lists(st.integers(0, 3), min_size=k,
                                                      max_size=k)))) for d in range(3)]
    devices = [d for d in devices if d.num_samples > 0]
    if not devices:
        return
    strategy = CAD(spec, TrainConfig(), devices, depth=depth)
    state = strategy.initial_state(build_model(spec).state_dict())
    payloads = dict(strategy.configure_train(1, state, [d.id for d in devices]))
    # Every device returns its sub-model shifted by +1: whatever it held must move.
    updates = {d: Update({k_: v + 1 if v.is_floating_point() else v
                          for k_, v in p.state.items()},
                         devices[i].num_samples, list(devices[i].class_counts))
               for i, (d, p) in enumerate(sorted(payloads.items()))}
    new = strategy.aggregate_train(1, state, updates.items())
    held = {c for d in devices for c in d.classes}
    dec = strategy.decoupling
    for key in state:
        if not state[key].is_floating_point():
            continue
        if key.startswith("spare/"):  # the spare pool takes part in nothing
            assert torch.equal(new[key], state[key]), key
            continue
        if not dec.is_path_key(key) or key.endswith("num_batches_tracked"):
            assert torch.allclose(new[key], state[key] + 1), key
            continue
        g = dec.group_size(key)
        for c in range(k):
            rows = slice(c * g, (c + 1) * g)
            expected = state[key][rows] + 1 if c in held else state[key][rows]
            torch.testing.assert_close(new[key][rows], expected, msg=f"{key} class {c}")


def test_path_weights_are_class_counts_and_trunk_weights_sample_counts():
    spec = get_model("digits_cnn", 3)
    devices = [DeviceInfo(0, (10, 0, 2)), DeviceInfo(1, (0, 6, 6))]
    strategy = CAD(spec, TrainConfig(), devices, depth=1)
    state = strategy.initial_state(build_model(spec).state_dict())
    payloads = dict(strategy.configure_train(1, state, [0, 1]))
    updates = {d: Update({k: torch.full_like(v, float(d + 1)) if v.is_floating_point() else v
                          for k, v in p.state.items()}, devices[d].num_samples,
                         list(devices[d].class_counts)) for d, p in payloads.items()}
    new = strategy.aggregate_train(1, state, updates.items())
    g = strategy.decoupling.group_size("conv3.weight")
    # Trunk: (12*1 + 12*2) / 24; class 2's path: (2*1 + 6*2) / 8; class 0 only device 0.
    assert torch.allclose(new["conv1.weight"], torch.tensor(1.5))
    assert torch.allclose(new["conv3.weight"][2 * g:3 * g], torch.tensor(14 / 8))
    assert torch.allclose(new["conv3.weight"][:g], torch.tensor(1.0))
    assert torch.allclose(new["conv3.weight"][g:2 * g], torch.tensor(2.0))


def test_fed2_sends_the_whole_grouped_model_and_cad_a_smaller_one():
    spec = get_model("digits_cnn", 10)
    devices = [DeviceInfo(0, (5,) * 3 + (0,) * 7)]
    init = build_model(spec).state_dict()
    cad, fed2 = CAD(spec, TrainConfig(), devices), Fed2(spec, TrainConfig(), devices)
    p_cad = dict(cad.configure_train(1, cad.initial_state(init), [0]))[0]
    p_fed2 = dict(fed2.configure_train(1, fed2.initial_state(init), [0]))[0]
    assert p_cad.spec.class_ids == (0, 1, 2)
    assert p_fed2.spec.num_classes == 10
    assert state_bytes(p_cad.state) < state_bytes(p_fed2.state) < state_bytes(init)


def test_trunk_of_cad_starts_from_the_dense_initial_weights_and_spares_are_kept_aside():
    spec = get_model("digits_cnn", 10)
    init = build_model(spec).state_dict()
    strategy = CAD(spec, TrainConfig(seed=3), [DeviceInfo(0, (1,) * 10)], depth=1)
    state = strategy.initial_state(init)
    assert torch.equal(state["conv1.weight"], init["conv1.weight"])
    assert state["conv3.weight"].shape[0] == 120  # 12 filters per class, 8 spare
    assert torch.equal(state["spare/conv3.weight"], init["conv3.weight"][120:])
    payload = dict(strategy.configure_train(1, state, [0]))[0]
    assert not any(k.startswith("spare/") for k in payload.state)  # never sent
    assert not any(k.startswith("spare/") for k in strategy.global_model(state)[1])


@pytest.mark.parametrize("model,depth", [("alexnet", 2), ("vgg16", 3)])
def test_cad_sub_models_cost_less_than_fedavg_on_cifar_presets(model, depth):
    spec = get_model(model, 10)
    dec = decouple(spec, 10, depth)
    with torch.device("meta"):
        dense_state = build_model(spec).state_dict()
        dec_state = build_model(dec.spec).state_dict()
    sub_spec, sub_state, _ = extract(dec, dec_state, [0, 3, 4, 7, 9])  # 5 of 10 classes
    assert state_bytes(sub_state) < state_bytes(dense_state)
    assert train_flops_per_sample(sub_spec) < train_flops_per_sample(spec)


def test_bad_depth_and_too_narrow_layers_are_refused_with_the_reason():
    spec = get_model("digits_cnn", 10)
    with pytest.raises(SpecError, match="cad.depth=4 is out of range"):
        decouple(spec, 10, 4)
    narrow = spec_from_config("narrow", [4], (1, 8, 8), 10)
    with pytest.raises(SpecError, match="fewer than the 10 classes"):
        decouple(narrow, 10, 1)
    with pytest.raises(SpecError, match="distinct class ids"):
        index_map(decouple(spec, 10, 1), build_model(decouple(spec, 10, 1).spec).state_dict(),
                  [1, 1])


def test_cad_path_lr_scales_the_first_step_of_the_decoupled_layers_only(digits):
    from cadfl.device.train import DeviceData, train_local
    from cadfl.fl.payload import DeviceInfo

    spec = get_model("digits_cnn", 10)
    torch.manual_seed(0)
    dense = build_model(spec).state_dict()
    idx = torch.nonzero(digits.train_y < 5).flatten()[:100]
    data = DeviceData(digits.train_x, digits.train_y, 10, digits.mean, digits.std, index=idx)
    # One full-batch step without momentum or weight decay: a parameter's change is -lr * g.
    train = TrainConfig(batch_size=100, lr=0.1, momentum=0.0, weight_decay=0.0, augment=False)

    def change(path_lr: float) -> dict[str, torch.Tensor]:
        cad = CAD(spec, train, [DeviceInfo(0, (20,) * 5 + (0,) * 5)], depth=1, path_lr=path_lr)
        payload = dict(cad.configure_train(1, cad.initial_state(dense), [0]))[0]
        update = train_local(payload, data)
        return {k: update.state[k] - v for k, v in payload.state.items()
                if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))}

    plain, fast = change(1.0), change(3.0)
    decoupled = decouple(spec, 10, 1)
    for key in plain:
        factor = 3.0 if decoupled.is_path_key(key) else 1.0
        assert torch.allclose(fast[key], factor * plain[key], atol=1e-6), key
    assert any(decoupled.is_path_key(k) for k in plain) and not all(
        decoupled.is_path_key(k) for k in plain)


def test_cad_calibration_divides_the_global_logit_rows_by_their_norm_and_nothing_else():
    from cadfl.fl.payload import DeviceInfo

    spec = get_model("digits_cnn", 10)
    torch.manual_seed(0)
    dense = build_model(spec).state_dict()
    devices = [DeviceInfo(0, (20,) * 5 + (0,) * 5), DeviceInfo(1, (0,) * 5 + (20,) * 5)]
    train = TrainConfig()
    plain = CAD(spec, train, devices, depth=1)
    tau = CAD(spec, train, devices, depth=1, calibrate=0.5)
    state = plain.initial_state(dense)
    state["fc1.weight"] = state["fc1.weight"] * torch.arange(1, 11).view(-1, 1)  # unequal rows
    _, raw = plain.global_model(state)
    _, calibrated = tau.global_model(state)
    norms = raw["fc1.weight"].double().pow(2).sum(1).sqrt()  # by hand, per class row
    assert torch.allclose(calibrated["fc1.weight"].double(),
                          raw["fc1.weight"].double() / norms.sqrt().view(-1, 1))
    assert torch.allclose(calibrated["fc1.bias"].double(), raw["fc1.bias"].double() / norms.sqrt())
    assert all(torch.equal(calibrated[k], raw[k]) for k in raw if not k.startswith("fc1."))
    # Devices train and are scored on the uncalibrated sub-models.
    for (d, a), (_, b) in zip(plain.configure_train(1, state, [0, 1]),
                              tau.configure_train(1, state, [0, 1]), strict=True):
        assert a.state.keys() == b.state.keys()
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state), d
    assert plain.device_model_is_global() and not tau.device_model_is_global()


def test_classes_held_together_on_devices_share_a_group():
    from cadfl.cad.grouping import class_groups, cooccurrence

    sets = [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5), (1, 2), (3, 4)]
    co = cooccurrence(sets, 6)
    assert co[0, 1] == 2 and co[1, 2] == 1 and co[0, 5] == 0 and co.trace() == 0
    order, sizes = class_groups(sets, 6, 3)
    assert sizes == (2, 2, 2)
    assert {order[0:2], order[2:4], order[4:6]} == {(0, 1), (2, 3), (4, 5)}
    assert class_groups(sets, 6, 3, "even") == ((0, 1, 2, 3, 4, 5), (2, 2, 2))


def test_cad_with_groups_gives_a_device_one_wider_path_per_group_with_exact_logits():
    from cadfl.device.model import load_model
    from cadfl.fl.payload import DeviceInfo

    spec = get_model("digits_cnn", 6)
    torch.manual_seed(0)
    dense = build_model(spec).state_dict()
    holds = [(0, 3), (0, 3), (1, 4), (1, 4), (2, 5), (2, 5)]  # groups {0,3} {1,4} {2,5}
    devices = [DeviceInfo(i, tuple(10 if c in s else 0 for c in range(6)))
               for i, s in enumerate(holds)]
    cad = CAD(spec, TrainConfig(), devices, depth=1, groups=3)
    plain = CAD(spec, TrainConfig(), devices, depth=1)
    dec = cad.decoupling
    assert dec.spec.layers[-1].groups == (2, 2, 2)
    assert {dec.spec.class_ids[0:2], dec.spec.class_ids[2:4], dec.spec.class_ids[4:6]} == \
        {(0, 3), (1, 4), (2, 5)}
    state = cad.initial_state(dense)
    payload = dict(cad.configure_train(1, state, [0]))[0]
    conv = dec.spec.names[dec.first]
    assert payload.spec.layer(conv).out_ch == dec.spec.layer(conv).out_ch // 3  # one group
    sub_plain = dict(plain.configure_train(1, plain.initial_state(dense), [0]))[0]
    # One path of the group's width where plain CAD sends two of half of it.
    width = payload.spec.layer(conv).out_ch
    assert payload.spec.layer(conv).groups == (width,)
    assert sub_plain.spec.layer(conv).groups == (width // 2, width // 2)
    x = torch.randn(7, *spec.input_shape)
    with torch.no_grad():
        full = load_model(dec.spec, cad.global_model(state)[1]).eval()(x)
        sub = load_model(payload.spec, payload.state).eval()(x)
    cols = [dec.spec.class_ids.index(c) for c in payload.spec.class_ids]
    assert payload.spec.class_ids == (0, 3)
    assert torch.allclose(sub, full[:, cols], atol=1e-6)


def test_cad_with_class_groups_runs_end_to_end_with_path_paired_groups(tmp_path, digits):
    import json

    from cadfl.config import load_config
    from cadfl.engine.run import run_experiment

    def last(*extra):
        cfg = load_config(None, ["devices=4", "rounds=2", "data_fraction=0.5",
                                 'algorithms=["cad"]', *extra])
        out = tmp_path / ("-".join(extra) or "plain")
        run_experiment(cfg, out, quiet=True, dataset=digits)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])

    plain, grouped = last(), last("cad.groups=3")
    assert 0.0 < grouped["global_acc"] <= 1.0 and 0.0 < grouped["context_acc"] <= 1.0
    assert grouped["global_acc"] != plain["global_acc"]


def test_cad_variant_paper_runs_plain_cad_whatever_the_defaults_of_the_options_beyond_it(
        tmp_path, digits, monkeypatch):
    import json
    from dataclasses import fields

    from cadfl.config import load_config
    from cadfl.engine.run import run_experiment
    from cadfl.fl.cad import CADOptions

    def lines(*extra):
        cfg = load_config(None, ["devices=4", "rounds=2", "data_fraction=0.5",
                                 'algorithms=["cad"]', *extra])
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        run_experiment(cfg, out, quiet=True, dataset=digits)
        keep = ("global_acc", "context_acc", "bytes_down", "device_train_flops")
        return [{k: m[k] for k in keep} for m in map(json.loads, open(out / "metrics.jsonl"))]

    # The paper's method spelled out option by option, before any default moves.
    plain = lines("cad.personal=0", "cad.groups=0", "cad.calibrate=0", "cad.path_lr=1")
    # Defaults beyond the paper (as a winning variant would set them): "paper" turns them off.
    beyond = {"groups": 3, "calibrate": 1.0, "path_lr": 3.0, "personal": 1}
    names = [f.name for f in fields(CADOptions)]
    defaults = {**dict(zip(names, CADOptions.__init__.__defaults__, strict=True)), **beyond}
    monkeypatch.setattr(CADOptions.__init__, "__defaults__", tuple(defaults[n] for n in names))
    for key, value in beyond.items():
        monkeypatch.setattr(CADOptions, key, value)
    assert lines('cad.variant="paper"') == plain
    assert lines() != plain
    with pytest.raises(ValueError, match=r"cad.variant = \"paper\" is plain CAD.*cad.groups"):
        load_config(None, ['cad.variant="paper"', "cad.groups=2"])
