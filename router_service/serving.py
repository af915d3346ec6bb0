"""The serving config: the application's `args` (a Serve config's `applications[0].args`, as
`router_service/serve.yaml` documents them) parsed once, where the app is built, into frozen
sections. Every default is written here and only here; a key no section has is refused with its
name and where it came from.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from moe_core.config import FLOAT_DTYPES


@dataclass(frozen=True)
class RouterConfig:
    """The Router deployment and its engine."""
    max_running: int = 64               # sequences batched per step
    max_queued: int = 256               # then RESOURCE_EXHAUSTED
    expert_timeout_s: float = 30.0      # one expert call's deadline, at most
    expert_wait_s: float = 30.0         # a step whose expert has no live replica waits this long for one
    wire_dtype: str | None = None       # e.g. bfloat16: float32 rows cross as bf16
    transport: str = "grpc"             # or "handle": expert calls through Serve handles
    shared_memory: str = "auto"         # same-node sessions: auto, shm, cuda_ipc, "" (bytes only)
    micro_batches: int = 1              # 2: ping-pong overlap of attention and expert calls
    router_device: str = "auto"         # cuda when the deployment got a GPU, else cpu; or a torch device
    router_dtype: str = "float32"
    max_seq_len: int | None = None      # KV slot length (default the model's context)
    kv_tokens: int | None = None        # KV pool size in positions ...
    kv_memory_fraction: float | None = None  # ... or a fraction of free GPU memory (default 0.5 on a GPU)
    max_step_tokens: int = 8192         # longer prompts are prefilled in chunks
    cuda_graphs: bool = True            # decode steps replayed from CUDA graphs on a GPU

    def __post_init__(self):
        _one_of("transport", self.transport, ("grpc", "handle"))
        _one_of("shared_memory", self.shared_memory, ("auto", "shm", "cuda_ipc", ""))
        _one_of("router_dtype", self.router_dtype, sorted(FLOAT_DTYPES))
        if self.wire_dtype is not None:
            _one_of("wire_dtype", self.wire_dtype, sorted(FLOAT_DTYPES))
        for name, least in (("max_running", 1), ("max_queued", 0), ("micro_batches", 1), ("max_step_tokens", 1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class ExpertConfig:
    """The expert deployments."""
    expert_dtype: str = "float32"
    layers_per_shard: int | None = None  # None: one deployment per expert, all layers
    expert_options: dict | None = None   # Serve options of every expert deployment

    def __post_init__(self):
        _one_of("expert_dtype", self.expert_dtype, sorted(FLOAT_DTYPES))


@dataclass(frozen=True)
class GatewayConfig:
    """The Gateway deployment; None leaves the gateway's own default (router_service/gateway)."""
    request_timeout_s: float | None = None
    max_request_bytes: int | None = None
    router_wait_s: float | None = None
    auth_token_file: str | None = None
    require_tls: bool | None = None
    max_requests_per_client: int | None = None  # a client's share of requests in flight (None: no limit)

    def given(self) -> dict:
        """The options set (the gateway's keyword arguments)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True)
class ServingConfig:
    model: str
    directory: str | None = None         # the expert directory actor's name (None: its default)
    deploy_id: str = ""                  # reported by Stats: `moe-serve up` waits until it answers
    expert_tls: dict | None = None       # router <-> expert mTLS: {ca, cert, key, client_cert, client_key, server_name}
    router: RouterConfig = field(default_factory=RouterConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)

    @classmethod
    def from_args(cls, args: dict, source: str = "the application's args") -> ServingConfig:
        """`args` as the Serve config has them (one flat mapping); ValueError naming the key and
        `source` for a key no section has, or a value a section refuses."""
        if "model" not in args:
            raise ValueError(f"{source}: args.model (the checkpoint directory) is missing")
        sections = {"router": RouterConfig, "expert": ExpertConfig, "gateway": GatewayConfig}
        top = {f.name for f in dataclasses.fields(cls)} - set(sections)
        owner = {f.name: s for s, c in sections.items() for f in dataclasses.fields(c)}
        unknown = sorted(k for k in args if k not in top and k not in owner)
        if unknown:
            raise ValueError(f"{source}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in args "
                             f"(known: {', '.join(sorted(top | set(owner)))})")
        parts = {s: {k: v for k, v in args.items() if owner.get(k) == s} for s in sections}
        try:
            return cls(**{k: v for k, v in args.items() if k in top},
                       **{s: sections[s](**parts[s]) for s in sections})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
