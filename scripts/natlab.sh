#!/usr/bin/env bash
# natlab.sh - network-namespace NAT lab for UDP hole-punching tests.
#
# Builds, inspects and tears down small "internets" made of network
# namespaces (one namespace per host/router), with NAT routers implemented in
# nftables and link impairment done by a userspace TUN shim (the kernel has no
# sch_netem).  See scripts/lab/README.md for the topology and semantics.
#
#   natlab.sh up LAB --a KIND --b KIND [--same-nat] [--hairpin on|off]
#             [--delay MS] [--jitter MS] [--loss PCT] [--rate RATE]
#             [--udp-timeout SECONDS] [--ipv6 SIDES] [--ipv6-only SIDES]
#   natlab.sh exec LAB HOST -- CMD...
#   natlab.sh status LAB
#   natlab.sh down LAB
#   natlab.sh down-all
#   natlab.sh flush LAB HOST
#   natlab.sh block LAB HOST | unblock LAB HOST
#   natlab.sh addr LAB HOST | addr6 LAB HOST
#   natlab.sh upnp LAB ROUTER start|stop|restart|list [--max-lifetime S] [--upnp-only|--no-pcp]
#
# KIND: open full addr port sym seqsym cgnat udpblock early
# SIDES: a, b or ab.  --ipv6 makes those sides (and rv, inet) dual-stack in
# 2001:db8::/32, each behind its router's stateful IPv6 firewall (no NAT66);
# --ipv6-only also takes their IPv4 default route away.  Default: IPv4 only.
# HOST: inet rv a b nata natb cgnata cgnatb (cgnat = whichever exists)
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
LAB_LIB=$SCRIPT_DIR/lab
# Per-lab state (config, shim logs/stats).  /run is a tmpfs like /run/netns,
# so state and namespaces disappear together on reboot.
RUN_ROOT=${NATLAB_RUN:-/run/natlab}
# Prefer the system interpreter: a pyenv shim costs ~100 ms per start.
if [[ -n ${NATLAB_PYTHON:-} ]]; then
	PYTHON=$NATLAB_PYTHON
elif [[ -x /usr/bin/python3 ]]; then
	PYTHON=/usr/bin/python3
else
	PYTHON=$(command -v python3)
fi

readonly KINDS="open full addr port sym seqsym cgnat udpblock early"
# Every host name a lab can contain; used to find a lab's namespaces without
# touching namespaces that merely share a prefix.
readonly ALL_HOSTS="inet rv a b nata natb cgnata cgnatb"
readonly INET_GW=203.0.113.1

die() {
	echo "natlab: $*" >&2
	exit 1
}

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
	exit 2
}

check_lab() {
	[[ $1 =~ ^[a-z0-9]{1,6}$ ]] || die "LAB must be 1-6 chars of [a-z0-9], got '$1'"
}

# ns LAB HOST -> namespace name
ns() { printf '%s-%s' "$1" "$2"; }

ns_exists() { [[ -e /run/netns/$1 ]]; }

# Run a command inside a namespace.
nsx() {
	local n=$1
	shift
	ip netns exec "$n" "$@"
}

# Namespaces that currently belong to LAB.
lab_namespaces() {
	local lab=$1 h
	for h in $ALL_HOSTS; do
		if ns_exists "$(ns "$lab" "$h")"; then printf '%s\n' "$(ns "$lab" "$h")"; fi
	done
}

# ---------------------------------------------------------------------------
# helpers for `up`
# ---------------------------------------------------------------------------

# Parse a rate in bit/s units (tc style: 500kbit, 10mbit, 1gbit, 64000bit;
# shorthand 500k, 10m, 1g also means bits) into bit/s.  Note: tc's "mbps"
# means megaBYTES, which is why byte units are rejected here.
rate_bps() {
	local r=${1,,} n u
	[[ $r =~ ^([0-9]+)(bit|kbit|mbit|gbit|k|m|g)$ ]] || die "--rate must look like 500kbit, 10mbit, 1gbit (or 500k, 10m, 1g), got '$1'"
	n=${BASH_REMATCH[1]}
	u=${BASH_REMATCH[2]}
	case $u in
	bit) echo "$n" ;;
	k | kbit) echo $((n * 1000)) ;;
	m | mbit) echo $((n * 1000000)) ;;
	g | gbit) echo $((n * 1000000000)) ;;
	esac
}

new_ns() {
	local n=$1
	ip netns add "$n"
	ip -n "$n" link set lo up
	# Set defaults BEFORE any interface exists so every interface inherits
	# them: no IPv6 on the links (no RS/DAD chatter; the lab is IPv4-only,
	# but lo keeps ::1 so [::] sockets still work), no ICMP redirects (the
	# hairpin path leaves through the interface it came in on), no
	# reverse-path filter.
	nsx "$n" sysctl -q -w \
		net.ipv6.conf.default.disable_ipv6=1 \
		net.ipv4.conf.all.send_redirects=0 net.ipv4.conf.default.send_redirects=0 \
		net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 >/dev/null
}

router_sysctls() {
	local n=$1
	nsx "$n" sysctl -q -w net.ipv4.ip_forward=1 >/dev/null
	if [[ -n $UDP_TIMEOUT ]]; then
		# Per-namespace sysctls: only this router's conntrack is affected.
		nsx "$n" sysctl -q -w \
			net.netfilter.nf_conntrack_udp_timeout="$UDP_TIMEOUT" \
			net.netfilter.nf_conntrack_udp_timeout_stream="$UDP_TIMEOUT" >/dev/null
	fi
}

# Is the uplink (side <-> inet) impaired by the userspace shim?
positive() { awk -v x="$1" 'BEGIN { exit !(x + 0 > 0) }'; }
impaired() {
	positive "$DELAY" || positive "$JITTER" || positive "$LOSS"
}

add_tbf() {
	local n=$1 dev=$2 bps burst limit
	bps=$(rate_bps "$RATE")
	# burst: 10 ms worth of tokens (at least 2 full-size frames) so the rate
	# is smooth even for slow links; queue: ~100 ms at line rate, bounded.
	burst=$((bps / 8 / 100))
	((burst < 3028)) && burst=3028
	limit=$((bps / 8 / 10 + burst))
	ip -n "$n" link set "$dev" up
	nsx "$n" tc qdisc replace dev "$dev" root tbf rate "${bps}bit" burst "$burst" limit "$limit"
}

