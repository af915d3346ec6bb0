"""The router's engine on a given device and dtype: tensors follow the weights, sampling stays on
the CPU in float32."""
import dataclasses

import numpy as np
import pytest
import torch

from expert_service.experts import ExpertShard
from moe_core.checkpoint import Checkpoint, all_pairs
from router_service import model
from moe_serve.cli import main
from router_service.dispatch import InProcessDispatcher
from router_service.engine import local_engine
from router_service.sampling import SamplingParams
from tests.conftest import run


def _tensors(w: model.DenseWeights):
    return [w.embed, w.norm, w.lm_head] + [t for lw in w.layers for t in vars(lw).values()]


def test_dense_weights_to_keeps_shapes_and_a_tied_head(tiny_model):
    w = model.DenseWeights.load(Checkpoint(tiny_model))
    assert w.device == torch.device("cpu") and w.dtype == torch.float32
    assert all(a is b for a, b in zip(_tensors(w.to("cpu")), _tensors(w)))  # already there: no copies
    half = w.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert [(t.shape, t.dtype) for t in _tensors(half)] == [(t.shape, torch.bfloat16) for t in _tensors(w)]
    tied = dataclasses.replace(w, lm_head=w.embed).to(dtype=torch.bfloat16)
    assert tied.lm_head is tied.embed


def test_bfloat16_engine_keeps_its_dtype_and_stays_close_to_float32(tiny_model):
    engine = local_engine(tiny_model, dtype=torch.bfloat16)
    assert engine.device == torch.device("cpu") and engine.weights.dtype == torch.bfloat16

    async def caches_while_generating():
        stream = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=4))
        await stream.__anext__()
        running = list(engine.running)
        await stream.aclose()
        return running
    assert run(caches_while_generating())
    assert engine.pool.k.dtype == engine.pool.v.dtype == torch.bfloat16

    ids = [1, 5, 9, 200, 17, 3, 44, 8]
    want = run(local_engine(tiny_model).score(ids))
    got = run(engine.score(ids))
    assert got.dtype == torch.float32 and got.device == torch.device("cpu")
    # bf16 keeps 8 bits of mantissa: about 1% of the logits' scale, far below what a wrong rope,
    # mask or cache would give.
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()

    for params in (SamplingParams(max_new_tokens=6), SamplingParams(max_new_tokens=6, temperature=0.9, seed=5)):
        tokens, reason = run(engine.complete([4, 5, 6], params))
        assert len(tokens) == 6 and reason == "length" and all(0 <= t < engine.cfg.vocab_size for t in tokens)
        assert run(engine.complete([4, 5, 6], params))[0] == tokens  # seeded: the same again


def test_forward_in_bfloat16_returns_bfloat16(tiny_model):
    """A float32 tensor made inside a layer (rope, masks) would promote the hidden states or break
    attention's dtype check."""
    ckpt = Checkpoint(tiny_model)
    cfg, dt = ckpt.config, torch.bfloat16
    w = model.DenseWeights.load(ckpt, dtype=dt)
    disp = InProcessDispatcher(ExpertShard.load(ckpt, all_pairs(cfg), dtype=dt))
    pool = model.KVPool(cfg, 2, 16, dt)
    run(model.forward(cfg, w, pool, [7, 8, 9], [model.Segment(1, 0, 3)], disp))
    segs = [model.Segment(0, 0, 5), model.Segment(1, 3, 1)]
    h_TH = run(model.forward(cfg, w, pool, [1, 2, 3, 4, 5, 10], segs, disp))
    assert h_TH.dtype == dt and h_TH.shape == (6, cfg.hidden_size)
    assert model.logits(w, h_TH).dtype == dt
    assert pool.k.dtype == pool.v.dtype == dt


@pytest.mark.parametrize("window", [None, 4])
def test_attention_makes_its_tensors_on_the_weights_device(tiny_model, window):
    """On the meta device, any position, mask or index tensor made on the CPU instead fails the op
    that meets it: the same mistake that would copy to and from a GPU inside every layer."""
    ckpt = Checkpoint(tiny_model)
    cfg = dataclasses.replace(ckpt.config, sliding_window=window)
    meta = torch.device("meta")
    w = model.DenseWeights.load(ckpt, device=meta)
    assert w.device == meta
    pool = model.KVPool(cfg, 3, 16, device=meta)
    segs = [model.Segment(0, 3, 1), model.Segment(1, 0, 6), model.Segment(2, 9, 1)]
    step = model.plan_step(cfg, pool, list(range(8)), segs, w.device, w.dtype)
    made = [step.tokens_T, step.cos_TD, step.sin_TD, step.rows_B, step.slots_B, step.mask_R11S] + [
        mask for _, _, mask in step.prompts]
    assert all(t.device == meta for t in made)
    x_TH = torch.empty(8, cfg.hidden_size, device=meta)
    out_TH = model.attention(cfg, w.layers[0], 0, x_TH, step, pool)
    assert out_TH.device == meta and out_TH.shape == (8, cfg.hidden_size)


def test_cli_local_dtype(tiny_model, tmp_path, capsys):
    args = ["score", "--model", str(tiny_model), "--local", "--token-ids", "1,2,3,4"]
    assert main(args + ["--out", str(tmp_path / "f32.npy")]) == 0
    assert main(args + ["--out", str(tmp_path / "bf16.npy"), "--dtype", "bfloat16"]) == 0
    f32, bf16 = np.load(tmp_path / "f32.npy"), np.load(tmp_path / "bf16.npy")
    assert bf16.dtype == np.float32 and bf16.shape == f32.shape and not np.array_equal(bf16, f32)
    assert np.abs(bf16 - f32).max() <= 0.02 * np.abs(f32).max()
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(args + ["--out", str(tmp_path / "x.npy"), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_shared_memory_auto_follows_the_router_device_and_bad_values_are_named():
    from router_service.router import shared_kind
    assert shared_kind("auto", "cpu") == "shm" and shared_kind("auto", "cuda") == "cuda_ipc"
    assert shared_kind("", "cuda") == "" and shared_kind("shm", "cuda:1") == "shm"
    with pytest.raises(ValueError, match="needs the router on a GPU"):
        shared_kind("cuda_ipc", "cpu")
    from router_service.serving import RouterConfig
    with pytest.raises(ValueError, match="shared_memory must be one of 'auto', 'shm', 'cuda_ipc', '', got 'nvlink'"):
        RouterConfig(shared_memory="nvlink")
