"""Deployment on one machine: a SuperLink and N SuperNodes on 127.0.0.1 as separate processes.

`deploy_experiment` starts `flower-superlink` and one `flower-supernode` per device (partition
`i` on node `i`, each on its own port), writes a Flower configuration (FLWR_HOME inside the
run directory) naming that SuperLink, submits cadfl's app with `flwr run . <connection>
--stream`, waits for the run directory to be complete, and stops every process it started by
PID: the daemons, and every process they started (found as descendants, and by the run's own
FLWR_HOME in their environment), also on failure, timeout or Ctrl-C.

Plain HTTP on loopback by default; with `TLS` files the SuperLink serves HTTPS and the
SuperNodes and `flwr` verify it against the CA certificate (docs/flower.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from ..config import load_config
from ..engine.run import read_metrics
from .env import child_env

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "cadfl-local"
HOST = "127.0.0.1"


class DeployError(RuntimeError):
    """A daemon did not come up, the run failed or timed out."""


@dataclass(frozen=True)
class TLS:
    """Server certificate and key of the SuperLink, and the CA certificate that signed it."""

    certfile: Path
    keyfile: Path
    cafile: Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Block until something accepts connections on 127.0.0.1:`port` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(f"{what} exited with code {proc.returncode} before listening")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise DeployError(f"{what} did not listen on {HOST}:{port} within {timeout:g} s")


def _tool(name: str) -> str:
    """A Flower console script of this Python environment."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise DeployError(f"{name} not found: install cadfl with the flower extra "
                          "(pip install 'cadfl[flower]')")
    return found


# Processes, by PID.

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, None if it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(roots: list[int]) -> dict[int, int]:
    """Every live descendant of `roots`: pid -> start time."""
    parent = {}
    for pid in _all_pids():
        st = _stat(pid)
        if st:
            parent[pid] = st
    out, frontier = {}, set(roots)
    for _ in range(64):  # bounded depth
        nxt = {p for p, (pp, _) in parent.items() if pp in frontier and p not in out}
        if not nxt:
            break
        out.update({p: parent[p][1] for p in nxt})
        frontier = nxt
    return out


def marked(marker: str) -> dict[int, int]:
    """Live processes whose environment holds `marker` (e.g. this run's FLWR_HOME=...)."""
    needle = marker.encode() + b"\0"
    out = {}
    for pid in _all_pids():
        if pid == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        st = _stat(pid)
        if st and (needle in env or env.endswith(marker.encode())):
            out[pid] = st[1]
    return out


def stop_pids(pids: dict[int, int], grace: float) -> None:
    """SIGTERM, wait up to `grace` s, then SIGKILL: each pid only while its start time still
    matches (so a reused pid is never touched)."""
    def alive(pid: int) -> bool:
        st = _stat(pid)
        return st is not None and st[1] == pids[pid]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in [p for p in pids if alive(p)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.1)


