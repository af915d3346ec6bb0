"""Shared fixtures: checkpoints written by this project and by transformers."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from moe_core.checkpoint import random_weights, write_checkpoint
from moe_core.config import preset
from moe_core.tokenizer import write_tokenizer


def run(coro):
    return asyncio.run(coro)


def stop(proc) -> None:
    """SIGSTOP to a subprocess, returning once every one of its threads has stopped: kill() returns
    before a thread running on another core has taken the signal, and that thread could still
    answer a call posted meanwhile."""
    proc.send_signal(signal.SIGSTOP)
    tasks = f"/proc/{proc.pid}/task"
    while True:
        states = []
        for tid in os.listdir(tasks):
            try:
                with open(f"{tasks}/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
        if all(s in "Tt" for s in states):
            return
        time.sleep(0.001)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The `tiny` preset as `moe-serve init-model` writes it (seed 0), with a tokenizer."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = preset("tiny")
    write_checkpoint(d, cfg, random_weights(cfg, seed=0))
    write_tokenizer(d, cfg.vocab_size)
    return d


def hf_checkpoint(path, *, seed=0, shard_size=None, dtype=torch.float32, **overrides):
    """A random MixtralForCausalLM written by transformers' own save_pretrained."""
    from transformers import MixtralConfig, MixtralForCausalLM

    kw = dict(vocab_size=101, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
              num_experts_per_tok=2, max_position_embeddings=256, rope_theta=10000.0)
    kw |= overrides
    torch.manual_seed(seed)
    cfg = MixtralConfig(**kw, experts_implementation="eager")  # the plain per-expert loop
    model = MixtralForCausalLM(cfg).to(dtype).eval()
    args = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **args)
    return model
