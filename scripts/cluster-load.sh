#!/usr/bin/env bash
# cluster-load.sh - the cluster under load (issue 17): Redis (Debian's redis-server) and three
# rendezvous nodes on loopback sharing it (`--cluster`, each with a node link), then
# `bench cluster-load`: N simulated peers registered with every node at once, then cross-node
# introductions (each node's peers asking for the next node's). Prints the load generator's JSON
# line and one table row per node: registrations per second and per node CPU second,
# cross-node introductions per second, RSS. The single-node figures to compare with come from
# `scripts/bench.sh --rv-only` (same machine; run them one after the other, not side by side).
#
#   scripts/cluster-load.sh [--peers-per-node N] [--introductions-per-node M]
#                           [--introduction-concurrency C] [--single] [--keep]
#
# --introduction-concurrency 1 times each introduction alone (the path's latency, no queueing);
# the default is 16 in flight per node (the rate).
#
# --single runs the same load against one node with its embedded registry (redb, no Redis), each
# peer asking for the next peer of that node: the single-node introduction figures (rate, CPU,
# request-to-reply time) the cross-node ones are compared with.
#
# Defaults: 10,000 peers per node (30,000 in all), 2,000 introductions per node. Release build.
# Everything runs on this machine: on 2 cores the three nodes, Redis and the load generator share
# them, so the per-node rates are the machine's, not a node's ceiling; per CPU second figures are
# the ones to compare. Processes and files are cleaned up on exit (--keep leaves the work
# directory).
set -euo pipefail
cd "$(dirname "$0")/.."

peers=10000 intros=2000 keep=0 single=0 intro_conc=16
while (($#)); do
    case $1 in
        --peers-per-node) peers=${2:?}; shift ;;
        --introductions-per-node) intros=${2:?}; shift ;;
        --introduction-concurrency) intro_conc=${2:?}; shift ;;
        --single) single=1 ;;
        --keep) keep=1 ;;
        *) echo "usage: $0 [--peers-per-node N] [--introductions-per-node M] [--introduction-concurrency C] [--single] [--keep]" >&2; exit 2 ;;
    esac
    shift
done
((single)) || command -v redis-server >/dev/null 2>&1 ||
    { echo "cluster-load: redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }

cargo build --release -p rendezvous -p bench >&2
target=${CARGO_TARGET_DIR:-target}
bin=$target/release
work=$(mktemp -d /tmp/cluster-load.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if ((keep)); then echo "work directory: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_for FILE TEXT SECONDS
wait_for() {
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        grep -q -- "$2" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "cluster-load: no '$2' in $1 after $3 s" >&2
    cat "$1" >&2 || true
    exit 1
}

servers=() keys=() rv_pids=()
if ((single)); then
    mkdir -p "$work/one"
    "$bin/rendezvous" serve --listen 127.0.0.1:0 --data-dir "$work/one" --tcp-listen off \
        --stun-alt-port off >"$work/one.out" 2>"$work/one.log" </dev/null &
    pids+=($!)
    rv_pids+=(--rv-pid $!)
    wait_for "$work/one.out" "server key" 20
    servers+=(--server "$(sed -n 's/^rendezvous listening on \([^ ]*\) .*/\1/p' "$work/one.out")")
    keys+=(--server-key "$(sed -n 's/^server key //p' "$work/one.out")")
else
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$work" >"$work/redis.log" 2>&1 &
    pids+=($!)
    wait_for "$work/redis.log" "Ready to accept connections" 20

    "$bin/rendezvous" cluster-key --out "$work/cluster.key" >/dev/null
    for node in x y z; do
        mkdir -p "$work/$node"
        "$bin/rendezvous" serve --listen 127.0.0.1:0 --data-dir "$work/$node" --tcp-listen off \
            --stun-alt-port off --cluster "redis://127.0.0.1:$redis_port/" --node-id "$node" \
            --cluster-link 127.0.0.1:0 --cluster-key-file "$work/cluster.key" \
            >"$work/$node.out" 2>"$work/$node.log" </dev/null &
        pids+=($!)
        rv_pids+=(--rv-pid $!)
        wait_for "$work/$node.out" "cluster node $node" 20
        servers+=(--server "$(sed -n 's/^rendezvous listening on \([^ ]*\) .*/\1/p' "$work/$node.out")")
        keys+=(--server-key "$(sed -n 's/^server key //p' "$work/$node.out")")
    done
fi

deadline=$((300 + peers / 50))
timeout $((3 * deadline + 120)) "$bin/bench" cluster-load "${servers[@]}" "${keys[@]}" "${rv_pids[@]}" \
    --peers-per-node "$peers" --introductions-per-node "$intros" --deadline-s "$deadline" \
    --introduction-concurrency "$intro_conc" \
    >"$work/load.json" 2>"$work/load.log" </dev/null ||
    { echo "cluster-load: the load generator failed" >&2; cat "$work/load.log" >&2; exit 1; }
cat "$work/load.json"
python3 - "$work/load.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
kind = "same-node" if r["nodes"] == 1 else "cross-node"
print(f"\n{r['nodes']} nodes, {r['peers_per_node']} peers per node: {r['registered']} registered, "
      f"{r['introductions']} {kind} introductions\n")
print(f"| node | registered (failed) | registrations/s | registrations per node CPU s | {kind} introductions/s (failed) | node CPU s for them | request to reply, median / p95 | request to the target's push, median / p95 | node RSS after registering |")
print("|---|---|---|---|---|---|---|---|---|")
for n in r["per_node"]:
    print(f"| {n['server']} | {n['registered']} ({n['register_failed']}) | {n['registrations_per_s']:.0f} | "
          f"{n.get('rv_registrations_per_cpu_s', 0):.0f} | {n['introductions_per_s']:.0f} ({n['introductions_failed']}) | "
          f"{n.get('rv_introduce_cpu_s', 0):.2f} | {n['reply_p50_ms']:.1f} / {n['reply_p95_ms']:.1f} ms | "
          f"{n['push_p50_ms']:.1f} / {n['push_p95_ms']:.1f} ms | "
          f"{n.get('rv_rss_registered_kib', 0) / 1024:.0f} MiB |")
EOF
