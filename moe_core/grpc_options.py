"""The gRPC channel options both ends of ExpertService use."""
from __future__ import annotations

MAX_MESSAGE_BYTES = 256 << 20  # what clients accept: the largest server's limit (16384 rows x 4096 x fp32)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        # gRPC's 4 MiB receive default is below one Mixtral layer step at a few hundred tokens.
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Large HTTP/2 frames and a large initial flow-control window: a multi-MB tensor then
        # moves in a few frames without waiting for WINDOW_UPDATEs (benchmarks/codec.py compares
        # these options with gRPC's defaults).
        ("grpc.http2.max_frame_size", (1 << 24) - 1),
        ("grpc.http2.lookahead_bytes", 64 << 20),
        # Let the window grow beyond lookahead on fat links (on by default; explicit on purpose).
        ("grpc.http2.bdp_probe", 1),
    ]


CHANNEL_OPTIONS = channel_options()
