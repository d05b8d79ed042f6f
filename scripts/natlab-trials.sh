#!/usr/bin/env bash
# natlab-trials.sh - repeated connection trials of one NAT pair in the lab, with the real
# binaries: how often the dialer's connection goes direct, and how soon.
#
#   natlab-trials.sh --a KIND --b KIND [--trials N] [--impaired] [--timeout S]
#                    [--peer-args "ARGS"] [--keep-failed DIR] [--listener-measured]
#
# Each trial brings up a fresh lab (scripts/natlab.sh up; --impaired adds --delay 40 --loss 10
# on both NAT uplinks), starts the rendezvous on LAB-rv (RFC 5780 discovery on 203.0.113.11 and
# port 7001, as the NAT matrix does), a listener on LAB-a and a dialer on LAB-b (`peer connect`),
# and waits at most --timeout seconds (default 10) for the dialer's path to settle: `direct`
# (with the time from the dialer's start to the direct path) or `relayed` (punching gave up).
# --peer-args are given to both peers' commands (e.g. "--opening-ttl off" shows a pair without opening
# probes). --keep-failed DIR keeps the logs of every trial that did not go direct (DIR/N/:
# rendezvous, listener a, dialer b). --listener-measured starts the dialer only once the
# listener has measured its NAT and told the rendezvous (its `NAT measured` line, -v), as a
# listener that has been up for a while has: the dialer then gets the listener's NAT profile
# with the introduction. Without it the dialer connects right after the listener registered,
# before it measured (the pessimistic case). Prints one line per trial and a summary line; the lab is
# torn down after every trial,
# also on failure or Ctrl-C. Needs root and the debug binaries (cargo build -p peer -p
# rendezvous; $CARGO_TARGET_DIR is honoured).
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$HERE/.." && pwd)
NATLAB=$HERE/natlab.sh
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET == /* ]] || TARGET=$ROOT/$TARGET
BIN=$TARGET/debug
RV=203.0.113.10:7000

A="" B="" TRIALS=20 IMPAIRED=0 TIMEOUT=10 PEER_ARGS="" KEEP="" MEASURED=0
while (($#)); do
	case $1 in
	--a) A=${2:?}; shift 2 ;;
	--b) B=${2:?}; shift 2 ;;
	--trials) TRIALS=${2:?}; shift 2 ;;
	--impaired) IMPAIRED=1; shift ;;
	--timeout) TIMEOUT=${2:?}; shift 2 ;;
	--peer-args) PEER_ARGS=${2?}; shift 2 ;;
	--keep-failed) KEEP=${2:?}; shift 2 ;;
	--listener-measured) MEASURED=1; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "natlab-trials: unknown option '$1'" >&2; exit 2 ;;
	esac
done
[[ -n $A && -n $B ]] || { echo "natlab-trials: --a KIND and --b KIND are required" >&2; exit 2; }
[[ $TRIALS =~ ^[1-9][0-9]*$ ]] || { echo "natlab-trials: --trials must be a positive integer" >&2; exit 2; }
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || { echo "natlab-trials: --timeout must be a positive integer" >&2; exit 2; }
((EUID == 0)) || { echo "natlab-trials: must run as root" >&2; exit 1; }
for b in peer rendezvous; do
	[[ -x $BIN/$b ]] || { echo "natlab-trials: $BIN/$b missing (cargo build -p peer -p rendezvous)" >&2; exit 1; }
done
read -r -a EXTRA <<<"$PEER_ARGS"
LISTENER_ARGS=()
# (-v for its `NAT measured` line, unless --peer-args has it already)
if ((MEASURED)) && [[ " ${EXTRA[*]} " != *" -v "* && " ${EXTRA[*]} " != *" --verbose "* ]]; then
	LISTENER_ARGS=(-v)
fi

LAB=tr$$
LAB=${LAB:0:6}
WORK=$(mktemp -d /tmp/natlab-trials.XXXXXX)
PIDS=()
# shellcheck disable=SC2317 # invoked by traps
stop_all() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	PIDS=()
	"$NATLAB" down "$LAB" >/dev/null 2>&1 || true
}
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM

# wait_for FILE REGEX SECONDS: the first matching line, or nothing after SECONDS.
wait_for() {
	local file=$1 re=$2 end line
	end=$(($(date +%s%N) + $3 * 1000000000))
	while (($(date +%s%N) < end)); do
		line=$(grep -m1 -E "$re" "$file" 2>/dev/null || true)
		if [[ -n $line ]]; then
			printf '%s\n' "$line"
			return 0
		fi
		sleep 0.02
	done
	return 1
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

direct=0 relayed=0 other=0
times=()
impair=()
((IMPAIRED)) && impair=(--delay 40 --loss 10)
for ((t = 1; t <= TRIALS; t++)); do
	dir=$WORK/$t
	mkdir -p "$dir"
	"$NATLAB" up "$LAB" --a "$A" --b "$B" "${impair[@]}" >/dev/null
	ip netns exec "$LAB-rv" "$BIN/rendezvous" serve --listen $RV --data-dir "$dir/rv" \
		--stun-alt-port 7001 --stun-alt-ip 203.0.113.11 --tcp-listen off \
		</dev/null >"$dir/rv.out" 2>"$dir/rv.err" &
	PIDS+=($!)
	key=$(wait_for "$dir/rv.out" '^server key ' 20 | awk '{print $3}') || true
	[[ -n $key ]] || { echo "trial $t: the rendezvous did not start: $(tail -3 "$dir/rv.err")" >&2; exit 1; }
	# The peers' standard input (chat ends at its end) is a FIFO this script holds open.
	mkfifo "$dir/in"
	exec 3<>"$dir/in"
	ip netns exec "$LAB-a" "$BIN/peer" --config-dir "$dir/a" listen "${EXTRA[@]}" "${LISTENER_ARGS[@]}" --server $RV \
		--server-key "$key" <"$dir/in" >"$dir/a.out" 2>"$dir/a.err" &
	PIDS+=($!)
	id=$(wait_for "$dir/a.out" '^peer id ' 20 | awk '{print $3}') || true
	[[ -n $id ]] || { echo "trial $t: the listener did not start: $(tail -3 "$dir/a.err")" >&2; exit 1; }
	wait_for "$dir/a.out" '^registered with ' 20 >/dev/null || true
	if ((MEASURED)); then
		wait_for "$dir/a.err" '^NAT measured: ' 20 >/dev/null ||
			echo "trial $t: the listener did not say it measured its NAT" >&2
	fi
	start=$(now_ms)
	ip netns exec "$LAB-b" "$BIN/peer" --config-dir "$dir/b" connect "$id" "${EXTRA[@]}" \
		--server $RV --server-key "$key" <"$dir/in" >"$dir/b.out" 2>"$dir/b.err" &
	PIDS+=($!)
	line=$(wait_for "$dir/b.out" "(connected to $id in [0-9]+ ms: direct to |path to $id: direct to |no direct path: )" "$TIMEOUT") || line=""
	ms=$(($(now_ms) - start))
	case $line in
	*"direct to "*)
		direct=$((direct + 1))
		times+=("$ms")
		echo "trial $t: direct after $ms ms (${line##*direct to })"
		;;
	*"no direct path"*)
		relayed=$((relayed + 1))
		echo "trial $t: relayed (${line##*no direct path: })"
		;;
	*)
		other=$((other + 1))
		echo "trial $t: no path settled within ${TIMEOUT} s; the dialer's last line: $(tail -1 "$dir/b.out" 2>/dev/null)"
		;;
	esac
	stop_all
	exec 3>&-
	if [[ -n $KEEP && $line != *"direct to "* ]]; then
		mkdir -p "$KEEP"
		cp -r "$dir" "$KEEP/$t"
		rm -f "$KEEP/$t/in"
	fi
done
median=-
if ((${#times[@]})); then
	median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
	max=$(printf '%s\n' "${times[@]}" | sort -n | tail -1)
	median="$median ms (max $max ms)"
fi
impairment=clean
((IMPAIRED)) && impairment="delay 40 ms, loss 10 %"
echo "listener $A / dialer $B, $impairment, peer args '${PEER_ARGS}': direct $direct/$TRIALS, relayed $relayed, unsettled $other; median time to direct $median"
