#!/usr/bin/env bash
# The project's test command (the README and CI run exactly this).
#
# Builds everything, runs the unit, property and loopback end-to-end tests with cargo-nextest
# (cargo test if nextest is missing), and, when run as root with nftables available, the
# network-namespace NAT lab self-test and the lab end-to-end tests.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --all-targets

runner=(cargo test --workspace --no-fail-fast)
if cargo nextest --version >/dev/null 2>&1; then
    runner=(cargo nextest run --workspace --no-fail-fast --test-threads 4)
fi

if [[ $(id -u) -eq 0 ]] && command -v nft >/dev/null 2>&1; then
    export P2P_NETNS_TESTS=1
    echo "== NAT lab self-test (root: network namespaces enabled)"
    scripts/natlab-selftest.sh
else
    echo "== not root or no nft: the network-namespace tests are left out (they need root)"
fi

echo "== cargo tests"
"${runner[@]}"
