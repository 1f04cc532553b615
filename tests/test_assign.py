"""Activation assignment: balanced filter-to-class assignment, function-preserving permutation,
decoupling of a trained dense model, and the class-activation statistic it rests on."""

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cadfl.cad.assign import (
    balanced_assignment,
    group_permutation,
    permute_dense,
    to_decoupled,
)
from cadfl.cad.decouple import decouple
from cadfl.cad.preference import class_activation_sums, class_means, selectivity
from cadfl.device.train import DeviceData, run_task
from cadfl.fl.cad import CAD
from cadfl.fl.payload import DeviceInfo, TrainConfig
from cadfl.models import build_model, get_model
from cadfl.models.spec import spec_from_config
from tests.test_cad import decoupled_cases


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(0, 5), st.integers(0, 2**16))
def test_balanced_assignment_gives_every_class_the_same_number_of_filters(k, per, spare, seed):
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(k, k * per + spare, generator=g)
    owner = balanced_assignment(means, per)
    assert torch.bincount(owner[owner >= 0], minlength=k).tolist() == [per] * k
    assert int((owner < 0).sum()) == spare
    perm = group_permutation(owner, k)
    assert sorted(perm.tolist()) == list(range(k * per + spare))
    assert owner[perm][: k * per].tolist() == sorted(owner[owner >= 0].tolist())


def test_balanced_assignment_recovers_a_planted_preference():
    k, per = 4, 3
    truth = torch.arange(k).repeat_interleave(per)[torch.randperm(k * per)]
    means = torch.rand(k, k * per) * 0.1
    means[truth, torch.arange(k * per)] += 1.0  # each filter fires for its class
    assert torch.equal(balanced_assignment(means, per), truth)


@settings(max_examples=50, deadline=None)
@given(decoupled_cases(), st.integers(0, 2**16))
def test_permutation_leaves_the_dense_models_outputs_unchanged(case, perm_seed):
    spec, k, depth, _, seed = case
    dec = decouple(spec, k, depth)
    torch.manual_seed(seed)
    dense = build_model(spec)
    for m in dense.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    dense.eval()
    g = torch.Generator().manual_seed(perm_seed)
    perms = {name: torch.randperm(spec.layer(name).out_ch, generator=g)
             for name in dec.widths if name != spec.names[-1]}
    permuted = build_model(spec).eval()
    permuted.load_state_dict(permute_dense(dec, dense.state_dict(), perms))
    x = torch.randn(3, *spec.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(permuted(x), dense(x), rtol=1e-5, atol=1e-5)


def test_decoupling_a_block_diagonal_dense_model_keeps_its_function():
    """If the dense model has no cross-group weights, decoupling changes nothing."""
    spec = spec_from_config("t", [6, "M", 6], (1, 8, 8), 3, hidden=(6,))
    dec = decouple(spec, 3, depth=1)
    torch.manual_seed(0)
    dense = build_model(spec).eval()
    state = dense.state_dict()
    for name in ("conv2", "fc1", "fc2"):
        w = state[f"{name}.weight"]
        g_out = w.shape[0] // 3
        g_in = w.shape[1] // 3 if name != "conv2" else None
        if g_in is None:
            continue  # conv2 is the first decoupled layer: it reads every trunk channel
        mask = torch.zeros_like(w)
        for c in range(3):
            mask[c * g_out:(c + 1) * g_out, c * g_in:(c + 1) * g_in] = 1
        state[f"{name}.weight"] = w * mask
    dense.load_state_dict(state)
    grouped = build_model(dec.spec).eval()
    grouped.load_state_dict(to_decoupled(dec, state))
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x), dense(x), rtol=1e-5, atol=1e-5)


def test_class_activation_sums_recover_a_filter_wired_to_one_class():
    spec = spec_from_config("wired", [2], (1, 4, 4), 2)
    state = build_model(spec).state_dict()
    state["conv1.weight"].zero_()
    state["conv1.bias"].copy_(torch.tensor([-0.5, -0.5]))
    state["conv1.weight"][0, 0, 1, 1] = 1.0  # filter 0 fires on bright images only
    state["conv1.weight"][1, 0, 1, 1] = -1.0  # filter 1 never fires on non-negative inputs
    x = torch.cat([torch.full((6, 1, 4, 4), 255, dtype=torch.uint8),
                   torch.zeros(6, 1, 4, 4, dtype=torch.uint8)])
    y = torch.tensor([1] * 6 + [0] * 6)
    sums, counts = class_activation_sums(spec, state, x, y, 2, (0.0,), (1.0,))
    means = class_means(sums, counts)["conv1"]
    assert counts.tolist() == [6, 6]
    assert means[1, 0] > 0 and means[0, 0] == 0  # filter 0 prefers class 1
    assert means[:, 1].abs().sum() == 0
    assert 0.0 <= selectivity(means) <= 1.0


