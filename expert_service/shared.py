"""Same-node fast path: tensors move through shared memory, gRPC carries only the envelope.

A client on the expert's node creates a pair of buffers (input rows, output rows) and attaches
them to the replica once; each Forward then names the session and the row count. Two kinds:

- "shm": files in /dev/shm mapped by both processes (CPU); the rows are written once by the
  router's gather and read in place by the expert, with no serialization at all;
- "cuda_ipc": CUDA device memory shared through CUDA IPC handles (the same GPU or peers on one
  host); the hidden states never leave the GPUs. A replica on a peer GPU maps the buffers into its
  own device's address space (over NVLink) and copies the rows in and the output out, once each
  per call: its GEMMs read local memory. Two CUDA IPC events order the GPU work across
  the processes: the client records `ready` after writing the rows and the replica's stream waits
  on it; the replica records `done` after writing its output and the client's stream waits on
  that. No host waits for the GPU between the two.

Descriptors are plain fields (msgpack for the CUDA handle tuple), never pickle.
"""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass

import msgpack
import torch

from moe_core.codec import DTYPES

SHM_DIR = "/dev/shm"
_NAME = re.compile(r"^moe-([0-9]+)-[0-9a-f]{32}$")  # moe-<creator pid>-<random>: nothing else is mapped
MAX_BUFFER_BYTES = 1 << 31
CUDA_IPC_HANDLE_BYTES = 64  # cudaIpcEventHandle_t


class SharedError(ValueError):
    """A bad attach request; the message names the problem."""


@dataclass
class Buffers:
    """One session's input and output rows, [capacity, hidden] each, and how to describe them."""
    kind: str
    x: torch.Tensor
    y: torch.Tensor
    names: tuple[str, str] = ("", "")       # shm file names
    handles: tuple[bytes, bytes] = (b"", b"")  # cuda_ipc descriptors
    ready: torch.cuda.Event | None = None   # cuda_ipc: input rows written
    done: torch.cuda.Event | None = None    # cuda_ipc: output rows written
    events: tuple[bytes, bytes] = (b"", b"")  # their IPC handles
    device_uuid: str = ""                   # cuda_ipc, client side: the GPU holding the buffers
    peer: bool = False                      # server side: they lie on another GPU than the replica's

    @property
    def capacity(self) -> int:
        return self.x.shape[0]

    def unlink(self) -> None:
        """Removes the shm files; both processes' mappings stay valid. The client calls this as soon
        as the replica has mapped them (or refused to), so a process that crashes later leaves none
        behind; `sweep` removes those of one killed before that."""
        for n in self.names if self.kind == "shm" else ():
            try:
                os.unlink(os.path.join(SHM_DIR, n))
            except FileNotFoundError:
                pass


def create(kind: str, capacity: int, hidden: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> Buffers:
    """The client side: allocate a pair of buffers that a replica on this node can map."""
    if kind == "shm":
        sweep()
        names = tuple(f"moe-{os.getpid()}-{uuid.uuid4().hex}" for _ in range(2))
        x, y = (_map(n, capacity * hidden, dtype).view(capacity, hidden) for n in names)
        return Buffers(kind, x, y, names=names)
    if kind == "cuda_ipc":
        x = torch.empty(capacity, hidden, dtype=dtype, device=device)
        y = torch.empty_like(x)
        with torch.cuda.device(x.device):
            ready, done = (torch.cuda.Event(interprocess=True) for _ in range(2))
            events = (ready.ipc_handle(), done.ipc_handle())
        return Buffers(kind, x, y, handles=(_cuda_handle(x), _cuda_handle(y)), ready=ready, done=done, events=events,
                       device_uuid=gpu_uuid(x.device))
    raise SharedError(f"unknown shared-buffer kind {kind!r}; use 'shm' or 'cuda_ipc'")


def sweep() -> None:
    """Unlinks the shm files of processes that are gone. A client unlinks its files once the replica
    has mapped them, but one killed during its Attach leaves them; the next client on the node (its
    replacement, say) removes them. Mappings that still use them stay valid."""
    for n in os.listdir(SHM_DIR):
        m = _NAME.match(n)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(SHM_DIR, n))
            except FileNotFoundError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def gpu_uuid(device: torch.device) -> str:
    """The GPU's UUID: the same GPU has the same one in every process, whatever its index there."""
    return str(torch.cuda.get_device_properties(device).uuid)


