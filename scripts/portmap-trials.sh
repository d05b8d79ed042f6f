#!/usr/bin/env bash
# portmap-trials.sh - repeated trials of symmetric x symmetric through a router port mapping.
#
#   scripts/portmap-trials.sh [--trials N] [--impaired-only|--clean-only] [--upnp-only|--no-pcp]
#
# As root, with the debug binaries built (cargo build -p peer -p rendezvous) and Debian's
# miniupnpd-nftables installed. Each trial builds a fresh lab (natlab.sh up --a sym --b sym,
# plus --delay 40 --loss 10 on both NAT links for the impaired runs), runs miniupnpd on the
# listener's router (natlab.sh upnp; --upnp-only: UPnP IGD only, --no-pcp: the router drops PCP
# requests, so the mapping is a NAT-PMP one), starts a rendezvous and a listener, waits for its
# port mapping (by the protocol asked for), then dials from the other side and waits at most
# 10 s for `direct to ... (port mapping)`. Prints one line per trial and a summary (successes,
# median and max time from the dialer's start to the direct path) per impairment, as recorded
# in docs/lab-matrix.md. The logs of a trial that misses are kept in $PORTMAP_TRIALS_KEEP
# (default /tmp).
set -euo pipefail

NAME=portmap-trials
# shellcheck source=lab-trials.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lab-trials.sh"
TRIALS=20
MODES=(clean impaired)
UPNP_OPTS=()
BY=PCP
while (($#)); do
	case $1 in
	--trials) TRIALS=${2:?}; shift 2 ;;
	--clean-only) MODES=(clean); shift ;;
	--impaired-only) MODES=(impaired); shift ;;
	--upnp-only) UPNP_OPTS=(--upnp-only); BY="UPnP IGD"; shift ;;
	--no-pcp) UPNP_OPTS=(--no-pcp); BY=NAT-PMP; shift ;;
	*) echo "usage: $0 [--trials N] [--impaired-only|--clean-only] [--upnp-only|--no-pcp]" >&2; exit 2 ;;
	esac
done
trials_require
[[ -x /usr/sbin/miniupnpd ]] || { echo "$NAME: apt-get install miniupnpd-nftables" >&2; exit 1; }
trials_setup

trial() {
	local mode=$1 opts=(--a sym --b sym) dir line mapping
	[[ $mode == impaired ]] && opts+=(--delay 40 --loss 10)
	"$NATLAB" up "$LAB" "${opts[@]}" >/dev/null
	"$NATLAB" upnp "$LAB" nata start "${UPNP_OPTS[@]}" >/dev/null
	dir=$(mktemp -d -p "$WORK")
	start_listener "$dir" 203.0.113.10:7000 || { echo "no listener"; end_trial; return 1; }
	mapping=$(wait_line "$dir/a.log" "port mapping: " 15) || { echo "no mapping"; end_trial; return 1; }
	[[ $mapping == *"by $BY "* ]] || { echo "mapped by another protocol than $BY: $mapping"; end_trial; return 1; }
	local start
	start=$(now_ms)
	start_dialer "$dir" 203.0.113.10:7000
	# The first direct path (the connect line, or a path line after the relay).
	if line=$(wait_line "$dir/b.log" "direct to 203.0.113.21:" 10) && [[ $line == *"(port mapping)"* ]]; then
		echo "direct $(($(now_ms) - start)) ms: $line"
	else
		echo "not through the mapping within 10 s (logs in $(keep_logs "$dir" "${PORTMAP_TRIALS_KEEP:-/tmp}" "$mode")): $(grep -m1 -e 'direct to' -e 'connected to' "$dir/b.log")"
	fi
	end_trial
}

labels=()
for mode in "${MODES[@]}"; do
	labels+=("$mode")
done
run_trials "$TRIALS" "direct through the $BY port mapping" "" "${labels[@]}"
