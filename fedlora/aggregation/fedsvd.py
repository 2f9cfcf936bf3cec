"""FedSVD: FFA-LoRA plus a server-side re-factorisation of every LoRA pair.

Round t (see ALGORITHMS.md, "FedSVD"): clients train B with A_t frozen and upload ΔB_k. The server forms
B' = B_t + Σ p_k ΔB_k (the head likewise) and, every ``svd_every`` rounds, re-factorises the rank-r product
B'·A_t = U Σ Vᵀ into B_{t+1} = U·diag(Σ), A_{t+1} = Vᵀ (orthonormal rows). The model does not move
(B_{t+1} A_{t+1} = B' A_t up to rounding); only its parameterisation does.

The SVD is never taken of the dense d_out × d_in product: ``refactor`` works on the factors (two thin QRs and
an r × r SVD, O((d_out + d_in)·r²) per layer), batched over all layers of one shape.

Numerics: fp32 (and half-precision) factors are refactored in **fp32**, fp64 factors in fp64. Householder QR
and the r × r SVD are backward stable, so the product error is a few fp32 ulps relative to ‖B‖·‖A‖; with A
well conditioned (Kaiming-initialised in round 0, orthonormal afterwards) that is ≲ 1e-6 relative to
‖B'A_t‖ (tests require ≤ 1e-5). float64 internally would cost 2-5× the time on the big factors and the result
is cast back to fp32 anyway. Each refactor re-orthonormalises A from scratch, so rounding does not accumulate
in A's orthonormality.

Traffic: a client that holds version t-1 gets only B' (and the head) with ``meta["recompute"]`` and runs the
same ``refactor`` on (B', its A_t) itself. The computation is deterministic (same code, same grouping, no
randomness; independent of the torch thread count on the CPU build we use), so its (B_{t+1}, A_{t+1}) is
bit-identical to the server's; ``meta["digest"]`` lets the client check that and log a warning if a platform
difference (e.g. a different BLAS/LAPACK build or CPU dispatch, or a quantised downlink) breaks it.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable

import torch

from fedlora.aggregation.base import (
    LORA_A,
    LORA_B,
    ClientUpdate,
    Tensors,
    apply_mean_delta,
    kind_of,
    lora_pairs,
    register,
)
from fedlora.aggregation.ffa import FFALoRA

log = logging.getLogger(__name__)

Refactor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(B: torch.Tensor, A: torch.Tensor) -> int:
    if B.dim() < 2 or A.dim() < 2:
        raise ValueError(f"refactor needs matrices, got B {tuple(B.shape)} and A {tuple(A.shape)}")
    r = B.shape[-1]
    if A.shape[-2] != r or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(
            f"refactor: B {tuple(B.shape)} and A {tuple(A.shape)} do not pair (B is ..., d_out, r; A is ..., r, d_in)"
        )
    d_out, d_in = B.shape[-2], A.shape[-1]
    if r > min(d_out, d_in):
        raise ValueError(f"FedSVD needs r <= min(d_out, d_in); got r={r}, d_out={d_out}, d_in={d_in}")
    return r


def _row_signs(A_new: torch.Tensor) -> torch.Tensor:
    """±1 per row of A_new ([..., r, 1]) that makes each row's largest-|.| entry positive (on an exact tie
    between a positive and a negative extreme, the positive one wins). One pass, no temporaries."""
    lo, hi = torch.aminmax(A_new, dim=-1, keepdim=True)
    return torch.where(-lo > hi, -1.0, 1.0).to(A_new.dtype)


def _fix_signs(B_new: torch.Tensor, A_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic sign convention (see ``_row_signs``); the matching column of B_new flips with the row
    of A_new, so the product is unchanged (±1 scaling is exact). In place."""
    s = _row_signs(A_new)
    A_new.mul_(s)
    B_new.mul_(s.mT)
    return B_new, A_new


