"""cadfl on Flower: codec, the ServerApp/ClientApp protocol, Flower's simulation engine, the
built-in FedAvg peer reference, and a loopback deployment (plain and TLS).

Fast tests drive the real ClientApp objects through an in-process stand-in for Flower's Grid;
the others start Ray or real SuperLink/SuperNode processes (marked slow where > ~60 s).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import random
import socket
import ssl
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from cadfl.cli import main as cli_main  # noqa: E402
from cadfl.config import load_config  # noqa: E402
from cadfl.engine.experiment import Experiment  # noqa: E402
from cadfl.engine.run import read_metrics, run_experiment  # noqa: E402
from cadfl.fl.payload import Payload, TrainConfig, Update  # noqa: E402
from cadfl.flower import client_app  # noqa: E402
from cadfl.flower.codec import (  # noqa: E402
    decode_payload,
    decode_update,
    encode_payload,
    encode_update,
)
from cadfl.flower.server_app import FlowerError, FlowerExecutor  # noqa: E402
from cadfl.models import get_model  # noqa: E402
from tests import BASE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def small(*overrides: str):
    """3 devices x 5 classes, half the digits, 2 rounds of CAD and FedAvg."""
    return load_config(None, ["devices=3", "rounds=2", "data_fraction=0.5",
                              'algorithms=["cad", "fedavg"]', *overrides])


def without_wall(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in lines]


def own_run_without(cfg, digits, out, dropped: dict[int, set[int]],
                    reachable: dict[int, list[int]] | None = None) -> list[dict]:
    """The own engine's run of `cfg` with the devices `dropped[round]` giving no answer and
    (with `reachable`) each round's participants sampled from `reachable[round]` only."""
    from cadfl.device.executor import Executor, Runtime

    runtime = Runtime(Experiment.setup(cfg, digits).data)

    class Dropping(Executor):
        rnd = 0

        def begin_round(self, algorithm, rnd):
            self.rnd = rnd

        def reachable(self, devices):
            return reachable[self.rnd] if reachable is not None else list(range(devices))

        def __call__(self, jobs):
            for d, p in jobs:
                yield d, p, None if d in dropped.get(self.rnd, ()) else runtime.run(d, p)

    return run_experiment(cfg, out, quiet=True, dataset=digits, execute=Dropping())


def accs(lines: list[dict], algorithm: str) -> list[float]:
    return [m["global_acc"] for m in lines if m["algorithm"] == algorithm]


# Codec


def test_codec_round_trip_is_bitwise():
    spec = get_model("digits_cnn", 10, (1, 8, 8), True)
    gen = torch.Generator().manual_seed(3)
    state = {
        "w": torch.randn(4, 3, 3, 3, generator=gen),
        "b64": torch.randn(5, generator=gen, dtype=torch.float64),
        "nbt": torch.tensor(7, dtype=torch.int64),  # 0-dim integer buffer
        "odd": torch.tensor([float("nan"), -0.0, float("inf"), 1e-45]),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous input
    }
    config = TrainConfig(epochs=2, batch_size=7, lr=0.013, momentum=0.5, weight_decay=1e-5,
                         objective="prox", objective_args=(("mu", 0.1),), seed=2**40 + 3,
                         augment=False)
    payload = Payload(spec, state, config, task="activations")
    record = encode_payload(payload, 3, "cad", '{"x": 1}')
    assert record.config_records["payload"]["experiment"] == '{"x": 1}'
    back = decode_payload(record)
    assert back.spec.to_dict() == spec.to_dict()
    assert back.config == config and back.task == "activations"
    assert list(back.state) == list(state)
    for k, t in state.items():
        got = back.state[k]
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert got.reshape(-1).contiguous().view(torch.uint8).tolist() == \
            t.reshape(-1).contiguous().view(torch.uint8).tolist(), k  # bitwise: NaN, -0.0

    update = Update(state, 123, [0, 5, 0, 118], {"train_loss": 0.123456789012345,
                                                 "train_flops": 3.5e12})
    back_u = decode_update(encode_update(update))
    assert back_u.num_samples == 123 and back_u.class_counts == [0, 5, 0, 118]
    assert back_u.metrics == update.metrics
    for k, t in state.items():
        assert torch.equal(back_u.state[k].nan_to_num(), t.nan_to_num()), k


# The protocol, with the real ClientApp behind an in-process grid


