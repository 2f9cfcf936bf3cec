"""Per-client privacy ledger: the accountant history of every DP-SGD step the client actually ran, persisted
across rounds and restarts, so ε composes over the whole run and never resets.

The ledger is the only source of a client's ε: it is recomputed from the full history by a fresh Opacus
accountant (PRV or RDP), never from a per-round accountant (which under-reports)."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any

from fedlora.privacy.calibrate import (
    PRV_MAX_POINTS,
    DPSettings,
    calibrate_noise,
    check_accountant,
    check_dp_settings,
    prv_grid_points,
)

STATE_VERSION = 2  # 2: + charges (which round/version each participation was charged for, and by whom)
#: relative slack on the target when deciding whether a participation fits the budget (float noise only)
TOLERANCE = 1e-9

History = list[tuple[float, float, int]]


def _fresh_accountant(mechanism: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return {"prv": PRVAccountant, "rdp": RDPAccountant}[check_accountant(mechanism)]()


def _rdp_epsilon(history: History, delta: float) -> float:
    acc = _fresh_accountant("rdp")
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": a loose bound, still valid
        return float(acc.get_epsilon(delta=delta))


def compute_epsilon(history: History, *, delta: float, accountant: str) -> tuple[float, str]:
    """(ε, the accountant that produced it) for a composed ``history`` of (σ, q, steps), by a fresh accountant.

    With ``accountant="prv"`` the RDP bound (also a valid ε for the same δ) is returned instead when PRV's grid
    would exceed ``PRV_MAX_POINTS`` — only when ε is already enormous (hundreds)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not history:
        return 0.0, accountant
    if accountant == "prv" and prv_grid_points(history, delta) > PRV_MAX_POINTS:
        return _rdp_epsilon(history, delta), "rdp"
    acc = _fresh_accountant(accountant)
    acc.history = history
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        eps = float(acc.get_epsilon(delta=delta))
    if math.isnan(eps):
        eps = math.inf
    return eps, accountant


def _merge(history: History, sigma: float, q: float, steps: int) -> History:
    out = [tuple(h) for h in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, int(out[-1][2]) + int(steps))
    else:
        out.append((sigma, q, int(steps)))
    return out


