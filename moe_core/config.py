"""The model config: one frozen dataclass, read from a Hugging Face Mixtral config.json or a preset."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

FLOAT_DTYPES = frozenset({"float32", "bfloat16", "float16"})  # the dtypes weights and rows may take


class ConfigError(ValueError):
    """A config that cannot describe a Mixtral model; the message names the field."""


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    n_experts: int
    top_k: int
    head_dim: int = 0  # 0 = hidden_size // n_heads
    max_position_embeddings: int = 4096
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False

    def __post_init__(self):
        positive = ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads",
                    "n_kv_heads", "n_experts", "top_k", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"top_k ({self.top_k}) must not exceed n_experts ({self.n_experts})")
        if self.head_dim == 0 and self.hidden_size % self.n_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must divide hidden_size ({self.hidden_size})")
        if self.head_dim < 0 or self.dim_per_head % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.dim_per_head}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window!r}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} ({value}) must lie in [0, vocab_size={self.vocab_size})")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.n_heads

    # -- Hugging Face config.json ------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict) -> MoEConfig:
        if d.get("model_type") != "mixtral":
            raise ConfigError(f"model_type must be 'mixtral', got {d.get('model_type')!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act must be 'silu', got {d.get('hidden_act')!r}")
        rope = d.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters.rope_type {rope.get('rope_type')!r} is not supported")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_local_experts", "num_experts_per_tok")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"config.json lacks {', '.join(missing)}")
        eos = d.get("eos_token_id", 2)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            n_experts=d["num_local_experts"],
            top_k=d["num_experts_per_tok"],
            head_dim=d.get("head_dim") or 0,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 1e6))),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            sliding_window=d.get("sliding_window"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> MoEConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: not a Hugging Face model directory")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict:
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "num_local_experts": self.n_experts,
            "num_experts_per_tok": self.top_k,
            "head_dim": self.dim_per_head,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "sliding_window": self.sliding_window,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)


PRESETS = {
    # Tests and the demo: small enough for a 2-core CPU, still grouped-query attention.
    "tiny": MoEConfig(vocab_size=512, hidden_size=64, intermediate_size=128, n_layers=2,
                      n_heads=4, n_kv_heads=2, n_experts=8, top_k=2, max_position_embeddings=512),
    "bench": MoEConfig(vocab_size=32000, hidden_size=512, intermediate_size=1792, n_layers=8,
                       n_heads=8, n_kv_heads=2, n_experts=8, top_k=2, rope_theta=1e6,
                       max_position_embeddings=4096),
    # Shapes only (no checkpoint of this size is written here): for benchmarks and planning.
    "mixtral-8x7b": MoEConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                              n_layers=32, n_heads=32, n_kv_heads=8, n_experts=8, top_k=2,
                              max_position_embeddings=32768),
    "mixtral-8x22b": MoEConfig(vocab_size=32768, hidden_size=6144, intermediate_size=16384,
                               n_layers=56, n_heads=48, n_kv_heads=8, n_experts=8, top_k=2,
                               max_position_embeddings=65536),
}


def preset(name: str) -> MoEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
