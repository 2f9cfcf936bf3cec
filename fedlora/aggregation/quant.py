"""Bitwidth codecs for adapter tensors: what a b-bit client puts on the wire, and how the server reads it.

Pure torch, no Flower. One codec per bitwidth b ∈ ``BITWIDTHS``:

* ``32``: ``{"values": fp32}`` (flat). Exact.
* ``16``: ``{"values": fp16}`` (flat). Values beyond ±65504 saturate to ±65504 (never ``inf``); values below
  the fp16 subnormal range flush to 0.
* ``8`` / ``4`` / ``2``: uniform symmetric quantisation **per row**, integer levels −q..q with
  q = 2^(b−1) − 1 (127, 7, 1: zero is always a level, the grid is symmetric, one code of the 2^b is unused).

  - A *row* is a slice along dim 0: a 2-D weight ``(d_out, d_in)`` has ``d_out`` rows of ``d_in`` elements;
    a ≥3-D tensor has ``shape[0]`` rows of ``numel / shape[0]`` elements; a 1-D tensor (a bias) and a 0-d
    scalar are **one row**.
  - scale s_r = max|row_r| / q, stored as fp16 and **rounded up** to the next fp16 value, so that
    |w| ≤ q·s_r always holds with the stored scale: codes are computed with the fp16 scale the decoder will
    use, nothing is clipped, and the error is at most s_r / 2 per element. A scale that would underflow
    fp16 becomes the smallest subnormal (2^-24) instead of 0; a scale that would overflow fp16 saturates at
    65504 (elements beyond q·65504 are then clipped, and ``error_bound`` says so). An all-zero row has
    scale 0 and all codes 0.
  - codes ``q_i + q`` ∈ [0, 2q] are packed b bits each, little-endian within a byte, row-major over the
    whole tensor, into one flat ``uint8`` tensor ``"codes"``; the last byte is zero-padded.
  - payload: ``ceil(numel·b/8)`` code bytes + ``2·rows`` scale bytes, exactly (``payload_bytes``).

``decode`` validates everything it reads (dtypes, sizes, code range, padding bits, finite non-negative
scales) and raises ``ValueError`` instead of decoding a malformed payload into garbage.

``encode_tensors`` / ``decode_tensors`` flatten a named state dict into ``{f"{key}::{part}": tensor}`` (a
flat dict a Flower ``ArrayRecord`` can carry) and back, checking that every expected key arrives with
exactly its parts and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

BITWIDTHS: tuple[int, ...] = (32, 16, 8, 4, 2)
#: bitwidths coded as integer levels with a per-row fp16 scale
INT_BITWIDTHS: tuple[int, ...] = (8, 4, 2)
SEP = "::"
FP16_MAX = 65504.0
#: smallest positive fp16 (subnormal)
FP16_TINY = 2.0**-24

_PARTS = {32: ("values",), 16: ("values",), 8: ("codes", "scales"), 4: ("codes", "scales"), 2: ("codes", "scales")}


def check_bits(bits: Any, key: str = "bits") -> int:
    """``bits`` if it is a bitwidth of the ladder, else a ``ValueError`` naming ``key`` and the ladder (the one
    place the ladder is checked)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITWIDTHS:
        raise ValueError(f"{key}={bits!r}: allowed values are {list(BITWIDTHS)}")
    return bits


def qmax(bits: int) -> int:
    """Largest integer level of a b-bit symmetric grid (127, 7, 1 for 8, 4, 2 bits)."""
    if check_bits(bits) not in INT_BITWIDTHS:
        raise ValueError(f"bits={bits}: only {list(INT_BITWIDTHS)} are integer-quantised")
    return 2 ** (bits - 1) - 1


