"""A federation's lifecycle — the composition root, and the only module that imports both the coordinator and
the ClientApp: check the config against the data, place the coordinator on Ray, run Flower's simulation engine
(or, for benchmarks, the same round loop over in-process calls), report."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from pathlib import Path

from fedlora.clients import worker
from fedlora.clients.app import actor_pid_files
from fedlora.clients.site import SimulatedSite
from fedlora.clients.state import ClientStore
from fedlora.config import FedConfig, check_client_sizes
from fedlora.coordinator.core import CHECKPOINT, COORDINATOR_NODE, Coordinator, check_resumable, read_checkpoint
from fedlora.coordinator.observers import ConsoleObserver
from fedlora.coordinator.records import Downlink
from fedlora.coordinator.rounds import run_rounds
from fedlora.env import OFFLINE_ENV, apply_offline_env, quiet_logs
from fedlora.federation import ClientSpec
from fedlora.runs import DRIVER_PID
from fedlora.schema import ConfigError
from fedlora.task.data import label_names, partition_sizes
from fedlora.task.model import check_model_source

log = logging.getLogger("fedlora.run")

CONFIG_JSON = "config.json"
#: created exclusively when a run takes its directory: a run directory belongs to one run
RUN_MARKER = "fedlora-run.json"


def _taken(run_dir: Path) -> ConfigError:
    return ConfigError("hydra.run.dir", f"{run_dir} already holds a fedlora run; `fedlora run` never reuses a run "
                                        f"directory: continue that run with `fedlora resume {run_dir}`, or leave "
                                        "hydra.run.dir to its default (a new directory per run)")


def check_run_dir_free(run_dir: Path) -> None:
    """Refuse a run directory that holds a run already."""
    if any((run_dir / n).exists() for n in (RUN_MARKER, CONFIG_JSON, "checkpoint.pt")):
        raise _taken(run_dir)


def claim_run_dir(run_dir: Path) -> None:
    """Take ``run_dir`` for a new run, or refuse (``fedlora run`` never reuses a run directory). The marker is
    created exclusively, so of two launches racing for one directory exactly one proceeds."""
    check_run_dir_free(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(run_dir / RUN_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise _taken(run_dir) from None
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "started": time.time()}, f)


def prepare(cfg: FedConfig, *, simulated: bool = True) -> list[str]:
    """Every check that needs the data or the model files (the model resolves offline, the data parses and has
    at least two classes; in simulation, the partitioning is feasible and the clients' sizes pass the batch and
    privacy checks — real devices check their own); returns the label names. Raises ``ConfigError`` naming the
    key before any engine starts."""
    check_model_source(cfg.model)
    labels = label_names(cfg.data, cfg.seed)
    if len(labels) < 2:
        raise ConfigError("data.label_column", f"the data has {len(labels)} class ({labels}): a classifier needs at "
                                               "least two")
    if simulated:
        check_client_sizes(cfg, partition_sizes(cfg.data, cfg.clients.num, cfg.seed))
        check_devices(cfg)
    return labels


def check_devices(cfg: FedConfig) -> None:
    """On the embedded runtime this machine is the cluster: a device setting or a GPU request it cannot meet
    fails now, naming the key, instead of leaving actors waiting forever for a GPU Ray does not have."""
    import torch

    from fedlora.task.model import resolve_device

    if cfg.runtime.kind != "local":
        return  # the cluster's nodes, not this one, hold the GPUs: Ray places the actors that asked for them
    resolve_device(cfg.runtime.device, key="runtime.device")
    resolve_device(cfg.clients.device, key="clients.device", gpu_held=cfg.clients.gpus > 0)
    if cfg.clients.gpus > 0 and not torch.cuda.is_available():
        raise ConfigError("clients.gpus", f"got {cfg.clients.gpus:g} but this machine has no CUDA GPU "
                                          "(torch.cuda.is_available() is False): set clients.gpus=0")


INSECURE_NOISE_WARNING = ("WARNING: privacy.noise=seeded-insecure: DP noise and sampling are derived from the run's "
                          "seed, so anyone who knows the config can remove the noise — NO privacy. Tests and "
                          "benchmarks only; it is recorded in summary.json, the privacy report and MLflow.")


def _announce(cfg: FedConfig, echo) -> None:
    if cfg.privacy.enabled and cfg.privacy.noise != "csprng":
        log.warning(INSECURE_NOISE_WARNING)
        echo(INSECURE_NOISE_WARNING)


def simulated_site(cfg: FedConfig, run_dir: Path, shared_token: str | None = None) -> SimulatedSite:
    return SimulatedSite(data=cfg.data, seed=cfg.seed, num_clients=cfg.clients.num,
                         state_root=str(run_dir / "clients"), cache_dir=str(activation_cache_dir(cfg)),
                         faults=cfg.faults if cfg.faults.active else None, shared_token=shared_token)


def write_shared_token(state_root: Path) -> str:
    """A fresh file under the clients' state folder; a node whose clients cannot see it has no shared storage."""
    import uuid

    name = f".shared-{uuid.uuid4().hex}"
    state_root.mkdir(parents=True, exist_ok=True)
    (state_root / name).write_text(str(os.getpid()))
    return name


