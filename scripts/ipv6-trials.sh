#!/usr/bin/env bash
# ipv6-trials.sh - repeated trials of symmetric x symmetric over IPv6 through stateful firewalls.
#
#   scripts/ipv6-trials.sh [--trials N] [--mode dual|v6only|cone]...
#
# As root, with the debug binaries built (cargo build -p peer -p rendezvous). Each trial builds
# a fresh lab (natlab.sh up --a sym --b sym --ipv6 ab; for the "v6only" runs also
# --ipv6-only b, the dialer then registers over IPv6), starts a dual-stack rendezvous
# ([::]:7000) and a listener, waits until the listener has proven its IPv6 address, then dials
# from the other side and waits at most 10 s for `direct to [2001:db8:1::2]:...`. Prints one
# line per trial and a summary (successes, median and max time from the dialer's start to the
# direct path) per mode, as recorded in docs/lab-matrix.md. The "cone" mode (port x port, both
# dual-stack: direct over IPv4 too) measures the IPv6 preference: how often the first direct
# path is the IPv6 one, and how fast any direct path comes. The logs of a trial that misses are
# kept in $IPV6_TRIALS_KEEP (default /tmp).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
NATLAB=$ROOT/scripts/natlab.sh
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug
TRIALS=20
MODES=()
while (($#)); do
	case $1 in
	--trials) TRIALS=${2:?}; shift 2 ;;
	--mode) MODES+=("${2:?}"); shift 2 ;;
	*) echo "usage: $0 [--trials N] [--mode dual|v6only|cone]..." >&2; exit 2 ;;
	esac
done
((${#MODES[@]})) || MODES=(dual v6only cone)
((EUID == 0)) || { echo "ipv6-trials: must run as root" >&2; exit 1; }
[[ -x $BIN/peer && -x $BIN/rendezvous ]] || { echo "ipv6-trials: cargo build -p peer -p rendezvous first" >&2; exit 1; }

LAB=v6t$$
LAB=${LAB:0:6}
WORK=$(mktemp -d)
cleanup() {
	"$NATLAB" down "$LAB" >/dev/null 2>&1 || true
	rm -rf "$WORK"
}
trap cleanup EXIT

# wait_line FILE NEEDLE SECONDS: the first line of FILE containing NEEDLE, within SECONDS.
wait_line() {
	local file=$1 needle=$2 deadline=$((SECONDS + $3))
	while ((SECONDS < deadline)); do
		if grep -F -m1 -- "$needle" "$file" 2>/dev/null; then return 0; fi
		sleep 0.05
	done
	return 1
}

now_ms() { date +%s%3N; }

trial() {
	local mode=$1 opts=(--a sym --b sym --ipv6 ab) server=203.0.113.10:7000 dir
	case $mode in
	v6only)
		opts+=(--ipv6-only b)
		server=[2001:db8::10]:7000
		;;
	cone) opts=(--a port --b port --ipv6 ab) ;;
	esac
	"$NATLAB" up "$LAB" "${opts[@]}" >/dev/null
	dir=$(mktemp -d -p "$WORK")
	"$NATLAB" exec "$LAB" rv -- "$BIN/rendezvous" serve --listen '[::]:7000' \
		--data-dir "$dir/rv" >"$dir/rv.log" 2>&1 &
	local fp
	fp=$(wait_line "$dir/rv.log" "sha256:" 10 | grep -o 'sha256:[0-9a-f]*' | head -n1) || return 1
	"$NATLAB" exec "$LAB" a -- "$BIN/peer" --config-dir "$dir/a" -v listen \
		--server 203.0.113.10:7000 --server-key "$fp" </dev/null >"$dir/a.log" 2>&1 &
	local id
	id=$(wait_line "$dir/a.log" "peer id" 15 | awk '{print $NF}') || return 1
	wait_line "$dir/a.log" "proven to the rendezvous" 15 >/dev/null || { echo "no IPv6 proof"; return 1; }
	local start end line
	start=$(now_ms)
	# The dialer's stdin stays open (a writer on a fifo) until the trial ends.
	mkfifo "$dir/in"
	sleep 60 >"$dir/in" &
	local holder=$!
	"$NATLAB" exec "$LAB" b -- "$BIN/peer" --config-dir "$dir/b" -v connect "$id" \
		--server "$server" --server-key "$fp" <"$dir/in" >"$dir/b.log" 2>&1 &
	# The first direct path (the connect line, or a path line after the relay).
	if line=$(wait_line "$dir/b.log" "direct to " 10) && [[ $line == *"direct to [2001:db8:1::2]:"* ]]; then
		end=$(now_ms)
		echo "direct $((end - start)) ms: $line"
	elif [[ -n ${line:-} ]]; then
		end=$(now_ms)
		echo "ipv4 $((end - start)) ms: $line"
	else
		local keep=${IPV6_TRIALS_KEEP:-/tmp}/ipv6-trial-$mode-$$-$RANDOM
		mkdir -p "$keep"
		cp "$dir"/*.log "$keep"/ 2>/dev/null || true
		"$NATLAB" status "$LAB" >"$keep/lab-status.txt" 2>&1 || true
		echo "not direct over IPv6 within 10 s (logs in $keep): $(grep -m1 -e 'direct to' -e 'connected to' "$dir/b.log")"
	fi
	"$NATLAB" down "$LAB" >/dev/null
	kill "$holder" 2>/dev/null || true
	wait 2>/dev/null || true
}

for mode in "${MODES[@]}"; do
	times=()
	ok=0
	v4=0
	for ((i = 1; i <= TRIALS; i++)); do
		out=$(trial "$mode" || true)
		echo "$mode trial $i: $out"
		if [[ $out =~ ^direct\ ([0-9]+)\ ms ]]; then
			ok=$((ok + 1))
			times+=("${BASH_REMATCH[1]}")
		elif [[ $out =~ ^ipv4\ ([0-9]+)\ ms ]]; then
			v4=$((v4 + 1))
			times+=("${BASH_REMATCH[1]}")
		fi
	done
	summary="$mode: direct over IPv6 in $ok of $TRIALS, over IPv4 in $v4"
	if ((${#times[@]})); then
		mapfile -t sorted < <(printf '%s\n' "${times[@]}" | sort -n)
		summary+=", dialer start to any direct path median ${sorted[$((${#sorted[@]} / 2))]} ms, max ${sorted[-1]} ms"
	fi
	echo "== $summary"
done