def num_rows(shape: torch.Size | tuple[int, ...]) -> int:
    """Rows of the per-row codec: ``shape[0]`` for ≥2-D tensors, 1 for 1-D and 0-d tensors."""
    shape = tuple(shape)
    return shape[0] if len(shape) >= 2 else 1


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    rows = num_rows(t.shape)
    return t.reshape(rows, t.numel() // rows if rows else 0)


def _as_fp32(t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"can only quantise floating-point tensors, got dtype {t.dtype}")
    t = t.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError("cannot quantise a tensor with non-finite values (nan/inf)")
    return t


def _fp16_scales(absmax: torch.Tensor, q: int) -> torch.Tensor:
    """Per-row fp16 scale ≥ absmax / q (rounded up; subnormal floor for non-zero rows; saturates at 65504)."""
    exact = absmax.to(torch.float64) / q
    s16 = exact.clamp(max=FP16_MAX).to(torch.float16)
    low = s16.to(torch.float64) < exact
    if low.any():
        up = torch.nextafter(s16, torch.full_like(s16, float("inf")))
        s16 = torch.where(low, up, s16)
    s16 = s16.clamp(max=FP16_MAX)  # nextafter(65504) would be inf
    # a non-zero row never gets scale 0 (it would lose the row entirely)
    s16 = torch.where((absmax > 0) & (s16 == 0), torch.full_like(s16, FP16_TINY), s16)
    return s16


def _pack(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) (flat) into uint8, little-endian within each byte."""
    per = 8 // bits
    n = u.numel()
    pad = (-n) % per
    u = u.to(torch.int32)
    if pad:
        u = torch.cat([u, torch.zeros(pad, dtype=torch.int32)])
    u = u.reshape(-1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (u << shifts).sum(dim=1).to(torch.uint8)


def _unpack(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    u = (codes.to(torch.int32).unsqueeze(1) >> shifts) & (2**bits - 1)
    return u.reshape(-1)[: n + ((-n) % per)]


def encode(t: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Encode one tensor at ``bits`` (see the module docstring for the exact format)."""
    bits = check_bits(bits)
    t = _as_fp32(t)
    if bits == 32:
        return {"values": t.reshape(-1).clone()}
    if bits == 16:
        return {"values": t.reshape(-1).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)}
    q = qmax(bits)
    rows = _rows_view(t)
    if rows.numel() == 0:
        scales = torch.zeros(rows.shape[0], dtype=torch.float16)
        return {"codes": torch.zeros(0, dtype=torch.uint8), "scales": scales}
    absmax = rows.abs().amax(dim=1)
    scales = _fp16_scales(absmax, q)
    s64 = scales.to(torch.float64).unsqueeze(1)
    safe = torch.where(s64 > 0, s64, torch.ones_like(s64))
    levels = torch.round(rows.to(torch.float64) / safe).clamp(-q, q)
    levels = torch.where(s64 > 0, levels, torch.zeros_like(levels))
    u = (levels + q).to(torch.int32).reshape(-1)
    return {"codes": _pack(u, bits), "scales": scales}


def _expect(enc: Mapping[str, torch.Tensor], part: str, dtype: torch.dtype, numel: int, what: str) -> torch.Tensor:
    if part not in enc:
        raise ValueError(f"{what}: missing part {part!r}")
    x = enc[part]
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what}: part {part!r} is a {type(x).__name__}, not a tensor")
    if x.dtype != dtype:
        raise ValueError(f"{what}: part {part!r} has dtype {x.dtype}, expected {dtype}")
    if x.numel() != numel:
        raise ValueError(f"{what}: part {part!r} has {x.numel()} elements, expected {numel}")
    return x.detach().to("cpu").reshape(-1)


