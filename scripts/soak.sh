#!/usr/bin/env bash
# The documented soak (issue 11): the release `rendezvous` binary on loopback under legitimate
# load (300 registered idle clients pinged every minute, two `peer` processes chatting a line
# every 5 s, a fresh `peer` registering every 30 s, /metrics scraped every 5 s) and every attack
# of tests/support/attack.rs (`soak_attacks`) at once: tunnel and metrics slowloris, STUN flood,
# garbage UDP, a registration flood of fresh identities, a relay flood to destinations that never
# read. Server RSS, open fds, threads and metrics are sampled every 5 s.
#
#   scripts/soak.sh [--minutes N]      (default 30)
#
# SOAK_ATTACKS=name,name (names in tests/support/attack.rs `soak_attacks`; `none` for none) runs
# only those attacks, to tell which one costs what.
#
# Cost: the release build (a few minutes from scratch), then N minutes (plus about a minute of
# setup and teardown) with both cores of a 2-core machine busy: the attacks and the load run in
# this process, the server in its own. Loopback only (127.0.0.0/8 sources); nothing else is
# contacted. Needs no root.
#
# Results: target/soak/ (or $SOAK_OUT): samples.csv (t_s, rss_kib, fds, threads, scrape_ms and the
# main metrics, one row per sample), metrics.csv (every metrics sample, long format) and
# summary.md (printed at the end): peak and final RSS, the RSS trend over the second half,
# legitimate operations attempted/succeeded with latency percentiles, per-attack counters.
# The run fails if a legitimate operation failed, peak RSS passed its bound, RSS grew steadily
# over the second half, or the server stopped answering (bounds: tests/soak.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=30
while [[ $# -gt 0 ]]; do
    case $1 in
        --minutes) minutes=${2:?--minutes needs a number}; shift ;;
        *) echo "usage: $0 [--minutes N]" >&2; exit 2 ;;
    esac
    shift
done
[[ $minutes =~ ^[0-9]+$ && $minutes -gt 0 ]] || { echo "--minutes: a positive whole number" >&2; exit 2; }

out=${SOAK_OUT:-$PWD/target/soak}
mkdir -p "$out"
# The binaries the test starts (tests/support bin(): the test's own profile) and the test.
cargo build --release --workspace --bins
cargo test --release -p e2e --test soak --no-run
status=0
SOAK_SECONDS=$((minutes * 60)) SOAK_OUT=$out \
    cargo test --release -p e2e --test soak -- --ignored --nocapture --test-threads 1 \
    >"$out/test.log" 2>&1 || status=$?
echo "--- $out/summary.md"
cat "$out/summary.md" 2>/dev/null || { echo "no summary; the end of $out/test.log:"; tail -50 "$out/test.log"; }
if [[ $status -ne 0 ]]; then
    echo "soak FAILED (exit $status); the assertion:"
    grep -A3 "panicked at" "$out/test.log" | head -20 || true
fi
exit $status
