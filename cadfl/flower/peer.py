"""A peer reference: Flower's own built-in FedAvg strategy, driving cadfl's device code.

`flwr.serverapp.strategy.FedAvg` samples the nodes, sends the global `ArrayRecord`, and
averages the replies weighted by `num-examples` (in float32, as Flower does); the ClientApp
here trains with `cadfl.device.train.train_local` on the node's own partition, with the same
per-device seed as cadfl's FedAvg. Same partition, same model and initialisation: its
`global_acc` curve should match cadfl's `fedavg` up to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..config import Config
from ..device.score import accuracy, predict
from ..device.train import train_local
from ..engine.experiment import Experiment
from ..fl.payload import Payload, TrainConfig
from ..fl.strategy import device_seed
from ..models import ModelSpec
from .client_app import node_experiment, node_partition, one_thread
from .env import flower_environment
from .simulation import backend_config, stop_leftovers

client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this node's partition with cadfl's device code."""
    one_thread()
    cfg = msg.content["config"]
    spec = ModelSpec.from_dict(json.loads(str(cfg["spec"])))
    base = TrainConfig.from_dict(json.loads(str(cfg["train"])))
    pid = node_partition(context)
    rnd = int(cfg["server-round"])
    state = msg.content["arrays"].to_torch_state_dict()
    dtypes = json.loads(str(cfg["dtypes"]))
    state = {k: v.to(getattr(torch, dtypes[k])) for k, v in state.items()}
    config = TrainConfig(**{**base.to_dict(), "seed": device_seed(base.seed, rnd, pid)})
    exp = node_experiment(str(cfg["experiment"]), context)
    exp.enter_round(rnd)
    update = train_local(Payload(spec, state, config), exp.data(pid))
    return Message(RecordDict({
        "arrays": ArrayRecord(update.state),
        "metrics": MetricRecord({"num-examples": update.num_samples,
                                 "train_loss": update.metrics["train_loss"]})}), reply_to=msg)


def make_peer_server(cfg: Config, result: dict) -> ServerApp:
    """A ServerApp running Flower's FedAvg on `cfg`'s experiment; `result["global_acc"]` gets
    the accuracy after every round (scored by cadfl's evaluation on the whole test set)."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        exp = Experiment.setup(cfg)
        ds, spec = exp.dataset, exp.spec
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in exp.init.items()}

        def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
            state = {k: v.to(exp.init[k].dtype) for k, v in arrays.to_torch_state_dict().items()}
            logits = predict(spec, state, ds.test_x, ds.mean, ds.std)
            return MetricRecord({"accuracy": accuracy(logits, ds.test_y, spec)})

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                          min_train_nodes=cfg.devices, min_available_nodes=cfg.devices)
        train_config = ConfigRecord({
            "spec": json.dumps(spec.to_dict()),
            "train": json.dumps(exp.train_config(cfg.for_algorithm("fedavg")).to_dict()),
            "experiment": json.dumps(cfg.to_dict()), "dtypes": json.dumps(dtypes)})
        res = strategy.start(grid=grid, initial_arrays=ArrayRecord(exp.init),
                             num_rounds=cfg.rounds, train_config=train_config,
                             evaluate_fn=evaluate)
        result["global_acc"] = [float(res.evaluate_metrics_serverapp[r]["accuracy"])
                                for r in range(1, cfg.rounds + 1)]

    return server


def run_peer_fedavg(cfg: Config, run_dir: Path, num_cpus: int | None = None) -> list[float]:
    """Flower's built-in FedAvg on `cfg` in Flower's simulation engine; global_acc per round."""
    from flwr.simulation import run_simulation

    if cfg.sampled_per_round() != cfg.devices:
        raise ValueError("the peer reference trains every device each round: set sample=1.0")
    result: dict = {}
    with flower_environment(run_dir):
        try:
            run_simulation(server_app=make_peer_server(cfg, result), client_app=client,
                           num_supernodes=cfg.devices, backend_config=backend_config(num_cpus))
        finally:
            stop_leftovers(run_dir)
    if "global_acc" not in result:
        raise RuntimeError("Flower's FedAvg run did not finish; see the log above")
    return result["global_acc"]