# link_to_inet EDGE_NS EDGE_DEV EDGE_ADDR INET_DEV [uplink]
# Every host is attached to LAB-inet by its own routed point-to-point link:
# the edge gets ADDR/32 and a default route via 203.0.113.1, LAB-inet gets
# 203.0.113.1/32 plus a /32 route back.  Being routed (not bridged) lets a
# link be either a veth pair or, when impaired, a pair of TUN devices glued
# together by scripts/lab/impair.py, without changing any addressing.
# Only a side's uplink (5th arg set) gets impairment / rate limiting.
link_to_inet() {
	local edge=$1 edev=$2 eaddr=$3 idev=$4 uplink=${5:-}
	local inet
	inet=$(ns "$LAB" inet)
	if [[ -n $uplink ]] && impaired; then
		ip -n "$edge" tuntap add dev "$edev" mode tun
		ip -n "$inet" tuntap add dev "$idev" mode tun
	else
		ip -n "$inet" link add "$idev" type veth peer name "$edev" netns "$edge"
	fi
	ip -n "$edge" addr add "$eaddr/32" dev "$edev"
	ip -n "$edge" link set "$edev" up
	ip -n "$edge" route add "$INET_GW/32" dev "$edev"
	ip -n "$edge" route add default via "$INET_GW" dev "$edev" onlink
	ip -n "$inet" addr add "$INET_GW/32" dev "$idev"
	ip -n "$inet" link set "$idev" up
	ip -n "$inet" route add "$eaddr/32" dev "$idev"
	if [[ -n $uplink && -n $RATE ]]; then
		# egress of both ends = both directions of the link
		add_tbf "$edge" "$edev"
		add_tbf "$inet" "$idev"
	fi
	if [[ -n $uplink ]]; then
		UPLINK_EDGE[$SIDE]="$edge:$edev"
		UPLINK_INET[$SIDE]="$inet:$idev"
	fi
}

# Peer host on a router's LAN bridge.  peer_on_lan ROUTER_NS PEER_NS PORTDEV ADDR/PLEN GW
peer_on_lan() {
	local r=$1 p=$2 pdev=$3 cidr=$4 gw=$5
	ip -n "$r" link add "$pdev" type veth peer name eth0 netns "$p"
	ip -n "$r" link set "$pdev" master lan up
	if [[ $HAIRPIN == on ]]; then
		# br_netfilter DNATs hairpinned packets at the bridge: one whose new destination is
		# behind the port it came in on (a host reaching itself through its public address) is
		# only sent back out of that port in the port's hairpin mode.
		ip -n "$r" link set "$pdev" type bridge_slave hairpin on
	fi
	ip -n "$p" addr add "$cidr" dev eth0
	ip -n "$p" link set eth0 up
	ip -n "$p" route add default via "$gw"
}

# nat_ruleset MODE WANIP LANNET TIMEOUT_S -> nft script on stdout
#   MODE: full | addr | port | sym | seqsym | udpblock
# See scripts/lab/README.md "KINDs and how they are built in nft".  The cone kinds do NOT rely on
# masquerade's port preservation: the first flow of an inside endpoint gets a
# random public port (`masquerade random`), which is learnt into eim_out /
# eim_in; later flows of that endpoint are SNATed to the same port from the
# map (endpoint-independent mapping).  Because the port is random, `flush`
# (maps + conntrack) really yields a new public port.
nat_ruleset() {
	local mode=$1 wanip=$2 lannet=$3 t=$4
	local cone=1
	[[ $mode == sym || $mode == seqsym ]] && cone=0
	cat <<EOF
table ip natlab {
	# public udp port -> inside endpoint (inbound DNAT for full/addr, hairpin)
	map eim_in {
		typeof udp dport : ip daddr . udp dport
		flags timeout
		timeout ${t}s
		size 65535
	}
EOF
	if ((cone)); then
		cat <<EOF
	# inside endpoint -> public endpoint (endpoint-independent mapping)
	map eim_out {
		typeof ip saddr . udp sport : ip saddr . udp sport
		flags timeout
		timeout ${t}s
		size 65535
	}
	# (public port . inside endpoint) pairs, to detect a fresh random port
	# that collides with another endpoint's mapping
	set eim_pair {
		typeof udp sport . ip saddr . udp sport
		flags timeout
		timeout ${t}s
		size 65535
	}
EOF
	fi
	if [[ $mode == addr ]]; then
		cat <<EOF
	# (public port . remote ip) the inside endpoint has sent to
	set adf {
		typeof udp dport . ip saddr
		flags timeout
		timeout ${t}s
		size 65535
	}
EOF
	fi
	echo "	chain prerouting {"
	echo "		type nat hook prerouting priority dstnat; policy accept;"
	case $mode in
	full) echo "		iifname \"wan\" ip daddr $wanip udp dport @eim_in dnat ip to udp dport map @eim_in" ;;
	addr) echo "		iifname \"wan\" ip daddr $wanip udp dport . ip saddr @adf dnat ip to udp dport map @eim_in" ;;
	esac
	if [[ $HAIRPIN == on ]]; then
		echo "		iifname \"lan\" ip daddr $wanip udp dport @eim_in dnat ip to udp dport map @eim_in"
	fi
	echo "	}"
	echo "	chain postrouting {"
	echo "		type nat hook postrouting priority srcnat; policy accept;"
	if [[ $HAIRPIN == on ]]; then
		# Hairpinned packets (LAN -> own public address -> LAN) leave with
		# the sender's public mapping as source, as a real hairpinning NAT.
		if ((cone)); then
			echo "		oifname \"lan\" ct status dnat ip saddr $lannet ip saddr . udp sport @eim_out snat ip to ip saddr . udp sport map @eim_out"
			echo "		oifname \"lan\" ct status dnat ip saddr $lannet meta l4proto udp snat ip to $wanip random"
		else
			echo "		oifname \"lan\" ct status dnat ip saddr $lannet meta l4proto udp snat ip to $wanip fully-random"
		fi
	fi
	if ((cone)); then
		echo "		oifname \"wan\" ip saddr . udp sport @eim_out snat ip to ip saddr . udp sport map @eim_out"
		echo "		oifname \"wan\" meta l4proto udp masquerade random"
		echo "		oifname \"wan\" masquerade"
	elif [[ $mode == seqsym ]]; then
		# Symmetric with sequential ports: every new flow (any inside host, any destination)
		# takes the next public port, as carrier NATs that allocate in sequence do: 20000 to
		# 24095, then round again. (A map, not `numgen ... offset`: nft would put the
		# counter's bytes into the port in host order.)
		local seq
		seq=$(awk 'BEGIN { for (i = 0; i < 4096; i++) printf "%s%d : %d", (i ? ", " : ""), i, 20000 + i }')
		echo "		oifname \"wan\" meta l4proto udp snat ip to $wanip : numgen inc mod 4096 map { $seq }"
		echo "		oifname \"wan\" masquerade"
	else
		echo "		oifname \"wan\" masquerade fully-random"
	fi
	echo "	}"
	cat <<EOF
	# Runs after NAT (srcnat+10): packets carry their translated addresses
	# and conntrack knows both tuples, so the chosen mapping can be learnt.
	chain learn {
		type filter hook postrouting priority srcnat + 10; policy accept;
		meta l4proto != udp accept
		# (each rule repeats "meta l4proto udp": nft needs it to type ct proto-src/dst)
EOF
	if ((cone)); then
		cat <<EOF
		meta l4proto udp ct state new ct status snat ct original ip saddr $lannet ct reply proto-dst @eim_in ct reply proto-dst . ct original ip saddr . ct original proto-src != @eim_pair counter drop comment "random port collides with a mapping: drop, next packet gets another"
		meta l4proto udp ct status snat ct original ip saddr $lannet update @eim_out { ct original ip saddr . ct original proto-src : ct reply ip daddr . ct reply proto-dst } update @eim_in { ct reply proto-dst : ct original ip saddr . ct original proto-src } update @eim_pair { ct reply proto-dst . ct original ip saddr . ct original proto-src }
		meta l4proto udp ct status dnat ct reply ip saddr $lannet update @eim_out { ct reply ip saddr . ct reply proto-src : ct original ip daddr . ct original proto-dst } update @eim_in { ct original proto-dst : ct reply ip saddr . ct reply proto-src } update @eim_pair { ct original proto-dst . ct reply ip saddr . ct reply proto-src }
EOF
	else
		# sym: mappings are per flow; eim_in is only kept for hairpinning.
		echo "		meta l4proto udp ct status snat ct original ip saddr $lannet update @eim_in { ct reply proto-dst : ct original ip saddr . ct original proto-src }"
	fi
	if [[ $mode == addr ]]; then
		echo "		oifname \"wan\" update @adf { udp sport . ip daddr }"
	fi
	echo "	}"
	cat <<EOF
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
EOF
	if [[ $mode == udpblock ]]; then
		echo "		iifname \"lan\" meta l4proto udp counter drop comment \"udpblock: only TCP/ICMP leave\""
	fi
	cat <<EOF
		iifname "lan" accept
		iifname "wan" oifname "lan" ct status dnat accept
	}
	# The NAT box itself: silently drop whatever is unsolicited (no ICMP
	# port-unreachable leaks), but answer pings (handy for RTT checks).
	chain input {
		type filter hook input priority filter; policy accept;
		iif "lo" accept
		ct state established,related accept
		meta l4proto icmp accept
		iifname "wan" drop
		ip daddr $wanip meta l4proto udp drop
	}
}
EOF
}

