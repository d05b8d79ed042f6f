#!/usr/bin/env bash
# The project's test command (the README and CI run exactly this).
#
# Builds everything, runs the unit, property and loopback end-to-end tests with cargo-nextest
# (cargo test if nextest is missing), and, when run as root with nftables available, the
# network-namespace NAT lab self-test and the lab end-to-end tests (tests/natlab.rs, the NAT
# matrix), then prints the matrix and keeps it in target/lab-matrix.md. Without root the lab test
# binaries (tests/natlab*.rs) are left out (run anyway, as by a plain `cargo test`, their tests
# skip with a message when P2P_NETNS_TESTS is not 1).
set -euo pipefail
cd "$(dirname "$0")/.."

# As root on a fresh Debian machine, install what the lab and interop tests need (.ci/run does the
# same before calling this script).
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    if ! command -v nft >/dev/null 2>&1 || ! command -v turnutils_natdiscovery >/dev/null 2>&1 \
        || ! command -v conntrack >/dev/null 2>&1 || ! test -x /usr/sbin/sshd \
        || ! [[ -x /usr/sbin/miniupnpd ]] || ! command -v redis-server >/dev/null 2>&1; then
        echo "== installing nftables, iproute2, conntrack, coturn, openssh-server, miniupnpd-nftables, redis-server (root, missing)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq nftables iproute2 conntrack python3 coturn openssh-server openssh-client miniupnpd-nftables redis-server >/dev/null
    fi
fi

cargo build --workspace --all-targets

netns=0
if [[ $(id -u) -eq 0 ]] && command -v nft >/dev/null 2>&1; then
    netns=1
fi
nextest=0
if cargo nextest --version >/dev/null 2>&1; then
    nextest=1
fi
target=${CARGO_TARGET_DIR:-target}
matrix_dir=$target/lab-matrix

if ((netns)); then
    export P2P_NETNS_TESTS=1
    echo "== NAT lab self-test (root: network namespaces enabled)"
    scripts/natlab-selftest.sh
    rm -rf "$matrix_dir" "$target/lab-matrix.md"
else
    echo "== not root or no nft: the network-namespace tests (tests/natlab*.rs) are left out (they need root)"
fi

echo "== cargo tests"
status=0
if ((nextest)); then
    filter=()
    if ((!netns)); then
        filter=(-E 'not binary(natlab*)')
    fi
    # The output is kept (target/nextest.log) so that the failures' panic messages can be
    # repeated at the very end, where a CI log cut in the middle still shows them.
    cargo nextest run --workspace --no-fail-fast --test-threads 4 "${filter[@]}" 2>&1 \
        | tee "$target/nextest.log" || status=${PIPESTATUS[0]}
elif ((netns)); then
    cargo test --workspace --no-fail-fast || status=$?
else
    cargo test --workspace --exclude e2e --no-fail-fast || status=$?
    # Every e2e test binary but the lab ones (natlab*).
    e2e=()
    for t in tests/*.rs; do
        t=$(basename "$t" .rs)
        if [[ $t != natlab* ]]; then e2e+=(--test "$t"); fi
    done
    cargo test -p e2e --lib "${e2e[@]}" --no-fail-fast || status=$?
fi

if ((netns)); then
    # One row per case, written by tests/natlab.rs (Row::write); a failed case says so.
    echo "== NAT matrix (tests/natlab.rs)"
    {
        echo '| listener / dialer | impairment | outcome | path | connected | path settled | why no direct path (`peer ping`) |'
        echo "| --- | --- | --- | --- | --- | --- | --- |"
        if compgen -G "$matrix_dir/*.md" >/dev/null; then
            LC_ALL=C sort "$matrix_dir"/*.md
        fi
    } | tee "$target/lab-matrix.md"
    echo "(written to $target/lab-matrix.md)"
fi
if ((status != 0)) && [[ -f $target/nextest.log ]]; then
    echo "== failed tests: why (the panic messages; the whole output is above and in $target/nextest.log)"
    grep -E '^ +(FAIL|TIMEOUT|SIGSEGV|SIGABRT) ' "$target/nextest.log" | sort -u || true
    grep -A 6 "panicked at" "$target/nextest.log" | cut -c1-400 | head -n 120 || true
fi
exit "$status"
