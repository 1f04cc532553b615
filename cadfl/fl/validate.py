"""Checking what devices send back before it reaches aggregation.

A federated server takes input from devices it does not control: an update must match the
payload it answers (same tensor names, shapes and dtypes), hold only finite numbers, and report
sample counts that are possible for that device. Anything else is rejected with a reason.
"""

from __future__ import annotations

import torch

from .payload import Payload, Update


def rejection(payload: Payload, update: Update, num_classes: int, max_samples: int
              ) -> str | None:
    """Why `update` cannot be aggregated, or None if it can.

    `max_samples` is the size of the device's training partition; `num_classes` the number of
    global classes. Activation reports ("activations" tasks) carry statistics, not weights, and
    are checked for counts and finiteness only.
    """
    if not isinstance(update.state, dict) or not all(
            isinstance(v, torch.Tensor) for v in update.state.values()):
        return "the update's state is not a dict of tensors"
    if payload.task == "train":
        sent, got = set(payload.returned_keys()), set(update.state)
        if sent != got:
            return (f"tensor names differ from the payload: missing {sorted(sent - got)[:3]}, "
                    f"unexpected {sorted(got - sent)[:3]}")
        for key, t in update.state.items():
            ref = payload.state[key]
            if t.shape != ref.shape or t.dtype != ref.dtype:
                return (f"{key}: got {t.dtype} {tuple(t.shape)}, sent {ref.dtype} "
                        f"{tuple(ref.shape)}")
    for key, t in update.state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"{key}: non-finite values"
    if not isinstance(update.num_samples, int) or not 0 < update.num_samples <= max_samples:
        return (f"num_samples={update.num_samples!r} is impossible: the device holds "
                f"{max_samples} samples")
    counts = update.class_counts
    if (not isinstance(counts, list) or len(counts) != num_classes
            or any(not isinstance(c, int) or c < 0 for c in counts)):
        return f"class_counts must be {num_classes} non-negative integers"
    if sum(counts) != update.num_samples:
        return f"class counts add up to {sum(counts)}, not num_samples={update.num_samples}"
    given = set(payload.spec.class_ids)
    foreign = [c for c, n in enumerate(counts) if n and c not in given]
    if foreign:
        return f"counts for classes {foreign} that the device's model does not have"
    return None