# early_ruleset WANIP -> nft script on stdout
# A plain Linux router: `masquerade` (port-preserving, so EIM while the port is
# free), conntrack-only filtering (APDF), and an input chain that does NOT drop
# what arrives unsolicited on the WAN.  Such a packet is delivered to the router
# itself (the kernel answers with ICMP port unreachable) and so its conntrack
# entry is confirmed: (remote -> public ip:port).  A later outbound flow from the
# inside endpoint that owns that public port to the same remote would need the
# reverse of that tuple, which is taken, so masquerade gives it another port.
# An early packet turns the NAT symmetric for that one remote.
early_ruleset() {
	local wanip=$1
	cat <<EOF
table ip natlab {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "wan" masquerade
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname "lan" accept
	}
	# No drop for what comes unsolicited from the WAN: it reaches the router's own
	# stack, and its conntrack entry holds the public port for that remote.
	chain input {
		type filter hook input priority filter; policy accept;
		ip daddr $wanip meta l4proto udp ct state new counter comment "unsolicited UDP: accepted (conntrack state), port unreachable"
	}
}
EOF
}

write_state() {
	local f=$RUN_DIR/lab.env
	{
		printf 'KIND_A=%q\nKIND_B=%q\nSAME_NAT=%q\nHAIRPIN=%q\n' "$KIND_A" "$KIND_B" "$SAME_NAT" "$HAIRPIN"
		printf 'DELAY=%q\nJITTER=%q\nLOSS=%q\nRATE=%q\nUDP_TIMEOUT=%q\n' "$DELAY" "$JITTER" "$LOSS" "$RATE" "$UDP_TIMEOUT"
		printf 'HOSTS=%q\nROUTERS=%q\n' "${HOSTS[*]}" "${ROUTERS[*]}"
		printf 'IPV6=%q\nIPV6_ONLY=%q\n' "$IPV6" "$IPV6_ONLY"
		local h
		for h in "${HOSTS[@]}"; do
			printf 'ADDR_%s=%q\n' "$h" "${ADDR[$h]}"
			[[ -z ${ADDR6[$h]:-} ]] || printf 'ADDR6_%s=%q\n' "$h" "${ADDR6[$h]}"
		done
		for h in "${ROUTERS[@]}"; do
			printf 'MODE_%s=%q\n' "$h" "${MODE[$h]}"
		done
	} >"$f"
}

load_state() {
	local lab=$1
	RUN_DIR=$RUN_ROOT/$lab
	[[ -r $RUN_DIR/lab.env ]] || die "lab '$lab' is not up (no $RUN_DIR/lab.env)"
	# shellcheck source=/dev/null
	. "$RUN_DIR/lab.env"
}

