import math

import pytest
import torch

from router_service.engine import local_engine
from router_service.sampling import SamplingParams, sample
from tests.conftest import run


def test_same_seed_same_tokens(tiny_model):
    engine = local_engine(tiny_model)
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a, b = run(engine.complete([1, 2, 3], p)), run(engine.complete([1, 2, 3], p))
    c = run(engine.complete([1, 2, 3], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8)))
    assert a == b and a != c


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([5.0, 4.0, 3.0, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    seen_k = {sample(logits, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(300)}
    assert seen_k == {0, 1}
    # probabilities ~ [0.665, 0.245, 0.09]: top_p 0.8 keeps the first two only
    seen_p = {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), g) for _ in range(300)}
    assert seen_p == {0, 1}
    assert sample(logits, SamplingParams(temperature=0.0), None) == 0


def test_eos_stops_generation(tiny_model):
    engine = local_engine(tiny_model)
    greedy, _ = run(engine.complete([1, 2, 3], SamplingParams(max_new_tokens=3)))
    engine.cfg = engine.cfg.replace(eos_token_id=greedy[1])  # pretend the second token is EOS
    tokens, reason = run(engine.complete([1, 2, 3], SamplingParams(max_new_tokens=10)))
    assert tokens == greedy[:2] and reason == "stop"


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(temperature=math.nan), dict(temperature=-1.0),
                                dict(top_p=1.5), dict(top_p=math.inf), dict(top_k=-3)])
def test_bad_params_rejected(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
