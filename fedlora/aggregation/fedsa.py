"""FedSA-LoRA: clients train A, B (and the head); only A travels and is averaged; B and the head are personal.

The global state is the A factors only (plus any frozen keys, e.g. an untrained head); each client's B and
head start from its own model init and persist with the client (see ``fedlora.clients``). There is no
meaningful global model: evaluation is per client (global A + own B + own head). ``reference_global`` builds
the *reference* global model with averaged B (and head), to be reported as such (``REFERENCE_LABEL``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.aggregation.base import HEAD, LORA_A, LORA_B, ClientUpdate, Strategy, Tensors, apply_mean_delta, register

#: how a model built by ``FedSALoRA.reference_global`` must be labelled wherever it is reported
REFERENCE_LABEL = "reference global model (global A + averaged personal B/head; not a deployed model)"


@register("fedsa")
class FedSALoRA(Strategy):
    """Share A, keep B (and the head, when trained) personal. A ← A + Σ p_k ΔA_k (``weighting``)."""

    trains = (LORA_A, LORA_B, HEAD)
    shares = (LORA_A,)
    has_global_model = False
    has_reference_global = True

    # init_global (base): the shared A keys plus frozen keys (the head when train_head is False); B and a
    # trained head are personal and come from each client's own model init.

    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        return apply_mean_delta(self, global_state, updates)

    def reference_global(
        self,
        global_state: Tensors,
        personal_states: Sequence[Tensors],
        weights: Sequence[float] | torch.Tensor | None = None,
    ) -> Tensors:
        """The labelled reference global model: ``global_state`` plus Σ w_k X_k for every personal key X
        (B and, when trained, the head) over the clients' personal states. ``weights`` (e.g. example counts)
        are normalised to sum to 1; None means uniform. Accumulates in float64, returns the input dtype."""
        if not personal_states:
            raise ValueError("reference_global needs at least one client's personal state")
        n = len(personal_states)
        if weights is None:
            w = torch.ones(n, dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != n:
            raise ValueError(f"reference_global: {w.numel()} weights for {n} personal states")
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError("reference_global: weights must be >= 0 with a positive sum")
        w = w / w.sum()
        keys = sorted(k for k in personal_states[0] if self.personal_key(k))
        for i, ps in enumerate(personal_states):
            theirs = sorted(k for k in ps if self.personal_key(k))
            if theirs != keys:
                raise ValueError(f"reference_global: personal state {i} has keys {theirs}, expected {keys}")
        out = dict(global_state)
        for k in keys:
            acc = torch.zeros(personal_states[0][k].shape, dtype=torch.float64)
            for wk, ps in zip(w.tolist(), personal_states):
                acc += wk * ps[k].to(torch.float64)
            out[k] = acc.to(personal_states[0][k].dtype)
        return out
