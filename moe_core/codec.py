"""The tensor wire codec: torch.Tensor <-> moe.v1.Tensor (dtype tag, shape, raw little-endian
row-major bytes), with every check on the receiving side done before anything is allocated.

No pickle, no torch.save: a receiver trusts nothing but the dtype allow-list and the limits.
"""
from __future__ import annotations

import math
import sys
import warnings

import torch

from moe.v1 import common_pb2
from moe_core.config import FLOAT_DTYPES

# Wire tag -> torch dtype. bfloat16 has no numpy dtype, so it travels as raw 2-byte words.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
}
TAGS = {v: k for k, v in DTYPES.items()}
# Same-size integer views, so numpy can produce the bytes of any dtype (bf16 included).
_WORD = {2: torch.int16, 4: torch.int32, 8: torch.int64}

MAX_ELEMENTS = 1 << 28  # 1 GiB of float32: far above one layer step, far below a bad header's claim
MAX_RANK = 8

if sys.byteorder != "little":  # raw views below assume host order == wire order
    raise ImportError("moe_core.codec needs a little-endian host")


class WireError(ValueError):
    """A tensor message that must be rejected; the message names the field and the problem."""


def wire_form(t: torch.Tensor, dtype: str | None = None) -> tuple[torch.Tensor, str]:
    """`t` cast to the wire dtype `dtype` (default its own), and that dtype's tag."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise WireError(f"cannot encode as dtype {dtype!r}; wire dtypes are {', '.join(DTYPES)}")
        t = t.to(DTYPES[dtype])
    if t.dtype not in TAGS:
        raise WireError(f"tensor dtype {t.dtype} has no wire form; wire dtypes are {', '.join(DTYPES)}")
    return t, TAGS[t.dtype]


def encode(t: torch.Tensor, dtype: str | None = None) -> common_pb2.Tensor:
    """One copy into bytes (numpy's tobytes also makes non-contiguous views row-major)."""
    t, tag = wire_form(t, dtype)
    arr = t.detach().cpu().view(_WORD[t.element_size()]).numpy()
    return common_pb2.Tensor(dtype=tag, shape=t.shape, data=arr.tobytes())


def decode(msg: common_pb2.Tensor, *, allowed_dtypes=FLOAT_DTYPES, max_elements: int = MAX_ELEMENTS,
           max_rank: int = MAX_RANK, expect_rank: int | None = None,
           expect_last_dim: int | None = None, name: str = "tensor") -> torch.Tensor:
    """Validates the header against the limits, then views the payload without copying it.

    The result aliases a bytes object that only it references (protobuf's default upb backend
    hands out a fresh copy on every `.data` access), so in-place writes are harmless there;
    `.clone()` first if you write into it and may run on the pure-Python protobuf backend.
    """
    shape, dtype = check_header(msg, allowed_dtypes=allowed_dtypes, max_elements=max_elements,
                                max_rank=max_rank, expect_rank=expect_rank, expect_last_dim=expect_last_dim,
                                name=name)
    return view_payload(msg.data, shape, dtype, name=name)


def check_header(msg: common_pb2.Tensor, *, allowed_dtypes=FLOAT_DTYPES, max_elements: int = MAX_ELEMENTS,
                 max_rank: int = MAX_RANK, expect_rank: int | None = None,
                 expect_last_dim: int | None = None, name: str = "tensor") -> tuple[list[int], torch.dtype]:
    """A tensor's dtype and shape checked against the limits, without touching its data: the
    (shape, dtype) it declares, or WireError."""
    if msg.dtype not in DTYPES or msg.dtype not in allowed_dtypes:
        raise WireError(f"{name}: dtype {msg.dtype!r} is not accepted here; "
                        f"allowed: {', '.join(sorted(allowed_dtypes))}")
    if len(msg.shape) > max_rank:  # before the shape is copied out
        raise WireError(f"{name}: rank {len(msg.shape)} exceeds the limit of {max_rank}")
    shape = list(msg.shape)
    if expect_rank is not None and len(shape) != expect_rank:
        raise WireError(f"{name}: expected rank {expect_rank}, got shape {shape}")
    if any(d < 0 for d in shape):
        raise WireError(f"{name}: shape {shape} has a negative dimension")
    numel = math.prod(shape)  # Python ints: a hostile header cannot overflow this
    if numel > max_elements:
        raise WireError(f"{name}: shape {shape} declares {numel} elements, limit is {max_elements}")
    if expect_last_dim is not None and (not shape or shape[-1] != expect_last_dim):
        raise WireError(f"{name}: last dimension must be {expect_last_dim}, got shape {shape}")
    return shape, DTYPES[msg.dtype]


def view_payload(data, shape: list[int], dtype: torch.dtype, name: str = "tensor") -> torch.Tensor:
    """A tensor of `shape` viewing `data` (bytes or a memoryview of them) without a copy, once its
    length is exactly what shape x dtype needs; WireError otherwise."""
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    if len(data) != numel * itemsize:
        raise WireError(f"{name}: {len(data)} data bytes do not match shape {shape} x {TAGS[dtype]} "
                        f"({numel * itemsize} bytes expected)")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)  # frombuffer refuses empty buffers
    return _frombuffer(data, _WORD[itemsize]).view(dtype).view(shape)


