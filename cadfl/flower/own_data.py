"""A node's own data: images in a folder on the node decide its device's context.

A SuperNode started with `--node-config 'data-dir="DIR"'` holds images in the `folder` layout
(one sub-folder per class name). In the query round it reports its class names and how many
training images it has of each (counts, never images). The server maps the names to class ids
through the run's class list, appending names the list lacks (New Class: ids after the known
ones), and builds the devices from the counts (`server_dataset`): every algorithm, CAD's
sub-models included, sees each device's classes as the node reported them. Every training
and evaluation message then tells the node the run's classes, normalisation and augmentation
(`RunData`), with which it labels its images (`NodeData.device_data`) and scores its own model
on its held-out share, answering with counts (`NodeData.score`, `count_scores`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import Config
from ..data.datasets import Dataset, load_folder
from ..device.score import predict, restricted_predictions
from ..device.train import DeviceData
from ..fl.payload import State
from ..models import ModelSpec


@dataclass(frozen=True)
class RunData:
    """How the run labels and normalises images: the run's class names (class id = position),
    the number of labels devices count over (the classes, plus Others if used), the
    normalisation statistics and the training augmentation."""

    classes: list[str]
    labels: int
    mean: list[float]
    std: list[float]
    crop_padding: int
    flip: bool

    @classmethod
    def of(cls, ds: Dataset, labels: int) -> RunData:
        """The run's view of dataset `ds` (devices counting over `labels` labels)."""
        return cls(list(ds.classes), labels, list(ds.mean), list(ds.std), ds.crop_padding,
                   ds.flip)

    def to_json(self) -> str:
        """As sent in a message."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunData:
        """Back from `to_json`."""
        return cls(**json.loads(text))


def run_classes(known: list[str], reports: dict[int, dict[str, int]]) -> list[str]:
    """The run's class list: `known`, then every name a device reported that it lacks (New
    Class), in order of device id, then name."""
    classes = list(known)
    for d in sorted(reports):
        classes += [n for n in sorted(reports[d]) if n not in classes]
    return classes


def server_dataset(run: Dataset, reports: dict[int, dict[str, int]]) -> Dataset:
    """The run's dataset as the server sees devices with their own data: its test set, its
    classes extended by the reported new names, and one training label per image a device
    reported (`owners`: which device; `with_reports`)."""
    ds = Dataset(run.name, torch.zeros(0, *run.input_shape, dtype=torch.uint8),
                 torch.zeros(0, dtype=torch.long), run.test_x, run.test_y,
                 run_classes(run.classes, reports), run.mean, run.std, run.crop_padding,
                 run.flip, owners=torch.zeros(0, dtype=torch.long))
    return with_reports(ds, reports)


def with_reports(ds: Dataset, reports: dict[int, dict[str, int]]) -> Dataset:
    """`ds` (a `server_dataset`) with one training label per image each device reported
    appended, in order of device, then name, owned by that device (ValueError for a class
    name `ds` lacks). The server never has the nodes' images: their places hold a zero image
    that takes no memory (a broadcast view)."""
    unknown = sorted({n for r in reports.values() for n in r} - set(ds.classes))
    if unknown:
        raise ValueError(f"class names {unknown} are not in the run's class list")
    runs = [(d, ds.classes.index(n), reports[d][n]) for d in sorted(reports)
            for n in sorted(reports[d])]
    counts = torch.tensor([k for *_, k in runs], dtype=torch.long)
    labels = torch.tensor([c for _, c, _ in runs], dtype=torch.long).repeat_interleave(counts)
    owners = torch.tensor([d for d, *_ in runs], dtype=torch.long).repeat_interleave(counts)
    y = torch.cat([ds.train_y, labels])
    x = torch.zeros(1, *ds.input_shape, dtype=torch.uint8).expand(len(y), *ds.input_shape)
    return replace(ds, train_x=x, train_y=y, owners=torch.cat([ds.owners, owners]))


def count_scores(counts: dict[str, int]) -> tuple[float, float, float, float]:
    """A node's score counts as the engine's `context_scores` (context accuracy, Others
    rejection, in-context accuracy with Others, open context accuracy): the node has no
    images of other classes, so rejection is nan; nan as well where it holds no held-out
    image or the model has no Others."""
    total = counts["total"]
    acc = counts["correct"] / total if total else math.nan
    with_others = counts["correct_with_others"]
    inside = with_others / total if total and with_others >= 0 else math.nan
    return acc, math.nan, inside, counts["correct_open"] / total if total else math.nan


class NodeData:
    """The images in a node's folder, read with the run's `[folder]` settings."""

    def __init__(self, data_dir: str | Path, cfg: Config) -> None:
        self.folder = load_folder(data_dir, **asdict(cfg.folder))

    def report(self) -> dict[str, int]:
        """Training images per class name (what the node tells the server)."""
        counts = torch.bincount(self.folder.train_y, minlength=self.folder.num_classes)
        return dict(zip(self.folder.classes, counts.tolist(), strict=True))

    def _ids(self, run: RunData) -> torch.Tensor:
        missing = [n for n in self.folder.classes if n not in run.classes]
        if missing:
            raise ValueError(f"classes {missing} of this node are not in the run's class list")
        return torch.tensor([run.classes.index(n) for n in self.folder.classes])

    def device_data(self, run: RunData) -> DeviceData:
        """The training images, labelled with the run's class ids."""
        ds = self.folder
        return DeviceData(ds.train_x, self._ids(run)[ds.train_y], run.labels, tuple(run.mean),
                          tuple(run.std), run.crop_padding, run.flip)

    def score(self, spec: ModelSpec, state: State, run: RunData, precision: str = "fp32"
              ) -> dict[str, int]:
        """Counts of the device's model, run at `precision`, on the held-out images of its
        classes: `correct`
        (argmax over its classes), `correct_with_others` (Others among the answers; -1
        when the model has no Others output), `correct_open` (argmax over all the model's
        outputs) and `total`."""
        ids = self._ids(run)
        classes = tuple(sorted(ids[self.folder.train_y].unique().tolist()))
        y = ids[self.folder.test_y]
        inside = torch.isin(y, torch.tensor(classes))
        x, y = self.folder.test_x[inside], y[inside]
        logits = predict(spec, state, x, tuple(run.mean), tuple(run.std),
                         precision=precision)
        other = len(run.classes)  # Others' label: one past the classes (if the run has it)

        def correct(answers: tuple[int, ...]) -> int:
            return int((restricted_predictions(logits, spec.class_ids, answers) == y).sum())

        opened = int((torch.tensor(spec.class_ids)[logits.argmax(1)] == y).sum()) if len(y) else 0
        return {"correct": correct(classes), "total": len(y), "correct_open": opened,
                "correct_with_others": correct((*classes, other))
                if other in spec.class_ids else -1}
