"""Models as data: a `ModelSpec` is an input shape and a list of `Layer`s; `build_model` makes it.

A spec is plain, JSON-serialisable data, so it can travel inside a payload to a device, which
builds the network without knowing which algorithm produced it. Conv and linear layers may carry
*channel groups*: contiguous runs of output channels, one per class path (see `cadfl.cad`).
A layer with `grouped_in` connects each output group only to the matching input group
(block-diagonal weights, stored as a PyTorch grouped convolution / grouped linear layer).
What each kind of layer does (shapes, module, class paths, width slices) is its class in
`cadfl.models.layers`; residual blocks are layers of their own there, so a ResNet is still a
sequence of layers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from .layers import KINDS, Block, Kind


class SpecError(ValueError):
    """A model spec that cannot be built: the message names the layer and the problem."""


@dataclass(frozen=True)
class Layer:
    """One layer of a model spec.

    `in_ch`/`out_ch` are channels for conv and batch norm, features for linear layers.
    `groups` lists the sizes of contiguous output-channel groups (class paths), or None for a
    dense layer. `grouped_in` makes output group i read only input group i: the inputs split
    into equal groups, and so must the outputs of a conv layer. A linear layer's output groups
    may differ in size: Fed2's classifier, whose feature groups hold different numbers of
    classes (10 classes in 3 groups: 4, 3 and 3 logits over three equal feature groups).
    Blocks (`cadfl.models.layers`) also have a `skip` ("identity", "conv" for a projection,
    "" for none) and, for an inverted residual, an `expand` ratio and `hidden` channels.
    """

    kind: str
    in_ch: int = 0
    out_ch: int = 0
    kernel: int = 0
    stride: int = 1
    padding: int = 0
    bias: bool = True
    p: float = 0.0
    groups: tuple[int, ...] | None = None
    grouped_in: bool = False
    skip: str = ""
    expand: int = 0
    hidden: int = 0

    @property
    def behaviour(self) -> Kind:
        """What this kind of layer does (`cadfl.models.layers.KINDS`)."""
        return KINDS[self.kind]

    @property
    def weighted(self) -> bool:
        """Whether the layer owns a bank of filters (conv, linear, a block)."""
        return KINDS[self.kind].weighted

    def to_dict(self) -> dict[str, Any]:
        """The layer as a dict holding only fields that differ from their defaults."""
        defaults = Layer(kind=self.kind)
        out = {k: v for k, v in asdict(self).items() if v != getattr(defaults, k) or k == "kind"}
        if "groups" in out:
            out["groups"] = list(out["groups"])
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layer:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"unknown layer field(s) {sorted(unknown)}; valid: {sorted(known)}")
        if "kind" not in d:
            raise SpecError(f"layer {d} has no 'kind'; valid kinds: {', '.join(KINDS)}")
        d = dict(d)
        if d.get("groups") is not None:
            d["groups"] = tuple(int(g) for g in d["groups"])
        return cls(**d)


@dataclass(frozen=True)
class ModelSpec:
    """A CNN as data: `input_shape` (C, H, W), layers in order, and the class of each logit.

    `classes` maps logit i (and channel group i of every grouped layer) to a global class id;
    None means logits 0..K-1 are classes 0..K-1.
    """

    name: str
    input_shape: tuple[int, int, int]
    layers: tuple[Layer, ...]
    classes: tuple[int, ...] | None = None
    names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        object.__setattr__(self, "names", layer_names(self.layers))
        self.shapes()  # validates the whole chain

    @property
    def num_classes(self) -> int:
        """Number of logits (output features of the last linear layer)."""
        return self.layers[-1].out_ch

    @property
    def class_ids(self) -> tuple[int, ...]:
        """Global class id of every logit."""
        return self.classes if self.classes is not None else tuple(range(self.num_classes))

    def shapes(self) -> list[tuple[int, ...]]:
        """Output shape (without batch) of every layer; raises SpecError on any mismatch."""
        shape: tuple[int, ...] = self.input_shape
        out = []
        for name, layer in zip(self.names, self.layers, strict=True):
            shape = _output_shape(name, layer, shape)
            out.append(shape)
        if not self.layers or self.layers[-1].kind != "linear":
            raise SpecError(f"model {self.name!r}: the last layer must be linear (the logits)")
        if self.classes is not None and len(self.classes) != self.num_classes:
            raise SpecError(f"model {self.name!r}: {len(self.classes)} class ids for "
                            f"{self.num_classes} logits")
        return out

    def layer(self, name: str) -> Layer:
        """The layer called `name` (e.g. 'conv3')."""
        try:
            return self.layers[self.names.index(name)]
        except ValueError:
            raise SpecError(f"no layer {name!r}; layers: {', '.join(self.names)}") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (used in payloads and checkpoints)."""
        return {"name": self.name, "input_shape": list(self.input_shape),
                "classes": None if self.classes is None else list(self.classes),
                "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of `to_dict`."""
        return cls(name=d["name"], input_shape=tuple(d["input_shape"]),
                   layers=tuple(Layer.from_dict(x) for x in d["layers"]),
                   classes=None if d.get("classes") is None else tuple(d["classes"]))

    @property
    def has_blocks(self) -> bool:
        """Whether any layer is a residual block (not a plain sequence of layers)."""
        return any(isinstance(layer.behaviour, Block) for layer in self.layers)

    def replace_layers(self, layers: list[Layer], classes: tuple[int, ...] | None) -> ModelSpec:
        """A copy with other layers and class ids (used to derive decoupled and sub-models)."""
        return replace(self, layers=tuple(layers), classes=classes)


def with_classes(spec: ModelSpec, new: tuple[int, ...]) -> ModelSpec:
    """`spec` with one more logit for each class id in `new` (appended, in that order)."""
    if set(new) & set(spec.class_ids) or len(set(new)) != len(new):
        raise SpecError(f"classes {list(new)} must be new and distinct; the model has "
                        f"{list(spec.class_ids)}")
    last = spec.layers[-1]
    if last.groups is not None:
        raise SpecError("with_classes widens a dense classifier; a decoupled model grows class "
                        "paths instead (cadfl.cad.grow)")
    layers = [*spec.layers[:-1], replace(last, out_ch=last.out_ch + len(new))]
    return spec.replace_layers(layers, spec.class_ids + tuple(new))


def layer_names(layers: tuple[Layer, ...] | list[Layer]) -> tuple[str, ...]:
    """Readable, stable names: conv1, bn1, relu1, pool1, ..., flatten, fc1, drop1, ..."""
    counts: dict[str, int] = {}
    names = []
    for layer in layers:
        if layer.kind not in KINDS:
            raise SpecError(f"unknown layer kind {layer.kind!r}; valid: {', '.join(KINDS)}")
        prefix = KINDS[layer.kind].prefix
        counts[prefix] = counts.get(prefix, 0) + 1
        names.append(prefix if layer.kind == "flatten" and counts[prefix] == 1
                     else f"{prefix}{counts[prefix]}")
    return tuple(names)


def _output_shape(name: str, layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    def fail(msg: str) -> SpecError:
        return SpecError(f"layer {name}: {msg} (input shape {shape})")

    kind = layer.behaviour
    if layer.groups is not None:
        if not kind.splittable:
            raise fail(f"a {layer.kind} layer cannot have channel groups")
        if sum(layer.groups) != layer.out_ch or min(layer.groups) < 1:
            raise fail(f"groups {layer.groups} must be positive and sum to out_ch={layer.out_ch}")
    if layer.grouped_in:
        if layer.groups is None or (layer.kind != "linear" and len(set(layer.groups)) != 1):
            raise fail("grouped_in needs channel groups, equal ones for a conv layer")
        if layer.in_ch % len(layer.groups):
            raise fail(f"in_ch={layer.in_ch} does not split into {len(layer.groups)} groups")
    return kind.shape(layer, shape, fail)


class GroupedLinear(nn.Module):
    """A block-diagonal linear layer: output group g reads only input group g.

    The weight is stored as (out_features, in_features // groups), like a grouped convolution,
    so a class path's rows are a plain slice of it. The output groups are equal unless `sizes`
    (the rows of each group) says otherwise; the input groups are always equal.
    """

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool = True,
                 sizes: tuple[int, ...] | None = None):
        super().__init__()
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.sizes = sizes or (out_features // groups,) * groups
        # Zeros, not torch.empty: build_model initialises them, and a module made on its own
        # must not compute with whatever the memory held.
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        xg = x.reshape(x.shape[0], g, self.in_features // g)
        if len(set(self.sizes)) == 1:  # equal groups: one batched product
            w = self.weight.view(g, self.out_features // g, self.in_features // g)
            y = torch.einsum("bgi,goi->bgo", xg, w).reshape(x.shape[0], self.out_features)
        else:
            y = torch.cat([xg[:, i] @ w.T for i, w in enumerate(self.weight.split(self.sizes))],
                          dim=1)
        return y if self.bias is None else y + self.bias


def build_model(spec: ModelSpec) -> nn.Sequential:
    """Turn a spec into an `nn.Sequential` whose module names are the spec's layer names.

    Weights are drawn from torch's global RNG: seed it first for reproducible initialisation.
    Initialisation is He-normal (fan-in, which for a grouped layer is the fan-in of one group)
    for convs and hidden linear layers, N(0, 0.01) for the logits, zero biases and unit
    batch-norm scales. PyTorch's default init shrinks ReLU activations layer
    by layer, which leaves a deep net without batch norm (AlexNet here) near chance for many
    rounds.
    """
    model = nn.Sequential(OrderedDict(
        (name, layer.behaviour.module(layer))
        for name, layer in zip(spec.names, spec.layers, strict=True)))
    logits = model[-1]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif m is logits:
            nn.init.normal_(m.weight, 0, 0.01)
        elif isinstance(m, (nn.Linear, GroupedLinear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)
    return model


def build_loaded(spec: ModelSpec, state: dict[str, torch.Tensor],
                 device: torch.device | str = "cpu") -> nn.Sequential:
    """The network of `spec` with `state` loaded, on `device`.

    Modules are created on the meta device: no throw-away random initialisation, which would
    cost time and consume the global RNG.
    """
    with torch.device("meta"):
        model = build_model(spec)
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return model


Entry = int | str | tuple


def spec_from_config(
    name: str,
    config: list[Entry],
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    batch_norm: bool = False,
    hidden: tuple[int, ...] = (),
    dropout: float = 0.0,
    act: str = "relu",
) -> ModelSpec:
    """Build a spec from a VGG-style config list.

    Entries:
    - an int `n`: a 3x3 conv (padding 1) with n filters; a tuple `(n, k, pad)`: a k x k conv.
      Each is followed by batch norm (if `batch_norm`, and then the conv has no bias) and the
      activation `act` ("relu" or "relu6").
    - `("conv", n)`: a bare 3x3 conv, no bias, norm or activation (a pre-activation stem).
    - `("res", n, stride)`: a pre-activation basic block to n channels; `("inv", t, n,
      stride)`: an inverted residual block expanding by t. Either adds its input where the
      shape allows, else (resblock) a projection (`cadfl.models.layers`).
    - 'M': a 2x2 max-pool; 'A': global average pooling; 'N': batch norm + activation.
    Then flatten, one linear + ReLU per `hidden` width (each preceded by dropout when
    `dropout` > 0), and a final linear layer to `num_classes` logits.
    """
    if num_classes < 1:
        raise SpecError(f"num_classes must be >= 1, got {num_classes}")
    layers: list[Layer] = []
    channels = input_shape[0]
    for entry in config:
        if entry in ("M", "A", "N"):
            layers += {"M": [Layer("maxpool", kernel=2, stride=2)], "A": [Layer("avgpool")],
                       "N": [Layer("bn", channels, channels), Layer(act)]}[entry]
            continue
        if isinstance(entry, tuple) and isinstance(entry[0], str):
            layer = _block(entry, channels)
            layers.append(layer)
            channels = layer.out_ch
            continue
        out, kernel, pad = (entry, 3, 1) if isinstance(entry, int) else entry
        layers.append(Layer("conv", channels, out, kernel=kernel, padding=pad,
                            bias=not batch_norm))
        if batch_norm:
            layers.append(Layer("bn", out, out))
        layers.append(Layer(act))
        channels = out
    layers.append(Layer("flatten"))
    features = _flat_features(name, input_shape, layers)
    for width in hidden:
        if dropout > 0:
            layers.append(Layer("dropout", p=dropout))
        layers += [Layer("linear", features, width), Layer("relu")]
        features = width
    layers.append(Layer("linear", features, num_classes))
    return ModelSpec(name=name, input_shape=input_shape, layers=tuple(layers))


def _block(entry: tuple, channels: int) -> Layer:
    """The layer of a tagged config entry ("conv", "res" or "inv") reading `channels`."""
    tag, *args = entry
    if tag == "conv":
        return Layer("conv", channels, args[0], kernel=3, padding=1, bias=False)
    if tag == "res":
        out, stride = args
        same = stride == 1 and out == channels
        return Layer("resblock", channels, out, stride=stride,
                     skip="identity" if same else "conv")
    if tag == "inv":
        expand, out, stride = args
        same = stride == 1 and out == channels
        return Layer("inverted", channels, out, stride=stride, expand=expand,
                     hidden=channels * expand, skip="identity" if same else "")
    raise SpecError(f"unknown config entry {entry!r}: valid tags 'conv', 'res', 'inv'")


def _flat_features(name: str, input_shape: tuple[int, int, int], layers: list[Layer]) -> int:
    shape: tuple[int, ...] = tuple(input_shape)
    for lname, layer in zip(layer_names(layers), layers, strict=True):
        shape = _output_shape(f"{name}.{lname}", layer, shape)
    return shape[0]


def state_shapes(spec: ModelSpec) -> dict[str, torch.Size]:
    """Shape of every state tensor of the built model (built on the meta device: no memory
    used, the global RNG untouched), in state-dict order."""
    return dict(_state_shapes(spec))


@lru_cache(maxsize=64)
def _state_shapes(spec: ModelSpec) -> tuple[tuple[str, torch.Size], ...]:
    # Cached: building VGG-16 even on the meta device takes about 0.25 s, and CAD asks for
    # its sub-models' keys once per device and round.
    with torch.device("meta"):
        return tuple((k, v.shape) for k, v in build_model(spec).state_dict().items())


def count_params(spec: ModelSpec) -> int:
    """Number of trainable parameters of the built model (built on the meta device, so the
    global RNG and memory are untouched)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(spec).parameters())
