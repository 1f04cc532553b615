"""The Flower ServerApp: cadfl's own round loop, with devices reached through Flower's Grid.

The ServerApp holds the whole cloud side exactly as the in-process engine does: it builds the
experiment (data, partition, initial weights, test set), runs every algorithm of the config
through `cadfl.sim.engine.run_experiment`, evaluates in place and writes the same run
directory. Only the `execute` step differs: payloads go to Flower nodes as messages
(`FlowerExecutor`), and updates come back from them.

Run config keys (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config`):
  config   TOML experiment config ("" = cadfl's built-in defaults); relative paths are
           looked up from the current directory, then from the project root
  set      overrides, `;`-separated `key=value` (as `cadfl run --set`), e.g.
           "rounds=2;devices=2;algorithms=[\"cad\"]"
  out      the run directory ("" = runs/flower-TIMESTAMP)
  timeout  seconds to wait for all replies of one round (and for the nodes to connect)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..fl.central import POOLED
from ..fl.device import DeviceData, run_task
from ..fl.payload import Update
from ..runtime import Job, Result
from ..sim.config import Config, load_config, require_flower_support
from ..sim.engine import run_experiment
from .client_app import IDENTITY, PARTITION_ID
from .codec import decode_update, encode_payload
from .data import device_data

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.5


class FlowerError(RuntimeError):
    """A Flower node failed, did not answer in time, or the nodes do not match the config."""


class FlowerExecutor:
    """`execute` for the engine: payloads to the nodes holding those partitions, updates back.

    Node ids are random, so a first query round asks every node for its partition id. The
    centralised reference (`central`) has no device: its pooled payload runs here.
    """

    def __init__(self, grid: Grid, cfg: Config, timeout: float = 600.0) -> None:
        self.grid, self.cfg, self.timeout = grid, cfg, timeout
        self.experiment = json.dumps(cfg.to_dict())
        self.messages = 0
        self._pooled: DeviceData | None = None
        self.nodes = self.discover()

    def _send(self, messages: list[Message]) -> list[Message]:
        replies = list(self.grid.send_and_receive(messages, timeout=self.timeout))
        self.messages += len(messages)
        errors = [r for r in replies if r.has_error()]
        if errors:
            e = errors[0]
            raise FlowerError(f"node {e.metadata.src_node_id} failed: {e.error.reason} "
                              f"({len(errors)} of {len(messages)} nodes failed)")
        if len(replies) != len(messages):
            raise FlowerError(f"{len(messages) - len(replies)} of {len(messages)} nodes did not "
                              f"reply within {self.timeout:g} s")
        return replies

    def discover(self) -> dict[int, int]:
        """Wait for `cfg.devices` nodes and map every partition id to its node id."""
        deadline = time.monotonic() + self.timeout
        while True:
            node_ids = sorted(self.grid.get_node_ids())
            if len(node_ids) >= self.cfg.devices or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        if len(node_ids) != self.cfg.devices:
            raise FlowerError(f"the config has {self.cfg.devices} devices but {len(node_ids)} "
                              "Flower nodes are connected: start one SuperNode per device "
                              "(--node-config 'partition-id=0..N-1')")
        query = [Message(RecordDict({IDENTITY: ConfigRecord({})}), dst_node_id=n,
                         message_type=MessageType.QUERY) for n in node_ids]
        nodes: dict[int, int] = {}
        for reply in self._send(query):
            pid = int(reply.content.config_records[IDENTITY][PARTITION_ID])
            if pid in nodes:
                raise FlowerError(f"two nodes claim partition-id {pid}")
            nodes[pid] = reply.metadata.src_node_id
        if sorted(nodes) != list(range(self.cfg.devices)):
            raise FlowerError(f"nodes hold partitions {sorted(nodes)}, expected "
                              f"0..{self.cfg.devices - 1}")
        return nodes

    def __call__(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Send the round's payloads to their nodes at once; yield the updates in device
        order."""
        payloads = dict(jobs)
        out: dict[int, Update] = {}
        remote = {d: p for d, p in payloads.items() if d != POOLED}
        if remote:
            device_of = {self.nodes[d]: d for d in remote}
            messages = [Message(encode_payload(p, self.experiment), dst_node_id=self.nodes[d],
                                message_type=MessageType.TRAIN) for d, p in sorted(remote.items())]
            for reply in self._send(messages):
                out[device_of[reply.metadata.src_node_id]] = decode_update(reply.content)
        if POOLED in payloads:  # centralised training: no device, no messages
            if self._pooled is None:
                self._pooled = device_data(self.cfg, POOLED)
            out[POOLED] = run_task(payloads[POOLED], self._pooled)
        for d in sorted(payloads):
            yield d, payloads[d], out.get(d)


def run_on_grid(grid: Grid, cfg: Config, out: Path, timeout: float = 600.0,
                quiet: bool = True, on_round: Callable[[dict], None] | None = None,
                resume: bool = False) -> list[dict]:
    """The whole experiment with its devices behind `grid`; writes the run directory."""
    require_flower_support(cfg, "Flower")
    execute = FlowerExecutor(grid, cfg, timeout)
    return run_experiment(cfg, out, resume=resume, quiet=quiet, execute=execute,
                          on_round=on_round)


def config_from_run_config(run_config: dict) -> tuple[Config, Path, float]:
    """The experiment config, run directory and timeout from Flower's run config."""
    path = str(run_config.get("config", "") or "")
    if path and not Path(path).exists() and (PROJECT_ROOT / path).exists():
        path = str(PROJECT_ROOT / path)
    overrides = [s.strip() for s in str(run_config.get("set", "") or "").split(";") if s.strip()]
    cfg = load_config(path or None, overrides)
    out = str(run_config.get("out", "") or "")
    out_dir = Path(out or f"runs/flower-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, out_dir, float(run_config.get("timeout", 600))


def _print_round(line: dict) -> None:
    acc = line["global_acc"]
    print(f"cadfl {line['algorithm']} round {line['round']}: global_acc "
          f"{'-' if acc is None else f'{acc:.4f}'}, wall {line['wall_s']:.2f} s", flush=True)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run` entry point: the experiment of the run config, through the connected nodes."""
    cfg, out, timeout = config_from_run_config(dict(context.run_config))
    run_on_grid(grid, cfg, out, timeout, on_round=_print_round)
    print(f"cadfl: run directory {out.resolve()}", flush=True)


def make_server_app(cfg: Config, out: Path, timeout: float = 600.0, quiet: bool = True,
                    result: list | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp bound to one in-memory config (for the simulation engine); the metric
    lines are appended to `result`."""
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        lines = run_on_grid(grid, cfg, out, timeout, quiet=quiet,
                            on_round=None if quiet else _print_round, resume=resume)
        if result is not None:
            result.extend(lines)

    return server
