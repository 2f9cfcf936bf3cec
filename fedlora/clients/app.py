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


def make_client_app(site: SimulatedSite) -> ClientApp:
    """The simulation ClientApp: node ``partition-id`` is client ``index`` of ``site``."""
    app = ClientApp()

    def setup(msg: Message, context: Context):
        quiet_logs()  # in the actor process (the app is unpickled there): its end-of-run termination warning
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
        if site.faults is not None:  # before the client's model and data load: a fault costs no start-up
            site.check_shared()
            cid = site.client_id(int(context.node_config["partition-id"]))
            _busy(Path(site.state_root), cid)
            inject(site.faults, int(wire.read_request(msg.content)[1]["round"]), cid, Path(site.state_root))
        ctx, store, meta, payload = setup(msg, context)
        upload, metrics, info = worker.train(ctx, store, payload, meta)
        return done(Message(wire.reply(info=info, metrics=metrics, update=upload), reply_to=msg))

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        ctx, store, meta, payload = setup(msg, context)
        metrics = worker.evaluate(ctx, store, payload, meta)
        return done(Message(wire.reply(info={"client_id": ctx.client_id}, metrics=metrics), reply_to=msg))

    return app
