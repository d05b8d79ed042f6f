#!/usr/bin/env bash
# portmap-trials.sh - repeated trials of symmetric x symmetric through a router port mapping.
#
#   scripts/portmap-trials.sh [--trials N] [--impaired-only|--clean-only] [--upnp-only]
#
# As root, with the debug binaries built (cargo build -p peer -p rendezvous) and Debian's
# miniupnpd-nftables installed. Each trial builds a fresh lab (natlab.sh up --a sym --b sym,
# plus --delay 40 --loss 10 on both NAT links for the impaired runs), runs miniupnpd on the
# listener's router (natlab.sh upnp), starts a rendezvous and a listener, waits for its port
# mapping, then dials from the other side and waits at most 10 s for `direct to ... (port
# mapping)`. Prints one line per trial and a summary (successes, median and max time from the
# dialer's start to the direct path) per impairment, as recorded in docs/lab-matrix.md. The
# logs of a trial that misses are kept in $PORTMAP_TRIALS_KEEP (default /tmp).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
NATLAB=$ROOT/scripts/natlab.sh
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug
TRIALS=20
MODES=(clean impaired)
UPNP_ONLY=()
while (($#)); do
	case $1 in
	--trials) TRIALS=${2:?}; shift 2 ;;
	--clean-only) MODES=(clean); shift ;;
	--impaired-only) MODES=(impaired); shift ;;
	--upnp-only) UPNP_ONLY=(--upnp-only); shift ;;
	*) echo "usage: $0 [--trials N] [--impaired-only|--clean-only] [--upnp-only]" >&2; exit 2 ;;
	esac
done
((EUID == 0)) || { echo "portmap-trials: must run as root" >&2; exit 1; }
[[ -x /usr/sbin/miniupnpd ]] || { echo "portmap-trials: apt-get install miniupnpd-nftables" >&2; exit 1; }
[[ -x $BIN/peer && -x $BIN/rendezvous ]] || { echo "portmap-trials: cargo build -p peer -p rendezvous first" >&2; exit 1; }

LAB=pmt$$
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
	local mode=$1 opts=(--a sym --b sym) dir
	[[ $mode == impaired ]] && opts+=(--delay 40 --loss 10)
	"$NATLAB" up "$LAB" "${opts[@]}" >/dev/null
	"$NATLAB" upnp "$LAB" nata start "${UPNP_ONLY[@]}" >/dev/null
	dir=$(mktemp -d -p "$WORK")
	"$NATLAB" exec "$LAB" rv -- "$BIN/rendezvous" serve --listen 203.0.113.10:7000 \
		--data-dir "$dir/rv" >"$dir/rv.log" 2>&1 &
	local fp
	fp=$(wait_line "$dir/rv.log" "sha256:" 10 | grep -o 'sha256:[0-9a-f]*' | head -n1) || return 1
	"$NATLAB" exec "$LAB" a -- "$BIN/peer" --config-dir "$dir/a" -v listen \
		--server 203.0.113.10:7000 --server-key "$fp" </dev/null >"$dir/a.log" 2>&1 &
	local id
	id=$(wait_line "$dir/a.log" "peer id" 15 | awk '{print $NF}') || return 1
	wait_line "$dir/a.log" "port mapping: " 15 >/dev/null || { echo "no mapping"; return 1; }
	local start end line
	start=$(now_ms)
	# The dialer's stdin stays open (a writer on a fifo) until the trial ends.
	mkfifo "$dir/in"
	sleep 60 >"$dir/in" &
	local holder=$!
	"$NATLAB" exec "$LAB" b -- "$BIN/peer" --config-dir "$dir/b" -v connect "$id" \
		--server 203.0.113.10:7000 --server-key "$fp" <"$dir/in" >"$dir/b.log" 2>&1 &
	# The first direct path (the connect line, or a path line after the relay).
	if line=$(wait_line "$dir/b.log" "direct to 203.0.113.21:" 10) && [[ $line == *"(port mapping)"* ]]; then
		end=$(now_ms)
		echo "direct $((end - start)) ms: $line"
	else
		# Kept for a look: the listener's and the dialer's output, the router's rules.
		local keep=${PORTMAP_TRIALS_KEEP:-/tmp}/portmap-trial-$mode-$$-$RANDOM
		mkdir -p "$keep"
		cp "$dir"/*.log "$keep"/ 2>/dev/null || true
		"$NATLAB" status "$LAB" >"$keep/lab-status.txt" 2>&1 || true
		echo "not through the mapping within 10 s (logs in $keep): $(grep -m1 -e 'direct to' -e 'connected to' "$dir/b.log")"
	fi
	"$NATLAB" down "$LAB" >/dev/null
	kill "$holder" 2>/dev/null || true
	wait 2>/dev/null || true
}

for mode in "${MODES[@]}"; do
	times=()
	ok=0
	for ((i = 1; i <= TRIALS; i++)); do
		out=$(trial "$mode" || true)
		echo "$mode trial $i: $out"
		if [[ $out =~ ^direct\ ([0-9]+)\ ms ]]; then
			ok=$((ok + 1))
			times+=("${BASH_REMATCH[1]}")
		fi
	done
	summary="$mode: direct through the port mapping in $ok of $TRIALS"
	if ((${#times[@]})); then
		mapfile -t sorted < <(printf '%s\n' "${times[@]}" | sort -n)
		summary+=", dialer start to direct median ${sorted[$((${#sorted[@]} / 2))]} ms, max ${sorted[-1]} ms"
	fi
	echo "== $summary"
done
