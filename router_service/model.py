"""The dense part of a Mixtral decoder, and the MoE block that hands experts to a dispatcher.

Legend: T tokens in this step (all sequences, flattened), H hidden size, K top_k, E experts,
N = T * K routed rows, Q query heads, G kv heads, D head dim, S cached positions of one sequence.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from moe_core.checkpoint import Checkpoint, dense_shapes
from moe_core.config import MoEConfig


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wq: torch.Tensor         # [Q*D, H]
    wk: torch.Tensor         # [G*D, H]
    wv: torch.Tensor         # [G*D, H]
    wo: torch.Tensor         # [H, Q*D]
    moe_norm: torch.Tensor   # [H]
    gate: torch.Tensor       # [E, H]


@dataclass
class DenseWeights:
    embed: torch.Tensor      # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor       # [H]
    lm_head: torch.Tensor    # [V, H]

    @classmethod
    def from_state(cls, cfg: MoEConfig, s: dict[str, torch.Tensor]) -> DenseWeights:
        def layer(L):
            p = f"model.layers.{L}"
            return LayerWeights(
                s[f"{p}.input_layernorm.weight"], s[f"{p}.self_attn.q_proj.weight"],
                s[f"{p}.self_attn.k_proj.weight"], s[f"{p}.self_attn.v_proj.weight"],
                s[f"{p}.self_attn.o_proj.weight"], s[f"{p}.post_attention_layernorm.weight"],
                s[f"{p}.block_sparse_moe.gate.weight"])
        embed = s["model.embed_tokens.weight"]
        return cls(embed, [layer(L) for L in range(cfg.n_layers)], s["model.norm.weight"],
                   s.get("lm_head.weight", embed))

    @classmethod
    def load(cls, ckpt: Checkpoint, dtype=torch.float32) -> DenseWeights:
        return cls.from_state(ckpt.config, ckpt.load(dense_shapes(ckpt.config), dtype=dtype, desc="loading router"))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_cos_sin(positions_T: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)  # [D/2]
    freqs = positions_T.float()[:, None] * inv_freq[None, :]                                 # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                                  # [T, D]
    return emb.cos(), emb.sin()


def apply_rope(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_THD.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half: the Hugging Face (non-interleaved) layout
    return x_THD * cos_TD[:, None, :] + rotated * sin_TD[:, None, :]


class KVCache:
    """One sequence's keys and values for every layer, grown as positions are written."""

    def __init__(self, cfg: MoEConfig, capacity: int, dtype=torch.float32):
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.dim_per_head)
        self.k, self.v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)  # [L, G, S, D]
        self.length = 0  # positions written for every layer

    def write(self, layer: int, start: int, k_nGD: torch.Tensor, v_nGD: torch.Tensor):
        n = k_nGD.shape[0]
        self.k[layer, :, start:start + n] = k_nGD.transpose(0, 1)
        self.v[layer, :, start:start + n] = v_nGD.transpose(0, 1)
        return self.k[layer, :, :start + n], self.v[layer, :, :start + n]  # [G, S, D]


@dataclass
class Segment:
    """A run of consecutive tokens of one sequence inside the step's flattened batch."""
    cache: KVCache
    start: int   # position of the first token
    length: int


