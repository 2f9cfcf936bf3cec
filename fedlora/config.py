"""The typed federation config: one frozen dataclass per Hydra config group, validated once when built.

``FedConfig.from_dict(plain)`` turns the plain dict Hydra composes (``compose`` below, or ``fedlora run``) into
typed groups; every value is checked by its group's ``__post_init__`` and every cross-group rule here, so a bad
override fails before any work starts with a ``ConfigError`` naming the real key and what is allowed. Each
allowed-value list lives once, beside the code that gives it meaning (strategies in ``aggregation``, optimizers
in ``task.train``, accountants in ``privacy.calibrate``, corpora in ``task.data``, the bitwidth ladder in
``aggregation.quant``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fedlora import aggregation
from fedlora.aggregation.base import WEIGHTINGS
from fedlora.aggregation.bitwidth import METHODS as BITWIDTH_METHODS
from fedlora.aggregation.quant import BITWIDTHS, check_bits
from fedlora.privacy.calibrate import DPSettings, check_dp_settings
from fedlora.schema import ConfigError, Group, boolean, choice, doc, number
from fedlora.task.data import DataSpec
from fedlora.task.model import ModelSpec, check_device_name
from fedlora.task.train import OPTIMIZERS

#: the Hydra config tree, shipped inside the package so an installed fedlora finds it
CONFIG_DIR = str(Path(__file__).parent / "configs")
RUNTIMES = ("local", "ray_cluster")


def compose(overrides: list[str] | None = None, *, choices: dict | None = None) -> dict:
    """The resolved config for Hydra ``overrides``, exactly as ``fedlora run`` composes it (a plain dict).
    ``choices``, when given, receives the option chosen for each config group."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []),
                            return_hydra_config=choices is not None)
    if choices is not None:
        choices.update({k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
                        if not k.startswith("hydra")})
        out = OmegaConf.to_container(cfg, resolve=False)
        out.pop("hydra")
        return OmegaConf.to_container(OmegaConf.create(out), resolve=True)
    return OmegaConf.to_container(cfg, resolve=True)


@dataclass(frozen=True)
class StrategyConfig(Group):
    """The ``strategy`` group: the aggregation strategy and the client optimizer it is run with."""

    KEY: ClassVar[str] = "strategy"

    name: str = doc("aggregation strategy (registered in fedlora.aggregation)", default="fedsvd")
    optimizer: str = doc(f"client optimizer, fresh each round: {list(OPTIMIZERS)}", default="adam")
    lr: float = doc("client learning rate (> 0); with sgd use ~0.5", default=0.01)
    train_head: bool = doc("train (and, unless personal, share) the classification head", default=True)
    weighting: str = doc(f"client weights p_k: {list(WEIGHTINGS)}", default="examples")
    params: dict[str, Any] = doc("strategy-specific parameters, e.g. svd_every for fedsvd", default_factory=dict)
    module: str | None = doc("a Python module to import first, which registers the strategy (a strategy of your "
                             "own); null for the built-in ones", default=None)

    def __post_init__(self) -> None:
        if self.module is not None:
            try:
                importlib.import_module(self.module)
            except Exception as e:  # noqa: BLE001 - any import failure is a config error naming the module
                raise ConfigError(self.key("module"),
                                  f"cannot import {self.module!r}: {type(e).__name__}: {e}") from None
        choice(self.key("name"), self.name, aggregation.available())
        choice(self.key("optimizer"), self.optimizer, OPTIMIZERS)
        number(self.key("lr"), self.lr, gt=0)
        boolean(self.key("train_head"), self.train_head)
        choice(self.key("weighting"), self.weighting, WEIGHTINGS)
        if not isinstance(self.params, dict):
            raise ConfigError(self.key("params"), f"got {self.params!r}; expected a mapping")
        try:
            self.create()
        except (TypeError, ValueError) as e:
            raise ConfigError(self.key("params"), str(e)) from None

    def create(self) -> aggregation.Strategy:
        """A fresh instance of the configured strategy (the clients' and the server's are built the same way)."""
        return aggregation.create(self.name, train_head=self.train_head, weighting=self.weighting, **self.params)


