#!/usr/bin/env bash
# The main job in one command: build, start a rendezvous and two peers, connect them by id,
# send a message each way, and show what happened.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building"
cargo build --quiet --workspace --bins
bin=$PWD/target/debug
work=$(mktemp -d /tmp/p2p-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

wait_for() { # FILE PATTERN SECONDS
    local deadline=$((SECONDS + $3))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "demo: timed out waiting for '$2' in $1" >&2
            cat "$1" >&2 || true
            exit 1
        fi
        sleep 0.1
    done
}

echo "== starting the rendezvous on 127.0.0.1 (port chosen by the OS)"
"$bin/rendezvous" serve --listen 127.0.0.1:0 --data-dir "$work/rv" >"$work/rv.out" 2>"$work/rv.log" &
pids+=($!)
wait_for "$work/rv.out" "server key" 10
sed 's/^/   rendezvous | /' "$work/rv.out"
server=$(sed -n 's/^rendezvous listening on \([^ ]*\).*/\1/p' "$work/rv.out")
key=$(sed -n 's/^server key //p' "$work/rv.out")

mkfifo "$work/a.in" "$work/b.in"
echo "== peer A: listen"
"$bin/peer" --config-dir "$work/a" listen --server "$server" --server-key "$key" \
    <"$work/a.in" >"$work/a.out" 2>"$work/a.log" &
pids+=($!)
exec 3>"$work/a.in"
wait_for "$work/a.out" "registered with" 10
a_id=$(sed -n 's/^peer id //p' "$work/a.out")

echo "== peer B: connect $a_id"
"$bin/peer" --config-dir "$work/b" connect "$a_id" --server "$server" --server-key "$key" \
    <"$work/b.in" >"$work/b.out" 2>"$work/b.log" &
b_pid=$!
pids+=($b_pid)
exec 4>"$work/b.in"
wait_for "$work/b.out" "connected to" 10

echo "hello A, this is B" >&4
wait_for "$work/a.out" "hello A, this is B" 10
echo "hello B, A here" >&3
wait_for "$work/b.out" "hello B, A here" 10
exec 4>&-   # end of B's input: the chat ends cleanly
wait "$b_pid"
echo "   B exited with status $?"

echo
echo "== what A printed"
sed 's/^/   A | /' "$work/a.out"
echo "== what B printed"
sed 's/^/   B | /' "$work/b.out"
echo
echo "demo: OK: two peers found each other by id through the rendezvous and exchanged a message each way over mutually authenticated QUIC"
