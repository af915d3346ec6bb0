#!/usr/bin/env bash
# A multi-node Ray cluster on one machine, then the app on it:
#   head node      gateway, router, expert directory, Serve controller (custom resource moe_head)
#   worker nodes   logical GPUs and the custom resource expert_node: expert replicas only
# Each node is its own `ray start` with its own ports; the same steps with real hosts (and the
# head's address instead of 127.0.0.1) make a real cluster.
#
#   cluster/local-multinode.sh up [MODEL_DIR]   start head + workers, deploy with `moe-serve up`
#   cluster/local-multinode.sh status           the nodes and where each expert replica runs
#   cluster/local-multinode.sh down             remove the app, stop these nodes (and no others)
#
# Settings (environment): MOE_MN_DIR (state, logs; default /tmp/moe-mn), MOE_MN_PORT (head GCS port,
# 6390), MOE_MN_WORKERS (2), MOE_MN_GPUS (logical GPUs per worker, 8), MOE_MN_GATEWAY_PORT (9000),
# MOE_MN_CONFIG (Serve config to start from, cluster/serve.yaml).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${MOE_MN_DIR:-/tmp/moe-mn}"
PORT="${MOE_MN_PORT:-6390}"
WORKERS="${MOE_MN_WORKERS:-2}"
GPUS="${MOE_MN_GPUS:-8}"
GATEWAY_PORT="${MOE_MN_GATEWAY_PORT:-9000}"
CONFIG="${MOE_MN_CONFIG:-$ROOT/cluster/serve.yaml}"
BIN="$ROOT/.venv/bin"
[ -x "$BIN/python" ] || BIN="$(dirname "$(command -v python3)")"
HOST=127.0.0.1

# This cluster's own temp dir: its address file and sessions stay out of /tmp/ray, so a bare
# `ray.init()` elsewhere on the machine does not join it, and `down` finds exactly its processes.
export RAY_TMPDIR="$DIR/tmp"
export RAY_ADDRESS="$HOST:$PORT"
export MOE_SERVE_STATE="$DIR/state.json"
# Ray's token authentication: every node and every client presents the token in ~/.ray/auth_token
# (made here if missing). With real hosts, copy that file to each of them.
export RAY_AUTH_MODE=token

start_node() {  # name, then ray start arguments; --block keeps one process per node to stop later
    local name=$1; shift
    nohup "$BIN/python" -m ray.scripts.scripts start --block --disable-usage-stats \
        "$@" >"$DIR/$name.log" 2>&1 &
    echo "$!" >"$DIR/$name.pid"
}

node_ports() {  # distinct ports for node number $1 (0 = head)
    local b=$((PORT + 10 + 10 * $1)) w=$((20000 + 1000 * $1))
    echo "--node-manager-port=$b --object-manager-port=$((b + 1)) --metrics-export-port=$((b + 2))" \
         "--dashboard-agent-listen-port=$((b + 3)) --dashboard-agent-grpc-port=$((b + 4))" \
         "--runtime-env-agent-port=$((b + 5)) --min-worker-port=$w --max-worker-port=$((w + 999))"
}

