"""The dense part of a Mixtral decoder, and the MoE block that hands experts to a dispatcher.

Legend: T tokens in this step (all sequences, flattened), H hidden size, K top_k, E experts,
N = T * K routed rows, Q query heads, G kv heads, D head dim, S cached positions of one sequence,
B sequences that decode one token in this step, P slots of the KV pool, R the slots a decode
step's attention spans.
"""
from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_core.checkpoint import Checkpoint, dense_shapes
from moe_core.config import MoEConfig
from moe_core.staging import Staging


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
        stage = Staging()  # to a GPU through pinned memory (pageable copies are slow there)
        return cls.from_state(ckpt.config, {k: stage.to_device(t, device) for k, t in state.items()})

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


class KVPool:
    """Keys and values of every running sequence, allocated once per engine: `n_slots` slots of
    `max_len` positions each. A sequence holds one slot from admission until it ends; the lowest free
    slot is handed out first, so the running sequences stay packed at the front and a decode step
    attends over a view of the first slots, never a copy."""

    def __init__(self, cfg: MoEConfig, n_slots: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.n_layers, n_slots, cfg.n_kv_heads, max_len, cfg.dim_per_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, G, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots, self.max_len = n_slots, max_len
        self._free = list(range(n_slots))  # a heap: lowest first
        self.staging = _MetaStaging()  # the step metadata's pinned copies

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return heapq.heappop(self._free) if self._free else None

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)


@dataclass
class Segment:
    """A run of consecutive tokens of one sequence inside the step's flattened batch."""
    slot: int
    start: int   # position of the first token
    length: int


@dataclass
class Step:
    """What every layer's attention needs to know about one step's sequences, built once per step
    and sent to the model's device in one copy: the layers then make no host-to-device copies."""
    tokens_T: torch.Tensor
    pos_T: torch.Tensor
    slot_T: torch.Tensor
    cos_TD: torch.Tensor
    sin_TD: torch.Tensor
    prompts: list[tuple[Segment, int, torch.Tensor]]  # (segment, first row, mask [n, start+n]) for runs of 2+ tokens
    rows_B: torch.Tensor | None                       # the decodes' rows in the step (None: no decodes)
    slots_B: torch.Tensor | None                      # and their slots
    mask_R11S: torch.Tensor | None                    # which positions slot r's decode query sees
    all_decode: bool                                  # every row decodes: rows_B is arange(T)


class _MetaStaging:
    """Two pinned host buffers used in turn for the step's metadata (one non-blocking copy each);
    an event says when the copy out of a buffer is done, so it is never overwritten mid-copy."""

    def __init__(self):
        self.bufs, self.events, self.turn = [None, None], [None, None], 0

    def to_device(self, host_I: torch.Tensor, device: torch.device, out_I: torch.Tensor | None = None) -> torch.Tensor:
        """host_I on `device` (in out_I when given)."""
        if device.type != "cuda":
            return host_I.to(device) if out_I is None else out_I.copy_(host_I)
        i = self.turn = 1 - self.turn
        if self.events[i] is not None:
            self.events[i].synchronize()
        if self.bufs[i] is None or self.bufs[i].numel() < host_I.numel():
            self.bufs[i] = torch.empty(max(host_I.numel(), 4096), dtype=torch.int64, pin_memory=True)
        buf = self.bufs[i][:host_I.numel()]
        buf.copy_(host_I)
        out = buf.to(device, non_blocking=True) if out_I is None else out_I.copy_(buf, non_blocking=True)
        self.events[i] = torch.cuda.Event()
        self.events[i].record()
        return out


