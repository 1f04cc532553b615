"""cadfl on Flower: the same strategies as a Flower ServerApp, one generic ClientApp.

- `server_app:app` / `client_app:app`: the apps `flwr run` loads (see `[tool.flwr.app]`);
- `simulation.run_flower_simulation`: `cadfl run --engine flower` (Flower's simulation engine);
- `deploy`: a SuperLink and N SuperNodes on 127.0.0.1 as separate processes;
- `peer`: Flower's own built-in FedAvg strategy driving cadfl's device code (a reference);
- `codec`: payloads and updates as Flower records, used by both sides;
- `own_data`: nodes with their own images (`data-dir`): reports, class ids, scores as counts.

Requires the optional dependency: `pip install 'cadfl[flower]'`.
"""
