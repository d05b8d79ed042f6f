#!/usr/bin/env bash
# The benchmark command (issue 7): release build, loopback and the NAT lab (needs root, nftables,
# python3). Prints one markdown table of ratios measured in this run, each against its target
# from DESIGN.md ("Performance targets"):
#
#   - direct goodput of our data plane / plain quinn and / plain TCP, 1 and 4 streams, on
#     loopback and on a lab link (two un-NATed lab hosts, veth links through the lab router);
#   - CPU seconds per GiB (client + server), ours / plain quinn (loopback, 1 and 4 streams);
#   - the product: `peer send` direct / plain quinn sending the same bytes on the same lab link
#     (the goodput lab's two un-NATed hosts, interleaved, neither pinned); `peer send` direct
#     (port-restricted NATs) and relayed (symmetric NATs) on identical lab links, relayed /
#     direct, with the relay's default rate limit and without, and relayed on relay channels
#     (plain UDP, the default) / on the relay stream (QUIC in QUIC);
#   - the rendezvous (loopback, pinned to one core, load generator on the other): registrations
#     per second, RSS per idle registered peer and CPU use with N peers kept alive; the same
#     load generator against a plain quinn + rustls server doing only the handshake (same
#     certificate type and crypto, `bench handshake-server`): registrations per server CPU
#     second / its handshakes per server CPU second, and its RSS per idle connection;
#   - connect time / floor (2 x RTT to the rendezvous + RTT between the peers: the handshake's
#     first round trip rides the introduction, then the first byte each way; RTTs measured with
#     ICMP inside the lab), median and p95, at 20 and 80 ms injected RTT between the peers.
#
#   scripts/bench.sh [--quick] [--size MB] [--keep] [--send-only] [--rv-only] [--connect-only]
#                    [--rv-peers N] [--iroh]
#
# Full run: about 3 minutes on 2 cores after the release build. --quick: small sizes, one run,
# 5 connects, 500 peers: about 30 s after the build, for CI (no timing is asserted anywhere; the
# script fails only if a measurement cannot be made). --size sets the `peer send` file size.
# --keep leaves the work directory (every program's output and log) in place. --send-only runs
# only the `peer send` rows (with the plain quinn goodput they are compared with): for work on
# the relay or on file transfer. --rv-only runs only the rendezvous rows (no
# lab; about a minute with the default 10,000 peers), --rv-peers N sets their peer count (at most
# 200,000; see docs/benchmarks.md for the memory it takes). --connect-only runs only the
# connect-time rows (with --iroh, iroh's first reply and time to direct beside them).
# --iroh adds iroh (the release in scripts/lab/iroh.sh, with its iroh-relay in dev mode on the
# rendezvous host, endpoints configured with that relay only) as a fourth contestant on the same
# lab links: direct goodput and CPU (1 and 4 streams, interleaved with the others), relayed
# goodput (symmetric NATs, iroh's relay / ours with the rate limit raised), and connect time
# (first reply, time to direct) at both delays. Its first build fetches and compiles iroh (minutes);
# the NAT pairs each system gets direct: scripts/iroh-matrix.sh.
# Results and what limits each missed target: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
keep=0
send_only=0
rv_only=0
connect_only=0
iroh=0
send_mb=100      # `peer send` file
runs=5           # repetitions of every goodput measurement (median)
loop_mb=1000     # MB per goodput test on loopback
lab_mb=1000      # MB per goodput test on the lab link
connects=20      # connects per delay
rv_peers=10000   # simulated peers for the rendezvous
rv_hold=30       # seconds they are kept alive
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) quick=1 send_mb=8 runs=1 loop_mb=200 lab_mb=100 connects=5 rv_peers=500 rv_hold=5 ;;
        --size) send_mb=${2:?--size needs MB}; shift ;;
        --keep) keep=1 ;;
        --send-only) send_only=1 ;;
        --rv-only) rv_only=1 ;;
        --connect-only) connect_only=1 ;;
        --rv-peers) rv_peers=${2:?--rv-peers needs a count}; shift ;;
        --iroh) iroh=1 ;;
        *) echo "usage: $0 [--quick] [--size MB] [--keep] [--send-only] [--rv-only] [--connect-only] [--rv-peers N] [--iroh]" >&2; exit 2 ;;
    esac
    shift
done
if [[ $(id -u) -ne 0 ]] || ! command -v nft >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
    echo "bench.sh needs root, nftables and python3 (it builds a network-namespace lab)" >&2
    exit 1
fi

started=$SECONDS
# BENCH_BIN=DIR measures the rendezvous, peer and bench binaries in DIR instead of building
# (an older build, for a before/after comparison in the same conditions).
if [[ -n ${BENCH_BIN:-} ]]; then
    bin=$BENCH_BIN
else
    cargo build --release --quiet -p rendezvous -p peer -p bench
    bin=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
if ((iroh)); then
    ROOT=$PWD
    # shellcheck source=lab/iroh.sh
    source scripts/lab/iroh.sh
    iroh_build