def activation_cache_dir(cfg: FedConfig) -> Path:
    """Where simulated clients and the server keep frozen-prefix activations: shared by every run under the
    runs root (an entry is keyed by model, data and k, so runs of a sweep reuse each other's)."""
    return Path(cfg.runtime.cache_dir or Path(cfg.runs_root) / "cache").resolve()


def read_personal(state_root: str, client_id: str):
    """A simulated client's personal tensors (FedSA-LoRA's reference-global oracle reads them from disk)."""
    return ClientStore(state_root, client_id).load_personal() or None


def _coordinator_args(cfg: FedConfig, run_dir: Path) -> dict:
    return dict(personal_states=functools.partial(read_personal, str(run_dir / "clients")),
                cache_dir=str(activation_cache_dir(cfg)))


def _write_config(cfg: FedConfig, run_dir: Path) -> None:
    from omegaconf import OmegaConf

    plain = cfg.to_dict()
    (run_dir / CONFIG_JSON).write_text(json.dumps(plain, indent=2, sort_keys=True))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(plain)))))


def load_run_config(run_dir: str | os.PathLike, overrides: list[str] = ()) -> FedConfig:
    """A run directory's config, with ``overrides`` (``key=value``) of resumable keys only (``RESUMABLE``)."""
    import yaml

    from fedlora.coordinator.core import RESUMABLE

    p = Path(run_dir) / CONFIG_JSON
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: is {run_dir} a fedlora run directory?")
    d = json.loads(p.read_text())
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq or not key:
            raise ConfigError(o, "expected key=value")
        if not any(key == r or key.startswith(r + ".") for r in RESUMABLE):
            raise ConfigError(key, f"cannot change on resume: a resumed federation is the same federation; only "
                                   f"{list(RESUMABLE)} may change (privacy never does)")
        *parents, last = key.split(".")
        node = d
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return FedConfig.from_dict(d)


def check_reachable(address: str, timeout_s: float) -> None:
    """A ``host:port`` / ``ray://host:port`` cluster address answers a TCP connect, or a ConfigError naming it."""
    import socket

    hostport = address.split("://", 1)[-1]
    if address == "auto" or ":" not in hostport:
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as e:
        raise ConfigError("runtime.address", f"cannot reach a Ray cluster at {address!r} ({type(e).__name__}: {e});"
                                             " start one (ray start --head) or fix runtime.address") from None


def _ray_init(cfg: FedConfig) -> None:
    import ray

    rt = cfg.runtime
    runtime_env = {"env_vars": {**OFFLINE_ENV, "FEDLORA_TORCH_THREADS": str(rt.torch_threads)}}
    if ray.is_initialized():
        return
    if rt.kind == "ray_cluster":
        check_reachable(rt.address, rt.connect_timeout_s)
        box: dict = {}

        def attach() -> None:
            try:
                ray.init(address=rt.address, runtime_env=runtime_env, logging_level=logging.WARNING)
            except BaseException as e:  # noqa: BLE001 - reported below, with the address
                box["error"] = e

        t = threading.Thread(target=attach, daemon=True, name="fedlora-ray-attach")
        t.start()
        t.join(rt.connect_timeout_s)
        if t.is_alive() or "error" in box:
            why = box.get("error") or f"no answer within runtime.connect_timeout_s={rt.connect_timeout_s:g}s"
            raise ConfigError("runtime.address", f"cannot attach to the Ray cluster at {rt.address!r}: {why}")
        return
    if rt.kind == "local":
        ray.init(
            address="local",
            num_cpus=int(rt.num_cpus),
            object_store_memory=int(rt.object_store_mb) * 1024 * 1024,
            _memory=int(rt.memory_mb) * 1024 * 1024,
            include_dashboard=False,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            configure_logging=True,
        )


