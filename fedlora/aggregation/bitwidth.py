"""Bitwidth-heterogeneous aggregation (ALGORITHMS.md, ProWD-style): ``BitwidthAggregator`` wraps any inner
strategy (FFA, FedSVD, FedAvg, ...) and combines a mixed-bitwidth round by one of ``METHODS``.

The pieces live beside it: ``fleet`` (which client has which bitwidth), ``dequantizer`` (the progressive
dequantizer), ``selective`` (the sign-agreement mask and the masked mean), ``quant`` (the wire codecs).

Conventions:

* ``update.meta["bits"]`` is the client's bitwidth; ``update.deltas`` are already plain-decoded fp32
  tensors (``quant.decode_tensors``). Scales are **not** needed in ``meta``: a decoded b-bit row is exactly
  ``level·s`` with one element at ±q·s, so the dequantizer derives its per-row reference from the decoded
  tensor itself (row absmax) — in training (where it quantises with ``quant.fake_quantize``) and at
  inference alike, so both see identical inputs.
* *High precision* means the float formats (16, 32). The *top* bitwidth of a round is the highest present;
  its clients are the round's high-precision group, every other client is low-bit. A round whose top is
  an integer format (everyone ≤ 8 bits) has no reference: ``progressive`` falls back to ``naive`` and says
  so in ``last_stats["fallback"]``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora.aggregation.base import (
    LORA_A,
    LORA_B,
    ClientUpdate,
    Strategy,
    Tensors,
    kind_of,
    layer_of,
    weighted_sum,
)
from fedlora.aggregation.dequantizer import ProgressiveDequantizer
from fedlora.aggregation.quant import check_bits
from fedlora.aggregation.selective import masked_weighted_mean, selective_mask

METHODS = ("naive", "grouped", "progressive")
GROUP_WEIGHTINGS = ("uniform", "examples")
#: bitwidths that count as high precision (a valid reference for the dequantizer and the selective mask)
FLOAT_BITWIDTHS = (32, 16)


def _bits_of(u: ClientUpdate) -> int:
    return check_bits(u.meta.get("bits"), key=f"update from client {u.client_id!r}: meta['bits']")


class BitwidthAggregator(Strategy):
    """Wraps an inner strategy for a fleet of mixed bitwidths.

    ``aggregate(global_state, updates)``: each ``update.meta["bits"]`` gives the client's bitwidth and
    ``update.deltas`` are its plain-decoded fp32 deltas. With p_k the inner strategy's weights:

    * ``naive``: ``inner.aggregate(global_state, updates)`` — plain averaging of dequantised updates.
    * ``grouped``: each bitwidth group g averages on its own, ḡ = Σ_{k∈g} p_k Δ_k / Σ_{k∈g} p_k; the group
      means are combined with weights w_g: ``group_weighting="uniform"`` (default) w_g = 1/G — every
      bitwidth counts equally, so a large low-bit population cannot swamp the high-precision group;
      ``"examples"``: w_g = Σ_{k∈g} p_k (group data size) — note this is *algebraically identical to
      naive* (Σ_g w_g ḡ = Σ_k p_k Δ_k) and is kept only so the identity can be shown.
    * ``progressive``: fit the dequantizer on this round's top-bitwidth (high-precision) deltas, refine
      every low-bit delta through it, drop low-bit elements whose sign opposes the high-precision mean
      h = Σ_{k∈H} p_k Δ_k / Σ_{k∈H} p_k (``selective_mask``), and average elementwise with weights p_k·mask
      normalised per element (high-precision clients keep everything; elements nobody keeps take h).
      Needs a float (16/32-bit) top; otherwise falls back to naive (``last_stats["fallback"]``).
      Ablations: ``dequantize=False`` skips the dequantizer, ``selective=False`` keeps every element (both
      False: the same as naive up to float rounding).

    ``grouped`` and ``progressive`` hand the inner strategy ONE synthetic update whose deltas are the
    combined mean (num_examples = the round's total), so the inner maths (e.g. FedSVD's re-factorisation)
    still applies. A round with a single bitwidth is passed to the inner strategy unchanged by every method.
    Everything else (trains/shares, init_global, downlink, client_sync, weights, …) is the inner
    strategy's; re-quantising the downlink to each client's bitwidth is the transport's job
    (``quant.encode_tensors``).
    """

    name = "bitwidth"

    def __init__(
        self,
        inner: Strategy,
        method: str = "progressive",
        seed: int = 0,
        *,
        dequantizer_steps: int = 150,
        dequantizer_lr: float = 1e-2,
        dequantizer_hidden: int = 16,
        replay_size: int = 64,
        group_weighting: str = "uniform",
        dequantize: bool = True,
        selective: bool = True,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a Strategy instance, got {type(inner).__name__}")
        if method not in METHODS:
            raise ValueError(f"clients.bitwidth_method={method!r}: allowed values are {list(METHODS)}")
        if group_weighting not in GROUP_WEIGHTINGS:
            raise ValueError(
                f"group_weighting={group_weighting!r}: allowed values are {list(GROUP_WEIGHTINGS)}"
            )
        self.inner = inner
        self.method = method
        self.seed = int(seed)
        self.dequantizer_steps = int(dequantizer_steps)
        self.dequantizer_lr = float(dequantizer_lr)
        self.group_weighting = group_weighting
        self.dequantize = bool(dequantize)
        self.selective = bool(selective)
        self.dequantizer = ProgressiveDequantizer(hidden=dequantizer_hidden, seed=self.seed, replay_size=replay_size)
        self.last_stats: dict[str, Any] = {}
        # the inner strategy's declarations, visible on the instance
        self.trains = inner.trains
        self.shares = inner.shares
        self.has_global_model = inner.has_global_model

    # ---- forwarding: everything but ``aggregate`` and the state is the inner strategy's ----------
    @property
    def train_head(self) -> bool:  # type: ignore[override]
        return self.inner.train_head

    @property
    def weighting(self) -> str:  # type: ignore[override]
        return self.inner.weighting

    def trains_key(self, key: str) -> bool:
        return self.inner.trains_key(key)

    def shares_key(self, key: str) -> bool:
        return self.inner.shares_key(key)

    def personal_key(self, key: str) -> bool:
        return self.inner.personal_key(key)

    @property
    def trains_lora(self) -> bool:  # type: ignore[override]
        return self.inner.trains_lora

    def init_global(self, initial: Tensors) -> Tensors:
        return self.inner.init_global(initial)

    def weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        return self.inner.weights(updates)

    def downlink(self, global_state: Tensors, client_round: int | None) -> tuple[Tensors, dict[str, Any]]:
        return self.inner.downlink(global_state, client_round)

    def client_sync(self, held: Tensors | None, payload: Tensors, meta: dict[str, Any]) -> Tensors:
        return self.inner.client_sync(held, payload, meta)

    def reference_global(self, global_state: Tensors, personal_states, weights=None) -> Tensors:
        return self.inner.reference_global(global_state, personal_states, weights)

    @property
    def has_reference_global(self) -> bool:  # type: ignore[override]
        return self.inner.has_reference_global

    # ---- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "inner": self.inner.state_dict(),
            "dequantizer": self.dequantizer.state_dict(),
            "method": self.method,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"inner", "dequantizer"} - set(state or {})
        if missing:
            raise ValueError(f"bitwidth aggregator state is missing {sorted(missing)}")
        if state.get("method", self.method) != self.method:
            raise ValueError(f"checkpoint was written by method {state['method']!r}, this run uses {self.method!r}")
        self.inner.load_state_dict(state["inner"])
        self.dequantizer.load_state_dict(state["dequantizer"])

    # ---- aggregation ---------------------------------------------------------------------------
    def _synthetic(self, global_state: Tensors, updates: list[ClientUpdate], mean: Tensors, tag: str) -> Tensors:
        synth = ClientUpdate(
            client_id=f"bitwidth:{tag}",
            deltas=mean,
            num_examples=sum(int(u.num_examples) for u in updates) or 1,
            meta={
                "bits": max(_bits_of(u) for u in updates),
                "synthetic": True,
                "clients": [u.client_id for u in updates],
            },
        )
        return self.inner.aggregate(global_state, [synth])

    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        if not updates:
            raise ValueError("cannot aggregate zero updates")
        bits = [_bits_of(u) for u in updates]
        keys = set(updates[0].deltas)
        for u in updates[1:]:
            if set(u.deltas) != keys:
                diff = sorted(set(u.deltas) ^ keys)
                raise ValueError(f"update from client {u.client_id!r} has keys {diff} differing from the others")
        counts = {b: bits.count(b) for b in sorted(set(bits), reverse=True)}
        stats: dict[str, Any] = {
            "method": self.method,
            "fallback": None,
            "bits_counts": counts,
            "dequantizer_fit_s": 0.0,
            "kept_fraction": {},
        }
        self.last_stats = stats
        if len(counts) == 1:
            return self.inner.aggregate(global_state, updates)
        if self.method == "naive":
            return self.inner.aggregate(global_state, updates)
        if self.method == "grouped":
            return self._synthetic(global_state, updates, self._grouped_mean(updates, bits), "grouped")
        top = max(bits)
        if top not in FLOAT_BITWIDTHS:
            stats["fallback"] = f"no high-precision (16/32-bit) client this round (top is {top}-bit): naive averaging"
            return self.inner.aggregate(global_state, updates)
        mean = self._progressive_mean(global_state, updates, bits, top)
        return self._synthetic(global_state, updates, mean, "progressive")

    def _grouped_mean(self, updates: list[ClientUpdate], bits: list[int]) -> Tensors:
        p = self.inner.weights(updates)
        groups = sorted(set(bits), reverse=True)
        idx = {b: [i for i, bb in enumerate(bits) if bb == b] for b in groups}
        if self.group_weighting == "uniform":
            gw = {b: 1.0 / len(groups) for b in groups}
        else:
            gw = {b: float(p[idx[b]].sum()) for b in groups}
        out = {}
        for key in updates[0].deltas:
            acc = torch.zeros(updates[0].deltas[key].shape, dtype=torch.float64)
            for b in groups:
                pg = p[idx[b]]
                acc += gw[b] * weighted_sum([updates[i] for i in idx[b]], pg / pg.sum(), key).to(torch.float64)
            out[key] = acc.to(updates[0].deltas[key].dtype)
        self.last_stats["group_weights"] = gw
        return out

    def _progressive_mean(
        self, global_state: Tensors, updates: list[ClientUpdate], bits: list[int], top: int
    ) -> Tensors:
        stats = self.last_stats
        p = self.inner.weights(updates)
        hi = [i for i, b in enumerate(bits) if b == top]
        lo = [i for i, b in enumerate(bits) if b != top]
        # LoRA-aware loss: the current global A of each B key's layer (where the global state holds that A)
        a_of = {layer_of(k): v for k, v in global_state.items() if kind_of(k) == LORA_A}
        lora_A = {k: a_of[layer_of(k)] for k in updates[0].deltas if kind_of(k) == LORA_B and layer_of(k) in a_of}
        if self.dequantize:
            self.dequantizer.ensure_rungs(bits)
            pairs = [(k, updates[i].deltas[k]) for i in hi for k in sorted(updates[i].deltas)]
            fit = self.dequantizer.fit(pairs, lora_A, steps=self.dequantizer_steps, lr=self.dequantizer_lr, top=top)
            stats["dequantizer_fit_s"] = fit["fit_s"]
            stats["dequantizer_fits"] = self.dequantizer.fits
            stats["dequantizer"] = {k: fit[k] for k in ("loss_before", "loss_after", "val_ratio", "enabled", "terms")}
        p_hi = p[hi] / p[hi].sum()
        kept = {b: [0, 0] for b in sorted({bits[i] for i in lo}, reverse=True)}
        out = {}
        for key in updates[0].deltas:
            dtype = updates[0].deltas[key].dtype
            h = weighted_sum([updates[i] for i in hi], p_hi, key)
            deltas, masks, ws = [], [], []
            for i in hi:
                deltas.append(updates[i].deltas[key])
                masks.append(torch.ones(h.shape, dtype=torch.bool))
                ws.append(float(p[i]))
            for i in lo:
                d = updates[i].deltas[key]
                if self.dequantize:
                    d = self.dequantizer.refine(d, bits[i], top)
                m = selective_mask(d, h) if self.selective else torch.ones(h.shape, dtype=torch.bool)
                kept[bits[i]][0] += int(m.sum())
                kept[bits[i]][1] += m.numel()
                deltas.append(d)
                masks.append(m)
                ws.append(float(p[i]))
            out[key] = masked_weighted_mean(deltas, ws, masks, h).to(dtype)
        stats["kept_fraction"] = {b: (k / n if n else 1.0) for b, (k, n) in kept.items()}
        return out


__all__ = ["BitwidthAggregator", "FLOAT_BITWIDTHS", "GROUP_WEIGHTINGS", "METHODS"]
