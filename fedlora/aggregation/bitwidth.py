"""Bitwidth-heterogeneous aggregation: fleets of 32/16/8/4/2-bit clients (ALGORITHMS.md, ProWD-style).

Pieces:

* ``fleet_bitwidths``: which client gets which bitwidth, from a mix such as ``{32: 0.5, 8: 0.5}``.
* ``ProgressiveDequantizer``: a chain of tiny trainable residual blocks that refines plain-dequantised
  low-bit tensors toward full precision, trained on the server each round from the round's
  high-precision uploads (no client data).
* ``selective_mask`` / ``masked_weighted_mean``: selective aggregation against the high-precision aggregate.
* ``BitwidthAggregator``: a ``Strategy`` that wraps any inner strategy (FFA, FedSVD, FedAvg, ...) and
  combines a mixed-bitwidth round by one of three methods (``naive``, ``grouped``, ``progressive``).

Conventions used throughout:

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

import copy
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fedlora.aggregation.base import LORA_B, ClientUpdate, Strategy, Tensors, kind_of, lora_pairs, weighted_sum
from fedlora.aggregation.quant import BITWIDTHS, INT_BITWIDTHS, fake_quantize, num_rows, qmax

METHODS = ("naive", "grouped", "progressive")
GROUP_WEIGHTINGS = ("uniform", "examples")
#: bitwidths that count as high precision (a valid reference for the dequantizer and the selective mask)
FLOAT_BITWIDTHS = (32, 16)


# ---- fleet composition ---------------------------------------------------------------------------------
def _parse_bits(b: Any) -> int:
    if isinstance(b, str) and b.strip().isdigit():
        b = int(b)
    if isinstance(b, bool) or not isinstance(b, int) or b not in BITWIDTHS:
        raise ValueError(f"clients.bitwidths: bitwidth {b!r} is not one of {list(BITWIDTHS)}")
    return b


def fleet_bitwidths(mix: Mapping[Any, float], num_clients: int, seed: int) -> list[int]:
    """Bitwidth of each of ``num_clients`` clients (index = client index), deterministic in ``seed``.

    Exact counts by the largest-remainder method (ties go to the higher bitwidth), then a seeded
    permutation so bitwidths are not correlated with client index (and hence with data shards).
    ``mix`` maps bitwidth → fraction; fractions must be ≥ 0 and sum to 1 (± 1e-6).
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 0:
        raise ValueError(f"clients.bitwidths: num_clients={num_clients!r} must be a non-negative integer")
    if not mix:
        raise ValueError("clients.bitwidths: the mix is empty; give at least one bitwidth with fraction 1")
    fracs: dict[int, float] = {}
    for b, f in mix.items():
        bits = _parse_bits(b)
        if bits in fracs:
            raise ValueError(f"clients.bitwidths: bitwidth {bits} given twice")
        try:
            f = float(f)
        except (TypeError, ValueError):
            raise ValueError(f"clients.bitwidths: fraction for {bits} bits is not a number: {f!r}") from None
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"clients.bitwidths: fraction for {bits} bits must be finite and >= 0, got {f}")
        fracs[bits] = f
    total = sum(fracs.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"clients.bitwidths: fractions must sum to 1, got {total:.6g} ({fracs})")
    exact = {b: round(f * num_clients, 9) for b, f in fracs.items()}
    counts = {b: int(math.floor(x)) for b, x in exact.items()}
    left = num_clients - sum(counts.values())
    for b in sorted(fracs, key=lambda b: (-(exact[b] - counts[b]), -b))[:left]:
        counts[b] += 1
    ordered = [b for b in sorted(counts, reverse=True) for _ in range(counts[b])]
    perm = torch.randperm(num_clients, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return [ordered[i] for i in perm]


# ---- progressive dequantizer ---------------------------------------------------------------------------
_NFEAT = 4


def _row_features(x: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element position u = x/m ∈ [−1, 1] and per-row context, for rows ``x`` (..., R, L) with row
    absmax ``m`` (..., R); leading dims index independent tensors.

    Context (scale-free, so the blocks do not depend on the magnitude of the update): row mean |x| / m,
    row rms / m, and log(s_row / median s_row over the tensor's non-zero rows) — where this row's scale
    sits among its tensor's rows.
    """
    pos = m > 0
    safe = torch.where(pos, m, torch.ones_like(m))
    u = x / safe.unsqueeze(-1)
    mean_abs = u.abs().mean(dim=-1)
    rms = u.pow(2).mean(dim=-1).sqrt()
    med = torch.where(pos, m, torch.full_like(m, float("nan"))).nanmedian(dim=-1, keepdim=True).values
    med = torch.where(torch.isnan(med), torch.ones_like(med), med)
    rel = torch.where(pos, torch.log(safe / med), torch.zeros_like(m)).clamp(-8, 8) / 4
    return u, torch.stack([mean_abs, rms, rel], dim=-1)


class _Block(nn.Module):
    """One rung: x ↦ clamp(x + s·f(u, ctx), −m, m) with f odd in u (f(−u) = −f(u): zeros stay zero,
    the map commutes with negation). s = m / q_b is the rung's grid step, so f is in units of one bin.
    Features per element: u = x/m (the position on the rung's grid, up to the factor q_b) and the row
    context of ``_row_features``; a 4 → hidden → 1 tanh MLP."""

    def __init__(self, bits: int, hidden: int, seed: int) -> None:
        super().__init__()
        self.bits = bits
        self.fc1 = nn.Linear(_NFEAT, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        g = torch.Generator().manual_seed(int(seed) * 1009 + bits)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(_NFEAT)
            self.fc1.weight.uniform_(-bound, bound, generator=g)
            self.fc1.bias.uniform_(-bound, bound, generator=g)
            self.fc2.weight.zero_()  # start as the identity (= plain dequantisation)
            self.fc2.bias.zero_()

    def _g(self, u: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        c = ctx.unsqueeze(-2).expand(*u.shape, ctx.shape[-1])
        feats = torch.cat([u.unsqueeze(-1), c], dim=-1)
        return self.fc2(torch.tanh(self.fc1(feats))).squeeze(-1)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        u, ctx = _row_features(x, m)
        f = self._g(u, ctx) - self._g(-u, ctx)
        mm = m.unsqueeze(-1)
        step = mm / qmax(self.bits)
        return torch.minimum(torch.maximum(x + step * f, -mm), mm)


class ProgressiveDequantizer(nn.Module):
    """Chain of residual blocks, one per integer rung in use: e.g. {32, 4} → [4→32];
    {32, 8, 4, 2} → [2→4, 4→8, 8→32]. A b-bit tensor enters at its own rung and passes every block above
    it, below the round's top bitwidth. fp16 tensors pass unchanged (their rounding error is below what a
    per-element map can recover).

    Blocks are keyed by their source bitwidth and persist once created (a rung that appears later gets
    a fresh identity block; a block's target rung is whatever sits above it in the current ladder).

    ``fit`` trains on the server from high-precision tensors only: each is quantised down to every rung
    (``quant.fake_quantize``) and the chain must reconstruct it. Loss per (tensor, rung) item =
    (raw error after refinement) / (raw error of plain dequantisation), plus for ``lora_B`` keys with a
    known A the same ratio in product space, ‖(B̂ − B)A‖_F² — so 1.0 means "no better than plain", and
    every rung counts equally whatever its absolute error. Blocks start as the identity (zero last
    layer). A seeded ``val_fraction`` of the rows is held out: early stopping keeps the parameters with the
    lowest held-out loss, and a per-rung gate (``enabled``) switches refinement on for a source rung only
    where it beat plain dequantisation on those held-out rows by at least ``min_gain`` (relative) with a
    per-row gain significant at ``min_z`` standard errors — else that rung passes unchanged. A replay
    buffer keeps the last ``replay_size`` high-precision tensors of earlier rounds
    (with AAᵀ for B keys) and trains on them too. Deterministic given ``seed`` (full-batch Adam; the
    validation split and any row subsampling above ``max_elements`` are seeded).

    State: ``state_dict()`` holds the block weights plus (as extra state) the ladder, gates, replay
    buffer and fit counter; ``load_state_dict`` recreates the blocks first.
    """

    def __init__(
        self,
        *,
        hidden: int = 16,
        seed: int = 0,
        replay_size: int = 64,
        max_elements: int = 200_000,
        val_fraction: float = 0.25,
        min_gain: float = 1e-3,
        min_z: float = 2.0,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.seed = int(seed)
        self.replay_size = replay_size
        self.max_elements = max_elements
        self.val_fraction = val_fraction
        self.min_gain = min_gain
        self.min_z = min_z
        self.blocks = nn.ModuleDict()
        #: per source rung: refine (True) or pass through unchanged (False); set by ``fit`` from held-out rows
        self.enabled: dict[int, bool] = {}
        self.replay: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        self.fits = 0

    # ---- ladder --------------------------------------------------------------------------------
    @property
    def ladder(self) -> list[int]:
        return sorted(int(k) for k in self.blocks)

    def ensure_rungs(self, bits: Iterable[int]) -> None:
        """Create identity blocks for integer bitwidths not yet in the ladder (16/32 need none)."""
        for b in sorted(set(bits)):
            if b not in BITWIDTHS:
                raise ValueError(f"bits={b!r}: allowed values are {list(BITWIDTHS)}")
            if b in INT_BITWIDTHS and str(b) not in self.blocks:
                self.blocks[str(b)] = _Block(b, self.hidden, self.seed)

    def chain(self, bits: int, top: int = 32) -> list[int]:
        """Source bitwidths of the blocks a ``bits``-bit tensor passes through when the target is ``top``."""
        return [b for b in self.ladder if bits <= b < top]

    # ---- forward -------------------------------------------------------------------------------
    def _run(self, rows: torch.Tensor, m: torch.Tensor, bits: int, top: int) -> torch.Tensor:
        x = rows
        for b in self.chain(bits, top):
            x = self.blocks[str(b)](x, m)
        return x

    def refine(self, x: torch.Tensor, bits: int, top: int = 32) -> torch.Tensor:
        """Refine a plain-decoded ``bits``-bit tensor toward ``top`` precision (same shape, fp32)."""
        if bits not in BITWIDTHS:
            raise ValueError(f"bits={bits!r}: allowed values are {list(BITWIDTHS)}")
        off = not self.enabled.get(bits, False)
        if bits not in INT_BITWIDTHS or x.numel() == 0 or not self.chain(bits, top) or off:
            return x.detach().to(torch.float32).clone()
        rows = x.detach().to(torch.float32).reshape(num_rows(x.shape), -1)
        m = rows.abs().amax(dim=1)
        with torch.no_grad():
            return self._run(rows, m, bits, top).reshape(x.shape)

    def forward(self, x: torch.Tensor, bits: int, top: int = 32) -> torch.Tensor:  # differentiable, no gate
        rows = x.reshape(num_rows(x.shape), -1)
        return self._run(rows, rows.detach().abs().amax(dim=-1), bits, top).reshape(x.shape)

    # ---- training ------------------------------------------------------------------------------
    def _items(
        self,
        targets: list[tuple[str, torch.Tensor, torch.Tensor | None]],
        rungs: list[int],
        gen: torch.Generator,
        val_fraction: float = 0.0,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(train, validation) items: each target quantised to every rung, stacked by (rung, row shape) so
        a step is a few batched ops. Validation takes a seeded ``val_fraction`` of each tensor's rows
        (single-row tensors: every 4th such tensor goes whole)."""
        total = sum(t.numel() for _, t, _ in targets) * max(len(rungs), 1)
        keep = min(1.0, self.max_elements / total) if total else 1.0
        groups: tuple[dict, dict] = ({}, {})
        singles = 0
        for _key, w, gram in targets:
            if w.numel() == 0 or not torch.any(w != 0):
                continue
            rows_w = w.reshape(num_rows(w.shape), -1)
            if keep < 1.0 and rows_w.shape[0] > 1:
                k = max(1, int(round(rows_w.shape[0] * keep)))
                rows_w = rows_w[torch.randperm(rows_w.shape[0], generator=gen)[:k]]
            parts = [rows_w, None]
            if val_fraction > 0:
                n = rows_w.shape[0]
                if n >= 2:
                    perm = torch.randperm(n, generator=gen)
                    nv = min(n - 1, max(1, int(round(n * val_fraction))))
                    parts = [rows_w[perm[nv:].sort().values], rows_w[perm[:nv].sort().values]]
                else:
                    singles += 1
                    parts = [None, rows_w] if singles % 4 == 0 else [rows_w, None]
            for split, rw in enumerate(parts):
                if rw is None:
                    continue
                for b in rungs:
                    xq = fake_quantize(rw, b)
                    err = xq - rw
                    raw0 = float(err.pow(2).sum())
                    if raw0 == 0.0:
                        continue
                    prod0 = float(((err @ gram) * err).sum()) if gram is not None else 0.0
                    groups[split].setdefault((b, *rw.shape), []).append((xq, rw, raw0, gram, prod0))
        out: tuple[list, list] = ([], [])
        for split in (0, 1):
            for (b, _r, ell), group in sorted(groups[split].items()):
                has = [g[3] is not None and g[4] > 0 for g in group]
                eye = torch.zeros(ell, ell)
                out[split].append(
                    {
                        "bits": b,
                        "x": torch.stack([g[0] for g in group]),
                        "w": torch.stack([g[1] for g in group]),
                        "m": torch.stack([g[0].abs().amax(dim=1) for g in group]),
                        "raw0": torch.tensor([g[2] for g in group]),
                        "gram": torch.stack([g[3] if h else eye for g, h in zip(group, has)]),
                        "prod0": torch.tensor([g[4] if h else 1.0 for g, h in zip(group, has)]),
                        "has_prod": torch.tensor(has, dtype=torch.float32),
                    }
                )
        return out

    def _loss(
        self, items: list[dict[str, Any]], top: int, gated: bool = False
    ) -> tuple[torch.Tensor, dict[int, float]]:
        """Mean over (tensor, rung) terms of error / plain-dequantisation error (raw and, for B keys with
        an A, product space); also that mean per source rung. ``gated``: rungs switched off pass as-is."""
        total = torch.zeros(())
        per: dict[int, list[float]] = {}
        n = 0.0
        for it in items:
            if gated and not self.enabled.get(it["bits"], False):
                x = it["x"]
            else:
                x = self._run(it["x"], it["m"], it["bits"], top)
            err = x - it["w"]
            raw = err.pow(2).sum(dim=(1, 2)) / it["raw0"]
            prod = it["has_prod"] * (torch.bmm(err, it["gram"]) * err).sum(dim=(1, 2)) / it["prod0"]
            term = raw.sum() + prod.sum()
            cnt = it["x"].shape[0] + float(it["has_prod"].sum())
            total = total + term
            n += cnt
            acc = per.setdefault(it["bits"], [0.0, 0.0])
            acc[0] += float(term.detach())
            acc[1] += cnt
        return total / max(n, 1.0), {b: v / c for b, (v, c) in sorted(per.items())}

    def _gates(self, items: list[dict[str, Any]], top: int) -> dict[int, dict[str, float]]:
        """Per source rung, on held-out items: the loss ratio and a one-sided z statistic of the per-row
        gain (plain − refined error, each row normalised by its tensor's plain error) over rows."""
        per: dict[int, list[torch.Tensor]] = {}
        terms: dict[int, float] = {}
        with torch.no_grad():
            for it in items:
                e_ref = self._run(it["x"], it["m"], it["bits"], top) - it["w"]
                e_pl = it["x"] - it["w"]
                gain = (e_pl.pow(2).sum(-1) - e_ref.pow(2).sum(-1)) / it["raw0"].unsqueeze(1)
                gram = it["gram"]
                pg = ((torch.bmm(e_pl, gram) * e_pl).sum(-1) - (torch.bmm(e_ref, gram) * e_ref).sum(-1))
                gain = gain + (it["has_prod"] / it["prod0"]).unsqueeze(1) * pg
                per.setdefault(it["bits"], []).append(gain.reshape(-1).to(torch.float64))
                terms[it["bits"]] = terms.get(it["bits"], 0.0) + it["x"].shape[0] + float(it["has_prod"].sum())
        out = {}
        for b, gs in per.items():
            g = torch.cat(gs)
            n = g.numel()
            se = float(g.std()) / math.sqrt(n) if n > 1 else math.inf
            total = float(g.sum())
            z = (float(g.mean()) / se) if se > 0 else (math.inf if total > 0 else 0.0)
            out[b] = {"ratio": 1.0 - total / terms[b], "z": z}
        return out

    @staticmethod
    def _targets(
        pairs: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        lora_A: Mapping[str, torch.Tensor] | None,
    ) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        seq = list(pairs.items()) if isinstance(pairs, Mapping) else list(pairs)
        out = []
        for key, w in seq:
            w = w.detach().to(torch.float32)
            gram = None
            a = (lora_A or {}).get(key)
            if a is not None and kind_of(key) == LORA_B and w.dim() == 2 and a.dim() == 2 and a.shape[0] == w.shape[1]:
                a = a.detach().to(torch.float32)
                gram = a @ a.T
            out.append((key, w, gram))
        return out

    def evaluate(
        self,
        pairs: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        lora_A: Mapping[str, torch.Tensor] | None = None,
        *,
        top: int = 32,
    ) -> dict[int, float]:
        """Per source rung: error of ``refine`` relative to plain dequantisation on ``pairs`` (1.0 = no
        gain, < 1 better), the same loss as ``fit`` (raw + product space), gates applied."""
        rungs = [b for b in self.ladder if b < top]
        items, _ = self._items(self._targets(pairs, lora_A), rungs, torch.Generator().manual_seed(self.seed))
        with torch.no_grad():
            _, per = self._loss(items, top, gated=True)
        return {b: per.get(b, 1.0) for b in rungs}

    def fit(
        self,
        pairs: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
        lora_A: Mapping[str, torch.Tensor] | None = None,
        steps: int = 150,
        lr: float = 1e-2,
        *,
        top: int = 32,
        remember: bool = True,
    ) -> dict[str, Any]:
        """Train the chain on high-precision tensors (this round's ``pairs`` plus the replay buffer).

        ``pairs``: ``(key, tensor)`` items (or a ``{key: tensor}`` mapping) of high-precision uploads —
        the same key may repeat (one per client). ``lora_A``: ``{B key: A}`` — the A that multiplies that
        B (r × d_in), for the product-space term; ``None`` for raw error only. ``top``: the bitwidth the
        chain reconstructs toward. ``remember``: add ``pairs`` to the replay buffer afterwards.

        A seeded quarter of the rows is held out: the parameters kept are those with the lowest held-out
        loss (early stopping), and each source rung is switched on (``enabled``) only if its held-out
        loss beats plain dequantisation by at least ``min_gain`` and the per-row gain is ``min_z`` standard
        errors above zero — otherwise that rung's tensors pass through unchanged, so refinement is only
        used where it measurably helps on held-out data like the round's.
        Returns stats: ``fit_s``, ``loss_before`` / ``loss_after`` (training, 1.0 = plain), ``val_ratio``
        and ``val_z`` per rung, ``enabled`` per rung, ``terms`` (tensor × rung training terms), ``steps``.
        """
        t0 = time.perf_counter()
        new = self._targets(pairs, lora_A)
        rungs = [b for b in self.ladder if b < top]
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.fits)
        train, val = self._items(new + self.replay, rungs, gen, val_fraction=self.val_fraction)
        stats: dict[str, Any] = {
            "terms": sum(int(it["x"].shape[0]) for it in train),
            "steps": 0,
            "loss_before": 1.0,
            "loss_after": 1.0,
            "val_ratio": {},
        }
        if train and steps > 0:
            params = [p for b in rungs for p in self.blocks[str(b)].parameters()]
            opt = torch.optim.Adam(params, lr=lr)
            best, best_state, best_per = math.inf, None, {}
            for step in range(steps + 1):
                opt.zero_grad()
                loss, per = self._loss(train, top)
                if step == 0:
                    stats["loss_before"] = float(loss.detach())
                score = float(loss.detach())
                if val:
                    with torch.no_grad():
                        vloss, per = self._loss(val, top)
                    score = float(vloss)
                if score < best:
                    best, best_per = score, per
                    best_state = copy.deepcopy(self.blocks.state_dict())
                    stats["loss_after"] = float(loss.detach())
                if step == steps or not math.isfinite(score):
                    break
                loss.backward()
                opt.step()
            if best_state is not None:
                self.blocks.load_state_dict(best_state)
            stats["steps"] = steps
            gates = self._gates(val, top) if val else {}
            stats["val_ratio"] = {b: g["ratio"] for b, g in gates.items()}
            stats["val_z"] = {b: g["z"] for b, g in gates.items()}
            for b in rungs:
                g = gates.get(b)
                self.enabled[b] = bool(g is not None and g["ratio"] < 1.0 - self.min_gain and g["z"] > self.min_z)
        stats["enabled"] = {b: self.enabled.get(b, False) for b in rungs}
        if remember:
            buf = self.replay + [(k, w.clone(), g) for k, w, g in new]
            self.replay = buf[-self.replay_size :] if self.replay_size else []
        self.fits += 1
        stats["fit_s"] = time.perf_counter() - t0
        return stats

    # ---- state ---------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        return {"ladder": self.ladder, "enabled": dict(self.enabled), "replay": list(self.replay), "fits": self.fits}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.enabled = {int(b): bool(v) for b, v in state.get("enabled", {}).items()}
        self.replay = list(state.get("replay", []))
        self.fits = int(state.get("fits", 0))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        extra = state_dict.get("_extra_state")
        if isinstance(extra, Mapping):
            self.ensure_rungs(extra.get("ladder", []))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# ---- selective aggregation -----------------------------------------------------------------------------
def selective_mask(delta: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Keep (True) the elements of a low-bit ``delta`` that do not point against ``reference``.

    Dropped exactly where the signs are strictly opposite (delta·reference < 0). Kept where they agree,
    where the reference is 0 (no opinion), and where the delta is 0 (quantised to zero: no direction).
    """
    return (delta * reference) >= 0


def masked_weighted_mean(
    deltas: list[torch.Tensor], weights: torch.Tensor | list[float], masks: list[torch.Tensor], fallback: torch.Tensor
) -> torch.Tensor:
    """Σ_k p_k m_k Δ_k / Σ_k p_k m_k elementwise (float64), ``fallback`` where no client keeps the element."""
    w = torch.as_tensor(weights, dtype=torch.float64).tolist()
    num = torch.zeros(fallback.shape, dtype=torch.float64)
    den = torch.zeros(fallback.shape, dtype=torch.float64)
    for p, d, m in zip(w, deltas, masks, strict=True):
        mk = m.to(torch.float64) * p
        num += mk * d.to(torch.float64)
        den += mk
    out = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), fallback.to(torch.float64))
    return out.to(fallback.dtype)


# ---- the wrapper strategy ------------------------------------------------------------------------------
def _bits_of(u: ClientUpdate) -> int:
    b = u.meta.get("bits") if isinstance(u.meta, Mapping) else None
    if isinstance(b, bool) or not isinstance(b, int) or b not in BITWIDTHS:
        raise ValueError(f"update from client {u.client_id!r}: meta['bits']={b!r} is not one of {list(BITWIDTHS)}")
    return b


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
            raise ValueError(f"strategy.bitwidth.method={method!r}: allowed values are {list(METHODS)}")
        if group_weighting not in GROUP_WEIGHTINGS:
            raise ValueError(
                f"strategy.bitwidth.group_weighting={group_weighting!r}: allowed values are {list(GROUP_WEIGHTINGS)}"
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

    # ---- forwarding ----------------------------------------------------------------------------
    def __getattr__(self, item: str) -> Any:  # only reached for attributes not found normally
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(item)
        return getattr(inner, item)

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

    def init_global(self, initial: Tensors) -> Tensors:
        return self.inner.init_global(initial)

    def weights(self, updates: list[ClientUpdate]) -> torch.Tensor:
        return self.inner.weights(updates)

    def downlink(self, global_state: Tensors, client_round: int | None) -> tuple[Tensors, dict[str, Any]]:
        return self.inner.downlink(global_state, client_round)

    def client_sync(self, held: Tensors | None, payload: Tensors, meta: dict[str, Any]) -> Tensors:
        return self.inner.client_sync(held, payload, meta)

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
        # LoRA-aware loss: the current global A of each B key's layer
        lora_A: dict[str, torch.Tensor] = {}
        try:
            for a_key, b_key in lora_pairs(global_state).values():
                lora_A[b_key] = global_state[a_key]
        except ValueError:
            pass
        if self.dequantize:
            self.dequantizer.ensure_rungs(bits)
            pairs = [(k, updates[i].deltas[k]) for i in hi for k in sorted(updates[i].deltas)]
            fit = self.dequantizer.fit(pairs, lora_A, steps=self.dequantizer_steps, lr=self.dequantizer_lr, top=top)
            stats["dequantizer_fit_s"] = fit["fit_s"]
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


__all__ = [
    "BitwidthAggregator",
    "METHODS",
    "ProgressiveDequantizer",
    "fleet_bitwidths",
    "masked_weighted_mean",
    "selective_mask",
]
