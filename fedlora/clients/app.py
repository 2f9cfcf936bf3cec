"""The Flower ClientApp: the same code runs in simulation (Ray actors) and on a real SuperNode.

Messages (content format: ``fedlora.wire``):
* ``query``    — the handshake; reply ``info`` {client_id, index, n_train, n_val, held_version}.
* ``train``    — downlink tensors + meta; reply ``update`` (deltas of the shared keys, bit-packed for low-bit
  clients), ``metrics``, ``info``.
* ``evaluate`` — like train without training; reply ``metrics`` (personalised accuracy on the local split).

``make_client_app(site)`` builds the simulation's ClientApp with the simulated clients' site bound in (their
partitions and state folder, never sent in a message); node_config ``partition-id`` picks the client.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora import wire
from fedlora.clients import worker
from fedlora.clients.site import SimulatedSite
from fedlora.clients.state import ClientStore
from fedlora.federation import ClientSpec


def make_client_app(site: SimulatedSite) -> ClientApp:
    """The simulation ClientApp: node ``partition-id`` is client ``index`` of ``site``."""
    app = ClientApp()

    def setup(msg: Message, context: Context):
        spec_d, meta, payload = wire.read_request(msg.content)
        spec = ClientSpec.from_dict(spec_d)
        index = int(context.node_config["partition-id"])
        ctx = worker.context(spec, site, index)
        return ctx, ClientStore(site.state_root, ctx.client_id), meta, payload

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        ctx, store, _, _ = setup(msg, context)
        return Message(wire.reply(info=worker.hello(ctx, store)), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        ctx, store, meta, payload = setup(msg, context)
        upload, metrics, info = worker.train(ctx, store, payload, meta)
        return Message(wire.reply(info=info, metrics=metrics, update=upload), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        ctx, store, meta, payload = setup(msg, context)
        metrics = worker.evaluate(ctx, store, payload, meta)
        return Message(wire.reply(info={"client_id": ctx.client_id}, metrics=metrics), reply_to=msg)

    return app
