"""The generic Flower ClientApp: one device of any cadfl algorithm.

It knows nothing about the algorithm. A "query" message asks who it is (it answers with its
`partition-id` from the node config); a "train" message carries a self-describing payload
(model spec, weights, training config, task) plus the experiment config, from which the device
derives its own share of the data exactly as cadfl's engine does (same seed, same partition).
It runs `cadfl.fl.device.run_task` and replies with the update.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..fl.device import DeviceData, run_task
from ..sim.config import Config, config_from_dict
from .codec import decode_payload, encode_update
from .data import device_data

PARTITION_ID = "partition-id"
DATA_DIR = "data-dir"  # optional node config: where this node keeps its datasets
IDENTITY = "identity"

app = ClientApp()

# Device data per (experiment, partition, data dir): a Ray actor or a long-lived process serves
# many rounds; a subprocess-isolated ClientApp recomputes it (cheap for digits).
_cache: dict[tuple[str, int, str], DeviceData] = {}


def _threads() -> None:
    # One worker, one thread: tiny models gain nothing from more and share the cores.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def node_partition(context: Context) -> int:
    """This node's partition id, from `--node-config "partition-id=N"` (or the simulation)."""
    if PARTITION_ID not in context.node_config:
        raise ValueError("this SuperNode has no partition-id: start it with "
                         "--node-config 'partition-id=N num-partitions=M'")
    return int(context.node_config[PARTITION_ID])


def config_from_json(text: str) -> Config:
    """The validated experiment config from its JSON form (`Config.to_dict()`)."""
    return config_from_dict(json.loads(text))


def local_data(experiment: str, context: Context) -> DeviceData:
    """This node's share of the training data for `experiment` (cached)."""
    pid = node_partition(context)
    data_dir = str(context.node_config.get(DATA_DIR, ""))
    key = (experiment, pid, data_dir)
    if key not in _cache:
        cfg = config_from_json(experiment)
        if data_dir:
            cfg.data_dir = data_dir
        if not 0 <= pid < cfg.devices:
            raise ValueError(f"partition-id {pid} is outside 0..{cfg.devices - 1}")
        _cache.clear()
        _cache[key] = device_data(cfg, pid)
    return _cache[key]


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Say which partition this node holds (node ids are random; partitions are not)."""
    return Message(RecordDict({IDENTITY: ConfigRecord({PARTITION_ID: node_partition(context)})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the payload's task on this node's data and reply with the update."""
    _threads()
    payload, experiment = decode_payload(msg.content)
    update = run_task(payload, local_data(experiment, context))
    return Message(encode_update(update), reply_to=msg)
