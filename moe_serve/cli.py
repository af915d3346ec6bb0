"""The `moe-serve` command line: the only place arguments are parsed."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

import grpc
import numpy as np

from moe_core.config import FLOAT_DTYPES

DESCRIPTION = ("Serve a Mixtral-family mixture-of-experts model on Ray: the router and each expert are "
               "Ray Serve deployments behind one gRPC gateway. Start with `moe-serve init-model DIR`, "
               "`moe-serve up --model DIR`, `moe-serve generate --prompt TEXT`, `moe-serve down`.")
GATEWAY_PORT = 9000


class UsageError(Exception):
    """Bad arguments: printed as one line, exit status 2."""


class Failed(Exception):
    """The command ran and failed (a deploy Serve refused): printed as one line, exit status 1."""


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's help shows the defaults that are values (not unset or off)."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", _Help)
        super().__init__(*args, **kw)


def address(text: str) -> str:
    """HOST[:PORT], the port defaulting to the gateway's 9000."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and not host.endswith(":"):
        return text
    return f"{text}:{GATEWAY_PORT}"


def _progress(line: str) -> None:
    print(f"moe-serve: {line}", file=sys.stderr, flush=True)


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UsageError(f"token ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("token id list is empty")
    return ids


def cmd_init_model(a):
    from moe_core.checkpoint import parse_size, random_weights, write_checkpoint
    from moe_core.config import preset
    from moe_core.tokenizer import write_tokenizer

    cfg = preset(a.preset)
    shard = parse_size(a.shard_size) if a.shard_size else None
    write_checkpoint(a.out_dir, cfg, random_weights(cfg, seed=a.seed), shard_size=shard)
    write_tokenizer(a.out_dir, cfg.vocab_size)
    print(json.dumps({"model": a.out_dir, "preset": a.preset, "seed": a.seed}))


def _params(a):
    from router_service.sampling import SamplingParams
    return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                          top_p=a.top_p, top_k=a.top_k, seed=a.seed)


def _local_engine(a):
    import torch
    from router_service.engine import local_engine
    if not a.model:
        raise UsageError("--local needs --model DIR")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {a.device}: this torch sees no CUDA device")
    return local_engine(a.model, device=a.device, dtype=getattr(torch, a.dtype))


def _remote_only_model(a):
    if a.model and not a.local:
        raise UsageError("--model is read only with --local (run DIR in this process); the gateway serves "
                         "the model `moe-serve up --model DIR` deployed")


def cmd_generate(a):
    _remote_only_model(a)
    if a.local:
        engine = _local_engine(a)
        prompt = _prompt_ids(a, engine.cfg.vocab_size)
        tokens, reason = asyncio.run(engine.complete(prompt, _params(a)))
        out = {"token_ids": tokens, "finish_reason": reason}
        if a.prompt is not None:
            out["text"] = _tokenizer(a).decode(tokens)
    else:
        from moe_serve.client import generate
        out = generate(a.address, prompt_ids=_ids(a.prompt_ids) if a.prompt_ids else None,
                       prompt=a.prompt, params=_params(a), stream=a.stream, timeout=a.timeout)
    print(json.dumps(out))


def _tokenizer(a):
    from moe_core.tokenizer import load_tokenizer
    tok = load_tokenizer(a.model)
    if tok is None:
        raise UsageError(f"{a.model} has no tokenizer.json; pass --prompt-ids instead")
    return tok


def _prompt_ids(a, vocab: int) -> list[int]:
    if (a.prompt_ids is None) == (a.prompt is None):
        raise UsageError("give exactly one of --prompt-ids and --prompt")
    ids = _ids(a.prompt_ids) if a.prompt_ids is not None else _tokenizer(a).encode(a.prompt).ids
    return ids


def cmd_score(a):
    _remote_only_model(a)
    ids = _ids(a.token_ids)
    if a.local:
        engine = _local_engine(a)
        logits = asyncio.run(engine.score(ids)).numpy()
    else:
        from moe_serve.client import score
        logits = score(a.address, ids, timeout=a.timeout)
    np.save(a.out, logits.astype(np.float32))
    print(json.dumps({"out": a.out, "shape": list(logits.shape)}))


def cmd_up(a):
    from moe_serve.launcher import DeployError, up
    try:
        print(json.dumps(up(model=a.model, port=a.port, http_port=a.http_port, config=a.config, num_cpus=a.num_cpus, num_gpus=a.num_gpus,
                            wait_s=a.wait, router_gpus=a.router_gpus, expert_gpus=a.expert_gpus, dtype=a.dtype,
                            dashboard=not a.no_dashboard, reflection=not a.no_reflection, verbose=a.verbose,
                            progress=_progress)))
    except DeployError as e:
        raise Failed(str(e)) from None


def cmd_down(a):
    from moe_serve.launcher import down
    print(json.dumps(down(verbose=a.verbose, progress=_progress)))


def cmd_stats(a):
    if a.record:  # a routing trace for `moe-serve simulate`, the same as `moe-serve record`
        from moe_serve.record import record
        print(json.dumps(record(a.address, a.record, interval_s=a.interval, duration_s=a.duration, timeout_s=a.timeout)))
        return
    from moe_serve.client import stats
    r = stats(a.address, timeout=a.timeout)
    out = {
        "top_k": r.top_k, "tokens_processed": r.tokens_processed, "requests_finished": r.requests_finished,
        "requests_running": r.requests_running, "requests_queued": r.requests_queued,
        "tokens_per_expert": [list(layer.tokens_per_expert) for layer in r.layers],
        "replicas": {d.name: d.replicas for d in r.deployments},
    }
    if a.plot:
        from moe_serve.plots import heatmap
        heatmap(out, a.plot)
        out["plot"] = a.plot
    print(json.dumps(out))


