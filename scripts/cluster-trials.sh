#!/usr/bin/env bash
# cluster-trials.sh - repeated failover trials of a relayed pair under loss, in the NAT lab
# (root only; needs redis-server).
#
#   scripts/cluster-trials.sh [TRIALS] [CHAT_SECONDS] [IDLE_SECONDS]
#
# One lab with --delay 40 --loss 10 on both NAT uplinks, Redis and two nodes (x, y) on the
# rendezvous host. Each trial: a pair given both nodes (--relay-only, x preferred) chats
# through x for CHAT_SECONDS (default 45; a message each way every second, each must arrive),
# then stays idle for IDLE_SECONDS (default 0: an idle relayed connection is probed after each
# keep-alive), then x is killed and the message typed at that moment is timed until it arrives
# through y.
# Counts the times a peer left x while it was alive (spurious moves). Prints one markdown row
# (as in docs/cluster.md) and leaves it in target/lab-matrix/cluster-failover.md. About
# CHAT_SECONDS + IDLE_SECONDS + 15 s per trial.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
[[ $(id -u) == 0 ]] || { echo "cluster-trials.sh: needs root (network namespaces)" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "cluster-trials.sh: needs redis-server (apt-get install redis-server)" >&2; exit 2; }
export CLUSTER_TRIALS=${1:-5}
export CLUSTER_CHAT_S=${2:-45}
export CLUSTER_IDLE_S=${3:-0}
export P2P_NETNS_TESTS=1
target=${CARGO_TARGET_DIR:-target}
rm -f "$target/lab-matrix/cluster-failover.md"
cargo build -q -p peer -p rendezvous --bins
cargo test -q -p e2e --test natlab_cluster -- --ignored --nocapture cluster_failover_trials
echo
echo "| setup | trials done | spurious moves | messages (all arrived) | gap after the node loss: median | range | failures |"
echo "|---|---|---|---|---|---|---|"
cat "$target/lab-matrix/cluster-failover.md"
