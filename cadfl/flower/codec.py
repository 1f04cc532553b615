"""Payloads and updates as Flower records, and back: the one codec both sides use.

A payload travels as a `RecordDict` with
- "state": an `ArrayRecord` of the state dict (torch tensors, exact dtypes and bytes),
- "payload": a `ConfigRecord` with the `ModelSpec` JSON, the `TrainConfig` JSON, the task,
  what the device keeps (`keep`, `private`: JSON lists of patterns), the round and algorithm
  it belongs to (the device's data and kept state depend on them), and, in a node's first
  message of a run, the experiment's config JSON (the device derives its own data from it)
  and `data`: how the run labels and normalises images (`own_data.RunData` JSON; empty
  unless the nodes hold their own images).

An update travels back as
- "state": an `ArrayRecord` of the returned tensors,
- "update": a `MetricRecord` with `num-examples` (Flower's conventional weight key),
  `class_counts` (a list of ints) and every float metric (train_loss, train_flops).
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..fl.payload import Payload, TrainConfig, Update
from ..models import ModelSpec

STATE, PAYLOAD, UPDATE = "state", "payload", "update"
NUM_EXAMPLES = "num-examples"


def _to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    # ArrayRecord goes through numpy: hand it contiguous CPU tensors.
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def _from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(arr.numpy().copy()) for k, arr in record.items()}


def encode_payload(payload: Payload, rnd: int = 0, algorithm: str = "",
                   experiment: str = "", data: str = "") -> RecordDict:
    """A payload as a Flower RecordDict; `rnd` and `algorithm` the round and algorithm the
    payload is of, `experiment` the config JSON the device needs to find its own data and
    `data` the run's `RunData` JSON for nodes with their own images (both empty when the
    node was told them before)."""
    config = ConfigRecord({
        "spec": json.dumps(payload.spec.to_dict()),
        "train": json.dumps(payload.config.to_dict()),
        "task": payload.task,
        "keep": json.dumps(list(payload.keep)),
        "private": json.dumps(list(payload.private)),
        "experiment": experiment,
        "round": rnd,
        "algorithm": algorithm,
        "data": data,
    })
    return RecordDict({STATE: _to_record(payload.state), PAYLOAD: config})


def decode_payload(content: RecordDict) -> Payload:
    """The payload of a RecordDict made by `encode_payload`."""
    config = content.config_records[PAYLOAD]
    payload = Payload(spec=ModelSpec.from_dict(json.loads(str(config["spec"]))),
                      state=_from_record(content.array_records[STATE]),
                      config=TrainConfig.from_dict(json.loads(str(config["train"]))),
                      task=str(config["task"]),
                      keep=tuple(json.loads(str(config["keep"]))),
                      private=tuple(json.loads(str(config["private"]))))
    return payload


def encode_update(update: Update) -> RecordDict:
    """An update as a Flower RecordDict."""
    metrics: dict = {NUM_EXAMPLES: int(update.num_samples),
                     "class_counts": [int(c) for c in update.class_counts]}
    for k, v in update.metrics.items():
        metrics[k] = float(v)
    return RecordDict({STATE: _to_record(update.state), UPDATE: MetricRecord(metrics)})


def decode_update(content: RecordDict) -> Update:
    """The update of a RecordDict made by `encode_update`."""
    m = dict(content.metric_records[UPDATE])
    num = int(m.pop(NUM_EXAMPLES))
    counts = [int(c) for c in m.pop("class_counts")]
    return Update(state=_from_record(content.array_records[STATE]), num_samples=num,
                  class_counts=counts, metrics={k: float(v) for k, v in m.items()})