# Build one side (a or b).  Sets ADDR/MODE/HOSTS/ROUTERS.
build_side() {
	local side=$1 kind=$2 idx
	SIDE=$side
	[[ $side == a ]] && idx=1 || idx=2
	local pub=203.0.113.2$idx
	local peer nat cg
	peer=$(ns "$LAB" "$side")
	nat=$(ns "$LAB" "nat$side")
	case $kind in
	open)
		new_ns "$peer"
		link_to_inet "$peer" eth0 "203.0.113.3$idx" "to-$side" uplink
		HOSTS+=("$side")
		ADDR[$side]=203.0.113.3$idx
		return
		;;
	cgnat)
		# Carrier NAT (cgnat$side) owns the public address; the home NAT
		# behind it (nat$side) sits in shared address space 100.64.idx.0/24.
		cg=$(ns "$LAB" "cgnat$side")
		new_ns "$cg"
		new_ns "$nat"
		router_sysctls "$cg"
		router_sysctls "$nat"
		link_to_inet "$cg" wan "$pub" "to-cgnat$side" uplink
		ip -n "$cg" link add lan type veth peer name wan netns "$nat"
		ip -n "$cg" addr add "100.64.$idx.1/24" dev lan
		ip -n "$cg" link set lan up
		ip -n "$nat" addr add "100.64.$idx.2/24" dev wan
		ip -n "$nat" link set wan up
		ip -n "$nat" route add default via "100.64.$idx.1"
		HOSTS+=("cgnat$side" "nat$side")
		ROUTERS+=("cgnat$side" "nat$side")
		ADDR[cgnat$side]=$pub
		ADDR[nat$side]=100.64.$idx.2
		MODE[cgnat$side]=port
		MODE[nat$side]=port
		LANNET[cgnat$side]=100.64.$idx.0/24
		;;
	*)
		new_ns "$nat"
		router_sysctls "$nat"
		link_to_inet "$nat" wan "$pub" "to-nat$side" uplink
		HOSTS+=("nat$side")
		ROUTERS+=("nat$side")
		ADDR[nat$side]=$pub
		MODE[nat$side]=$kind
		;;
	esac
	# Home NAT LAN: a bridge so --same-nat can put two peers on it.
	ip -n "$nat" link add lan type bridge
	ip -n "$nat" addr add "10.0.$idx.1/24" dev lan
	ip -n "$nat" link set lan up
	LANNET[nat$side]=10.0.$idx.0/24
	new_ns "$peer"
	peer_on_lan "$nat" "$peer" "port-$side" "10.0.$idx.2/24" "10.0.$idx.1"
	HOSTS+=("$side")
	ADDR[$side]=10.0.$idx.2
}

start_shim() {
	local side=$1 edge=$2 inetend=$3 ready=$RUN_DIR/impair-$1.ready
	local edge_ns=${edge%%:*} seed=()
	[[ -n ${NATLAB_SEED:-} ]] && seed=(--seed "$NATLAB_SEED")
	rm -f "$ready"
	# setsid + full redirection: the shim must outlive `up` and must not hold
	# the caller's stdout/stderr pipes open.  It lives in the edge namespace,
	# so `down` finds it with `ip netns pids`, and it exits by itself if the
	# namespaces disappear.
	nsx "$edge_ns" setsid "$PYTHON" "$LAB_LIB/impair.py" \
		--left "$edge" --right "$inetend" \
		--delay-ms "$DELAY" --jitter-ms "$JITTER" --loss "$LOSS" "${seed[@]}" \
		--stats "$RUN_DIR/impair-$side.json" --ready "$ready" \
		</dev/null >>"$RUN_DIR/impair-$side.log" 2>&1 &
	local i
	for ((i = 0; i < 100; i++)); do
		[[ -s $ready ]] && return 0
		sleep 0.05
	done
	cat "$RUN_DIR/impair-$side.log" >&2 || true
	die "impairment shim for side $side did not start"
}

# ---------------------------------------------------------------------------
# IPv6 (--ipv6 / --ipv6-only)
# ---------------------------------------------------------------------------
readonly INET6_GW=2001:db8::1

# No duplicate address detection: link-local addresses would stay tentative
# (unusable for neighbour discovery) for a second or more after the lab is up.
v6_on() {
	nsx "$1" sysctl -q -w "net.ipv6.conf.$2.accept_dad=0" "net.ipv6.conf.$2.disable_ipv6=0" >/dev/null
}

# v6_link EDGE_NS EDGE_DEV EDGE_ADDR6 INET_DEV: the IPv6 twin of link_to_inet on
# the same (already built) point-to-point link.
v6_link() {
	local edge=$1 edev=$2 eaddr=$3 idev=$4 inet
	inet=$(ns "$LAB" inet)
	v6_on "$edge" "$edev"
	v6_on "$inet" "$idev"
	ip -n "$edge" -6 addr add "$eaddr/128" dev "$edev" nodad
	ip -n "$edge" -6 route add "$INET6_GW/128" dev "$edev"
	ip -n "$edge" -6 route add default via "$INET6_GW" dev "$edev" onlink
	ip -n "$inet" -6 addr add "$INET6_GW/128" dev "$idev" nodad
	ip -n "$inet" -6 route add "$eaddr/128" dev "$idev"
}

# A stateful IPv6 firewall on ROUTER_NS (no NAT66): replies to what the LAN
# sent (conntrack: same addresses and ports) pass, anything new from the WAN is
# dropped, so a LAN host is reachable like behind a port-restricted cone.
v6_firewall() {
	nsx "$1" nft -f - <<'EOF'
table ip6 natlab6 {
	chain forward {
		type filter hook forward priority filter; policy accept;
		iifname "wan" ct state established,related accept
		iifname "wan" drop
	}
}
EOF
}

# IPv6 for rv and the --ipv6 sides: rv 2001:db8::10, an open peer
# 2001:db8::3<idx>, a router WAN 2001:db8::2<idx> with LAN 2001:db8:<idx>::/64
# (router ::1, peer ::2).
add_ipv6() {
	local inet rv side idx peer nat
	inet=$(ns "$LAB" inet)
	rv=$(ns "$LAB" rv)
	nsx "$inet" sysctl -q -w net.ipv6.conf.all.forwarding=1 >/dev/null
	v6_link "$rv" eth0 2001:db8::10 to-rv
	ADDR6[rv]=2001:db8::10
	for side in a b; do
		[[ $IPV6 == *$side* ]] || continue
		[[ $side == a ]] && idx=1 || idx=2
		peer=$(ns "$LAB" "$side")
		nat=$(ns "$LAB" "nat$side")
		if ! ns_exists "$nat"; then
			v6_link "$peer" eth0 "2001:db8::3$idx" "to-$side"
			ADDR6[$side]=2001:db8::3$idx
		else
			nsx "$nat" sysctl -q -w net.ipv6.conf.all.forwarding=1 >/dev/null
			v6_link "$nat" wan "2001:db8::2$idx" "to-nat$side"
			ip -n "$inet" -6 route add "2001:db8:$idx::/64" via "2001:db8::2$idx" dev "to-nat$side" onlink
			v6_on "$nat" lan
			ip -n "$nat" -6 addr add "2001:db8:$idx::1/64" dev lan nodad
			v6_on "$peer" eth0
			ip -n "$peer" -6 addr add "2001:db8:$idx::2/64" dev eth0 nodad
			ip -n "$peer" -6 route add default via "2001:db8:$idx::1" dev eth0
			v6_firewall "$nat"
			ADDR6[nat$side]=2001:db8::2$idx
			ADDR6[$side]=2001:db8:$idx::2
		fi
		if [[ $IPV6_ONLY == *$side* ]]; then
			ip -n "$peer" -4 route del default
		fi
	done
}

