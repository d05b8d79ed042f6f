#!/usr/bin/env bash
# ipv6-trials.sh - repeated trials of symmetric x symmetric over IPv6 through stateful firewalls.
#
#   scripts/ipv6-trials.sh [--trials N] [--mode dual|v6only|cone|upgrade|birthday|birthday-blocked]...
#                          [--impaired]
#
# As root, with the debug binaries built (cargo build -p peer -p rendezvous). Each trial builds
# a fresh lab (natlab.sh up --a sym --b sym --ipv6 ab; for the "v6only" runs also
# --ipv6-only b, the dialer then registers over IPv6; with --impaired also --delay 40 --loss 10
# on both sides' uplinks, IPv4 and IPv6 alike), starts a dual-stack rendezvous ([::]:7000) and
# a listener, waits until the listener has proven its IPv6 address, then dials from the other
# side and waits at most 10 s for `direct to [2001:db8:1::2]:...`. Prints one line per trial
# and a summary (successes, median and max time from the dialer's start to the direct path)
# per mode, as recorded in docs/lab-matrix.md. The "cone" mode (port x port, both dual-stack:
# direct over IPv4 too) measures the IPv6 preference: how often the first direct path is the
# IPv6 one, and how fast any direct path comes. The "upgrade" mode is the "cone" lab, but a
# success is a direct path over IPv6 within 10 s whether it is the first one or the one a
# connection that went direct over IPv4 moves to later (its punch for IPv6 after 3 s). The
# "birthday" mode (sym listener, port dialer,
# both dual-stack: a birthday pair over IPv4) has both sides run as listeners until both have
# measured their NAT (so that the introduction carries both profiles and decides on birthday
# punching), then pings the listener through the dialer's running node: a success is a direct
# path over IPv6 with no birthday datagram sent by either side (both say `birthday punch not
# needed`). "birthday-blocked" is the same with IPv6 between the two peers dropped by the
# dialer's router after both proved their IPv6 address (IPv6 available but failing): a success
# is a direct path by the birthday punch (started after the wait for IPv6). The logs of a trial
# that misses are kept in $IPV6_TRIALS_KEEP (default /tmp).
set -euo pipefail

NAME=ipv6-trials
# shellcheck source=lab-trials.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lab-trials.sh"
TRIALS=20
MODES=()
IMPAIRED=()
while (($#)); do
	case $1 in
	--trials) TRIALS=${2:?}; shift 2 ;;
	--mode) MODES+=("${2:?}"); shift 2 ;;
	--impaired) IMPAIRED=(--delay 40 --loss 10); shift ;;
	*) echo "usage: $0 [--trials N] [--mode dual|v6only|cone|upgrade|birthday|birthday-blocked]... [--impaired]" >&2; exit 2 ;;
	esac
