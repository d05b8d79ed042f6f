#!/usr/bin/env bash
# natlab-selftest.sh - prove that every natlab KIND and option behaves as
# documented in scripts/lab/README.md.  Needs root; runs in well under two
# minutes; exits non-zero if any check fails.  Prints one line per check and
# a final "N passed, N failed" line.
#
# All traffic stays inside the lab namespaces created here (203.0.113.0/24,
# 10.0.x.0/24, 100.64.x.0/24).  Every lab is torn down by an EXIT trap, also
# on failure or Ctrl-C.
# Conditions are passed to check() as `bash -c '[[ ... $1 ... ]]' _ args`:
# the single quotes are intentional (the snippet expands its own $1..$n).
# shellcheck disable=SC2016
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
NATLAB=$HERE/natlab.sh
PROBE=$HERE/lab/probe.py
if [[ -x /usr/bin/python3 ]]; then PY=/usr/bin/python3; else PY=$(command -v python3); fi
# Lab names: a prefix unlikely to be used by parallel test suites.
P=${NATLAB_SELFTEST_PREFIX:-zt}
RV=203.0.113.10
# Reproducible loss/jitter draws in the impairment shims.
export NATLAB_SEED=${NATLAB_SEED:-1}
RV2=203.0.113.11
LABS=()
PASSED=0
FAILED=0
START=$(date +%s)

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
	local l
	for l in "${LABS[@]}"; do "$NATLAB" down "$l" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
# set -e aborts on an unexpected error: say where, then the EXIT trap cleans up.
trap 'echo "FAIL selftest aborted: line $LINENO: $BASH_COMMAND (exit $?)"' ERR
trap 'exit 130' INT TERM

ok() {
	PASSED=$((PASSED + 1))
	printf 'ok   %-58s %s\n' "$1" "${2:-}"
}
fail() {
	FAILED=$((FAILED + 1))
	printf 'FAIL %-58s %s\n' "$1" "${2:-}"
}
# check DESC DETAIL CMD...: pass if CMD succeeds
check() {
	local desc=$1 detail=$2
	shift 2
	if "$@"; then ok "$desc" "$detail"; else fail "$desc" "$detail"; fi
}

lx() {
	local lab=$1 host=$2
	shift 2
	"$NATLAB" exec "$lab" "$host" -- "$@"
}
probe() {
	local lab=$1 host=$2
	shift 2
	lx "$lab" "$host" "$PY" "$PROBE" "$@"
}
# jq-less JSON field access
jget() { "$PY" -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval("d"+sys.argv[2]))' "$1" "$2"; }

start_reflect() {
	# Bounded lifetime: the server stops by itself even if down never runs.
	"$NATLAB" exec "$1" rv -- setsid "$PY" "$PROBE" reflect \
		--udp $RV:3478 --udp $RV:3479 --udp $RV2:3478 --tcp $RV:443 --duration 170 \
		</dev/null >/dev/null 2>&1 &
}

wait_reflect() {
	local i
	for ((i = 0; i < 50; i++)); do
		probe "$1" rv map --port 1 --server $RV:3478 >/dev/null 2>&1 && return 0
		sleep 0.1
	done
	return 1
}

# --------------------------------------------------------------------------
# labs (brought up in parallel: proves several labs coexist)
# --------------------------------------------------------------------------
declare -A SPEC=(
	[${P}1]="--a full --b addr"
	[${P}2]="--a port --b sym"
	[${P}3]="--a cgnat --b udpblock"
	[${P}4]="--a open --b full --udp-timeout 3"
	[${P}5]="--a port --same-nat --hairpin on"
	[${P}6]="--a full --same-nat"
	[${P}7]="--a port --b open --delay 40 --loss 10"
	[${P}8]="--a sym --b port --delay 20 --jitter 10 --rate 2mbit"
	[${P}9]="--a early --b port"
)
for l in "${!SPEC[@]}"; do "$NATLAB" down "$l" >/dev/null 2>&1 || true; done
echo "# bringing up ${#SPEC[@]} labs in parallel"
t0=$EPOCHREALTIME
declare -A UPPID=()
for l in "${!SPEC[@]}"; do
	LABS+=("$l")
	# shellcheck disable=SC2086 # SPEC values are option lists
	"$NATLAB" up "$l" ${SPEC[$l]} >"/tmp/natlab-selftest-$l.log" 2>&1 &
	UPPID[$l]=$!
