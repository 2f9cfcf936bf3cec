"""DP-SGD settings, their checks against a client's data size, and noise calibration (Opacus accountants)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from fedlora.privacy.noise import CSPRNG, NOISE_SOURCES
from fedlora.schema import ConfigError, Group, boolean, choice, doc, number

ACCOUNTANTS = ("prv", "rdp")
#: per-sample gradient engines: Opacus hooks, Opacus ghost clipping, and our Linear/LoRA-only fast path
GRAD_SAMPLE_MODES = ("hooks", "ghost", "lora_fast")
#: above this many grid points Opacus' PRV accountant takes seconds to minutes and can run out of memory
#: (it happens when ε is in the hundreds, i.e. σ is tiny for its q); RDP is used instead there
PRV_MAX_POINTS = 4_000_000


def check_accountant(name: object) -> str:
    """``name`` if it is one of ``ACCOUNTANTS`` (the one place they are checked), else a ``ConfigError``."""
    return choice("privacy.accountant", name, ACCOUNTANTS)


@dataclass(frozen=True)
class DPSettings(Group):
    """The ``privacy`` config group: record-level DP-SGD settings of every client. ``enabled=False`` (the
    ``privacy=none`` option) trains without DP and leaves the other keys null."""

    KEY: ClassVar[str] = "privacy"

    epsilon: float | None = doc("target ε per client over the whole run (> 0)")
    delta: float | None = doc("target δ (> 0 and < 1/n_k for every client; 1e-5 is standard)")
    clip: float | None = doc("per-sample gradient norm bound C (> 0)")
    accountant: str | None = doc(f"privacy accountant: {list(ACCOUNTANTS)} (prv: tight, Opacus' default)",
                                 default="prv")
    noise_multiplier: float | None = doc("σ; null: calibrated from epsilon/delta/q/steps before training",
                                         default=None)
    max_participations: int | None = doc("null: calibrate for the worst case (every round); N: calibrate for N "
                                         "rounds, hard stop after", default=None)
    grad_sample_mode: str = doc(f"per-sample gradient engine: {list(GRAD_SAMPLE_MODES)}", default="hooks")
    enabled: bool = doc("record-level DP-SGD on every client", default=True)
    noise: str = doc(f"where DP-SGD's noise and sampling come from: {list(NOISE_SOURCES)}; csprng: the OS CSPRNG, "
                     "unknowable to the server; seeded-insecure: from the run's seed, bit-reproducible and NO "
                     "privacy against whoever knows the seed (tests and benchmarks only; refused in deployment)",
                     default=CSPRNG)

    def __post_init__(self) -> None:
        boolean(self.key("enabled"), self.enabled)
        choice(self.key("grad_sample_mode"), self.grad_sample_mode, GRAD_SAMPLE_MODES)
        choice(self.key("noise"), self.noise, NOISE_SOURCES)
        if not self.enabled:
            return
        number(self.key("epsilon"), self.epsilon, gt=0)
        number(self.key("delta"), self.delta, gt=0, lt=1)
        number(self.key("clip"), self.clip, gt=0)
        check_accountant(self.accountant)
        number(self.key("noise_multiplier"), self.noise_multiplier, gt=0, optional=True)
        number(self.key("max_participations"), self.max_participations, ge=1, integer=True, optional=True)
        for k in ("epsilon", "delta", "clip", "noise_multiplier"):
            v = getattr(self, k)
            if v is not None:
                object.__setattr__(self, k, float(v))


def check_dp_settings(s: DPSettings, *, n: int, batch_size: int | None) -> None:
    """Refuse settings that give no (or a meaningless) guarantee for a client with ``n`` training records
    (the static checks ran when ``s`` was built). Raises ``ConfigError`` naming the key and what to change."""
    if n <= 0:
        raise ConfigError("clients.num", f"a client has n={n} training records: DP-SGD needs at least one "
                          "(lower clients.num)")
    if s.delta >= 1.0 / n:
        raise ConfigError("privacy.delta", f"{s.delta:g} must be < 1/n = {1.0 / n:.3g} for a client with n={n} "
                          f"records (δ ≥ 1/n allows releasing a record outright): use privacy.delta <= "
                          f"{1.0 / n / 10:.1e}")
    if batch_size is not None and batch_size > n:
        raise ConfigError("clients.batch_size", f"{batch_size} exceeds the client's n={n} records: the Poisson "
                          f"sample rate batch/n would be > 1; use clients.batch_size <= {n} (or fewer clients, "
                          "clients.num)")


def prv_grid_points(history: list[tuple[float, float, int]], delta: float, eps_error: float = 0.01) -> float:
    """How many points Opacus' PRV accountant would discretise ``history`` on (its cost in time and memory)."""
    import warnings

    import numpy as np
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    delta_error = delta / 1000  # PRVAccountant.get_epsilon's default
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [int(s) for _, _, s in history]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        L = compute_safe_domain_size(
            prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
        )
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    return 2 * L / mesh if math.isfinite(L) else math.inf


def calibrate_noise(*, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest σ (to Opacus' search tolerance, 0.01 in ε) such that ``steps`` Poisson-subsampled Gaussian
    steps at rate ``sample_rate`` stay within (epsilon, delta) under ``accountant``
    (``opacus.accountants.utils.get_noise_multiplier``).

    PRV is searched only where it is tractable: when even half the RDP-calibrated σ would put PRV's grid past
    ``PRV_MAX_POINTS`` (a target ε in the hundreds), the RDP-calibrated σ is returned (valid, slightly loose)."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    check_accountant(accountant)
    if steps < 1:
        raise ValueError(f"cannot calibrate noise for {steps} steps: rounds and clients.local_steps must be >= 1")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate {sample_rate}: must be in (0, 1] (clients.batch_size <= n)")

    def search(mechanism: str) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=int(steps),
                    accountant=mechanism,
                )
            )

    try:
        if accountant == "rdp":
            return search("rdp")
        sigma_rdp = search("rdp")
        if prv_grid_points([(0.4 * sigma_rdp, sample_rate, int(steps))], delta) > PRV_MAX_POINTS:
            return sigma_rdp
        return search("prv")
    except ValueError as e:  # "The privacy budget is too low."
        raise ValueError(
            f"privacy.epsilon={epsilon:g}: no noise multiplier <= 1e6 reaches it for {steps} steps at "
            f"q={sample_rate:.3g} (δ={delta:g}); raise privacy.epsilon or lower rounds / clients.local_steps ({e})"
        ) from e