def refactor(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact re-factorisation of B·A (B: [..., d_out, r], A: [..., r, d_in]) without forming the product.

    QR(B) = Q_B R_B, QR(Aᵀ) = Q_A R_A, SVD of the r × r core R_B R_Aᵀ = U' Σ V'ᵀ;
    B_new = Q_B U' diag(Σ), A_new = (Q_A V')ᵀ, so B_new A_new = B A and A_new has orthonormal rows.
    Sign convention: the largest-|.| entry of every row of A_new is positive (column of B_new flipped to match).
    Rank deficiency is harmless: Householder QR returns orthonormal Q even for zero/rank-deficient input, so a
    zero singular value leaves a valid orthonormal row of A_new and a zero column of B_new (B = 0 gives
    B_new = 0 and orthonormal A_new). Leading dimensions are batch dimensions (one batched LAPACK call per
    step). Computes in fp32 (fp64 for fp64 input); output dtypes = input dtypes.
    """
    _check_shapes(B, A)
    ct = _compute_dtype(B.dtype)
    Q_B, R_B = torch.linalg.qr(B.to(ct))  # [..., d_out, r], [..., r, r]
    Q_A, R_A = torch.linalg.qr(A.to(ct).mT)  # [..., d_in, r], [..., r, r]; A.mT is already column-major
    U, S, Vh = torch.linalg.svd(R_B @ R_A.mT)  # the r × r core
    A_new = Vh @ Q_A.mT
    sign = _row_signs(A_new)
    A_new.mul_(sign)
    # the sign goes into the r × r core, not over the d_out × r result: (U diag(S·sign)), exact
    B_new = Q_B @ (U * (S.unsqueeze(-1) * sign).mT)
    return B_new.to(B.dtype), A_new.to(A.dtype)


def _per_matrix(fn: Refactor, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a dense-product route one matrix at a time (a batch of dense products would not fit in memory
    at LLaMA sizes: 64 × 4096² fp32 is 4 GiB)."""
    if B.dim() == 2:
        return fn(B, A)
    lead = B.shape[:-2]
    outs = [fn(b, a) for b, a in zip(B.reshape(-1, *B.shape[-2:]), A.reshape(-1, *A.shape[-2:]))]
    return (torch.stack([o[0] for o in outs]).reshape(*lead, *B.shape[-2:]),
            torch.stack([o[1] for o in outs]).reshape(*lead, *A.shape[-2:]))


