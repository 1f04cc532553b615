"""CAD (Qin & Jiang, SEC 2020): context sub-models and path-paired aggregation.

The global model is decoupled into a shared trunk and one path per class (`cadfl.cad`). A
device whose context is the class set S receives the sub-model of S: the trunk and S's paths,
physically smaller. The cloud averages the trunk over all participants (weighted by sample
count) and class c's path only over the participants holding c (weighted by their class-c
counts); rows no participant held keep their value.

Filters are assigned to classes either `prior` (equal contiguous groups fixed at
initialisation, no data needed) or by `activation` (the paper's decoupling): the dense model is
trained first (`warmup_rounds` of FedAvg, or weights given), devices report per-class
activation sums, and the cloud assigns, permutes and decouples (`cadfl.cad.assign`).

With `others` (a class id), the model has one more path and logit, "Others", that every
device holds: it is trained on the device's out-of-context images (labelled with that id) and,
like the trunk, averaged over every device that has such images. It needs no data of other
devices. A class registered later (`add_classes`, New Class) gets a path of its own.

With `personal` = N > 0 (personal paths), a device also keeps its own copy of the last N
conv/linear layers of its sub-model (N = 1: its classes' logit rows), per class path, and
never sends it: at the start of each of its rounds it fits the copy for `personal_epochs`
epochs on the features the received sub-model's earlier layers give its images (one
forward pass, no augmentation; FedRep's head-first step at a fraction of its cost), then
trains the received sub-model as plain CAD does. It predicts with its copy; the cloud's
model, its aggregation and the bytes sent are plain CAD's. `path_lr` trains the decoupled
layers at that factor of the learning rate (their rows see fewer devices than the trunk).
With `groups` = G > 0, there are G paths, each for a group of classes chosen from which
classes devices hold together (`cadfl.cad.grouping`): a device receives the paths of its
classes' groups, wider and fewer than one per class.

Each path is trained by other devices, so the logit scales of the global model differ across
classes. `calibrate` = tau > 0 divides each class's logit row of the global model by its
weight norm ** tau, data-free on the cloud (the tau-normalised classifier of Kang et al.,
"Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020). It
changes the cloud's model only: not what devices train, receive or predict with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..cad.assign import (
    SPARE_PREFIX,
    balanced_assignment,
    group_permutation,
    permute_dense,
    spare_pool,
    to_decoupled,
)
from ..cad.decouple import Decoupling, conv_indices, decouple
from ..cad.grouping import GROUPINGS, class_groups
from ..cad.grow import grow_dense, grow_paths, grow_state
from ..cad.preference import class_means, preferred_class, selectivity, suggest_depth
from ..cad.submodel import extract, index_map, row_weights
from ..checks import check_one_of, check_range
from ..models import ModelSpec, SpecError, build_model, state_shapes, with_classes
from .aggregate import MEAN, Contribution, Robustness
from .fedavg import FedAvg
from .fedper import head_patterns
from .payload import PERSONAL, DeviceInfo, Payload, State, TrainConfig, Update
from .registry import register
from .strategy import Payloads, Setting, Strategy

ASSIGN_MODES = ("prior", "activation")
# cad.variant: "cadfl" runs the options as set; "paper" is the paper's method, plain CAD, with
# every option beyond the paper at these values.
PAPER = {"personal": 0, "path_lr": 1.0, "calibrate": 0.0, "groups": 0}
VARIANTS = ("cadfl", "paper")


@dataclass
class CADOptions:
    """CAD's settings (`[cad]`): where class paths start and how filters get their class."""

    depth: int | str = 1  # decoupled conv layers from the end (0: classifier only), or "auto"
    assign: str = "prior"  # prior: equal groups fixed at init; activation: the paper's way
    warmup_rounds: int = 0  # activation: rounds of dense FedAvg before decoupling
    checkpoint: str = ""  # activation: dense weights (.safetensors) to decouple instead
    others: bool = False  # an "Others" path and logit: "none of my classes"
    selectivity_threshold: float = 0.3  # depth "auto": decouple from the first conv layer
    # whose class selectivity reaches this
    personal: int = 0  # personal paths: the last N conv/linear layers' own copy per device
    personal_epochs: int = 5  # epochs fitting that copy on frozen features, each round
    path_lr: float = 1.0  # the class paths' learning rate, as a factor of train.lr
    # tau: the global model's logit rows over their norm ** tau (0: off; plain CAD won on
    # validation across settings, docs/results/cad-variants.md)
    calibrate: float = 0.0
    groups: int = 0  # paths for groups of classes (0: one per class, the paper's)
    grouping: str = "cooccur"  # which classes share a group: "cooccur" on devices, "even"
    variant: str = "cadfl"  # "paper": plain CAD, the options beyond the paper (PAPER) off

    def resolved(self) -> CADOptions:
        """The options CAD runs with: with `variant = "paper"`, those of `PAPER`."""
        return replace(self, **PAPER) if self.variant == "paper" else self

    def check(self, cfg: Any) -> None:
        """ValueError naming the field if a value is out of range (`cfg.rounds` bounds the
        warm-up)."""
        if isinstance(self.depth, str):
            if self.depth != "auto" or self.assign != "activation":
                raise ValueError(f"cad.depth: {self.depth!r} is not allowed: give a number of "
                                 "conv layers >= 0, or \"auto\" together with "
                                 "cad.assign = \"activation\"")
        else:
            check_range("cad.depth", self.depth, 0)
        check_range("cad.selectivity_threshold", self.selectivity_threshold, 0, 1)
        check_one_of("cad.assign", self.assign, ASSIGN_MODES)
        check_range("cad.warmup_rounds", self.warmup_rounds, 0)
        check_range("cad.personal", self.personal, 0)
        check_range("cad.personal_epochs", self.personal_epochs, 1)
        check_range("cad.path_lr", self.path_lr, 0, low_open=True)
        check_range("cad.calibrate", self.calibrate, 0, 2)
        check_range("cad.groups", self.groups, 0)
        check_one_of("cad.grouping", self.grouping, GROUPINGS)
        check_one_of("cad.variant", self.variant, VARIANTS)
        if self.variant == "paper":
            changed = [f"cad.{k}" for k, plain in PAPER.items()
                       if getattr(self, k) not in (plain, getattr(CADOptions, k))]
            if changed:
                raise ValueError(f"cad.variant = \"paper\" is plain CAD: it cannot take "
                                 f"{', '.join(changed)} (drop them, or the variant)")
        if self.resolved().groups and self.assign != "prior":
            raise ValueError("cad.groups needs cad.assign = \"prior\" (the activation "
                             "assignment gives every class a path of its own)")
        if self.assign == "activation" and not (self.warmup_rounds or self.checkpoint):
            raise ValueError("cad.assign='activation' needs a trained model: set "
                             "cad.warmup_rounds >= 1 or cad.checkpoint to a dense .safetensors")
        if self.warmup_rounds >= cfg.rounds:
            raise ValueError(f"cad.warmup_rounds={self.warmup_rounds} leaves no CAD rounds: "
                             f"allowed 0 to rounds-1 = {cfg.rounds - 1}")