def decode(
    enc: Mapping[str, torch.Tensor], bits: int, shape: torch.Size | tuple[int, ...], *, what: str = "payload"
) -> torch.Tensor:
    """Decode ``encode(t, bits)`` back to an fp32 tensor of ``shape``; raises ``ValueError`` if malformed."""
    bits = check_bits(bits)
    shape = torch.Size(shape)
    numel = math.prod(shape)
    extra = sorted(set(enc) - set(_PARTS[bits]))
    if extra:
        raise ValueError(f"{what}: unexpected parts {extra} for {bits}-bit (expected {list(_PARTS[bits])})")
    if bits in (32, 16):
        v = _expect(enc, "values", torch.float32 if bits == 32 else torch.float16, numel, what)
        if not torch.isfinite(v).all():
            raise ValueError(f"{what}: non-finite values")
        return v.to(torch.float32).reshape(shape).clone()
    q = qmax(bits)
    rows = num_rows(shape)
    codes = _expect(enc, "codes", torch.uint8, math.ceil(numel * bits / 8), what)
    scales = _expect(enc, "scales", torch.float16, rows, what)
    if not torch.isfinite(scales).all() or (scales < 0).any():
        raise ValueError(f"{what}: scales must be finite and non-negative")
    u = _unpack(codes, bits, numel)
    if (u[numel:] != 0).any():
        raise ValueError(f"{what}: non-zero padding bits after the last code")
    u = u[:numel]
    if (u > 2 * q).any():
        raise ValueError(f"{what}: code out of range for {bits}-bit (max {2 * q})")
    if numel == 0:
        return torch.zeros(shape, dtype=torch.float32)
    levels = (u - q).to(torch.float32).reshape(rows, numel // rows)
    if ((scales == 0).unsqueeze(1) & (levels != 0)).any():
        raise ValueError(f"{what}: a row with scale 0 has non-zero codes (an all-zero row has codes q only)")
    # level·scale is exact in fp32 (≤ 8 + 11 significant bits)
    return (levels * scales.to(torch.float32).unsqueeze(1)).reshape(shape)


def fake_quantize(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``decode(encode(t, bits))``: what the server sees of ``t`` from a ``bits``-bit client (fp32)."""
    return decode(encode(t, bits), bits, t.shape)


def payload_bytes(enc: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire for an encoded tensor (or a flat ``encode_tensors`` dict)."""
    return sum(int(x.numel()) * x.element_size() for x in enc.values())


def expected_payload_bytes(shape: torch.Size | tuple[int, ...], bits: int) -> int:
    """``payload_bytes(encode(t, bits))`` for any tensor ``t`` of ``shape``, without encoding it."""
    bits = check_bits(bits)
    numel = math.prod(tuple(shape))
    if bits in (32, 16):
        return numel * bits // 8
    return math.ceil(numel * bits / 8) + 2 * num_rows(shape)


def error_bound(t: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-element bound on ``|fake_quantize(t, bits) − t|`` (fp32, shape of ``t``).

    * 32: 0.
    * 16: half an fp16 ulp — |t|·2^-11 (normal range) or 2^-25 (subnormal range) — plus any saturation
      excess max(|t| − 65504, 0).
    * 8/4/2: s_r / 2 with s_r the row's stored fp16 scale, or the clipping excess |t| − q·s_r where the
      scale saturated at 65504 (the larger of the two).

    A relative slack of 2^-20·|t| (plus 2^-40 absolute) covers fp32 evaluation of the difference.
    """
    bits = check_bits(bits)
    t = _as_fp32(t)
    a = t.abs().to(torch.float64)
    if bits == 32:
        return torch.zeros_like(t)
    slack = a * 2.0**-20 + 2.0**-40
    if bits == 16:
        bound = torch.maximum(a * 2.0**-11, torch.full_like(a, 2.0**-25)) + (a - FP16_MAX).clamp(min=0)
        return (bound + slack).to(torch.float32)
    q = qmax(bits)
    rows = _rows_view(a)
    if rows.numel() == 0:
        return torch.zeros_like(t)
    s = _fp16_scales(rows.amax(dim=1).to(torch.float32), q).to(torch.float64).unsqueeze(1)
    bound = torch.maximum(s / 2, rows - q * s)
    return (bound.reshape(t.shape) + slack).to(torch.float32)


# ---- named state dicts <-> flat wire dicts -------------------------------------------------------------
def encode_tensors(tensors: Mapping[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Encode every tensor; returns a flat ``{f"{key}::{part}": tensor}`` dict (parts per ``bits``)."""
    bits = check_bits(bits)
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if SEP in key:
            raise ValueError(f"tensor key {key!r} contains the part separator {SEP!r}")
        for part, x in encode(t, bits).items():
            out[f"{key}{SEP}{part}"] = x
    return out


def decode_tensors(
    flat: Mapping[str, torch.Tensor], bits: int, shapes: Mapping[str, torch.Size | tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Inverse of ``encode_tensors``. ``shapes`` names exactly the keys expected (no more, no fewer).

    Raises ``ValueError`` naming the key for a missing key, a missing or unexpected part, a flat key that
    is not ``key::part``, or any malformed part (dtype, size, code range, padding, scales).
    """
    bits = check_bits(bits)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for fk, x in flat.items():
        if not isinstance(fk, str) or SEP not in fk:
            raise ValueError(f"payload entry {fk!r} is not of the form 'key{SEP}part'")
        key, part = fk.rsplit(SEP, 1)
        grouped.setdefault(key, {})[part] = x
    unexpected = sorted(set(grouped) - set(shapes))
    if unexpected:
        raise ValueError(f"payload has unexpected keys: {unexpected}")
    missing = sorted(set(shapes) - set(grouped))
    if missing:
        raise ValueError(f"payload is missing keys: {missing}")
    out = {}
    for key, shape in shapes.items():
        parts = grouped[key]
        for p in _PARTS[bits]:
            if p not in parts:
                raise ValueError(f"{key}: missing part {p!r} for {bits}-bit payload")
        out[key] = decode(parts, bits, shape, what=key)
    return out


__all__ = [
    "BITWIDTHS",
    "check_bits",
    "INT_BITWIDTHS",
    "decode",
    "decode_tensors",
    "encode",
    "encode_tensors",
    "error_bound",
    "expected_payload_bytes",
    "fake_quantize",
    "num_rows",
    "payload_bytes",
    "qmax",
]
