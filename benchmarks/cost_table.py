"""Writes the simulator's cost table (moe_serve/costs.json, shipped with the package) from the
GPU runs of benchmarks/moe_layer.py in benchmarks/results."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from moe_serve.simulate import COSTS_FILE, cost_table

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    table = cost_table(RESULTS)
    if table is None:
        print(f"no GPU run of moe_layer in {RESULTS}; {COSTS_FILE} left as it is", file=sys.stderr)
        return 1
    COSTS_FILE.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {COSTS_FILE}: {table['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