def _without_spares(state: State) -> State:
    """The model's tensors of CAD's state: without the spare pool."""
    return {k: v for k, v in state.items() if not k.startswith(SPARE_PREFIX)}


def load_pretrained(path: str, like: State) -> State:
    """Dense weights from a safetensors checkpoint (e.g. a run's checkpoints/fedavg.safetensors),
    checked against the model's own state: same keys, same shapes (ValueError otherwise)."""
    try:
        weights = load_file(path)
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"cad.checkpoint: cannot read {path}: {exc}") from None
    bad = sorted(k for k in like if k not in weights or weights[k].shape != like[k].shape)
    if bad:
        raise ValueError(f"cad.checkpoint: {path} does not hold this model's weights "
                         f"(missing or differently shaped: {', '.join(bad[:3])})")
    return {k: weights[k] for k in like}


@register
class CAD(Strategy):
    """Context-aware distributed learning with class paths from `depth` (conv layers from the
    end) on.

    With `assign="activation"`, rounds 1..`warmup_rounds` train the dense model with FedAvg
    (starting from `pretrained` weights when given); the next round first asks every device
    for its activation statistics and decouples the model from them. `depth="auto"` then
    decouples from the first conv layer whose class selectivity reaches
    `selectivity_threshold` (see `analysis.preference.suggest_depth`).

    The structure (dense spec, decoupling, phase) lives in the strategy and is saved with
    every checkpoint (`structure`/`restore`); it is never inferred from tensor shapes.
    """

    name = "cad"
    summary = "context sub-models (trunk + own classes' paths), path-paired averaging"
    family = "cad"
    Options = CADOptions

    @classmethod
    def from_setting(cls, setting: Setting, options: CADOptions | None = None) -> CAD:
        """CAD for a run: the dense checkpoint loaded, Others from the run's label."""
        o = (options or CADOptions()).resolved()
        pretrained = load_pretrained(o.checkpoint, setting.init) if o.checkpoint else None
        return cls(setting.spec, setting.train, setting.devices, bn=setting.bn,
                   robust=setting.robust, depth=o.depth, assign=o.assign,
                   warmup_rounds=o.warmup_rounds, pretrained=pretrained,
                   selectivity_threshold=o.selectivity_threshold,
                   others=setting.other if o.others else None, personal=o.personal,
                   personal_epochs=o.personal_epochs, path_lr=o.path_lr,
                   calibrate=o.calibrate, groups=o.groups, grouping=o.grouping)

    @staticmethod
    def answers_others(options: CADOptions | None) -> bool:
        """With `others` on: an "Others" path and logit."""
        return options is not None and options.others

    def __init__(self, spec: ModelSpec, train: TrainConfig, devices: Sequence[DeviceInfo],
                 bn: str = "average", robust: Robustness = MEAN,
                 depth: int | str = 1, assign: str = "prior",
                 warmup_rounds: int = 0, pretrained: State | None = None,
                 selectivity_threshold: float = 0.3, others: int | None = None,
                 personal: int = 0, personal_epochs: int = 5, path_lr: float = 1.0,
                 calibrate: float = 0.0, groups: int = 0, grouping: str = "cooccur") -> None:
        self.others, self.plain_spec = others, spec
        k = spec.num_classes
        if not 0 <= groups < k:
            raise ValueError(f"cad.groups={groups} is out of range for {k} classes: allowed 0 "
                             f"(a path per class) or 1 to {k - 1}")
        # Set before decoupling: the class order and classes per group (Others alone last).
        self.path_groups = None
        if groups:
            order, sizes = class_groups([d.classes for d in devices], k, groups, grouping)
            extra = () if others is None else (others,)
            self.path_groups = (order + extra, sizes + (1,) * len(extra))
        if others is not None:
            spec = with_classes(spec, (others,))
        if assign == "activation" and spec.has_blocks:
            raise ValueError(f"cad.assign='activation' permutes the filters of sequential "
                             f"models only; {spec.name} has blocks: use cad.assign='prior'")
        super().__init__(spec, train, devices, bn=bn, robust=robust)
        self.dense_spec, self.assign = spec, assign
        self.warmup_rounds, self.pretrained = warmup_rounds, pretrained
        self.threshold = selectivity_threshold
        self.personal = (head_patterns(spec, personal) if personal else (), personal_epochs)
        self.path_lr, self.calibrate = path_lr, calibrate
        self.dense = FedAvg(spec, train, devices, bn=bn, robust=robust)
        self.decoupling: Decoupling | None = None
        if depth != "auto":
            self.decoupling = self._decouple(int(depth))
        self.decoupled = False
        if assign == "prior":
            self._enter_decoupled()

    def _decouple(self, depth: int) -> Decoupling:
        """The dense model decoupled from `depth` on: one path per class, or per group of
        classes (logits in the groups' class order)."""
        if self.path_groups is None:
            return decouple(self.dense_spec, self.dense_spec.num_classes, depth)
        order, sizes = self.path_groups
        dense = self.dense_spec.replace_layers(list(self.dense_spec.layers), order)
        return decouple(dense, len(order), depth, sizes)

    def _enter_decoupled(self) -> None:
        assert self.decoupling is not None
        self.decoupled, self.spec = True, self.decoupling.spec

    def is_decoupled(self) -> bool:
        """Whether the global model is decoupled yet (not the dense model of the warm-up)."""
        return self.decoupled

    def structure(self) -> dict[str, Any]:
        """The dense spec, the decoupling (depth, class paths, widths) and the phase."""
        return {"decoupled": self.decoupled, "dense_spec": self.dense_spec.to_dict(),
                "decoupling": None if self.decoupling is None else self.decoupling.to_dict()}

    def restore(self, structure: dict[str, Any]) -> None:
        """Take up a saved structure (a resumed run)."""
        self.dense_spec = ModelSpec.from_dict(structure["dense_spec"])
        self.dense.spec = self.dense_spec
        saved = structure["decoupling"]
        self.decoupling = None if saved is None else Decoupling.from_dict(saved)
        self.decoupled, self.spec = False, self.dense_spec
        if structure["decoupled"]:
            self._enter_decoupled()

    def global_model(self, state: State) -> tuple[ModelSpec, State]:
        """The decoupled model (without the spare pool), or the dense one while warming up;
        with `calibrate` = tau > 0, each class's logit row (weights and bias) divided by its
        weight norm ** tau."""
        model = _without_spares(state)
        if self.calibrate and self.decoupled:
            logits = self.spec.names[-1]
            w = model[f"{logits}.weight"]
            scale = w.flatten(1).norm(dim=1).clamp_min(1e-12).pow(self.calibrate)
            model[f"{logits}.weight"] = w / scale.view(-1, *([1] * (w.dim() - 1)))
            if f"{logits}.bias" in model:
                model[f"{logits}.bias"] = model[f"{logits}.bias"] / scale
        return self.spec, model

    def initial_state(self, weights: State) -> State:
        """Prior: the dense model's trunk, and class paths initialised with their own fan-in
        from the run's seed. Activation: the dense model (pretrained weights if given)."""
        if self.assign == "activation":
            dense = dict(self.pretrained if self.pretrained is not None else weights)
            if self.others is not None:
                dense = grow_dense(self.plain_spec, dense, (self.others,), self.train.seed)[1]
            return dense
        with torch.random.fork_rng():
            torch.manual_seed(self.train.seed)
            state = {k: v.clone() for k, v in build_model(self.spec).state_dict().items()}
        for key in state:
            if not self.decoupling.is_path_key(key):
                state[key] = weights[key].clone()
        return {**state, **spare_pool(self.decoupling, weights)}

    def device_classes(self, device: int) -> tuple[int, ...]:
        """The classes whose paths a device receives: its own context (and Others)."""
        own = self.devices[device].classes
        classes = own if self.others is None else (*own, self.others)
        if self.path_groups is None:
            return classes
        return tuple(sorted(classes, key=self.decoupling.logit_of))  # a group's together

    def device_outputs(self, device: int) -> tuple[int, ...] | None:
        """A device's sub-model answers among its classes (and Others) only; the dense model
        of the warm-up among all."""
        return self.device_classes(device) if self.decoupled else None

    def add_classes(self, state: State, classes: Sequence[int], seed: int) -> State:
        """New Class: each class the model lacks gets a path in every decoupled layer and a
        logit (`cadfl.cad.grow`); existing paths and outputs are unchanged."""
        new = [c for c in classes if c not in self.dense_spec.class_ids]
        if not new:
            return state
        if not self.decoupled:
            raise ValueError(f"classes {new} appear while CAD still trains the dense model "
                             "(warm-up): let them appear after the decoupling round")
        for i, c in enumerate(new):
            grown = grow_paths(self.decoupling, c)
            state = grow_state(self.decoupling, grown, state, seed + i)
            self.decoupling = grown
        self._enter_decoupled()
        self.dense_spec = with_classes(self.dense_spec, tuple(new))
        return state

    def configure_query(self, rnd: int, state: State, device_ids: Sequence[int]
                        ) -> dict[int, Payload]:
        """After the warm-up, once: ask every device for its activation statistics."""
        if self.assign != "activation" or self.decoupled or rnd <= self.warmup_rounds:
            return {}
        spec, weights = self.global_model(state)
        return {d: Payload(spec, weights, self.device_config(rnd, d), task="activations",
                           keep=self.kept()) for d in device_ids}

    def _deepest(self) -> int:
        """The deepest decoupling the dense model allows (narrow layers limit it)."""
        depth = len(conv_indices(self.dense_spec))
        while depth > 0:
            try:
                self._decouple(depth)
                return depth
            except SpecError:
                depth -= 1
        return 0

    def aggregate_query(self, rnd: int, state: State, replies: dict[int, Update]) -> State:
        """Assign filters to classes from the summed statistics, permute, and decouple."""
        counts = sum(torch.tensor(replies[d].class_counts, dtype=torch.float64)
                     for d in sorted(replies))
        sums = {name: sum(replies[d].state[name] for d in sorted(replies))
                for name in replies[min(replies)].state}
        # Rows in path order: the statistics are indexed by global class id.
        ids = list(self.dense_spec.class_ids)
        means = {n: m[ids] for n, m in class_means(sums, counts).items()}
        chosen = None
        if self.decoupling is None:
            convs = [self.dense_spec.names[i] for i in conv_indices(self.dense_spec)]
            chosen = suggest_depth([selectivity(means[n]) for n in convs], self.threshold)
            depth = min(chosen, self._deepest())
            self.decoupling = self._decouple(depth)
        dec, k = self.decoupling, self.decoupling.num_classes
        perms, layers = {}, {}
        for name, (per_class, spare) in dec.widths.items():
            if name == dec.spec.names[-1]:
                continue  # the logits: logit c is class c already
            owner = balanced_assignment(means[name], per_class)
            perms[name] = group_permutation(owner, k)
            assigned = owner >= 0
            layers[name] = {"filters_per_class": per_class, "spare": spare, "argmax_fraction":
                            float((owner[assigned] == preferred_class(means[name])[assigned])
                                  .float().mean())}
        self.notes = {
            "round": rnd, "depth": dec.depth, "suggested_depth": chosen, "assignment": layers,
            "selectivity": {name: selectivity(m) for name, m in means.items()}}
        dense = permute_dense(dec, _without_spares(state), perms)
        self._enter_decoupled()
        return {**to_decoupled(dec, dense), **spare_pool(dec, dense)}

    def device_config(self, rnd: int, device: int) -> TrainConfig:
        """With `path_lr` != 1: the decoupled layers train at that factor of the rate."""
        base = super().device_config(rnd, device)
        if self.path_lr == 1.0 or not self.decoupled:
            return base
        paths = [key for key in state_shapes(self.spec) if self.decoupling.is_path_key(key)]
        return replace(base, lr_scales=tuple((p, self.path_lr) for p in paths))

    def device_model_is_global(self) -> bool:
        """Not with personal paths (each device predicts with its own copy) nor with a
        calibrated global model (the devices' sub-models are not calibrated)."""
        return (super().device_model_is_global() and not self.personal[0]
                and not self.calibrate)

    def payload(self, rnd: int, device: int, spec: ModelSpec, weights: State) -> Payload:
        """With personal paths: the device fits, keeps and never sends its own copy."""
        base = super().payload(rnd, device, spec, weights)
        head, epochs = self.personal
        if not head:
            return base
        mine = tuple(PERSONAL + p for p in head)
        return replace(base, config=replace(base.config, personal_head=head,
                                            personal_epochs=epochs),
                       keep=(*base.keep, *mine), private=mine)

    def configure_train(self, rnd: int, state: State, device_ids: Sequence[int]) -> Payloads:
        """Each participant gets the sub-model of its classes (the dense model in warm-up)."""
        if not self.decoupled:
            yield from self.dense.configure_train(rnd, state, device_ids)
            return
        weights = _without_spares(state)  # what devices train: never the calibrated logits
        for d in device_ids:
            spec, sub, _ = extract(self.decoupling, weights, self.device_classes(d))
            yield d, self.payload(rnd, d, spec, sub)

    def contribution(self, rnd: int, state: State, device: int, update: Update
                     ) -> Contribution:
        """Path-paired: the trunk weighted by the sample count, class c's rows by the class-c
        count (the dense model in warm-up: FedAvg's)."""
        if not self.decoupled:
            return super().contribution(rnd, state, device, update)
        classes = self.device_classes(device)
        rows = index_map(self.decoupling, update.state, classes)
        counts = torch.tensor(update.class_counts, dtype=torch.float64)
        weights = {k: row_weights(self.decoupling, k, classes, counts) for k in rows}
        return Contribution(update.state, update.num_samples, rows, weights)

    def configure_evaluate(self, rnd: int, state: State, device_ids: Sequence[int]
                           ) -> Payloads:
        """Each device scores the model it trains: its sub-model."""
        return self.configure_train(rnd, state, device_ids)