def _dense_one(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = B.shape[-1]
    ct = _compute_dtype(B.dtype)
    U, S, Vh = torch.linalg.svd(B.to(ct) @ A.to(ct), full_matrices=False)
    B_new = U[:, :r] * S[:r]
    A_new = Vh[:r].contiguous()
    B_new, A_new = _fix_signs(B_new, A_new)
    return B_new.to(B.dtype), A_new.to(A.dtype)


def _lowrank_one(B: torch.Tensor, A: torch.Tensor, niter: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    r = B.shape[-1]
    ct = _compute_dtype(B.dtype)
    U, S, V = torch.svd_lowrank(B.to(ct) @ A.to(ct), q=r, niter=niter)
    B_new = U * S
    A_new = V.mT.contiguous()
    B_new, A_new = _fix_signs(B_new, A_new)
    return B_new.to(B.dtype), A_new.to(A.dtype)


def dense_refactor(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference route for tests and benchmarks only: thin SVD of the dense d_out × d_in product
    (O(d_out·d_in·min(d_out, d_in)) per layer; one layer at a time)."""
    _check_shapes(B, A)
    return _per_matrix(_dense_one, B, A)


def lowrank_refactor(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Comparison route for benchmarks only: randomised ``torch.svd_lowrank(q=r, niter=2)`` of the dense
    product, one layer at a time (random: not reproducible on a client; exact only because rank ≤ r)."""
    _check_shapes(B, A)
    return _per_matrix(_lowrank_one, B, A)


ROUTES: dict[str, Refactor] = {"factored": refactor, "dense": dense_refactor, "lowrank": lowrank_refactor}


def refactor_state(state: Tensors, fn: Refactor = refactor) -> Tensors:
    """Refactor every LoRA pair of ``state``; returns only the new A and B tensors.

    Pairs with equal (B shape, A shape, dtype) are stacked and refactored in one batched call, in the stable
    order of ``lora_pairs``, so the server and a recomputing client run exactly the same computation.
    """
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for a_key, b_key in lora_pairs(state).values():
        B, A = state[b_key], state[a_key]
        groups.setdefault((tuple(B.shape), tuple(A.shape), B.dtype, A.dtype), []).append((a_key, b_key))
    out: Tensors = {}
    for pairs in groups.values():
        if len(pairs) == 1:
            a_key, b_key = pairs[0]
            out[b_key], out[a_key] = fn(state[b_key], state[a_key])
            continue
        B_new, A_new = fn(torch.stack([state[b] for _, b in pairs]), torch.stack([state[a] for a, _ in pairs]))
        # unbind: contiguous views into one batch tensor per group (no per-layer copies)
        for (a_key, b_key), Bi, Ai in zip(pairs, B_new.unbind(0), A_new.unbind(0)):
            out[b_key], out[a_key] = Bi, Ai
    return out


def lora_digest(state: Tensors) -> str:
    """A short hash of the exact bits of every LoRA factor in ``state`` (sorted by key)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(state):
        if kind_of(k) in (LORA_A, LORA_B):
            t = state[k].detach().contiguous().reshape(-1)
            h.update(k.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


@register("fedsvd")
class FedSVD(FFALoRA):
    """FFA-LoRA with a server SVD re-factorisation every ``svd_every`` aggregations (0: never = FFA-LoRA).

    Internal state: ``version`` (aggregations done; 0 = initial global), the version at which A last changed,
    and the pre-refactor B' of the last aggregation when it refactored (what a client one version behind
    needs to recompute the new factors itself).
    """

    #: which refactor route ``aggregate`` uses; benchmarks may set it per instance (not a config parameter).
    #: Clients recompute with the factored route only, so other routes always send A down.
    route: str = "factored"

    def __init__(self, *, svd_every: int = 1, **params: Any) -> None:
        super().__init__(**params)
        if isinstance(svd_every, bool) or not isinstance(svd_every, int):
            raise ValueError(f"strategy.params.svd_every={svd_every!r}: must be an integer >= 0 (0 = never refactor)")
        if svd_every < 0:
            raise ValueError(f"strategy.params.svd_every={svd_every}: must be >= 0 (0 = never refactor)")
        self.svd_every = svd_every
        self.version = 0
        self.a_version = 0  # version at which A last changed
        # B' before the refactor of aggregation ``version`` (None: that aggregation did not refactor)
        self.pre_b: Tensors | None = None
        self._digest: tuple[int, str] | None = None  # cached (version, digest of the refactored factors)

    # ---- server half ---------------------------------------------------------------------------
    def aggregate(self, global_state: Tensors, updates: list[ClientUpdate]) -> Tensors:
        out = apply_mean_delta(self, global_state, updates)  # B' and head; A passes through
        version = self.version + 1
        if self.svd_every and version % self.svd_every == 0:
            pre_b = {b: out[b] for _, b in lora_pairs(out).values()}
            out.update(refactor_state(out, ROUTES[self.route]))
            self.pre_b = pre_b
            self.a_version = version
        else:
            self.pre_b = None
        self.version = version
        self._digest = None
        return out

    def downlink(self, global_state: Tensors, client_round: int | None) -> tuple[Tensors, dict[str, Any]]:
        """``client_round``: the global version the client holds (None: nothing).

        * holds the current version: nothing;
        * holds a version at or after A last changed: B and head only (as FFA-LoRA);
        * one version behind and that aggregation refactored: the pre-refactor B' and the head, with
          ``{"recompute": True, "digest": ...}``; the client refactors (B', its A) itself;
        * anything else (never synced, missed rounds, unknown version): the full global state, A included.
        """
        v = self.version
        if client_round is None or client_round < 0 or client_round > v:
            return dict(global_state), {}
        if client_round == v:
            return {}, {}
        shared = {k: t for k, t in global_state.items() if self.shares_key(k)}
        if client_round >= self.a_version:
            return shared, {}
        if client_round == v - 1 and self.pre_b is not None and self.route == "factored":
            if self._digest is None or self._digest[0] != v:
                self._digest = (v, lora_digest(global_state))
            return {**shared, **self.pre_b}, {"recompute": True, "digest": self._digest[1]}
        return dict(global_state), {}

    # ---- client half ---------------------------------------------------------------------------
    def client_sync(self, held: Tensors | None, payload: Tensors, meta: dict[str, Any]) -> Tensors:
        if not meta.get("recompute"):
            return super().client_sync(held, payload, meta)
        if held is None:
            raise ValueError("FedSVD recompute payload needs the client's held global state (its A), got none")
        out = dict(held)
        out.update(payload)  # B' (pre-refactor) and head
        out.update(refactor_state(out, refactor))
        want = meta.get("digest")
        if want is not None:
            got = lora_digest(out)
            if got != want:
                log.warning(
                    "FedSVD: locally recomputed factors differ from the server's (digest %s != %s); "
                    "expected only with a quantised downlink or a different linear-algebra build",
                    got, want,
                )
        return out

    # ---- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version, "a_version": self.a_version, "pre_b": self.pre_b}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        want = {"version", "a_version", "pre_b"}
        if set(state) != want:
            raise ValueError(f"strategy 'fedsvd' state needs keys {sorted(want)}, got {sorted(state)}")
        version, a_version = int(state["version"]), int(state["a_version"])
        if not 0 <= a_version <= version:
            raise ValueError(f"strategy 'fedsvd' state: inconsistent versions a_version={a_version}, version={version}")
        self.version, self.a_version = version, a_version
        self.pre_b = None if state["pre_b"] is None else dict(state["pre_b"])
        self._digest = None
