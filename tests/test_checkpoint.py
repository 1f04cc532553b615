"""Checkpoints: safetensors + JSON round trip, and damaged files refused with their name."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open

from cadfl.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn1.running_var": torch.rand(4, generator=g),
        "bn1.num_batches_tracked": torch.tensor(17, dtype=torch.int64),
        "fc1.weight": torch.randn(10, 8, generator=g).t(),  # not contiguous
        "device/3/fc1.bias": torch.randn(10, generator=g).to(torch.float64),
    }


def test_round_trip(tmp_path):
    state = sample_state()
    save_checkpoint(tmp_path, "fedavg", state, {"algorithm": "fedavg", "round": 7})
    loaded, record = load_checkpoint(tmp_path, "fedavg")
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype, key
        assert torch.equal(loaded[key], value), key
    assert record["round"] == 7 and record["algorithm"] == "fedavg"


def test_overwrite_keeps_the_latest(tmp_path):
    state = sample_state()
    save_checkpoint(tmp_path, "a", state, {"round": 1})
    newer = {k: v + 1 for k, v in state.items()}
    save_checkpoint(tmp_path, "a", newer, {"round": 2})
    loaded, record = load_checkpoint(tmp_path, "a")
    assert record["round"] == 2
    assert all(torch.equal(loaded[k], newer[k]) for k in newer)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.json", "a.prev.json", "a.prev.safetensors", "a.safetensors"]


def test_missing_checkpoint_is_none(tmp_path):
    assert load_checkpoint(tmp_path, "nothing") is None


def test_files_are_safetensors_and_json_without_pickle(tmp_path, monkeypatch):
    state = sample_state()
    save_checkpoint(tmp_path, "ck", state, {"round": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.json", "ck.safetensors"]
    record = json.loads((tmp_path / "ck.json").read_text())
    assert record["round"] == 3 and len(record["sha256"]) == 64
    with safe_open(str(tmp_path / "ck.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(state)
    assert not (tmp_path / "ck.safetensors").read_bytes().startswith(b"\x80")  # pickle magic

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded, _ = load_checkpoint(tmp_path, "ck")
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])


def test_altered_weights_are_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_state(), {"round": 1})
    path = tmp_path / "ck.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data; the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="ck.safetensors"):
        load_checkpoint(tmp_path, "ck")


def test_truncated_weights_are_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_state(), {"round": 1})
    path = tmp_path / "ck.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="ck.safetensors"):
        load_checkpoint(tmp_path, "ck")


def test_missing_weights_are_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_state(), {"round": 1})
    (tmp_path / "ck.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ck.safetensors"):
        load_checkpoint(tmp_path, "ck")


def test_corrupt_record_is_refused_naming_the_file(tmp_path):
    save_checkpoint(tmp_path, "ck", sample_state(), {"round": 1})
    (tmp_path / "ck.json").write_text('{"round": 1, "sha')
    with pytest.raises(CheckpointError, match="ck.json"):
        load_checkpoint(tmp_path, "ck")


def test_an_altered_latest_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog):
    first, second = sample_state(), {k: v + 1 for k, v in sample_state().items()}
    save_checkpoint(tmp_path, "ck", first, {"round": 1})
    save_checkpoint(tmp_path, "ck", second, {"round": 2})
    data = bytearray((tmp_path / "ck.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "ck.safetensors").write_bytes(bytes(data))
    loaded, record = load_checkpoint(tmp_path, "ck")
    assert record["round"] == 1
    assert all(torch.equal(loaded[k], first[k]) for k in first)
    assert "ck.safetensors" in caplog.text


def test_every_crash_point_of_a_save_leaves_an_intact_checkpoint(tmp_path, monkeypatch):
    """Die after each file operation of the second save: one of the two rounds is loaded."""
    import cadfl.engine.checkpoint as ck

    real = ck.os.replace
    for die_after in range(4):
        d = tmp_path / str(die_after)
        save_checkpoint(d, "ck", sample_state(), {"round": 1})
        calls = []

        def dying(a, b, calls=calls, limit=die_after):
            if len(calls) == limit:
                raise KeyboardInterrupt  # stands in for kill -9 between two renames
            calls.append(a)
            real(a, b)

        monkeypatch.setattr(ck.os, "replace", dying)
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(d, "ck", sample_state(), {"round": 2})
        monkeypatch.setattr(ck.os, "replace", real)
        _, record = load_checkpoint(d, "ck")
        assert record["round"] in (1, 2)


def test_a_pickle_in_place_of_the_weights_is_refused_not_unpickled(tmp_path):
    import hashlib
    import json
    import pickle

    save_checkpoint(tmp_path, "ck", sample_state(), {"round": 1})
    payload = pickle.dumps({"conv1.weight": [1.0]})
    (tmp_path / "ck.safetensors").write_bytes(payload)
    meta = json.loads((tmp_path / "ck.json").read_text())
    meta["sha256"] = hashlib.sha256(payload).hexdigest()  # even with a matching hash
    (tmp_path / "ck.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(tmp_path, "ck")