done
for l in "${!SPEC[@]}"; do
	if wait "${UPPID[$l]}"; then ok "up $l (${SPEC[$l]})"; else fail "up $l (${SPEC[$l]})" "$(tail -3 "/tmp/natlab-selftest-$l.log")"; fi
	rm -f "/tmp/natlab-selftest-$l.log"
done
echo "# labs up in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')s"
for l in "${LABS[@]}"; do start_reflect "$l"; done
for l in "${LABS[@]}"; do wait_reflect "$l" || fail "reflect server in $l"; done

# --------------------------------------------------------------------------
# (1) mapping and (2) filtering per KIND
# --------------------------------------------------------------------------
echo "# (1) mapping: one socket -> $RV:3478, $RV:3479, $RV2:3478"
# mapping_test LAB HOST KIND
mapping_test() {
	local lab=$1 host=$2 kind=$3 out m1 m2 m3 self
	out=$(probe "$lab" "$host" map --port 40000 --server $RV:3478 --server $RV:3479 --server $RV2:3478 || true)
	m1=$(jget "$out" "['$RV:3478']" 2>/dev/null || echo None)
	m2=$(jget "$out" "['$RV:3479']" 2>/dev/null || echo None)
	m3=$(jget "$out" "['$RV2:3478']" 2>/dev/null || echo None)
	local d="$m1 $m2 $m3"
	case $kind in
	udpblock)
		check "$kind: UDP gets no answer" "$d" [ "$m1" = None ] ;;
	sym)
		check "$kind: mapping differs per destination (APDM)" "$d" \
			bash -c '[[ $1 != None && $1 != "$2" && $2 != "$3" && $1 != "$3" ]]' _ "$m1" "$m2" "$m3" ;;
	open)
		self=$("$NATLAB" addr "$lab" "$host"):40000
		check "$kind: no translation" "$d" bash -c '[[ $1 == "$4" && $2 == "$4" && $3 == "$4" ]]' _ "$m1" "$m2" "$m3" "$self" ;;
	*)
		check "$kind: same mapping for all destinations (EIM)" "$d" \
			bash -c '[[ $1 != None && $1 == "$2" && $2 == "$3" ]]' _ "$m1" "$m2" "$m3" ;;
	esac
}
echo "# (2) filtering: talk to $RV:3478 only, then $RV:3478 / $RV:3479 / $RV2:3478 send to the mapping"
# filter_test LAB HOST KIND expect_same_ip_other_port expect_other_ip
filter_test() {
	local lab=$1 host=$2 kind=$3 e_port=$4 e_ip=$5 out same port ip
	out=$(probe "$lab" "$host" filter --port 40001 --server $RV:3478 \
		--poke $RV:3478 --poke $RV:3479 --poke $RV2:3478 || true)
	same=$(jget "$out" "['received']['$RV:3478']" 2>/dev/null || echo None)
	port=$(jget "$out" "['received']['$RV:3479']" 2>/dev/null || echo None)
	ip=$(jget "$out" "['received']['$RV2:3478']" 2>/dev/null || echo None)
	check "$kind: filtering same=True port=$e_port ip=$e_ip" "got same=$same port=$port ip=$ip" \
		bash -c '[[ $1 == True && $2 == "$3" && $4 == "$5" ]]' _ "$same" "$port" "$e_port" "$ip" "$e_ip"
}
mapping_test "${P}4" a open
filter_test "${P}4" a open True True
mapping_test "${P}1" a full
filter_test "${P}1" a full True True
mapping_test "${P}1" b addr
filter_test "${P}1" b addr True False
mapping_test "${P}2" a port
filter_test "${P}2" a port False False
mapping_test "${P}2" b sym
filter_test "${P}2" b sym False False
mapping_test "${P}3" a cgnat
filter_test "${P}3" a cgnat False False
mapping_test "${P}9" a early
filter_test "${P}9" a early False False

