"""The `folder` dataset (a user's own images, one sub-folder per class) and how a node's own
class names become the run's class ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cadfl.config import ConfigError, load_config
from cadfl.data.datasets import DataError, load_dataset, load_folder
from cadfl.engine.experiment import Experiment
from cadfl.flower.own_data import count_scores, run_classes, server_dataset


def write_digit_folder(root: Path, classes: dict[str, int], per_class: int,
                       offset: int = 0) -> Path:
    """Folder `root` with one sub-folder per name of `classes`, holding `per_class` PNG
    images (16x16 grayscale: scikit-learn's 8x8 digits of the given digit, upscaled), from
    the `offset`-th image of that digit on."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for name, digit in classes.items():
        (root / name).mkdir(parents=True)
        images = bunch.images[bunch.target == digit][offset: offset + per_class]
        for i, img in enumerate(images):
            pixels = np.kron(np.rint(img * 255 / 16), np.ones((2, 2))).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / name / f"{i:03d}.png")
    return root


def test_load_folder_reads_resizes_and_holds_out_a_share_per_class(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", {"b": 1, "a": 0, "c": 2}, 10)
    (root / ".hidden").mkdir()  # skipped, as are hidden files
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    ds = load_folder(root, size=8, channels=1, test_fraction=0.2, seed=3)
    assert ds.name == "folder" and ds.classes == ["a", "b", "c"]
    assert ds.input_shape == (1, 8, 8) and ds.train_x.dtype == torch.uint8
    assert torch.bincount(ds.train_y).tolist() == [8, 8, 8]
    assert torch.bincount(ds.test_y).tolist() == [2, 2, 2]
    assert ds.crop_padding == 1 and not ds.flip
    # Seeded: the same split again, another with another seed.
    again = load_folder(root, size=8, channels=1, test_fraction=0.2, seed=3)
    assert torch.equal(again.test_x, ds.test_x)
    other = load_folder(root, size=8, channels=1, test_fraction=0.2, seed=4)
    assert not torch.equal(other.test_x, ds.test_x)
    # Resized back to 8x8 (bilinear, antialiased), the images stay close to the digits'.
    from sklearn.datasets import load_digits
    originals = load_digits().images[load_digits().target == 0][:10] * 255 / 16
    mine = torch.cat([ds.train_x[ds.train_y == 0], ds.test_x[ds.test_y == 0]]).float()
    assert abs(mine.mean().item() - originals.mean()) < 5
    rgb = load_folder(root, size=12, channels=3, test_fraction=0.0)
    assert rgb.input_shape == (3, 12, 12) and len(rgb.test_y) == 0 and len(rgb.train_y) == 30
    assert torch.equal(rgb.train_x[:, 0], rgb.train_x[:, 2])  # gray in RGB


def test_load_folder_keeps_a_training_image_per_class(tmp_path):
    root = write_digit_folder(tmp_path / "imgs", {"x": 4}, 1)
    ds = load_folder(root, size=8, channels=1, test_fraction=0.9)
    assert len(ds.train_y) == 1 and len(ds.test_y) == 0


@pytest.mark.parametrize("problem, message", [
    ("missing", "is not a folder"),
    ("no_classes", "has no class sub-folders"),
    ("empty_class", "has no images"),
    ("unreadable", "is not a readable image"),
])
def test_load_folder_errors_are_one_line(tmp_path, problem, message):
    root = tmp_path / "imgs"
    if problem != "missing":
        root.mkdir()
    if problem in ("empty_class", "unreadable"):
        write_digit_folder(root / "sub", {"a": 0}, 2)
        root = root / "sub"
        (root / "b").mkdir()
        if problem == "unreadable":
            (root / "b" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=message) as info:
        load_folder(root)
    assert "\n" not in str(info.value)


def test_folder_dataset_in_the_engine(tmp_path, one_thread):
    """`dataset = "folder"` with `data_dir` and the `[folder]` table runs like any other."""
    root = write_digit_folder(tmp_path / "imgs", {str(d): d for d in range(4)}, 12)
    cfg = load_config(None, ["dataset=folder", f"data_dir={root}", "folder.size=8",
                             "folder.channels=1", "devices=2", "partition.k=2"])
    exp = Experiment.setup(cfg)
    assert exp.dataset.classes == ["0", "1", "2", "3"] and exp.spec.input_shape == (1, 8, 8)
    assert sorted(c for d in range(2) for c in exp.partition.classes(d)) == [0, 1, 2, 3]
    assert load_dataset("folder", root, size=8, channels=1).num_classes == 4
    with pytest.raises(ConfigError, match="folder.channels"):
        load_config(None, ["folder.channels=2"])
    with pytest.raises(DataError, match="data_dir"):
        Experiment.setup(load_config(None, ["dataset=folder"]))


def test_reported_names_map_to_the_runs_class_ids_and_new_names_are_appended(digits):
    reports = {2: {"seven": 4, "3": 5}, 0: {"0": 3, "1": 2}, 1: {"1": 1, "zeta": 2, "alpha": 1}}
    classes = run_classes(digits.classes, reports)
    assert classes == [*digits.classes, "alpha", "zeta", "seven"]  # by device, then name
    ds = server_dataset(digits, reports)
    assert ds.classes == classes and ds.num_classes == 13
    assert ds.test_x is digits.test_x and (ds.mean, ds.std) == (digits.mean, digits.std)
    assert ds.train_x.shape == (18, 1, 8, 8) and ds.train_x.stride()[0] == 0  # no images
    cfg = load_config(None, ["devices=3", 'algorithms=["cad"]'])
    exp = Experiment.setup(cfg, ds)
    counts = exp.partition.class_counts
    assert counts[0][:2] == [3, 2] and sum(counts[0]) == 5
    assert counts[1][1] == 1 and counts[1][10] == 1 and counts[1][11] == 2
    assert counts[2][3] == 5 and counts[2][12] == 4
    assert [d.classes for d in exp.devices] == [(0, 1), (1, 10, 11), (3, 12)]
    assert len(exp.data(2)) == 9
    # A device without images (its node has not reported) holds nothing and is not
    # sampled; images of a device the config lacks are refused.
    exp = Experiment.setup(load_config(None, ["devices=4"]), ds)
    assert exp.devices[3].classes == () and exp.holding() == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"images of devices \[2\]"):
        Experiment.setup(load_config(None, ["devices=2"]), ds)


def test_count_scores():
    assert count_scores({"correct": 3, "total": 4, "correct_with_others": -1,
                         "correct_open": 1})[0] == 0.75
    acc, reject, inside, opened = count_scores({"correct": 3, "total": 4,
                                                "correct_with_others": 2, "correct_open": 1})
    assert (acc, inside, opened) == (0.75, 0.5, 0.25) and np.isnan(reject)
    assert all(np.isnan(count_scores({"correct": 0, "total": 0, "correct_with_others": 0,
                                      "correct_open": 0})))
