# shellcheck shell=bash
# iroh.sh - the iroh contestant for scripts/bench.sh --iroh and scripts/iroh-matrix.sh (issue 16).
# Sourced, not run. Needs ROOT (the repository) set by the sourcing script.
#
# iroh_build: builds bench/iroh (its own workspace: the project's build never compiles iroh) and
# installs the iroh-relay binary of the same iroh release (crates.io, `server` feature), both
# under $CARGO_TARGET_DIR/iroh (default target/iroh); sets IROH_BENCH and IROH_RELAY.
# iroh_relay_start LAB DIR: runs iroh-relay in dev mode (relay over plain HTTP) on LAB-rv at
# 203.0.113.10:3340, with QUIC address discovery on 203.0.113.10:7842 (UDP): iroh endpoints
# learn their public address from it, as ours do from our rendezvous' STUN; it needs TLS even in
# dev mode, so a CA and a certificate for the IP are made in DIR and the endpoints trust that CA
# (IROH_ARGS: --relay-ca DIR/ca.pem). Logs in DIR; waits until it accepts connections; sets
# IROH_RELAY_PID, IROH_RELAY_URL and IROH_ARGS (the relay options of `bench-iroh listen|dial`).

IROH_RELAY_VERSION=1.4.1

iroh_build() {
	local target=${CARGO_TARGET_DIR:-$ROOT/target}
	[[ $target == /* ]] || target=$ROOT/$target
	target=$target/iroh
	(cd "$ROOT/bench/iroh" && CARGO_TARGET_DIR=$target cargo build --release --quiet --locked)
	if [[ ! -x $target/relay/bin/iroh-relay ]] ||
		! "$target/relay/bin/iroh-relay" --version 2>/dev/null | grep -q "$IROH_RELAY_VERSION"; then
		CARGO_TARGET_DIR=$target/relay-build cargo install --quiet --locked --root "$target/relay" \
			--version "$IROH_RELAY_VERSION" --features server iroh-relay
	fi
	IROH_BENCH=$target/release/bench-iroh
	IROH_RELAY=$target/relay/bin/iroh-relay
}

iroh_relay_start() {
	local lab=$1 dir=$2 deadline
	mkdir -p "$dir"
	"$IROH_BENCH" certs --dir "$dir/tls" --ip 203.0.113.10
	cat >"$dir/iroh-relay.toml" <<-TOML
		http_bind_addr = "203.0.113.10:3340"
		enable_metrics = false
		enable_quic_addr_discovery = true
		[tls]
		cert_mode = "Manual"
		manual_cert_path = "$dir/tls/cert.pem"
		manual_key_path = "$dir/tls/key.pem"
		quic_bind_addr = "203.0.113.10:7842"
	TOML
	ip netns exec "$lab-rv" "$IROH_RELAY" --dev --config-path "$dir/iroh-relay.toml" \
		</dev/null >"$dir/iroh-relay.out" 2>&1 &
	IROH_RELAY_PID=$!
	IROH_RELAY_URL=http://203.0.113.10:3340
	IROH_ARGS=(--relay "$IROH_RELAY_URL" --relay-ca "$dir/tls/ca.pem")
	deadline=$((SECONDS + 20))
	until ip netns exec "$lab-rv" python3 -c 'import socket; socket.create_connection(("203.0.113.10", 3340), 0.2)' 2>/dev/null; do
		if ((SECONDS > deadline)) || ! kill -0 "$IROH_RELAY_PID" 2>/dev/null; then
			echo "iroh-relay did not start:" >&2
			cat "$dir/iroh-relay.out" >&2
			return 1
		fi
		sleep 0.05
	done
}
