"""Record-level differential privacy per client: settings and calibration (``calibrate``), the persistent
per-client accountant record (``ledger``), and DP-SGD over the trainable LoRA parameters (``dp``).

Submodules import Opacus lazily; importing this package is cheap."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "DPSettings": "calibrate",
    "check_dp_settings": "calibrate",
    "calibrate_noise": "calibrate",
    "GRAD_SAMPLE_MODES": "calibrate",
    "ACCOUNTANTS": "calibrate",
    "PrivacyLedger": "ledger",
    "compute_epsilon": "ledger",
    "PrivateTrainer": "dp",
    "poisson_batches": "dp",
    "leftover_dp_state": "dp",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