def run_federation(cfg: FedConfig, run_dir: str | os.PathLike, *, parent_run_id: str | None = None,
                   echo=print, concurrent: int = 1) -> dict:
    """Run (or resume, when ``run_dir`` holds a checkpoint) one federation through Flower on Ray.
    ``concurrent``: how many federations (a parallel sweep's points) run at once on this machine or cluster;
    unless ``clients.actors`` says otherwise, this one's client actors are its share of what the cluster fits."""
    apply_offline_env()
    quiet_logs()  # before importing Flower: it imports alembic, which logs its plugins at INFO on import
    import ray
    from flwr.simulation import run_simulation

    from fedlora.clients.app import SimulationApp
    from fedlora.coordinator.server_app import make_server_app

    quiet_logs()  # again: importing Flower set its own logger to DEBUG
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = prepare(cfg)
    if (run_dir / CHECKPOINT).exists():  # a resume: an unreadable checkpoint is named before Ray starts
        check_resumable(read_checkpoint(run_dir / CHECKPOINT).get("config"), cfg.to_dict(), run_dir / CHECKPOINT)
    _announce(cfg, echo)
    _write_config(cfg, run_dir)

    driver = run_dir / DRIVER_PID  # `fedlora ls` shows the run as running while this process lives
    driver.write_text(str(os.getpid()))
    console = ConsoleObserver(rounds=cfg.rounds, privacy=cfg.privacy.enabled, echo=echo)
    _ray_init(cfg)
    cpus = ray.cluster_resources().get("CPU", 0)
    where = "local" if cfg.runtime.kind == "local" else f"attached to {cfg.runtime.address}"
    console.on_start(f"Ray ready ({where}, {len(ray.nodes())} node(s), {cpus:g} CPUs); building the model and "
                     "the clients")
    coord = place_coordinator(ray, f"coordinator-{run_dir.name}").remote(
        cfg, labels, str(run_dir), parent_run_id, **_coordinator_args(cfg, run_dir))
    outcome: dict = {}
    done = threading.Event()
    site = simulated_site(cfg, run_dir, write_shared_token(run_dir / "clients"))
    partitions: dict[int, int] = {}  # Flower's node id -> partition id, as its simulation registers the nodes
    server_app = make_server_app(coord, num_nodes=cfg.clients.num, timeout_s=cfg.round_timeout_s,
                                 connect_timeout_s=cfg.runtime.connect_timeout_s, outcome=outcome,
                                 observers=[console], on_done=done.set,
                                 on_abandon=functools.partial(release_actors, run_dir / "clients"),
                                 roster=functools.partial(simulated_roster, site, partitions,
                                                          cfg.runtime.connect_timeout_s))
    # Ray restarts a client actor that dies (its in-flight message fails: that client's contribution, not the
    # round); Flower passes client_resources on to the actor's options.
    backend_config = {"client_resources": {"num_cpus": float(cfg.clients.cpus), "num_gpus": float(cfg.clients.gpus),
                                           "max_restarts": -1, "max_task_retries": 0}, "init_args": {}}
    placement = cluster_placement(ray)
    watchdog = threading.Thread(target=_release_hung_actors, args=(done, Path(site.state_root)), daemon=True)
    watchdog.start()
    try:
        app_fn = SimulationApp(site)
        with scalable_simulation(partitions, app_fn), sized_actor_pool(cfg.clients.actors, concurrent):
            run_simulation(
                server_app=server_app,
                client_app=app_fn(),
                num_supernodes=cfg.clients.num,
                backend_name="ray",
                backend_config=backend_config,
            )
    finally:
        done.set()
        if ray.is_initialized():
            ray.shutdown()
        try:
            report_placement(placement, run_dir, echo)
        except Exception:  # noqa: BLE001 - a report must not hide the federation's own outcome or error
            log.exception("could not write %s", run_dir / PLACEMENT)
        driver.unlink(missing_ok=True)
    if "error" in outcome:
        raise RuntimeError(f"federation failed: {outcome['error']}") from outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError(f"federation ended without a result; see the log above and {run_dir}")
    return outcome["summary"]