def plan_step(cfg: MoEConfig, pool: KVPool, tokens: list[int], segments: list[Segment], device,
              dtype: torch.dtype) -> Step:
    T = len(tokens)
    pos, slot = [], []
    for seg in segments:
        pos += range(seg.start, seg.start + seg.length)
        slot += [seg.slot] * seg.length
    rows = list(itertools.accumulate((seg.length for seg in segments), initial=0))
    decodes = [(seg, r) for seg, r in zip(segments, rows) if seg.length == 1]
    R = max((seg.slot for seg, _ in decodes), default=-1) + 1   # decode attention spans slots [0, R)
    pos_R = [0] * R  # slots that do not decode this step see position 0 only (finite, discarded)
    for seg, _ in decodes:
        pos_R[seg.slot] = seg.start
    meta = tokens + pos + slot + [r for _, r in decodes] + [seg.slot for seg, _ in decodes] + pos_R
    meta_I = pool.staging.to_device(torch.tensor(meta, dtype=torch.int64), torch.device(device))
    B = len(decodes)
    tokens_T, pos_T, slot_T, rows_B, slots_B, pos_R = meta_I.split([T, T, T, B, B, R])
    cos_TD, sin_TD = rope_cos_sin(pos_T, cfg.dim_per_head, cfg.rope_theta)
    prompts = [(seg, r, _causal(cfg, pos_T[r:r + seg.length, None],
                                torch.arange(seg.start + seg.length, device=device)[None, :]))
               for seg, r in zip(segments, rows) if seg.length > 1]
    mask = None
    if decodes:
        S = max(seg.start for seg, _ in decodes) + 1
        mask = _causal(cfg, pos_R[:, None], torch.arange(S, device=device)[None, :])[:, None, None, :]
    return Step(tokens_T, pos_T, slot_T, cos_TD.to(dtype), sin_TD.to(dtype), prompts,
                rows_B if decodes else None, slots_B if decodes else None, mask, B == T)


def decode_step(cfg: MoEConfig, tokens_R: torch.Tensor, pos_R: torch.Tensor, S: int, dtype: torch.dtype) -> Step:
    """A step in which every slot r < R decodes one token as row r (a free slot's row reads token 0
    at position 0, writes there and is discarded), attending over its first S positions. Everything
    is derived on the device from the two tensors given, so a CUDA graph can replay it with new ones."""
    R, device = tokens_R.shape[0], tokens_R.device
    cos_RD, sin_RD = rope_cos_sin(pos_R, cfg.dim_per_head, cfg.rope_theta)
    slots_R = torch.arange(R, device=device)
    mask_R11S = _causal(cfg, pos_R[:, None], torch.arange(S, device=device)[None, :])[:, None, None, :]
    return Step(tokens_R, pos_R, slots_R, cos_RD.to(dtype), sin_RD.to(dtype), [], slots_R, slots_R, mask_R11S, True)


