"""Bitwidth codecs: round trip within the stated bound, exact payload sizes, malformed payloads rejected."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.aggregation.quant import (
    BITWIDTHS,
    decode,
    decode_tensors,
    encode,
    encode_tensors,
    error_bound,
    expected_payload_bytes,
    fake_quantize,
    num_rows,
    payload_bytes,
    qmax,
)

SHAPES = [(7, 13), (16, 8), (13,), (), (1, 1), (3, 0), (0, 4), (2, 3, 4), (5, 1)]


def _rand(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05


def _check_bound(t: torch.Tensor, bits: int) -> torch.Tensor:
    d = fake_quantize(t, bits)
    assert d.dtype == torch.float32 and d.shape == t.shape
    err = (d.double() - t.double()).abs()
    bound = error_bound(t, bits).double()
    assert bound.shape == t.shape
    assert (err <= bound).all(), f"{bits}-bit: max excess {(err - bound).max().item():.3g}"
    return d


@pytest.mark.parametrize("bits", BITWIDTHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_bound(bits, shape):
    _check_bound(_rand(shape), bits)


@pytest.mark.parametrize("bits", BITWIDTHS)
def test_zero_rows_and_zero_tensors_decode_to_exact_zero(bits):
    t = _rand((6, 5))
    t[2] = 0
    t[4] = 0
    d = _check_bound(t, bits)
    assert torch.equal(d[2], torch.zeros(5)) and torch.equal(d[4], torch.zeros(5))
    assert torch.equal(fake_quantize(torch.zeros(4, 3), bits), torch.zeros(4, 3))
    if bits <= 8:
        enc = encode(t, bits)
        assert enc["scales"][2] == 0 and enc["scales"][4] == 0


@pytest.mark.parametrize("bits", BITWIDTHS)
def test_fp16_extremes(bits):
    # rows: beyond fp16 range, near fp16 max, below fp16 subnormals, normal; mixed magnitudes in one row
    t = torch.tensor(
        [
            [1e6, -3e5, 2.0, 0.0],
            [7e4, 1.0, -65504.0, 3.0],
            [1e-9, -2e-12, 3e-30, 0.0],
            [1e-3, -1e-3, 5e-4, 1e-5],
            [1e4, 1e-6, -1e-7, 0.0],
        ]
    )
    d = _check_bound(t, bits)
    assert torch.isfinite(d).all()
    # 1-D and 0-d at the extremes too
    _check_bound(torch.tensor([1e6, -1e-9, 0.0, 3.0]), bits)
    _check_bound(torch.tensor(-8e5), bits)
    _check_bound(torch.tensor(1e-20), bits)


def test_exact_codecs():
    t = _rand((9, 4))
    assert torch.equal(fake_quantize(t, 32), t)
    assert torch.equal(fake_quantize(t, 16), t.half().float())
    assert torch.equal(error_bound(t, 32), torch.zeros_like(t))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_integer_grid_semantics(bits):
    q = qmax(bits)
    t = _rand((12, 10), seed=3)
    enc = encode(t, bits)
    s = enc["scales"].float().unsqueeze(1)
    # stored scale is ≥ absmax / q (rounded up), so nothing is clipped
    assert (t.abs() <= q * s * (1 + 1e-7)).all()
    d = decode(enc, bits, t.shape)
    levels = d / s
    assert torch.equal(levels, levels.round()) and levels.abs().max() <= q
    # every non-zero row has its absmax element at ±q levels
    assert torch.equal(levels.abs().amax(dim=1), torch.full((12,), float(q)))
    # deterministic
    assert all(torch.equal(enc[k], encode(t, bits)[k]) for k in enc)


@pytest.mark.parametrize("bits", BITWIDTHS)
@pytest.mark.parametrize("shape", SHAPES)
def test_payload_size_exact(bits, shape):
    t = _rand(shape)
    enc = encode(t, bits)
    numel = math.prod(shape)
    if bits == 32:
        assert set(enc) == {"values"} and enc["values"].dtype == torch.float32
        want = 4 * numel
    elif bits == 16:
        assert set(enc) == {"values"} and enc["values"].dtype == torch.float16
        want = 2 * numel
    else:
        assert set(enc) == {"codes", "scales"}
        assert enc["codes"].dtype == torch.uint8 and enc["codes"].dim() == 1
        assert enc["scales"].dtype == torch.float16 and enc["scales"].numel() == num_rows(shape)
        want = math.ceil(numel * bits / 8) + 2 * num_rows(shape)
    assert payload_bytes(enc) == want == expected_payload_bytes(shape, bits)


def test_rows_definition():
    assert num_rows((7, 3)) == 7 and num_rows((2, 3, 4)) == 2
    assert num_rows((13,)) == 1 and num_rows(()) == 1


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="bits"):
        encode(torch.ones(3), 3)
    with pytest.raises(ValueError, match="bits"):
        encode(torch.ones(3), True)
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.tensor([1.0, float("nan")]), 8)
    with pytest.raises(ValueError, match="non-finite"):
        encode(torch.tensor([1.0, float("inf")]), 16)
    with pytest.raises(ValueError, match="floating"):
        encode(torch.ones(3, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="separator"):
        encode_tensors({"a::b": torch.ones(2)}, 8)


# ---- flat wire dicts ------------------------------------------------------------------------------------
KEY = "base.layer.0.q.lora_B.weight"


def _state():
    return {KEY: _rand((6, 4), 1), "head.bias": _rand((3,), 2), "scalar": _rand((), 3)}


def _shapes(state):
    return {k: v.shape for k, v in state.items()}


@pytest.mark.parametrize("bits", BITWIDTHS)
def test_encode_decode_tensors_round_trip(bits):
    state = _state()
    flat = encode_tensors(state, bits)
    parts = ("values",) if bits >= 16 else ("codes", "scales")
    assert set(flat) == {f"{k}::{p}" for k in state for p in parts}
    assert payload_bytes(flat) == sum(expected_payload_bytes(v.shape, bits) for v in state.values())
    back = decode_tensors(flat, bits, _shapes(state))
    for k, v in state.items():
        assert torch.equal(back[k], fake_quantize(v, bits))


def test_flat_dict_survives_flower_array_record():
    ArrayRecord = pytest.importorskip("flwr.app").ArrayRecord
    state = _state()
    for bits in (16, 4, 2):
        flat = encode_tensors(state, bits)
        back = ArrayRecord(flat).to_torch_state_dict()
        dec = decode_tensors(back, bits, _shapes(state))
        assert all(torch.equal(dec[k], fake_quantize(v, bits)) for k, v in state.items())


def _put(part, make):
    """Mutation: replace (or add) ``KEY::part`` with ``make(flat)``."""
    return lambda f: {**f, f"{KEY}::{part}": make(f)}


def _drop(part):
    return lambda f: {k: v for k, v in f.items() if k != f"{KEY}::{part}"}


def _malformed(bits):
    """(description, mutate(flat) -> flat, error regex) for a flat payload of ``_state()``."""
    v, c, s = (lambda f, p=p: f[f"{KEY}::{p}"] for p in ("values", "codes", "scales"))  # part getters
    cases = [
        ("missing key", lambda f: {k: x for k, x in f.items() if not k.startswith(KEY)}, "missing keys.*" + KEY),
        ("extra key", lambda f: {**f, "intruder::values": torch.zeros(2)}, "unexpected keys.*intruder"),
        ("no separator", lambda f: {**f, "garbage": torch.zeros(2)}, "garbage"),
    ]
    if bits >= 16:
        dt = torch.float32 if bits == 32 else torch.float16
        wrong = torch.float16 if bits == 32 else torch.float32
        nan = torch.full((24,), float("nan"), dtype=dt)
        cases += [
            ("wrong dtype", _put("values", lambda f: v(f).to(wrong)), KEY + ".*dtype"),
            ("too short", _put("values", lambda f: v(f)[:-1]), KEY + ".*elements"),
            ("too long", _put("values", lambda f: torch.zeros(25, dtype=dt)), KEY + ".*elements"),
            ("non-finite", _put("values", lambda f: nan), KEY + ".*non-finite"),
            ("extra part", _put("scales", lambda f: torch.ones(6, dtype=torch.float16)), KEY + ".*unexpected parts"),
            ("missing part", lambda f: _drop("values")(f) | {f"{KEY}::codes": torch.zeros(1)}, KEY + ".*missing part"),
        ]
    else:
        q = qmax(bits)
        ncodes = math.ceil(24 * bits / 8)

        def set_first_code(f, value):
            codes = c(f).clone()
            codes[0] = (int(codes[0]) & ~((1 << bits) - 1)) | value
            return codes

        def fp16(x):
            return torch.full((6,), x, dtype=torch.float16)

        cases += [
            ("missing codes", _drop("codes"), KEY + ".*missing part 'codes'"),
            ("missing scales", _drop("scales"), KEY + ".*missing part 'scales'"),
            ("extra part", _put("values", lambda f: torch.zeros(24)), KEY + ".*unexpected parts"),
            ("codes dtype", _put("codes", lambda f: c(f).to(torch.int16)), KEY + ".*dtype"),
            ("codes short", _put("codes", lambda f: c(f)[:-1]), KEY + ".*elements"),
            ("codes long", _put("codes", lambda f: torch.zeros(ncodes + 1, dtype=torch.uint8)), KEY + ".*elements"),
            ("scales count", _put("scales", lambda f: s(f)[:-1]), KEY + ".*elements"),
            ("scales dtype", _put("scales", lambda f: s(f).float()), KEY + ".*dtype"),
            ("negative scale", _put("scales", lambda f: -s(f)), KEY + ".*scales"),
            ("nan scale", _put("scales", lambda f: fp16(float("nan"))), KEY + ".*scales"),
            ("inf scale", _put("scales", lambda f: fp16(float("inf"))), KEY + ".*scales"),
            ("code out of range", _put("codes", lambda f: set_first_code(f, 2 * q + 1)), KEY + ".*out of range"),
        ]
    return cases


@pytest.mark.parametrize("bits", BITWIDTHS)
def test_decode_tensors_rejects_malformed(bits):
    state = _state()
    good = encode_tensors(state, bits)
    decode_tensors(good, bits, _shapes(state))  # sanity
    for what, mutate, pattern in _malformed(bits):
        with pytest.raises(ValueError, match=pattern):
            decode_tensors(mutate(dict(good)), bits, _shapes(state))
            pytest.fail(f"accepted a payload with {what}")


@pytest.mark.parametrize("bits", [4, 2])
def test_nonzero_padding_bits_rejected(bits):
    state = {KEY: _rand((5, 3))}  # 15 codes: the last byte is padded
    flat = encode_tensors(state, bits)
    codes = flat[f"{KEY}::codes"].clone()
    codes[-1] |= 1 << 7
    with pytest.raises(ValueError, match=KEY + ".*padding"):
        decode_tensors({**flat, f"{KEY}::codes": codes}, bits, _shapes(state))


def test_wrong_bitwidth_for_payload_rejected():
    state = _state()
    flat8 = encode_tensors(state, 8)
    with pytest.raises(ValueError, match="elements"):
        decode_tensors(flat8, 4, _shapes(state))
    with pytest.raises(ValueError, match="missing part 'values'"):
        decode_tensors(flat8, 32, _shapes(state))