# --------------------------------------------------------------------------
# (8) early: an unsolicited packet takes the public port for its sender
# --------------------------------------------------------------------------
echo "# (8) early: a socket maps via $RV:3478, then $RV:3480 sends to that mapping unsolicited, then the socket sends to $RV:3480"
# early_poke LAB HOST -> the host's mapping (socket port 44000), poked from $RV:3480
early_poke() {
	local m
	m=$(probe "$1" "$2" map --port 44000 --server $RV:3478 || true)
	m=$(jget "$m" "['$RV:3478']" 2>/dev/null || echo None)
	# From rv's port 3480 (nothing answers: NOACK), before the host ever sent there.
	probe "$1" rv send --port 3480 --to "$m" --count 1 >/dev/null 2>&1 || true
	echo "$m"
}
early_pa=$(early_poke "${P}9" a)
early_pb=$(early_poke "${P}9" b)
n=$(lx "${P}9" nata conntrack -L -p udp --orig-src $RV --orig-port-src 3480 2>/dev/null | grep -c UNREPLIED || true)
check "early: the unsolicited packet left conntrack state in nata" "entries=$n" [ "$n" = 1 ]
n=$(lx "${P}9" natb conntrack -L -p udp --orig-src $RV --orig-port-src 3480 2>/dev/null | grep -c . || true)
check "port: the unsolicited packet left no state in natb (silent drop)" "entries=$n" [ "$n" = 0 ]
"$NATLAB" exec "${P}9" rv -- setsid "$PY" "$PROBE" reflect --udp $RV:3480 --duration 10 \
	</dev/null >/dev/null 2>&1 &
for ((i = 0; i < 50; i++)); do
	probe "${P}9" rv map --port 2 --server $RV:3480 >/dev/null 2>&1 && break
	sleep 0.1
done
out=$(probe "${P}9" a map --port 44000 --server $RV:3478 --server $RV:3480 || true)
m1=$(jget "$out" "['$RV:3478']" 2>/dev/null || echo None)
m2=$(jget "$out" "['$RV:3480']" 2>/dev/null || echo None)
check "early: the poked remote gets a new public port, the others keep it" "$early_pa then $m1 / $m2" \
	bash -c '[[ $1 != None && $1 == "$2" && $3 != None && $3 != "$2" && ${3%:*} == "${2%:*}" ]]' _ "$early_pa" "$m1" "$m2"
out=$(probe "${P}9" b map --port 44000 --server $RV:3478 --server $RV:3480 || true)
m1=$(jget "$out" "['$RV:3478']" 2>/dev/null || echo None)
m2=$(jget "$out" "['$RV:3480']" 2>/dev/null || echo None)
check "port: the same poke changes nothing (EIM kept)" "$early_pb then $m1 / $m2" \
	bash -c '[[ $1 != None && $1 == "$2" && $2 == "$3" ]]' _ "$early_pb" "$m1" "$m2"

# --------------------------------------------------------------------------
# (4) udpblock
# --------------------------------------------------------------------------
echo "# (4) udpblock"
mapping_test "${P}3" b udpblock
out=$(probe "${P}3" b tcp --to $RV:443 || true)
check "udpblock: TCP 443 connects" "$out" bash -c '[[ $1 == HELLO* ]]' _ "$out"

# --------------------------------------------------------------------------
# hole punching matrix (sanity of the NAT models end to end)
# --------------------------------------------------------------------------
echo "# hole punching a<->b via rendezvous (REG/GET on rv)"
punch_test() {
	local lab=$1 expect=$2 desc=$3 oa ob pa
	probe "$lab" a punch --port 7000 --server $RV:3478 --name a --peer b --duration 3 >"/tmp/natlab-punch-$lab" 2>&1 &
	pa=$!
	ob=$(probe "$lab" b punch --port 7001 --server $RV:3478 --name b --peer a --duration 3 2>&1 || true)
	wait "$pa" || true
	oa=$(cat "/tmp/natlab-punch-$lab")
	rm -f "/tmp/natlab-punch-$lab"
	local got=FAIL
	[[ $oa == "PUNCH OK"* && $ob == "PUNCH OK"* ]] && got=OK
	check "punch $desc -> $expect" "a: $oa | b: $ob" [ "$got" = "$expect" ]
}
punch_test "${P}1" OK "full <-> addr"
punch_test "${P}2" FAIL "port <-> sym"
punch_test "${P}4" OK "open <-> full"