@dataclass(frozen=True)
class ClientsConfig(Group):
    """The ``clients`` group: the fleet, its sampling, and each client's local training plan."""

    KEY: ClassVar[str] = "clients"

    num: int = doc("number of clients (partitions)", default=10)
    per_round: int = doc("clients sampled per round (<= num)", default=2)
    min_reports: int = doc("a round with fewer accepted reports than this (declines by a spent privacy budget "
                           "count as answers) applies nothing and stops the run, resumable (<= per_round)",
                           default=1)
    local_steps: int = doc("optimizer steps per client per round (tau)", default=6)
    batch_size: int | None = doc("(expected) batch size; DP-SGD samples each record with q = batch_size / n_k. "
                                 "null when clients.sample_rate is set", default=32)
    sample_rate: float | None = doc("instead of a batch size: the fraction q of its records each client's batch "
                                    "holds (DP-SGD's Poisson rate; 1.0 = full batch), the same q for every "
                                    "client; null: q = batch_size / n_k", default=None)
    cpus: float = doc("CPUs per simulated client actor", default=1)
    gpus: float = doc("GPUs per simulated client actor (Flower's client_resources: 0.25 puts four clients on one "
                      "GPU); 0: clients train on CPU", default=0.0)
    device: str = doc("where clients train and evaluate: auto (CUDA when the client holds a GPU: clients.gpus > 0 "
                      "in simulation, a visible GPU on a real device), cpu, cuda or cuda:N", default="auto")
    actors: int | None = doc("simulated client actors of this federation; null: as many as the Ray cluster fits "
                             "(Flower's rule: its CPUs / cpus, GPUs / gpus), or in a parallel sweep its share of "
                             "them (that count / the points running at once)", default=None)
    bitwidths: dict[int, float] | None = doc(f"fleet mix {{bits: fraction}} over {list(BITWIDTHS)}, fractions "
                                             "summing to 1, e.g. '{32: 0.5, 4: 0.5}'; null: every client 32-bit",
                                             default=None)
    bitwidth_method: str = doc(f"mixed fleets: {list(BITWIDTH_METHODS)}", default="progressive")
    max_update_norm: float = doc("an uploaded delta with a larger L2 norm is rejected", default=1000.0)

    def __post_init__(self) -> None:
        num = number(self.key("num"), self.num, ge=1, integer=True)
        per_round = number(self.key("per_round"), self.per_round, ge=1, integer=True)
        if per_round > num:
            raise ConfigError(self.key("per_round"), f"got {per_round}; must be <= clients.num ({num})")
        min_reports = number(self.key("min_reports"), self.min_reports, ge=1, integer=True)
        if min_reports > per_round:
            raise ConfigError(self.key("min_reports"), f"got {min_reports}; must be <= clients.per_round "
                                                        f"({per_round})")
        number(self.key("local_steps"), self.local_steps, ge=1, integer=True)
        number(self.key("batch_size"), self.batch_size, ge=1, integer=True, optional=True)
        number(self.key("sample_rate"), self.sample_rate, gt=0, le=1, optional=True)
        if (self.batch_size is None) == (self.sample_rate is None):
            raise ConfigError(self.key("batch_size"),
                              "set exactly one of clients.batch_size and clients.sample_rate (the other null), "
                              f"got batch_size={self.batch_size}, sample_rate={self.sample_rate}")
        number(self.key("cpus"), self.cpus, gt=0)
        number(self.key("gpus"), self.gpus, ge=0)
        number(self.key("actors"), self.actors, ge=1, integer=True, optional=True)
        check_device_name(self.key("device"), self.device)
        if self.gpus > 0 and self.device == "cpu":
            raise ConfigError(self.key("gpus"), f"got {self.gpus:g} with clients.device=cpu: the GPUs would be "
                                                "reserved and never used; set clients.device=auto or clients.gpus=0")
        number(self.key("max_update_norm"), self.max_update_norm, gt=0)
        choice(self.key("bitwidth_method"), self.bitwidth_method, BITWIDTH_METHODS)
        object.__setattr__(self, "bitwidths", _fleet_mix(self.bitwidths))

    @property
    def mix(self) -> dict[int, float]:
        """The fleet mix as {bits: fraction}; an all-32-bit fleet when ``bitwidths`` is null."""
        return dict(self.bitwidths) if self.bitwidths is not None else {32: 1.0}

    @property
    def mixed(self) -> bool:
        return set(self.mix) != {32}