class LoopbackGrid:
    """Stands in for Flower's Grid: delivers each message to the real ClientApp object of
    its node (random node ids, replies in shuffled order), like the simulation engine does."""

    def __init__(self, num_nodes: int, app=client_app.app, seed: int = 0,
                 data_dirs: dict[int, Path] | None = None) -> None:
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        # What Flower's runtime sets in a ServerApp process before `main` runs.
        TaskIdentity.run_id, TaskIdentity.task_id = 1, 1
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        rng = random.Random(seed)
        self.rng = rng
        self.contexts = {
            rng.randrange(1, 2**63): Context(
                run_id=1, node_id=0, node_config={
                    "partition-id": i, "num-partitions": num_nodes,
                    **({"data-dir": str(data_dirs[i])} if i in (data_dirs or {}) else {})},
                state=RecordDict(), run_config={})
            for i in range(num_nodes)}
        self.trained: dict[int, list[tuple[int, ...]]] = {}  # partition: its models' classes
        self.app = app
        self.sent = 0
        self.told = 0  # train/evaluate messages that carried the run's config
        self.silent: set[int] = set()  # nodes that never answer (a timeout)
        self.gone: dict[int, Context] = {}  # nodes that left, with their state
        self.replies: dict[str, Message] = {}  # by the id of the message they answer

    def node_of(self, partition: int) -> int:
        return next(n for n, c in self.contexts.items()
                    if c.node_config["partition-id"] == partition)

    def leave(self, partition: int) -> None:
        n = self.node_of(partition)
        self.gone[partition] = self.contexts.pop(n)

    def come_back(self, partition: int) -> None:
        """The node reconnects under a new node id, with the state it kept."""
        self.contexts[self.rng.randrange(1, 2**63)] = self.gone.pop(partition)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Deliver each message now; its reply waits to be pulled (none from a silent node)."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"  # as Flower's grids do
            ids.append(f"m{self.sent}")
            self.sent += 1
            if msg.metadata.message_type in ("train", "evaluate") and \
                    msg.content.config_records["payload"]["experiment"]:
                self.told += 1
            if msg.metadata.message_type == "train":
                payload = decode_payload(msg.content)
                pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
                self.trained.setdefault(pid, []).append(payload.spec.class_ids)
            if msg.metadata.dst_node_id in self.silent:
                continue
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # what Flower does: an error reply
                from flwr.app import Error
                reply = Message(Error(code=0, reason=repr(exc)), reply_to=msg)
            self.replies[reply.metadata.reply_to_message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        replies = [self.replies.pop(i) for i in message_ids if i in self.replies]
        self.rng.shuffle(replies)
        return replies


def run_on_loopback(cfg, out, digits, grid=None, **kwargs):
    """The experiment through FlowerExecutor and the real ClientApp behind a LoopbackGrid."""
    grid = grid or LoopbackGrid(cfg.devices)
    execute = FlowerExecutor(grid, cfg, deadline=30, wait=0.1, **kwargs)
    lines = run_experiment(cfg, out, quiet=True, execute=execute, dataset=digits,
                           experiment=execute.experiment)
    return lines, grid


def test_flower_protocol_reproduces_the_engine_exactly(tmp_path, digits):
    """The whole ServerApp path (partition discovery, codec, ClientApp) against the engine:
    identical metric lines and checkpoints."""
    # Calibrated CAD, so that the devices' own evaluation messages are in the protocol too.
    cfg = small('algorithms=["cad", "fedavg", "central"]', "cad.calibrate=1")
    own = run_experiment(cfg, tmp_path / "own", quiet=True, dataset=digits)
    via, grid = run_on_loopback(cfg, tmp_path / "flower", digits)
    assert without_wall(via) == without_wall(own)
    for a in cfg.algorithms:
        from cadfl.engine.checkpoint import load_checkpoint
        s1, _ = load_checkpoint(tmp_path / "own" / "checkpoints", a)
        s2, _ = load_checkpoint(tmp_path / "flower" / "checkpoints", a)
        assert all(torch.equal(s1[k], s2[k]) for k in s1), a
    # One query round, then one message per device per round for CAD and FedAvg
    # (central trains on the pooled data in the ServerApp and sends nothing), and one per
    # device per evaluation for CAD: its global model is calibrated, so the devices score
    # their own, uncalibrated sub-models.
    evaluations = sum(r % cfg.eval_every == 0 or r == cfg.rounds for r in range(1, cfg.rounds + 1))
    assert grid.sent == cfg.devices + (2 * cfg.rounds + evaluations) * cfg.devices
    assert grid.told == cfg.devices  # the config goes to a node once per run


def test_the_client_app_computes_at_the_runs_precision(tmp_path, digits):
    """bf16 through the ServerApp path and the real ClientApp gives the engine's bf16 metric
    lines exactly, and they are not the fp32 ones."""
    cfg = small('algorithms=["fedavg", "fedper"]', 'precision="bf16"')
    own = run_experiment(cfg, tmp_path / "own", quiet=True, dataset=digits)
    via, _ = run_on_loopback(cfg, tmp_path / "flower", digits)
    assert without_wall(via) == without_wall(own)
    assert {m["precision"] for m in via} == {"bf16"}
    fp32 = run_experiment(small('algorithms=["fedavg", "fedper"]'), tmp_path / "fp32",
                          quiet=True, dataset=digits)
    assert [m["train_loss"] for m in fp32] != [m["train_loss"] for m in via]


@pytest.mark.parametrize("overrides", [
    ['algorithms=["local", "fedavg"]'],
    ['algorithms=["cad", "fedavg"]', "bn=keep_local"],
], ids=["local", "keep_local"])
def test_state_kept_on_the_nodes_gives_the_engines_metrics(tmp_path, digits, overrides):
    """Devices that keep state (the `local` model, their own batch-norm statistics) keep it
    in their node's Context.state, score their own models there, and send no private tensor:
    the same metric lines as the engine, whose store holds the same entries."""
    cfg = small(*overrides)
    own = run_experiment(cfg, tmp_path / "own", quiet=True, dataset=digits)
    via, grid = run_on_loopback(cfg, tmp_path / "flower", digits)
    assert without_wall(via) == without_wall(own)
    assert all(m["eval_devices"] == cfg.devices for m in via)
    from cadfl.device.store import DeviceStore
    from cadfl.flower.store import NodeStore
    for a in cfg.algorithms:
        engine_store = DeviceStore(tmp_path / "own" / "devices" / a)
        for ctx in grid.contexts.values():
            d = ctx.node_config["partition-id"]
            mine, theirs = NodeStore(ctx.state, a).get(d), engine_store.get(d)
            assert sorted(mine) == sorted(theirs), (a, d)
            assert all(torch.equal(mine[k], theirs[k]) for k in mine), (a, d)
    if "local" in cfg.algorithms:  # the local models never went up: zero bytes sent back
        assert [m["bytes_up"] for m in via if m["algorithm"] == "local"] == [0] * cfg.rounds


def test_context_dynamics_on_flower_follow_the_engine(tmp_path, digits):
    """Others, a New Class and a `[[context]]` schedule: the nodes derive each round's data
    with the engine's code, so the metric lines are the engine's."""
    cfg = small('algorithms=["cad", "fedavg"]', "rounds=3", "cad.others=true",
                "partition.other_fraction=0.2",
                'context=[{round=2, devices=[0], add=[9]}, {round=3, remove=[0]}]')
    own = run_experiment(cfg, tmp_path / "own", quiet=True, dataset=digits)
    via, _ = run_on_loopback(cfg, tmp_path / "flower", digits)
    assert without_wall(via) == without_wall(own)


# A node's own data

# Three nodes' own images: two with overlapping classes, one with a name digits lacks
# ("seven": images of the digit 7), each node its own images of the digit.
NODE_CLASSES = [{"0": 0, "1": 1, "2": 2}, {"1": 1, "2": 2, "3": 3}, {"3": 3, "seven": 7}]
OWN_DATA = ["devices=3", "rounds=2", 'algorithms=["cad", "fedavg"]', "folder.size=8",
            "folder.channels=1", "folder.test_fraction=0.25"]


def node_folders(root: Path) -> dict[int, Path]:
    from tests.test_folder import write_digit_folder
    return {d: write_digit_folder(root / f"node-{d}", classes, 16, offset=20 * d)
            for d, classes in enumerate(NODE_CLASSES)}


def own_run_with_node_data(cfg, digits, folders: dict[int, Path], out,
                           absent: set[int] = frozenset()) -> list[dict]:
    """The own engine's run of `cfg` on digits' test set, device d training on the images
    in `folders[d]` (held in one dataset, owners = devices) and scoring its model on their
    held-out share, in this process. The devices in `absent` cannot be reached in the first
    round of the first algorithm."""
    from cadfl.flower.own_data import NodeData, RunData, count_scores, server_dataset

    nodes = {d: NodeData(f, cfg) for d, f in folders.items()}
    known = server_dataset(digits, {d: n.report() for d, n in nodes.items()})
    run = RunData.of(known, Experiment.setup(cfg, known).label_space)
    data = [nodes[d].device_data(run) for d in sorted(nodes)]
    ds = replace(known, train_x=torch.cat([x.images for x in data]),
                 train_y=torch.cat([x.labels for x in data]),
                 owners=torch.cat([torch.full((len(x),), d) for d, x in enumerate(data)]))
    runtime = Experiment.setup(cfg, ds).runtime()

    from cadfl.device.executor import Executor

    class Devices(Executor):
        away = set(absent)
        scores_devices = True

        def __call__(self, jobs):
            return runtime([(d, p) for d, p in jobs if d not in self.away])

        def reachable(self, devices):
            return [d for d in range(devices) if d not in self.away]

        def score(self, jobs):
            for d, p in jobs:
                if d not in self.away:
                    yield d, count_scores(nodes[d].score(p.spec, runtime.own_state(d, p), run))

    devices = Devices()
    return run_experiment(cfg, out, quiet=True, dataset=ds, execute=devices,
                          on_round=lambda line: devices.away.clear())


def test_nodes_own_data_decide_their_contexts(tmp_path, digits):
    """Nodes with their own images (data-dir): the server maps their class names to the
    run's ids ("seven" is new: class 10), CAD sends each node the sub-model of the classes
    it reported, the new class gets a path, and the metric lines equal the own engine's on
    the same per-device data, context accuracy on the nodes' held-out images."""
    cfg = load_config(None, OWN_DATA)
    folders = node_folders(tmp_path / "nodes")
    via, grid = run_on_loopback(cfg, tmp_path / "flower", digits,
                                LoopbackGrid(3, data_dirs=folders))
    own = own_run_with_node_data(cfg, digits, folders, tmp_path / "own")
    assert without_wall(via) == without_wall(own)
    assert all(m["eval_devices"] == 3 and m["rejected"] == 0 for m in via)
    assert grid.trained[0][:2] == [(0, 1, 2)] * 2  # CAD's sub-models (then FedAvg's model)
    assert grid.trained[1][:2] == [(1, 2, 3)] * 2
    assert grid.trained[2][:2] == [(3, 10)] * 2
    assert grid.trained[2][2] == tuple(range(11))  # FedAvg: every class, "seven" too
    from cadfl.engine.checkpoint import load_checkpoint
    part = json.loads((tmp_path / "flower" / "partition.json").read_text())
    assert part["scheme"] == "own" and part["num_classes"] == 11
    assert [[c for c, n in enumerate(d["class_counts"]) if n] for d in part["devices"]] == \
        [[0, 1, 2], [1, 2, 3], [3, 10]]
    _, record = load_checkpoint(tmp_path / "flower" / "checkpoints", "cad")
    assert record["structure"]["decoupling"]["num_classes"] == 11  # a path for "seven"
    assert via[-1]["class_acc"][10] is None  # digits' test set has no "seven"
    # With what only a simulated partition has, the run is refused before it starts.
    with pytest.raises(FlowerError, match="central"):
        FlowerExecutor(LoopbackGrid(3, data_dirs=folders),
                       load_config(None, [*OWN_DATA, 'algorithms=["central"]']), wait=0.1)


def test_a_node_with_its_own_images_may_join_late(tmp_path, digits, caplog):
    """Nodes 0 and 1 report their images at the start; nodes 2 and 3 connect after CAD's
    first round. Device 2, with classes the run knows, is admitted: it trains from the next
    round on (CAD: the sub-model of its classes) and partition.json gains it. Device 3
    reports a class name the run lacks and is not used. The metric lines equal the own
    engine's on the same per-device data with device 2 out of reach in that first round."""
    from tests.test_folder import write_digit_folder

    cfg = load_config(None, [*OWN_DATA, "devices=4", "rounds=3"])
    names = [*NODE_CLASSES[:2], {"3": 3, "4": 4}, {"3": 3, "seven": 7}]
    folders = {d: write_digit_folder(tmp_path / f"node-{d}", c, 16, offset=20 * d)
               for d, c in enumerate(names)}
    grid = LoopbackGrid(4, data_dirs=folders)
    grid.leave(2)
    grid.leave(3)
    out = tmp_path / "flower"
    with caplog.at_level("INFO", logger="cadfl"):
        execute = FlowerExecutor(grid, cfg, deadline=30, wait=0.1, out=out)
        assert sorted(execute.reports) == [0, 1]

        def on_round(line):
            if (line["algorithm"], line["round"]) == ("cad", 1):
                grid.come_back(2)
                grid.come_back(3)

        via = run_experiment(cfg, out, quiet=True, execute=execute, on_round=on_round,
                             experiment=execute.experiment)
    assert "devices [2, 3] have not reported images of their own" in caplog.text
    assert "device 2 joined with its own images: {'3': 12, '4': 12}" in caplog.text
    assert "device 3 is not used: class names ['seven'] are not in the run's class list" \
        in caplog.text
    assert grid.trained[2][:2] == [(3, 4)] * 2  # CAD rounds 2 and 3, then FedAvg's 3
    assert len(grid.trained[2]) == 5 and 3 not in grid.trained
    assert [m["rejected"] for m in via] == [0] * 6
    assert [m["eval_devices"] for m in via] == [2, 3, 3, 3, 3, 3]
    part = json.loads((out / "partition.json").read_text())
    assert [[c for c, n in enumerate(d["class_counts"]) if n] for d in part["devices"]] == \
        [[0, 1, 2], [1, 2, 3], [3, 4], []]
    own = own_run_with_node_data(cfg, digits, {d: folders[d] for d in range(3)},
                                 tmp_path / "own", absent={2})
    assert without_wall(via) == without_wall(own)


def test_failures_are_dropouts_and_nodes_may_come_back(tmp_path, digits, caplog):
    """A node that times out is logged and counted in `rejected`, and the round goes on; a
    device without a node, or whose node left, is not sampled; a node that comes back (new
    node id, its state kept) takes part again."""
    cfg = small('algorithms=["fedavg"]', "rounds=4", "devices=4")
    grid = LoopbackGrid(3)  # device 3 never gets a node
    execute = FlowerExecutor(grid, cfg, deadline=1, wait=0.1)
    assert sorted(execute.nodes) == [0, 1, 2]
    rejected = []

    def on_round(line):
        rejected.append(line["rejected"])
        if line["round"] == 1:
            grid.silent.add(grid.node_of(1))  # round 2: node 1 does not answer
        if line["round"] == 2:
            grid.silent.clear()
            grid.leave(2)  # round 3: node 2 has gone
        if line["round"] == 3:
            grid.come_back(2)  # round 4: it is back

    with caplog.at_level("WARNING", logger="cadfl"):
        lines = run_experiment(cfg, tmp_path / "r", quiet=True, dataset=digits,
                               execute=execute, on_round=on_round)
    assert rejected == [0, 1, 0, 0]
    assert [m["round"] for m in lines] == [1, 2, 3, 4]
    text = caplog.text
    assert "devices without a node so far (not sampled until they connect): [3]" in text
    assert f"node {grid.node_of(1)} did not answer within 1 s" in text
    assert "device 2: node" in text and "is no longer connected" in text
    assert "device 2: now on node" not in text  # it left first, then came back
    assert execute.nodes[2] == grid.node_of(2)
    assert len(grid.trained[2]) == 3  # rounds 1, 2 and 4
    # The engine's own runtime sampling from the same devices and with the same one left
    # out gives the same metric lines.
    own = own_run_without(cfg, digits, tmp_path / "own", {2: {1}},
                          {1: [0, 1, 2], 2: [0, 1, 2], 3: [0, 1], 4: [0, 1, 2]})
    assert without_wall(lines) == without_wall(own)


def test_participants_are_sampled_from_the_connected_nodes(tmp_path, digits):
    """6 devices in the config, 2 per round, nodes for 3 of them: every round trains 2 of
    the connected 3 (none rejected), as the engine sampling from those 3 does."""
    cfg = small('algorithms=["fedavg"]', "rounds=4", "devices=6", "sample=2")
    lines, grid = run_on_loopback(cfg, tmp_path / "flower", digits, LoopbackGrid(3))
    assert [m["rejected"] for m in lines] == [0] * 4
    assert sorted(grid.trained) == [0, 1, 2]
    assert sum(len(v) for v in grid.trained.values()) == 2 * 4
    own = own_run_without(cfg, digits, tmp_path / "own", {}, {r: [0, 1, 2] for r in range(1, 5)})
    assert without_wall(lines) == without_wall(own)


def test_node_errors_are_dropouts(tmp_path, digits, caplog):
    cfg = small()
    execute = FlowerExecutor(LoopbackGrid(3), cfg, deadline=1, wait=0.1)
    exp = Experiment.setup(cfg, digits)
    bad = Payload(exp.spec, exp.init, exp.train_config(), task="dance")
    with caplog.at_level("WARNING", logger="cadfl"):
        assert [u for _, _, u in execute([(0, bad)])] == [None]
    assert "unknown payload task 'dance'" in caplog.text
    with pytest.raises(FlowerError, match="no Flower node"):
        FlowerExecutor(LoopbackGrid(0), cfg, wait=0.1)


def test_an_unknown_trainer_is_refused_in_one_line():
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "trainer": "tflite"},
                      state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="'tflite' is not a trainer; valid: pytorch, executorch"):
        client_app.node_task(context)
    assert client_app.node_task(replace(context, node_config={"partition-id": 0})) is \
        client_app.run_task


