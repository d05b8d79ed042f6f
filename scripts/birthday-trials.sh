#!/usr/bin/env bash
# birthday-trials.sh - repeated birthday-punching trials in the NAT lab (root only).
#
#   scripts/birthday-trials.sh [TRIALS] [CASES] [IMPAIRMENTS]
#
# TRIALS: trials per case and impairment (default 20).
# CASES: comma-separated LISTENER_DIALER NAT kinds (default sym_port,port_sym,sym_cgnat,cgnat_sym).
# IMPAIRMENTS: clean,impaired (impaired = --delay 40 --loss 10 on both NAT uplinks).
#
# Each trial starts a fresh rendezvous, listener and dialer after flushing the NATs, and counts
# as a success when the dialer reports a direct path within BIRTHDAY_WITHIN_S seconds (default
# 10) of its start. Prints one markdown row per case and impairment (as in docs/lab-matrix.md)
# and leaves them in target/lab-matrix/birthday-*.md. About 10-20 s per trial.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
[[ $(id -u) == 0 ]] || { echo "birthday-trials.sh: needs root (network namespaces)" >&2; exit 2; }
export BIRTHDAY_TRIALS=${1:-20}
export BIRTHDAY_CASES=${2:-sym_port,port_sym,sym_cgnat,cgnat_sym}
export BIRTHDAY_IMPAIRMENTS=${3:-clean,impaired}
export P2P_NETNS_TESTS=1
target=${CARGO_TARGET_DIR:-target}
for c in ${BIRTHDAY_CASES//,/ }; do rm -f "$target/lab-matrix/birthday-$c-"*.md; done
cargo build -q -p peer -p rendezvous --bins
cargo test -q -p e2e --test natlab_birthday -- --ignored --nocapture birthday_trials
echo
echo "| pair (listener / dialer) | impairment | direct | time to direct (from the dialer's start) | worst | the birthday punch itself | failures |"
echo "|---|---|---|---|---|---|---|"
cat "$target"/lab-matrix/birthday-*.md
