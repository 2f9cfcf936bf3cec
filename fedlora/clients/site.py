"""Where a client's records and state live. A simulated client's site is bound into the simulation's ClientApp by
the process that starts the simulation (its partition of the server's data config, a state folder under the run
directory); it never travels in a message, so no client learns the partitioning or a server path."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config import FaultsConfig
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
    cache_dir: str | None = None  # the frozen-prefix activation cache (shared by the simulated clients)
    faults: FaultsConfig | None = None  # injected client faults (tests and chaos runs)

    def client_id(self, index: int) -> str:
        return CLIENT_ID_FMT.format(index)

    def records(self, index: int, labels: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
        """Client ``index``'s (train, validation) records as {"text", "label"} dicts (label ids)."""
        return client_split(self.data, self.num_clients, index, self.seed)

    def cache_key(self, index: int) -> str:
        return f"sim:{self.data!r}:{self.seed}:{self.num_clients}:{index}"


@dataclass(frozen=True)
class DeviceSite:
    """A real device (``fedlora client``): its own data file, read where it lies and never sent, and its own state
    folder. Its client id is the name it was enrolled under (the coordinator checks it against the registration)."""

    client: str
    data_path: str
    state_root: str
    text_column: str = "text"
    label_column: str = "label"
    val_fraction: float = 0.1
    seed: int = 0
    cache_dir: str | None = None

    def client_id(self, index: int) -> str:
        return self.client

    def records(self, index: int, labels: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
        """The device's (train, validation) records, labels mapped to the federation's label set; a label outside
        it, or a file that cannot be read, is a ``ConfigError`` naming the file (the device declines with it)."""
        import random

        from fedlora.schema import ConfigError
        from fedlora.task.data import read_table, split_sizes

        texts, raw = read_table(self.data_path, self.text_column, self.label_column, key="data-path")
        index_of = {name: i for i, name in enumerate(labels)}
        unknown = sorted(set(raw) - set(index_of))
        if unknown:
            raise ConfigError("data-path", f"{self.data_path}: labels {unknown[:5]} are not in the federation's label "
                                           f"set {list(labels)}; relabel them or leave those records out")
        records = [{"text": t, "label": index_of[y]} for t, y in zip(texts, raw)]
        if len(records) < 2:
            raise ConfigError("data-path", f"{self.data_path}: {len(records)} record(s); a device needs at least 2")
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        n_train, _ = split_sizes(len(records), self.val_fraction)
        return [records[i] for i in order[:n_train]], [records[i] for i in order[n_train:]]

    def cache_key(self, index: int) -> str:
        import os

        st = os.stat(self.data_path)
        return f"device:{self.data_path}:{st.st_size}:{st.st_mtime_ns}:{self.val_fraction}:{self.seed}"
