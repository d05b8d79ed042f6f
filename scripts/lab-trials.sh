# lab-trials.sh - shell functions shared by the repeated-trial scripts (ipv6-trials.sh,
# portmap-trials.sh): a lab of their own, its rendezvous, listener and dialer, and the loop that
# runs N trials per mode and prints the summary recorded in docs/lab-matrix.md.  Sourced, not
# run; the caller sets NAME (for messages and the lab's name) before sourcing, and defines
# `trial MODE`, which prints one line starting "direct N ms" (a success), "other N ms" (a
# direct path, but not the one measured) or anything else (a miss).

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
NATLAB=$ROOT/scripts/natlab.sh
# TRIALS_BIN: another directory of binaries (a copy, so that a rebuild does not change them mid-run).
BIN=${TRIALS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}

# trials_require: root and the debug binaries, or exit with the reason.
trials_require() {
	((EUID == 0)) || { echo "$NAME: must run as root" >&2; exit 1; }
	[[ -x $BIN/peer && -x $BIN/rendezvous ]] || { echo "$NAME: cargo build -p peer -p rendezvous first" >&2; exit 1; }
}

# trials_setup: the lab's name (LAB, 6 characters from NAME and the pid) and a work directory
# (WORK), both gone when the script exits.
trials_setup() {
	LAB=${NAME:0:3}$$
	LAB=${LAB:0:6}
	WORK=$(mktemp -d)
	trap trials_cleanup EXIT
}

trials_cleanup() {
	"$NATLAB" down "$LAB" >/dev/null 2>&1 || true
	rm -rf "$WORK"
}

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

# Extra options of the rendezvous (e.g. --stun-alt-ip 203.0.113.11, for NAT filtering
# measurements by address).
RV_EXTRA=()

# start_listener DIR RV_LISTEN: a rendezvous on rv listening on RV_LISTEN and a listener on a
# registered with it at 203.0.113.10:7000; sets FP (the rendezvous key) and ID (the listener's).
start_listener() {
	local dir=$1 listen=$2
	"$NATLAB" exec "$LAB" rv -- "$BIN/rendezvous" serve --listen "$listen" "${RV_EXTRA[@]}" \
		--data-dir "$dir/rv" >"$dir/rv.log" 2>&1 &
	FP=$(wait_line "$dir/rv.log" "sha256:" 10 | grep -o 'sha256:[0-9a-f]*' | head -n1) || return 1
	"$NATLAB" exec "$LAB" a -- "$BIN/peer" --config-dir "$dir/a" -v listen \
		--server 203.0.113.10:7000 --server-key "$FP" </dev/null >"$dir/a.log" 2>&1 &
	ID=$(wait_line "$dir/a.log" "peer id" 15 | awk '{print $NF}') || return 1
}

# start_dialer DIR SERVER: a dialer on b connecting to ID through SERVER, its output in
# DIR/b.log; its stdin stays open (a writer on a fifo, HOLDER) until the trial ends.
start_dialer() {
	local dir=$1 server=$2
	mkfifo "$dir/in"
	sleep 60 >"$dir/in" &
	HOLDER=$!
	"$NATLAB" exec "$LAB" b -- "$BIN/peer" --config-dir "$dir/b" -v connect "$ID" \
		--server "$server" --server-key "$FP" <"$dir/in" >"$dir/b.log" 2>&1 &
}

# keep_logs DIR KEEP_ROOT MODE: copies a missed trial's logs and the lab's status to a new
# directory under KEEP_ROOT and prints its path.
keep_logs() {
	local dir=$1 keep=$2/$NAME-$3-$$-$RANDOM
	mkdir -p "$keep"
	cp "$dir"/*.log "$keep"/ 2>/dev/null || true
	"$NATLAB" status "$LAB" >"$keep/lab-status.txt" 2>&1 || true
	echo "$keep"
}

# end_trial: the lab down, the dialer's stdin closed, every process of the trial reaped.
end_trial() {
	"$NATLAB" down "$LAB" >/dev/null
	kill "${HOLDER:-}" 2>/dev/null || true
	wait 2>/dev/null || true
}

# run_trials TRIALS SUCCESS OTHER MODE...: TRIALS runs of `trial MODE` per mode, one line each,
# then "== MODE: SUCCESS in X of TRIALS[, OTHER in Y], dialer start to direct median M ms, max
# N ms" (the times of successes and of OTHER results; OTHER empty: none expected).
run_trials() {
	local trials=$1 success=$2 other=$3 mode i out ok v summary
	shift 3
	for mode in "$@"; do
		local times=() sorted=()
		ok=0
		v=0
		for ((i = 1; i <= trials; i++)); do
			out=$(trial "$mode" || true)
			echo "$mode trial $i: $out"
			if [[ $out =~ ^direct\ ([0-9]+)\ ms ]]; then
				ok=$((ok + 1))
				times+=("${BASH_REMATCH[1]}")
			elif [[ $out =~ ^other\ ([0-9]+)\ ms ]]; then
				v=$((v + 1))
				times+=("${BASH_REMATCH[1]}")
			fi
		done
		summary="$mode: $success in $ok of $trials"
		[[ -z $other ]] || summary+=", $other in $v"
		if ((${#times[@]})); then
			mapfile -t sorted < <(printf '%s\n' "${times[@]}" | sort -n)
			summary+=", dialer start to direct median ${sorted[$((${#sorted[@]} / 2))]} ms, max ${sorted[-1]} ms"
		fi
		echo "== $summary"
	done
}
