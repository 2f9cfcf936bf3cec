"""What both sides of a federation derive from its config: the strategy, the fleet's bitwidths, and the client
spec — the part of the config a client needs to train, and nothing else (no other client's data size, no server
path, no data partitioning)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedlora.aggregation.base import Strategy
from fedlora.aggregation.bitwidth import BitwidthAggregator
from fedlora.aggregation.fleet import fleet_bitwidths
from fedlora.config import FedConfig, StrategyConfig
from fedlora.privacy.calibrate import DPSettings
from fedlora.task.model import ModelSpec


def server_strategy(cfg: FedConfig) -> Strategy:
    """The coordinator's strategy: the configured one, wrapped for a mixed-bitwidth fleet."""
    strategy = cfg.strategy.create()
    if cfg.clients.mixed:
        strategy = BitwidthAggregator(strategy, method=cfg.clients.bitwidth_method, seed=cfg.seed)
    return strategy


def fleet_bits(cfg: FedConfig) -> list[int]:
    """Bitwidth of each simulated client (by partition index), from ``clients.bitwidths``."""
    if not cfg.clients.mixed:
        return [32] * cfg.clients.num
    return fleet_bitwidths(cfg.clients.mix, cfg.clients.num, cfg.seed)


@dataclass(frozen=True)
class ClientSpec:
    """What every client receives with each message: how to build the model, what to train and how, the privacy
    settings, and the federation's label set. ``seed`` seeds the shared initialisation (FFA-LoRA's A must be
    bit-identical everywhere) and the client's local shuffling. Nothing in it describes another client or the
    server's file system."""

    strategy: StrategyConfig
    model: ModelSpec
    privacy: DPSettings
    local_steps: int
    batch_size: int | None
    torch_threads: int
    rounds: int
    seed: int
    labels: tuple[str, ...]
    sample_rate: float | None = None
    device: str = "auto"
    gpus: float = 0.0

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def batch_for(self, n: int) -> int:
        """The (expected) batch of a client with ``n`` records: batch_size, or round(q·n) (at least 1)."""
        return self.batch_size if self.batch_size is not None else max(1, round(self.sample_rate * n))

    def to_json(self) -> str:
        return json.dumps({
            "strategy": self.strategy.to_dict(), "model": self.model.to_dict(), "privacy": self.privacy.to_dict(),
            "local_steps": self.local_steps, "batch_size": self.batch_size, "torch_threads": self.torch_threads,
            "rounds": self.rounds, "seed": self.seed, "labels": list(self.labels), "sample_rate": self.sample_rate,
            "device": self.device, "gpus": self.gpus,
        }, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientSpec:
        return cls(
            strategy=StrategyConfig.from_dict(d["strategy"]), model=ModelSpec.from_dict(d["model"]),
            privacy=DPSettings.from_dict(d["privacy"]), local_steps=int(d["local_steps"]),
            batch_size=None if d["batch_size"] is None else int(d["batch_size"]),
            torch_threads=int(d["torch_threads"]), rounds=int(d["rounds"]), seed=int(d["seed"]),
            labels=tuple(str(x) for x in d["labels"]),
            sample_rate=None if d.get("sample_rate") is None else float(d["sample_rate"]),
            device=str(d.get("device", "auto")), gpus=float(d.get("gpus", 0.0)),
        )


def client_spec(cfg: FedConfig, labels: list[str]) -> ClientSpec:
    return ClientSpec(
        strategy=cfg.strategy, model=cfg.model, privacy=cfg.privacy, local_steps=cfg.clients.local_steps,
        batch_size=cfg.clients.batch_size, torch_threads=cfg.runtime.torch_threads, rounds=cfg.rounds,
        seed=cfg.seed, labels=tuple(labels), sample_rate=cfg.clients.sample_rate,
        device=cfg.clients.device, gpus=cfg.clients.gpus,
    )
