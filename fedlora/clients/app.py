"""The Flower ClientApp: the same code runs in simulation (Ray actors) and on a real SuperNode.

Messages (content format: ``fedlora.wire``):
* ``query``    — the handshake; reply ``info`` {client_id, index, n_train, n_val, held_version, ledger_steps}.
  Real devices answer it; simulated clients are registered from their partitions without it
  (``lifecycle.scalable_simulation``) unless Flower's node map is unknown.
* ``train``    — downlink tensors + meta; reply ``update`` (deltas of the shared keys, bit-packed for low-bit
  clients), ``metrics``, ``info``.
* ``evaluate`` — like train without training; reply ``metrics`` (personalised accuracy on the local split).

``make_client_app(site)`` builds the simulation's ClientApp with the simulated clients' site bound in (their
partitions and state folder, never sent in a message); node_config ``partition-id`` picks the client.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import ClassVar

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora import wire
from fedlora.clients import worker
from fedlora.clients.site import SimulatedSite
from fedlora.clients.state import ClientStore
from fedlora.env import quiet_logs
from fedlora.federation import ClientSpec


def inject(faults, rnd: int, client_id: str, state_root: Path) -> None:
    """The fault ``faults`` draws for this client and round (simulation only): hang, raise, die or delay. A killed
    client's process dies once per round; if the message is re-sent (the transport retries messages that met a
    restarting actor) the client fails by raising, so a kill costs exactly that client."""
    fault = faults.draw(rnd, client_id)
    if fault == "crash":
        raise RuntimeError(f"injected crash (faults.crash) of {client_id} in round {rnd}")
    if fault == "kill":
        marker = state_root / ".faults" / f"killed-{rnd}-{client_id}"
        if marker.exists():
            raise RuntimeError(f"injected kill (faults.kill) of {client_id} in round {rnd}: already died once")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if fault in ("drop", "straggle"):
        time.sleep(faults.hang_s if fault == "drop" else faults.straggle_s)


def actor_pid_files(state_root: Path) -> list[Path]:
    """The processes that served this simulation's clients: each registers itself (``.actors/<pid>``), and the
    file says which client it is busy with (empty when idle)."""
    return sorted((state_root / ".actors").glob("[0-9]*"))


def _busy(state_root: Path, client_id: str) -> None:
    marker = state_root / ".actors" / str(os.getpid())
    if not marker.exists():
        _register_node(state_root)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(client_id)


def _register_node(state_root: Path) -> None:
    """Record which Ray node this actor process runs on (``.nodes/<pid>``: the run's placement report)."""
    import ray

    if ray.is_initialized():
        f = state_root / ".nodes" / str(os.getpid())
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(ray.get_runtime_context().get_node_id())


def actor_nodes(state_root: Path) -> dict[str, int]:
    """Ray node id -> how many client actor processes ran there."""
    out: dict[str, int] = {}
    for f in sorted((state_root / ".nodes").glob("[0-9]*")):
        node = f.read_text().strip()
        out[node] = out.get(node, 0) + 1
    return out


_QUIETED = False


def _quiet_once() -> None:
    """Library log levels and warning filters in this (actor) process, once: setting them on every message cost
    ~1 ms each (``warnings.filterwarnings`` rebuilds the filter list)."""
    global _QUIETED
    if not _QUIETED:
        quiet_logs()  # the actor process imported Flower (its logger at DEBUG) before the first message came
        _QUIETED = True


class SimulationApp:
    """What Flower's simulation sends a client actor with every message to load the ClientApp from (its Ray
    backend calls ``app_fn()`` in the actor for each message). Flower's own ``app_fn`` is a closure over the
    ClientApp, which Ray's cloudpickle pickles by value for every message — walking ``sys.modules`` for each of
    its functions, ~4 ms per message on the driver's thread (py-spy: more than half of the driver's samples at 100
    clients per round). This object pickles by reference (a module-level class and the site's fields) and builds the
    ClientApp once per process (``lifecycle.scalable_simulation`` hands it to Flower)."""

    _apps: ClassVar[dict[SimulatedSite, ClientApp]] = {}

    def __init__(self, site: SimulatedSite) -> None:
        self.site = site

    def __call__(self) -> ClientApp:
        app = self._apps.get(self.site)
        if app is None:
            if len(self._apps) >= 8:  # a long-lived process that served many simulations: keep the latest
                self._apps.clear()
            app = self._apps[self.site] = make_client_app(self.site)
        return app


def make_client_app(site: SimulatedSite) -> ClientApp:
    """The simulation ClientApp: node ``partition-id`` is client ``index`` of ``site``."""
    app = ClientApp()

    def setup(msg: Message, context: Context):
        _quiet_once()  # in the actor process: Flower's end-of-run termination warning, library INFO lines
        site.check_shared()  # before any client state is read or created
        spec_d, meta, payload = wire.read_request(msg.content)
        spec = ClientSpec.from_dict(spec_d)
        index = int(context.node_config["partition-id"])
        _busy(Path(site.state_root), site.client_id(index))
        ctx = worker.context(spec, site, index)
        return ctx, ClientStore(site.state_root, ctx.client_id), meta, payload

    def done(reply: Message) -> Message:
        _busy(Path(site.state_root), "")
        return reply

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        ctx, store, _, _ = setup(msg, context)
        return done(Message(wire.reply(info=worker.hello(ctx, store)), reply_to=msg))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        t0 = time.perf_counter()
        if site.faults is not None:  # before the client's model and data load: a fault costs no start-up
            site.check_shared()
            cid = site.client_id(int(context.node_config["partition-id"]))
            _busy(Path(site.state_root), cid)
            inject(site.faults, int(wire.read_request(msg.content)[1]["round"]), cid, Path(site.state_root))
        ctx, store, meta, payload = setup(msg, context)
        upload, metrics, info = worker.train(ctx, store, payload, meta)
        metrics = {**metrics, "handler_s": time.perf_counter() - t0}  # training is metrics["client_s"] of this
        return done(Message(wire.reply(info=info, metrics=metrics, update=upload), reply_to=msg))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        ctx, store, meta, payload = setup(msg, context)
        metrics = worker.evaluate(ctx, store, payload, meta)
        return done(Message(wire.reply(info={"client_id": ctx.client_id}, metrics=metrics), reply_to=msg))

    return app
