"""The ServerApp a deployment's SuperLink runs (``[tool.flwr.app.components] serverapp``), once per run.

A thin shell, as in simulation: it attaches to the Ray instance ``fedlora serve`` hosts, finds the named
Coordinator actor there, and drives the one round loop over Flower's grid. Devices are identified by the name
they were enrolled under (``grid.get_nodes()`` reports it), never by what they claim; a node that is not
enrolled, or claims another name, is left out. Flower sends this process's output to /dev/null, so it logs to
the file the run config names.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.coordinator.server_app import GridTransport
from fedlora.env import apply_offline_env, quiet_logs

app = ServerApp()
log = logging.getLogger("fedlora.server")

#: the run config keys `fedlora serve` passes with `flwr run --run-config` (declared in the app's pyproject)
RUN_CONFIG = {"coordinator": "", "namespace": "", "ray-address": "", "enrollments": "", "log-file": "",
              "num-nodes": 1, "round-timeout-s": 600.0, "connect-timeout-s": 120.0}


@app.main()
def main(grid: Grid, context: Context) -> None:
    import ray

    from fedlora.coordinator.rounds import local_view, run_rounds

    rc = {**RUN_CONFIG, **dict(context.run_config)}
    apply_offline_env()
    if rc["log-file"]:
        logging.basicConfig(filename=rc["log-file"], level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_logs()
    ray.init(address=str(rc["ray-address"]), namespace=str(rc["namespace"]), logging_level=logging.WARNING)
    coord = ray.get_actor(str(rc["coordinator"]), namespace=str(rc["namespace"]))
    enrollments = Path(str(rc["enrollments"]))
    transport = GridTransport(
        grid, num_nodes=int(rc["num-nodes"]), timeout_s=float(rc["round-timeout-s"]),
        connect_timeout_s=float(rc["connect-timeout-s"]),
        enrolled=lambda: json.loads(enrollments.read_text()) if enrollments.exists() else {},
    )
    try:
        run_rounds(coord, transport)
    except BaseException:
        log.exception("the federation failed")
        try:
            local_view(coord).finish("FAILED")
        except Exception:  # pragma: no cover - best effort
            log.exception("could not close the run after the failure")
        raise
