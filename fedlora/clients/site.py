"""Where a client's records and state live. A simulated client's site is bound into the simulation's ClientApp by
the process that starts the simulation (its partition of the server's data config, a state folder under the run
directory); it never travels in a message, so no client learns the partitioning or a server path."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.task.data import DataSpec, client_split

CLIENT_ID_FMT = "client-{:03d}"


@dataclass(frozen=True)
class SimulatedSite:
    """Simulated clients: client ``index`` holds partition ``index`` of ``data`` (split by ``seed`` into
    ``num_clients`` partitions) and keeps its state in ``state_root/<client id>``."""

    data: DataSpec
    seed: int
    num_clients: int
    state_root: str

    def client_id(self, index: int) -> str:
        return CLIENT_ID_FMT.format(index)

    def records(self, index: int) -> tuple[list[dict], list[dict]]:
        """Client ``index``'s (train, validation) records as {"text", "label"} dicts."""
        return client_split(self.data, self.num_clients, index, self.seed)

    def cache_key(self, index: int) -> str:
        return f"sim:{self.data!r}:{self.seed}:{self.num_clients}:{index}"
