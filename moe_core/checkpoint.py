"""Hugging Face Mixtral checkpoints: key names, reading (single file or shards, only the
tensors asked for), validation that names what is wrong, and writing seeded random ones."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from moe_core.config import ConfigError, MoEConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; the message names the key or file."""


def expert_keys(layer: int, expert: int) -> list[str]:
    base = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    return [f"{base}.w1.weight", f"{base}.w2.weight", f"{base}.w3.weight"]


def dense_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the router needs: embeddings, attention, norms, gates, lm_head."""
    H, D = cfg.hidden_size, cfg.dim_per_head
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, H)
    for L in range(cfg.n_layers):
        p = f"model.layers.{L}"
        shapes |= {
            f"{p}.input_layernorm.weight": (H,),
            f"{p}.post_attention_layernorm.weight": (H,),
            f"{p}.self_attn.q_proj.weight": (cfg.n_heads * D, H),
            f"{p}.self_attn.k_proj.weight": (cfg.n_kv_heads * D, H),
            f"{p}.self_attn.v_proj.weight": (cfg.n_kv_heads * D, H),
            f"{p}.self_attn.o_proj.weight": (H, cfg.n_heads * D),
            f"{p}.block_sparse_moe.gate.weight": (cfg.n_experts, H),
        }
    return shapes


def expert_shapes(cfg: MoEConfig, pairs) -> dict[str, tuple[int, ...]]:
    H, I = cfg.hidden_size, cfg.intermediate_size
    shapes = {}
    for L, E in pairs:
        w1, w2, w3 = expert_keys(L, E)
        shapes |= {w1: (I, H), w2: (H, I), w3: (I, H)}
    return shapes


def all_pairs(cfg: MoEConfig) -> list[tuple[int, int]]:
    return [(L, E) for L in range(cfg.n_layers) for E in range(cfg.n_experts)]


def all_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    return dense_shapes(cfg) | expert_shapes(cfg, all_pairs(cfg))


class Checkpoint:
    """A model directory: config.json plus model.safetensors or shards with an index.

    Opening reads only the config and the safetensors headers; `load` reads the tensors asked for.
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory {self.dir} does not exist")
        try:
            self.config = MoEConfig.from_dir(self.dir)
        except ConfigError as e:
            raise CheckpointError(f"{self.dir}: {e}") from None
        self.file_of = self._read_index()
        self.shape_of = self._read_headers()

    def _read_index(self) -> dict[str, Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
            return {k: self.dir / f for k, f in weight_map.items()}
        single = self.dir / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        with self._open(single) as f:
            return {k: single for k in f.keys()}

    def _open(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"shard {path.name} named in the index is missing")
        try:
            return safe_open(path, framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path.name} is not a readable safetensors file ({e})") from None

    def _read_headers(self) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for path in sorted(set(self.file_of.values())):
            with self._open(path) as f:
                for k in f.keys():
                    shapes[k] = tuple(f.get_slice(k).get_shape())
            # safetensors reads only the header; a file cut short shows as missing bytes here.
            need = _data_end(path)
            if need > path.stat().st_size:
                raise CheckpointError(
                    f"{path.name} is truncated: header describes {need} bytes, file has {path.stat().st_size}")
        return shapes

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        missing = [k for k in expected if k not in self.shape_of]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{self.dir}: missing tensor(s) {', '.join(missing[:5])}{more}")
        for k, shape in expected.items():
            if self.shape_of[k] != shape:
                raise CheckpointError(
                    f"{self.dir}: tensor {k} has shape {list(self.shape_of[k])}, config needs {list(shape)}")

    def load(self, expected: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32,
             desc: str = "loading") -> dict[str, torch.Tensor]:
        """Checks, then reads just these tensors (each file opened once), cast to `dtype`."""
        self.check(expected)
        by_file: dict[Path, list[str]] = {}
        for k in expected:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        with tqdm(total=len(expected), desc=desc, unit="tensor", delay=2.0, leave=False) as bar:
            for path, keys in by_file.items():
                with self._open(path) as f:
                    for k in keys:
                        out[k] = f.get_tensor(k).to(dtype)
                        bar.update()
        return out


def _data_end(path: Path) -> int:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)


# -- writing -------------------------------------------------------------------------


def random_weights(cfg: MoEConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded weights at the scale Hugging Face initialises Mixtral with (normal, std 0.02; norms 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in all_shapes(cfg).items():
        if k.endswith("norm.weight"):
            out[k] = torch.ones(shape)
        else:
            out[k] = torch.randn(shape, generator=g) * std
    return out


def parse_size(text: str) -> int:
    """'500MB', '2GB', '64KiB' or a plain byte count."""
    t = text.strip().upper().replace("IB", "B")
    for suffix, mult in (("KB", 1 << 10), ("MB", 1 << 20), ("GB", 1 << 30), ("B", 1)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], mult
            break
    else:
        scale = 1
    try:
        n = int(float(t) * scale)
    except ValueError:
        raise ValueError(f"cannot read size {text!r} (use e.g. 500MB)") from None
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def write_checkpoint(out_dir: str | os.PathLike, cfg: MoEConfig, tensors: dict[str, torch.Tensor],
                     shard_size: int | None = None, dtype: torch.dtype = torch.float32) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    meta = {"format": "pt"}
    if shard_size is None:
        save_file(tensors, out / SINGLE_FILE, metadata=meta)
        return
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > shard_size:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata=meta)
        weight_map |= {k: name for k in shard}
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