def _fleet_mix(mix: Any) -> dict[int, float] | None:
    key = "clients.bitwidths"
    if mix is None:
        return None
    if not isinstance(mix, dict) or not mix:
        raise ConfigError(key, f"got {mix!r}; expected a mapping such as '{{32: 0.5, 4: 0.5}}'")
    out: dict[int, float] = {}
    for b, f in mix.items():
        try:
            bits = check_bits(int(b) if isinstance(b, str) and b.strip().isdigit() else b, key="bitwidth")
        except ValueError:
            raise ConfigError(key, f"bitwidth {b!r} not in the ladder {list(BITWIDTHS)}") from None
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f >= 0:
            raise ConfigError(key, f"fraction {f!r} for {bits} bits must be a number >= 0")
        out[bits] = float(f)
    if abs(sum(out.values()) - 1.0) > 1e-6:
        raise ConfigError(key, f"fractions {out} must be >= 0 and sum to 1")
    return out


@dataclass(frozen=True)
class RuntimeConfig(Group):
    """The ``runtime`` group: where Ray runs (an embedded local instance, or an existing cluster)."""

    KEY: ClassVar[str] = "runtime"

    kind: str = doc(f"{list(RUNTIMES)}", default="local")
    address: str | None = doc("ray_cluster: the cluster address (auto, ray://host:10001, host:6379)",
                              default=None)
    num_cpus: float | None = doc("local: CPUs of the embedded Ray instance (also the coordinator's torch "
                                 "threads)", default=2)
    object_store_mb: int | None = doc("local: Ray object store size, MiB", default=512)
    memory_mb: int | None = doc("local: Ray's memory budget for tasks and actors, MiB", default=4096)
    torch_threads: int = doc("torch threads per client actor", default=1)
    connect_timeout_s: float = doc("how long to wait for a Ray cluster to attach and for client nodes to connect "
                                   "and answer the handshake", default=120.0)
    cache_dir: str | None = doc("where simulated clients and the server keep frozen-prefix activations; null: "
                                "<runs_root>/cache (shared by the runs under it)", default=None)
    device: str = doc("where the coordinator evaluates the global model: auto (CUDA when its process sees one), "
                      "cpu, cuda or cuda:N", default="auto")

    def __post_init__(self) -> None:
        choice(self.key("kind"), self.kind, RUNTIMES)
        if self.kind == "ray_cluster" and not self.address:
            raise ConfigError(self.key("address"), "runtime=ray_cluster needs an address (auto, "
                                                    "ray://host:10001, host:6379)")
        number(self.key("num_cpus"), self.num_cpus, gt=0, optional=True)
        number(self.key("object_store_mb"), self.object_store_mb, gt=0, integer=True, optional=True)
        number(self.key("memory_mb"), self.memory_mb, gt=0, integer=True, optional=True)
        number(self.key("torch_threads"), self.torch_threads, ge=1, integer=True)
        number(self.key("connect_timeout_s"), self.connect_timeout_s, gt=0)
        check_device_name(self.key("device"), self.device)


@dataclass(frozen=True)
class TrackingConfig(Group):
    """The ``tracking`` group: MLflow (one run per federation, step = round) or nothing."""

    KEY: ClassVar[str] = "tracking"

    enabled: bool = doc("record the federation in MLflow", default=True)
    uri: str | None = doc("any MLflow tracking URI; null: sqlite:///<abs runs_root>/mlflow.db", default=None)
    experiment: str = doc("MLflow experiment name", default="fedlora")

    def __post_init__(self) -> None:
        boolean(self.key("enabled"), self.enabled)
        if self.uri is not None and not isinstance(self.uri, str):
            raise ConfigError(self.key("uri"), f"got {self.uri!r}; expected a tracking URI or null")
        if not isinstance(self.experiment, str) or not self.experiment:
            raise ConfigError(self.key("experiment"), f"got {self.experiment!r}; expected a name")


