"""The per-device state store: entries keyed by layer and class path, spilling, resume."""

from __future__ import annotations

import pytest
import torch

from cadfl.cad.decouple import decouple
from cadfl.cad.submodel import extract
from cadfl.device.executor import Runtime
from cadfl.device.store import DeviceStore, kept_entries, with_kept
from cadfl.fl.payload import Payload, TrainConfig, Update
from cadfl.fl.strategy import BN_STAT_KEYS
from cadfl.models import build_model, get_model


def _cad_submodel(classes):
    spec = get_model("digits_cnn", 3)
    dec = decouple(spec, 3, 1)
    torch.manual_seed(0)
    return extract(dec, build_model(dec.spec).state_dict(), classes)[:2]


def test_a_device_that_swaps_a_class_gets_the_clouds_statistics_for_the_new_one():
    # Round 1: the device holds classes 0 and 1 and keeps its batch-norm statistics.
    spec01, state01 = _cad_submodel((0, 1))
    runtime = Runtime(data_of=None, store=DeviceStore())
    payload = Payload(spec01, state01, TrainConfig(), keep=BN_STAT_KEYS)
    trained = {k: v + 7 if k.endswith("running_mean") else v for k, v in state01.items()}
    runtime.finish(0, payload, Update(trained, 10, [5, 5, 0]))

    # Round 2: it holds 0 and 2. The sub-model has the same shapes as before, so matching by
    # shape (what cadfl did before) would hand class 1's statistics to class 2's path.
    spec02, state02 = _cad_submodel((0, 2))
    own = runtime.own_state(0, Payload(spec02, state02, TrainConfig(), keep=BN_STAT_KEYS))
    g = spec02.layer("bn3").groups[0]
    assert torch.equal(own["bn3.running_mean"][:g], state01["bn3.running_mean"][:g] + 7)
    assert torch.equal(own["bn3.running_mean"][g:], state02["bn3.running_mean"][g:])  # cloud's
    assert torch.equal(own["bn1.running_mean"], state01["bn1.running_mean"] + 7)  # trunk: own
    assert torch.equal(own["conv1.weight"], state02["conv1.weight"])  # not kept: the cloud's


def test_entries_are_named_by_layer_and_class_and_merge_back():
    spec, state = _cad_submodel((2, 0))
    entries = kept_entries(spec, state, BN_STAT_KEYS + ("fc1.*",))
    assert {"bn3.running_mean@2", "bn3.running_mean@0", "bn1.running_var", "fc1.weight@0",
            "fc1.bias@2", "bn3.num_batches_tracked"} <= set(entries)
    assert not any(k.startswith("conv") for k in entries)
    g = spec.layer("bn3").groups[0]
    assert torch.equal(entries["bn3.running_mean@2"], state["bn3.running_mean"][:g])
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    back = with_kept(spec, zeros, BN_STAT_KEYS + ("fc1.*",), entries)
    for k in state:
        kept = k.startswith("fc1") or k.endswith(("running_mean", "running_var", "tracked"))
        assert torch.equal(back[k], state[k] if kept else zeros[k]), k


def test_a_dense_classifier_is_kept_per_class_too():
    spec = get_model("digits_cnn", 3).replace_layers(list(get_model("digits_cnn", 3).layers),
                                                    (4, 7, 9))
    state = build_model(spec).state_dict()
    entries = kept_entries(spec, state, ("fc1.*",))
    assert torch.equal(entries["fc1.weight@7"], state["fc1.weight"][1:2])


def test_spilled_devices_come_back_and_resume_rolls_back_later_rounds(tmp_path):
    store = DeviceStore(tmp_path, budget_bytes=100)  # every device spills at once
    one = {"w": torch.arange(40.0)}
    for rnd in (1, 2):
        store.begin_round(rnd)
        for d in range(3):
            store.put(d, {"w": one["w"] + 10 * rnd + d})
        store.flush(rnd)
        assert store.memory_bytes() <= 160  # one device's 40 floats at most
    store.begin_round(3)
    store.put(1, {"w": one["w"] + 99})  # round 3 starts, the run dies before its checkpoint
    store.put(2, {"w": one["w"] + 99})
    store.flush(3)

    back = DeviceStore(tmp_path, budget_bytes=100)
    back.resume(2)
    for d in range(3):
        assert torch.equal(back.get(d)["w"], one["w"] + 20 + d), d
    assert back.get(5) == {}


def test_an_in_memory_store_keeps_everything_and_cannot_be_flushed():
    store = DeviceStore(budget_bytes=1)  # no directory: nothing spills, whatever the budget
    store.put(3, {"a": torch.ones(2)})
    store.put(3, {"b": torch.zeros(1)})
    store.put(4, {"a": torch.ones(2)})
    assert set(store.get(3)) == {"a", "b"} and set(store.get(4)) == {"a"}
    with pytest.raises(RuntimeError, match="cannot be flushed"):
        store.flush(1)


def test_reading_a_device_changes_nothing(tmp_path):
    """`get` is a query: reading a spilled device neither loads it back into memory nor
    spills another one."""
    store = DeviceStore(tmp_path, budget_bytes=48)  # room for one device of 10 floats
    store.begin_round(1)
    store.put(0, {"w": torch.arange(10.0)})
    store.put(1, {"w": torch.ones(10)})  # device 0 spills to its file
    held, files = store.memory_bytes(), sorted(p.name for p in tmp_path.iterdir())
    assert torch.equal(store.get(0)["w"], torch.arange(10.0))
    assert torch.equal(store.get(1)["w"], torch.ones(10))
    assert store.memory_bytes() == held == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == files == ["0.safetensors"]