@dataclass
class Deployment:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1, all stopped by `stop()`."""

    run_dir: Path
    num_nodes: int
    tls: TLS | None = None
    auth: bool = False  # SuperNode authentication: only registered node keys may join (TLS)
    # Flower's simulation runtime instead of SuperNodes: the connection's `options`
    # (num-supernodes, backend); the SuperLink runs the ClientApps itself, with Ray.
    simulation: dict | None = None
    startup_timeout: float = 60.0
    procs: list[subprocess.Popen] = field(default_factory=list)
    seen: dict[int, int] = field(default_factory=dict)  # every pid it ever saw: start time
    superlink_port: int = 0
    node_ports: list[int] = field(default_factory=list)
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)  # SuperNodes by partition
    data_dirs: dict[int, Path] = field(default_factory=dict)  # SuperNode i's own images
    # SuperNode i's further node config, e.g. 'trainer="executorch"' (Flower's syntax)
    node_settings: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir).resolve()
        self.env = child_env(self.run_dir)
        # The daemons start Flower's own helpers (flower-superexec, flwr-serverapp,
        # flwr-clientapp) by name: this Python environment's scripts come first.
        bindir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join([bindir, self.env.get("PATH", "")])
        self.marker = f"FLWR_HOME={self.env['FLWR_HOME']}"
        self.logs = self.run_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=self.run_dir)
        log.close()
        self.procs.append(proc)
        st = _stat(proc.pid)
        if st:
            self.seen[proc.pid] = st[1]
        return proc

    def track(self) -> None:
        """Remember every process this deployment has started so far (for `stop`)."""
        self.seen.update(descendants([p.pid for p in self.procs]))
        self.seen.update(marked(self.marker))

    def write_flower_config(self) -> Path:
        """FLWR_HOME/config.toml naming this SuperLink as connection `cadfl-local`."""
        conn: dict = {"address": f"{HOST}:{self.superlink_port}"}
        if self.tls:
            conn["root-certificates"] = str(Path(self.tls.cafile).resolve())
        else:
            conn["insecure"] = True
        if self.simulation:
            conn["options"] = self.simulation
        path = Path(self.env["FLWR_HOME"]) / "config.toml"
        path.write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                     CONNECTION: conn}}))
        return path

    def node_key(self, i: int) -> Path:
        """Node `i`'s EC P-384 key pair (OpenSSH format, made on first use); returns the
        private key path (the public key is next to it, `.pub`)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        path = self.run_dir / "keys" / f"supernode-{i}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP384R1())
            path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.OpenSSH,
                                               serialization.NoEncryption()))
            path.chmod(0o600)
            path.with_suffix(".pub").write_bytes(key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        return path

    def register(self, public_key: Path, timeout: float = 60.0) -> None:
        """`flwr supernode register KEY cadfl-local` (bounded; output in logs/)."""
        with open(self.logs / "flwr-register.log", "ab") as log:
            proc = subprocess.Popen([_tool("flwr"), "supernode", "register", str(public_key),
                                     CONNECTION], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.run_dir)
        self.procs.append(proc)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeployError(f"flwr supernode register did not finish in {timeout:g} s") from None
        if code != 0:
            raise DeployError(f"flwr supernode register {public_key} failed (exit {code}); "
                              f"see {self.logs / 'flwr-register.log'}")

    def start(self) -> None:
        """Start the SuperLink, wait until it listens, then the SuperNodes."""
        if self.auth and not self.tls:
            raise DeployError("SuperNode authentication needs TLS certificates")
        self.superlink_port = free_port()
        security = (["--ssl-certfile", str(self.tls.certfile), "--ssl-keyfile",
                     str(self.tls.keyfile), "--ssl-ca-certfile", str(self.tls.cafile)]
                    if self.tls else ["--insecure"])
        if self.auth:
            security.append("--enable-supernode-auth")
        if self.simulation:
            security.append("--simulation")
        link = self._start("superlink", [
            _tool("flower-superlink"), *security, "--host", HOST,
            "--port", str(self.superlink_port), "--disable-runtime-dependency-installation"])
        wait_port(self.superlink_port, link, self.startup_timeout, "flower-superlink")
        self.write_flower_config()
        for i in range(self.num_nodes):
            self.start_node(i)
        self.track()

    def start_node(self, i: int, register: bool = True) -> subprocess.Popen:
        """Start SuperNode `i` (partition i, its own images from `data_dirs[i]` if given) and
        wait until it listens; with authentication, its key is registered first unless
        `register` is False (the SuperLink refuses it)."""
        security = (["--root-certificates", str(self.tls.cafile)] if self.tls
                    else ["--insecure"])
        if self.auth:
            key = self.node_key(i)
            if register:
                self.register(key.with_suffix(".pub"))
            security += ["--auth-supernode-private-key", str(key)]
        port = free_port()
        self.node_ports.append(port)
        node_config = f"partition-id={i} num-partitions={self.num_nodes}"
        if i in self.data_dirs:
            node_config += f' data-dir="{Path(self.data_dirs[i]).resolve()}"'
        if i in self.node_settings:
            node_config += f" {self.node_settings[i]}"
        node = self._start(f"supernode-{i}", [
            _tool("flower-supernode"), *security,
            "--superlink", f"{HOST}:{self.superlink_port}",
            "--host", HOST, "--port", str(port),
            "--node-config", node_config,
            "--max-retries", "20", "--max-wait-time", str(self.startup_timeout)])
        self.nodes[i] = node
        if register:
            wait_port(port, node, self.startup_timeout, f"flower-supernode {i}")
        return node

    def kill_node(self, i: int) -> None:
        """Stop SuperNode `i` and every process it started, at once (SIGTERM, then SIGKILL
        without waiting; by PID): a device that goes away in the middle of a run."""
        node = self.nodes.pop(i)
        st = _stat(node.pid)
        if st is None:
            return
        stop_pids({node.pid: st[1], **descendants([node.pid])}, 0.0)
        node.wait(timeout=10)

    def flwr_run(self, run_config: dict, timeout: float,
                 on_tick: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
        """`flwr run PROJECT cadfl-local --run-config FILE --stream`, bounded by `timeout`;
        `on_tick` is called about twice a second while it runs."""
        path = self.run_dir / "flwr-run-config.toml"
        path.write_text(tomli_w.dumps(run_config))
        log = open(self.logs / "flwr-run.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen([_tool("flwr"), "run", str(PROJECT_ROOT), CONNECTION,
                                 "--run-config", str(path), "--stream"],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=PROJECT_ROOT)
        log.close()
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            self.track()
            if on_tick:
                on_tick()
            time.sleep(0.5)
        if proc.poll() is None:
            raise DeployError(f"flwr run did not finish within {timeout:g} s "
                              f"(logs in {self.logs})")
        return subprocess.CompletedProcess(proc.args, proc.returncode)

    def stop(self, grace: float = 10.0) -> list[int]:
        """Stop everything this deployment started, by PID; returns pids still alive (none)."""
        self.track()
        daemons = {}
        for p in self.procs:
            st = _stat(p.pid)
            if st:
                daemons[p.pid] = st[1]
        stop_pids(daemons, grace)  # SuperLink/SuperNodes first: they stop their own children
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=1)
        self.seen.update(marked(self.marker))
        stop_pids(self.seen, 3.0)
        left = {**{p: s for p, s in self.seen.items()
                   if (st := _stat(p)) is not None and st[1] == s},
                **marked(self.marker)}
        return sorted(left)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _on_sigterm_interrupt():
    """Turn SIGTERM into KeyboardInterrupt (so `finally` stops the daemons); returns the old
    handler, or None off the main thread (where handlers cannot be set)."""
    try:
        return signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:
        return None


