#!/usr/bin/env bash
# Benchmarks, in release mode, in the NAT lab (needs root and nftables). Prints a markdown table of
# ratios measured in this run: relayed goodput / direct goodput on the same lab links.
#
#   scripts/bench.sh [--quick] [--size MB]
#
# Each measurement sends a file of random bytes with `peer send` (SHA-256 verified by the
# receiver) between two peers: behind port-restricted NATs (a direct path is punched) and behind
# symmetric NATs (no direct path: the rendezvous relays). Both pairs use identical links.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=100
runs=3
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) size_mb=8; runs=1 ;;
        --size) size_mb=$2; shift ;;
        *) echo "usage: $0 [--quick] [--size MB]" >&2; exit 2 ;;
    esac
    shift
done
if [[ $(id -u) -ne 0 ]] || ! command -v nft >/dev/null 2>&1; then
    echo "bench.sh needs root and nftables (it builds a network-namespace lab)" >&2
    exit 1
fi

cargo build --release --quiet -p rendezvous -p peer
bin=$PWD/target/release
work=$(mktemp -d /tmp/p2p-bench.XXXXXX)
labs=()
cleanup() {
    for lab in "${labs[@]}"; do scripts/natlab.sh down "$lab" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT
head -c $((size_mb * 1000 * 1000)) /dev/urandom >"$work/payload.bin"

wait_for() { # FILE PATTERN SECONDS
    local deadline=$((SECONDS + $3))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || { echo "bench: timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1; }
        sleep 0.1
    done
}

# goodput LAB KIND_A KIND_B: writes the median MB/s of $runs transfers to $work/LAB/goodput.
# (Not called in $(...): the lab list must be updated in this shell for the cleanup trap.)
goodput() {
    local lab=$1 kind_a=$2 kind_b=$3 dir="$work/$1"
    mkdir -p "$dir/recv"
    scripts/natlab.sh up "$lab" --a "$kind_a" --b "$kind_b" >"$dir/lab.log" 2>&1
    labs+=("$lab")
    ip netns exec "$lab-rv" "$bin/rendezvous" serve --listen 203.0.113.10:7000 --data-dir "$dir/rv" \
        --tcp-listen off >"$dir/rv.out" 2>"$dir/rv.log" </dev/null &
    wait_for "$dir/rv.out" "server key" 10
    local key
    key=$(sed -n 's/^server key //p' "$dir/rv.out")
    ip netns exec "$lab-a" "$bin/peer" --config-dir "$dir/a" listen --accept-files "$dir/recv" \
        --server 203.0.113.10:7000 --server-key "$key" >"$dir/a.out" 2>"$dir/a.log" </dev/null &
    wait_for "$dir/a.out" "registered with" 10
    local id results=()
    id=$(sed -n 's/^peer id //p' "$dir/a.out")
    for ((i = 0; i < runs; i++)); do
        rm -f "$dir/recv/payload.bin"
        ip netns exec "$lab-b" "$bin/peer" --config-dir "$dir/b" send "$id" "$work/payload.bin" \
            --server 203.0.113.10:7000 --server-key "$key" >"$dir/b.out" 2>"$dir/b.log" </dev/null
        # Measure on a settled path: the first transfer also shows which path was used.
        results+=("$(sed -n 's/.*(\([0-9.]*\) MB\/s).*/\1/p' "$dir/b.out")")
        grep -q "direct to" "$dir/b.out" && echo direct >"$dir/path" || echo relayed >"$dir/path"
    done
    printf '%s\n' "${results[@]}" | sort -n | sed -n "$(((runs + 1) / 2))p" >"$dir/goodput"
}

echo "== measuring: ${size_mb} MB per transfer, median of $runs (release build)"
goodput bd port port
goodput br sym sym
direct=$(cat "$work/bd/goodput")
relayed=$(cat "$work/br/goodput")
ratio=$(python3 -c "print(f'{$relayed / $direct:.2f}')")
echo
echo "| measurement | path | goodput (MB/s) | ratio |"
echo "|---|---|---|---|"
echo "| port-restricted x port-restricted | $(cat "$work/bd/path") | $direct | 1.00 |"
echo "| symmetric x symmetric | $(cat "$work/br/path") | $relayed | $ratio (relayed / direct; target >= 0.5) |"
echo
echo "machine: $(nproc) cores, $(uname -sr); links: veth pairs through nftables NATs, no impairment"