@dataclass(frozen=True)
class FaultsConfig(Group):
    """The ``faults`` group: client faults injected into a *simulated* fleet, for tests and chaos runs. Each
    sampled client, each round, draws (seeded by ``seed``, the round and its id) one of: drop (no reply for
    ``hang_s``), crash (its ClientApp raises), kill (its actor process dies), straggle (replies after
    ``straggle_s``), or none."""

    KEY: ClassVar[str] = "faults"

    drop: float = doc("probability that a sampled client never replies (it hangs for hang_s)", default=0.0)
    crash: float = doc("probability that a sampled client's ClientApp raises", default=0.0)
    kill: float = doc("probability that a sampled client's actor process dies (SIGKILL)", default=0.0)
    straggle: float = doc("probability that a sampled client replies only after straggle_s", default=0.0)
    straggle_s: float = doc("a straggler's delay, seconds", default=0.0)
    hang_s: float = doc("how long a dropped client hangs, seconds", default=3600.0)
    seed: int = doc("seeds the draws", default=0)

    def __post_init__(self) -> None:
        for k in ("drop", "crash", "kill", "straggle"):
            number(self.key(k), getattr(self, k), ge=0, le=1)
        if self.drop + self.crash + self.kill + self.straggle > 1 + 1e-9:
            raise ConfigError(self.key("drop"), "faults.drop + crash + kill + straggle must be <= 1")
        number(self.key("straggle_s"), self.straggle_s, ge=0)
        number(self.key("hang_s"), self.hang_s, ge=0)
        number(self.key("seed"), self.seed, ge=0, integer=True)

    @property
    def active(self) -> bool:
        return self.drop + self.crash + self.kill + self.straggle > 0

    def draw(self, rnd: int, client_id: str) -> str | None:
        """The fault of ``client_id`` in round ``rnd`` (None: behaves), deterministic in (seed, round, id)."""
        if not self.active:
            return None
        import hashlib

        h = hashlib.blake2b(f"{self.seed}:{rnd}:{client_id}".encode(), digest_size=8).digest()
        u = int.from_bytes(h, "little") / 2**64
        for name in ("drop", "crash", "kill", "straggle"):
            u -= getattr(self, name)
            if u < 0:
                return name
        return None


@dataclass(frozen=True)
class DeployConfig(Group):
    """The ``deploy`` group: ``fedlora serve`` — where the devices reach the Fleet API and how the coordinator's
    TLS is set up (unused by ``fedlora run``)."""

    KEY: ClassVar[str] = "deploy"

    host: str = doc("interface the devices' Fleet API port listens on (the only port devices see)",
                    default="0.0.0.0")
    port: int = doc("the Fleet API port (TLS; only /v1/fleet/* and /health are forwarded; 0: any free port)",
                    default=9092)
    names: list[str] = doc("host names / IPs the devices dial, added to the generated server certificate's SANs "
                           "(127.0.0.1, localhost and ::1 are always in)", default_factory=list)
    tls_cert: str | None = doc("your server certificate (PEM); null: one is generated on first start", default=None)
    tls_key: str | None = doc("its private key", default=None)
    tls_ca: str | None = doc("the CA the devices verify it with", default=None)
    state_dir: str | None = doc("the deployment's lasting state (TLS, SuperLink database, enrollments); null: "
                                "<runs_root>/deploy", default=None)
    min_available: int | None = doc("devices (enrolled and online) to wait for before the run starts; null: "
                                    "clients.num", default=None)
    wait_timeout_s: float | None = doc("how long to wait for them; null: as long as it takes", default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(self.key("host"), f"got {self.host!r}; expected an interface address")
        number(self.key("port"), self.port, ge=0, le=65535, integer=True)
        if not isinstance(self.names, (list, tuple)) or not all(isinstance(n, str) and n for n in self.names):
            raise ConfigError(self.key("names"), f"got {self.names!r}; expected a list of host names, e.g. "
                                                 "deploy.names=[coord.example.org]")
        object.__setattr__(self, "names", list(self.names))
        number(self.key("min_available"), self.min_available, ge=1, integer=True, optional=True)
        number(self.key("wait_timeout_s"), self.wait_timeout_s, gt=0, optional=True)


_GROUPS: dict[str, type[Group]] = {
    "strategy": StrategyConfig,
    "model": ModelSpec,
    "data": DataSpec,
    "privacy": DPSettings,
    "clients": ClientsConfig,
    "runtime": RuntimeConfig,
    "tracking": TrackingConfig,
    "faults": FaultsConfig,
    "deploy": DeployConfig,
}


@dataclass(frozen=True)
class FedConfig:
    """A whole federation's config: the top-level keys and one typed object per group."""

    strategy: StrategyConfig
    model: ModelSpec
    data: DataSpec
    privacy: DPSettings
    clients: ClientsConfig
    runtime: RuntimeConfig
    tracking: TrackingConfig
    faults: FaultsConfig
    deploy: DeployConfig
    rounds: int = doc("federated rounds (> 0)", default=8)
    seed: int = doc("one seed drives the data split, partitions, LoRA/head init, client sampling", default=0)
    runs_root: str = doc("where run directories and the local MLflow store live", default="runs")
    eval_every: int = doc("server-side global evaluation every N rounds (and after the last round)", default=1)
    round_timeout_s: float = doc("a client that has not replied by then counts as dropped for that round",
                                 default=600)
    TOP: ClassVar[tuple[str, ...]] = ("rounds", "seed", "runs_root", "eval_every", "round_timeout_s")

    def __post_init__(self) -> None:
        number("rounds", self.rounds, gt=0, integer=True)
        number("seed", self.seed, ge=0, integer=True)
        number("eval_every", self.eval_every, gt=0, integer=True)
        number("round_timeout_s", self.round_timeout_s, gt=0)
        if not isinstance(self.runs_root, str) or not self.runs_root:
            raise ConfigError("runs_root", f"got {self.runs_root!r}; expected a folder")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FedConfig:
        """Build and validate from the plain dict Hydra composes (or a run directory's config.json)."""
        d = dict(d)
        unknown = sorted(set(d) - set(_GROUPS) - set(cls.TOP))
        if unknown:
            raise ConfigError(unknown[0], f"unknown key; the top-level keys are {sorted([*_GROUPS, *cls.TOP])}")
        groups = {}
        for name, group in _GROUPS.items():
            if name not in d:
                raise ConfigError(name, f"missing config group; choose one with `{name}=<option>`")
            groups[name] = group.from_dict(d[name])
        return cls(**groups, **{k: d[k] for k in cls.TOP if k in d})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name).to_dict() for name in _GROUPS}
        out.update({k: getattr(self, k) for k in self.TOP})
        return out