# --------------------------------------------------------------------------
# (3) hairpin with --same-nat
# --------------------------------------------------------------------------
echo "# (3) hairpin: b registers, a sends to b's public mapping"
hairpin_test() {
	local lab=$1 expect=$2 lp mb ma got out i
	: >"/tmp/natlab-hp-$lab"
	probe "$lab" b listen --port 5000 --register $RV:3478 --wait 2 >"/tmp/natlab-hp-$lab" 2>&1 &
	lp=$!
	for ((i = 0; i < 30; i++)); do
		mb=$(awk '/^MAPPED/{print $2}' "/tmp/natlab-hp-$lab")
		[[ -n $mb ]] && break
		sleep 0.05
	done
	out=$(probe "$lab" a send --port 6000 --register $RV:3478 --to "$mb" || true)
	wait "$lp" || true
	ma=$(awk '/^MAPPED/{print $2}' <<<"$out")
	got=$(awk '/^GOT/{print $2; exit}' "/tmp/natlab-hp-$lab")
	rm -f "/tmp/natlab-hp-$lab"
	if [[ $expect == on ]]; then
		check "hairpin on: delivered, source = a's public mapping" "b=$mb a=$ma b saw=${got:-nothing}" \
			bash -c '[[ -n $1 && $1 == "$2" ]]' _ "$got" "$ma"
	else
		check "hairpin off: not delivered" "b=$mb a=$ma b saw=${got:-nothing}" [ -z "$got" ]
	fi
}
hairpin_test "${P}5" on
punch_test "${P}5" OK "same NAT (port), hairpin on"
hairpin_test "${P}6" off
out=$("$NATLAB" addr "${P}5" b)
check "same-nat: b is on a's LAN" "$out" [ "$out" = 10.0.1.3 ]

# --------------------------------------------------------------------------
# (5) flush = NAT rebinding; block/unblock
# --------------------------------------------------------------------------
echo "# (5) flush: same inside socket before/after flush gets a new public port"
flush_test() {
	local lab=$1 host=$2 nat=$3 kind=$4 m1 m2
	m1=$(probe "$lab" "$host" map --port 41000 --server $RV:3478 || true)
	m1=$(jget "$m1" "['$RV:3478']" 2>/dev/null || echo None)
	"$NATLAB" flush "$lab" "$nat" >/dev/null || fail "natlab.sh flush $lab $nat"
	m2=$(probe "$lab" "$host" map --port 41000 --server $RV:3478 || true)
	m2=$(jget "$m2" "['$RV:3478']" 2>/dev/null || echo None)
	check "flush $kind ($nat): new public port" "$m1 -> $m2" \
		bash -c '[[ $1 != None && $2 != None && $1 != "$2" ]]' _ "$m1" "$m2"
}
flush_test "${P}1" a nata full
flush_test "${P}1" b natb addr
flush_test "${P}2" a nata port
flush_test "${P}3" a nata "cgnat(home)"
flush_test "${P}3" a cgnata "cgnat(carrier)"

echo "# block / unblock"
m1=$(probe "${P}2" a map --port 42000 --server $RV:3478 || true)
"$NATLAB" block "${P}2" nata >/dev/null || fail "natlab.sh block"
m2=$(probe "${P}2" a map --port 42000 --server $RV:3478 || true)
"$NATLAB" unblock "${P}2" nata >/dev/null || fail "natlab.sh unblock"
m3=$(probe "${P}2" a map --port 42000 --server $RV:3478 || true)
m1=$(jget "$m1" "['$RV:3478']" 2>/dev/null || echo None)
m2=$(jget "$m2" "['$RV:3478']" 2>/dev/null || echo None)
m3=$(jget "$m3" "['$RV:3478']" 2>/dev/null || echo None)
check "block: UDP through nata dropped" "$m2" [ "$m2" = None ]
check "unblock: UDP flows again, mapping kept" "$m1 -> $m3" bash -c '[[ $1 != None && $1 == "$2" ]]' _ "$m1" "$m3"

