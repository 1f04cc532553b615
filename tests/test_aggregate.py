"""Aggregation: the weighted mean over holders, checked against an independent numpy version."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cadfl.fl.aggregate import Contribution, Robustness, aggregate, clip_update


def reference(state: dict, contributions: list[tuple[dict, float, dict, dict]]) -> dict:
    """Weighted mean per global row in float64 numpy, devices in the order given.

    Each contribution is (tensors, weight, rows, row_weights) like `Contribution`, as numpy.
    """
    out = {}
    for key, g in state.items():
        g = g.numpy()
        shape = g.shape if g.ndim else (1,)
        total = np.zeros(shape, dtype=np.float64)
        wsum = np.zeros(shape[0], dtype=np.float64)
        held = False
        for tensors, weight, rows, row_weights in contributions:
            if key not in tensors:
                continue
            held = True
            t = tensors[key].numpy().astype(np.float64).reshape(-1, *shape[1:])
            r = rows[key].numpy() if key in rows else np.arange(shape[0])
            w = (row_weights[key].numpy().astype(np.float64) if key in row_weights
                 else np.full(len(r), float(weight)))
            for i, row in enumerate(r):
                total[row] = total[row] + t[i] * w[i]
                wsum[row] = wsum[row] + w[i]
        if not held:
            out[key] = g
            continue
        old = g.astype(np.float64).reshape(shape)
        mean = old.copy()
        for row in range(shape[0]):
            if wsum[row] > 0:
                mean[row] = total[row] / wsum[row]
        if not np.issubdtype(g.dtype, np.floating):
            mean = np.rint(mean)
        out[key] = mean.reshape(g.shape).astype(g.dtype)
    return out


def as_contribution(c: tuple[dict, float, dict, dict]) -> Contribution:
    return Contribution(*c)


def assert_same(result: dict, expected: dict) -> None:
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key].dtype == torch.from_numpy(np.asarray(value)).dtype, key
        np.testing.assert_array_equal(result[key].numpy(), value, err_msg=key)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_full_tensors_are_the_sample_weighted_mean():
    state = {"w": rand(3, 4, seed=0), "b": rand(3, seed=1),
             "num_batches_tracked": torch.tensor(0, dtype=torch.int64)}
    contributions = [
        ({"w": rand(3, 4, seed=10 + d), "b": rand(3, seed=20 + d),
          "num_batches_tracked": torch.tensor(5 + 2 * d, dtype=torch.int64)}, n, {}, {})
        for d, n in enumerate([30, 7, 12])
    ]
    result = aggregate(state, [as_contribution(c) for c in contributions])
    assert_same(result, reference(state, contributions))
    # Spelled out for one entry, so the reference itself is checked too.
    ws = [c[0]["w"][1, 2].double().item() for c in contributions]
    expected = (30 * ws[0] + 7 * ws[1] + 12 * ws[2]) / 49
    assert result["w"][1, 2].item() == pytest.approx(expected, rel=1e-7)
    assert result["num_batches_tracked"].item() == round((30 * 5 + 7 * 7 + 12 * 9) / 49)


def test_sliced_tensors_use_row_weights_and_untouched_rows_keep_their_value():
    state = {"conv.weight": rand(5, 2, 3, 3, seed=0), "conv.bias": rand(5, seed=1),
             "fc.weight": rand(4, 6, seed=2),
             "bn.num_batches_tracked": torch.tensor(3, dtype=torch.int64)}
    a = ({"conv.weight": rand(2, 2, 3, 3, seed=3), "conv.bias": rand(2, seed=4),
          "fc.weight": rand(4, 6, seed=5),
          "bn.num_batches_tracked": torch.tensor(10, dtype=torch.int64)},
         20.0,
         {"conv.weight": torch.tensor([0, 2]), "conv.bias": torch.tensor([0, 2])},
         {"conv.weight": torch.tensor([3.0, 17.0], dtype=torch.float64),
          "conv.bias": torch.tensor([3.0, 17.0], dtype=torch.float64)})
    b = ({"conv.weight": rand(2, 2, 3, 3, seed=6), "conv.bias": rand(2, seed=7),
          "fc.weight": rand(4, 6, seed=8),
          "bn.num_batches_tracked": torch.tensor(21, dtype=torch.int64)},
         9.0,
         {"conv.weight": torch.tensor([2, 4]), "conv.bias": torch.tensor([2, 4])},
         {})
    result = aggregate(state, [as_contribution(a), as_contribution(b)])
    assert_same(result, reference(state, [a, b]))
    # Rows 1 and 3 were held by nobody: bit for bit the old values.
    for row in (1, 3):
        assert torch.equal(result["conv.weight"][row], state["conv.weight"][row])
        assert torch.equal(result["conv.bias"][row], state["conv.bias"][row])
    # Row 2 is held by both: 17 * a's second row + 9 * b's first row.
    expected = (17 * a[0]["conv.bias"][1].double() + 9 * b[0]["conv.bias"][0].double()) / 26
    assert result["conv.bias"][2].item() == pytest.approx(expected.item(), rel=1e-7)
    # Row 0 only a (row weight 3), row 4 only b: their own values.
    assert torch.equal(result["conv.bias"][0], a[0]["conv.bias"][0])
    assert torch.equal(result["conv.bias"][4], b[0]["conv.bias"][1])
    assert result["bn.num_batches_tracked"].item() == round((20 * 10 + 9 * 21) / 29)
    assert result["bn.num_batches_tracked"].dtype == torch.int64


def test_keys_nobody_sent_are_unchanged_and_the_input_is_not_modified():
    state = {"a": rand(3, seed=0), "b": rand(2, 2, seed=1)}
    before = {k: v.clone() for k, v in state.items()}
    result = aggregate(state, [Contribution({"a": rand(3, seed=2)}, 1.0)])
    assert torch.equal(result["b"], before["b"])
    assert not torch.equal(result["a"], before["a"])
    for k in state:
        assert torch.equal(state[k], before[k])


def test_rows_with_zero_total_weight_keep_their_value():
    state = {"w": rand(3, 2, seed=0)}
    c = Contribution({"w": rand(3, 2, seed=1)}, 1.0,
                     row_weights={"w": torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64)})
    result = aggregate(state, [c])
    assert torch.equal(result["w"][0], state["w"][0])
    assert torch.equal(result["w"][2], state["w"][2])
    assert torch.equal(result["w"][1], c.state["w"][1])


def test_accumulates_in_float64():
    # In float32, 2**24 + 1 + 1 stays 2**24; in float64 the mean is exactly (2**24 + 2) / 3.
    state = {"x": torch.zeros(1)}
    values = [2.0**24, 1.0, 1.0]
    contributions = [Contribution({"x": torch.tensor([v])}, 1.0) for v in values]
    result = aggregate(state, contributions)
    assert result["x"].item() == np.float32((2**24 + 2) / 3)
    float32_mean = ((torch.tensor([2.0**24]) + 1.0 + 1.0) / 3).item()
    assert result["x"].item() != float32_mean


def test_deterministic_for_a_given_device_order():
    state = {"w": rand(6, 5, seed=0)}
    cs = [Contribution({"w": rand(6, 5, seed=1 + d) * 10 ** d}, float(3 + d)) for d in range(4)]
    first = aggregate(state, cs)
    for _ in range(3):
        assert torch.equal(aggregate(state, cs)["w"], first["w"])
    # Another order gives the same mean up to rounding.
    torch.testing.assert_close(aggregate(state, cs[::-1])["w"], first["w"])


@pytest.mark.parametrize("bad", [
    Contribution({"w": torch.zeros(3, 5)}, 1.0),  # whole tensor of the wrong shape
    Contribution({"w": torch.zeros(3, 4)}, 1.0, rows={"w": torch.tensor([0, 1])}),  # rows
    Contribution({"w": torch.zeros(2, 5)}, 1.0, rows={"w": torch.tensor([0, 1])}),  # columns
])
def test_shape_mismatch_raises(bad):
    with pytest.raises(ValueError, match="w"):
        aggregate({"w": torch.zeros(3, 4)}, [bad])


@st.composite
def aggregation_cases(draw):
    rows = draw(st.integers(1, 6))
    tail = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    num_devices = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    state = {"w": torch.from_numpy(rng.normal(size=(rows, *tail)).astype(np.float32)),
             "n": torch.tensor(int(rng.integers(0, 100)), dtype=torch.int64)}
    contributions = []
    for _ in range(num_devices):
        weight = draw(st.floats(0.5, 1000.0))
        sliced = draw(st.booleans())
        r = (np.sort(rng.choice(rows, size=draw(st.integers(1, rows)), replace=False))
             if sliced else np.arange(rows))
        tensors = {"w": torch.from_numpy(rng.normal(size=(len(r), *tail)).astype(np.float32))}
        if draw(st.booleans()):
            tensors["n"] = torch.tensor(int(rng.integers(0, 1000)), dtype=torch.int64)
        row_map = {"w": torch.from_numpy(r)} if sliced else {}
        row_w = ({"w": torch.from_numpy(rng.uniform(0.0, 50.0, size=len(r)))}
                 if draw(st.booleans()) else {})
        contributions.append((tensors, weight, row_map, row_w))
    return state, contributions


@settings(max_examples=60, deadline=None)
@given(aggregation_cases())
def test_property_matches_independent_weighted_mean(case):
    state, contributions = case
    result = aggregate(state, [as_contribution(c) for c in contributions])
    assert_same(result, reference(state, contributions))


# Column maps (dim 1): width-scaled sub-models hold a block of rows x columns.


def block_cases() -> tuple[dict, list[Contribution]]:
    """A (4, 5, 2) tensor held as a block, whole, and as columns with row weights."""
    state = {"w": rand(4, 5, 2, seed=0), "n": torch.tensor(4, dtype=torch.int64)}
    return state, [
        Contribution({"w": rand(2, 3, 2, seed=1)}, 2.0, rows={"w": torch.tensor([0, 2])},
                     cols={"w": torch.tensor([1, 3, 4])}),
        Contribution({"w": rand(4, 5, 2, seed=2), "n": torch.tensor(9)}, 1.0),
        Contribution({"w": rand(4, 2, 2, seed=3)}, 5.0, cols={"w": torch.tensor([0, 3])},
                     row_weights={"w": torch.tensor([1.0, 0.0, 3.0, 4.0],
                                                    dtype=torch.float64)}),
    ]


def placed(state: dict, contributions: list[Contribution]) -> tuple[np.ndarray, np.ndarray]:
    """Each contribution's values and weights at global coordinates of "w" (nan/0: not
    held), by explicit loops over its rows and columns."""
    g = state["w"].numpy()
    values = np.full((len(contributions), *g.shape), np.nan)
    weights = np.zeros((len(contributions), *g.shape[:2]))
    for i, c in enumerate(contributions):
        t = c.state["w"].double().numpy()
        rows = c.rows.get("w", torch.arange(g.shape[0])).tolist()
        cols = c.cols.get("w", torch.arange(g.shape[1])).tolist()
        w = c.row_weights.get("w", torch.full((len(rows),), c.weight)).tolist()
        for a, r in enumerate(rows):
            for b, col in enumerate(cols):
                if w[a] > 0:
                    values[i, r, col] = t[a, b]
                    weights[i, r, col] = w[a]
    return values, weights


def test_columns_weighted_mean_per_coordinate():
    state, contributions = block_cases()
    values, weights = placed(state, contributions)
    w = weights[..., None]
    expected = np.where(w.sum(0) > 0, np.nansum(values * w, 0) / np.maximum(w.sum(0), 1e-300),
                        state["w"].double().numpy())
    result = aggregate(state, contributions)
    np.testing.assert_allclose(result["w"].double().numpy(), expected, rtol=1e-6)
    assert result["n"].item() == 9  # held by the second contribution alone
    # (1, 2) is held by the whole tensor alone; (1, 1) also by nobody else (row weight 0).
    assert torch.equal(result["w"][1, 2], contributions[1].state["w"][1, 2])
    assert torch.equal(result["w"][1, 0], contributions[1].state["w"][1, 0])


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_columns_with_robust_rules(rule):
    state, contributions = block_cases()
    values, _ = placed(state, contributions)
    result = aggregate(state, contributions, Robustness(rule, trim=0.0))
    if rule == "median":  # torch's: the lower of the two middle values of an even count
        ordered = np.sort(values, 0)  # nan last
        middle = (np.sum(~np.isnan(values), 0) - 1) // 2
        expected = np.take_along_axis(ordered, middle[None], 0)[0]
    else:
        expected = np.nanmean(values, 0)
    np.testing.assert_allclose(result["w"].double().numpy(), expected, rtol=1e-6)


def test_clip_update_measures_the_held_block_only():
    state = {"w": torch.zeros(3, 4)}
    block = Contribution({"w": torch.full((2, 2), 3.0)}, 1.0, rows={"w": torch.tensor([0, 2])},
                         cols={"w": torch.tensor([1, 3])})
    clipped = clip_update(state, block, 1.0)  # update norm sqrt(4 * 9) = 6
    torch.testing.assert_close(clipped.state["w"], torch.full((2, 2), 0.5))
    assert clipped.cols is block.cols
    result = aggregate(state, [block], Robustness(clip=1.0))
    assert result["w"][0, 1].item() == pytest.approx(0.5) and result["w"][1].abs().sum() == 0
