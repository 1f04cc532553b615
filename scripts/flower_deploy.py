#!/usr/bin/env python3
"""Run a cadfl experiment on a local Flower deployment: one SuperLink and one SuperNode per
device, all separate processes on 127.0.0.1, all stopped by PID at the end (also on failure,
timeout or Ctrl-C).

    .venv/bin/python scripts/flower_deploy.py --set devices=2 --set rounds=2 \\
        --set 'algorithms=["cad"]' --out runs/deploy-demo
    .venv/bin/python scripts/flower_deploy.py configs/digits-10x5.toml --out runs/deploy-tls \\
        --ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.pem
    .venv/bin/python scripts/flower_deploy.py --set devices=2 --set 'algorithms=["cad"]' \\
        --node '1:trainer="executorch"' --out runs/deploy-executorch

The run directory gets what `cadfl run` writes, plus logs/ (one log per daemon and the
`flwr run` output) and flwr-home/ (FLWR_HOME of every process of the run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="experiment TOML (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a setting, as `cadfl run --set`")
    p.add_argument("--out", help="run directory (default runs/deploy-TIMESTAMP)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds for the whole run before everything is stopped")
    p.add_argument("--ssl-certfile", help="SuperLink TLS certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="SuperLink TLS private key (PEM)")
    p.add_argument("--ssl-ca-certfile", help="CA certificate that signed it (PEM)")
    p.add_argument("--supernode-auth", action="store_true",
                   help="SuperNode authentication (needs TLS): a key pair per node in "
                   "RUN_DIR/keys, registered with `flwr supernode register` before it starts")
    p.add_argument("--node", dest="nodes", action="append", default=[], metavar="I:SETTINGS",
                   help="further node config of SuperNode I in Flower's syntax (strings "
                   "quoted), e.g. '1:trainer=\"executorch\"': that node trains in ExecuTorch's "
                   "runtime (needs cadfl[train-mobile])")
    args = p.parse_args(argv)
    node_settings = {}
    for item in args.nodes:
        index, sep, settings = item.partition(":")
        if not (sep and index.isdigit() and settings):
            p.error(f"--node {item!r}: expected I:KEY=VALUE, e.g. 1:trainer=\"executorch\"")
        node_settings[int(index)] = settings

    from cadfl.config import ConfigError, load_config
    from cadfl.flower.deploy import TLS, deploy_experiment
    from cadfl.report.summary import summarize, text_table

    tls_args = (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
    if any(tls_args) and not all(tls_args):
        p.error("TLS needs all three of --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile")
    tls = TLS(*map(Path, tls_args)) if all(tls_args) else None
    if args.supernode_auth and not tls:
        p.error("--supernode-auth needs TLS (--ssl-certfile, --ssl-keyfile, --ssl-ca-certfile)")
    out = Path(args.out or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"flower_deploy: error: {exc}", file=sys.stderr)
        return 2
    if (out / "metrics.jsonl").exists():
        print(f"flower_deploy: error: {out} already holds a run", file=sys.stderr)
        return 2
    lines = deploy_experiment(args.config, args.overrides, out, args.timeout, tls,
                              args.supernode_auth, node_settings)
    print(text_table(summarize(lines, cfg.target_acc, cfg.sampled_per_round())))
    print(f"\nrun directory: {out}  (logs/ holds the SuperLink, SuperNode and flwr run logs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
