"""The tensor wire codec: exact round trips, and every header the receiver must refuse."""
import math
import warnings

import pytest
import torch

from moe.v1 import common_pb2
from moe_core.codec import DTYPES, FLOAT_DTYPES, WireError, check_finite, decode, encode

ALL = frozenset(DTYPES)


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    return torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("tag", sorted(DTYPES))
def test_round_trip_is_bit_exact(tag):
    t = sample(DTYPES[tag])
    msg = encode(t)
    assert msg.dtype == tag and list(msg.shape) == [3, 5]
    assert len(msg.data) == 15 * t.element_size()
    back = decode(msg, allowed_dtypes=ALL)
    assert back.dtype == t.dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))  # bits, not just values


def test_bfloat16_travels_as_two_byte_little_endian_words():
    t = torch.tensor([1.0, -2.0, 0.1], dtype=torch.bfloat16)
    msg = encode(t)
    assert len(msg.data) == 6
    assert msg.data[:2] == (0x3F80).to_bytes(2, "little")  # bf16(1.0) is the high half of fp32(1.0)
    assert torch.equal(decode(msg), t)


def test_encode_handles_views_casts_and_odd_shapes():
    base = sample(torch.float32, (4, 6))
    for t in (base.t(), base[:, ::2], base[1:3], base[0, 0]):
        assert torch.equal(decode(encode(t)), t.contiguous())
    assert torch.equal(decode(encode(base, "bfloat16")), base.to(torch.bfloat16))
    assert decode(encode(torch.zeros(0, 64))).shape == (0, 64)
    assert decode(encode(torch.tensor(2.5))).item() == 2.5
    x = torch.randn(3, requires_grad=True)
    assert torch.equal(decode(encode(x)), x.detach())


def test_encode_refuses_what_has_no_wire_form():
    with pytest.raises(WireError, match="float64"):
        encode(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(WireError, match="'complex'"):
        encode(torch.zeros(2), "complex")


def test_decode_raises_no_warning_and_results_are_usable():
    msg = encode(sample(torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = decode(msg), decode(msg)
    a += 1  # each decode owns a fresh copy of the payload: writing one leaves the other alone
    assert torch.equal(a - 1, b)


def header(dtype="float32", shape=(2, 4), nbytes=None):
    n = math.prod(shape) * 4 if nbytes is None else nbytes
    return common_pb2.Tensor(dtype=dtype, shape=list(shape), data=b"\0" * n)


@pytest.mark.parametrize("msg, kwargs, match", [
    (header(dtype="float64"), {}, "dtype 'float64' is not accepted"),
    (header(dtype=""), {}, "dtype '' is not accepted"),
    (header(dtype="int32"), {"allowed_dtypes": FLOAT_DTYPES}, "dtype 'int32' is not accepted"),
    (header(shape=(2, -4), nbytes=0), {}, "negative dimension"),
    (header(shape=(1,) * 9), {}, "rank 9 exceeds"),
    (header(shape=(8,)), {"expect_rank": 2}, "expected rank 2"),
    (header(shape=(2**40, 2**40), nbytes=8), {}, "declares 1208925819614629174706176 elements"),
    (header(shape=(2**62, 4, 4), nbytes=8), {}, "elements, limit is"),
    (header(shape=(100, 100)), {"max_elements": 9999}, "declares 10000 elements, limit is 9999"),
    (header(shape=(2, 4)), {"expect_last_dim": 64}, "last dimension must be 64"),
    (header(shape=(), nbytes=4), {"expect_last_dim": 64}, "last dimension must be 64"),
    (header(shape=(2, 4), nbytes=31), {}, "31 data bytes do not match shape \\[2, 4\\] x float32 \\(32 bytes"),
    (header(shape=(2, 4), nbytes=33), {}, "33 data bytes"),
    (header(dtype="bfloat16", shape=(2, 4), nbytes=32), {}, "32 data bytes .* \\(16 bytes"),
    (header(shape=(0, 4), nbytes=4), {}, "4 data bytes"),
])
def test_decode_refuses_bad_headers(msg, kwargs, match):
    with pytest.raises(WireError, match=match):
        decode(msg, **kwargs)


def test_decode_names_the_tensor():
    with pytest.raises(WireError, match="^hidden: "):
        decode(header(dtype="float64"), name="hidden")


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


def test_check_finite():
    check_finite(torch.randn(4, 4))
    check_finite(torch.tensor([2**31 - 1], dtype=torch.int32))
    check_finite(torch.zeros(0, 4))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # finite values whose sum overflows
        check_finite(torch.full((8,), torch.finfo(dtype).max, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.zeros(3, 4, dtype=dtype)
            t[1, 2] = bad
            with pytest.raises(WireError, match="x: 1 of 12 values are NaN or infinite"):
                check_finite(t, "x")