def attention(cfg: MoEConfig, w: LayerWeights, layer: int, x_TH: torch.Tensor, step: Step,
              pool: KVPool) -> torch.Tensor:
    T, D, Q, G = x_TH.shape[0], cfg.dim_per_head, cfg.n_heads, cfg.n_kv_heads
    q_TQD = apply_rope(F.linear(x_TH, w.wq).view(T, Q, D), step.cos_TD, step.sin_TD)
    k_TGD = apply_rope(F.linear(x_TH, w.wk).view(T, G, D), step.cos_TD, step.sin_TD)
    v_TGD = F.linear(x_TH, w.wv).view(T, G, D)
    k_PGSD, v_PGSD = pool.k[layer], pool.v[layer]
    k_PGSD[step.slot_T, :, step.pos_T] = k_TGD  # every token's cache write in one scatter
    v_PGSD[step.slot_T, :, step.pos_T] = v_TGD
    out_TQD = q_TQD if step.all_decode else torch.empty_like(q_TQD)
    for seg, r, mask in step.prompts:  # prompts differ in length: one call per prompt
        n, S = seg.length, seg.start + seg.length
        qkv = q_TQD[r:r + n].transpose(0, 1), k_PGSD[seg.slot, :, :S], v_PGSD[seg.slot, :, :S]
        # On the CPU as a batch of one: SDPA's fused CPU kernel takes only 4-D inputs (for 3-D ones it
        # takes its math path, several times slower). On a GPU 3-D as before: there a 4-D call may go
        # to cuDNN's attention, which builds a plan for every new shape (tens of ms each).
        batched = not x_TH.is_cuda
        y = F.scaled_dot_product_attention(*(t[None] if batched else t for t in qkv), attn_mask=mask,
                                           enable_gqa=G != Q)
        out_TQD[r:r + n] = (y[0] if batched else y).transpose(0, 1)  # [n, Q, D]
    if step.rows_B is not None:
        # One call for every decode: queries placed at their slots, attending a view of the first R
        # slots' caches; a kv head's Q/G query heads act as its query positions (GQA without copies).
        R, S = step.mask_R11S.shape[0], step.mask_R11S.shape[-1]
        q_B = q_TQD if step.all_decode else q_TQD[step.rows_B]
        q_RQD = q_TQD.new_zeros(R, Q, D).index_copy_(0, step.slots_B, q_B)
        y_RGqD = F.scaled_dot_product_attention(q_RQD.view(R, G, Q // G, D), k_PGSD[:R, :, :S],
                                                v_PGSD[:R, :, :S], attn_mask=step.mask_R11S)
        y_BQD = y_RGqD.reshape(R, Q, D)[step.slots_B]
        if step.all_decode:
            out_TQD = y_BQD
        else:
            out_TQD[step.rows_B] = y_BQD
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


@dataclass
class Routed:
    """One layer's routing: the rows grouped by expert, and how to put their outputs back."""
    x_NH: torch.Tensor      # the routed rows, grouped by expert (expert order)
    counts_E: torch.Tensor  # rows per expert, on the rows' device
    token_N: torch.Tensor   # which token each row came from
    expert_N: torch.Tensor  # which expert it goes to
    w_N: torch.Tensor       # its gate weight


def route_rows(x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int) -> Routed:
    """Route, then group the rows by expert, all on the device (no host wait)."""
    E = gate_EH.shape[0]
    w_TK, idx_TK = route(x_TH, gate_EH, top_k)
    idx_N = idx_TK.flatten()
    order_N = idx_N.argsort(stable=True)                     # rows grouped by expert
    token_N = order_N // top_k
    # scatter_add_, not bincount: on a GPU bincount reads min and max back (two host waits)
    counts_E = torch.zeros(E, dtype=torch.int64, device=idx_N.device).scatter_add_(0, idx_N, torch.ones_like(idx_N))
    return Routed(x_TH[token_N], counts_E, token_N, idx_N[order_N], w_TK.flatten()[order_N])


def combine(routed: Routed, y_NH: torch.Tensor, T: int) -> torch.Tensor:
    """The experts' outputs weighted by the gate and summed per token: [T, H]."""
    out_TH = y_NH.new_zeros(T, y_NH.shape[1])
    return out_TH.index_add_(0, routed.token_N, y_NH * routed.w_N[:, None])


async def moe(layer: int, x_TH: torch.Tensor, gate_EH: torch.Tensor, top_k: int, dispatcher,
              on_route=None, deadline: float | None = None) -> torch.Tensor:
    """Route, group the rows by expert, run them through the dispatcher, combine with the gate weights."""
    routed = route_rows(x_TH, gate_EH, top_k)
    counts_E = routed.counts_E.tolist()  # the layer's one wait for the device
    if on_route is not None:
        on_route(layer, counts_E)
    y_NH = await dispatcher.run_experts(layer, routed.x_NH, counts_E, deadline)
    return combine(routed, y_NH, x_TH.shape[0])


async def forward(cfg: MoEConfig, w: DenseWeights, pool: KVPool, tokens: list[int], segments: list[Segment],
                  dispatcher, on_route=None, deadline: float | None = None) -> torch.Tensor:
    """One step over the flattened tokens of several sequences (their caches in `pool`); returns
    final hidden states [T, H].

    `on_route(layer, counts_E)` sees how many rows each expert got in every layer (statistics);
    `deadline` (time.monotonic()) bounds the expert calls.
    """
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    step = plan_step(cfg, pool, tokens, segments, w.device, w.dtype)
    h_TH = F.embedding(step.tokens_T, w.embed)
    for L, lw in enumerate(w.layers):
        h_TH, x_TH = attention_block(cfg, lw, L, h_TH, step, pool)
        h_TH = h_TH + await moe(L, x_TH, lw.gate, cfg.top_k, dispatcher, on_route, deadline)
    return rms_norm(h_TH, w.norm, cfg.rms_norm_eps)


def attention_block(cfg: MoEConfig, lw: LayerWeights, layer: int, h_TH: torch.Tensor, step: Step,
                    pool: KVPool) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after the layer's attention, and its normed copy for the MoE block."""
    h_TH = h_TH + attention(cfg, lw, layer, rms_norm(h_TH, lw.attn_norm, cfg.rms_norm_eps), step, pool)
    return h_TH, rms_norm(h_TH, lw.moe_norm, cfg.rms_norm_eps)


def logits(w: DenseWeights, h_TH: torch.Tensor) -> torch.Tensor:
    return F.linear(h_TH, w.lm_head)  # [T, V]
