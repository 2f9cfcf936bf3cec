"""Process setup shared by every fedlora process: the offline environment and quiet library logging."""

from __future__ import annotations

import logging
import os

#: set in every fedlora process and passed to every Ray worker (simulated clients, the coordinator actor)
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # progress bars of artifact downloads, from the coordinator
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
}

#: libraries that speak only on warnings in our processes
QUIET_LOGGERS = ("alembic", "mlflow", "flwr", "ray", "datasets", "transformers", "peft", "opacus", "matplotlib")


def apply_offline_env() -> None:
    """Set the offline switches in this process (a value the user exported wins)."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    import sys

    if not sys.stdout.isatty():  # Ray's "(Actor pid=...)" prefixes: no colour codes into files and pipes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


#: library warnings that are expected, not news (MLflow's, when the coordinator logs its datasets and model: the
#: model's signature is given explicitly; integer label columns hold no missing values)
QUIET_WARNINGS = (r".*Add type hints to the `predict` method", r".*Inferred schema contains integer column")

#: library lines that are expected, not news: Flower's run_simulation deprecation notice, and the warning every
#: client actor prints when the simulation ends and terminates it
DROPPED = ("DEPRECATED FEATURE", "Manually terminating")


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(d in msg for d in DROPPED)


_DROP = _DropDeprecation()


def quiet_logs() -> None:
    """Keep the console to fedlora's own lines: libraries speak only on warnings (and Flower's run_simulation
    deprecation notice, which we know about, not at all). Call again after importing Flower: it sets its own
    logger to DEBUG on import."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import warnings

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    flwr_log = logging.getLogger("flwr")
    for h in [*flwr_log.handlers, *logging.getLogger().handlers]:
        h.addFilter(_DROP)  # one instance: calling this again adds nothing
    flwr_log.addFilter(_DROP)


class ConsoleFormatter(logging.Formatter):
    """fedlora's console: its own INFO lines bare (progress reads like a report), everything else — warnings,
    other libraries — with level and logger name. Used by Hydra's job logging (``config.yaml``)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO and record.name.startswith("fedlora"):
            return record.getMessage()
        return f"{record.levelname} {record.name}: {record.getMessage()}"


def console_logging() -> logging.Logger:
    """The ``fedlora.console`` logger; outside Hydra (``fedlora resume``) it gets a stdout handler of its own."""
    import sys

    log = logging.getLogger("fedlora.console")
    if not logging.getLogger().handlers and not log.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(ConsoleFormatter())
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO)
    return log
