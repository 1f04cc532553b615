"""Decoupling: split a CNN into a shared trunk and one path of filters per class.

From the decoupling depth on (the last `depth` conv layers, then every linear layer), each
layer's filters are divided into K equal, contiguous groups, one per class. The first decoupled
layer reads every channel of the trunk; every later one connects group c only to group c
(a grouped convolution / grouped linear layer), and logit c reads only group c. Each
parameter then has one owner: the trunk, or one class's path. Filters left over by the equal
split (width mod K) are the spare pool: they are not part of the model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..models.spec import ModelSpec, SpecError


@dataclass(frozen=True)
class Decoupling:
    """Where a decoupled model's class paths are.

    `first` is the index (in `spec.layers`) of the first decoupled layer; `widths` maps each
    decoupled conv/linear layer name to (filters per class, spare filters) in the dense model.
    Group i of every decoupled layer is the path of class `spec.class_ids[i]`.
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
        """Whether a state key belongs to a decoupled layer (its rows are class paths)."""
        name = key.split(".", 1)[0]
        return name in self.spec.names and self.spec.names.index(name) >= self.first

    def group_of(self, cls: int) -> int:
        """Position of class `cls`'s path among the groups (SpecError if it has none)."""
        try:
            return self.spec.class_ids.index(cls)
        except ValueError:
            raise SpecError(f"class {cls} has no path; the model's classes are "
                            f"{list(self.spec.class_ids)}") from None

    def group_size(self, key: str) -> int:
        """Rows per class of a decoupled state tensor."""
        layer = self.spec.layer(key.split(".", 1)[0])
        return layer.out_ch // len(layer.groups)


def conv_indices(spec: ModelSpec) -> list[int]:
    """Positions of the conv layers in `spec.layers`."""
    return [i for i, layer in enumerate(spec.layers) if layer.kind == "conv"]


def first_decoupled(spec: ModelSpec, depth: int) -> int:
    """Index of the first decoupled layer: the `depth`-th conv from the end, or the first
    linear layer when `depth` is 0."""
    convs = conv_indices(spec)
    if not 0 <= depth <= len(convs):
        raise SpecError(f"cad.depth={depth} is out of range for {spec.name}: allowed 0 to "
                        f"{len(convs)} (conv layers counted from the end)")
    if depth:
        return convs[-depth]
    return next(i for i, layer in enumerate(spec.layers) if layer.kind == "linear")


def decouple(spec: ModelSpec, num_classes: int, depth: int) -> Decoupling:
    """The decoupled spec of a dense `spec` for `num_classes` class paths from `depth` on
    (path i belongs to the class of logit i)."""
    k = num_classes
    if spec.num_classes != k:
        raise SpecError(f"{spec.name} has {spec.num_classes} logits but {k} classes were given")
    start = first_decoupled(spec, depth)
    layers = list(spec.layers[:start])
    widths: dict[str, tuple[int, int]] = {}
    shapes = spec.shapes()
    channels = shapes[start - 1][0] if start else spec.input_shape[0]
    spatial = 1  # features per channel when a flatten follows decoupled conv layers
    grouped = False  # whether the current input is already split into class groups
    for i in range(start, len(spec.layers)):
        layer, name = spec.layers[i], spec.names[i]
        if layer.kind in ("conv", "linear"):
            last = i == len(spec.layers) - 1
            per_class = 1 if last else layer.out_ch // k
            if per_class < 1:
                raise SpecError(f"{name} has {layer.out_ch} filters, fewer than the {k} classes "
                                "that need a path each: use a smaller cad.depth or wider layers")
            widths[name] = (per_class, layer.out_ch - per_class * k)
            layer = replace(layer, in_ch=channels * spatial, out_ch=per_class * k,
                            groups=(per_class,) * k, grouped_in=grouped)
            channels, spatial, grouped = layer.out_ch, 1, True
        elif layer.kind == "bn":
            layer = replace(layer, in_ch=channels, out_ch=channels, groups=(channels // k,) * k)
        elif layer.kind == "flatten":
            h, w = shapes[i - 1][1:]
            spatial = h * w
        layers.append(layer)
    dec = spec.replace_layers(layers, spec.class_ids)
    return Decoupling(dec, k, depth, start, widths)
