"""Context dynamics: which classes each device holds at each round, and which the model knows.

A device's classes at round r start as the classes it has images of, less those whose first
`[[context]]` change on that device adds them (not seen yet), and then follow the changes in round
order: `remove` drops classes, `add` brings them (back). The global model knows the classes of
round 1's contexts; a class that first appears in a later context is registered then (New
Class), after the ones known before, so the order of the model's classes is fixed by the
schedule alone (which is what makes a resumed run rebuild the same model).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError
from ..config_tables import ContextChange


@dataclass
class Schedule:
    """The class sets of `len(held)` devices over the rounds.

    `held[d]` is every class device d has images of (over the whole run); `changes` are
    applied in round order (stable for equal rounds).
    """

    held: list[set[int]]
    changes: list[ContextChange]

    def __post_init__(self) -> None:
        self.changes = sorted(self.changes, key=lambda ch: ch.round)
        self._known: dict[tuple[int, ...], tuple[int, ...]] = {}

    def rounds_until(self, rnd: int) -> tuple[int, ...]:
        """Round 1 and the rounds up to `rnd` in which some context changes: two rounds with
        the same answer have the same contexts."""
        return tuple(sorted({1} | {ch.round for ch in self.changes if ch.round <= rnd}))

    def targets(self, change: ContextChange) -> list[int]:
        """The devices a change applies to (all of them when it names none)."""
        return change.devices or list(range(len(self.held)))

    def context(self, device: int, rnd: int) -> tuple[int, ...]:
        """The classes device `device` trains on in round `rnd`, ascending."""
        if not self.changes:
            return tuple(sorted(self.held[device]))
        mine = [ch for ch in self.changes if device in self.targets(ch)]
        first: dict[int, str] = {}  # the first change of each class on this device
        for ch in mine:
            for c in ch.add:
                first.setdefault(c, "add")
            for c in ch.remove:
                first.setdefault(c, "remove")
        active = {c for c in self.held[device] if first.get(c) != "add"}
        for ch in mine:
            if ch.round <= rnd:
                active = (active - set(ch.remove)) | (set(ch.add) & self.held[device])
        return tuple(sorted(active))

    def model_classes(self, rnd: int) -> tuple[int, ...]:
        """The classes the global model knows in round `rnd`, in order of registration
        (computed once per distinct set of contexts)."""
        rounds = self.rounds_until(rnd)
        if rounds not in self._known:
            known: list[int] = []
            for r in rounds:
                seen = set().union(*(self.context(d, r) for d in range(len(self.held))))
                known += sorted(seen - set(known))
            self._known[rounds] = tuple(known)
        return self._known[rounds]

    def check(self) -> None:
        """ConfigError if a device is left with no class in some round (a device that
        holds no images yet, a Flower node that has not reported its own, is not checked)."""
        for r in sorted({1} | {ch.round for ch in self.changes}):
            for d in range(len(self.held)):
                if self.held[d] and not self.context(d, r):
                    raise ConfigError(f"context: device {d} has no class left in round {r}; "
                                      "every device needs at least one")


def gains(changes: list[ContextChange], num_devices: int, num_classes: int
          ) -> dict[int, set[int]]:
    """The classes each device is ever given by `changes` (devices with none left out);
    ConfigError for a class the dataset does not have."""
    for ch in changes:
        bad = [c for c in (*ch.add, *ch.remove) if c >= num_classes]
        if bad:
            raise ConfigError(f"context change at round {ch.round}: classes {bad} do not "
                              f"exist (the dataset has classes 0..{num_classes - 1})")
    out: dict[int, set[int]] = {}
    for ch in changes:
        for d in ch.devices or range(num_devices):
            if ch.add:
                out.setdefault(d, set()).update(ch.add)
    return out
