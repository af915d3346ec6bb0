"""`moe-serve record`: a routing trace from a running gateway, for `moe-serve simulate`
(moe_serve/record.py does the work)."""
from __future__ import annotations

import json

from moe_serve.record import record


def add_parser(sub) -> None:
    from moe_serve.cli import address
    s = sub.add_parser("record", help="record a routing trace from a running gateway (for `moe-serve simulate`)")
    s.add_argument("--address", type=address, default="127.0.0.1:9000", help="gateway HOST[:PORT]")
    s.add_argument("--out", required=True, help="msgpack trace file to write")
    s.add_argument("--interval", type=float, default=1.0, help="seconds between polls; one step per poll")
    s.add_argument("--duration", type=float, default=60.0, help="seconds to record")
    s.add_argument("--timeout", type=float, default=10.0, help="deadline of each Stats call")
    s.set_defaults(fn=_cmd_record)


def _cmd_record(a) -> None:
    if a.interval <= 0 or a.duration <= 0:
        raise ValueError("--interval and --duration must be positive")
    print(json.dumps(record(a.address, a.out, interval_s=a.interval, duration_s=a.duration, timeout_s=a.timeout)))