cmd_up() {
	LAB=${1:-}
	[[ -n $LAB ]] || usage
	shift
	check_lab "$LAB"
	KIND_A="" KIND_B="" SAME_NAT=0 HAIRPIN=off DELAY=0 JITTER=0 LOSS=0 RATE="" UDP_TIMEOUT=""
	IPV6="" IPV6_ONLY=""
	while (($#)); do
		case $1 in
		--a) KIND_A=${2:?}; shift 2 ;;
		--b) KIND_B=${2:?}; shift 2 ;;
		--same-nat) SAME_NAT=1; shift ;;
		--hairpin) HAIRPIN=${2:?}; shift 2 ;;
		--delay) DELAY=${2:?}; shift 2 ;;
		--jitter) JITTER=${2:?}; shift 2 ;;
		--loss) LOSS=${2:?}; shift 2 ;;
		--rate) RATE=${2:?}; shift 2 ;;
		--udp-timeout) UDP_TIMEOUT=${2:?}; shift 2 ;;
		--ipv6) IPV6=${2:?}; shift 2 ;;
		--ipv6-only) IPV6_ONLY=${2:?}; shift 2 ;;
		*) die "unknown option '$1'" ;;
		esac
	done
	[[ -n $KIND_A ]] || die "--a KIND is required"
	if ((SAME_NAT)); then
		[[ -z $KIND_B || $KIND_B == "$KIND_A" ]] || echo "natlab: --same-nat: ignoring --b $KIND_B (both peers behind the --a NAT)" >&2
		KIND_B=$KIND_A
		[[ $KIND_A != open ]] || die "--same-nat needs a NAT kind, not 'open'"
	fi
	[[ -n $KIND_B ]] || die "--b KIND is required"
	local k
	for k in "$KIND_A" "$KIND_B"; do
		[[ " $KINDS " == *" $k "* ]] || die "unknown KIND '$k' (one of: $KINDS)"
	done
	[[ $HAIRPIN == on || $HAIRPIN == off ]] || die "--hairpin must be on or off"
	if [[ $HAIRPIN == on ]] && [[ $KIND_A == early || $KIND_B == early ]]; then
		die "--hairpin on is not modelled for KIND early (plain masquerade has no hairpin rules)"
	fi
	local num='^[0-9]+([.][0-9]+)?$'
	[[ $DELAY =~ $num && $JITTER =~ $num && $LOSS =~ $num ]] || die "--delay/--jitter/--loss must be non-negative numbers"
	awk -v x="$LOSS" 'BEGIN { exit !(x <= 100) }' || die "--loss is a percentage (0-100)"
	[[ -z $UDP_TIMEOUT || $UDP_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "--udp-timeout must be a positive integer (seconds)"
	[[ -z $RATE ]] || rate_bps "$RATE" >/dev/null
	[[ -z $IPV6 || $IPV6 =~ ^(a|b|ab)$ ]] || die "--ipv6 takes a, b or ab"
	[[ -z $IPV6_ONLY || $IPV6_ONLY =~ ^(a|b|ab)$ ]] || die "--ipv6-only takes a, b or ab"
	# IPv6-only sides are IPv6 sides.
	[[ $IPV6_ONLY != *a* || $IPV6 == *a* ]] || IPV6+=a
	[[ $IPV6_ONLY != *b* || $IPV6 == *b* ]] || IPV6+=b
	if [[ -n $IPV6 ]]; then
		((!SAME_NAT)) || die "--ipv6 with --same-nat is not supported"
		for k in "$KIND_A" "$KIND_B"; do
			[[ $k != cgnat ]] || die "--ipv6 with a cgnat side is not supported"
		done
	fi

	if [[ -n $(lab_namespaces "$LAB") ]]; then
		die "lab '$LAB' already exists; run: $0 down $LAB"
	fi
	RUN_DIR=$RUN_ROOT/$LAB
	rm -rf "$RUN_DIR"
	mkdir -p "$RUN_DIR"
	# Half-built labs are removed on any failure.
	trap 'rc=$?; if ((rc != 0)); then echo "natlab: up $LAB failed, tearing down" >&2; cmd_down "$LAB" >/dev/null 2>&1 || true; fi' EXIT

	declare -gA ADDR=() ADDR6=() MODE=() LANNET=() UPLINK_EDGE=() UPLINK_INET=()
	HOSTS=(inet rv) ROUTERS=() SIDE=""
	local inet rv
	inet=$(ns "$LAB" inet)
	rv=$(ns "$LAB" rv)
	new_ns "$inet"
	nsx "$inet" sysctl -q -w net.ipv4.ip_forward=1 >/dev/null
	new_ns "$rv"
	ADDR[inet]=$INET_GW
	ADDR[rv]=203.0.113.10
	# rv is never impaired; it has a second address for mapping/filtering
	# probes ("same host, different IP").
	link_to_inet "$rv" eth0 203.0.113.10 to-rv
	ip -n "$rv" addr add 203.0.113.11/32 dev eth0
	ip -n "$inet" route add 203.0.113.11/32 dev to-rv

	build_side a "$KIND_A"
	if ((SAME_NAT)); then
		local b
		b=$(ns "$LAB" b)
		new_ns "$b"
		peer_on_lan "$(ns "$LAB" nata)" "$b" port-b 10.0.1.3/24 10.0.1.1
		HOSTS+=(b)
		ADDR[b]=10.0.1.3
	else
		build_side b "$KIND_B"
	fi

	# NAT rulesets.  Mapping lifetime = conntrack UDP stream timeout so idle
	# mappings die together with their conntrack entries.
	local r rns t mode
	for r in "${ROUTERS[@]}"; do
		rns=$(ns "$LAB" "$r")
		mode=${MODE[$r]}
		t=${UDP_TIMEOUT:-$(nsx "$rns" cat /proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream)}
		if [[ $mode == early ]]; then
			early_ruleset "${ADDR[$r]}" | nsx "$rns" nft -f -
		else
			nat_ruleset "$mode" "${ADDR[$r]}" "${LANNET[$r]}" "$t" | nsx "$rns" nft -f -
		fi
	done
	[[ -z $IPV6 ]] || add_ipv6
	write_state
	if impaired; then
		local s
		for s in "${!UPLINK_EDGE[@]}"; do
			start_shim "$s" "${UPLINK_EDGE[$s]}" "${UPLINK_INET[$s]}"
		done
	fi
	trap - EXIT
	echo "natlab: lab $LAB up: a=$KIND_A b=$KIND_B same_nat=$SAME_NAT hairpin=$HAIRPIN delay=${DELAY}ms jitter=${JITTER}ms loss=${LOSS}% rate=${RATE:-none} udp_timeout=${UDP_TIMEOUT:-default}"
}

# ---------------------------------------------------------------------------
# other commands
# ---------------------------------------------------------------------------

resolve_host() {
	local lab=$1 h=$2
	if [[ $h == cgnat ]]; then
		if ns_exists "$(ns "$lab" cgnata)"; then h=cgnata; else h=cgnatb; fi
	fi
	[[ " $ALL_HOSTS " == *" $h "* ]] || die "unknown HOST '$h' (one of: $ALL_HOSTS cgnat)"
	ns_exists "$(ns "$lab" "$h")" || die "lab '$lab' has no host '$h'"
	printf '%s' "$h"
}

cmd_exec() {
	local lab=${1:-} host=${2:-}
	[[ -n $lab && -n $host ]] || usage
	shift 2
	[[ ${1:-} == -- ]] && shift
	(($#)) || die "exec: no command"
	check_lab "$lab"
	host=$(resolve_host "$lab" "$host")
	NATLAB_LAB=$lab NATLAB_HOST=$host exec ip netns exec "$(ns "$lab" "$host")" "$@"
}

cmd_addr() {
	local lab=${1:-} host=${2:-} v
	[[ -n $lab && -n $host ]] || usage
	check_lab "$lab"
	load_state "$lab"
	host=$(resolve_host "$lab" "$host")
	v=ADDR_$host
	[[ -n ${!v:-} ]] || die "no address recorded for $host"
	echo "${!v}"
}

cmd_addr6() {
	local lab=${1:-} host=${2:-} v
	[[ -n $lab && -n $host ]] || usage
	check_lab "$lab"
	load_state "$lab"
	host=$(resolve_host "$lab" "$host")
	v=ADDR6_$host
	[[ -n ${!v:-} ]] || die "no IPv6 address recorded for $host (lab up without --ipv6?)"
	echo "${!v}"
}

# Tear down LAB: kill every process in its namespaces, delete them.
cmd_down() {
	local lab=${1:-}
	[[ -n $lab ]] || usage
	check_lab "$lab"
	local nss=() pids=() n p i
	mapfile -t nss < <(lab_namespaces "$lab")
	for n in "${nss[@]}"; do
		while read -r p; do [[ -n $p ]] && pids+=("$p"); done < <(ip netns pids "$n" 2>/dev/null || true)
	done
	if ((${#pids[@]})); then
		kill -TERM "${pids[@]}" 2>/dev/null || true
		for ((i = 0; i < 40; i++)); do
			local alive=()
			for p in "${pids[@]}"; do
				# zombies (state Z) are dead for our purposes
				if [[ -r /proc/$p/stat ]] && [[ $(awk '{print $3}' "/proc/$p/stat" 2>/dev/null) != Z ]]; then alive+=("$p"); fi
			done
			((${#alive[@]})) || break
			pids=("${alive[@]}")
			sleep 0.05
		done
		if ((i == 40)); then kill -KILL "${pids[@]}" 2>/dev/null || true; fi
	fi
	for n in "${nss[@]}"; do
		# A process started between our scan and now would keep the
		# namespace alive unnamed; sweep once more.
		while read -r p; do [[ -n $p ]] && kill -KILL "$p" 2>/dev/null; done < <(ip netns pids "$n" 2>/dev/null || true)
		ip netns del "$n" 2>/dev/null || true
	done
	rm -rf "${RUN_ROOT:?}/$lab"
	return 0
}

cmd_down_all() {
	local labs=() l n
	if [[ -d $RUN_ROOT ]]; then
		for l in "$RUN_ROOT"/*/; do
			[[ -d $l ]] && labs+=("$(basename "$l")")
		done
	fi
	# Labs whose state dir is gone are recognised by their LAB-inet namespace.
	while read -r n _; do
		if [[ $n =~ ^([a-z0-9]{1,6})-(inet|rv)$ ]]; then labs+=("${BASH_REMATCH[1]}"); fi
	done < <(ip netns list 2>/dev/null || true)
	((${#labs[@]})) || return 0
	mapfile -t labs < <(printf '%s\n' "${labs[@]}" | sort -u)
	for l in "${labs[@]}"; do
		[[ $l =~ ^[a-z0-9]{1,6}$ ]] || continue
		cmd_down "$l"
		echo "natlab: removed lab $l"
	done
}

router_mode() {
	local v=MODE_$1
	printf '%s' "${!v:-}"
}

cmd_flush() {
	local lab=${1:-} host=${2:-}
	[[ -n $lab && -n $host ]] || usage
	check_lab "$lab"
	load_state "$lab"
	host=$(resolve_host "$lab" "$host")
	local n mode
	n=$(ns "$lab" "$host")
	mode=$(router_mode "$host")
	[[ -n $mode ]] || die "flush: $host is not a NAT router"
	local maps="flush map ip natlab eim_in"
	# early has no maps: conntrack is its only state (and masquerade keeps the port).
	[[ $mode == early ]] && maps=""
	[[ $mode != sym && $mode != seqsym && $mode != early ]] && maps+=$'\nflush map ip natlab eim_out\nflush set ip natlab eim_pair'
	[[ $mode == addr ]] && maps+=$'\nflush set ip natlab adf'
	# Hold forwarded UDP while both the mapping maps and conntrack are
	# emptied, otherwise a packet in between would re-learn the old port.
	nsx "$n" nft -f - <<EOF
table ip natlab_flush {
	chain hold { type filter hook forward priority -200; policy accept; meta l4proto udp drop; }
}
$maps
EOF
	nsx "$n" conntrack -F >/dev/null 2>&1 || true
	nsx "$n" nft -f - <<EOF
$maps
delete table ip natlab_flush
EOF
	echo "natlab: flushed conntrack and NAT mappings on $lab-$host"
}

cmd_block() {
	local lab=${1:-} host=${2:-}
	[[ -n $lab && -n $host ]] || usage
	check_lab "$lab"
	host=$(resolve_host "$lab" "$host")
	local n
	n=$(ns "$lab" "$host")
	# Separate table so unblock is a single delete and never touches NAT state.
	# On routers the forward hook matters; on end hosts input/output do.
	nsx "$n" nft -f - <<'EOF'
table ip natlab_block
delete table ip natlab_block
table ip natlab_block {
	chain block_fwd { type filter hook forward priority -100; policy accept; meta l4proto udp counter drop; }
	chain block_in { type filter hook input priority -100; policy accept; iif "lo" accept; meta l4proto udp counter drop; }
	chain block_out { type filter hook output priority -100; policy accept; oif "lo" accept; meta l4proto udp counter drop; }
}
EOF
	echo "natlab: blocked UDP through $lab-$host"
}

cmd_unblock() {
	local lab=${1:-} host=${2:-}
	[[ -n $lab && -n $host ]] || usage
	check_lab "$lab"
	host=$(resolve_host "$lab" "$host")
	nsx "$(ns "$lab" "$host")" nft -f - <<'EOF'
table ip natlab_block
delete table ip natlab_block
EOF
	echo "natlab: unblocked UDP through $lab-$host"
}

cmd_status() {
	local lab=${1:-}
	[[ -n $lab ]] || usage
	check_lab "$lab"
	local nss=() n h p
	mapfile -t nss < <(lab_namespaces "$lab")
	if ((${#nss[@]} == 0)); then
		echo "lab $lab: down"
		return 0
	fi
	if [[ -r $RUN_ROOT/$lab/lab.env ]]; then
		load_state "$lab"
		echo "lab $lab: a=$KIND_A b=$KIND_B same_nat=$SAME_NAT hairpin=$HAIRPIN delay=${DELAY}ms jitter=${JITTER}ms loss=${LOSS}% rate=${RATE:-none} udp_timeout=${UDP_TIMEOUT:-kernel default}"
	else
		echo "lab $lab: (no state file)"
	fi
	if [[ -n ${HOSTS:-} ]]; then
		echo "topology (every '==' is a routed link to $lab-inet 203.0.113.1; '~~' = impaired uplink):"
		local side link
		link="=="
		if impaired || [[ -n $RATE ]]; then link="~~"; fi
		echo "  rv 203.0.113.10 (+203.0.113.11) == inet"
		for side in a b; do
			local path="" v
			v=ADDR_$side
			path="$side ${!v}"
			if ((SAME_NAT)) && [[ $side == b ]]; then
				echo "  $path -- (LAN of nata, same NAT as a)"
				continue
			fi
			if [[ " $HOSTS " == *" nat$side "* ]]; then
				v=ADDR_nat$side
				path+=" -- nat$side [$(router_mode "nat$side")] ${!v}"
			fi
			if [[ " $HOSTS " == *" cgnat$side "* ]]; then
				v=ADDR_cgnat$side
				path+=" -- cgnat$side [$(router_mode "cgnat$side")] ${!v}"
			fi
			echo "  $path $link inet"
		done
	fi
	for n in "${nss[@]}"; do
		h=${n#"$lab"-}
		echo
		echo "=== $n ($h)"
		ip -n "$n" -br addr show | sed 's/^/  /'
		ip -n "$n" route show | sed 's/^/  route: /'
		nsx "$n" tc qdisc show 2>/dev/null | grep -E 'tbf' | sed 's/^/  qdisc: /' || true
		if [[ -n $(nsx "$n" nft list tables 2>/dev/null) ]]; then
			nsx "$n" nft list ruleset | sed 's/^/  | /'
			echo "  conntrack entries: $(nsx "$n" conntrack -C 2>/dev/null || echo '?')"
		fi
		local pids=()
		mapfile -t pids < <(ip netns pids "$n" 2>/dev/null || true)
		for p in "${pids[@]}"; do
			[[ -n $p ]] && echo "  pid $p: $(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-150)"
		done
	done
	local f
	for f in "$RUN_ROOT/$lab"/impair-*.json; do
		[[ -e $f ]] || continue
		echo
		echo "=== impairment $(basename "$f" .json): $(cat "$f")"
	done
}

# miniupnpd (Debian's miniupnpd-nftables: UPnP IGD, NAT-PMP, PCP) on a lab router, installing
# its mappings into the router's nftables next to the lab's NAT (table inet miniupnpd: a
# dstnat-priority prerouting chain for its DNATs and an accept-policy forward chain; the lab's
# own forward chain already accepts DNATed traffic, `ct status dnat`).  See scripts/lab/README.md.
upnp_conf() {
	local host=$1 lannet=$2 max_lifetime=$3 ext_ip=$4 natpmp=$5
	cat <<EOF
# natlab: miniupnpd on $host
ext_ifname=wan
# miniupnpd refuses to map when its external address is reserved, which the lab's
# 203.0.113.0/24 is: a routable stand-in is declared.  Its DNATs match the WAN interface and
# the port only, so they apply to the router's real address; peers announce only the port.
ext_ip=$ext_ip
listening_ip=lan
http_port=0
# NAT-PMP and PCP (one switch in miniupnpd); off with --upnp-only.
enable_natpmp=$natpmp
enable_upnp=yes
secure_mode=yes
# The NAT-PMP/PCP epoch counts from miniupnpd's start, so a restart shows.
system_uptime=no
clean_ruleset_interval=10
min_lifetime=2
max_lifetime=$max_lifetime
upnp_table_name=miniupnpd
upnp_nat_table_name=miniupnpd
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
uuid=6e61746c-6162-4000-8000-$(printf '%012x' "$RANDOM")
allow 1024-65535 $lannet 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
EOF
}

upnp_tables() {
	cat <<'EOF'
table inet miniupnpd
delete table inet miniupnpd
table inet miniupnpd {
	chain forward {
		type filter hook forward priority filter; policy accept;
		jump miniupnpd
	}
	chain miniupnpd {
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump prerouting_miniupnpd
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump postrouting_miniupnpd
	}
	chain prerouting_miniupnpd {
	}
	chain postrouting_miniupnpd {
	}
}
EOF
}

cmd_upnp() {
	local lab=${1:-} host=${2:-} action=${3:-}
	[[ -n $lab && -n $host && -n $action ]] || usage
	shift 3
	local max_lifetime=10 natpmp=yes pcp=yes
	while (($#)); do
		case $1 in
		--max-lifetime) max_lifetime=${2:?}; shift 2 ;;
		--upnp-only) natpmp=no; shift ;;
		--no-pcp) pcp=no; shift ;;
		*) die "unknown option '$1'" ;;
		esac
	done
	[[ $natpmp == yes || $pcp == yes ]] || die "--upnp-only and --no-pcp: choose one"
	[[ $max_lifetime =~ ^[1-9][0-9]*$ ]] || die "--max-lifetime must be a positive integer (seconds)"
	check_lab "$lab"
	load_state "$lab"
	host=$(resolve_host "$lab" "$host")
	[[ -n $(router_mode "$host") ]] || die "upnp: $host is not a NAT router"
	local n pidfile conf log
	n=$(ns "$lab" "$host")
	pidfile=$RUN_DIR/miniupnpd-$host.pid
	conf=$RUN_DIR/miniupnpd-$host.conf
	log=$RUN_DIR/miniupnpd-$host.log
	case $action in
	start)
		[[ ! -s $pidfile ]] || die "upnp: miniupnpd already runs on $host"
		upnp_start "$n" "$host" "$conf" "$log" "$pidfile" "$max_lifetime" "$natpmp" "$pcp"
		echo "natlab: miniupnpd runs on $lab-$host (pid $(cat "$pidfile"), max lifetime ${max_lifetime}s$([[ $pcp == yes ]] || echo ", PCP dropped"))"
		;;
	stop)
		upnp_stop "$pidfile"
		# A router whose mapping service stops keeps none of its mappings.
		upnp_tables | nsx "$n" nft -f -
		echo "natlab: miniupnpd stopped on $lab-$host, its mappings removed"
		;;
	restart)
		upnp_stop "$pidfile"
		upnp_start "$n" "$host" "$conf" "$log" "$pidfile" "$max_lifetime" "$natpmp" "$pcp"
		echo "natlab: miniupnpd restarted on $lab-$host with no mappings (pid $(cat "$pidfile"))"
		;;
	list)
		nsx "$n" nft list chain inet miniupnpd prerouting_miniupnpd 2>/dev/null | grep -E 'dnat' || true
		;;
	*) die "upnp: unknown action '$action' (start, stop, restart, list)" ;;
	esac
}

upnp_stop() {
	local pidfile=$1 pid i
	[[ -s $pidfile ]] || return 0
	pid=$(cat "$pidfile")
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 40; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.05
	done
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$pidfile"
}

# pcp_drop_table yes|no: for "no" (--no-pcp) the router's LAN input drops PCP requests (UDP
# 5351 whose first payload byte, the version, is 2) and passes NAT-PMP ones (version 0); for
# "yes" it drops nothing.  miniupnpd turns NAT-PMP and PCP on and off together, so a router that
# speaks only NAT-PMP is made by filtering in front of it.
pcp_drop_table() {
	echo "table inet natlab_pcp"
	echo "delete table inet natlab_pcp"
	[[ $1 == yes ]] && return 0
	cat <<'EOF'
table inet natlab_pcp {
	chain input {
		type filter hook input priority filter - 1; policy accept;
		iifname "lan" udp dport 5351 @th,64,8 2 counter drop
	}
}
EOF
}

upnp_start() {
	local n=$1 host=$2 conf=$3 log=$4 pidfile=$5 max_lifetime=$6 natpmp=$7 pcp=${8:-yes} wan lannet i
	[[ -x /usr/sbin/miniupnpd ]] || die "upnp: /usr/sbin/miniupnpd is missing (apt-get install miniupnpd-nftables)"
	# A router that comes up has no mappings: the tables start empty.
	upnp_tables | nsx "$n" nft -f -
	pcp_drop_table "$pcp" | nsx "$n" nft -f -
	wan=$(ip -n "$n" -4 -o addr show dev wan | awk '{print $4}' | head -n1)
	lannet=$(ip -n "$n" -4 -o route show dev lan scope link | awk '{print $1}' | head -n1)
	[[ -n $wan && -n $lannet ]] || die "upnp: $host has no wan address or lan route"
	wan=${wan%/*}
	upnp_conf "$host" "$lannet" "$max_lifetime" "192.0.3.${wan##*.}" "$natpmp" >"$conf"
	# setsid + full redirection: it outlives this command; `down` finds it in the namespace.
	# It writes its own pid file (-P; the default one in /var/run is not per namespace).
	rm -f "$pidfile"
	nsx "$n" setsid /usr/sbin/miniupnpd -f "$conf" -P "$pidfile" -d </dev/null >>"$log" 2>&1 &
	for ((i = 0; i < 100; i++)); do
		[[ -s $pidfile ]] && grep -q -e "Listening for NAT-PMP/PCP traffic" -e "HTTP listening on port" "$log" 2>/dev/null && return 0
		sleep 0.05
	done
	cat "$log" >&2
	die "upnp: miniupnpd did not start on $host"
}

main() {
	(($#)) || usage
	local cmd=$1
	shift
	[[ $cmd == -h || $cmd == --help || $cmd == help ]] && usage
	((EUID == 0)) || die "must run as root"
	case $cmd in
	up) cmd_up "$@" ;;
	exec) cmd_exec "$@" ;;
	status) cmd_status "$@" ;;
	down) cmd_down "$@" ;;
	down-all) cmd_down_all ;;
	flush) cmd_flush "$@" ;;
	block) cmd_block "$@" ;;
	unblock) cmd_unblock "$@" ;;
	addr) cmd_addr "$@" ;;
	addr6) cmd_addr6 "$@" ;;
	upnp) cmd_upnp "$@" ;;
	*) usage ;;
	esac
}

main "$@"
