#!/usr/bin/env bash
# iroh-matrix.sh - which NAT pairs of the lab matrix go direct, and how soon: ours and iroh side
# by side, in the same lab instance per trial (issue 16).
#
#   iroh-matrix.sh [--kinds "open full ..."] [--pairs "a/b a/b ..."] [--trials N] [--impaired]
#                  [--timeout S] [--keep DIR] [--fresh-listener]
#
# For every ordered pair (listener's NAT kind / dialer's NAT kind; default: every pair of
# --kinds, default "open full addr port sym cgnat early"), each trial brings up a fresh lab
# (scripts/natlab.sh; --impaired adds 40 ms delay and 10 % loss on both NAT uplinks), starts our
# rendezvous (RFC 5780 discovery on a second IP and port, as the NAT matrix does) and an
# iroh-relay in dev mode on LAB-rv, then:
#   - ours: `peer listen` on LAB-a, `peer connect ID` on LAB-b once the listener has measured its
#     NAT (its `NAT measured` line: a listener that has been up for a while, as listeners are;
#     --fresh-listener dials as soon as it is registered); direct when the dialer prints its
#     direct path within --timeout seconds (default 10) of its start;
#   - iroh: `bench-iroh listen` on LAB-a, `bench-iroh dial` on LAB-b (relay URL only, no direct
#     addresses, no address lookup); direct when a direct path is selected within the same time
#     of the dialer's start (its JSON: online_ms + direct_ms).
# Time to direct is from the dialer's process start for both (ours: registration and NAT
# measurement included; iroh: binding and connecting to its relay included).
# Prints one line per trial and system, then a markdown table (direct x/N and median ms per pair
# and system). Release binaries (built here; iroh in its own workspace under target/iroh).
# Needs root, nftables, python3 and the crates.io registry (first build of iroh).
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$HERE/.." && pwd)
NATLAB=$HERE/natlab.sh
# shellcheck source=lab/iroh.sh
source "$HERE/lab/iroh.sh"
RV=203.0.113.10:7000

KINDS="open full addr port sym cgnat early" PAIRS="" TRIALS=3 IMPAIRED=0 TIMEOUT=10 KEEP="" FRESH=0
while (($#)); do
	case $1 in
	--kinds) KINDS=${2:?}; shift 2 ;;
	--pairs) PAIRS=${2:?}; shift 2 ;;
	--trials) TRIALS=${2:?}; shift 2 ;;
	--impaired) IMPAIRED=1; shift ;;
	--timeout) TIMEOUT=${2:?}; shift 2 ;;
	--keep) KEEP=${2:?}; shift 2 ;;
	--fresh-listener) FRESH=1; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 0 ;;
	*) echo "iroh-matrix: unknown option '$1'" >&2; exit 2 ;;
	esac
done
[[ $TRIALS =~ ^[1-9][0-9]*$ ]] || { echo "iroh-matrix: --trials must be a positive integer" >&2; exit 2; }
[[ $TIMEOUT =~ ^[1-9][0-9]*$ ]] || { echo "iroh-matrix: --timeout must be a positive integer" >&2; exit 2; }
((EUID == 0)) || { echo "iroh-matrix: must run as root" >&2; exit 1; }
if [[ -z $PAIRS ]]; then
	for a in $KINDS; do for b in $KINDS; do PAIRS+="$a/$b "; done; done
fi