def check_client_sizes(cfg: FedConfig, train_sizes: list[int]) -> None:
    """The checks that need the clients' training-set sizes (known before training in simulation): batch <= n
    (with or without DP: a larger batch is refused, never silently clamped) and, under DP, δ < 1/n."""
    smallest = min(train_sizes)
    if smallest < 1:
        raise ConfigError("clients.num", f"a client would train on {smallest} records (sizes {sorted(train_sizes)[:5]}"
                                         "...): lower clients.num or raise data.alpha")
    batch = cfg.clients.batch_size
    if batch is not None and batch > smallest and not cfg.privacy.enabled:
        raise ConfigError("clients.batch_size", f"{batch} exceeds the smallest client's n={smallest} training "
                                                f"records; use clients.batch_size <= {smallest}, "
                                                "clients.sample_rate, or fewer clients (clients.num)")
    if cfg.privacy.enabled:
        try:
            check_dp_settings(cfg.privacy, n=smallest, batch_size=cfg.clients.batch_size)  # q <= 1 by construction
        except ConfigError as e:
            raise ConfigError(e.key, f"{e.message} (the smallest client has n_k={smallest} training records; "
                                     "fewer clients (clients.num) give bigger ones, or try another seed / "
                                     "data.alpha)") from None


def describe_keys(cfg: FedConfig) -> list[tuple[str, Any, str]]:
    """Every config key as (dotted key, its value in ``cfg``, its doc), in the order of the dataclasses."""
    import dataclasses

    out = [(f.name, getattr(cfg, f.name), f.metadata.get("help", "")) for f in dataclasses.fields(cfg)
           if f.name in FedConfig.TOP]
    for name in _GROUPS:
        group = getattr(cfg, name)
        out += [(f"{name}.{f.name}", getattr(group, f.name), f.metadata.get("help", ""))
                for f in dataclasses.fields(group) if not f.name.startswith("_")]
    return out


def group_options() -> dict[str, list[str]]:
    """Each config group's options (the yaml files under ``configs/<group>/``)."""
    root = Path(CONFIG_DIR)
    return {g: sorted(p.stem for p in (root / g).glob("*.yaml")) for g in _GROUPS}


def config_keys() -> list[str]:
    """Every dotted config key (top level and per group), from the typed groups."""
    import dataclasses

    return [*FedConfig.TOP, *(f"{g}.{f.name}" for g, cls in _GROUPS.items() for f in dataclasses.fields(cls))]
