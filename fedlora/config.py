"""Validation of the composed Hydra config: every bad value is refused before any work starts."""

from __future__ import annotations

from typing import Any

from fedlora.aggregation.bitwidth import METHODS as BITWIDTH_METHODS
from fedlora.aggregation.quant import BITWIDTHS
from fedlora.clients.trainer import OPTIMIZERS
from fedlora.privacy.calibrate import ACCOUNTANTS, GRAD_SAMPLE_MODES

RUNTIMES = ("local", "ray_cluster")


def compose(overrides: list[str] | None = None) -> dict:
    """The resolved config for Hydra ``overrides``, exactly as ``fedlora run`` composes it (a plain dict)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from fedlora.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)


def fleet_mix(cfg: dict) -> dict[int, float]:
    """``clients.bitwidths`` as {bits: fraction}; null (the default) means an all-32-bit fleet."""
    mix = cfg["clients"].get("bitwidths")
    if mix is None:
        return {32: 1.0}
    if not isinstance(mix, dict):
        raise ConfigError("clients.bitwidths", f"got {mix!r}; expected a mapping such as '{{32: 0.5, 4: 0.5}}'")
    try:
        return {int(k): float(v) for k, v in mix.items()}
    except (TypeError, ValueError):
        raise ConfigError("clients.bitwidths", f"got {mix!r}; keys must be bitwidths in {list(BITWIDTHS)} and "
                                               "values fractions") from None


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message

    def __reduce__(self):  # picklable, so it crosses process pools (bench/compare.py --jobs) intact
        return (type(self), (self.key, self.message))


def _get(cfg: dict, dotted: str) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise ConfigError(dotted, "missing; set it with an override, e.g. " f"`{dotted}=...`")
        cur = cur[part]
    return cur


def _number(cfg: dict, key: str, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
            integer: bool = False, optional: bool = False) -> Any:
    v = _get(cfg, key)
    if v is None and optional:
        return None
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise ConfigError(key, f"got {v!r}; expected {'an integer' if integer else 'a number'}")
    if gt is not None and not v > gt:
        raise ConfigError(key, f"got {v!r}; must be > {gt}")
    if ge is not None and not v >= ge:
        raise ConfigError(key, f"got {v!r}; must be >= {ge}")
    if lt is not None and not v < lt:
        raise ConfigError(key, f"got {v!r}; must be < {lt}")
    return v


def _choice(cfg: dict, key: str, allowed: tuple[str, ...] | list[str]) -> str:
    v = _get(cfg, key)
    if v not in allowed:
        raise ConfigError(key, f"got {v!r}; allowed values are {list(allowed)}")
    return v


def validate(cfg: dict) -> None:
    """Check a resolved config (plain dict). Raises ConfigError on the first problem found."""
    from fedlora import aggregation
    from fedlora.clients.data import PACKAGED, PARTITIONERS

    _number(cfg, "rounds", gt=0, integer=True)
    _number(cfg, "seed", ge=0, integer=True)
    _number(cfg, "eval_every", gt=0, integer=True)
    _number(cfg, "round_timeout_s", gt=0)

    name = _choice(cfg, "strategy.name", aggregation.available())
    _number(cfg, "strategy.lr", gt=0)
    _choice(cfg, "strategy.optimizer", OPTIMIZERS)
    try:
        aggregation.create(
            name,
            train_head=bool(_get(cfg, "strategy.train_head")),
            weighting=_get(cfg, "strategy.weighting"),
            **dict(_get(cfg, "strategy.params") or {}),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError("strategy.params", str(e)) from None

    num = _number(cfg, "clients.num", ge=1, integer=True)
    per_round = _number(cfg, "clients.per_round", ge=1, integer=True)
    if per_round > num:
        raise ConfigError("clients.per_round", f"got {per_round}; must be <= clients.num ({num})")
    min_reports = _number(cfg, "clients.min_reports", ge=1, integer=True)
    if min_reports > per_round:
        raise ConfigError("clients.min_reports", f"got {min_reports}; must be <= clients.per_round ({per_round})")
    _number(cfg, "clients.local_steps", ge=1, integer=True)
    _number(cfg, "clients.batch_size", ge=1, integer=True)
    _number(cfg, "clients.cpus", gt=0)
    _number(cfg, "clients.max_update_norm", gt=0)
    _choice(cfg, "clients.bitwidth_method", BITWIDTH_METHODS)
    mix = fleet_mix(cfg)
    bad = [b for b in mix if int(b) not in BITWIDTHS]
    if not mix or bad:
        raise ConfigError("clients.bitwidths", f"bitwidths {bad or '(empty)'} not in the ladder {list(BITWIDTHS)}")
    if any(f < 0 for f in mix.values()) or abs(sum(mix.values()) - 1.0) > 1e-6:
        raise ConfigError("clients.bitwidths", f"fractions {dict(mix)} must be >= 0 and sum to 1")

    data_name = _choice(cfg, "data.name", list(PACKAGED) + ["local", "hf"])
    if data_name in ("local", "hf") and not _get(cfg, "data.path"):
        raise ConfigError("data.path", f"data={data_name} needs data.path (a file path or dataset id)")
    _choice(cfg, "data.partitioner", PARTITIONERS)
    _number(cfg, "data.alpha", gt=0)
    _number(cfg, "data.test_fraction", gt=0, lt=1)
    _number(cfg, "data.val_fraction", gt=0, lt=1)
    _number(cfg, "data.min_partition_size", ge=1, integer=True)
    _number(cfg, "data.max_examples", ge=10, integer=True, optional=True)

    _number(cfg, "model.lora_r", ge=1, integer=True)
    _number(cfg, "model.lora_alpha", gt=0)
    _number(cfg, "model.lora_dropout", ge=0, lt=1)
    _number(cfg, "model.max_length", ge=2, integer=True)
    if not _get(cfg, "model.target_modules"):
        raise ConfigError("model.target_modules", "empty; name the modules LoRA adapts, e.g. [query,value]")
    layers = cfg["model"].get("lora_layers")
    if layers is not None and (
        not isinstance(layers, (list, tuple)) or not layers
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
    ):
        raise ConfigError(
            "model.lora_layers", f"got {layers!r}; expected null (every layer) or a non-empty list of layer "
            "indices >= 0, e.g. model.lora_layers=[4,5]"
        )

    if _get(cfg, "privacy.enabled"):
        _number(cfg, "privacy.epsilon", gt=0)
        _number(cfg, "privacy.delta", gt=0, lt=1)
        _number(cfg, "privacy.clip", gt=0)
        _choice(cfg, "privacy.accountant", ACCOUNTANTS)
        _number(cfg, "privacy.noise_multiplier", gt=0, optional=True)
        _number(cfg, "privacy.max_participations", ge=1, integer=True, optional=True)
        _choice(cfg, "privacy.grad_sample_mode", GRAD_SAMPLE_MODES)

    kind = _choice(cfg, "runtime.kind", RUNTIMES)
    if kind == "ray_cluster" and not _get(cfg, "runtime.address"):
        raise ConfigError("runtime.address", "runtime=ray_cluster needs an address (auto, ray://host:10001, host:6379)")
    _number(cfg, "runtime.num_cpus", gt=0, optional=True)
    _number(cfg, "runtime.torch_threads", ge=1, integer=True)


def validate_against_data(cfg: dict, train_sizes: list[int]) -> None:
    """Checks that need the clients' dataset sizes (known before training in simulation)."""
    from fedlora.privacy.calibrate import DPSettings, check_dp_settings

    batch = cfg["clients"]["batch_size"]
    smallest = min(train_sizes)
    if cfg["privacy"]["enabled"]:
        try:
            check_dp_settings(DPSettings.from_dict(cfg["privacy"]), n=smallest, batch_size=batch)
        except ValueError as e:
            key = str(e).split("=", 1)[0] if str(e).startswith(("privacy.", "clients.")) else "privacy"
            raise ConfigError(key, f"{e} (the smallest client has n_k={smallest} training records; fewer clients "
                                   "(clients.num) give bigger ones, or try another seed / data.alpha)") from None