echo "# --udp-timeout 3 (full cone on ${P}4 natb): sysctls + idle mapping expiry"
out=$(lx "${P}4" natb sysctl -n net.netfilter.nf_conntrack_udp_timeout net.netfilter.nf_conntrack_udp_timeout_stream | paste -sd' ')
check "udp-timeout: conntrack sysctls set in natb" "$out" [ "$out" = "3 3" ]
m1=$(probe "${P}4" b map --port 43000 --server $RV:3478 || true)
m1=$(jget "$m1" "['$RV:3478']" 2>/dev/null || echo None)
sleep 4.2
n=$(lx "${P}4" natb nft list map ip natlab eim_in | grep -c ' : 10.0.2.2 . 43000' || true)
check "udp-timeout: idle mapping expired from eim_in" "entries=$n" [ "$n" = 0 ]
m2=$(probe "${P}4" b map --port 43000 --server $RV:3478 || true)
m2=$(jget "$m2" "['$RV:3478']" 2>/dev/null || echo None)
check "udp-timeout: new mapping after idle period" "$m1 -> $m2" bash -c '[[ $1 != None && $2 != None && $1 != "$2" ]]' _ "$m1" "$m2"

# --------------------------------------------------------------------------
# (6) impairment
# --------------------------------------------------------------------------
echo "# (6) impairment (per link: RTT +delay, each direction loses loss%)"
out=$(probe "${P}1" a rtt --to $RV:3478 --count 50 --interval 0.005 || true)
base=$(jget "$out" "['median_ms']" 2>/dev/null || echo 999)
check "baseline a->rv RTT < 5 ms (no impairment)" "median=${base}ms" \
	"$PY" -c 'import sys; sys.exit(0 if float(sys.argv[1]) < 5 else 1)' "$base"

out=$(probe "${P}7" a rtt --to $RV:3478 --count 400 --interval 0.005 --drain 0.5 || true)
med=$(jget "$out" "['median_ms']" 2>/dev/null || echo 0)
loss=$(jget "$out" "['loss_pct']" 2>/dev/null || echo 0)
check "--delay 40: a->rv RTT ~40 ms (one impaired link)" "median=${med}ms" \
	"$PY" -c 'import sys; sys.exit(0 if 38 <= float(sys.argv[1]) <= 50 else 1)' "$med"
check "--loss 10: a->rv round-trip loss ~19% (=1-0.9^2)" "loss=${loss}%" \
	"$PY" -c 'import sys; sys.exit(0 if 10 <= float(sys.argv[1]) <= 29 else 1)' "$loss"
stats=$(cat "/run/natlab/${P}7/impair-a.json" 2>/dev/null || echo '{}')
check "--loss 10: shim dropped ~10% per direction" "$("$PY" -c '
import json,sys
d=json.loads(sys.argv[1])["directions"]
print(" ".join("%s:%d/%d" % (k.split(":")[1].split("->")[0], v.get("lost",0), v.get("rx",0)) for k,v in d.items()))' "$stats" 2>/dev/null)" \
	"$PY" -c '
import json,sys
d=json.loads(sys.argv[1])["directions"]
r=[v.get("lost",0)/v["rx"] for v in d.values() if v.get("rx",0) >= 200]
sys.exit(0 if len(r) == 2 and all(0.04 <= x <= 0.16 for x in r) else 1)' "$stats"
# b is "open" in this lab, so a->b crosses both impaired uplinks.
# (this server stops by itself after 8 s, or is killed by `down`)
"$NATLAB" exec "${P}7" b -- setsid "$PY" "$PROBE" reflect --udp 203.0.113.32:3478 --duration 8 \
	</dev/null >/dev/null 2>&1 &
