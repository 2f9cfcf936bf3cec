"""The pyfunc model of fedlora's logged MLflow model (``coordinator.mlmodel``), as MLflow's "models from code":
this file is stored with the model and run on load (no pickled object). A text classifier that rebuilds the base
model as training did and applies the federated adapter with PEFT."""

from __future__ import annotations

from typing import Any

import mlflow.models
import mlflow.pyfunc


class TextClassifier(mlflow.pyfunc.PythonModel):
    """The global model: the frozen base (rebuilt as in training) + the federated LoRA adapter and head."""

    # MLflow validates the input against the signature given when logging (coordinator.mlmodel), not against
    # predict's type hints; this is the switch MLflow's own ChatModel uses to skip type-hint inference, so defining
    # the class does not warn "Add type hints to the `predict` method" on every load
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from peft import PeftModel

        from fedlora.task.model import ModelSpec, configure_threads, load_base_model, load_tokenizer

        cfg = context.model_config
        self.spec = ModelSpec.from_dict(cfg["model"])
        self.labels = list(cfg["labels"])
        configure_threads(int(cfg.get("threads", 1)))
        base = load_base_model(self.spec, num_labels=len(self.labels), seed=int(cfg["seed"]))
        self.model = PeftModel.from_pretrained(base, context.artifacts["adapter"]).eval()
        self.tokenizer = load_tokenizer(self.spec)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        from fedlora.task.train import make_collate

        texts = [str(t) for t in (model_input["text"] if hasattr(model_input, "columns") else model_input)]
        ids = self.tokenizer(texts, truncation=True, max_length=self.spec.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted batches, as in evaluation
        collate = make_collate(self.tokenizer.pad_token_id or 0)
        probs = torch.zeros((len(ids), len(self.labels)))
        with torch.inference_mode():
            for i in range(0, len(order), 128):
                idx = order[i : i + 128]
                b = collate([{"input_ids": ids[j], "labels": 0} for j in idx])
                b.pop("labels")
                probs[idx] = torch.softmax(self.model(**b).logits.float(), -1)
        best = probs.argmax(-1)
        return pd.DataFrame({"label": [self.labels[k] for k in best.tolist()],
                             "score": probs.gather(1, best[:, None])[:, 0].double().numpy()})


mlflow.models.set_model(TextClassifier())
