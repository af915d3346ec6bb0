"""The operator side: the `moe-serve` CLI and its tools (launcher, demo, planner, simulator,
recorder, load generator, plots) and the gateway's Python client."""
