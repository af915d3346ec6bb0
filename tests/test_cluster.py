"""The whole application on a real Ray cluster, called over real gRPC through the gateway."""
from __future__ import annotations

import concurrent.futures as cf
import os
import time

import grpc
import numpy as np
import pytest
import torch
from ray import serve

from moe.v1 import gateway_pb2, gateway_pb2_grpc
from moe_serve import client
from router_service.engine import local_engine
from router_service.sampling import SamplingParams
from tests.cluster_fixtures import running_app
from tests.conftest import run

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def app(tiny_model):
    """Eight logical GPUs, one per expert replica: placement is checked on a CPU machine. The router
    and the replicas share this node, so the rows go through /dev/shm sessions and their doorbells
    (as by default; test_faults runs its cluster on bytes over gRPC)."""
    def gpu_per_expert(cfg):
        for d in cfg["applications"][0]["deployments"]:
            if d["name"].startswith("expert-"):
                d["ray_actor_options"] = dict(d.get("ray_actor_options", {}), num_gpus=1)
        return cfg
    with running_app(tiny_model, num_gpus=8, edit=gpu_per_expert, shared_memory="shm") as (address, _):
        yield address


@pytest.fixture(scope="module")
def engine(tiny_model):
    return local_engine(tiny_model)


def stub(address):
    return gateway_pb2_grpc.GatewayStub(client.channel(address))


def test_score_equals_in_process_and_transformers(app, engine, tiny_model):
    from transformers import MixtralForCausalLM
    ids = [1, 17, 4, 250, 99, 3, 3, 511, 0, 42]
    remote = client.score(app, ids)
    local = run(engine.score(ids)).numpy()
    assert remote.shape == (len(ids), 512) and remote.dtype == np.float32
    assert np.abs(remote - local).max() <= 1e-5
    hf = MixtralForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(remote - ref).max() <= 1e-4


def test_complete_and_streaming_generate_equal_in_process(app, engine):
    prompt, n = [5, 6, 7, 8], 12
    want, reason = run(engine.complete(prompt, SamplingParams(max_new_tokens=n)))
    got = client.generate(app, prompt_ids=prompt, params=SamplingParams(max_new_tokens=n))
    assert got["token_ids"] == want and got["finish_reason"] == reason

    req = client.request(prompt, None, SamplingParams(max_new_tokens=n))
    arrivals, tokens, reasons = [], [], []
    for chunk in stub(app).Generate(req, timeout=60):
        arrivals.append(time.monotonic())
        tokens += chunk.token_ids
        reasons.append(chunk.finish_reason)
        assert len(chunk.token_ids) == 1  # one chunk per decode step
    assert tokens == want and reasons[-1] == reason and not any(reasons[:-1])
    assert arrivals[-1] - arrivals[0] > 0  # chunks arrive over time, not all at the end


def test_text_prompt_round_trip(app, engine, tiny_model):
    from moe_core.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_model)
    got = client.generate(app, prompt="Hello, world!", params=SamplingParams(max_new_tokens=6))
    want, _ = run(engine.complete(tok.encode("Hello, world!").ids, SamplingParams(max_new_tokens=6)))
    assert got["token_ids"] == want and got["text"] == tok.decode(want)


def test_32_concurrent_requests_equal_solo(app, engine):
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(32):
        prompt = rng.integers(3, 512, size=int(rng.integers(1, 40))).tolist()
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 24)),
                                temperature=0.0 if i % 2 else 0.9, seed=i, top_p=0.95)
        jobs.append((prompt, params))
    solo = [run(engine.complete(p, s))[0] for p, s in jobs]
    with cf.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda j: client.generate(app, prompt_ids=j[0], params=j[1])["token_ids"], jobs))
    assert together == solo


def test_rows_took_shared_memory_and_doorbells(app):
    """A session's connection to a replica's doorbell exists only for shared buffers; their files
    are unlinked as soon as both sides have mapped them, so none is left behind."""
    client.generate(app, prompt_ids=list(range(3, 67)), params=SamplingParams(max_new_tokens=2))  # every expert
    with open("/proc/net/unix") as f:
        doorbells = [line.split() for line in f if "@moe-doorbell-" in line]
    listening, connected = (sum(fields[5] == state for fields in doorbells) for state in ("01", "03"))
    # each replica's socket, and the router's sessions (other processes of this machine may list theirs too)
    assert listening >= 8 and connected >= 8
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("moe-")]


def test_stats_count_every_routed_token(app):
    before = client.stats(app)
    prompt, n = [9, 8, 7, 6, 5], 7
    client.generate(app, prompt_ids=prompt, params=SamplingParams(max_new_tokens=n))
    after = client.stats(app)
    # the prompt goes through every layer once, then each generated token but the last is fed back
    tokens = len(prompt) + n - 1
    routed = sum(sum(a.tokens_per_expert) - sum(b.tokens_per_expert) for a, b in zip(after.layers, before.layers))
    assert routed == tokens * after.top_k * len(after.layers)
    assert after.tokens_processed - before.tokens_processed == tokens
    assert {d.name: d.replicas for d in after.deployments} == {f"expert-{e}": 1 for e in range(8)}


def test_each_expert_replica_has_its_own_gpu(app):
    seen = [serve.get_deployment_handle(f"expert-{e}", app_name="moe").info.remote().result()
            for e in range(8)]
    devices = [s["cuda_visible_devices"] for s in seen]
    assert all(d is not None and d != "" for d in devices)
    assert len(set(devices)) == 8


def test_invalid_requests_get_clear_codes(app):
    s = stub(app)
    cases = [
        (dict(prompt_token_ids=[], sampling=dict(max_new_tokens=4)), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (dict(prompt_token_ids=[1, 600], sampling=dict(max_new_tokens=4)), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (dict(prompt_token_ids=[1], sampling=dict(max_new_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
        (dict(prompt_token_ids=[1], sampling=dict(max_new_tokens=10_000)), grpc.StatusCode.OUT_OF_RANGE, "max_new_tokens"),
        (dict(prompt_token_ids=[1], sampling=dict(max_new_tokens=4, temperature=float("nan"))),
         grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(prompt_token_ids=[1], sampling=dict(max_new_tokens=4, top_p=2.0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ]
    for kw, code, words in cases:
        for call in (s.Complete, lambda r, timeout: list(s.Generate(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as e:
                call(gateway_pb2.GenerateRequest(**kw), timeout=30)
            assert e.value.code() == code and words in e.value.details()
            assert "Traceback" not in e.value.details()


def test_reflection_lists_and_calls_gateway_without_protos(app):
    """What grpcurl does: discover the service and its messages from the server, then call it."""
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(app) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"moe.v1.Gateway", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(db)  # a pool fed only by reflection, not by our stubs
        method = pool.FindServiceByName("moe.v1.Gateway").methods_by_name["Complete"]
        Request = message_factory.GetMessageClass(method.input_type)
        Reply = message_factory.GetMessageClass(method.output_type)
        call = ch.unary_unary("/moe.v1.Gateway/Complete", request_serializer=Request.SerializeToString,
                              response_deserializer=Reply.FromString)
        req = Request()
        req.prompt_token_ids.extend([1, 2, 3])
        req.sampling.max_new_tokens = 3
        reply = call(req, timeout=30)
        assert len(reply.token_ids) == 3 and reply.prompt_tokens == 3
