"""The progressive dequantizer (ProWD-style): a chain of tiny residual blocks that refines plain-dequantised
low-bit tensors toward full precision, trained on the server each round from the round's high-precision
uploads (no client data). See ``ProgressiveDequantizer``."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fedlora.aggregation.base import LORA_B, kind_of
from fedlora.aggregation.quant import INT_BITWIDTHS, check_bits, fake_quantize, num_rows, qmax

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
            if check_bits(b) in INT_BITWIDTHS and str(b) not in self.blocks:
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
        check_bits(bits)
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
            best, best_state = math.inf, None
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
                    best = score
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
        if isinstance(extra, Mapping):  # exactly the state's ladder: rungs created since are dropped
            ladder = [int(b) for b in extra.get("ladder", [])]
            for b in [b for b in self.ladder if b not in ladder]:
                del self.blocks[str(b)]
            self.ensure_rungs(ladder)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