def open_remote(kind: str, capacity: int, hidden: int, dtype_tag: str, names=("", ""), handles=(b"", b""),
                events=(b"", b""), device: torch.device | None = None, device_uuid: str = "") -> Buffers:
    """The server side: map the buffers a client on this node created, after checking the request.

    cuda_ipc buffers are mapped into `device` (the replica's GPU) wherever they lie: a device index
    means nothing across processes (each may see other GPUs, e.g. under Ray's CUDA_VISIBLE_DEVICES).
    """
    if dtype_tag not in DTYPES:
        raise SharedError(f"unknown dtype {dtype_tag!r}")
    dtype = DTYPES[dtype_tag]
    nbytes = capacity * hidden * dtype.itemsize
    if capacity <= 0 or nbytes > MAX_BUFFER_BYTES:
        raise SharedError(f"buffer of {capacity} x {hidden} {dtype_tag} is outside (0, {MAX_BUFFER_BYTES}] bytes")
    if kind == "shm":
        for n in names:
            if not _NAME.match(n):
                raise SharedError(f"shared-memory name {n!r} is not one this service created")
            path = os.path.join(SHM_DIR, n)
            if not os.path.isfile(path) or os.path.getsize(path) != nbytes:
                raise SharedError(f"shared-memory segment {n} is missing or not {nbytes} bytes")
        x, y = (_map(n, capacity * hidden, dtype).view(capacity, hidden) for n in names)
        return Buffers(kind, x, y, names=tuple(names))
    if kind == "cuda_ipc":
        if any(len(e) != CUDA_IPC_HANDLE_BYTES for e in events):
            raise SharedError(f"a CUDA IPC event handle has {CUDA_IPC_HANDLE_BYTES} bytes")
        try:
            x, y = (_open_cuda(h, dtype, device).view(capacity, hidden) for h in handles)
            ready, done = (torch.cuda.Event.from_ipc_handle(x.device, e) for e in events)
            peer = bool(device_uuid) and device_uuid != gpu_uuid(x.device)
        except SharedError:
            raise
        except Exception as e:  # a handle from another host or a freed buffer
            raise SharedError(f"cannot open CUDA IPC handle: {e}") from None
        return Buffers(kind, x, y, ready=ready, done=done, peer=peer)
    raise SharedError(f"unknown shared-buffer kind {kind!r}; use 'shm' or 'cuda_ipc'")


def _map(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_file(os.path.join(SHM_DIR, name), shared=True, size=numel, dtype=dtype)


def _cuda_handle(t: torch.Tensor) -> bytes:
    (device, handle, size, offset, ref_handle, ref_offset, event, event_sync) = t.untyped_storage()._share_cuda_()
    return msgpack.packb([device, handle, size, offset, ref_handle, ref_offset, event, event_sync])


def _open_cuda(blob: bytes, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    fields = msgpack.unpackb(blob)
    if not isinstance(fields, list) or len(fields) != 8:
        raise SharedError("CUDA IPC descriptor must have 8 fields")
    torch.cuda._lazy_init()
    if device is not None and device.type == "cuda":  # map it into this device, not the client's index
        fields[0] = device.index if device.index is not None else torch.cuda.current_device()
    storage = torch.UntypedStorage._new_shared_cuda(*fields)
    typed = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
    return torch._utils._rebuild_tensor(typed, 0, (fields[2] // dtype.itemsize,), (1,))