@contextlib.contextmanager
def scalable_simulation(partitions: dict[int, int], app_fn=None):
    """Flower's simulation engine (flwr 1.41, ``vce_api``) made independent of the number of idle nodes, for as
    long as the block runs:

    * record which partition each node is: the simulation gives its nodes random ids and keeps the node id ->
      partition id map it makes (``_register_nodes``) to itself (it reaches the ClientApp only as
      ``node_config["partition-id"]``); knowing it, the coordinator registers every client without a message;
    * poll only the nodes that have a message waiting: Flower's ``add_messages_to_queue`` asks the link state
      for every registered node, every 0.1 s, and each ask scans every stored message — with 10,000 nodes and a
      round's 100 messages a million checks per pass, one core busy all round. The delivery itself stays
      Flower's (``get_message_ins``: expiry, federation, delivered marks);
    * with ``app_fn`` (``clients.app.SimulationApp``), ship that to the client actors with each message instead of
      Flower's closure over the ClientApp (pickled by value for every message: ~4 ms of the driver's thread).

    If Flower ever stops calling these functions, ``partitions`` stays empty (the handshake falls back to asking
    every node) and the poll is Flower's own."""
    from flwr.server.superlink.fleet.vce import vce_api

    register_nodes, add_messages, run_api = vce_api._register_nodes, vce_api.add_messages_to_queue, vce_api.run_api

    def run_with_app(flower_app_fn, *args, **kwargs):
        return run_api(app_fn if app_fn is not None else flower_app_fn, *args, **kwargs)

    def register(num_nodes, state_factory):
        mapping = register_nodes(num_nodes, state_factory)
        partitions.update(mapping)
        return mapping

    def poll_pending(state, queue, nodes_mapping, f_stop):
        store, lock = getattr(state, "message_ins_store", None), getattr(state, "lock", None)
        if store is None or lock is None:  # not the in-memory link state this was written against
            return add_messages(state, queue, nodes_mapping, f_stop)
        while not f_stop.is_set():
            with lock:
                waiting = {m.metadata.dst_node_id for m in store.values() if not m.metadata.delivered_at}
            for node_id in waiting & nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(0.1)
        return None

    vce_api._register_nodes, vce_api.add_messages_to_queue, vce_api.run_api = register, poll_pending, run_with_app
    try:
        yield partitions
    finally:
        vce_api._register_nodes, vce_api.add_messages_to_queue, vce_api.run_api = register_nodes, add_messages, run_api


@contextlib.contextmanager
def sized_actor_pool(actors: int | None, concurrent: int = 1):
    """Flower's actor pool (flwr 1.41, ``ray_actor.BasicActorPool``) sized for this federation rather than for
    the whole cluster: ``actors`` of them (``clients.actors``), or, when ``concurrent`` federations share the
    cluster, ``fits // concurrent`` (at least one). Never more than fit: an actor the cluster cannot place stays
    pending, and a message Flower hands it waits — with two federations each holding half the cluster and
    waiting on a pending actor, until the round times out. The count is logged."""
    if actors is None and concurrent <= 1:
        yield
        return
    from flwr.simulation.ray_transport import ray_actor

    fits = ray_actor.pool_size_from_resources

    def sized(client_resources):
        most = fits(client_resources)
        n = min(actors, most) if actors is not None else max(1, most // concurrent)
        why = (f"clients.actors={actors}" if actors is not None
               else f"its share of the cluster's {most} with {concurrent} federations at once")
        log.info("%d client actor(s) for this federation (%s%s)", n, why,
                 f"; {actors} do not fit" if actors is not None and actors > most else "")
        return n

    ray_actor.pool_size_from_resources = sized
    try:
        yield
    finally:
        ray_actor.pool_size_from_resources = fits


def simulated_roster(site: SimulatedSite, partitions: dict[int, int], wait_s: float = 30.0) -> dict[int, dict]:
    """{node id: hello} of every simulated client, from its partition's sizes: no message, no records loaded
    (a client tokenises its data when it is first sampled). Waits for Flower to finish registering the nodes
    (the grid lists them one by one before the map is complete); {} if it never does."""
    deadline = time.monotonic() + wait_s
    while len(partitions) < site.num_clients and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(partitions) < site.num_clients:
        return {}
    return {nid: site.hello(index) for nid, index in partitions.items()}


PLACEMENT = "placement.json"


def place_coordinator(ray, name: str, namespace: str = "fedlora"):
    """The coordinator actor, pinned to the driver's node: it writes the run directory (checkpoints, summary,
    adapter) that the driver and the user read there, and it shares the driver's fate anyway — the driver runs
    Flower's round loop, so a dead driver ends the federation and ``fedlora resume`` restarts both from the
    checkpoint. (A detached coordinator outliving its driver would only hold state nobody drives.)"""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return ray.remote(num_cpus=0, max_restarts=0)(Coordinator).options(
        name=name, namespace=namespace, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False))


