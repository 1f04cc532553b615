"""Dataset loaders: digits, CIFAR-10 files, and the download/failure paths (never the network)."""

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from cadfl.data import datasets
from cadfl.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR10_FOLDER,
    CIFAR10_URL,
    DataError,
    channel_stats,
    cifar10_root,
    load_cifar10,
    load_dataset,
    load_digits,
)


def test_digits() -> None:
    d = load_digits()
    assert d.name == "digits" and d.classes == [str(c) for c in range(10)]
    assert d.num_classes == 10 and d.input_shape == (1, 8, 8)
    assert d.crop_padding == 1 and d.flip is False
    assert len(d.train_x) + len(d.test_x) == 1797
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        assert x.dtype == torch.uint8 and x.is_contiguous() and x.shape[1:] == (1, 8, 8)
        assert y.dtype == torch.int64 and y.shape == (len(x),)
    assert d.train_x.max() == 255 and d.train_x.min() == 0
    # Stratified: every class in both splits, about 20% of it in test.
    train_counts, test_counts = torch.bincount(d.train_y), torch.bincount(d.test_y)
    fraction = test_counts / (train_counts + test_counts)
    assert len(test_counts) == 10 and ((fraction - 0.2).abs() < 0.01).all()
    again = load_dataset("digits")
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(d, name), getattr(again, name))
    assert d.mean == again.mean
    assert d.mean[0] == pytest.approx((d.train_x / 255).mean().item(), abs=1e-6)


def test_digits_are_sklearns_images_and_labels_scaled() -> None:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    d = load_digits()
    x = torch.cat([d.train_x, d.test_x]).reshape(-1, 64)
    y = torch.cat([d.train_y, d.test_y])
    expected = np.rint(bunch.data * 255 / 16).astype(int)
    # The split reorders images; compare as sorted sets of (image, label) rows.
    assert sorted(zip(map(tuple, x.tolist()), y.tolist(), strict=True)) == \
        sorted(zip(map(tuple, expected.tolist()), bunch.target.tolist(), strict=True))


def test_channel_stats_match_float_computation() -> None:
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(x)
    f = x.double() / 255
    assert mean == pytest.approx(f.mean(dim=(0, 2, 3)).tolist())
    assert std == pytest.approx(f.std(dim=(0, 2, 3), unbiased=False).tolist())


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="valid names: cifar10, digits"):
        load_dataset("mnist")


