"""DP-SGD settings, their checks against a client's data size, and noise calibration (Opacus accountants)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

ACCOUNTANTS = ("prv", "rdp")
#: per-sample gradient engines: Opacus hooks, Opacus ghost clipping, and our Linear/LoRA-only fast path
GRAD_SAMPLE_MODES = ("hooks", "ghost", "lora_fast")
#: above this many grid points Opacus' PRV accountant takes seconds to minutes and can run out of memory
#: (it happens when ε is in the hundreds, i.e. σ is tiny for its q); RDP is used instead there
PRV_MAX_POINTS = 4_000_000


@dataclass(frozen=True)
class DPSettings:
    """Record-level DP-SGD settings of one client (the ``privacy`` config group, less ``enabled``)."""

    epsilon: float
    delta: float
    clip: float
    accountant: str = "prv"
    noise_multiplier: float | None = None
    max_participations: int | None = None
    grad_sample_mode: str = "hooks"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DPSettings:
        """From the ``privacy`` config group; ``enabled`` (and any key that is not a field) is ignored."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("epsilon", "delta", "clip"):
            if k in kw and kw[k] is not None:
                kw[k] = float(kw[k])
        if kw.get("noise_multiplier") is not None:
            kw["noise_multiplier"] = float(kw["noise_multiplier"])
        if kw.get("max_participations") is not None:
            kw["max_participations"] = int(kw["max_participations"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_dp_settings(s: DPSettings, *, n: int, batch_size: int) -> None:
    """Refuse settings that give no (or a meaningless) guarantee for a client with ``n`` training records.

    Raises ``ValueError`` naming the config key and what to change."""
    if not _finite_number(s.epsilon) or s.epsilon <= 0:
        raise ValueError(f"privacy.epsilon={s.epsilon!r}: must be a finite number > 0 (the target ε per client)")
    if not _finite_number(s.delta) or s.delta <= 0:
        raise ValueError(f"privacy.delta={s.delta!r}: must be > 0 (1e-5 is standard; at most 1/n_k)")
    if n <= 0:
        raise ValueError(f"client has n={n} training records: DP-SGD needs at least one (lower clients.num)")
    if s.delta >= 1.0 / n:
        raise ValueError(
            f"privacy.delta={s.delta:g} must be < 1/n = {1.0 / n:.3g} for a client with n={n} records "
            f"(δ ≥ 1/n allows releasing a record outright): use privacy.delta <= {1.0 / n / 10:.1e}"
        )
    if not _finite_number(s.clip) or s.clip <= 0:
        raise ValueError(f"privacy.clip={s.clip!r}: the per-sample gradient norm bound must be > 0 (e.g. 1.0)")
    if batch_size <= 0:
        raise ValueError(f"clients.batch_size={batch_size}: must be > 0")
    if batch_size > n:
        raise ValueError(
            f"clients.batch_size={batch_size} exceeds the client's n={n} records: the Poisson sample rate "
            f"batch/n would be > 1; use clients.batch_size <= {n} (or fewer clients, clients.num)"
        )
    if s.accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={s.accountant!r}: allowed values are {list(ACCOUNTANTS)}")
    if s.grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"privacy.grad_sample_mode={s.grad_sample_mode!r}: allowed values are {list(GRAD_SAMPLE_MODES)}"
        )
    if s.noise_multiplier is not None and (not _finite_number(s.noise_multiplier) or s.noise_multiplier <= 0):
        raise ValueError(
            f"privacy.noise_multiplier={s.noise_multiplier!r}: must be > 0, or null to calibrate it from "
            "privacy.epsilon / privacy.delta"
        )
    if s.max_participations is not None and (
        isinstance(s.max_participations, bool) or not isinstance(s.max_participations, int) or s.max_participations < 1
    ):
        raise ValueError(
            f"privacy.max_participations={s.max_participations!r}: must be an integer >= 1, or null for every round"
        )


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

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"privacy.accountant={accountant!r}: allowed values are {list(ACCOUNTANTS)}")
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