def test_run_config_builds_the_experiment(tmp_path):
    from cadfl.flower.server_app import config_from_run_config
    cfg, out, timeout = config_from_run_config({
        "config": "configs/digits-10x5.toml",
        "set": 'rounds=2; devices=4 ;algorithms=["cad", "fedavg"]',
        "out": str(tmp_path / "x"), "timeout": 12})
    assert (cfg.rounds, cfg.devices, cfg.algorithms) == (2, 4, ["cad", "fedavg"])
    assert out == tmp_path / "x" and timeout == 12.0


def test_cli_engine_flower_validates_before_starting(tmp_path, capsys):
    code = cli_main(["run", "--engine", "flower", "--set", "rounds=0",
                     "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    assert "rounds" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# Flower's simulation engine (Ray)


def test_flower_simulation_matches_own_engine(tmp_path, digits, capfd):
    """`cadfl run --engine flower` (Flower's simulation runtime behind `flwr run`) vs cadfl's
    engine: the same metric lines for CAD under kept batch-norm statistics and for `local`
    (state on the nodes), the same run directory, no warning printed, no process left;
    then `--resume` of the finished run leaves it as it was."""
    overrides = ["devices=3", "rounds=2", "data_fraction=0.5", 'algorithms=["cad", "local"]',
                 "bn=keep_local"]
    own = run_experiment(load_config(None, overrides), tmp_path / "own", quiet=True,
                         dataset=digits)
    args = ["run", BASE, "--engine", "flower", "--out", str(tmp_path / "sim"), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    capfd.readouterr()
    assert cli_main(args) == 0
    printed = capfd.readouterr()
    sim = read_metrics(tmp_path / "sim" / "metrics.jsonl")
    assert without_wall(sim) == without_wall(own)
    for word in ("deprecat", "warning", "ray"):
        assert word not in (printed.out + printed.err).lower(), word
    # The same run directory as the own engine writes.
    for name in ("config.toml", "partition.json", "metrics.jsonl", "summary.md", "curves.png",
                 "checkpoints/cad.safetensors", "checkpoints/local.safetensors"):
        assert (tmp_path / "sim" / name).exists(), name
    assert (tmp_path / "sim" / "partition.json").read_text() == \
        (tmp_path / "own" / "partition.json").read_text()
    assert processes_with(f"FLWR_HOME={(tmp_path / 'sim').resolve() / 'flwr-home'}") == []


def test_resume_with_engine_flower(tmp_path, digits):
    """A run stopped after round 1 (a run directory with round 1's line and checkpoint, as
    the own engine and Flower both write it) continues with `cadfl run --resume DIR --engine
    flower` to the lines of an uninterrupted run."""
    overrides = ["devices=3", "rounds=2", "data_fraction=0.5", 'algorithms=["cad"]']
    cfg = load_config(None, overrides)
    own = run_experiment(cfg, tmp_path / "own", quiet=True, dataset=digits)
    out = tmp_path / "sim"
    # Round 1, then as if the process died during round 2.
    run_experiment(load_config(None, [*overrides, "rounds=1"]), out, quiet=True,
                   dataset=digits)
    (out / "config.toml").write_text(cfg.to_toml())
    assert cli_main(["run", "--resume", str(out), "--engine", "flower", "--quiet"]) == 0
    via = read_metrics(out / "metrics.jsonl")
    assert [m["round"] for m in via] == [1, 2]
    assert without_wall(via) == without_wall(own)


def test_flower_builtin_fedavg_is_a_peer_of_cadfl_fedavg(tmp_path, digits):
    """Flower's own FedAvg strategy (float32 averaging) on the same partition, model and
    initial weights: the same global_acc curve as cadfl's fedavg, within 2 test images."""
    from cadfl.flower.peer import run_peer_fedavg
    cfg = small("rounds=3", 'algorithms=["fedavg"]')
    own = accs(run_experiment(cfg, tmp_path / "own", quiet=True, dataset=digits), "fedavg")
    peer = run_peer_fedavg(cfg, tmp_path / "peer")
    print("flower FedAvg:", peer, "cadfl fedavg:", own)
    assert processes_with(f"FLWR_HOME={(tmp_path / 'peer').resolve() / 'flwr-home'}") == []
    tol = 2 / len(digits.test_y) + 1e-9
    assert peer == pytest.approx(own, abs=tol)


# Deployment: SuperLink and SuperNodes as separate processes on 127.0.0.1


def processes_with(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment contains `marker` (checked here, not
    with the deploy module's own helpers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if marker.encode() in env and stat[stat.rindex(")") + 2] != "Z":
            found.append(int(pid))
    return found


def flower_children() -> list[str]:
    """Command lines of this test process's live Flower/Ray descendants."""
    out = subprocess.run(["ps", "-o", "pid=,ppid=,stat=,args=", "-e"], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    rows = [r.split(None, 3) for r in out if r.strip()]
    kids, frontier = [], {os.getpid()}
    for _ in range(20):
        nxt = [r for r in rows if int(r[1]) in frontier and "Z" not in r[2]]
        if not nxt:
            break
        kids += nxt
        frontier = {int(r[0]) for r in nxt}
    return [r[3] for r in kids if any(w in r[3] for w in ("flower", "flwr", "ray"))]


def test_deployment_loopback_cad_two_supernodes(tmp_path, digits):
    """SuperLink + 2 SuperNodes + `flwr run`: the run directory of a 2-round CAD run, the
    same global_acc as the own engine, and no process left behind."""
    from cadfl.flower.deploy import deploy_experiment
    overrides = ["devices=2", "rounds=2", "data_fraction=0.5", 'algorithms=["cad"]']
    out = tmp_path / "deploy"
    before = set(flower_children())
    lines = deploy_experiment(BASE, overrides, out, timeout=420)
    own = run_experiment(load_config(BASE, overrides), tmp_path / "own", quiet=True,
                         dataset=digits)
    assert accs(lines, "cad") == pytest.approx(accs(own, "cad"), abs=1e-6)
    assert (out / "summary.md").exists() and (out / "checkpoints" / "cad.safetensors").exists()
    logs = {p.name for p in (out / "logs").iterdir()}
    assert {"superlink.log", "supernode-0.log", "supernode-1.log", "flwr-run.log"} <= logs
    home = f"FLWR_HOME={out.resolve() / 'flwr-home'}"
    assert processes_with(home) == []
    assert set(flower_children()) <= before


@pytest.mark.slow  # ~3-4 min on 2 cores: node 1 exports an ExecuTorch program every round
def test_deployment_with_an_executorch_node_lands_on_the_engines_run(tmp_path, digits):
    """SuperNode 0 trains in PyTorch, SuperNode 1 in ExecuTorch's runtime (`trainer=
    executorch`): 3 rounds of CAD land within float tolerance of the own engine, and not
    bit for bit (so node 1 did train in the other runtime). Without augmentation, whose
    padding colour the ExecuTorch node rounds to a grey level. The tolerance: digits' few grey
    levels leave exact ties in max-pool windows, which float32 convolutions of the two
    runtimes break differently (~1e-3 relative in the weights after 10 steps, measured in
    `cadfl export --trainable`'s check); a wrong step moves weights by lr * |g|, far more."""
    pytest.importorskip("executorch", reason="needs cadfl[train-mobile]")
    from cadfl.engine.checkpoint import load_checkpoint
    from cadfl.flower.deploy import deploy_experiment
    overrides = ["devices=2", "rounds=3", "data_fraction=0.5", 'algorithms=["cad"]',
                 "train.augment=false"]
    out = tmp_path / "deploy"
    lines = deploy_experiment(BASE, overrides, out, timeout=600,
                              node_settings={1: 'trainer="executorch"'})
    own = run_experiment(load_config(BASE, overrides), tmp_path / "own", quiet=True,
                         dataset=digits)
    assert accs(lines, "cad") == pytest.approx(accs(own, "cad"), abs=0.01)
    got, _ = load_checkpoint(out / "checkpoints", "cad")
    want, _ = load_checkpoint(tmp_path / "own" / "checkpoints", "cad")
    rel = {k: float((got[k].double() - want[k].double()).abs().max())
           / max(1.0, float(want[k].double().abs().max())) for k in want}
    assert 0 < max(rel.values()) <= 1e-2, max(rel.values())


@pytest.mark.slow  # ~2-3 min on 2 cores: 5 message rounds, a fresh ClientApp per message
def test_deployment_nodes_train_on_their_own_images(tmp_path, digits):
    """Three SuperNodes, each started with `data-dir` = a folder of its own PNG images (two
    with overlapping classes, one with "seven", a name the run has never seen): the run
    maps the reported names to class ids, CAD builds every node's sub-model from them, the
    new class gets a path, and every metric line equals the own engine's on the same
    per-device data; no process is left behind."""
    from cadfl.engine.checkpoint import load_checkpoint
    from cadfl.flower.deploy import Deployment
    overrides = [*OWN_DATA, 'algorithms=["cad"]']
    cfg = load_config(None, overrides)
    folders = node_folders(tmp_path / "nodes")
    out = (tmp_path / "deploy").resolve()
    dep = Deployment(out, cfg.devices, data_dirs=folders)
    try:
        dep.start()
        done = dep.flwr_run({"config": BASE, "set": ";".join(overrides), "out": str(out),
                             "timeout": 60}, timeout=480)
    finally:
        left = dep.stop()
    assert done.returncode == 0 and left == []
    assert processes_with(f"FLWR_HOME={out / 'flwr-home'}") == []
    lines = read_metrics(out / "metrics.jsonl")
    own = own_run_with_node_data(cfg, digits, folders, tmp_path / "own")
    print("deployment:", [(m["global_acc"], m["context_acc"]) for m in lines])
    assert without_wall(lines) == without_wall(own)
    assert [m["eval_devices"] for m in lines] == [3, 3]
    part = json.loads((out / "partition.json").read_text())
    assert [[c for c, n in enumerate(d["class_counts"]) if n] for d in part["devices"]] == \
        [[0, 1, 2], [1, 2, 3], [3, 10]]
    _, record = load_checkpoint(out / "checkpoints", "cad")
    assert record["structure"]["decoupling"]["num_classes"] == 11


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cadfl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = folder / "server.pem", folder / "server.key", folder / "ca.pem"
    paths[0].write_bytes(cert.public_bytes(pem))
    paths[1].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    paths[2].write_bytes(ca.public_bytes(pem))
    return paths


@pytest.mark.slow  # ~55 s; test_deployment_with_supernode_authentication covers TLS in make test
def test_deployment_over_tls_with_a_self_signed_certificate(tmp_path):
    """The SuperLink serves HTTPS with a certificate this test makes; SuperNodes and flwr
    verify it against the test's CA; a plain-HTTP or unverified client is refused."""
    from cadfl.flower.deploy import TLS, Deployment

    certs = tmp_path / "certs"
    certs.mkdir()
    tls = TLS(*make_certificates(certs))
    cfg = load_config(None, ["devices=2", "rounds=1", "data_fraction=0.5",
                             'algorithms=["fedavg"]'])
    out = (tmp_path / "tls").resolve()
    dep = Deployment(out, cfg.devices, tls)
    try:
        dep.start()
        # The port speaks TLS with the test's certificate...
        ctx = ssl.create_default_context(cafile=str(tls.cafile))
        with socket.create_connection(("127.0.0.1", dep.superlink_port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
        # ...which a client without the CA rejects.
        with pytest.raises(ssl.SSLCertVerificationError), \
                socket.create_connection(("127.0.0.1", dep.superlink_port), timeout=5) as raw, \
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1"):
            pass
        done = dep.flwr_run({"config": BASE, "set": ";".join([
            "devices=2", "rounds=1", "data_fraction=0.5", 'algorithms=["fedavg"]']),
            "out": str(out), "timeout": 300}, timeout=300)
        assert done.returncode == 0
        assert len(read_metrics(out / "metrics.jsonl")) == 1
    finally:
        left = dep.stop()
    assert left == []
    assert processes_with(f"FLWR_HOME={out / 'flwr-home'}") == []


def test_deploy_script_help():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "flower_deploy.py"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "SuperLink" in res.stdout


def test_deployment_with_supernode_authentication(tmp_path):
    """TLS + `--enable-supernode-auth`: each SuperNode's key pair is registered with
    `flwr supernode register` before it starts and signs its requests; a round completes."""
    from cadfl.flower.deploy import TLS, Deployment

    certs = tmp_path / "certs"
    certs.mkdir()
    tls = TLS(*make_certificates(certs))
    out = (tmp_path / "auth").resolve()
    dep = Deployment(out, 2, tls, auth=True)
    try:
        dep.start()
        done = dep.flwr_run({"config": BASE, "set": "devices=2;rounds=1;data_fraction=0.5;"
                             'algorithms=["fedavg"]', "out": str(out), "timeout": 300},
                            timeout=300)
        assert done.returncode == 0
        assert len(read_metrics(out / "metrics.jsonl")) == 1
    finally:
        left = dep.stop()
    assert left == []
    registered = (out / "logs" / "flwr-register.log").read_text()
    assert registered.count("registered successfully") == 2
    assert "authentication is disabled" not in (out / "logs" / "superlink.log").read_text()
    assert processes_with(f"FLWR_HOME={out / 'flwr-home'}") == []


@pytest.mark.slow  # ~2 min on 2 cores: the dead node's round waits out round_deadline
def test_deployment_survives_a_supernode_killed_mid_run(tmp_path, digits):
    """3 SuperNodes; SuperNode 2 is killed by PID once round 1 is written. The run finishes,
    the rounds after count device 2 in `rejected`, and every line equals the engine's own
    run with device 2 left out of exactly those rounds (the others' updates aggregated);
    no process is left behind."""
    from cadfl.flower.deploy import Deployment
    overrides = ["devices=3", "rounds=2", "data_fraction=0.5", 'algorithms=["fedavg"]',
                 "round_deadline=60"]
    cfg = load_config(None, overrides)
    out = (tmp_path / "deploy").resolve()
    dep = Deployment(out, cfg.devices)

    def kill_after_round_one() -> None:
        if 2 in dep.nodes and read_metrics(out / "metrics.jsonl"):
            dep.kill_node(2)

    try:
        dep.start()
        done = dep.flwr_run({"config": BASE, "set": ";".join(overrides), "out": str(out),
                             "timeout": 60}, timeout=240, on_tick=kill_after_round_one)
    finally:
        left = dep.stop()
    assert done.returncode == 0 and left == []
    assert processes_with(f"FLWR_HOME={out / 'flwr-home'}") == []
    lines = read_metrics(out / "metrics.jsonl")
    assert [m["round"] for m in lines] == [1, 2]
    assert [m["rejected"] for m in lines] == [0, 1]
    log = (out / "logs" / "flwr-run.log").read_text()
    assert "fedavg round 2 train: node" in log or "device 2: node" in log
    dropped = {m["round"]: {2} if m["rejected"] else set() for m in lines}
    own = own_run_without(cfg, digits, tmp_path / "own", dropped)
    assert without_wall(lines) == without_wall(own)


def test_an_unregistered_supernode_is_refused(tmp_path):
    """With SuperNode authentication on, a SuperNode whose key was never registered does not
    get in: the SuperLink refuses it and it exits, while a registered one connects."""
    from cadfl.flower.deploy import TLS, Deployment

    certs = tmp_path / "certs"
    certs.mkdir()
    tls = TLS(*make_certificates(certs))
    out = (tmp_path / "auth").resolve()
    dep = Deployment(out, 1, tls, auth=True, startup_timeout=20)
    try:
        dep.start()
        stranger = dep.start_node(1, register=False)
        stranger.wait(timeout=60)
        assert stranger.returncode != 0
    finally:
        left = dep.stop()
    assert left == []
    assert "Failed to activate SuperNode" in (out / "logs" / "supernode-1.log").read_text()
    link = (out / "logs" / "superlink.log").read_text()
    assert link.count("Activated node_id=") == 1  # the registered node only
    assert "Attempted to register SuperNode with public key" in link


def test_a_deployment_message_imports_no_plotting_or_sklearn():
    """A deployment node imports the ClientApp and sets up its experiment in a fresh
    process for every message: neither pulls in matplotlib, scikit-learn or SciPy."""
    code = ("import sys, cadfl.flower.client_app\n"
            "from cadfl.config import load_config\n"
            "from cadfl.engine.run import Experiment\n"
            "Experiment.setup(load_config(None, []))\n"
            "print(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('matplotlib', 'sklearn', 'scipy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
