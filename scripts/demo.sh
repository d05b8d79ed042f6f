#!/usr/bin/env bash
# The main job in one command: build, start a rendezvous and two peers, connect them by id,
# send a message each way, and show what happened.
#
# As root (with nftables), the rendezvous sits on an emulated internet and the peers behind two
# different NATs (a home router, port-restricted cone, and a carrier-grade NAT in front of another
# home router), built in network namespaces by scripts/natlab.sh; otherwise everything runs on
# loopback. DEMO_MODE=loopback forces loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${DEMO_MODE:-}
if [[ -z $mode ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v nft >/dev/null 2>&1 && command -v ip >/dev/null 2>&1; then
        mode=nat
    else
        mode=loopback
    fi
fi

echo "== building"
cargo build --quiet --workspace --bins
bin=$PWD/target/debug
work=$(mktemp -d /tmp/p2p-demo.XXXXXX)
pids=()
lab=demo$$
lab=${lab:0:6}
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ $mode == nat ]]; then scripts/natlab.sh down "$lab" >/dev/null 2>&1 || true; fi
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

# in_host HOST CMD... &: run CMD on that host (a lab namespace, or here on loopback). Only in the
# background: it execs, so that the subshell running it *is* the process and `kill $!` at the end
# stops it (a plain call would leave the program running when the subshell is killed).
in_host() {
    local host=$1
    shift
    if [[ $mode == nat ]]; then exec ip netns exec "$lab-$host" "$@"; else exec "$@"; fi
}

if [[ $mode == nat ]]; then
    echo "== building the NAT lab '$lab': rendezvous on 203.0.113.10 (\"the internet\"),"
    echo "   peer A behind a home router (port-restricted cone NAT, public 203.0.113.21),"
    echo "   peer B behind a home router behind a carrier-grade NAT (two levels, public 203.0.113.22)"
    scripts/natlab.sh up "$lab" --a port --b cgnat >"$work/lab.log" 2>&1 || { cat "$work/lab.log"; exit 1; }
    listen=203.0.113.10:7000
else
    echo "== starting everything on loopback (run as root with nftables for the NAT lab)"
    listen=127.0.0.1:0
fi

echo "== starting the rendezvous on $listen"
in_host rv "$bin/rendezvous" serve --listen "$listen" --data-dir "$work/rv" >"$work/rv.out" 2>"$work/rv.log" &
pids+=($!)
wait_for "$work/rv.out" "server key" 10
sed 's/^/   rendezvous | /' "$work/rv.out"
server=$(sed -n 's/^rendezvous listening on \([^ ]*\).*/\1/p' "$work/rv.out")
key=$(sed -n 's/^server key //p' "$work/rv.out")

mkfifo "$work/a.in" "$work/b.in"
echo "== peer A: listen"
in_host a "$bin/peer" --config-dir "$work/a" listen --server "$server" --server-key "$key" \
    <"$work/a.in" >"$work/a.out" 2>"$work/a.log" &
pids+=($!)
exec 3>"$work/a.in"
wait_for "$work/a.out" "registered with" 10
a_id=$(sed -n 's/^peer id //p' "$work/a.out")

echo "== peer B: connect $a_id"
in_host b "$bin/peer" --config-dir "$work/b" connect "$a_id" --server "$server" --server-key "$key" \
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
if [[ $mode == nat ]]; then
    grep -q "direct to" "$work/b.out" || { echo "demo: FAILED: no direct path"; exit 1; }
    echo "demo: OK: two peers behind different NATs found each other by id through the rendezvous,"
    echo "punched a direct path ($(sed -n 's/.*: direct to //p' "$work/b.out")) and exchanged a message each way"
    echo "over mutually authenticated, end-to-end encrypted QUIC"
else
    echo "demo: OK: two peers found each other by id through the rendezvous and exchanged a message each way over mutually authenticated QUIC"
fi
