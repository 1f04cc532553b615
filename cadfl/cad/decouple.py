"""Decoupling: split a CNN into a shared trunk and groups of filters (class paths).

From the decoupling depth on (the last `depth` conv layers or blocks, then every linear
layer), each layer's filters are divided into G equal, contiguous groups. The first decoupled
layer reads every channel of the trunk; every later one connects group g only to group g (a
grouped convolution / grouped linear layer), and the logit of a class reads only its group.
A block splits every convolution inside it the same way (`cadfl.models.layers`). Each
parameter then has one owner: the trunk, or one group. Filters left over by the equal split
(width mod G) are the spare pool: they are not part of the model.

CAD has one group per class (G = K: a group is a class's path). Fed2 may have fewer groups,
each holding a contiguous run of classes in logit order (`even_groups`). The logits layer then
has unequal output groups (the number of classes of each group) over equal input groups: a
grouped linear layer whose row of class c reads only c's group (`cadfl.models.spec`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

from ..models.spec import ModelSpec, SpecError


@dataclass(frozen=True)
class Decoupling:
    """Where a decoupled model's groups (class paths) are.

    `first` is the index (in `spec.layers`) of the first decoupled layer; `widths` maps each
    decoupled conv/linear layer name to (filters per group, spare filters) in the dense model
    (for the logits: (1, 0), one row per class).
    The logits layer's `groups` give the number of classes of every group: group 0 holds the
    first classes of `spec.class_ids`, group 1 the next ones, and so on (one class each in CAD).
    """

    spec: ModelSpec
    num_classes: int
    depth: int
    first: int
    widths: dict[str, tuple[int, int]]

    def to_dict(self) -> dict:
        """JSON-able form (saved with checkpoints: the structure is never guessed from
        tensor shapes)."""
        return {"spec": self.spec.to_dict(), "num_classes": self.num_classes,
                "depth": self.depth, "first": self.first,
                "widths": {k: list(v) for k, v in self.widths.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Decoupling:
        """Inverse of `to_dict`."""
        return cls(ModelSpec.from_dict(d["spec"]), int(d["num_classes"]), int(d["depth"]),
                   int(d["first"]), {k: (int(a), int(b)) for k, (a, b) in d["widths"].items()})

    def is_path_key(self, key: str) -> bool:
        """Whether the rows of a state key are class paths (a tensor of a decoupled layer
        that its paths do not share)."""
        name = key.split(".", 1)[0]
        return (name in self.spec.names and self.spec.names.index(name) >= self.first
                and self.group_size(key) is not None)

    @property
    def num_groups(self) -> int:
        """Number of groups of every decoupled layer."""
        return len(self.spec.layers[-1].groups)

    def logit_of(self, cls: int) -> int:
        """Position of class `cls`'s logit (SpecError if the model has none)."""
        try:
            return self.spec.class_ids.index(cls)
        except ValueError:
            raise SpecError(f"class {cls} has no path; the model's classes are "
                            f"{list(self.spec.class_ids)}") from None

    def group_of(self, cls: int) -> int:
        """Position of the group holding class `cls` (SpecError if it has none)."""
        logit = self.logit_of(cls)
        return next(g for g, end in enumerate(accumulate(self.spec.layers[-1].groups))
                    if logit < end)

    def group_size(self, key: str) -> int | None:
        """Rows per group of a decoupled state tensor (the logits have one row per class),
        or None for a tensor its paths share (a block's input batch norm on the trunk)."""
        name, param = key.split(".", 1)
        layer = self.spec.layer(name)
        return layer.behaviour.rows_per_group(layer, param)


def conv_indices(spec: ModelSpec) -> list[int]:
    """Positions of the feature stages cad.depth counts: conv layers and blocks."""
    return [i for i, layer in enumerate(spec.layers) if layer.behaviour.unit]


def first_decoupled(spec: ModelSpec, depth: int) -> int:
    """Index of the first decoupled layer: the `depth`-th conv layer or block from the end,
    or the first linear layer when `depth` is 0."""
    convs = conv_indices(spec)
    if not 0 <= depth <= len(convs):
        raise SpecError(f"cad.depth={depth} is out of range for {spec.name}: allowed 0 to "
                        f"{len(convs)} (conv layers and blocks counted from the end)")
    if depth:
        return convs[-depth]
    return next(i for i, layer in enumerate(spec.layers) if layer.kind == "linear")


def even_groups(num_classes: int, groups: int) -> tuple[int, ...]:
    """Classes per group when `num_classes` classes fill `groups` contiguous groups as evenly
    as possible: the first `num_classes % groups` groups hold one class more (10 into 3:
    (4, 3, 3))."""
    if not 1 <= groups <= num_classes:
        raise ValueError(f"{groups} groups for {num_classes} classes: allowed 1 to "
                         f"{num_classes}")
    base, extra = divmod(num_classes, groups)
    return tuple(base + (g < extra) for g in range(groups))


def decouple(spec: ModelSpec, num_classes: int, depth: int,
             class_groups: Sequence[int] | None = None) -> Decoupling:
    """The decoupled spec of a dense `spec` from `depth` on, for `num_classes` classes in
    groups of `class_groups` consecutive logits (default: one group per class, CAD's paths)."""
    k = num_classes
    if spec.num_classes != k:
        raise SpecError(f"{spec.name} has {spec.num_classes} logits but {k} classes were given")
    sizes = tuple(class_groups) if class_groups is not None else (1,) * k
    if sum(sizes) != k or min(sizes) < 1:
        raise SpecError(f"class groups {list(sizes)} must be positive and sum to the {k} classes")
    n = len(sizes)
    start = first_decoupled(spec, depth)
    layers = list(spec.layers[:start])
    widths: dict[str, tuple[int, int]] = {}
    shapes = spec.shapes()
    channels = shapes[start - 1][0] if start else spec.input_shape[0]
    spatial = 1  # features per channel when a flatten follows decoupled conv layers
    grouped = False  # whether the current input is already split into class groups
    for i in range(start, len(spec.layers)):
        layer, name = spec.layers[i], spec.names[i]

        def fail(msg: str, name: str = name) -> SpecError:
            return SpecError(f"cad.depth={depth} cannot split {spec.name}'s {name}: {msg}")

        if layer.weighted:
            last = i == len(spec.layers) - 1
            per_group = 1 if last else layer.out_ch // n
            if per_group < 1:
                paths = "classes" if n == k else "groups"
                raise SpecError(f"{name} has {layer.out_ch} filters, fewer than the {n} {paths} "
                                "that need a path each: use a smaller cad.depth or wider layers")
            groups = sizes if last else (per_group,) * n
            widths[name] = (per_group, layer.out_ch - sum(groups))
            layer = layer.behaviour.split(layer, channels * spatial, groups, grouped, fail)
            channels, spatial, grouped = layer.out_ch, 1, True
        elif layer.behaviour.splittable:
            layer = layer.behaviour.split(layer, channels, (channels // n,) * n, grouped, fail)
        elif layer.kind == "flatten":
            h, w = shapes[i - 1][1:]
            spatial = h * w
        layers.append(layer)
    dec = spec.replace_layers(layers, spec.class_ids)
    return Decoupling(dec, k, depth, start, widths)
