"""Same-node fast path: tensors move through shared memory, a small envelope carries the call.

A client on the expert's node creates a pair of buffers (input rows, output rows) and attaches
them to the replica once, over the replica's doorbell (expert_service/doorbell.py); each Forward
then names only the row count. Two kinds:

- "shm": anonymous memory files (memfd_create) whose file descriptors pass over the doorbell's
  Unix socket (SCM_RIGHTS). They have no name: no other process can open them, and nothing is
  left behind by a crash. The client seals their size, so it cannot shrink one under the
  replica's mapping (that would kill the replica with SIGBUS on its next read). The replica maps
  only regular files of its own user, of exactly the session's size, sealed against shrinking.
- "cuda_ipc": CUDA device memory shared through CUDA IPC handles (the same GPU or peers on one
  host); the hidden states never leave the GPUs. A replica on a peer GPU maps the buffers into its
  own device's address space (over NVLink) and copies the rows in and the output out, once each
  per call: its GEMMs read local memory. Two CUDA IPC events order the GPU work across the
  processes: the client records `ready` after writing the rows and the replica's stream waits on
  it; the replica records `done` after writing its output and the client's stream waits on that.
  The replica takes the descriptor's handle, offset and size, checks that offset + size lie in
  the allocation the handle maps, and never the client's reference-counter file name and
  offset: PyTorch would decrement an int64 there when the mapping is freed.

Descriptors are plain fields (msgpack for the CUDA handle tuple), never pickle.
"""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import stat
import uuid
from dataclasses import dataclass, field

import msgpack
import torch

from moe_core.codec import DTYPES, WireError

MAX_BUFFER_BYTES = 1 << 31
CUDA_IPC_HANDLE_BYTES = 64  # cudaIpcMemHandle_t and cudaIpcEventHandle_t
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class SharedError(WireError):
    """A bad attach request; the message names the problem."""


@dataclass
class Buffers:
    """One session's input and output rows, [capacity, hidden] each, and how to describe them."""
    kind: str
    x: torch.Tensor
    y: torch.Tensor
    fds: tuple[int, ...] = ()               # shm, client side: the memfds to pass (closed after Attach)
    handles: tuple[bytes, bytes] = (b"", b"")  # cuda_ipc descriptors
    ready: torch.cuda.Event | None = None   # cuda_ipc: input rows written
    done: torch.cuda.Event | None = None    # cuda_ipc: output rows written
    events: tuple[bytes, bytes] = (b"", b"")  # their IPC handles
    device_uuid: str = ""                   # cuda_ipc, client side: the GPU holding the buffers
    peer: bool = False                      # server side: they lie on another GPU than the replica's
    maps: tuple = field(default=(), repr=False)  # shm: the mmaps behind x and y

    @property
    def capacity(self) -> int:
        return self.x.shape[0]

    @property
    def nbytes(self) -> int:
        return 2 * self.x.numel() * self.x.element_size()

    def close_fds(self) -> None:
        """The client closes its descriptors once the replica has them (or refused them); the
        mappings stay valid."""
        for fd in self.fds:
            os.close(fd)
        self.fds = ()