_quiet = False


def _frombuffer(data: bytes, word: torch.dtype) -> torch.Tensor:
    # torch warns once per process that `bytes` is not writable. Swallow that one warning on
    # our first call; catching warnings on every call would cost more than the view itself
    # (and copying into a bytearray costs a memcpy of the whole payload).
    global _quiet
    if _quiet:
        return torch.frombuffer(data, dtype=word)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.frombuffer(data, dtype=word)
    _quiet = True
    return t


def scan(data: bytes, *, max_fields: int, max_len: dict[int, int] | None = None,
         nested: dict[int, dict] | None = None, name: str = "request") -> None:
    """Walks a protobuf message's wire form before it is parsed, without allocating: more than
    `max_fields` fields, a length-delimited field `f` longer than `max_len[f]`, or a field that
    is not valid wire format raise WireError; `nested[f]` scans field f's contents the same way.
    Parsing would otherwise build an object per repeated entry (a few bytes on the wire each)."""
    max_len, nested = max_len or {}, nested or {}
    data = data if isinstance(data, memoryview) else memoryview(data)  # slices without copies
    i, n, fields = 0, len(data), 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= n or shift > 63:
                raise WireError(f"request is not a valid {name} protobuf: truncated or overlong varint")
            b = data[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7
    while i < n:
        fields += 1
        if fields > max_fields:
            raise WireError(f"{name}: more than {max_fields} fields")
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length = varint()
            if i + length > n:
                raise WireError(f"request is not a valid {name} protobuf: field {field} runs past its end")
            if length > max_len.get(field, n):
                raise WireError(f"{name}: field {field} of {length} bytes exceeds {max_len[field]}")
            if field in nested:
                scan(data[i:i + length], name=name, **nested[field])
            i += length
        else:
            raise WireError(f"request is not a valid {name} protobuf: wire type {wire}")
        if i > n:
            raise WireError(f"request is not a valid {name} protobuf: field {field} runs past its end")


# A moe.v1.Tensor: dtype, shape (packed, or one field per dimension), data.
TENSOR_SCAN = {"max_fields": 3 + MAX_RANK, "max_len": {1: 16, 2: 10 * MAX_RANK}}


def check_finite(t: torch.Tensor, name: str = "tensor") -> None:
    """WireError when a float tensor holds a NaN or an infinity.

    A sum over a NaN or an infinity is never finite, so a finite sum (one reduction, nothing
    allocated) clears the tensor; only a non-finite sum, which huge finite values can also give,
    needs the element-wise check (a bool per element and a pass over them)."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise WireError(f"{name}: {bad} of {t.numel()} values are NaN or infinite")


def keep_large_buffers(limit: int = 1 << 30) -> bool:
    """glibc serves every allocation above 32 MB (its dynamic mmap threshold cap) with a fresh mmap
    and returns it on free, so each multi-MB payload copy also page-faults its whole destination in,
    many times slower than a memcpy into a reused buffer (benchmarks/codec.py `--malloc`). Raising
    the mmap and trim thresholds keeps such buffers in the heap for reuse. False where not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))
