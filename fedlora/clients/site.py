"""Where a client's records and state live. A simulated client's site is bound into the simulation's ClientApp by
the process that starts the simulation (its partition of the server's data config, a state folder under the run
directory); it never travels in a message, so no client learns the partitioning or a server path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
    #: a file the launching process wrote under state_root: a Ray node that cannot see it does not share the
    #: run's storage, and its clients refuse to touch state (a fresh local ledger would forget spent privacy)
    shared_token: str | None = None
    #: a simulated client holds a GPU only when its actor reserved one (clients.gpus > 0)
    simulated: ClassVar[bool] = True

    def client_id(self, index: int) -> str:
        return CLIENT_ID_FMT.format(index)

    def check_shared(self) -> None:
        """Fail closed on a node that does not see the run's state folder (a Ray cluster without shared storage)."""
        if self.shared_token is not None and not (Path(self.state_root) / self.shared_token).exists():
            import socket

            raise RuntimeError(f"host {socket.gethostname()} does not see the run's client state folder "
                               f"{self.state_root}: on a Ray cluster the runs root (runs_root) must be storage every "
                               "node mounts (NFS, a shared volume); this client refuses to train without its ledger")

    def records(self, index: int, labels: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
        """Client ``index``'s (train, validation) records as {"text", "label"} dicts (label ids)."""
        return client_split(self.data, self.num_clients, index, self.seed)

    def cache_key(self, index: int) -> str:
        return f"sim:{self.data!r}:{self.seed}:{self.num_clients}:{index}"

    def hello(self, index: int) -> dict:
        """Client ``index``'s registration from its partition's sizes (no records loaded, no message). It says
        nothing of the client's ledger: the floor every train message carries lets the client check that."""
        from fedlora.task.data import partition_counts

        n_train, n_val = partition_counts(self.data, self.num_clients, self.seed)[index]
        return {"client_id": self.client_id(index), "index": index, "n_train": n_train, "n_val": n_val}


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
    simulated: ClassVar[bool] = False  # a real device: its own GPU, when it has one, is its to use

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