fi
work=$(mktemp -d /tmp/p2p-bench.XXXXXX)
results=$work/results.txt # "key value" lines, turned into the table at the end
labs=()
pids=() # processes outside the labs (`natlab.sh down` ends those inside a lab)
untrack() { # PID: it has been waited for; never signal a pid that may have been reused
    local left=() pid
    for pid in "${pids[@]}"; do [[ $pid == "$1" ]] || left+=("$pid"); done
    pids=("${left[@]}")
}
cleanup() {
    local pid lab
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    for lab in "${labs[@]}"; do scripts/natlab.sh down "$lab" >/dev/null 2>&1 || true; done
    if ((keep)); then echo "bench: work directory kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
# Lab names: unique per run (several runs may share a machine), 6 characters at most.
tag=$(printf '%03d' $(($$ % 1000)))

say() { echo "== $* ($((SECONDS - started)) s)" >&2; }
record() { echo "$1 $2" >>"$results"; }

wait_for() { # FILE PATTERN SECONDS
    local deadline=$((SECONDS + $3))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        ((SECONDS < deadline)) || { echo "bench: timed out waiting for '$2' in $1" >&2; cat "$1" >&2; exit 1; }
        sleep 0.05
    done
}

median() { sort -g | awk '{v[NR]=$1} END {if (NR == 0) exit 1; print v[int((NR + 1) / 2)]}'; }

json_field() { # FILE FIELD: the field of the last JSON line of FILE
    python3 -c 'import json,sys; print(json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])[sys.argv[2]])' "$1" "$2"
}

free_udp_port() {
    python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# ICMP echo RTT (median of N, ms) from inside a namespace: the lab has no ping binary.
cat >"$work/icmp_rtt.py" <<'EOF'
import os, socket, statistics, struct, sys, time
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
dst, n = sys.argv[1], int(sys.argv[2])
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(2)
ident, rtts = os.getpid() & 0xFFFF, []
for seq in range(n):
    body = b"bench-rtt-probe!"
    hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + body
    pkt = struct.pack("!BBHHH", 8, 0, csum(hdr), ident, seq) + body
    t0 = time.perf_counter()
    sock.sendto(pkt, (dst, 0))
    while True:
        try:
            data, _ = sock.recvfrom(2048)
        except socket.timeout:
            break
        ihl = (data[0] & 15) * 4
        kind, _, _, i, q = struct.unpack("!BBHHH", data[ihl:ihl + 8])
        if kind == 0 and i == ident and q == seq:
            rtts.append((time.perf_counter() - t0) * 1000)
            break
    time.sleep(0.05)
if not rtts:
    sys.exit("no ICMP answer from " + dst)
print(f"{statistics.median(rtts):.2f}")
EOF

if ((! rv_only && ! connect_only)); then
# ---------------------------------------------------------------- goodput: ours, quinn, TCP
"$bin/bench" keys --dir "$work/keys"
glab=kg$tag
scripts/natlab.sh up "$glab" --a open --b open >"$work/$glab.log" 2>&1
labs+=("$glab")

# gp WHERE MODE STREAMS MB [TAG [PIN]]: one goodput test; appends "bytes/s cpu_s(client+server)"
# to $work/gp-TAG-MODE-STREAMS (TAG defaults to WHERE). PIN 0: neither process pinned.
gp() {
    local where=$1 mode=$2 streams=$3 mb=$4 tag=${5:-$1} pin=${6:-1} listen bind srv=() cli=()
    local pin_srv=() pin_cli=()
    if ((pin)) && (($(nproc) >= 2)) && command -v taskset >/dev/null 2>&1; then
        # One core each: less scheduler noise, and the same for every mode.
        pin_srv=(taskset -c 0)
        pin_cli=(taskset -c 1)
    fi
    local sout=$work/gp-server.out cout=$work/gp-client.out
    if [[ $where == loop ]]; then
        listen=127.0.0.1:0
        bind=127.0.0.1:$(free_udp_port)
    else
        srv=(ip netns exec "$glab-a")
        cli=(ip netns exec "$glab-b")
        listen=203.0.113.31:9400
        bind=203.0.113.32:9401
    fi
    rm -f "$sout" "$cout"
    "${srv[@]}" "${pin_srv[@]}" timeout 300 "$bin/bench" server --mode "$mode" --listen "$listen" \
        --keys "$work/keys" --streams "$streams" --peer-addr "$bind" \
        >"$sout" 2>"$work/gp-server.log" </dev/null &
    local spid=$!
    if [[ $where == loop ]]; then pids+=("$spid"); fi
    wait_for "$sout" '^listening' 10
    local connect
    connect=$(sed -n 's/^listening //p' "$sout")
    "${cli[@]}" "${pin_cli[@]}" timeout 300 "$bin/bench" client --mode "$mode" --connect "$connect" --bind "$bind" \
        --keys "$work/keys" --bytes $((mb * 1000 * 1000)) --streams "$streams" \
        >"$cout" 2>"$work/gp-client.log" </dev/null ||
        { echo "bench: $mode client failed ($where, $streams streams)" >&2; cat "$work/gp-client.log" >&2; exit 1; }
    wait "$spid" || { echo "bench: $mode server failed" >&2; cat "$work/gp-server.log" >&2; exit 1; }
    untrack "$spid"
    python3 -c 'import sys; print(float(sys.argv[1]), float(sys.argv[2]) + float(sys.argv[3]))' \
        "$(json_field "$cout" bytes_per_s)" "$(json_field "$cout" cpu_s)" "$(json_field "$sout" cpu_s)" \
        >>"$work/gp-$tag-$mode-$streams"
}

# gp_iroh STREAMS MB: the same test with iroh on the lab link (listener on A, dialer on B, the
# listener's address given as in ours; the path must be direct before the clock starts).
gp_iroh() {
    local streams=$1 mb=$2 sout=$work/gi-server.out cout=$work/gi-client.out id
    local pin_srv=() pin_cli=()
    if (($(nproc) >= 2)) && command -v taskset >/dev/null 2>&1; then
        pin_srv=(taskset -c 0)
        pin_cli=(taskset -c 1)
    fi
    rm -f "$sout" "$cout"
    ip netns exec "$glab-a" "${pin_srv[@]}" timeout 300 "$IROH_BENCH" listen "${IROH_ARGS[@]}" \
        --bind 203.0.113.31:9400 >"$sout" 2>"$work/gi-server.log" </dev/null &
    local spid=$!
    wait_for "$sout" '^id ' 30
    id=$(sed -n 's/^id //p' "$sout")
    ip netns exec "$glab-b" "${pin_cli[@]}" timeout 300 "$IROH_BENCH" dial "${IROH_ARGS[@]}" \
        --id "$id" --addr 203.0.113.31:9400 --bind 203.0.113.32:9401 --bytes $((mb * 1000 * 1000)) \
        --streams "$streams" --direct-wait-s 5 >"$cout" 2>"$work/gi-client.log" </dev/null ||
        { echo "bench: iroh client failed ($streams streams)" >&2; cat "$work/gi-client.log" >&2; exit 1; }
    [[ $(json_field "$cout" path) == direct* ]] ||
        { echo "bench: iroh did not go direct on the lab link: $(cat "$cout")" >&2; exit 1; }
    wait_for "$sout" '^{' 20
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    python3 -c 'import sys; print(float(sys.argv[1]), float(sys.argv[2]) + float(sys.argv[3]))' \
        "$(json_field "$cout" bytes_per_s)" "$(json_field "$cout" cpu_s)" "$(json_field "$sout" cpu_s)" \
        >>"$work/gp-lab-iroh-$streams"
}
if ((iroh)); then
    iroh_relay_start "$glab" "$work/iroh-relay-gp"
    pids+=("$IROH_RELAY_PID")
fi

say "goodput: ${loop_mb} MB on loopback, ${lab_mb} MB on a lab link, median of $runs, quinn / ours / TCP interleaved"
for ((r = 0; r < runs; r++)); do
    if ((send_only)); then
        gp lab quinn 1 "$lab_mb"
        continue
    fi
    for where in loop lab; do
        mb=$loop_mb
        [[ $where == lab ]] && mb=$lab_mb
        for streams in 1 4; do
            for mode in quinn ours tcp; do
                gp "$where" "$mode" "$streams" "$mb"
            done
            if ((iroh)) && [[ $where == lab ]]; then gp_iroh "$streams" "$mb"; fi
        done
    done
done
# Per-run series (in run order): the table uses the median of the per-run ratios, each ratio taken
# between tests run back to back, which is what survives a shared, noisy machine best.
for f in "$work"/gp-lab-* $( ((send_only)) || echo "$work"/gp-loop-*); do
    key=${f##*/gp-}
    record "gp_$key" "$(cut -d' ' -f1 "$f" | paste -sd,)"
    record "cpu_$key" "$(cut -d' ' -f2 "$f" | paste -sd,)"
done
record gp_loop_mb "$loop_mb"

# ---------------------------------------------------------------- the product: peer send
# proc_cpu PID...: utime + stime of the processes, seconds
proc_cpu() {
    python3 -c 'import os, sys
tick = os.sysconf("SC_CLK_TCK")
total = 0
for pid in sys.argv[1:]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += (int(fields[11]) + int(fields[12])) / tick
print(total)' "$@"
}

# children_cpu_delta BEFORE AFTER: user + system CPU seconds of the children reaped between two
# outputs of bash's `times` (second line: children's "XmY.YYYs XmY.YYYs")
children_cpu_delta() {
    python3 -c 'import re, sys
def cpu(path):
    line = open(path).read().splitlines()[1]
    return sum(int(m) * 60 + float(s) for m, s in re.findall(r"(\d+)m([\d.]+)s", line))
print(cpu(sys.argv[2]) - cpu(sys.argv[1]))' "$1" "$2"
}

# send_goodput LAB KIND_A KIND_B [RENDEZVOUS OPTION...]: a lab of those NATs, then send_runs.
send_goodput() {
    local lab=$1 kind_a=$2 kind_b=$3
    shift 3
    mkdir -p "$work/$lab"
    scripts/natlab.sh up "$lab" --a "$kind_a" --b "$kind_b" >"$work/$lab.lab.log" 2>&1
    labs+=("$lab")
    send_runs "$lab" "$@"
}

# send_runs LAB [RENDEZVOUS OPTION...]: $runs `peer send` transfers from LAB-b to LAB-a (a
# rendezvous on LAB-rv) -> results send_LAB (median MB/s), send_series_LAB (each run's, in
# order), send_cpu_per_gb_LAB, path_LAB, send_failed_LAB. Both peers also get the options in the
# array peer_extra; the command in the array send_before_each runs before each transfer (another
# contestant, interleaved).
peer_extra=()
send_before_each=()
send_runs() {
    local lab=$1 dir="$work/$1"
    shift
    mkdir -p "$dir/recv"
    ip netns exec "$lab-rv" "$bin/rendezvous" serve --listen 203.0.113.10:7000 --data-dir "$dir/rv" \
        --tcp-listen off "$@" >"$dir/rv.out" 2>"$dir/rv.log" </dev/null &
    local rv_pid=$! # `ip netns exec` execs the program: the same pid
    wait_for "$dir/rv.out" "server key" 10
    local key id speeds=()
    key=$(sed -n 's/^server key //p' "$dir/rv.out")
    ip netns exec "$lab-a" "$bin/peer" --config-dir "$dir/a" listen --accept-files "$dir/recv" --allow-any \
        --server 203.0.113.10:7000 --server-key "$key" "${peer_extra[@]}" >"$dir/a.out" 2>"$dir/a.log" </dev/null &
    local a_pid=$!
    wait_for "$dir/a.out" "registered with" 10
    id=$(sed -n 's/^peer id //p' "$dir/a.out")
    local failed=0 cpu_before
    # CPU of all three processes over the transfers: the rendezvous and the receiver from /proc,
    # each sender from this shell's children's times (its SHA-256 pass included).
    cpu_before=$(proc_cpu "$rv_pid" "$a_pid")
    : >"$dir/sender-cpu"
    for ((i = 0; i < runs; i++)); do
        if ((${#send_before_each[@]})); then "${send_before_each[@]}"; fi
        rm -f "$dir/recv/payload.bin"
        # A fresh config dir each time: every transfer starts with the introduction (a cached
        # address would be dialed first, and fail behind a port-restricted NAT).
        times >"$dir/times-before" # this shell's children's CPU so far (`times` forks nothing)
        if ! ip netns exec "$lab-b" timeout 300 "$bin/peer" --config-dir "$dir/b$i" send "$id" "$work/payload.bin" \
            --server 203.0.113.10:7000 --server-key "$key" "${peer_extra[@]}" >"$dir/b.out" 2>"$dir/b.log" </dev/null; then
            times >"$dir/times-after"
            children_cpu_delta "$dir/times-before" "$dir/times-after" >>"$dir/sender-cpu"
            # Reported in the table, not hidden; one retry so that one failure does not void the run.
            echo "bench: peer send failed in $lab (run $i; retrying once):" >&2
            cat "$dir/b.out" "$dir/b.log" >&2
            failed=$((failed + 1))
            ((failed <= 1)) || { echo "bench: peer send failed twice in $lab" >&2; exit 1; }
            ((i--))
            continue
        fi
        times >"$dir/times-after"
        children_cpu_delta "$dir/times-before" "$dir/times-after" >>"$dir/sender-cpu"
        speeds+=("$(sed -n 's/.*(\([0-9.]*\) MB\/s).*/\1/p' "$dir/b.out")")
        if grep -q "direct to" "$dir/b.out"; then echo direct >"$dir/path"; else echo relayed >"$dir/path"; fi
    done
    record "send_$lab" "$(printf '%s\n' "${speeds[@]}" | median)"
    record "send_series_$lab" "$(printf '%s\n' "${speeds[@]}" | paste -sd,)"
    # CPU seconds per GB sent, all three processes (the sender's lines of failed runs included:
    # rare, and reported).
    record "send_cpu_per_gb_$lab" "$(python3 -c 'import sys
before, after, runs, mb = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sender = sum(float(line) for line in open(sys.argv[5]) if line.strip())
print((after - before + sender) / (runs * mb / 1000))' "$cpu_before" "$(proc_cpu "$rv_pid" "$a_pid")" "$runs" "$send_mb" "$dir/sender-cpu")"
    record "path_$lab" "$(cat "$dir/path")"
    record "send_failed_$lab" "$failed"
}

say "peer send: ${send_mb} MB, direct (port-restricted NATs) and relayed (symmetric NATs), median of $runs"
head -c $((send_mb * 1000 * 1000)) /dev/urandom >"$work/payload.bin"
dlab=kd$tag
rlab=kr$tag
send_goodput "$dlab" port port
send_goodput "$rlab" sym sym
# The same with the relay's per-peer rate limit (default 50 MB/s, a policy) out of the way: what
# the relay path itself can carry.
qlab=kq$tag
send_goodput "$qlab" sym sym --relay-rate 10000000000
# The same on the relay stream (inside the QUIC connection to the rendezvous, as before relay
# channels): what the channels bought, in this run.
slab=ks$tag
peer_extra=(--no-relay-channel)
send_goodput "$slab" sym sym --relay-rate 10000000000
peer_extra=()
# Like for like, the issue-16 comparison: `peer send` on the link plain quinn ran on (the two
# un-NATed hosts of the goodput lab: the NATed pairs above cross two more router namespaces,
# whose forwarding the two cores pay for too), against plain quinn sending the same bytes on it
# just before each transfer, neither pinned (each peer keeps a file thread busy beside its
# runtime: pinned to one core each, they would share it, where plain quinn's processes have one
# thread to run).
say "peer send / plain quinn: ${send_mb} MB each, the goodput lab's un-NATed hosts, interleaved, median of $runs"
# Plain quinn as it comes, then plain quinn on sockets with the peer's kernel buffers (the peer
# asks for 8 MiB: what that setting alone is worth to quinn, so that the first ratio is not read
# as the product's cost alone).
both_quinns() {
    gp lab quinn 1 "$send_mb" same 0
    gp lab quinn-buffers 1 "$send_mb" same 0
}
send_before_each=(both_quinns)
send_runs "$glab"
send_before_each=()
# In MB/s, as `peer send` reports its own (the table takes the ratios run by run).
record same_quinn_mbs "$(awk '{print $1 / 1e6}' "$work/gp-same-quinn-1" | paste -sd,)"
record same_quinn_buffers_mbs "$(awk '{print $1 / 1e6}' "$work/gp-same-quinn-buffers-1" | paste -sd,)"
record send_same_lab "$glab"
# iroh_send LAB KEY: iroh's goodput for the same bytes as `peer send` in LAB (a raw stream, no
# file or hashing: a handicap for ours), through its relay in dev mode on LAB-rv.
iroh_send() {
    local lab=$1 key=$2 dir="$work/$1/iroh" id speeds=() path
    mkdir -p "$dir"
    iroh_relay_start "$lab" "$dir"
    pids+=("$IROH_RELAY_PID")
    ip netns exec "$lab-a" "$IROH_BENCH" listen "${IROH_ARGS[@]}" >"$dir/a.out" 2>"$dir/a.log" </dev/null &
    pids+=($!)
    wait_for "$dir/a.out" '^id ' 30
    id=$(sed -n 's/^id //p' "$dir/a.out")
    for ((i = 0; i < runs; i++)); do
        ip netns exec "$lab-b" timeout 300 "$IROH_BENCH" dial "${IROH_ARGS[@]}" --id "$id" \
            --bytes $((send_mb * 1000 * 1000)) --direct-wait-s 5 >"$dir/b.out" 2>"$dir/b.log" </dev/null ||
            { echo "bench: iroh dial failed in $lab" >&2; cat "$dir/b.log" >&2; exit 1; }
        speeds+=("$(python3 -c 'import sys; print(float(sys.argv[1]) / 1e6)' "$(json_field "$dir/b.out" bytes_per_s)")")
        path=$(json_field "$dir/b.out" final_path)
    done
    record "$key" "$(printf '%s\n' "${speeds[@]}" | median)"
    record "${key}_path" "${path%% *}"
}
if ((iroh)); then
    say "iroh: ${send_mb} MB, direct (port-restricted NATs) and relayed (symmetric NATs), median of $runs"
    iroh_send "$dlab" iroh_send_direct
    iroh_send "$qlab" iroh_send_relay
fi
record send_direct_lab "$dlab"
record send_relay_lab "$rlab"
record send_relay_uncapped_lab "$qlab"
record send_relay_stream_lab "$slab"
for lab in "$glab" "$dlab" "$rlab" "$qlab"; do scripts/natlab.sh down "$lab" >/dev/null 2>&1; done
fi # ! rv_only
record send_only "$send_only"
record rv_only "$rv_only"
record connect_only "$connect_only"

if ((send_only)); then
    rv_peers=0
else

# ---------------------------------------------------------------- the rendezvous under load
if ((! connect_only)); then
say "rendezvous: $rv_peers simulated peers, kept alive ${rv_hold} s"
pin_rv=() pin_gen=()
if (($(nproc) >= 2)) && command -v taskset >/dev/null 2>&1; then
    pin_rv=(taskset -c 0)
    pin_gen=(taskset -c 1)
    record rv_pinned yes
fi
# rv_load NAME: the load generator against the server started as $rv_pid (which printed its key
# into $work/NAME.out), its JSON in $work/NAME.json; then the server is stopped.
rv_load() {
    local name=$1
    shift
    wait_for "$work/$name.out" "server key" 10
    sleep 0.5 # settle, so that the baseline RSS is the idle server's
    # Registration deadline: 300 s, plus 10 ms per peer (100,000 peers took 5 minutes on the
    # shared 2-core machine: the load generator's core, not the server, is the limit there).
    local deadline=$((300 + rv_peers / 100))
    "${pin_gen[@]}" timeout $((deadline + rv_hold + 120)) "$bin/bench" rv-load --server "127.0.0.1:$rv_port" \
        --server-key "$(sed -n 's/^server key //p' "$work/$name.out")" --peers "$rv_peers" \
        --hold-s "$rv_hold" --rv-pid "$rv_pid" --register-deadline-s "$deadline" "$@" >"$work/$name.json" 2>"$work/$name-load.log" </dev/null ||
        { echo "bench: rv-load ($name) failed" >&2; cat "$work/$name-load.log" >&2; exit 1; }
    kill "$rv_pid" 2>/dev/null || true
    wait "$rv_pid" 2>/dev/null || true
    untrack "$rv_pid"
}
# The baseline first: a plain quinn + rustls server, handshakes only, same client and sockets.
rv_port=$(free_udp_port)
"${pin_rv[@]}" "$bin/bench" handshake-server --listen "127.0.0.1:$rv_port" --key "$work/handshake-key.pem" \
    >"$work/handshake.out" 2>"$work/handshake.log" </dev/null &
rv_pid=$!
pids+=("$rv_pid")
rv_load handshake --handshake-only
for field in peers failed alive_after_hold rv_registrations_per_cpu_s rv_rss_per_peer_kib \
    rv_hold_cpu_fraction; do
    record "hs_${field#rv_}" "$(json_field "$work/handshake.json" "$field")"
done
rv_port=$(free_udp_port)
"${pin_rv[@]}" "$bin/rendezvous" serve --listen "127.0.0.1:$rv_port" --data-dir "$work/rvload" \
    --tcp-listen off --max-connections $((rv_peers + 1000)) \
    >"$work/rvload.out" 2>"$work/rvload.log" </dev/null &
rv_pid=$!
pids+=("$rv_pid")
rv_load rvload
for field in peers failed alive_after_hold registrations_per_s rv_registrations_per_cpu_s \
    rv_rss_per_peer_kib rv_hold_cpu_fraction rv_rss_before_kib rv_rss_held_kib; do
    record "rv_${field#rv_}" "$(json_field "$work/rvload.json" "$field")"
done
record rv_hold_s "$rv_hold"
fi # ! connect_only

# ---------------------------------------------------------------- connect time / floor
# A `peer ping` subcommand (JSON with first_reply_ms, connect_ms) is used when the peer binary
# has one; otherwise `peer connect`'s "connected to X in N ms" (after registration, to the QUIC
# connection being up, introduction included; no first byte).
if "$bin/peer" ping --help >/dev/null 2>&1; then connect_via=ping; else connect_via=connect; fi
record connect_via "$connect_via"

# connect_times DELAY: $connects connects between peers behind port-restricted NATs, each from a
# fresh config dir (the peer cache would make later connects dial the cached address first).
connect_times() {
    local delay=$1 lab=kc$tag dir="$work/connect-$1"
    mkdir -p "$dir"
    scripts/natlab.sh up "$lab" --a port --b port --delay "$delay" >"$dir/lab.log" 2>&1
    labs+=("$lab")
    ip netns exec "$lab-rv" "$bin/rendezvous" serve --listen 203.0.113.10:7000 --data-dir "$dir/rv" \
        --tcp-listen off >"$dir/rv.out" 2>"$dir/rv.log" </dev/null &
    wait_for "$dir/rv.out" "server key" 10
    local key id
    key=$(sed -n 's/^server key //p' "$dir/rv.out")
    ip netns exec "$lab-a" "$bin/peer" --config-dir "$dir/a" listen \
        --server 203.0.113.10:7000 --server-key "$key" >"$dir/a.out" 2>"$dir/a.log" </dev/null &
    wait_for "$dir/a.out" "registered with" 10
    id=$(sed -n 's/^peer id //p' "$dir/a.out")
    # RTTs: B to the rendezvous, B to A's NAT (the path between the peers, less A's LAN hop).
    record "rtt_rv_$delay" "$(ip netns exec "$lab-b" python3 "$work/icmp_rtt.py" 203.0.113.10 10)"
    record "rtt_ab_$delay" "$(ip netns exec "$lab-b" python3 "$work/icmp_rtt.py" 203.0.113.21 10)"
    : >"$dir/ms"
    for ((i = 0; i < connects; i++)); do
        local out=$dir/b$i.out
        if [[ $connect_via == ping ]]; then
            ip netns exec "$lab-b" timeout 60 "$bin/peer" --config-dir "$dir/b$i" ping "$id" --count 1 --json \
                --server 203.0.113.10:7000 --server-key "$key" >"$out" 2>"$dir/b$i.log" </dev/null ||
                { echo "bench: peer ping failed" >&2; cat "$out" "$dir/b$i.log" >&2; exit 1; }
            # --json prints one JSON document (and nothing else) on stdout.
            python3 -c 'import json,sys
d = json.load(open(sys.argv[1]))
direct = d.get("direct_after_ms")
print(d["first_reply_ms"], d["connect_ms"], "nan" if direct is None else direct)' "$out" >>"$dir/ms"
        else
            ip netns exec "$lab-b" timeout 60 "$bin/peer" --config-dir "$dir/b$i" connect "$id" \
                --server 203.0.113.10:7000 --server-key "$key" >"$out" 2>"$dir/b$i.log" </dev/null ||
                { echo "bench: peer connect failed" >&2; cat "$out" "$dir/b$i.log" >&2; exit 1; }
            sed -n 's/^connected to .* in \([0-9]*\) ms.*/\1 \1/p' "$out" >>"$dir/ms"
        fi
    done
    if ((iroh)); then
        iroh_relay_start "$lab" "$dir/iroh"
        pids+=("$IROH_RELAY_PID")
        ip netns exec "$lab-a" "$IROH_BENCH" listen "${IROH_ARGS[@]}" \
            >"$dir/ia.out" 2>"$dir/ia.log" </dev/null &
        pids+=($!)
        wait_for "$dir/ia.out" '^id ' 30
        local iid
        iid=$(sed -n 's/^id //p' "$dir/ia.out")
        : >"$dir/iroh-ms"
        for ((i = 0; i < connects; i++)); do
            ip netns exec "$lab-b" timeout 60 "$IROH_BENCH" dial "${IROH_ARGS[@]}" --id "$iid" \
                --direct-wait-s 10 >"$dir/ib$i.out" 2>"$dir/ib$i.log" </dev/null ||
                { echo "bench: iroh dial failed" >&2; cat "$dir/ib$i.log" >&2; exit 1; }
            python3 -c 'import json,sys
d = json.loads([l for l in open(sys.argv[1]) if l.startswith("{")][-1])
print(d["first_reply_ms"], d["direct_ms"] if d["direct_ms"] is not None else "nan")' "$dir/ib$i.out" >>"$dir/iroh-ms"
        done
        record "iroh_connect_ms_$delay" "$(cut -d' ' -f1 "$dir/iroh-ms" | paste -sd,)"
        record "iroh_direct_ms_$delay" "$(cut -d' ' -f2 "$dir/iroh-ms" | paste -sd,)"
    fi
    # Column 1: the measured time (first reply, or connection up); column 2: connection up.
    record "connect_ms_$delay" "$(cut -d' ' -f1 "$dir/ms" | paste -sd,)"
    record "connected_ms_$delay" "$(cut -d' ' -f2 "$dir/ms" | paste -sd,)"
    if [[ $connect_via == ping ]]; then record "direct_ms_$delay" "$(cut -d' ' -f3 "$dir/ms" | paste -sd,)"; fi
    scripts/natlab.sh down "$lab" >/dev/null 2>&1
}

# --delay D adds D ms of RTT on each NAT uplink: D to the rendezvous, 2 D between the peers.
if ((! rv_only)); then
    for delay in 10 40; do
        say "connect time: $connects connects, ${delay} ms delay per uplink ($((2 * delay)) ms RTT between the peers)"
        connect_times "$delay"
    done
fi

fi

# ---------------------------------------------------------------- the table
say "done"
machine="$(nproc) cores, $(uname -sr), $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
python3 - "$results" "$machine" "$quick" "$send_mb" "$runs" "$loop_mb" "$lab_mb" <<'EOF'
import math, statistics, sys
path, machine, quick, send_mb, runs, loop_mb, lab_mb = sys.argv[1:]
r = {}
for line in open(path):
    k, _, v = line.rstrip("\n").partition(" ")
    r[k] = v
f = lambda k: float(r[k])
rows = []
def row(what, value, ratio, target=None, ok=None):
    mark = "" if ok is None else (" **met**" if ok else " **missed**")
    rows.append(f"| {what} | {value} | {ratio} | {target or '-'}{mark} |")
series = lambda k: [float(x) for x in r[k].split(",")]
med = lambda xs: statistics.median(xs)
def ratio(a, b):  # median of per-run ratios, and their range
    rs = [x / y for x, y in zip(series(a), series(b))]
    spread = f" (runs {min(rs):.2f}-{max(rs):.2f})" if len(rs) > 1 else ""
    return med(rs), spread
mbs = lambda b: f"{b / 1e6:.0f} MB/s"
send_only = r.get("send_only") == "1"
rv_only = r.get("rv_only") == "1"
connect_only = r.get("connect_only") == "1"
if not send_only and not rv_only and not connect_only:
    for where, label in (("loop", "loopback"), ("lab", "lab link")):
        for s in ("1", "4"):
            ours, quinn, tcp = (med(series(f"gp_{where}-{m}-{s}")) for m in ("ours", "quinn", "tcp"))
            n = "1 stream" if s == "1" else f"{s} streams"
            q, spread = ratio(f"gp_{where}-ours-{s}", f"gp_{where}-quinn-{s}")
            row(f"direct goodput ours / plain quinn, {label}, {n}",
                f"{mbs(ours)} / {mbs(quinn)}", f"{q:.2f}{spread}", ">= 0.95", q >= 0.95)
            t, spread = ratio(f"gp_{where}-ours-{s}", f"gp_{where}-tcp-{s}")
            row(f"direct goodput ours / plain TCP, {label}, {n}",
                f"{mbs(ours)} / {mbs(tcp)}", f"{t:.2f}{spread}")
    gib = f("gp_loop_mb") * 1e6 / 2**30
    for s in ("1", "4"):
        co, cq = med(series(f"cpu_loop-ours-{s}")) / gib, med(series(f"cpu_loop-quinn-{s}")) / gib
        c, spread = ratio(f"cpu_loop-ours-{s}", f"cpu_loop-quinn-{s}")
        row(f"CPU s per GiB (client + server), ours / plain quinn, loopback, {s} stream{'s' if s != '1' else ''}",
            f"{co:.2f} / {cq:.2f}", f"{c:.2f}{spread}")
if not rv_only and not connect_only:
  d, rl = f("send_" + r["send_direct_lab"]), f("send_" + r["send_relay_lab"])
  same = r["send_same_lab"]
  ss, sq = med(series("send_series_" + same)), med(series("same_quinn_mbs"))
  q, spread = ratio("send_series_" + same, "same_quinn_mbs")
  row(f"`peer send` {send_mb} MB direct ({r['path_' + same]}) / plain quinn, {send_mb} MB: the same lab link (two un-NATed hosts), interleaved, neither pinned",
      f"{ss:.1f} / {sq:.0f} MB/s", f"{q:.2f}{spread}", ">= 0.8", q >= 0.8)
  sb = med(series("same_quinn_buffers_mbs"))
  qb, spread = ratio("send_series_" + same, "same_quinn_buffers_mbs")
  row(f"`peer send` {send_mb} MB direct / plain quinn on sockets with the peer's 8 MiB kernel buffers, same link, interleaved (quinn's defaults above)",
      f"{ss:.1f} / {sb:.0f} MB/s", f"{qb:.2f}{spread}", "- (the product's own cost, the buffer setting aside)")
  pq = med(series("gp_lab-quinn-1")) / 1e6
  row(f"`peer send` {send_mb} MB direct across port-restricted NATs ({r['path_' + r['send_direct_lab']]}; two more router hops) / plain quinn, {lab_mb} MB, un-NATed hosts, pinned one core each",
      f"{d:.1f} / {pq:.0f} MB/s", f"{d / pq:.2f}", "- (the row above compares like with like)")
  row(f"`peer send` relayed (symmetric NATs, {r['path_' + r['send_relay_lab']]}) / direct, same links, default relay rate limit (50 MB/s per peer)",
      f"{rl:.1f} / {d:.1f} MB/s", f"{rl / d:.2f}", "- (the operator's `--relay-rate` policy caps it; the next row is the relay's capacity)")
  ru = f("send_" + r["send_relay_uncapped_lab"])
  row(f"`peer send` relayed / direct, same links, relay rate limit raised to 10 GB/s (`--relay-rate`)",
      f"{ru:.1f} / {d:.1f} MB/s", f"{ru / d:.2f}", ">= 0.6", ru / d >= 0.6)
  cd, cu = f("send_cpu_per_gb_" + r["send_direct_lab"]), f("send_cpu_per_gb_" + r["send_relay_uncapped_lab"])
  row("`peer send` CPU s per GB (sender + receiver + rendezvous), relayed (rate limit raised) / direct",
      f"{cu:.2f} / {cd:.2f}", f"{cu / cd:.2f}", "<= 1.6", cu / cd <= 1.6)
  rs = f("send_" + r["send_relay_stream_lab"])
  cs = f("send_cpu_per_gb_" + r["send_relay_stream_lab"])
  row("`peer send` relayed, relay channels (plain UDP) / relay stream (`--no-relay-channel`: QUIC inside QUIC), rate limit raised, same links",
      f"{ru:.1f} / {rs:.1f} MB/s", f"{ru / rs:.2f}", "-")
  row("`peer send` CPU s per GB, all three processes, relay channels / relay stream",
      f"{cu:.2f} / {cs:.2f}", f"{cu / cs:.2f}", "-")
if send_only:
    rows.append("")
    rows.append("(--send-only: the other rows were not measured)")
    print()
    print("| measurement | value | ratio | target |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(0)
if not connect_only:
  core = "one core" if r.get("rv_pinned") == "yes" else "unpinned"
  n = int(float(r["rv_peers"]))
  row(f"rendezvous registrations/s ({core}; load generator on the other)",
      f"{f('rv_registrations_per_s'):.0f}/s wall; {f('rv_registrations_per_cpu_s'):.0f} per CPU s of the server", "-", "measured")
  per = f("rv_rss_per_peer_kib")
  row(f"rendezvous RSS per idle registered peer, {n} peers (alive after {r['rv_hold_s']} s: {r['rv_alive_after_hold']})",
      f"{per:.1f} KiB ({f('rv_rss_before_kib') / 1024:.0f} -> {f('rv_rss_held_kib') / 1024:.0f} MiB)",
      f"{per / 25:.2f} of 25 KiB", "<= 25 KiB", per <= 25)
  row(f"rendezvous CPU with {n} idle peers", f"{100 * f('rv_hold_cpu_fraction'):.1f} % of a core", "-", "measured")
  hs = f("hs_registrations_per_cpu_s")
  reg = f("rv_registrations_per_cpu_s")
  row("rendezvous registrations per server CPU s / plain quinn + rustls handshakes per server CPU s (same client, sockets and certificate type)",
      f"{reg:.0f} / {hs:.0f}", f"{reg / hs:.2f}", ">= 0.5", reg / hs >= 0.5)
  hn = int(float(r["hs_peers"]))
  row(f"plain quinn + rustls server: RSS per idle connection, {hn} connections (alive after {r['rv_hold_s']} s: {r['hs_alive_after_hold']}); CPU",
      f"{f('hs_rss_per_peer_kib'):.1f} KiB; {100 * f('hs_hold_cpu_fraction'):.1f} % of a core", "-", "measured")
via = "first reply (`peer ping`)" if r["connect_via"] == "ping" else "connection up (`peer connect`, no first byte)"
for delay in (() if rv_only else ("10", "40")):
    ms = sorted(float(x) for x in r[f"connect_ms_{delay}"].split(",") if x)
    rv, ab = f(f"rtt_rv_{delay}"), f(f"rtt_ab_{delay}")
    # The handshake's first round trip goes through the rendezvous (its first flight rides the
    # introduction and the answer comes back over the relay: 2 x RTT to it, each side's half),
    # then the first byte each way (RTT between the peers). Before protocol version 10 the
    # introduction came first: RTT to the rendezvous + 2 RTT between the peers.
    floor = 2 * rv + ab
    median_ms = statistics.median(ms)
    p95 = ms[max(0, math.ceil(0.95 * len(ms)) - 1)]  # nearest rank
    up = statistics.median(float(x) for x in r[f"connected_ms_{delay}"].split(",") if x)
    for name, v in (("median", median_ms), ("p95", p95)):
        row(f"connect time / floor, {2 * int(delay)} ms RTT between peers, {name} of {len(ms)}, to {via}",
            f"{v:.0f} ms / {floor:.0f} ms (2 x RTT rv {rv:.1f} + {ab:.1f}; connection up after {up:.0f} ms, median)",
            f"{v / floor:.2f}", "<= 1.2", v / floor <= 1.2)
if "iroh_connect_ms_10" in r:
    # The fourth contestant (--iroh): ours / iroh, each ratio from this run.
    if not connect_only:
      for s in ("1", "4"):
          ours, ir = statistics.median(series(f"gp_lab-ours-{s}")), statistics.median(series(f"gp_lab-iroh-{s}"))
          q, spread = ratio(f"gp_lab-ours-{s}", f"gp_lab-iroh-{s}")
          row(f"direct goodput ours / iroh, lab link, {s} stream{'s' if s != '1' else ''}",
              f"{mbs(ours)} / {mbs(ir)}", f"{q:.2f}{spread}", ">= 1", q >= 1)
          c, spread = ratio(f"cpu_lab-ours-{s}", f"cpu_lab-iroh-{s}")
          row(f"CPU s for the same bytes (client + server) ours / iroh, lab link, {s} stream{'s' if s != '1' else ''}",
              f"{statistics.median(series(f'cpu_lab-ours-{s}')):.2f} / {statistics.median(series(f'cpu_lab-iroh-{s}')):.2f} CPU s", f"{c:.2f}{spread}", "<= 1", c <= 1)
      idr, irl = f("iroh_send_direct"), f("iroh_send_relay")
      row(f"iroh {send_mb} MB stream, port-restricted NATs ({r['iroh_send_direct_path']}) / plain quinn on a lab link",
          f"{idr:.1f} / {pq:.0f} MB/s", f"{idr / pq:.2f}")
      row(f"relayed goodput ours (`peer send`, rate limit raised) / iroh (stream through iroh-relay), symmetric NATs ({r['iroh_send_relay_path']})",
          f"{ru:.1f} / {irl:.1f} MB/s", f"{ru / irl:.2f}", ">= 1", ru / irl >= 1)
      row("relayed / direct goodput, iroh, same links", f"{irl:.1f} / {idr:.1f} MB/s", f"{irl / idr:.2f}")
    for delay in ("10", "40"):
        ours_ms = statistics.median(float(x) for x in r[f"connect_ms_{delay}"].split(",") if x)
        iroh_ms = statistics.median(float(x) for x in r[f"iroh_connect_ms_{delay}"].split(",") if x)
        row(f"first reply from the dial, ours / iroh, port-restricted NATs, {2 * int(delay)} ms RTT between peers, median",
            f"{ours_ms:.0f} / {iroh_ms:.0f} ms", f"{ours_ms / iroh_ms:.2f}", "<= 1", ours_ms <= iroh_ms)
        if f"direct_ms_{delay}" in r:
            od = [float(x) for x in r[f"direct_ms_{delay}"].split(",") if x and x != "nan"]
            idd = [float(x) for x in r[f"iroh_direct_ms_{delay}"].split(",") if x and x != "nan"]
            n = len(r[f"direct_ms_{delay}"].split(","))
            if od and idd:
                o, i = statistics.median(od), statistics.median(idd)
                row(f"time to a direct path from the dial, ours / iroh, {2 * int(delay)} ms RTT, median",
                    f"{o:.0f} ms ({len(od)}/{n} direct) / {i:.0f} ms ({len(idd)}/{n} direct)", f"{o / i:.2f}", "<= 1", o <= i)
            else:
                row(f"time to a direct path from the dial, {2 * int(delay)} ms RTT",
                    f"ours {len(od)}/{n} direct, iroh {len(idd)}/{n} direct", "-")
print()
print("| measurement | value | ratio | target |")
print("|---|---|---|---|")
print("\n".join(rows))
print()
mode = "--quick" if quick == "1" else "full"
if connect_only:
    print(f"{mode} --connect-only run: the connect-time rows only, {r['connect_via']} x {len(r['connect_ms_10'].split(','))} per delay.")
elif rv_only:
    print(f"{mode} --rv-only run: the rendezvous rows only, {int(float(r['rv_peers']))} peers kept alive {r['rv_hold_s']} s.")
else:
  print(f"{mode} run: goodput {loop_mb} MB (loopback) / {lab_mb} MB (lab link) per test, median of {runs}; "
        f"`peer send` {send_mb} MB; lab links are veth pairs through nftables NATs, no impairment "
        "except the connect-time labs (--delay, through the Python shim).")
fails = sum(int(v) for k, v in r.items() if k.startswith("send_failed_"))
if fails:
    print(f"`peer send` transfers that failed and were retried: {fails} (see the log above)")
print(f"machine: {machine}")
EOF
say "total"