def test_cifar10_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CADFL_DATA", raising=False)
    assert cifar10_root() == tmp_path / "home" / ".cache" / "cadfl"
    monkeypatch.setenv("CADFL_DATA", str(tmp_path / "env"))
    assert cifar10_root() == tmp_path / "env"
    assert cifar10_root(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.skipif(
    not (Path(os.environ.get("CADFL_DATA", "/nonexistent")) / CIFAR10_FOLDER).is_dir(),
    reason="set CADFL_DATA to a folder containing cifar-10-batches-py to test the real files",
)
def test_cifar10_real_files() -> None:
    d = load_dataset("cifar10")
    assert d.classes == CIFAR10_CLASSES and d.input_shape == (3, 32, 32)
    assert d.crop_padding == 4 and d.flip is True
    assert d.train_x.shape == (50_000, 3, 32, 32) and d.test_x.shape == (10_000, 3, 32, 32)
    assert d.train_x.dtype == torch.uint8 and d.train_x.is_contiguous()
    assert d.train_y.dtype == torch.int64
    assert torch.bincount(d.train_y).tolist() == [5000] * 10
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    assert all(0.4 < m < 0.5 for m in d.mean) and all(0.2 < s < 0.3 for s in d.std)


def write_batch(path: Path, n: int, row: int = 3072, labels: list | None = None) -> None:
    d = {b"data": np.zeros((n, row), dtype=np.uint8),
         b"labels": [i % 10 for i in range(n)] if labels is None else labels}
    path.write_bytes(pickle.dumps(d))


def write_fake_cifar(root: Path, n: int = 10) -> Path:
    """A cifar-10-batches-py folder with the right files but only n images per batch."""
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_batch(folder / name, n)
    meta = {b"label_names": [c.encode() for c in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make `_download` fail like an offline machine; returns the URLs it was asked for."""
    calls = []

    def offline(url: str, dest: Path) -> None:
        calls.append(url)
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(datasets, "_download", offline)
    return calls


def test_cifar10_small_batches_rejected(tmp_path: Path, no_network: list[str]) -> None:
    write_fake_cifar(tmp_path)
    with pytest.raises(DataError, match=r"data_batch_1: b'data' should be .*\(10000, 3072\)"):
        load_cifar10(tmp_path)
    assert no_network == []


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda f: [(f / n).unlink() for n in ("data_batch_3", "test_batch")],
         "incomplete: data_batch_3, test_batch missing"),
        (lambda f: (f / "data_batch_1").write_bytes(b"garbage"), "data_batch_1 is not a readable"),
        (lambda f: (f / "batches.meta").write_bytes(pickle.dumps([1])), "batches.meta holds"),
        (lambda f: (f / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]})),
         "batches.meta: b'label_names' should list 10"),
        (lambda f: write_batch(f / "data_batch_1", 10_000, labels=[11] * 10_000),
         "data_batch_1: b'labels' should be"),
        (lambda f: write_batch(f / "data_batch_1", 10_000, row=100), "data_batch_1: b'data'"),
    ],
)
def test_cifar10_malformed_file_named(tmp_path: Path, damage, needle: str) -> None:
    folder = write_fake_cifar(tmp_path)
    damage(folder)
    with pytest.raises(DataError, match=needle) as info:
        load_cifar10(tmp_path)
    assert str(folder) in str(info.value)


def test_cifar10_missing_offline(tmp_path: Path, no_network: list[str]) -> None:
    (tmp_path / "unrelated.txt").write_text("keep me")
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    message = str(info.value)
    assert str(tmp_path / CIFAR10_FOLDER) in message
    assert CIFAR10_URL in message and "--data-dir DIR" in message and "CADFL_DATA=DIR" in message
    assert "no network in tests" in message
    assert no_network == [CIFAR10_URL]
    assert os.listdir(tmp_path) == ["unrelated.txt"]


def test_cifar10_missing_offline_removes_created_dirs(tmp_path: Path, no_network) -> None:
    with pytest.raises(DataError):
        load_cifar10(tmp_path / "new" / "root")
    assert os.listdir(tmp_path) == []


def test_cifar10_no_download(tmp_path: Path, no_network: list[str]) -> None:
    with pytest.raises(DataError, match="download disabled"):
        load_cifar10(tmp_path, download=False)
    assert no_network == []


def test_cifar10_md5_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "_download", lambda url, dest: dest.write_bytes(b"junk"))
    with pytest.raises(DataError, match="MD5") as info:
        load_cifar10(tmp_path)
    assert str(tmp_path / CIFAR10_FOLDER) in str(info.value)
    assert os.listdir(tmp_path) == []


def test_cifar10_download_extracts_into_place(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in archive with the official layout; its MD5 replaces the official one.
    write_fake_cifar(tmp_path / "src")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
    archive = buf.getvalue()
    monkeypatch.setattr(datasets, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(datasets, "_download", lambda url, dest: dest.write_bytes(archive))
    root = tmp_path / "root"
    # The stand-in batches are small, so loading fails after a successful download.
    with pytest.raises(DataError, match="data_batch_1: b'data'"):
        load_cifar10(root)
    assert os.listdir(root) == [CIFAR10_FOLDER]
    assert sorted(os.listdir(root / CIFAR10_FOLDER)) == sorted(
        os.listdir(tmp_path / "src" / CIFAR10_FOLDER))
