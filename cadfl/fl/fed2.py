"""Fed2 (Yu et al., KDD 2021) groups the features of the deep layers into its own number of groups,
each holding a contiguous run of classes (one per class by default: then it is the ablation
"CAD's grouped model and path-paired averaging, but every device trains the whole model").
Every device trains the whole grouped model; a group is averaged over the devices holding any
of its classes.

It is CAD's strategy (`cad.py`) with groups fixed at initialisation instead of class paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..cad.decouple import Decoupling, decouple, even_groups
from ..checks import check_range
from ..models import ModelSpec
from .aggregate import MEAN, Robustness
from .cad import CAD
from .payload import DeviceInfo, TrainConfig
from .registry import register
from .strategy import Setting


@dataclass
class Fed2Options:
    """Fed2's own settings (`[fed2]`): where the groups start and how many there are; it never
    uses CAD's activation assignment or warm-up."""

    depth: int = 1  # grouped conv layers from the end (0: classifier only)
    groups: int = 0  # feature groups; 0: one per class (else 1 to the number of classes)
    others: bool = False  # an "Others" group and logit, as CAD's

    def check(self, cfg: Any) -> None:
        """ValueError naming the field if a value is out of range (the upper bound of `groups`,
        the number of classes, is checked when the model is known: `Fed2`)."""
        check_range("fed2.depth", self.depth, 0)
        check_range("fed2.groups", self.groups, 0)


@register
class Fed2(CAD):
    """Fed2 (Yu et al., KDD 2021): feature groups fixed at initialisation, the grouped model
    trained whole on every device, group-wise averaging.

    From `depth` on, every layer's filters form `groups` equal groups (0: one per class); the
    classes fill the groups contiguously and as evenly as possible in logit order (class-id
    order): 10 classes in 3 groups are {0..3}, {4..6}, {7..9}. Logit c reads only its group's
    features. With `others`, "Others" is one more group of its own.

    The classifier is a grouped linear layer whose output groups hold each group's logits
    (4, 3 and 3 rows above) over equal input groups: `ModelSpec` allows unequal output groups
    for linear layers (a conv layer's stay equal). This keeps the model physically
    block-structured like CAD's, with no mask to maintain and no cross-group weights stored or
    sent; with one group per class it is CAD's decoupled model.

    Aggregation is CAD's path-paired averaging over groups: the trunk over every device
    (weighted by sample count), a group's rows, its logits included, over the devices holding
    any of its classes, weighted by their sample counts of those classes. So a device leaves
    the logits of classes it lacks out of its loss (`device_config`): what it would learn
    for them is dropped anyway. With one group per class its updates are then CAD's, at the
    cost of the whole model.
    """

    name = "fed2"
    summary = "Fed2 (KDD 2021): feature groups over the classes, the grouped model trained whole"
    family = "grouped"
    Options = Fed2Options

    @classmethod
    def from_setting(cls, setting: Setting, options: Fed2Options | None = None) -> Fed2:
        """Fed2 for a run: groups fixed at initialisation from its own depth and count."""
        o = options or Fed2Options()
        return cls(setting.spec, setting.train, setting.devices, bn=setting.bn,
                   robust=setting.robust, depth=o.depth, groups=o.groups,
                   others=setting.other if o.others else None)

    def __init__(self, spec: ModelSpec, train: TrainConfig, devices: Sequence[DeviceInfo],
                 bn: str = "average", robust: Robustness = MEAN, depth: int = 1,
                 groups: int = 0, others: int | None = None) -> None:
        k = spec.num_classes
        if not 0 <= groups <= k:
            raise ValueError(f"fed2.groups={groups} is out of range for {k} classes: allowed 0 "
                             f"(one group per class) or 1 to {k}")
        # Set before CAD's constructor, which decouples through `_decouple`.
        self.class_groups = even_groups(k, groups or k) + ((1,) if others is not None else ())
        super().__init__(spec, train, devices, bn=bn, robust=robust, depth=depth,
                         others=others)

    def _decouple(self, depth: int) -> Decoupling:
        """The dense model decoupled from `depth` on into Fed2's groups."""
        return decouple(self.dense_spec, self.dense_spec.num_classes, depth, self.class_groups)

    def device_classes(self, device: int) -> tuple[int, ...]:
        """Every class: devices train the full grouped model (groups of absent classes get
        weight zero in the average)."""
        return self.decoupling.spec.class_ids

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """The run's settings with the logits of the classes the device lacks out of its loss
        (`mask_absent`). Trained with every logit in the softmax, a device pushes those down,
        and their rows, averaged over their holders only, dropped that push and kept every
        holder's push up: the logits grew round after round until training diverged
        (xdev-2cls: non-finite from round ~15 at lr 0.003; paper-flcnn: best 0.360, last
        0.278)."""
        return replace(super().device_config(rnd, device), mask_absent=True)