class PrivacyLedger:
    """One client's record of its DP-SGD steps and their (ε, δ) cost. JSON-serialisable via ``state_dict``."""

    def __init__(
        self,
        *,
        target_epsilon: float,
        delta: float,
        noise_multiplier: float,
        sample_rate: float,
        clip: float,
        accountant: str,
        planned_steps: int,
        max_participations: int | None = None,
        calibrated: bool = True,
        n: int | None = None,
        batch_size: int | None = None,
        steps: int = 0,
        participations: int = 0,
        history: History | None = None,
        charges: list[dict[str, Any]] | None = None,
    ) -> None:
        _fresh_accountant(accountant)  # refuses an unknown accountant (a ledger file is input too)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.clip = float(clip)
        self.accountant = accountant
        self.planned_steps = int(planned_steps)
        self.max_participations = None if max_participations is None else int(max_participations)
        self.calibrated = bool(calibrated)
        self.n = n
        self.batch_size = batch_size
        self.steps = int(steps)
        self.participations = int(participations)
        self.history: History = [(float(s), float(q), int(k)) for s, q, k in (history or [])]
        #: one entry per charged participation: {round, version, steps, attempt: {pid, host, started}}
        self.charges: list[dict[str, Any]] = [dict(c) for c in (charges or [])]
        self.epsilon_accountant = accountant  # which accountant produced the last ε (see compute_epsilon)
        self._cache: OrderedDict[tuple, tuple[float, str]] = OrderedDict()

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, settings: DPSettings, *, n: int, batch_size: int | None, rounds: int, local_steps: int,
        sample_rate: float | None = None,
    ) -> PrivacyLedger:
        """A fresh ledger for a client with ``n`` records. q = batch/n, or ``sample_rate`` when given (server-side
        client sampling is never folded in); σ is the explicit ``noise_multiplier`` or calibrated for the planned steps
        ((max_participations or rounds) × local_steps)."""
        check_dp_settings(settings, n=n, batch_size=batch_size)
        if rounds < 1 or local_steps < 1:
            raise ValueError(f"rounds={rounds}, clients.local_steps={local_steps}: both must be >= 1")
        q = float(sample_rate) if sample_rate is not None else batch_size / n
        planned = int(settings.max_participations or rounds) * int(local_steps)
        if settings.noise_multiplier is not None:
            sigma, calibrated = float(settings.noise_multiplier), False
        else:
            sigma = calibrate_noise(
                epsilon=settings.epsilon,
                delta=settings.delta,
                sample_rate=q,
                steps=planned,
                accountant=settings.accountant,
            )
            calibrated = True
        return cls(
            target_epsilon=settings.epsilon,
            delta=settings.delta,
            noise_multiplier=sigma,
            sample_rate=q,
            clip=settings.clip,
            accountant=settings.accountant,
            planned_steps=planned,
            max_participations=settings.max_participations,
            calibrated=calibrated,
            n=n,
            batch_size=batch_size,
        )

    # ---- accounting -----------------------------------------------------------------------------------
    def _epsilon_of(self, history: History) -> float:
        key = tuple(history)
        hit = self._cache.get(key)
        if hit is None:
            hit = compute_epsilon(history, delta=self.delta, accountant=self.accountant)
            self._cache[key] = hit
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        self.epsilon_accountant = hit[1]
        return hit[0]

    def epsilon(self) -> float:
        """ε spent so far at this ledger's δ (0.0 before any step), composed over every recorded step."""
        return self._epsilon_of(self.history)

    def epsilon_if(self, extra_steps: int) -> float:
        """ε after ``extra_steps`` more steps at this ledger's (σ, q)."""
        return self._epsilon_of(_merge(self.history, self.noise_multiplier, self.sample_rate, int(extra_steps)))

    def can_run(self, steps: int) -> bool:
        """Whether one more participation of ``steps`` steps stays within the target ε (and the participation cap)."""
        if self.max_participations is not None and self.participations >= self.max_participations:
            return False
        return self.epsilon_if(steps) <= self.target_epsilon * (1 + TOLERANCE) + TOLERANCE

    def decline_reason(self, steps: int) -> str | None:
        """Why ``can_run(steps)`` is false (None when it is true)."""
        if self.max_participations is not None and self.participations >= self.max_participations:
            return (
                f"privacy budget: {self.participations} participations done = privacy.max_participations "
                f"(ε so far {self.epsilon():.3f} of target {self.target_epsilon:g})"
            )
        eps = self.epsilon_if(steps)
        if eps <= self.target_epsilon * (1 + TOLERANCE) + TOLERANCE:
            return None
        return f"privacy budget: ε would reach {eps:.3f} > target {self.target_epsilon:g}"

    def record(self, steps: int) -> None:
        """Add one participation of ``steps`` DP-SGD steps at this ledger's (σ, q)."""
        steps = int(steps)
        if steps < 0:
            raise ValueError(f"cannot record {steps} steps")
        self.history = _merge(self.history, self.noise_multiplier, self.sample_rate, steps)
        self.steps += steps
        self.participations += 1

    def charge(self, *, round: int, version: int, steps: int, attempt: dict[str, Any]) -> None:
        """Record one participation for (``round``, ``version``) by ``attempt`` — before its first noise draw, so
        the ledger on disk is never below the privacy spent, whatever crashes or times out afterwards."""
        self.record(steps)
        self.charges.append({"round": int(round), "version": int(version), "steps": int(steps),
                             "attempt": dict(attempt)})

    def charge_for(self, round: int, version: int) -> dict[str, Any] | None:
        """The latest charge for (``round``, ``version``), or None: a repeated request for a round already charged
        (a resumed coordinator re-running it) must not be trained and charged again."""
        return next((c for c in reversed(self.charges) if c["round"] == round and c["version"] == version), None)

    # ---- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip": self.clip,
            "accountant": self.accountant,
            "planned_steps": self.planned_steps,
            "max_participations": self.max_participations,
            "calibrated": self.calibrated,
            "n": self.n,
            "batch_size": self.batch_size,
            "steps": self.steps,
            "participations": self.participations,
            "history": [[s, q, k] for s, q, k in self.history],
            "charges": [dict(c) for c in self.charges],
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        version = d.get("version", STATE_VERSION)
        if version not in (1, STATE_VERSION):
            raise ValueError(f"privacy ledger state version {version} is not supported (expected {STATE_VERSION})")
        kw = {k: d[k] for k in (
            "target_epsilon", "delta", "noise_multiplier", "sample_rate", "clip", "accountant", "planned_steps",
        )}
        ledger = cls(
            **kw,
            max_participations=d.get("max_participations"),
            calibrated=d.get("calibrated", True),
            n=d.get("n"),
            batch_size=d.get("batch_size"),
            steps=d.get("steps", 0),
            participations=d.get("participations", 0),
            history=[tuple(h) for h in d.get("history", [])],
            charges=d.get("charges", []),
        )
        if sum(k for _, _, k in ledger.history) != ledger.steps:
            raise ValueError("privacy ledger state is inconsistent: history steps do not add up to 'steps'")
        return ledger

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(accountant={self.accountant}, σ={self.noise_multiplier:.4g}, q={self.sample_rate:.4g}, "
            f"steps={self.steps}, participations={self.participations}, target ε={self.target_epsilon:g}, "
            f"δ={self.delta:g})"
        )