def test_selectivity_is_higher_for_class_specific_filters_than_random_ones():
    k, f = 5, 40
    specific = torch.zeros(k, f)
    specific[torch.arange(f) % k, torch.arange(f)] = 1.0
    generic = torch.rand(k, f) + 1.0
    assert selectivity(specific) == 1.0
    assert 0.0 <= selectivity(generic) < 0.3


def test_activation_cad_queries_once_then_trains_decoupled_sub_models():
    from cadfl.data.datasets import load_digits

    ds = load_digits()
    spec = get_model("digits_cnn", 10)
    devices, data = [], {}
    for d, classes in enumerate([(0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 2, 4, 6, 8)]):
        idx = torch.nonzero(torch.isin(ds.train_y, torch.tensor(classes))).flatten()[d::3]
        data[d] = DeviceData(ds.train_x[idx], ds.train_y[idx], 10, ds.mean, ds.std)
        devices.append(DeviceInfo(d, tuple(data[d].class_counts())))
    torch.manual_seed(0)
    strategy = CAD(spec, TrainConfig(), devices, depth=1, assign="activation", warmup_rounds=1)
    state = strategy.initial_state(build_model(spec).state_dict())
    assert strategy.configure_query(1, state, [0, 1, 2]) == {}  # still warming up
    state = strategy.aggregate_train(1, state, ((d, run_task(p, data[d])) for d, p in
                                                strategy.configure_train(1, state, [0, 1, 2])))
    queries = strategy.configure_query(2, state, [0, 1, 2])
    assert {p.task for p in queries.values()} == {"activations"}
    replies = {d: run_task(p, data[d]) for d, p in queries.items()}
    assert all(r.state["conv3"].shape == (10, 128) for r in replies.values())
    state = strategy.aggregate_query(2, state, replies)
    assert strategy.is_decoupled()
    assert strategy.configure_query(3, state, [0, 1, 2]) == {}
    assert state["spare/conv3.weight"].shape == (8, 64, 3, 3)  # 128 - 10 x 12 left over
    notes = strategy.notes["assignment"]["conv3"]
    assert notes["filters_per_class"] == 12 and 0.0 <= notes["argmax_fraction"] <= 1.0
    payloads = dict(strategy.configure_train(2, state, [0, 1, 2]))
    assert payloads[0].spec.class_ids == (0, 1, 2, 3, 4)
    assert payloads[0].state["conv3.weight"].shape[0] == 60


def test_suggested_depth_starts_at_the_first_selective_conv_layer():
    from cadfl.cad.preference import suggest_depth

    assert suggest_depth([0.05, 0.1, 0.35, 0.5], 0.3) == 2
    assert suggest_depth([0.4, 0.1, 0.2], 0.3) == 3
    assert suggest_depth([0.05, 0.1], 0.3) == 0


def test_auto_depth_decouples_where_selectivity_says_and_is_restored_on_resume():
    from cadfl.cad.preference import suggest_depth
    from cadfl.data.datasets import load_digits

    ds = load_digits()
    spec = get_model("digits_cnn", 10)
    data = {0: DeviceData(ds.train_x[:600], ds.train_y[:600], 10, ds.mean, ds.std)}
    devices = [DeviceInfo(0, tuple(data[0].class_counts()))]
    torch.manual_seed(0)

    def make():
        return CAD(spec, TrainConfig(), devices, depth="auto", assign="activation",
                   warmup_rounds=1, selectivity_threshold=0.2)

    strategy = make()
    state = strategy.initial_state(build_model(spec).state_dict())
    state = strategy.aggregate_train(1, state, [(0, run_task(
        dict(strategy.configure_train(1, state, [0]))[0], data[0]))])
    replies = {0: run_task(strategy.configure_query(2, state, [0])[0], data[0])}
    state = strategy.aggregate_query(2, state, replies)
    convs = ("conv1", "conv2", "conv3")
    expected = suggest_depth([strategy.notes["selectivity"][n] for n in convs], 0.2)
    assert strategy.notes["depth"] == strategy.notes["suggested_depth"] == expected
    assert strategy.is_decoupled()
    resumed = make()  # a fresh strategy takes up the saved structure, depth included
    assert not resumed.is_decoupled()
    resumed.restore(json.loads(json.dumps(strategy.structure())))
    assert resumed.is_decoupled() and resumed.decoupling.depth == expected
    assert resumed.spec == strategy.spec