cargo build --release --quiet -p peer -p rendezvous --manifest-path "$ROOT/Cargo.toml"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET == /* ]] || TARGET=$ROOT/$TARGET
BIN=$TARGET/release
iroh_build

LAB=im$$
LAB=${LAB:0:6}
WORK=$(mktemp -d /tmp/iroh-matrix.XXXXXX)
PIDS=()
# shellcheck disable=SC2317 # invoked by traps
stop_all() {
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	PIDS=()
	"$NATLAB" down "$LAB" >/dev/null 2>&1 || true
}
# shellcheck disable=SC2317
finish() {
	stop_all
	if [[ -n $KEEP ]]; then mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/; fi
	rm -rf "$WORK"
}
trap finish EXIT
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

# ours DIR: one trial of ours; prints "direct MS", "relayed" or "unsettled".
ours() {
	local dir=$1 key id start line ms
	ip netns exec "$LAB-rv" "$BIN/rendezvous" serve --listen $RV --data-dir "$dir/rv" \
		--stun-alt-port 7001 --stun-alt-ip 203.0.113.11 --tcp-listen off \
		</dev/null >"$dir/rv.out" 2>"$dir/rv.err" &
	PIDS+=($!)
	key=$(wait_for "$dir/rv.out" '^server key ' 20 | awk '{print $3}') || true
	[[ -n $key ]] || { echo "the rendezvous did not start: $(tail -3 "$dir/rv.err")" >&2; return 1; }
	mkfifo "$dir/in"
	exec 3<>"$dir/in"
	ip netns exec "$LAB-a" "$BIN/peer" --config-dir "$dir/a" listen -v --server $RV \
		--server-key "$key" <"$dir/in" >"$dir/a.out" 2>"$dir/a.err" &
	PIDS+=($!)
	id=$(wait_for "$dir/a.out" '^peer id ' 20 | awk '{print $3}') || true
	[[ -n $id ]] || { echo "the listener did not start: $(tail -3 "$dir/a.err")" >&2; return 1; }
	wait_for "$dir/a.out" '^registered with ' 20 >/dev/null || true
	if ((!FRESH)); then
		wait_for "$dir/a.err" '^NAT measured: ' 30 >/dev/null ||
			echo "the listener did not say it measured its NAT" >&2
	fi
	start=$(now_ms)
	ip netns exec "$LAB-b" "$BIN/peer" --config-dir "$dir/b" connect "$id" \
		--server $RV --server-key "$key" <"$dir/in" >"$dir/b.out" 2>"$dir/b.err" &
	PIDS+=($!)
	# A first punch that fails is not the end: the dialer punches again (with birthday punching
	# once its own NAT is measured), so only a direct path within the time counts.
	line=$(wait_for "$dir/b.out" "(connected to $id in [0-9]+ ms: direct to |path to $id: direct to )" "$TIMEOUT") || line=""
	ms=$(($(now_ms) - start))
	exec 3>&-
	if [[ $line == *"direct to "* ]]; then
		echo "direct $ms"
	elif grep -q "relayed via" "$dir/b.out"; then
		echo relayed
	else
		echo unsettled
	fi
}

# iroh DIR: one trial of iroh; prints "direct MS", "relayed" or "unsettled".
iroh() {
	local dir=$1 id json
	iroh_relay_start "$LAB" "$dir" || return 1
	PIDS+=("$IROH_RELAY_PID")
	ip netns exec "$LAB-a" "$IROH_BENCH" listen "${IROH_ARGS[@]}" \
		</dev/null >"$dir/ia.out" 2>"$dir/ia.err" &
	PIDS+=($!)
	id=$(wait_for "$dir/ia.out" '^id ' 30 | awk '{print $2}') || true
	[[ -n $id ]] || { echo "the iroh listener did not start: $(tail -3 "$dir/ia.err")" >&2; return 1; }
	if ! ip netns exec "$LAB-b" timeout $((TIMEOUT + 30)) "$IROH_BENCH" dial "${IROH_ARGS[@]}" \
		--id "$id" --direct-wait-s "$TIMEOUT" </dev/null >"$dir/ib.out" 2>"$dir/ib.err"; then
		echo unsettled
		return 0
	fi
	json=$(grep '^{' "$dir/ib.out" | tail -1)
	python3 - "$json" "$TIMEOUT" <<-'PY'
		import json, sys
		d, timeout = json.loads(sys.argv[1]), float(sys.argv[2]) * 1000
		total = None if d["direct_ms"] is None else d["online_ms"] + d["direct_ms"]
		print(f"direct {total:.0f}" if total is not None and total <= timeout else "relayed")
	PY
}

impair=()
((IMPAIRED)) && impair=(--delay 40 --loss 10)
results=$WORK/results
: >"$results"
for pair in $PAIRS; do
	a=${pair%/*} b=${pair#*/}
	for ((t = 1; t <= TRIALS; t++)); do
		dir=$WORK/$a-$b-$t
		mkdir -p "$dir/ours" "$dir/iroh"
		"$NATLAB" up "$LAB" --a "$a" --b "$b" "${impair[@]}" >"$dir/lab.log" 2>&1
		# Not in a command substitution: the started processes must land in this shell's PIDS.
		ours "$dir/ours" >"$dir/ours/result" || echo error >"$dir/ours/result"
		stop_all
		"$NATLAB" up "$LAB" --a "$a" --b "$b" "${impair[@]}" >"$dir/lab.log" 2>&1
		iroh "$dir/iroh" >"$dir/iroh/result" || echo error >"$dir/iroh/result"
		stop_all
		r_ours=$(cat "$dir/ours/result") r_iroh=$(cat "$dir/iroh/result")
		echo "$a/$b trial $t: ours $r_ours, iroh $r_iroh"
		echo "$a $b ours $r_ours" >>"$results"
		echo "$a $b iroh $r_iroh" >>"$results"
	done
done

impairment=clean
((IMPAIRED)) && impairment="delay 40 ms, loss 10 % on both NAT uplinks"
python3 - "$results" "$TRIALS" "$TIMEOUT" "$impairment" <<'PY'
import collections, statistics, sys
path, trials, timeout, impairment = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
res = collections.defaultdict(list)
order = []
for line in open(path):
    a, b, system, *r = line.split()
    if (a, b) not in order:
        order.append((a, b))
    res[(a, b, system)].append(r)
def cell(rs):
    ms = [float(r[1]) for r in rs if r and r[0] == "direct"]
    n = f"{len(ms)}/{len(rs)}"
    return f"{n}, {statistics.median(ms):.0f} ms" if ms else f"{n}"
print()
print(f"Direct within {timeout} s of the dialer's start ({impairment}), {trials} trial(s) per pair; median time to direct")
print()
print("| listener / dialer | ours | iroh |")
print("|---|---|---|")
for a, b in order:
    print(f"| {a} / {b} | {cell(res[(a, b, 'ours')])} | {cell(res[(a, b, 'iroh')])} |")
PY
