"""Pictures of routing: a layer x expert heatmap of routed tokens, with the replicas serving each
(layer, expert) beside it in the same layout (`moe-serve stats --plot heat.png`)."""
from __future__ import annotations

import numpy as np


def replica_grid(replicas: dict[str, int], n_layers: int, n_experts: int) -> np.ndarray:
    """[L, E] replicas serving each (layer, expert), from deployment names; 0 where none is named."""
    from moe_core.shards import shards_from_names
    grid = np.zeros((n_layers, n_experts), dtype=np.int64)
    for name, pairs in shards_from_names(replicas, n_layers).items():
        for L, e in pairs:
            if L < n_layers and e < n_experts:
                grid[L, e] = replicas[name]
    return grid


def heatmap(stats: dict, path: str) -> str:
    """`stats`: `moe-serve stats` JSON (tokens_per_expert [L][E], replicas {deployment: n}). Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display here, and none wanted
    import matplotlib.pyplot as plt

    counts = np.asarray(stats["tokens_per_expert"], dtype=np.float64)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError("tokens_per_expert must be a non-empty [layers][experts] table")
    L, E = counts.shape
    reps = replica_grid(stats.get("replicas") or {}, L, E)
    mean = counts.mean(axis=1)
    ratio = np.divide(counts.max(axis=1), mean, out=np.ones(L), where=mean > 0)

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(3 + 1.2 * E, 2.2 + 0.4 * L), width_ratios=[E, E * 0.8],
                                     layout="constrained")
    im = ax_t.imshow(counts, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax_t, shrink=0.9).set_label("tokens routed")
    ax_t.set_title(f"tokens routed per layer and expert ({int(counts.sum()):,} in all)")
    ax_t.set_yticks(range(L), [f"layer {i}  max/mean {r:.2f}" for i, r in enumerate(ratio)])
    im_r = ax_r.imshow(reps, cmap="Oranges", aspect="auto", interpolation="nearest",
                       vmin=0, vmax=max(int(reps.max()), 1))
    fig.colorbar(im_r, ax=ax_r, shrink=0.9, ticks=range(int(reps.max()) + 1)).set_label("replicas")
    ax_r.set_title("replicas serving each (layer, expert)")
    ax_r.set_yticks(range(L), [str(i) for i in range(L)])
    ax_r.set_ylabel("layer")
    for ax in (ax_t, ax_r):
        ax.set_xticks(range(E), [str(e) for e in range(E)])
        ax.set_xlabel("expert")
    if L * E <= 400:  # numbers stay legible up to about this many cells
        high = counts.max() / 2 if counts.max() else 1
        for (i, j), v in np.ndenumerate(counts):
            ax_t.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7,
                      color="black" if v > high else "white")
        for (i, j), v in np.ndenumerate(reps):
            ax_r.text(j, i, str(v), ha="center", va="center", fontsize=8,
                      color="white" if v > reps.max() / 2 else "black")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