def cluster_placement(ray) -> dict:
    """The cluster's nodes and the driver's (asked before the simulation, which ends Ray)."""
    return {"driver_node": ray.get_runtime_context().get_node_id(),
            "cluster_nodes": {n["NodeID"]: n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}}


def report_placement(placement: dict, run_dir: Path, echo) -> None:
    """Where the run's processes ran (``placement.json``): the coordinator's node and the client actors' nodes."""
    from fedlora.clients.app import actor_nodes

    clients = actor_nodes(run_dir / "clients")
    nodes = placement["cluster_nodes"]
    node_file = run_dir / COORDINATOR_NODE
    report = {**placement, "client_actor_nodes": clients,
              "coordinator_node": node_file.read_text().strip() if node_file.exists() else None}
    (run_dir / PLACEMENT).write_text(json.dumps(report, indent=2, sort_keys=True))
    if len(nodes) > 1:
        echo(f"placement: coordinator on the driver's node; client actors on {len(clients)} of {len(nodes)} Ray "
             f"nodes ({', '.join(f'{n[:8]}: {k}' for n, k in sorted(clients.items()))}); see {PLACEMENT}")


def release_actors(state_root: Path, client_ids: set[str] | None = None) -> list[int]:
    """Kill the simulation's client actors busy with ``client_ids`` (any busy one when None): an abandoned
    straggler or a hung client would otherwise hold its actor, and Flower's pool, forever. Ray restarts them.
    Only processes this run's ClientApp registered are touched."""
    import signal

    killed = []
    for f in actor_pid_files(state_root):
        try:
            busy = f.read_text().strip()
            if busy and (client_ids is None or busy in client_ids):
                os.kill(int(f.name), signal.SIGKILL)
                killed.append(int(f.name))
        except (OSError, ValueError):
            pass
    if killed:
        log.warning("released %d client actor(s) busy with abandoned clients: %s", len(killed), killed)
    return killed


def _release_hung_actors(done: threading.Event, state_root: Path, grace_s: float = 15.0) -> None:
    """Once the federation is over, any client actor still busy would keep Flower's simulation waiting forever."""
    done.wait()
    time.sleep(grace_s)
    release_actors(state_root)


class InProcessTransport:
    """The round loop's transport as direct calls into the client worker, one client after another, in this
    process: for benchmarks and sweeps that compare aggregation methods many times on a 2-core box (the product
    path, ``fedlora run``, always goes through Flower on Ray). A client that raises costs its contribution, as
    in Flower."""

    def __init__(self, site: SimulatedSite) -> None:
        self.site = site

    def _client(self, spec: str, index: int):
        ctx = worker.context(ClientSpec.from_dict(json.loads(spec)), self.site, index)
        return ctx, ClientStore(self.site.state_root, ctx.client_id)

    def handshake(self, spec: str) -> dict[int, dict]:
        return {i: self.site.hello(i) for i in range(self.site.num_clients)}

    def exchange(self, kind: str, spec: str, messages: list[Downlink]) -> list[dict]:
        out = []
        for m in messages:
            try:
                ctx, store = self._client(spec, m.node_id)
                if kind == "train":
                    up, metrics, info = worker.train(ctx, store, m.tensors, m.meta)
                    res = {"update": up, "metrics": metrics, "info": info}
                else:
                    res = {"metrics": worker.evaluate(ctx, store, m.tensors, m.meta), "info": {}}
            except Exception as e:  # noqa: BLE001 - a failing client costs its contribution, as in Flower
                out.append({"node_id": m.node_id, "error": f"{type(e).__name__}: {e}"})
                continue
            out.append({"node_id": m.node_id, "error": None, **res})
        return out


def run_inprocess(cfg: FedConfig, run_dir: str | os.PathLike, *, echo=print) -> dict:
    """The same coordinator, round loop and client code as ``run_federation``, without Flower or Ray."""
    apply_offline_env()
    quiet_logs()
    run_dir = Path(run_dir)
    labels = prepare(cfg)
    _announce(cfg, echo)
    coord = Coordinator(cfg, labels, str(run_dir), **_coordinator_args(cfg, run_dir))
    console = ConsoleObserver(rounds=cfg.rounds, privacy=cfg.privacy.enabled, echo=echo)
    return run_rounds(coord, InProcessTransport(simulated_site(cfg, run_dir)), [console])
