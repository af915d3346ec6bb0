"""The router: attention, KV cache and gating of every layer; dispatchers; the gateway; the client and CLI."""
