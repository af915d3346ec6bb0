"""The dense part of a Mixtral decoder, and the MoE block that hands experts to a dispatcher.

Legend: T tokens in this step (all sequences, flattened), H hidden size, K top_k, E experts,
N = T * K routed rows, Q query heads, G kv heads, D head dim, S cached positions of one sequence,
B sequences that decode one token in this step.
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
    def load(cls, ckpt: Checkpoint, dtype=torch.float32, device="cpu") -> DenseWeights:
        state = ckpt.load(dense_shapes(ckpt.config), dtype=dtype, desc="loading router")
        return cls.from_state(ckpt.config, state).to(device)

    def to(self, device=None, dtype=None) -> DenseWeights:
        """These weights on `device` in `dtype` (tensors already there are not copied); a tied
        lm_head stays one tensor with the embedding."""
        def move(t):
            return t.to(device=device, dtype=dtype)
        embed = move(self.embed)
        return DenseWeights(embed, [LayerWeights(**{k: move(t) for k, t in vars(lw).items()}) for lw in self.layers],
                            move(self.norm), embed if self.lm_head is self.embed else move(self.lm_head))

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_cos_sin(positions_T: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    arange = torch.arange(0, dim, 2, dtype=torch.int64, device=positions_T.device)
    inv_freq = 1.0 / theta ** (arange.float() / dim)                                        # [D/2]
    freqs = positions_T.float()[:, None] * inv_freq[None, :]                                 # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)                                                  # [T, D]
    return emb.cos(), emb.sin()


def apply_rope(x_THD: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_THD.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half: the Hugging Face (non-interleaved) layout
    return x_THD * cos_TD[:, None, :] + rotated * sin_TD[:, None, :]


class KVCache:
    """One sequence's keys and values for every layer, grown as positions are written."""

    def __init__(self, cfg: MoEConfig, capacity: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layers, cfg.n_kv_heads, capacity, cfg.dim_per_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, G, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
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


@dataclass
class Step:
    """What every layer's attention needs to know about one step's sequences, built once per step
    on the model's device: the layers then make no host-to-device copies (each waits for the GPU)."""
    cos_TD: torch.Tensor
    sin_TD: torch.Tensor
    prompts: list[tuple[Segment, int, torch.Tensor]]  # (segment, first row, mask [n, S]) for runs of 2+ tokens
    decodes: list[tuple[Segment, int]]                # (segment, row) for one new token
    rows_B: torch.Tensor | None                       # the decodes' rows
    mask_BS: torch.Tensor | None                      # which of their (padded) cached positions each sees


def plan_step(cfg: MoEConfig, segments: list[Segment], device, dtype: torch.dtype) -> Step:
    positions_T = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments]).to(device)
    cos_TD, sin_TD = rope_cos_sin(positions_T, cfg.dim_per_head, cfg.rope_theta)
    rows = list(itertools.accumulate((seg.length for seg in segments), initial=0))
    prompts = [(seg, r, _causal(cfg, positions_T[r:r + seg.length, None],
                                torch.arange(seg.start + seg.length, device=device)[None, :]))
               for seg, r in zip(segments, rows) if seg.length > 1]
    decodes = [(seg, r) for seg, r in zip(segments, rows) if seg.length == 1]
    rows_B = mask_BS = None
    if decodes:
        rows_B = torch.tensor([r for _, r in decodes], device=device)
        S = max(seg.start for seg, _ in decodes) + 1
        mask_BS = _causal(cfg, positions_T[rows_B, None], torch.arange(S, device=device)[None, :])
    return Step(cos_TD.to(dtype), sin_TD.to(dtype), prompts, decodes, rows_B, mask_BS)


def attention(cfg: MoEConfig, w: LayerWeights, layer: int, x_TH: torch.Tensor, step: Step) -> torch.Tensor:
    T, D, Q, G = x_TH.shape[0], cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
    q_TQD = apply_rope(F.linear(x_TH, w.wq).view(T, Q, D), step.cos_TD, step.sin_TD)
    k_TGD = apply_rope(F.linear(x_TH, w.wk).view(T, G, D), step.cos_TD, step.sin_TD)
    v_TGD = F.linear(x_TH, w.wv).view(T, G, D)
    out_TQD = torch.empty_like(q_TQD)
    for seg, r, mask in step.prompts:  # prompts differ in length: attention runs per sequence
        n = seg.length
        k_GSD, v_GSD = seg.cache.write(layer, seg.start, k_TGD[r:r + n], v_TGD[r:r + n])
        y_QnD = F.scaled_dot_product_attention(q_TQD[r:r + n].transpose(0, 1), k_GSD, v_GSD,
                                               attn_mask=mask, enable_gqa=G != Q)
        out_TQD[r:r + n] = y_QnD.transpose(0, 1)
    if step.decodes:  # one new token per sequence: one attention call over the padded caches
        ks, vs = zip(*(seg.cache.write(layer, seg.start, k_TGD[r:r + 1], v_TGD[r:r + 1]) for seg, r in step.decodes))
        k_BGSD = pad_sequence([k.transpose(0, 1) for k in ks], batch_first=True).transpose(1, 2)
        v_BGSD = pad_sequence([v.transpose(0, 1) for v in vs], batch_first=True).transpose(1, 2)
        y_BQ1D = F.scaled_dot_product_attention(q_TQD[step.rows_B][:, :, None], k_BGSD, v_BGSD,
                                                attn_mask=step.mask_BS[:, None, None], enable_gqa=G != Q)
        out_TQD[step.rows_B] = y_BQ1D[:, :, 0]
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
    idx_N = idx_TK.flatten()
    order_N = idx_N.argsort(stable=True)                     # rows grouped by expert
    token_N = order_N // top_k
    # The layer's one wait for the device (bincount would add two: on a GPU it reads min and max back).
    ones_N = torch.ones_like(idx_N)
    counts_E = torch.zeros(E, dtype=torch.int64, device=idx_N.device).scatter_add_(0, idx_N, ones_N).tolist()
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
    step = plan_step(cfg, segments, w.device, w.dtype)
    h_TH = F.embedding(tokens_T, w.embed)
    for L, lw in enumerate(w.layers):
        h_TH = h_TH + attention(cfg, lw, L, rms_norm(h_TH, lw.attn_norm, cfg.rms_norm_eps), step)
        x_TH = rms_norm(h_TH, lw.moe_norm, cfg.rms_norm_eps)
        h_TH = h_TH + await moe(L, x_TH, lw.gate, cfg.top_k, dispatcher, on_route)
    for s in segments:
        s.cache.length = max(s.cache.length, s.start + s.length)
    return rms_norm(h_TH, w.norm, cfg.rms_norm_eps)


def logits(w: DenseWeights, h_TH: torch.Tensor) -> torch.Tensor:
    return F.linear(h_TH, w.lm_head)  # [T, V]