def deploy_experiment(config: str | None, overrides: list[str], out: Path,
                      timeout: float = 900.0, tls: TLS | None = None,
                      auth: bool = False, node_settings: dict[int, str] | None = None
                      ) -> list[dict]:
    """Run the experiment of `config` + `overrides` through a local deployment with one
    SuperNode per device (SuperNode i with the further node config `node_settings[i]`, e.g.
    'trainer="executorch"'); writes run directory `out` and returns its metric lines."""
    cfg = load_config(config, overrides)  # fails here, before any process, on a bad config
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    expected = cfg.rounds * len(cfg.algorithms)
    bad = sorted(set(node_settings or {}) - set(range(cfg.devices)))
    if bad:
        raise DeployError(f"node settings for SuperNodes {bad}, but the run has SuperNodes "
                          f"0..{cfg.devices - 1}")
    deployment = Deployment(out, cfg.devices, tls, auth, node_settings=dict(node_settings or {}))
    old = _on_sigterm_interrupt()
    try:
        start = time.monotonic()
        deployment.start()
        run_config = {"config": str(Path(config).resolve()) if config else "",
                      "set": ";".join(overrides), "out": str(out),
                      "timeout": int(min(600, timeout))}
        remaining = timeout - (time.monotonic() - start)
        done = deployment.flwr_run(run_config, remaining)
        lines = read_metrics(out / "metrics.jsonl")
        if done.returncode != 0 or len(lines) != expected or not (out / "summary.md").exists():
            raise DeployError(f"the run did not complete: flwr run exited {done.returncode}, "
                              f"{len(lines)} of {expected} metric lines; logs in "
                              f"{deployment.logs}")
        return lines
    finally:
        left = deployment.stop()
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        if left:
            raise DeployError(f"processes still alive after stopping: {left}")
