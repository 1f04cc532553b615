"""The Flower ServerApp: cadfl's own round loop, with devices reached through Flower's Grid.

The ServerApp holds the whole cloud side exactly as the in-process engine does: it builds the
experiment (data, partition, initial weights, test set), runs every algorithm of the config
through `cadfl.engine.run.run_experiment`, evaluates in place and writes the same run
directory. Only the `execute` step differs: payloads go to Flower nodes as messages
(`FlowerExecutor`), and updates come back from them.

Run config keys (`[tool.flwr.app.config]` in pyproject.toml, `flwr run --run-config`):
  config   TOML experiment config ("" = cadfl's built-in defaults); relative paths are
           looked up from the current directory, then from the project root
  set      overrides, `;`-separated `key=value` (as `cadfl run --set`), e.g.
           "rounds=2;devices=2;algorithms=[\"cad\"]"
  out      the run directory ("" = runs/flower-TIMESTAMP)
  timeout  seconds to wait at the start for a node per device (the run goes on with those
           connected then; the others join when they connect); how long a round waits for
           its answers is the experiment's `round_deadline`
  resume   continue the run in `out` from its last checkpoints (`cadfl run --resume`)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ..config import DEMO, Config, dataset_of, load_config
from ..device.executor import Executor, Job, Result, Scores
from ..device.train import run_task
from ..engine.experiment import Experiment
from ..engine.run import run_experiment
from ..fl.central import POOLED
from ..fl.payload import Payload, Update
from .client_app import CLASSES, COUNTS, EXPERIMENT, IDENTITY, PARTITION_ID, SCORE_KEYS, SCORES
from .codec import decode_update, encode_payload
from .own_data import RunData, count_scores, server_dataset, with_reports

PROJECT_ROOT = Path(__file__).resolve().parents[2]
POLL_S = 0.5  # waiting for nodes to connect
REPLY_POLL_S = 0.1  # waiting for replies: a pull is one small request to the SuperLink
log = logging.getLogger("cadfl")


class FlowerError(RuntimeError):
    """No Flower node connected to run the experiment on, or nodes' own data it cannot use."""


