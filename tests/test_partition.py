"""Partition invariants (property-based) and argument errors."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cadfl.data.partition import (
    Partition,
    PartitionError,
    make_partition,
    partition_classes,
    partition_dirichlet,
    partition_iid,
)

SETTINGS = settings(max_examples=100, deadline=None)


def make_labels(sizes: list[int], seed: int) -> np.ndarray:
    """Shuffled labels with sizes[c] samples of class c."""
    y = np.repeat(np.arange(len(sizes)), sizes)
    return np.random.default_rng(seed).permutation(y)


def check_common(p: Partition, y: np.ndarray, num_devices: int) -> None:
    """Disjoint, complete, non-empty, sorted, counts consistent with the labels."""
    assert p.num_devices == num_devices
    assert p.num_classes == int(y.max()) + 1
    flat = np.concatenate([np.asarray(i) for i in p.indices])
    assert len(flat) == len(y)
    assert np.array_equal(np.sort(flat), np.arange(len(y)))
    for d, idx in enumerate(p.indices):
        assert idx, f"device {d} is empty"
        assert idx == sorted(idx)
        assert p.class_counts[d] == np.bincount(y[idx], minlength=p.num_classes).tolist()
        assert p.classes(d) == sorted(set(y[idx].tolist()))
    p.check_labels(y)


@st.composite
def class_problems(draw: st.DrawFn) -> tuple[np.ndarray, int, int, int]:
    """A feasible (labels, num_devices, k, seed) for the classes scheme."""
    num_classes = draw(st.integers(2, 12))
    k = draw(st.integers(1, num_classes))
    num_devices = draw(st.integers(-(-num_classes // k), 20))
    # Every class needs at least as many images as devices that may share it.
    least = -(-num_devices * k // num_classes)
    sizes = draw(st.lists(st.integers(least, least + 30), min_size=num_classes,
                          max_size=num_classes))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_labels(sizes, seed), num_devices, k, seed


@SETTINGS
@given(class_problems())
def test_classes_invariants(problem: tuple[np.ndarray, int, int, int]) -> None:
    y, num_devices, k, seed = problem
    p = partition_classes(y, num_devices, k, seed)
    check_common(p, y, num_devices)
    assert p.scheme == "classes" and p.params == {"k": k} and p.seed == seed
    for d in range(num_devices):
        assert len(p.classes(d)) == k
    counts = np.asarray(p.class_counts)
    holders = (counts > 0).sum(axis=0)
    assert holders.min() >= 1, "every class is held by some device"
    # Balanced class sets: holder counts are floor or ceil of D*k/C.
    assert holders.max() - holders.min() <= 1
    assert holders.sum() == num_devices * k
    for c in range(p.num_classes):
        shares = counts[counts[:, c] > 0, c]
        assert shares.max() - shares.min() <= 1, f"class {c} split unevenly: {shares}"
    assert partition_classes(y, num_devices, k, seed) == p
    assert partition_classes(torch.from_numpy(y), num_devices, k, seed) == p


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """(labels, num_devices, seed) with num_devices <= number of samples."""
    num_classes = draw(st.integers(2, 12))
    sizes = draw(st.lists(st.integers(1, 40), min_size=num_classes, max_size=num_classes))
    num_devices = draw(st.integers(1, min(sum(sizes), 30)))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_labels(sizes, seed), num_devices, seed


@SETTINGS
@given(problems())
def test_iid_invariants(problem: tuple[np.ndarray, int, int]) -> None:
    y, num_devices, seed = problem
    p = partition_iid(y, num_devices, seed)
    check_common(p, y, num_devices)
    sizes = [len(i) for i in p.indices]
    assert max(sizes) - min(sizes) <= 1
    assert partition_iid(y, num_devices, seed) == p


@SETTINGS
@given(problems(), st.floats(0.001, 100.0))
def test_dirichlet_invariants(problem: tuple[np.ndarray, int, int], alpha: float) -> None:
    y, num_devices, seed = problem
    p = partition_dirichlet(y, num_devices, alpha, seed)
    check_common(p, y, num_devices)
    assert p.params == {"alpha": alpha}
    assert partition_dirichlet(y, num_devices, alpha, seed) == p


def test_dirichlet_alpha_controls_skew() -> None:
    y = make_labels([200] * 10, 0)

    def classes_per_device(alpha: float) -> float:
        p = partition_dirichlet(y, 10, alpha, seed=1)
        return np.mean([len(p.classes(d)) for d in range(10)])
    assert classes_per_device(0.05) < classes_per_device(100.0) == 10


def test_seed_changes_partition() -> None:
    y = make_labels([50] * 10, 0)
    assert partition_classes(y, 10, 5, 0) != partition_classes(y, 10, 5, 1)
    assert partition_iid(y, 10, 0) != partition_iid(y, 10, 1)


def test_cad_paper_setting() -> None:
    """10 devices x 5 classes of a CIFAR-10-shaped label set: 5 holders per class."""
    y = make_labels([5000] * 10, 0)
    p = partition_classes(y, 10, 5, seed=0)
    assert all(len(p.classes(d)) == 5 for d in range(10))
    assert (np.asarray(p.class_counts) > 0).sum(axis=0).tolist() == [5] * 10
    assert sorted({len(i) for i in p.indices}) == [5000]


@SETTINGS
@given(problems(), st.sampled_from(["iid", "classes", "dirichlet"]))
def test_save_load_round_trip(tmp_path_factory: pytest.TempPathFactory,
                              problem: tuple[np.ndarray, int, int], scheme: str) -> None:
    y, num_devices, seed = problem
    try:
        p = make_partition(y, scheme, num_devices, seed, k=1, alpha=0.3)
    except PartitionError:  # k=1 cannot cover every class with few devices
        return
    path = tmp_path_factory.mktemp("part") / "p.json"
    p.save(path)
    assert Partition.load(path) == p
    doc = json.loads(path.read_text())
    assert set(doc) == {"scheme", "seed", "num_classes", "params", "devices"}
    assert [dev["id"] for dev in doc["devices"]] == list(range(num_devices))


def test_summary_lists_devices_and_totals() -> None:
    y = make_labels([6, 6, 6], 0)
    p = partition_classes(y, 3, 2, seed=0)
    text = p.summary(["a", "b", "c"])
    assert "3 devices" in text and "18 samples" in text
    assert "a:6 b:6 c:6" in text
    assert len(text.splitlines()) == 2 + 3 + 3


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"scheme": "iid", "num_devices": 0}, "num_devices must be >= 1"),
        ({"scheme": "iid", "num_devices": 31}, "more than the 30 training samples"),
        ({"scheme": "classes", "num_devices": 3, "k": 0}, "k must be in 1..3"),
        ({"scheme": "classes", "num_devices": 3, "k": 4}, "k must be in 1..3"),
        ({"scheme": "classes", "num_devices": 2, "k": 1}, "held by no device"),
        ({"scheme": "classes", "num_devices": 3}, "needs k"),
        ({"scheme": "dirichlet", "num_devices": 3, "alpha": 0.0}, "alpha must be > 0"),
        ({"scheme": "dirichlet", "num_devices": 3, "alpha": -1.0}, "alpha must be > 0"),
        ({"scheme": "dirichlet", "num_devices": 3, "alpha": float("nan")}, "alpha must be > 0"),
        ({"scheme": "dirichlet", "num_devices": 3}, "needs alpha"),
        ({"scheme": "shards", "num_devices": 3}, "valid: iid, classes, dirichlet"),
    ],
)
def test_bad_arguments(kwargs: dict, needle: str) -> None:
    y = make_labels([10, 10, 10], 0)
    with pytest.raises(PartitionError, match=needle):
        make_partition(y, seed=0, **kwargs)


def test_class_too_small_for_its_devices() -> None:
    y = make_labels([10, 10, 2], 0)  # 6 devices x k=2 over 3 classes: 4 devices per class
    with pytest.raises(PartitionError, match="class 2 has 2 images but 4 devices"):
        partition_classes(y, 6, 2, seed=0)


def test_bad_labels() -> None:
    for y in (np.array([]), np.array([[0, 1]]), np.array([0.5, 1.0]), np.array([-1, 0])):
        with pytest.raises(PartitionError, match="labels must be"):
            partition_iid(y, 1, 0)


def test_check_labels_rejects_other_dataset() -> None:
    p = partition_iid(make_labels([5, 5], 0), 2, 0)
    with pytest.raises(PartitionError, match="wrong dataset"):
        p.check_labels(make_labels([5, 5], 1))
    with pytest.raises(PartitionError, match="exactly once"):
        p.check_labels(make_labels([5, 6], 0))


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda doc: doc.pop("seed"), "missing key 'seed'"),
        (lambda doc: doc.update(scheme="shards"), "scheme 'shards'"),
        (lambda doc: doc["devices"][1].update(id=5), "ids must be"),
        (lambda doc: doc["devices"][0]["indices"].reverse(), "sorted and unique"),
        (lambda doc: doc["devices"][0].update(indices=["a"]), "non-negative integers"),
        (lambda doc: doc["devices"][0]["class_counts"].append(0), "class_counts must have"),
        (lambda doc: doc["devices"][1].update(indices=doc["devices"][0]["indices"]),
         "share indices"),
        (lambda doc: doc.update(devices=[]), "no devices"),
        (lambda doc: doc.update(devices={}), "devices a list"),
    ],
)
def test_load_rejects_malformed(tmp_path, edit, needle) -> None:
    path = tmp_path / "p.json"
    partition_iid(make_labels([4, 4], 0), 2, 0).save(path)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(PartitionError, match=needle) as info:
        Partition.load(path)
    assert str(path) in str(info.value)


def test_load_rejects_non_json(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(PartitionError, match="cannot read partition file"):
        Partition.load(path)
    with pytest.raises(PartitionError, match="cannot read partition file"):
        Partition.load(tmp_path / "missing.json")


def test_hold_out_takes_a_seeded_share_of_every_class_of_every_device():
    from cadfl.data.partition import hold_out

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    part = make_partition(labels, "classes", 5, seed=1, k=2)
    kept, val = hold_out(part, labels, 0.25, seed=3)
    again = hold_out(part, labels, 0.25, seed=3)[1]
    assert np.array_equal(val, again)
    for d in range(5):
        before, after = set(part.indices[d]), set(kept.indices[d])
        mine = before - after
        assert after <= before and mine <= set(val.tolist())
        for c in part.classes(d):
            n = part.class_counts[d][c]
            assert sum(labels[i] == c for i in mine) == (min(n - 1, -(-n // 4)) if n > 1 else 0)
        assert kept.class_counts[d] == np.bincount(labels[sorted(after)], minlength=4).tolist()
    assert len(val) + sum(map(len, kept.indices)) == 400