def attention(cfg: MoEConfig, w: LayerWeights, layer: int, x_TH: torch.Tensor, segments: list[Segment],
              cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    T, D, Q, G = x_TH.shape[0], cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
    q_TQD = apply_rope(F.linear(x_TH, w.wq).view(T, Q, D), cos_TD, sin_TD)
    k_TGD = apply_rope(F.linear(x_TH, w.wk).view(T, G, D), cos_TD, sin_TD)
    v_TGD = F.linear(x_TH, w.wv).view(T, G, D)
    out_TQD = torch.empty_like(q_TQD)
    rows = list(itertools.accumulate((seg.length for seg in segments), initial=0))
    decode = [i for i, seg in enumerate(segments) if seg.length == 1]
    for i, seg in enumerate(segments):
        if seg.length > 1:  # prompts differ in length: attention runs per sequence
            r, n, s = rows[i], seg.length, seg.start
            k_GSD, v_GSD = seg.cache.write(layer, s, k_TGD[r:r + n], v_TGD[r:r + n])
            qpos, kpos = torch.arange(s, s + n)[:, None], torch.arange(s + n)[None, :]
            y_QnD = F.scaled_dot_product_attention(q_TQD[r:r + n].transpose(0, 1), k_GSD, v_GSD,
                                                   attn_mask=_causal(cfg, qpos, kpos), enable_gqa=G != Q)
            out_TQD[r:r + n] = y_QnD.transpose(0, 1)
    if decode:  # one new token per sequence: one attention call over the padded caches
        rows_B = [rows[i] for i in decode]
        ks, vs = zip(*(segments[i].cache.write(layer, segments[i].start, k_TGD[r:r + 1], v_TGD[r:r + 1])
                       for i, r in zip(decode, rows_B)))
        r_B = torch.tensor(rows_B)
        k_BGSD = pad_sequence([k.transpose(0, 1) for k in ks], batch_first=True).transpose(1, 2)
        v_BGSD = pad_sequence([v.transpose(0, 1) for v in vs], batch_first=True).transpose(1, 2)
        qpos_B1 = torch.tensor([segments[i].start for i in decode])[:, None]
        mask_BS = _causal(cfg, qpos_B1, torch.arange(k_BGSD.shape[2])[None, :])
        y_BQ1D = F.scaled_dot_product_attention(q_TQD[r_B][:, :, None], k_BGSD, v_BGSD,
                                                attn_mask=mask_BS[:, None, None], enable_gqa=G != Q)
        out_TQD[r_B] = y_BQ1D[:, :, 0]
    return F.linear(out_TQD.reshape(T, Q * D), w.wo)  # [T, H]


def _causal(cfg: MoEConfig, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """Which keys each query sees: earlier or same positions, within the sliding window if any."""
    mask = kpos <= qpos
    if cfg.sliding_window is not None:
        mask &= kpos > qpos - cfg.sliding_window
    return mask


def route(x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's gate: softmax over all experts, top-k, renormalise the k weights to sum 1."""
    probs_TE = F.softmax(F.linear(x_TH, gate_EH).float(), dim=-1)
    w_TK, idx_TK = torch.topk(probs_TE, top_k, dim=-1)
    return (w_TK / w_TK.sum(dim=-1, keepdim=True)).to(x_TH.dtype), idx_TK


async def moe(layer: int, x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, dispatcher,
              on_route=None) -> torch.Tensor:
    """Route, group the rows by expert, run them through the dispatcher, combine with the gate weights."""
    E = gate_EH.shape[0]
    w_TK, idx_TK = route(x_TH, gate_EH, top_k)
    order_N = idx_TK.flatten().argsort(stable=True)          # rows grouped by expert
    token_N = order_N // top_k
    counts_E = torch.bincount(idx_TK.flatten(), minlength=E).tolist()
    if on_route is not None:
        on_route(layer, counts_E)
    y_NH = await dispatcher.run_experts(layer, x_TH[token_N], counts_E)
    out_TH = torch.zeros_like(x_TH)
    out_TH.index_add_(0, token_N, y_NH * w_TK.flatten()[order_N, None])
    return out_TH


async def forward(cfg: MoEConfig, w: DenseWeights, tokens_T: torch.Tensor, segments: list[Segment],
                  dispatcher, on_route=None) -> torch.Tensor:
    """One step over the flattened tokens of several sequences; returns final hidden states [T, H].

    `on_route(layer, counts_E)` sees how many rows each expert got in every layer (statistics).
    """
    positions_T = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])
    cos_TD, sin_TD = rope_cos_sin(positions_T, cfg.dim_per_head, cfg.rope_theta)
    h_TH = F.embedding(tokens_T, w.embed)
    for L, lw in enumerate(w.layers):
        h_TH = h_TH + attention(cfg, lw, L, rms_norm(h_TH, lw.attn_norm, cfg.rms_norm_eps), segments, cos_TD, sin_TD)
        x_TH = rms_norm(h_TH, lw.moe_norm, cfg.rms_norm_eps)
        h_TH = h_TH + await moe(L, x_TH, lw.gate, cfg.top_k, dispatcher, on_route)
    for s in segments:
        s.cache.length = max(s.cache.length, s.start + s.length)
    return rms_norm(h_TH, w.norm, cfg.rms_norm_eps)


def logits(w: DenseWeights, h_TH: torch.Tensor) -> torch.Tensor:
    return F.linear(h_TH, w.lm_head)  # [T, V]
