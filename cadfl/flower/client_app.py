"""The generic Flower ClientApp: one device of any cadfl algorithm.

It knows nothing about the algorithm. A "query" message asks who it is (it answers with its
`partition-id` from the node config); a "train" message carries a self-describing payload
(model spec, weights, training config, task, what the device keeps) plus the experiment config
and the round, from which the node derives its round's data with the engine's own code
(`Experiment.setup` and `enter_round`: same seed, same partition, same context changes). It runs
the payload the way cadfl's `Runtime` does: its kept tensors in, `run_task`, what it keeps
stored in the node's `Context.state` (`NodeStore`), private tensors left out of the reply. An
"evaluate" message scores the device's own model (with what it keeps) on the test images of
its classes and answers with the scores only.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..runtime import Runtime
from ..sim.config import Config, config_from_dict
from ..sim.engine import Experiment
from .codec import decode_payload, encode_update
from .store import NodeStore

PARTITION_ID = "partition-id"
DATA_DIR = "data-dir"  # optional node config: where this node keeps its datasets
IDENTITY = "identity"
SCORES = "scores"

app = ClientApp()

# The experiment per (config, data dir): a Ray actor or a long-lived process serves many
# rounds; a subprocess-isolated ClientApp rebuilds it (cheap for digits).
_experiments: dict[tuple[str, str], Experiment] = {}


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


def node_experiment(experiment: str, context: Context) -> Experiment:
    """The experiment of config JSON `experiment` as this node sees it (cached): its data
    from the node's own `data-dir` when it has one."""
    data_dir = str(context.node_config.get(DATA_DIR, ""))
    key = (experiment, data_dir)
    if key not in _experiments:
        cfg = config_from_json(experiment)
        if data_dir:
            cfg.data_dir = data_dir
        pid = node_partition(context)
        if not 0 <= pid < cfg.devices:
            raise ValueError(f"partition-id {pid} is outside 0..{cfg.devices - 1}")
        _experiments.clear()
        _experiments[key] = Experiment.setup(cfg)
    return _experiments[key]


def node_runtime(msg: Message, context: Context) -> tuple[Runtime, int, Experiment]:
    """The device side of this node for the message's round: a `Runtime` on the node's data,
    with the node's `Context.state` as its store; and the device id and experiment."""
    cfg = msg.content.config_records["payload"]
    exp = node_experiment(str(cfg["experiment"]), context)
    exp.enter_round(int(cfg["round"]))
    store = NodeStore(context.state, str(cfg["algorithm"]))
    return Runtime(exp.data, store), node_partition(context), exp


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Say which partition this node holds (node ids are random; partitions are not)."""
    return Message(RecordDict({IDENTITY: ConfigRecord({PARTITION_ID: node_partition(context)})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the payload's task on this node's data and reply with the update (without what
    the device keeps private)."""
    _threads()
    payload, _ = decode_payload(msg.content)
    runtime, device, _ = node_runtime(msg, context)
    return Message(encode_update(runtime.run(device, payload)), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the device's own model on the test images of its classes: context accuracy,
    Others rejection and in-context accuracy with Others (nan where they do not apply)."""
    _threads()
    payload, _ = decode_payload(msg.content)
    runtime, device, exp = node_runtime(msg, context)
    scores = exp.score_device(device, payload.spec, runtime.own_state(device, payload))
    record = MetricRecord(dict(zip(("context_acc", "others_reject", "others_in_acc"),
                                   map(float, scores), strict=True)))
    return Message(RecordDict({SCORES: record}), reply_to=msg)