def cmd_demo(a) -> None:
    from moe_serve import demo
    demo.local(a.model) if a.local else demo.remote(a.model, a.port)


# Modules that add subcommands of their own: each has `add_parser(sub)` setting `fn` as a default,
# and keeps heavy imports inside its functions so that `moe-serve --help` stays quick.
COMMAND_MODULES = ["moe_serve.cli_record", "moe_serve.cli_simulate", "moe_serve.cli_plan", "moe_serve.cli_load"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    p = _Parser(prog="moe-serve", description=DESCRIPTION)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)

    s = sub.add_parser("demo", help="bring a cluster up, stream a few generations, show the routing, stop it")
    s.add_argument("--model", required=True)
    s.add_argument("--port", type=int, default=9000, help="gateway gRPC port")
    s.add_argument("--local", action="store_true", help="everything in this process, no Ray")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("init-model", help="write a seeded random Mixtral checkpoint with a tokenizer")
    s.add_argument("out_dir")
    s.add_argument("--preset", default="tiny", choices=["tiny", "bench"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--shard-size", help="write shards of at most this size, e.g. 500MB")
    s.set_defaults(fn=cmd_init_model)

    def target(s):
        s.add_argument("--model", help="with --local: the model directory to run")
        s.add_argument("--local", action="store_true", help="run in this process instead of calling the gateway")
        s.add_argument("--address", type=address, default=f"127.0.0.1:{GATEWAY_PORT}", help="gateway HOST[:PORT]")
        s.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
        s.add_argument("--device", default="cpu", help="with --local: torch device of the model, e.g. cuda")
        s.add_argument("--dtype", default="float32", choices=sorted(FLOAT_DTYPES),
                       help="with --local: dtype of the model (bfloat16 on GPUs)")

    s = sub.add_parser("generate", help="generate tokens")
    target(s)
    s.add_argument("--prompt-ids")
    s.add_argument("--prompt", help="prompt text (the model needs a tokenizer.json)")
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int)
    s.add_argument("--stream", action="store_true", help="print each chunk as it arrives")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("score", help="write float32 logits [T, vocab] of a token sequence to .npy")
    target(s)
    s.add_argument("--token-ids", required=True)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_score)

    s = sub.add_parser("up", help="start a local Ray cluster (or join RAY_ADDRESS) and deploy the gateway")
    s.add_argument("--model", help="model directory (default: the one in --config)")
    s.add_argument("--port", type=int, default=9000, help="gateway gRPC port")
    s.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP port (/v1/completions, "
                                                               "/v1/chat/completions, /v1/models)")
    s.add_argument("--config", help="Serve config YAML (default: the package's serve.yaml, the same as "
                                    "cluster/serve.yaml)")
    s.add_argument("--num-cpus", type=int, help="logical CPUs of the local cluster")
    s.add_argument("--num-gpus", type=int, help="GPUs the local cluster declares")
    s.add_argument("--router-gpus", type=float, default=0, help="the router's GPU share (1: a GPU of its own; "
                                                                  "0: as the config says, CPU in serve.yaml)")
    s.add_argument("--expert-gpus", type=float, default=0, help="each expert replica's GPU share (0.125: eight to "
                                                                  "a GPU; 1: a GPU each)")
    s.add_argument("--dtype", choices=sorted(FLOAT_DTYPES), help="router and expert dtype "
                                                                                  "(bfloat16 on GPUs)")
    s.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the new model to answer")
    s.add_argument("--no-dashboard", action="store_true", help="start the local cluster without Ray's "
                                                               "dashboard (which `serve status` needs)")
    s.add_argument("--no-reflection", action="store_true", help="turn gRPC server reflection off at the gateway "
                                                                "(it needs no token)")
    s.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own log lines")
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("down", help="remove the app and stop the local cluster `up` started")
    s.add_argument("--verbose", action="store_true", help="show Ray's and Serve's own log lines")
    s.set_defaults(fn=cmd_down)

    s = sub.add_parser("stats", help="tokens routed per layer and expert, replicas per expert deployment")
    s.add_argument("--address", type=address, default=f"127.0.0.1:{GATEWAY_PORT}", help="gateway HOST[:PORT]")
    s.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds")
    s.add_argument("--plot", help="write a layer x expert heatmap PNG here")
    s.add_argument("--record", metavar="FILE", help="poll for --duration s and write a msgpack routing trace")
    s.add_argument("--interval", type=float, default=1.0, help="with --record: seconds between polls")
    s.add_argument("--duration", type=float, default=60.0, help="with --record: seconds to record")
    s.set_defaults(fn=cmd_stats)
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.fn(a)
    except (UsageError, ValueError, FileNotFoundError, TimeoutError) as e:
        print(f"moe-serve {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Failed as e:
        print(f"moe-serve {a.cmd}: error: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE and _refused(e.details() or ""):
            where = getattr(a, "address", "?")
            print(f"moe-serve {a.cmd}: no gateway at {where}: is `moe-serve up` running?", file=sys.stderr)
        else:
            print(f"moe-serve {a.cmd}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def _refused(details: str) -> bool:
    return any(k in details for k in ("failed to connect", "Connection refused", "connections to all backends failing"))


if __name__ == "__main__":
    sys.exit(main())