sleep 0.3
out=$(probe "${P}7" a rtt --to 203.0.113.32:3478 --count 100 --interval 0.005 --drain 0.5 || true)
med=$(jget "$out" "['median_ms']" 2>/dev/null || echo 0)
check "--delay 40: peer a <-> peer b RTT ~80 ms (two links)" "median=${med}ms" \
	"$PY" -c 'import sys; sys.exit(0 if 78 <= float(sys.argv[1]) <= 92 else 1)' "$med"
punch_test "${P}7" OK "port <-> open with 40 ms / 10% loss"

out=$(probe "${P}8" b rtt --to $RV:3478 --count 200 --interval 0.005 --drain 0.5 || true)
# The 95th percentile, not the maximum: the shim is a user-space program, and on a loaded
# machine one reply in 200 held up by the scheduler (46.6 ms once in CI) is not the jitter.
check "--delay 20 --jitter 10: RTT within 20+-10 ms, spread >= 8 ms" "$out" "$PY" -c '
import json,sys
d=json.loads(sys.argv[1])
sys.exit(0 if 9.5 <= d["min_ms"] and d["p95_ms"] <= 36 and d["p95_ms"]-d["min_ms"] >= 8 and 15 <= d["median_ms"] <= 25 else 1)' "$out"
out=$(probe "${P}8" b rtt --to $RV:3478 --count 40 --interval 0.02 --size 3000 --drain 0.5 || true)
check "shim keeps packets intact (3000 B datagrams = IP fragments)" "$out" "$PY" -c '
import json,sys
d=json.loads(sys.argv[1]); sys.exit(0 if d["received"] >= 38 and d["corrupt"] == 0 else 1)' "$out"
probe "${P}8" rv sink --port 9000 --idle 1 --max-wait 6 >/tmp/natlab-sink-$$ 2>&1 &
sp=$!
sleep 0.3
probe "${P}8" b blast --to $RV:9000 --count 600 --pps 500 --size 1200 >/dev/null || true
wait "$sp" || true
out=$(cat /tmp/natlab-sink-$$)
rm -f /tmp/natlab-sink-$$
check "--rate 2mbit: 4.8 Mbit/s offered, ~2 Mbit/s delivered (tbf)" "$out" "$PY" -c '
import json,sys
d=json.loads(sys.argv[1]); sys.exit(0 if 1.6 <= d.get("mbit_s",0) <= 2.4 else 1)' "$out"

# --------------------------------------------------------------------------
# (7) down leaves nothing behind
# --------------------------------------------------------------------------
echo "# (7) down"
pids=()
for l in "${LABS[@]}"; do
	while read -r n _; do
		[[ $n == "$l"-* ]] || continue
		while read -r p; do [[ -n $p ]] && pids+=("$p"); done < <(ip netns pids "$n")
	done < <(ip netns list)
done
check "labs had processes running (reflect servers, shims)" "${#pids[@]} pids" [ "${#pids[@]}" -ge "${#LABS[@]}" ]
for l in "${LABS[@]}"; do "$NATLAB" down "$l" || fail "natlab.sh down $l"; done
left=$(ip netns list | awk '{print $1}' | grep -E "^${P}[0-9]-" || true)
check "down: no lab namespace left" "${left:-none}" [ -z "$left" ]
alive=()
for p in "${pids[@]}"; do
	if [[ -e /proc/$p ]] && [[ $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) != Z ]]; then alive+=("$p"); fi
done
check "down: every lab process gone" "alive: ${alive[*]:-none}" [ "${#alive[@]}" = 0 ]
check "down: state dirs removed" "" bash -c '! ls -d /run/natlab/'"${P}"'[0-9] 2>/dev/null | grep -q .'
check "down: idempotent on an absent lab" "" "$NATLAB" down "${P}1"
LABS=()

echo "# selftest took $(($(date +%s) - START))s"
echo "$PASSED passed, $FAILED failed"
exit $((FAILED == 0 ? 0 : 1))