done
((${#MODES[@]})) || MODES=(dual v6only cone)
trials_require
trials_setup

# birthday_trial MODE: see "birthday" above; prints the result line of `trial`.
birthday_trial() {
	local mode=$1 dir line start ms
	"$NATLAB" up "$LAB" --a sym --b port --ipv6 ab "${IMPAIRED[@]}" >/dev/null
	dir=$(mktemp -d -p "$WORK")
	# A second IP: the NAT's filtering is measured (a symmetric/port pair needs both profiles).
	RV_EXTRA=(--stun-alt-port 7001 --stun-alt-ip 203.0.113.11)
	start_listener "$dir" '[::]:7000' || { echo "no listener"; end_trial; return 1; }
	"$NATLAB" exec "$LAB" b -- "$BIN/peer" --config-dir "$dir/b" -v listen \
		--server 203.0.113.10:7000 --server-key "$FP" </dev/null >"$dir/b.log" 2>&1 &
	if ! wait_line "$dir/a.log" "NAT measured mapping=AddressAndPortDependent" 30 >/dev/null ||
		! wait_line "$dir/b.log" "NAT measured mapping=EndpointIndependent" 30 >/dev/null ||
		! wait_line "$dir/a.log" "proven to the rendezvous" 15 >/dev/null ||
		! wait_line "$dir/b.log" "proven to the rendezvous" 15 >/dev/null; then
		echo "no NAT profile or IPv6 proof (logs in $(keep_logs "$dir" "${IPV6_TRIALS_KEEP:-/tmp}" "$mode"))"
		end_trial
		return 1
	fi
	if [[ $mode == birthday-blocked ]]; then
		"$NATLAB" exec "$LAB" natb -- nft add rule ip6 natlab6 forward ip6 daddr 2001:db8:1::/64 drop
		"$NATLAB" exec "$LAB" natb -- nft add rule ip6 natlab6 forward ip6 saddr 2001:db8:1::/64 drop
	fi
	start=$(now_ms)
	"$NATLAB" exec "$LAB" b -- "$BIN/peer" --config-dir "$dir/b" ping "$ID" --count 3 \
		>"$dir/ping.log" 2>&1 || true
	ms=$(grep -m1 -o 'direct after [0-9]* ms' "$dir/ping.log" | grep -o '[0-9]*') || ms=$(($(now_ms) - start))
	line=$(grep -m1 '^path: ' "$dir/ping.log") || line="no path line"
	# Each side says at the end of its punching session (8 s) what its birthday punch sent.
	local said_a said_b
	wait_line "$dir/a.log" "birthday punch " 15 >/dev/null || true
	wait_line "$dir/b.log" "birthday punch " 15 >/dev/null || true
	said_a=$(grep -m1 -e "birthday punch not needed" -e "birthday punch sent" "$dir/a.log") || true
	said_b=$(grep -m1 -e "birthday punch not needed" -e "birthday punch sent" "$dir/b.log") || true
	local ok=0
	if [[ $mode == birthday ]]; then
		[[ $line == *"direct to [2001:db8:1::2]:"* && $said_a == *"not needed"* && $said_b == *"not needed"* ]] && ok=1
	else
		[[ $line == *"direct to 203.0.113.21:"* ]] && ok=1
	fi
	if ((ok)); then
		echo "direct $ms ms: $line; listener: ${said_a#punch * }; dialer: ${said_b#punch * }"
	else
		echo "missed (logs in $(keep_logs "$dir" "${IPV6_TRIALS_KEEP:-/tmp}" "$mode")): $line; listener: ${said_a:-?}; dialer: ${said_b:-?}"
	fi
	end_trial
}

trial() {
	local mode=${1%+impaired} opts=(--a sym --b sym --ipv6 ab) server=203.0.113.10:7000 dir line
	case $mode in birthday | birthday-blocked)
		birthday_trial "$mode"
		return
		;;
	esac
	case $mode in
	v6only)
		opts+=(--ipv6-only b)
		server=[2001:db8::10]:7000
		;;
	cone | upgrade) opts=(--a port --b port --ipv6 ab) ;;
	esac
	"$NATLAB" up "$LAB" "${opts[@]}" "${IMPAIRED[@]}" >/dev/null
	dir=$(mktemp -d -p "$WORK")
	start_listener "$dir" '[::]:7000' || { echo "no listener"; end_trial; return 1; }
	wait_line "$dir/a.log" "proven to the rendezvous" 15 >/dev/null ||
		{ echo "no IPv6 proof (logs in $(keep_logs "$dir" "${IPV6_TRIALS_KEEP:-/tmp}" "$1"))"; end_trial; return 1; }
	local start
	start=$(now_ms)
	start_dialer "$dir" "$server"
	# The first direct path (the connect line, or a path line after the relay); for "upgrade"
	# the first over IPv6.
	local needle="direct to "
	[[ $mode == upgrade ]] && needle="direct to [2001:db8:1::2]:"
	if line=$(wait_line "$dir/b.log" "$needle" 10) && [[ $line == *"direct to [2001:db8:1::2]:"* ]]; then
		echo "direct $(($(now_ms) - start)) ms: $line"
	elif [[ -n ${line:-} ]]; then
		echo "other $(($(now_ms) - start)) ms (IPv4): $line"
	else
		echo "not direct over IPv6 within 10 s (logs in $(keep_logs "$dir" "${IPV6_TRIALS_KEEP:-/tmp}" "$1")): $(grep -m1 -e 'direct to' -e 'connected to' "$dir/b.log")"
	fi
	end_trial
}

for mode in "${MODES[@]}"; do
	case $mode in
	birthday) run_trials "$TRIALS" "direct over IPv6 with no birthday datagram" "" "$mode${IMPAIRED:++impaired}" ;;
	birthday-blocked) run_trials "$TRIALS" "direct by the birthday punch (IPv6 dropped)" "" "$mode${IMPAIRED:++impaired}" ;;
	*) run_trials "$TRIALS" "direct over IPv6" "over IPv4" "$mode${IMPAIRED:++impaired}" ;;
	esac
done
