"""The router: attention, KV cache and gating of every layer; the engine; the dispatcher, its replica
pool and channels; the Router deployment; the gateway and its validation; the app's composition."""
