"""The generic Flower ClientApp: one device of any cadfl algorithm.

It knows nothing about the algorithm. A "query" message asks who it is (it answers with its
`partition-id` from the node config, and, for a node with its own images, their class names
and counts); a "train" message carries a self-describing payload (model spec, weights, training
config, task, what the device keeps) and its round; a node's first message of a run also
carries the experiment config, which the node keeps in its `Context.state` (`node_run`). A
node with a `data-dir` trains on its own images (`own_data.NodeData`, labelled the run's way);
otherwise it derives its round's data with the engine's own code (`Experiment.setup` and
`enter_round`: same seed, same partition, same context changes). It runs the payload the way
cadfl's `Runtime` does: its kept tensors in, `run_task`, what it keeps stored in the node's
`Context.state` (`NodeStore`), private tensors left out of the reply. An "evaluate" message
scores the device's own model (with what it keeps) on the test images of its classes (its own
held-out images for a node with its own data, answered as counts) and answers with the scores
only. A node started with `trainer="executorch"` trains in ExecuTorch's runtime instead of
PyTorch (`cadfl.device.train_executorch`); it evaluates in PyTorch.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..config import Config, config_from_dict
from ..device.executor import Runtime
from ..device.train import DeviceData, run_task
from ..engine.evaluate import score_device
from ..engine.experiment import Experiment
from ..fl.payload import Payload, Update
from .codec import decode_payload, encode_update
from .own_data import NodeData, RunData
from .store import NodeStore

PARTITION_ID = "partition-id"
DATA_DIR = "data-dir"  # optional node config: the node's own images (one folder per class)
TRAINER = "trainer"  # optional node config: "pytorch" (the default) or "executorch"
TRAINERS = ("pytorch", "executorch")
IDENTITY = "identity"
EXPERIMENT = "experiment"
CLASSES, COUNTS = "classes", "counts"  # a node's own classes and its images of each
SCORES = "scores"
# The names of a device's `Scores` in its evaluate reply, in order.
SCORE_KEYS = ("context_acc", "others_reject", "others_in_acc", "context_open_acc")
RUN = "cadfl-run"  # the node's Context.state record of the run's config and data

app = ClientApp()

# The experiment per config, the own data per (folder, config): a Ray actor or a long-lived
# process serves many rounds; a subprocess-isolated ClientApp rebuilds them (cheap for digits).
_experiments: dict[str, Experiment] = {}
_own: dict[tuple[str, str], NodeData] = {}


def one_thread() -> None:
    """Compute on one thread: a worker's tiny models gain nothing from more, and workers
    share the cores."""
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
    """The experiment of config JSON `experiment` as the engine builds it (cached)."""
    if experiment not in _experiments:
        cfg = config_from_json(experiment)
        pid = node_partition(context)
        if not 0 <= pid < cfg.devices:
            raise ValueError(f"partition-id {pid} is outside 0..{cfg.devices - 1}")
        _experiments.clear()
        _experiments[experiment] = Experiment.setup(cfg)
    return _experiments[experiment]


def own_data(experiment: str, context: Context) -> NodeData | None:
    """The node's own images (cached), read with the `[folder]` settings of config JSON
    `experiment`; None for a node without a `data-dir`."""
    data_dir = str(context.node_config.get(DATA_DIR, ""))
    if not data_dir:
        return None
    cfg = config_from_json(experiment)
    key = (data_dir, json.dumps(cfg.to_dict()["folder"]))
    if key not in _own:
        _own.clear()
        _own[key] = NodeData(data_dir, cfg)
    return _own[key]


def node_run(msg: Message, context: Context) -> tuple[str, str]:
    """The run's config JSON and `RunData` JSON: the message's when it carries them (kept in
    the node's `Context.state`), else those the node was told before."""
    cfg = msg.content.config_records["payload"]
    if str(cfg["experiment"]):
        context.state[RUN] = ConfigRecord({EXPERIMENT: str(cfg["experiment"]),
                                           "data": str(cfg["data"])})
    told = context.state.config_records.get(RUN)
    if told is None:
        raise ValueError("this node has not been told the run's config (the server sends it "
                         "in a node's first message of a run)")
    return str(told[EXPERIMENT]), str(told["data"])


def node_task(context: Context) -> Callable[[Payload, DeviceData], Update]:
    """How this node runs a payload: in PyTorch (`run_task`), or with `trainer="executorch"`
    training in ExecuTorch's runtime (`train_executorch`), as a phone would."""
    trainer = str(context.node_config.get(TRAINER, "pytorch"))
    if trainer not in TRAINERS:
        raise ValueError(f"trainer={trainer!r} is not a trainer; valid: {', '.join(TRAINERS)}")
    if trainer == "pytorch":
        return run_task
    from ..device.train_executorch import train_executorch
    return train_executorch


def node_runtime(msg: Message, context: Context
                 ) -> tuple[Runtime, int, Experiment | None, NodeData | None, RunData | None]:
    """The device side of this node for the message's round: a `Runtime` on the node's data
    (its own images, labelled as the message's `RunData` says, or the engine's partition),
    with the node's `Context.state` as its store; and the device id, the experiment (None
    with own data), the own data and the run's data description (None without)."""
    cfg = msg.content.config_records["payload"]
    experiment, run_data = node_run(msg, context)
    store = NodeStore(context.state, str(cfg["algorithm"]))
    own = own_data(experiment, context)
    if own is not None:
        run = RunData.from_json(run_data)
        data = own.device_data(run)
        return (Runtime(lambda _: data, store, task=node_task(context)),
                node_partition(context), None, own, run)
    exp = node_experiment(experiment, context)
    exp.enter_round(int(cfg["round"]))
    return (Runtime(exp.data, store, task=node_task(context)), node_partition(context), exp,
            None, None)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Say which partition this node holds (node ids are random; partitions are not) and,
    with its own images, their class names and training images per class."""
    reply = ConfigRecord({PARTITION_ID: node_partition(context)})
    own = own_data(str(msg.content.config_records[IDENTITY][EXPERIMENT]), context)
    if own is not None:
        counts = own.report()
        reply[CLASSES], reply[COUNTS] = list(counts), list(counts.values())
    return Message(RecordDict({IDENTITY: reply}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the payload's task on this node's data and reply with the update (without what
    the device keeps private)."""
    one_thread()
    payload = decode_payload(msg.content)
    runtime, device, *_ = node_runtime(msg, context)
    return Message(encode_update(runtime.run(device, payload)), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the device's own model on the test images of its classes: context accuracy,
    Others rejection and in-context accuracy with Others (nan where they do not apply); with
    its own images, on their held-out share, as counts (`NodeData.score`)."""
    one_thread()
    payload = decode_payload(msg.content)
    runtime, device, exp, own, run = node_runtime(msg, context)
    state = runtime.own_state(device, payload)
    if own is not None:
        record = MetricRecord(own.score(payload.spec, state, run, payload.config.precision))
    else:
        scores = score_device(exp, device, payload.spec, state)
        record = MetricRecord(dict(zip(SCORE_KEYS, map(float, scores), strict=True)))
    return Message(RecordDict({SCORES: record}), reply_to=msg)