wait_nodes() {  # until $1 nodes are alive: 0; a node's `ray start` exited: 1; 120 s passed: 2
    local deadline=$((SECONDS + 120)) f
    while [ "$SECONDS" -lt "$deadline" ]; do
        for f in "$DIR"/*.pid; do
            kill -0 "$(cat "$f")" 2>/dev/null || { rm -f "$f"; return 1; }
        done
        if timeout 30 "$BIN/python" - "$1" <<'EOF' 2>/dev/null; then return 0; fi
import sys, ray
ray.init(log_to_driver=False)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[1]) else 1)
EOF
        sleep 1
    done
    return 2
}

add_node() {  # name, nodes expected once it is up, ray start arguments. A busy machine can start a
    local name=$1 count=$2 try  # node's agents too slowly for its raylet, which then quits: retry.
    shift 2
    for try in 1 2 3; do
        start_node "$name" "$@"
        wait_nodes "$count" && return 0
        echo "node $name did not start (try $try); the end of its log:" >&2
        tail -n 2 "$DIR/$name.log" >&2
        [ -f "$DIR/$name.pid" ] || continue
        down >/dev/null 2>&1
        return 1
    done
    down >/dev/null 2>&1
    return 1
}

up() {
    local model="${1:-$ROOT/models/tiny}"
    if ls "$DIR"/*.pid >/dev/null 2>&1; then
        echo "a cluster from $DIR is running; run '$0 down' first" >&2
        exit 1
    fi
    mkdir -p "$DIR" "$RAY_TMPDIR"
    "$BIN/python" -m ray.scripts.scripts get-auth-token >/dev/null 2>&1 ||
        "$BIN/python" -m ray.scripts.scripts get-auth-token --generate >/dev/null
    # shellcheck disable=SC2046
    add_node head 1 --head --port="$PORT" --ray-client-server-port=$((PORT + 1)) --include-dashboard=false \
        --num-cpus=4 --num-gpus=0 --resources='{"moe_head": 4}' $(node_ports 0) || exit 1
    for i in $(seq "$WORKERS"); do  # one at a time: node start-up is CPU-hungry
        # shellcheck disable=SC2046
        add_node "worker-$i" $((i + 1)) --address="$RAY_ADDRESS" --num-cpus=2 --num-gpus="$GPUS" \
            --resources="{\"expert_node\": $GPUS}" $(node_ports "$i") || exit 1
    done

    # The Serve config with placement added: experts on worker nodes, one logical GPU each; gateway,
    # router and the expert directory on the head, which outlives any worker.
    "$BIN/python" - "$CONFIG" "$DIR/serve.yaml" <<'EOF'
import sys, ray, yaml
from expert_service.directory import DEFAULT_NAME, NAMESPACE, ExpertDirectory
cfg = yaml.safe_load(open(sys.argv[1]))
app = cfg["applications"][0]
experts = app["args"].setdefault("expert_options", {})  # every expert deployment (from the checkpoint)
experts.setdefault("ray_actor_options", {}).update(num_gpus=1, resources={"expert_node": 1})
for d in app["deployments"]:
    opts = d.setdefault("ray_actor_options", {})
    if d["name"].startswith("expert-"):
        opts.update(num_gpus=1, resources={"expert_node": 1})
    else:
        opts.update(resources={"moe_head": 1})
yaml.safe_dump(cfg, open(sys.argv[2], "w"), sort_keys=False)
ray.init(namespace=NAMESPACE, log_to_driver=False)
ExpertDirectory.options(name=DEFAULT_NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
                        resources={"moe_head": 0.01}).remote()
EOF
    "$BIN/moe-serve" up --config "$DIR/serve.yaml" --model "$model" --port "$GATEWAY_PORT"
    echo "gateway: 127.0.0.1:$GATEWAY_PORT  RAY_ADDRESS=$RAY_ADDRESS RAY_TMPDIR=$RAY_TMPDIR"
}

status() {  # each live node, its resources and the replicas on it
    "$BIN/python" - <<'EOF'
import json, ray
ray.init(log_to_driver=False)
nodes = {n["NodeID"]: {"resources": {k: v for k, v in n["Resources"].items()
                                     if k in ("CPU", "GPU", "moe_head", "expert_node")}, "replicas": []}
         for n in ray.nodes() if n["Alive"]}
for a in ray._private.state.actors().values():  # the GCS's table: needs no dashboard
    if a["State"] == "ALIVE" and a["ActorClassName"].startswith("ServeReplica:moe:"):
        nodes.get(a["Address"]["NodeID"], {"replicas": []})["replicas"].append(a["ActorClassName"].split(":")[-1])
print(json.dumps({i[:12]: dict(n, replicas=sorted(n["replicas"])) for i, n in nodes.items()}, indent=1))
EOF
}

down() {
    if ! ls "$DIR"/*.pid >/dev/null 2>&1; then
        echo "no cluster recorded in $DIR" >&2
        return 0
    fi
    if [ -f "$DIR/head.pid" ] && kill -0 "$(cat "$DIR/head.pid")" 2>/dev/null; then
        timeout 120 "$BIN/moe-serve" down || true
    fi
    # SIGTERM to each node's `ray start --block` stops that node's processes, and only those.
    for f in "$DIR"/worker-*.pid "$DIR"/head.pid; do
        [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
    for f in "$DIR"/*.pid; do
        pid=$(cat "$f")
        for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        rm -f "$f"
    done
    echo "stopped the nodes of $DIR"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up [MODEL_DIR] | status | down" >&2; exit 2 ;;
esac