class FlowerExecutor(Executor):
    """`execute` for the engine: payloads to the nodes holding those devices, updates back.

    Node ids are random: every node that connects is asked once (a query message) which
    device (partition) it holds; a node with its own images also reports their class names
    and counts. When the nodes hold their own images (some node reported them during the
    start-up wait), the reports decide the devices (`experiment`, for the engine, set up from
    `own_data.server_dataset`), every message tells the nodes the run's classes and
    normalisation, and devices score themselves on their own held-out images. Class names
    the run's list lacks become New Classes at the start; a device that reports later joins
    with classes the run knows by then. Before each round the executor looks at the
    nodes connected then: a node that joined late is asked, a node that left loses its
    device, and a device whose node came back (a new node id) is served by it again. A device
    with no node, a node that fails, or one that does not answer within `deadline` seconds is
    logged with its node and the reason and yields no update: the engine counts it as a
    dropout, as in simulation.

    The nodes' data follow the round's contexts and their kept state is per algorithm, so
    every message says which algorithm and round it is of (the engine's `begin_round`). A
    node is told the run (the config, and how the run labels images) once, in its first
    message, and again only after it failed to answer. The centralised reference
    (`central`) has no device: its pooled payload runs here.
    """

    scores_devices = True

    def __init__(self, grid: Grid, cfg: Config, deadline: float = 600.0,
                 wait: float = 60.0, out: Path | None = None) -> None:
        self.grid, self.cfg, self.deadline, self.out = grid, cfg, deadline, out
        self.config_json = json.dumps(cfg.to_dict())
        self.current = ("", 0)  # (algorithm, round) the engine is running
        self.messages = 0
        self.nodes: dict[int, int] = {}  # device -> node id
        self.reports: dict[int, dict[str, int]] = {}  # device -> its own images per class
        self.own_data: bool | None = None  # do the nodes hold the images (None: not known yet)
        self.experiment: Experiment | None = None  # the engine's, from the nodes' reports
        self.run_data = ""  # RunData JSON sent to nodes with their own images
        self._late: dict[int, dict[str, int]] = {}  # reports after the start, not admitted yet
        self._asked: set[int] = set()  # node ids that said which device they hold
        self._told: set[int] = set()  # node ids that hold the run's config and data
        self._server: Experiment | None = None
        self.wait_for_nodes(wait)
        self.own_data = bool(self.reports)
        if self.own_data:
            self.use_own_data()

    def begin_round(self, algorithm: str, rnd: int) -> None:
        """The engine starts round `rnd` of `algorithm`: the messages from now on are of it."""
        self.current = (algorithm, rnd)

    def wait_for_nodes(self, wait: float) -> None:
        """Wait (at most `wait` s) until every device has a node; go on with those that
        have one then (the others join when they connect)."""
        deadline = time.monotonic() + wait
        while True:
            self.refresh()
            if len(self.nodes) >= self.cfg.devices or time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        if not self.nodes:
            raise FlowerError(f"no Flower node holding one of the {self.cfg.devices} devices "
                              f"connected within {wait:g} s: start SuperNodes with "
                              "--node-config 'partition-id=0..N-1'")
        missing = sorted(set(range(self.cfg.devices)) - set(self.nodes))
        if missing:
            log.warning("devices without a node so far (not sampled until they connect): %s",
                        missing)

    def use_own_data(self) -> None:
        """The nodes hold their own images: the devices are what they reported (names the
        run's class list lacks become New Classes; a device yet to report holds nothing);
        FlowerError if the config asks for something only a simulated partition has."""
        cfg = self.cfg
        simulated = [name for name, used in (
            ("central", "central" in cfg.algorithms), ("context", bool(cfg.context)),
            ("validation_fraction", cfg.validation_fraction > 0),
            ("partition.other_fraction", cfg.partition.other_fraction > 0)) if used]
        if simulated:
            raise FlowerError(f"{', '.join(simulated)}: needs a simulated partition, not the "
                              "nodes' own images")
        run = dataset_of(cfg)
        dataset = server_dataset(run, self.reports)
        self.experiment = Experiment.setup(cfg, dataset)
        self.run_data = RunData.of(dataset, self.experiment.label_space).to_json()
        for c in range(run.num_classes, dataset.num_classes):
            log.info("New Class %r (class id %d): first reported by a node",
                     dataset.classes[c], c)
        missing = sorted(set(range(cfg.devices)) - set(self.reports))
        if missing:
            log.warning("devices %s have not reported images of their own: each takes part "
                        "once its node connects and reports them", missing)

    def refresh(self) -> None:
        """Follow the connected nodes: forget those that left, ask new ones their device."""
        connected = set(self.grid.get_node_ids())
        for d, n in list(self.nodes.items()):
            if n not in connected:
                log.warning("device %d: node %d is no longer connected", d, n)
                del self.nodes[d]
        self._asked &= connected
        self._told &= connected
        new = sorted(connected - self._asked)
        if not new:
            return
        ask = RecordDict({IDENTITY: ConfigRecord({EXPERIMENT: self.config_json})})
        query = {n: Message(ask, dst_node_id=n, message_type=MessageType.QUERY) for n in new}
        for n, reply in self._exchange(query, "query").items():
            self._asked.add(n)
            identity = reply.content.config_records[IDENTITY]
            d = int(identity[PARTITION_ID])
            if not 0 <= d < self.cfg.devices:
                log.warning("node %d holds partition %d, outside 0..%d: not used", n, d,
                            self.cfg.devices - 1)
                continue
            if CLASSES in identity:
                self._reported(d, dict(zip(map(str, identity[CLASSES]),
                                           map(int, identity[COUNTS]), strict=True)))
            elif self.own_data and d not in self.reports:
                log.warning("node %d holds device %d without a data-dir, in a run on the "
                            "nodes' own images: not sampled", n, d)
            if self.nodes.get(d, n) != n:
                log.warning("device %d: now on node %d (was node %d)", d, n, self.nodes[d])
            self.nodes[d] = n

    def _reported(self, d: int, report: dict[str, int]) -> None:
        """Device d's node reported its own images: kept during the start-up wait, to be
        admitted before the next round after it, ignored (with the reason) otherwise."""
        if self.own_data is None:
            self.reports[d] = report
        elif not self.own_data:
            log.warning("device %d reports images of its own, but this run's devices have a "
                        "simulated partition: its node trains on that", d)
        elif d not in self.reports:
            self._late[d] = report
        elif report != self.reports[d]:
            log.warning("device %d reports other images than at first: the first report "
                        "stands for this run", d)

    def _admit(self, d: int, report: dict[str, int]) -> None:
        """Take device d's late report into the dataset and the engine's experiment (and
        the run directory's partition.json); a class name the run lacks keeps it out."""
        exp = self.experiment
        assert exp is not None  # reports are late only in a run on the nodes' own images
        try:
            grown = with_reports(exp.dataset, {d: report})
        except ValueError as exc:
            log.warning("device %d is not used: %s (new class names must be reported at the "
                        "start of the run)", d, exc)
            return
        exp.admit(d, grown)
        self.reports[d] = report
        log.info("device %d joined with its own images: %s", d, report)
        if self.out is not None:
            exp.partition.save(self.out / "partition.json")

    def admit(self) -> None:
        """Follow the connected nodes (a node that joined late is asked its device, one that
        left loses it) and admit the devices that reported their own images late."""
        self.refresh()
        for d in sorted(self._late):
            self._admit(d, self._late.pop(d))

    def reachable(self, devices: int) -> list[int]:
        """The devices with a node connected at the last `admit` (and, with nodes' own
        images, reported): the engine samples a round's participants from these."""
        return sorted(d for d in self.nodes
                      if d < devices and (not self.own_data or d in self.reports))

    def _exchange(self, messages: dict[int, Message], what: str) -> dict[int, Message]:
        """Send messages (by node id) and wait up to the deadline; the good replies by node
        id. Errors and missing replies are logged with the node and the reason."""
        if not messages:
            return {}
        replies = self._push_and_pull(list(messages.values()))
        self.messages += len(messages)
        good = {}
        for reply in replies:
            n = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("%s: node %d failed: %s", what, n, reply.error.reason)
            else:
                good[n] = reply
        answered = {r.metadata.src_node_id for r in replies}
        for n in sorted(set(messages) - answered):
            log.warning("%s: node %d did not answer within %g s", what, n, self.deadline)
        return good

    def _push_and_pull(self, messages: list[Message]) -> list[Message]:
        """Push the messages and pull their replies until all are in or the deadline passes.

        Not `Grid.send_and_receive`: over HTTP it sleeps 3 s between pulls, which made up
        most of a deployment round on loopback."""
        pending = set(self.grid.push_messages(messages))
        replies: list[Message] = []
        deadline = time.monotonic() + self.deadline
        while True:
            pulled = list(self.grid.pull_messages(pending))
            replies += pulled
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                return replies
            time.sleep(min(REPLY_POLL_S, left))

    def _send(self, payloads: list[Job], kind: str) -> dict[int, Message]:
        """One message of type `kind` per device with a node; the good replies by device."""
        algorithm, rnd = self.current
        messages = {}
        for d, p in payloads:
            if d == POOLED:
                continue
            if d not in self.nodes:
                log.warning("%s round %d: device %d has no node connected", algorithm, rnd, d)
                continue
            n = self.nodes[d]
            told = n in self._told
            messages[n] = Message(
                encode_payload(p, rnd, algorithm, *(("", "") if told else
                                                    (self.config_json, self.run_data))),
                dst_node_id=n, message_type=kind)
        device_of = {n: d for d, n in self.nodes.items()}
        replies = self._exchange(messages, f"{algorithm} round {rnd} {kind}")
        # A node that did not answer may have lost what it was told (a restart): again.
        self._told = (self._told | set(replies)) - (set(messages) - set(replies))
        return {device_of[n]: r for n, r in replies.items()}

    def _pooled(self, payload: Payload) -> Update:
        """Centralised training: no device, no messages; the engine's pooled data here."""
        if self._server is None:
            self._server = Experiment.setup(self.cfg)
        self._server.enter_round(self.current[1])
        return run_task(payload, self._server.data(POOLED))

    def __call__(self, jobs: Iterable[Job]) -> Iterator[Result]:
        """Send the round's payloads to their nodes at once; yield the updates (None for a
        dropout) in job order."""
        payloads = list(jobs)
        self.refresh()
        replies = self._send(payloads, MessageType.TRAIN)
        for d, p in payloads:
            update = self._pooled(p) if d == POOLED else None
            if d in replies:
                try:
                    update = decode_update(replies[d].content)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("device %d: unreadable update: %r", d, exc)
            yield d, p, update

    def score(self, jobs: Iterable[Job]) -> Iterator[tuple[int, Scores]]:
        """Have the devices score their own models (they hold what they keep); the scores
        of those that answered, in job order (`Experiment.evaluate`'s `score`)."""
        payloads = list(jobs)
        self.refresh()
        replies = self._send(payloads, MessageType.EVALUATE)
        for d, _ in payloads:
            if d in replies:
                m = replies[d].content.metric_records[SCORES]
                if self.own_data:  # counts on the node's own held-out images
                    yield d, count_scores({k: int(v) for k, v in m.items()})
                else:
                    yield d, tuple(float(m[k]) for k in SCORE_KEYS)


def run_on_grid(grid: Grid, cfg: Config, out: Path, wait: float = 60.0,
                quiet: bool = True, on_round: Callable[[dict], None] | None = None,
                resume: bool = False) -> list[dict]:
    """The whole experiment with its devices behind `grid`; writes the run directory."""
    execute = FlowerExecutor(grid, cfg, cfg.round_deadline, wait, out)
    return run_experiment(cfg, out, resume=resume, quiet=quiet, execute=execute,
                          on_round=on_round, experiment=execute.experiment)


def config_from_run_config(run_config: dict) -> tuple[Config, Path, float]:
    """The experiment config, run directory and timeout from Flower's run config."""
    path = str(run_config.get("config", "") or "")
    if path and not Path(path).exists() and (PROJECT_ROOT / path).exists():
        path = str(PROJECT_ROOT / path)
    overrides = [s.strip() for s in str(run_config.get("set", "") or "").split(";") if s.strip()]
    cfg = load_config(path or DEMO, overrides)
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
    run_on_grid(grid, cfg, out, timeout, on_round=_print_round,
                resume=bool(context.run_config.get("resume", False)))
    print(f"cadfl: run directory {out.resolve()}", flush=True)