def create(kind: str, capacity: int, hidden: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> Buffers:
    """The client side: allocate a pair of buffers that a replica on this node can map."""
    nbytes = capacity * hidden * dtype.itemsize
    if kind == "shm":
        fds, maps = [], []
        for role in ("x", "y"):
            fd = sealed_memfd(f"moe-{role}", nbytes)
            fds.append(fd)
            maps.append(mmap.mmap(fd, nbytes))
        x, y = (_tensor(m, dtype).view(capacity, hidden) for m in maps)
        return Buffers(kind, x, y, fds=tuple(fds), maps=tuple(maps))
    if kind == "cuda_ipc":
        x = torch.empty(capacity, hidden, dtype=dtype, device=device)
        y = torch.empty_like(x)
        with torch.cuda.device(x.device):
            ready, done = (torch.cuda.Event(interprocess=True) for _ in range(2))
            events = (ready.ipc_handle(), done.ipc_handle())
        return Buffers(kind, x, y, handles=(_cuda_handle(x), _cuda_handle(y)), ready=ready, done=done, events=events,
                       device_uuid=gpu_uuid(x.device))
    raise SharedError(f"unknown shared-buffer kind {kind!r}; use 'shm' or 'cuda_ipc'")


def sealed_memfd(name: str, nbytes: int) -> int:
    """An anonymous memory file of `nbytes`, sealed so that its size can never change."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    return fd


def _tensor(m: mmap.mmap, dtype: torch.dtype) -> torch.Tensor:
    return torch.frombuffer(m, dtype=torch.uint8).view(dtype)


def gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same GPU has the same one in every process, whatever its index there."""
    return str(torch.cuda.get_device_properties(device).uuid)


def check_size(capacity: int, hidden: int, dtype_tag: str, max_rows: int) -> torch.dtype:
    if dtype_tag not in DTYPES:
        raise SharedError(f"unknown dtype {dtype_tag!r}")
    dtype = DTYPES[dtype_tag]
    if not 0 < capacity <= max_rows:
        raise SharedError(f"capacity {capacity} rows is outside (0, {max_rows}]")
    if capacity * hidden * dtype.itemsize > MAX_BUFFER_BYTES:
        raise SharedError(f"buffer of {capacity} x {hidden} {dtype_tag} exceeds {MAX_BUFFER_BYTES} bytes")
    return dtype


def open_remote(kind: str, capacity: int, hidden: int, dtype_tag: str, fds=(), handles=(b"", b""),
                events=(b"", b""), device: torch.device | None = None, device_uuid: str = "",
                max_rows: int = 1 << 14) -> Buffers:
    """The server side: map the buffers a client on this node created, after checking them.

    cuda_ipc buffers are mapped into `device` (the replica's GPU) wherever they lie: a device index
    means nothing across processes (each may see other GPUs, e.g. under Ray's CUDA_VISIBLE_DEVICES).
    """
    dtype = check_size(capacity, hidden, dtype_tag, max_rows)
    nbytes = capacity * hidden * dtype.itemsize
    if kind == "shm":
        if len(fds) != 2:
            raise SharedError(f"a shm session passes two file descriptors, got {len(fds)}")
        for fd in fds:
            check_fd(fd, nbytes)
        maps = tuple(mmap.mmap(fd, nbytes) for fd in fds)
        x, y = (_tensor(m, dtype).view(capacity, hidden) for m in maps)
        return Buffers(kind, x, y, maps=maps)
    if kind == "cuda_ipc":
        if len(handles) != 2 or len(events) != 2:
            raise SharedError("a cuda_ipc session needs two buffers and two events")
        if any(len(e) != CUDA_IPC_HANDLE_BYTES for e in events):
            raise SharedError(f"a CUDA IPC event handle has {CUDA_IPC_HANDLE_BYTES} bytes")
        fields = [cuda_descriptor(h, nbytes) for h in handles]
        try:
            x, y = (_open_cuda(f, dtype, device).view(capacity, hidden) for f in fields)
            ready, done = (torch.cuda.Event.from_ipc_handle(x.device, e) for e in events)
            peer = bool(device_uuid) and device_uuid != gpu_uuid(x.device)
        except SharedError:
            raise
        except Exception as e:  # a handle from another host or a freed buffer
            raise SharedError(f"cannot open CUDA IPC handle: {e}") from None
        return Buffers(kind, x, y, ready=ready, done=done, peer=peer)
    raise SharedError(f"unknown shared-buffer kind {kind!r}; use 'shm' or 'cuda_ipc'")


def check_fd(fd: int, nbytes: int) -> None:
    """A descriptor the replica may map: a regular file of this user, `nbytes` long, sealed so that
    it cannot shrink under the mapping."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SharedError("a shared buffer must be a regular memory file")
    if st.st_uid != os.getuid():
        raise SharedError("a shared buffer must belong to this replica's user")
    if st.st_size != nbytes:
        raise SharedError(f"a shared buffer has {st.st_size} bytes, the session needs {nbytes}")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise SharedError("a shared buffer must be sealed against shrinking (memfd F_SEAL_SHRINK)")


def _cuda_handle(t: torch.Tensor) -> bytes:
    (device, handle, size, offset, ref_handle, ref_offset, event, event_sync) = t.untyped_storage()._share_cuda_()
    return msgpack.packb([device, handle, size, offset, ref_handle, ref_offset, event, event_sync])


def cuda_descriptor(blob: bytes, nbytes: int) -> tuple[bytes, int, int]:
    """(handle, size, offset) from a client's descriptor, checked before anything is opened; the
    rest of its fields (the device index, the reference-counter file and offset, its event) are
    the client's own business and are dropped."""
    try:
        fields = msgpack.unpackb(blob)
    except (ValueError, msgpack.ExtraData):
        raise SharedError("CUDA IPC descriptor is not msgpack") from None
    if not isinstance(fields, list) or len(fields) != 8:
        raise SharedError("CUDA IPC descriptor must have 8 fields")
    _, handle, size, offset = fields[:4]
    # cudaIpcMemHandle_t, in PyTorch's wrapping (a version and a kind byte before it); whatever it
    # maps is checked against the descriptor once mapped (_check_range)
    if not isinstance(handle, bytes) or not CUDA_IPC_HANDLE_BYTES <= len(handle) <= 2 * CUDA_IPC_HANDLE_BYTES:
        raise SharedError(f"a CUDA IPC memory handle has {CUDA_IPC_HANDLE_BYTES} to {2 * CUDA_IPC_HANDLE_BYTES} bytes")
    if not isinstance(size, int) or size != nbytes:
        raise SharedError(f"CUDA IPC buffer of {size!r} bytes, the session needs {nbytes}")
    if not isinstance(offset, int) or not 0 <= offset <= MAX_BUFFER_BYTES:
        raise SharedError(f"CUDA IPC offset {offset!r} is outside [0, {MAX_BUFFER_BYTES}]")
    return handle, size, offset


def _open_cuda(fields: tuple[bytes, int, int], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    handle, size, offset = fields
    torch.cuda._lazy_init()
    index = device.index if device is not None and device.type == "cuda" and device.index is not None \
        else torch.cuda.current_device()
    # A reference-counter name that names no file: PyTorch's clean-up then fails to open it and
    # skips the decrement, instead of writing wherever a client pointed it.
    ref = f"/moe-no-refcounter-{uuid.uuid4().hex}".encode()
    storage = torch.UntypedStorage._new_shared_cuda(index, handle, size, offset, ref, 0, b"", False)
    _check_range(storage.data_ptr() - offset, offset, size, index)
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    return torch._utils._rebuild_tensor(typed, 0, (size // dtype.itemsize,), (1,))


def _check_range(mapped: int, offset: int, size: int, index: int) -> None:
    """offset + size must lie inside the allocation the handle mapped at `mapped`
    (cuMemGetAddressRange of the mapping's base: its start and length)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return
    base, length = ctypes.c_uint64(), ctypes.c_size_t()
    with torch.cuda.device(index):
        rc = libcuda.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(length), ctypes.c_uint64(mapped))
    if rc != 0 or base.value != mapped or offset + size > length.value:
        raise SharedError(f"CUDA IPC buffer [{offset}, {offset + size}) is not inside its allocation "
                          f"({length.value if rc == 0 else 'unknown'} bytes)")
