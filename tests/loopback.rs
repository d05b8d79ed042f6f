//! End-to-end tests on loopback: the real binaries, port 0, temporary directories.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::frame_io::{read_frame, write_frame};
use common::{ControlMessage, ErrorCode, PROTOCOL_VERSION};
use e2e::{args, listen, peer, peer_run, Proc, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(20);

#[test]
fn register_query_and_chat_both_ways() {
    let dir = TempDir::new("chat");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (mut a, a_id) = listen("a", &dir.path().join("a"), &rv);
    let b_dir = dir.path().join("b");

    // Query: the first lookup asks the server, the second is answered from the cache.
    let mut lookup = args!["lookup", a_id];
    lookup.extend(rv.args());
    let (status, out, err) = peer_run(&b_dir, &lookup, T);
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("from the rendezvous: online"), "{out}");
    assert!(out.contains("127.0.0.1:"), "{out}");
    let (status, out, _) = peer_run(&b_dir, &lookup, T);
    assert!(status.success());
    assert!(out.contains("(cached"), "{out}");

    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    let mut b = peer("b", &b_dir, &connect);
    b.stdout.wait_for(&format!("connected to {a_id}"), T);
    let b_id = a.stdout.wait_for("connected: ", T);
    let b_id = b_id.split_whitespace().nth(1).unwrap().to_owned();

    b.send_line("hello from b");
    let line = a.stdout.wait_for("hello from b", T);
    assert!(line.contains(&b_id), "sender shown: {line}");
    assert!(line.starts_with("[20"), "RFC 3339 time shown: {line}");

    a.send_line("hello from a");
    let line = b.stdout.wait_for("hello from a", T);
    assert!(line.contains(&a_id), "{line}");

    b.send_line("second line");
    a.stdout.wait_for("second line", T);

    // EOF on stdin ends the chat cleanly.
    b.close_stdin();
    assert!(b.wait(T).success());
    a.stdout.wait_for(&format!("chat with {b_id} ended"), T);
    assert!(a.terminate(T).success(), "listen exits 0 on SIGTERM");
}

#[test]
fn registrations_survive_kill_9_and_peers_reregister() {
    let dir = TempDir::new("persist");
    let data = dir.path().join("rv");
    let mut rv = Rendezvous::start(&data, "127.0.0.1:0");
    let addr = rv.addr;

    // One peer registers and leaves; one stays connected.
    let (mut gone, gone_id) = listen("gone", &dir.path().join("gone"), &rv);
    assert!(gone.terminate(T).success());
    let (a, a_id) = listen("a", &dir.path().join("a"), &rv);

    rv.proc.kill9();
    let rv = Rendezvous::start(&data, &addr.to_string());
    rv.proc.stdout.wait_for("2 registered peers loaded", T);

    // The departed peer's registration is still answered, from disk.
    let mut lookup = args!["lookup", "--refresh", gone_id];
    lookup.extend(rv.args());
    let (status, out, err) = peer_run(&dir.path().join("q"), &lookup, T);
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("offline"), "{out}");

    // The connected peer comes back by itself, and can be reached again.
    a.stdout
        .wait_for("re-registered with the rendezvous", Duration::from_secs(30));
    let mut lookup = args!["lookup", "--refresh", a_id];
    lookup.extend(rv.args());
    let (status, out, _) = peer_run(&dir.path().join("q"), &lookup, T);
    assert!(status.success());
    assert!(out.contains("online"), "{out}");
}

#[test]
fn impostor_key_is_refused_and_the_cache_is_refreshed() {
    let dir = TempDir::new("impostor");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a, a_id) = listen("a", &dir.path().join("a"), &rv);
    let (mallory, mallory_id) = listen("mallory", &dir.path().join("m"), &rv);

    // Poison B's cache: A's id at Mallory's address.
    let b_dir = dir.path().join("b");
    let mut lookup = args!["lookup", mallory_id];
    lookup.extend(rv.args());
    assert!(peer_run(&b_dir, &lookup, T).0.success());
    let cache_path = b_dir.join("peers.json");
    let cache = std::fs::read_to_string(&cache_path).unwrap();
    std::fs::write(&cache_path, cache.replace(&mallory_id, &a_id)).unwrap();

    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    let mut b = peer("b", &b_dir, &connect);
    let warning = b.stderr.wait_for("peer key mismatch", T);
    assert!(
        warning.contains(&a_id) && warning.contains(&mallory_id),
        "{warning}"
    );
    b.stdout.wait_for(&format!("connected to {a_id}"), T);
    b.send_line("for a only");
    a.stdout.wait_for("for a only", T);
    assert!(!mallory.stdout.text().contains("for a only"));
    b.close_stdin();
    assert!(b.wait(T).success());
}

#[test]
fn wrong_server_key_is_refused_by_pin_and_by_known_servers() {
    let dir = TempDir::new("serverkey");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let other = "sha256:".to_owned() + &"ab".repeat(32);
    let (status, _, err) = peer_run(
        &dir.path().join("p"),
        &args!["listen", "--server", rv.addr, "--server-key", other],
        T,
    );
    assert!(!status.success());
    assert!(err.contains("rendezvous key mismatch"), "{err}");
    assert!(
        err.contains(&other) && err.contains(&rv.fingerprint),
        "{err}"
    );

    // Trust on first use records the key; a changed key is then refused.
    let q = dir.path().join("q");
    let mut lookup = args![
        "lookup",
        "--refresh",
        "00000000-0000-8000-8000-000000000000",
        "--server",
        rv.addr
    ];
    let (_, _, err) = peer_run(&q, &lookup, T);
    assert!(err.contains("on first use"), "{err}");
    let known = std::fs::read_to_string(q.join("known_servers")).unwrap();
    assert!(known.contains(&rv.fingerprint));
    std::fs::write(q.join("known_servers"), format!("{} {other}\n", rv.addr)).unwrap();
    lookup.truncate(5);
    let (status, _, err) = peer_run(&q, &lookup, T);
    assert!(!status.success());
    assert!(err.contains("rendezvous key mismatch"), "{err}");
}

/// Of several servers, one whose key is none of those pinned is given up for good and the peer
/// registers with another; when every server's key is wrong the peer stops with each reason.
#[test]
fn of_several_servers_one_with_a_wrong_key_is_skipped() {
    let dir = TempDir::new("serverkeys");
    let impostor = Rendezvous::start(&dir.path().join("impostor"), "127.0.0.1:0");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    // The impostor is first in the list (and preferred): its key is not pinned.
    let p = peer(
        "p",
        &dir.path().join("p"),
        &args![
            "listen",
            "--server",
            impostor.addr,
            "--server",
            rv.addr,
            "--server-key",
            rv.fingerprint,
            "--server-key",
            "sha256:".to_owned() + &"cd".repeat(32),
            "--prefer-first-server",
            "--server-tcp",
            "off"
        ],
    );
    let line = p.stdout.wait_for("registered with", T);
    assert!(
        line.contains(&format!("registered with {} (", rv.addr)),
        "{line}"
    );
    drop(p);
    let (status, _, err) = peer_run(
        &dir.path().join("q"),
        &args![
            "listen",
            "--server",
            impostor.addr,
            "--server",
            rv.addr,
            "--server-key",
            "sha256:".to_owned() + &"cd".repeat(32),
            "--server-tcp",
            "off"
        ],
        T,
    );
    assert!(!status.success());
    assert!(
        err.contains("none of the 1 pinned keys") || err.contains("rendezvous key mismatch"),
        "{err}"
    );
    assert!(
        err.contains(&impostor.addr.to_string()) && err.contains(&rv.addr.to_string()),
        "both servers' reasons: {err}"
    );

    // At most 16 servers; one explicit tunnel address names one server's tunnel.
    let mut many = args!["listen"];
    for port in 1..=17 {
        many.extend(args!["--server", format!("127.0.0.1:{port}")]);
    }
    let (status, _, err) = peer_run(&dir.path().join("r"), &many, T);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("17 rendezvous addresses given; at most 16"),
        "{err}"
    );
    let (status, _, err) = peer_run(
        &dir.path().join("r"),
        &args![
            "listen",
            "--server",
            impostor.addr,
            "--server",
            rv.addr,
            "--server-tcp",
            "127.0.0.1:443"
        ],
        T,
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("names one server's tunnel"), "{err}");
}

#[test]
fn unreachable_server_unknown_and_malformed_ids_fail_clearly() {
    let dir = TempDir::new("badinput");
    // A port with nothing behind it.
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (status, _, err) = peer_run(
        &dir.path().join("p"),
        &args!["listen", "--server", closed, "--register-timeout", "2"],
        T,
    );
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("cannot register with the rendezvous"), "{err}");

    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let unknown = "0123456789ab8def8123456789abcdef";
    let mut connect = args!["connect", unknown];
    connect.extend(rv.args());
    let (status, _, err) = peer_run(&dir.path().join("p"), &connect, T);
    assert_eq!(status.code(), Some(1));
    assert!(
        err.contains("is not registered with the rendezvous"),
        "{err}"
    );

    for (bad, expect) in [
        ("xyz", "hex digits"),
        ("0123", "32 hex digits"),
        ("67e55044-10b1-426f-9247-bb680e5fe0c8", "version 4"),
    ] {
        let mut connect = args!["connect", bad];
        connect.extend(rv.args());
        let (status, _, err) = peer_run(&dir.path().join("p"), &connect, T);
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(err.contains(expect), "{bad}: {err}");
    }
}

#[test]
fn identity_is_stable_private_and_checked() {
    let dir = TempDir::new("identity");
    let (status, first, _) = peer_run(dir.path(), &args!["id"], T);
    assert!(status.success());
    let (_, second, _) = peer_run(dir.path(), &args!["id"], T);
    assert_eq!(first, second);
    let id = first.trim();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "8", "version 8 UUID: {id}");
    let key = dir.path().join("identity.pem");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::write(&key, "garbage").unwrap();
    let (status, _, err) = peer_run(dir.path(), &args!["id"], T);
    assert!(!status.success());
    assert!(err.contains("does not hold a valid private key"), "{err}");
}

/// A raw control-protocol client, to send what the real peer never would.
async fn raw_client(server: SocketAddr) -> quinn::Connection {
    let identity = certs::Identity::generate().unwrap();
    let tls = certs::client_config_for_server(
        &identity,
        certs::ServerTrust::FirstUse,
        common::ALPN_RENDEZVOUS,
    )
    .unwrap();
    let client = transport::quic_client_config(tls, Default::default()).unwrap();
    let (endpoint, _, _) = transport::make_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        None,
        Default::default(),
        8,
        None,
    )
    .unwrap();
    endpoint
        .connect_with(client, server, peer::register::RENDEZVOUS_SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

async fn exchange(
    tx: &mut quinn::SendStream,
    rx: &mut quinn::RecvStream,
    body: &[u8],
) -> ControlMessage {
    write_frame(tx, body).await.unwrap();
    let reply = tokio::time::timeout(T, read_frame(rx))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    ControlMessage::decode(&reply).unwrap()
}

fn code_of(msg: &ControlMessage) -> ErrorCode {
    match msg {
        ControlMessage::Error { code, .. } => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn server_survives_garbage_datagrams_and_malformed_frames() {
    let dir = TempDir::new("garbage");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");

    // 1,000 garbage datagrams: random bytes, QUIC-looking headers, STUN-shaped junk.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..1000u32 {
        let len = 1 + (rand::random::<u32>() % 1400) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        match i % 3 {
            0 => data[0] |= 0xC0,
            1 if len >= 20 => {
                data[0] &= 0x3F;
                data[4..8].copy_from_slice(&common::stun::MAGIC_COOKIE.to_be_bytes());
            }
            _ => {}
        }
        sock.send_to(&data, rv.addr).unwrap();
    }
    // STUN still answers correctly. The garbage may have overflowed the server's socket buffer,
    // so ask a few times, as any STUN client would.
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 1500];
    let mut mapped = None;
    'ask: for _ in 0..20 {
        sock.send_to(&common::stun::binding_request([9; 12]), rv.addr)
            .unwrap();
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Ok(common::stun::StunPacket::BindingSuccess {
                transaction,
                mapped: m,
            }) = common::stun::decode(&buf[..n])
            {
                if transaction == [9; 12] {
                    mapped = Some(m);
                    break 'ask;
                }
            }
        }
    }
    let mapped = mapped.expect("a STUN answer after the garbage");
    assert_eq!(mapped, sock.local_addr().unwrap());

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // Requests before `register` are refused.
        let conn = raw_client(rv.addr).await;
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        let query = ControlMessage::Query {
            id: "00000000-0000-8000-8000-000000000000".parse().unwrap(),
        };
        assert_eq!(
            code_of(&exchange(&mut tx, &mut rx, &query.encode()).await),
            ErrorCode::NotRegistered
        );

        // After registering: malformed JSON, unknown type, bad fields each get their code and the
        // stream keeps working.
        let conn = raw_client(rv.addr).await;
        let (mut tx, mut rx) = conn.open_bi().await.unwrap();
        let register = ControlMessage::Register {
            version: PROTOCOL_VERSION,
            local_addrs: vec![],
            mapped_port: None,
        };
        assert!(matches!(
            exchange(&mut tx, &mut rx, &register.encode()).await,
            ControlMessage::Registered { .. }
        ));
        assert_eq!(
            code_of(&exchange(&mut tx, &mut rx, b"{not json").await),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(&exchange(&mut tx, &mut rx, br#"{"type":"teleport"}"#).await),
            ErrorCode::UnknownType
        );
        assert_eq!(
            code_of(&exchange(&mut tx, &mut rx, br#"{"type":"query","id":"nope"}"#).await),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code_of(&exchange(&mut tx, &mut rx, &query.encode()).await),
            ErrorCode::NotFound
        );
        assert_eq!(
            exchange(&mut tx, &mut rx, &ControlMessage::Ping { seq: 5 }.encode()).await,
            ControlMessage::Pong { seq: 5 }
        );
        // A request stream with bad JSON gets an error too.
        let (mut rtx, mut rrx) = conn.open_bi().await.unwrap();
        assert_eq!(
            code_of(&exchange(&mut rtx, &mut rrx, b"\xff\xfe").await),
            ErrorCode::BadRequest
        );

        // An oversized frame: `too_large`, then the connection is closed.
        tx.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let reply = tokio::time::timeout(T, read_frame(&mut rx))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            code_of(&ControlMessage::decode(&reply).unwrap()),
            ErrorCode::TooLarge
        );
        let reason = tokio::time::timeout(T, conn.closed()).await.unwrap();
        assert!(reason.to_string().contains("bad frame"), "{reason}");
    });

    // The server still serves a fresh peer end to end.
    let (mut a, a_id) = listen("a", &dir.path().join("a"), &rv);
    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    let mut b = peer("b", &dir.path().join("b"), &connect);
    b.stdout.wait_for("connected to", T);
    b.send_line("still alive");
    a.stdout.wait_for("still alive", T);
    b.close_stdin();
    assert!(b.wait(T).success());
    assert!(a.terminate(T).success());
}

/// A loopback UDP port that was free a moment ago.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A loopback TCP port that was free a moment ago.
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A rendezvous on loopback with the RFC 5780 alternates (127.0.0.2 and port `alt`) and `extra`
/// arguments.
fn stun_server(dir: &TempDir, alt: u16, extra: &[&str]) -> Rendezvous {
    let data = dir.path().join("rv");
    let alt = alt.to_string();
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--tcp-listen",
        "off",
        "--stun-alt-port",
        &alt,
        "--stun-alt-ip",
        "127.0.0.2",
    ];
    args.extend_from_slice(extra);
    Rendezvous::ready(e2e::Proc::spawn(
        "rendezvous",
        &e2e::bin("rendezvous"),
        &args,
    ))
}

#[test]
fn stun_behaviour_discovery_and_metrics() {
    let dir = TempDir::new("stun5780");
    // A free port for the alternate STUN socket and for metrics.
    let alt = free_udp_port();
    let metrics_port = free_tcp_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let rv = stun_server(&dir, alt, &["--metrics", &metrics_addr]);
    // The alternate IP and port (loopback has all of 127.0.0.0/8).
    let other: SocketAddr = format!("127.0.0.2:{alt}").parse().unwrap();
    let alt_port: SocketAddr = format!("127.0.0.1:{alt}").parse().unwrap();
    let alt_ip: SocketAddr = SocketAddr::new("127.0.0.2".parse().unwrap(), rv.addr.port());

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let ask = |request: &[u8], to: SocketAddr| -> (SocketAddr, Vec<u8>) {
        let mut buf = [0u8; 1500];
        for _ in 0..10 {
            sock.send_to(request, to).unwrap();
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                return (from, buf[..n].to_vec());
            }
        }
        panic!("no STUN answer from {to}");
    };
    use common::stun5780::{binding_request_with_change, parse_response_addresses};
    // Plain request: answered from the main port, which reports itself and the alternate.
    let (from, response) = ask(&binding_request_with_change([1; 12], false, false), rv.addr);
    assert_eq!(from, rv.addr);
    assert_eq!(
        parse_response_addresses(&response),
        (Some(rv.addr), Some(other))
    );
    assert_eq!(
        common::stun::decode(&response),
        Ok(common::stun::StunPacket::BindingSuccess {
            transaction: [1; 12],
            mapped: sock.local_addr().unwrap()
        })
    );
    // CHANGE-REQUEST: each change is answered from the matching socket, which says so.
    for (n, (ip, port, expect)) in [
        (false, true, alt_port),
        (true, false, alt_ip),
        (true, true, other),
    ]
    .into_iter()
    .enumerate()
    {
        let (from, response) = ask(
            &binding_request_with_change([2 + n as u8; 12], ip, port),
            rv.addr,
        );
        assert_eq!(from, expect, "change ip {ip} port {port}");
        assert_eq!(parse_response_addresses(&response).0, Some(expect));
        // A response is never much larger than its request.
        assert!(response.len() <= 84);
    }
    // Asked on the alternate port, a port change answers from the main port.
    let (from, _) = ask(&binding_request_with_change([9; 12], false, true), alt_port);
    assert_eq!(from, rv.addr);

    // Metrics are scraped over HTTP and count what happened.
    use std::io::{Read, Write};
    let mut http = std::net::TcpStream::connect(&metrics_addr).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    let answered = text
        .lines()
        .find(|l| l.starts_with("rendezvous_stun_requests_total{outcome=\"answered\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .expect("STUN counter");
    assert!(answered >= 4, "{text}");
    assert!(text.contains("rendezvous_registered_peers 0"), "{text}");
    let mut http = std::net::TcpStream::connect(&metrics_addr).unwrap();
    http.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    http.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
}

/// `rendezvous serve` with no STUN option serves behaviour discovery on a second port (the
/// listen port + 1; with `--listen` port 0, as here, an ephemeral port) and says at start what
/// one IP offers (port changes only: mapping and filtering by port) and what a second IP would
/// add; `--stun-alt-port off` serves none and says so.
#[test]
fn stun_discovery_on_a_second_port_by_default_and_off() {
    use common::stun5780::{binding_request_with_change, parse_response_addresses};
    for off in [false, true] {
        let dir = TempDir::new(if off { "stunoff" } else { "stundefault" });
        let data = dir.path().join("rv");
        let mut args = vec![
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
            "--tcp-listen",
            "off",
        ];
        if off {
            args.extend(["--stun-alt-port", "off"]);
        }
        let rv = Rendezvous::ready(e2e::Proc::spawn(
            "rendezvous",
            &e2e::bin("rendezvous"),
            &args,
        ));
        let line = rv
            .proc
            .stdout
            .wait_for("STUN behaviour discovery", Duration::from_secs(10));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let ask = |request: &[u8]| -> (SocketAddr, Vec<u8>) {
            let mut buf = [0u8; 1500];
            for _ in 0..10 {
                sock.send_to(request, rv.addr).unwrap();
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    return (from, buf[..n].to_vec());
                }
            }
            panic!("no STUN answer from {}", rv.addr);
        };
        // Binding error class (0x0111) with ERROR-CODE 420.
        let is_420 =
            |r: &[u8]| r.get(..2) == Some(&[0x01, 0x11][..]) && r.windows(2).any(|w| w == [4, 20]);
        if off {
            assert!(line.contains("discovery off"), "{line}");
            assert!(line.contains("--stun-alt-port PORT"), "{line}");
            let (from, response) = ask(&binding_request_with_change([3; 12], false, true));
            assert_eq!(from, rv.addr);
            assert!(is_420(&response), "{response:02x?}");
            continue;
        }
        assert!(line.contains("(one IP)"), "{line}");
        assert!(
            line.contains("mapping and filtering by port only"),
            "{line}"
        );
        assert!(line.contains("--stun-alt-ip"), "{line}");
        let alt: SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        assert_eq!(alt.ip(), rv.addr.ip());
        assert_ne!(alt.port(), rv.addr.port());
        // A port change is answered from the second port, which says so; with one IP there is
        // no OTHER-ADDRESS (RFC 5780 promises another IP and port there) and no IP change.
        let (from, response) = ask(&binding_request_with_change([1; 12], false, true));
        assert_eq!(from, alt);
        assert_eq!(parse_response_addresses(&response), (Some(alt), None));
        let (from, response) = ask(&binding_request_with_change([2; 12], true, false));
        assert_eq!(from, rv.addr);
        assert!(is_420(&response), "{response:02x?}");
    }
}

/// Interoperability: a standard RFC 5780 client (coturn's `turnutils_natdiscovery`, installed
/// by `.ci/run`) runs its mapping and filtering discovery against the server.
#[test]
fn a_standard_stun_client_understands_the_server() {
    let Ok(client) = which("turnutils_natdiscovery") else {
        // scripts/test.sh installs it when run as root (and .ci/run always does).
        eprintln!("turnutils_natdiscovery not installed (apt-get install coturn); not run here");
        return;
    };
    let dir = TempDir::new("stuninterop");
    let alt = free_udp_port();
    let rv = stun_server(&dir, alt, &[]);
    let out = std::process::Command::new(client)
        .args(["-m", "-f", "-p", &rv.addr.port().to_string(), "127.0.0.1"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running turnutils_natdiscovery");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // It reached every socket (other IP, other port) and, on loopback, finds no NAT behaviour.
    for origin in [
        rv.addr.to_string(),
        format!("127.0.0.2:{}", rv.addr.port()),
        format!("127.0.0.2:{alt}"),
    ] {
        assert!(
            text.contains(&format!("Response origin: : {origin}")),
            "{text}"
        );
    }
    assert!(
        text.contains("NAT with Endpoint Independent Mapping!"),
        "{text}"
    );
    assert!(
        text.contains("NAT with Endpoint Independent Filtering!"),
        "{text}"
    );
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

/// `GET /metrics` from `addr`.
fn scrape(addr: &str) -> String {
    e2e::scrape(addr)
}

/// The value of the sample `name` (with labels) in a scrape.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `peer status --json` of the peer running with `dir`, once its NAT is measured.
fn status_json(dir: &std::path::Path) -> serde_json::Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, out, err) = peer_run(dir, &args!["status", "--json"], T);
        assert!(status.success(), "peer status: {out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        if !report["nat"].is_null() || std::time::Instant::now() > deadline {
            return report;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn ping_status_and_punch_metrics() {
    let dir = TempDir::new("pingstatus");
    let alt = free_udp_port();
    let metrics_port = free_tcp_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let rv = stun_server(&dir, alt, &["--metrics", &metrics]);
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    let (mut a, a_id) = listen("a", &a_dir, &rv);

    // status: registration, observed address, NAT measured against the RFC 5780 service.
    let report = status_json(&a_dir);
    assert_eq!(report["id"], a_id.as_str(), "{report}");
    assert_eq!(report["mode"], "listen", "{report}");
    assert_eq!(report["registration"]["state"], "registered", "{report}");
    assert!(report["registration"]["observed"]
        .as_str()
        .is_some_and(|o| o.starts_with("127.0.0.1:")));
    assert_eq!(report["nat"]["no_nat"], true, "{report}");
    assert_eq!(
        report["nat"]["filtering"], "endpoint_independent",
        "{report}"
    );
    assert_eq!(report["connections"], serde_json::json!([]), "{report}");
    let (_, text, _) = peer_run(&a_dir, &args!["status"], T);
    assert!(text.contains("NAT:            no NAT"), "{text}");

    // Nothing runs with b's config dir yet.
    let (status, _, err) = peer_run(&b_dir, &args!["status"], T);
    assert!(!status.success());
    assert!(err.contains("no peer is running"), "{err}");
    let (status, _, err) = peer_run(&b_dir, &args!["ping", a_id], T);
    assert!(!status.success());
    assert!(err.contains("no peer is running"), "{err}");

    // A ping from a peer of its own (registers, connects, pings, leaves).
    let mut ping = args!["ping", a_id, "--count", "5", "--interval", "0.05", "--json"];
    ping.extend(rv.args());
    let (status, out, err) = peer_run(&b_dir, &ping, T);
    assert!(status.success(), "{out}\n{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("only JSON on stdout");
    assert_eq!(summary["peer"], a_id.as_str());
    assert_eq!(
        (summary["sent"].as_u64(), summary["received"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(summary["direct"], true, "{summary}");
    assert!(summary["path"]
        .as_str()
        .unwrap()
        .starts_with("direct to 127.0.0.1:"));
    assert!(summary["reason"].is_null());
    let rtt = &summary["rtt_ms"];
    assert_eq!(rtt["samples"], 5, "{summary}");
    assert!(
        rtt["min"].as_f64() <= rtt["p50"].as_f64() && rtt["p50"].as_f64() <= rtt["max"].as_f64()
    );
    assert!(
        summary["connect_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{summary}"
    );
    assert!(summary["first_reply_ms"].as_f64() >= summary["connect_ms"].as_f64());
    assert_eq!(summary["peer_nat"]["no_nat"], true, "{summary}");

    // The rendezvous counts the introduction and the punch the dialer reported.
    let deadline = std::time::Instant::now() + T;
    let scraped = loop {
        let text = scrape(&metrics);
        if sample(&text, "rendezvous_punch_results_total{result=\"direct\"}") >= Some(1)
            || std::time::Instant::now() > deadline
        {
            break text;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // At least one: the dial's (on loopback its handshake, riding the introduction, can end
    // on the relay before the punch, and the dialer's NAT measured meanwhile then punches the
    // connection again, which reports too).
    assert!(
        sample(
            &scraped,
            "rendezvous_punch_results_total{result=\"direct\"}"
        ) >= Some(1),
        "{scraped}"
    );
    assert!(sample(&scraped, "rendezvous_introductions_total") >= Some(1));
    // The dialer's first QUIC datagram rode with its introduction (a later one of the same
    // connection, a punch again once the dialer's NAT was measured, has no handshake to carry).
    assert!(
        sample(&scraped, "rendezvous_first_flights_total") >= Some(1),
        "{scraped}"
    );

    // With b running (a chat), ping goes through it and reuses its connection.
    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    let mut b = peer("b", &b_dir, &connect);
    b.stdout.wait_for(&format!("connected to {a_id}"), T);
    let (status, out, err) = peer_run(&b_dir, &args!["ping", a_id, "-c", "3", "--json"], T);
    assert!(status.success(), "{out}\n{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        summary["connect_ms"].is_null(),
        "an open connection is reused: {summary}"
    );
    assert_eq!(summary["received"], 3);
    // The listener pings back over the connection b made; its status lists it with bytes.
    let b_id = a.stdout.wait_for("connected: ", T);
    let b_id = b_id.split_whitespace().nth(1).unwrap().to_owned();
    let (status, out, err) = peer_run(&a_dir, &args!["ping", b_id, "-c", "2"], T);
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains(&format!("pong from {b_id} seq=1 via direct to")),
        "{out}"
    );
    assert!(out.contains("2 sent, 2 received, 0% lost"), "{out}");
    let report = status_json(&a_dir);
    let conns = report["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 1, "{report}");
    assert_eq!(conns[0]["peer"], b_id.as_str());
    assert!(conns[0]["tx_bytes"].as_u64() > Some(0) && conns[0]["rx_bytes"].as_u64() > Some(0));
    assert!(conns[0]["path"].as_str().unwrap().starts_with("direct to"));

    // The listener dials a peer it has no connection to, pings it and closes that connection.
    let (mut c, c_id) = listen("c", &dir.path().join("c"), &rv);
    let (status, out, err) = peer_run(&a_dir, &args!["ping", c_id, "-c", "2", "--json"], T);
    assert!(status.success(), "{out}\n{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        summary["connect_ms"].as_f64().is_some(),
        "dialed for the ping: {summary}"
    );
    assert_eq!(summary["received"], 2, "{summary}");
    let report = status_json(&a_dir);
    let peers: Vec<&str> = report["connections"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["peer"].as_str())
        .collect();
    assert_eq!(
        peers,
        [b_id.as_str()],
        "the ping's connection is closed: {report}"
    );
    assert!(c.terminate(T).success());

    // Errors are said, not hung on.
    let (status, _, err) = peer_run(&b_dir, &args!["ping", b_id], T);
    assert!(!status.success());
    assert!(err.contains("own id"), "{err}");
    let stranger = "0f0e0d0c-0b0a-8908-8706-050403020100";
    let (status, _, err) = peer_run(&b_dir, &args!["ping", stranger], T);
    assert!(!status.success());
    assert!(err.contains("not registered"), "{err}");
    let text = scrape(&metrics);
    assert!(
        sample(&text, "rendezvous_error_replies_total{code=\"not_found\"}") >= Some(1),
        "{text}"
    );

    b.close_stdin();
    assert!(b.wait(T).success());
    assert!(a.terminate(T).success());
}

#[test]
fn netcheck_compares_several_stun_servers() {
    let dir = TempDir::new("netcheck-multi");
    let first = Rendezvous::start(&dir.path().join("rv1"), "127.0.0.1:0");
    let second = Rendezvous::start(&dir.path().join("rv2"), "127.0.0.1:0");
    let (status, out, err) = peer_run(
        &dir.path().join("p"),
        &args![
            "netcheck",
            "--stun",
            first.addr,
            "--stun",
            second.addr,
            "--json",
            // Tests contact nothing but loopback: not the machine's gateway.
            "--no-port-mapping"
        ],
        T,
    );
    assert!(status.success(), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let servers = report["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 2, "{report}");
    for (answer, server) in servers.iter().zip([first.addr, second.addr]) {
        assert_eq!(answer["server"], server.to_string().as_str());
        assert!(answer["mapped"].as_str().is_some(), "{report}");
    }
    // Both saw the same address from the one socket, and there is no NAT on loopback.
    assert_eq!(servers[0]["mapped"], servers[1]["mapped"]);
    assert_eq!(report["no_nat"], true, "{report}");
    assert_eq!(report["mapping"], "endpoint_independent", "{report}");
}

/// Interoperability the other way: `peer netcheck --stun` against a standard RFC 5780 server
/// (coturn's `turnserver`, STUN only, installed by `.ci/run`) on 127.0.0.1 and 127.0.0.2.
#[test]
fn netcheck_understands_a_standard_stun_server() {
    let Ok(server) = which("turnserver") else {
        eprintln!("turnserver not installed (apt-get install coturn); not run here");
        return;
    };
    let dir = TempDir::new("turnserver");
    let (port, alt) = (free_udp_port(), free_udp_port());
    let pidfile = dir.path().join("turnserver.pid");
    let turn = e2e::Proc::spawn(
        "turnserver",
        &server,
        &[
            "-n",
            "--stun-only",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "-L",
            "127.0.0.1",
            "-L",
            "127.0.0.2",
            "--listening-port",
            &port.to_string(),
            "--alt-listening-port",
            &alt.to_string(),
            "--log-file",
            "stdout",
            "--simple-log",
            "--pidfile",
            pidfile.to_str().unwrap(),
        ],
    );
    let target = format!("127.0.0.1:{port}");
    // turnserver prints nothing reliable when ready: ask until it answers.
    let deadline = std::time::Instant::now() + T;
    let report = loop {
        let (status, out, err) = peer_run(
            &dir.path().join("p"),
            &args!["netcheck", "--stun", target, "--json", "--no-port-mapping"],
            T,
        );
        assert!(status.success(), "{out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        if report["udp"] == true || std::time::Instant::now() > deadline {
            break report;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(report["udp"], true, "{report}");
    // It offered behaviour discovery (OTHER-ADDRESS) and answered CHANGE-REQUESTs: loopback
    // neither maps nor filters.
    assert_eq!(report["mapping"], "endpoint_independent", "{report}");
    assert_eq!(report["filtering"], "endpoint_independent", "{report}");
    assert_eq!(report["no_nat"], true, "{report}");
    assert!(
        report["verdict"].as_str().unwrap().contains("no NAT"),
        "{report}"
    );
    drop(turn);
}

/// Piped chats (`printf 'line\n' | peer connect ID`) reusing one listener, in parallel slots: a
/// connector exits 0 only once the listener has shown its line (the `end`/`end_ack` exchange),
/// and none is lost. Closing the connection used to discard a line the listener had not read
/// yet while the connector exited 0.
#[test]
fn two_hundred_piped_chats_lose_nothing() {
    const CHATS: usize = 200;
    // Each slot has its own identity (the rendezvous lets one address register 20 new ones at
    // once) and runs its chats one after another.
    const SLOTS: usize = 10;
    let dir = TempDir::new("piped");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (mut a, a_id) = listen("a", &dir.path().join("a"), &rv);
    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    std::thread::scope(|scope| {
        for slot in 0..SLOTS {
            let (a, connect, slot_dir) = (&a, &connect, dir.path().join(format!("s{slot}")));
            scope.spawn(move || {
                for chat in (slot..CHATS).step_by(SLOTS) {
                    let line = format!("piped line {chat} of {CHATS}");
                    let mut b = peer(&format!("b{chat}"), &slot_dir, connect);
                    b.send_line(&line);
                    b.close_stdin();
                    let status = b.wait(T);
                    assert!(
                        status.success(),
                        "chat {chat}: {status}\n{}",
                        b.stderr.text()
                    );
                    // The listener wrote the line before acknowledging; this test's reader
                    // thread may still be a moment behind.
                    a.stdout.wait_for(&line, Duration::from_secs(5));
                }
            });
        }
    });
    let shown = a.stdout.text();
    for chat in 0..CHATS {
        let line = format!("piped line {chat} of {CHATS}\n");
        assert_eq!(shown.matches(&line).count(), 1, "chat {chat} shown once");
    }
    assert!(a.terminate(T).success());
}

/// A connector whose listener never acknowledges (stopped with SIGSTOP after the connection is
/// up) exits non-zero within the end timeout, saying its lines may be lost.
#[test]
fn a_chat_the_listener_never_acknowledges_fails_within_the_timeout() {
    let dir = TempDir::new("noack");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (mut a, a_id) = listen("a", &dir.path().join("a"), &rv);
    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    let mut b = peer("b", &dir.path().join("b"), &connect);
    b.stdout.wait_for(&format!("connected to {a_id}"), T);
    a.stdout.wait_for("connected: ", T);
    a.pause();
    let stopped = Instant::now();
    b.send_line("into the void");
    b.close_stdin();
    let status = b.wait(common::chat::END_TIMEOUT + T);
    let waited = stopped.elapsed();
    a.resume();
    assert_eq!(status.code(), Some(1), "{}", b.stderr.text());
    let err = b.stderr.text();
    assert!(
        err.contains("did not confirm") && err.contains("may be lost"),
        "{err}"
    );
    assert!(
        waited >= common::chat::END_TIMEOUT,
        "failed only after the timeout: {waited:?}"
    );
    assert!(a.terminate(T).success());
}

/// Peers of older protocol versions (ALPN `p2p-peer/1`, whose chat could lose lines;
/// `p2p-peer/2`, without resumable files and services; `p2p-peer/3`, whose files hash with
/// SHA-256 and end without `file_end`) cannot connect to a version-4 listener: the handshake
/// fails.
#[test]
fn older_peer_versions_cannot_connect() {
    let dir = TempDir::new("oldpeer");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (mut a, a_id) = listen("a", &dir.path().join("a"), &rv);
    let mut lookup = args!["lookup", a_id];
    lookup.extend(rv.args());
    let (status, out, err) = peer_run(&dir.path().join("q"), &lookup, T);
    assert!(status.success(), "{out}\n{err}");
    let addr: SocketAddr = out
        .split_whitespace()
        .find(|w| w.starts_with("127.0.0.1:"))
        .and_then(|w| w.parse().ok())
        .expect("the listener's address");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (n, old) in [b"p2p-peer/1", b"p2p-peer/2", b"p2p-peer/3"]
        .into_iter()
        .enumerate()
    {
        let error = runtime.block_on(async {
            let identity = certs::Identity::generate().unwrap();
            let tls = certs::client_config_for_peer(&identity, a_id.parse().unwrap(), old).unwrap();
            let client = transport::quic_client_config(tls, Default::default()).unwrap();
            let (endpoint, _, _) = transport::make_endpoint(
                "127.0.0.1:0".parse().unwrap(),
                None,
                Default::default(),
                8,
                None,
            )
            .unwrap();
            let connecting = endpoint
                .connect_with(client, addr, peer::register::PEER_SERVER_NAME)
                .unwrap();
            tokio::time::timeout(T, connecting)
                .await
                .expect("the handshake ends")
                .expect_err("an older peer is refused")
        });
        assert!(
            error.to_string().contains("120") || error.to_string().contains("protocol"),
            "{error}"
        );
        a.stderr.wait_for_nth("refused connection from", n + 1, T);
    }
    assert!(a.terminate(T).success());
}

/// The library's echo examples, run as the README tells a newcomer to: a server and a client that
/// finds it by id through a loopback rendezvous; the message comes back byte for byte, and each
/// side names the other by the id its handshake proved.
#[test]
fn echo_examples_round_trip_through_the_library() {
    let dir = TempDir::new("echo");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let addr = rv.addr.to_string();
    let server = Proc::spawn(
        "echo_server",
        &e2e::example("echo_server"),
        &[&addr, &rv.fingerprint],
    );
    let (line, _) = server.wait_for_line("echo server ", T);
    let server_id = line
        .split_whitespace()
        .nth(2)
        .expect("id in the echo server's first line")
        .to_owned();
    let message = "bytes through the peer library";
    let mut client = Proc::spawn(
        "echo_client",
        &e2e::example("echo_client"),
        &[&addr, &rv.fingerprint, &server_id, message],
    );
    client.wait_for_line(&format!("connected to {server_id} in "), T);
    let (echoed, _) = client.wait_for_line("echoed: ", T);
    assert_eq!(echoed.trim_end(), format!("echoed: {message}"));
    assert!(client.wait(T).success(), "{}", client.stderr.text());
    let (from, _) = server.wait_for_line("connection from ", T);
    let client_id = from
        .split_whitespace()
        .nth(2)
        .expect("client id")
        .to_owned();
    assert_ne!(client_id, server_id);
    server.wait_for_line(&format!("echoed {} bytes to {client_id}", message.len()), T);
}

/// The product on a relay channel: a relayed `peer send` (both sides `--relay-only`) has its
/// packets forwarded by the rendezvous as plain UDP datagrams (the metrics count them), and the
/// file arrives whole (the receiver verified its BLAKE3 hash before the sender exits 0).
#[test]
fn a_relayed_send_travels_on_a_relay_channel() {
    let dir = TempDir::new("channel-send");
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let mut argv = e2e::rendezvous_args(&dir.path().join("rv"), "127.0.0.1:0");
    argv.extend(args!["--tcp-listen", "off", "--metrics", metrics]);
    let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
    let rv = Rendezvous::ready(e2e::Proc::spawn(
        "rendezvous",
        &e2e::bin("rendezvous"),
        &refs,
    ));
    let inbox = dir.path().join("inbox");
    std::fs::create_dir_all(&inbox).unwrap();
    let relay_only = args!["--relay-only", "--server-tcp", "off"];
    let mut extra = args!["--accept-files", inbox.to_str().unwrap(), "--allow-any"];
    extra.extend(relay_only.clone());
    let a_dir = dir.path().join("a");
    let mut a = e2e::listen_with("a", &a_dir, &rv, &extra);
    let a_id = e2e::peer_id_of(&a_dir);

    // 8 MB of incompressible bytes.
    let file = dir.path().join("payload.bin");
    let mut bytes = vec![0u8; 8 * 1024 * 1024];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&file, &bytes).unwrap();
    let mut send = args!["send", a_id, file.to_str().unwrap()];
    send.extend(relay_only);
    send.extend(rv.args());
    let (status, out, err) = peer_run(&dir.path().join("b"), &send, Duration::from_secs(60));
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("relayed via rendezvous"), "{out}");
    assert!(out.contains("verified by the receiver"), "{out}");
    assert_eq!(std::fs::read(inbox.join("payload.bin")).unwrap(), bytes);

    let text = scrape(&metrics);
    let forwarded = sample(
        &text,
        "rendezvous_relay_channel_datagrams_total{outcome=\"forwarded\"}",
    )
    .unwrap_or(0);
    let relayed = sample(&text, "rendezvous_relay_packets_total").unwrap_or(0);
    // 8 MB is about 6,000 packets; all but the first (before each side's channel was
    // granted, a round trip to the rendezvous after the handshake's first relayed packets)
    // travel on it. Half at least, whatever the machine's load.
    eprintln!("relay channel: {forwarded} of {relayed} relayed packets");
    assert!(forwarded > 3_000, "{text}");
    assert!(forwarded * 2 >= relayed, "{forwarded} of {relayed}\n{text}");
    // Both sides asked (and, were the transfer slow, refreshed).
    assert!(
        sample(
            &text,
            "rendezvous_relay_channel_requests_total{result=\"granted\"}"
        )
        .unwrap_or(0)
            >= 2,
        "{text}"
    );
    assert!(a.terminate(T).success());
}

/// `peer status` says when a relayed connection runs on a relay channel, on both sides; with
/// `--no-relay-channel` the connection stays on the relay stream and says nothing of a channel.
#[test]
fn status_shows_a_relayed_connection_on_its_relay_channel() {
    let dir = TempDir::new("channel-status");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    for (case, extra) in [("channel", vec![]), ("stream", args!["--no-relay-channel"])] {
        let mut flags = args!["--relay-only", "--server-tcp", "off"];
        flags.extend(extra.clone());
        let a_dir = dir.path().join(format!("a-{case}"));
        let mut a = e2e::listen_with("a", &a_dir, &rv, &flags);
        let a_id = e2e::peer_id_of(&a_dir);
        let b_dir = dir.path().join(format!("b-{case}"));
        let mut connect = args!["connect", a_id];
        connect.extend(flags.clone());
        connect.extend(rv.args());
        let mut b = peer("b", &b_dir, &connect);
        b.stdout.wait_for(&format!("connected to {a_id}"), T);
        // A message each way: both sides' packets have come through the relay.
        b.send_line("over the relay");
        a.stdout.wait_for("over the relay", T);
        a.send_line("and back");
        b.stdout.wait_for("and back", T);
        for dir in [&a_dir, &b_dir] {
            let deadline = Instant::now() + T;
            loop {
                let (status, out, err) = peer_run(dir, &args!["status", "--json"], T);
                assert!(status.success(), "peer status: {out}\n{err}");
                let report: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
                let path = report["connections"][0]["path"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                assert!(path.starts_with("relayed via rendezvous (UDP)"), "{report}");
                let on_channel = path.ends_with("on a relay channel");
                if case == "stream" {
                    assert!(!on_channel, "{report}");
                    break;
                }
                if on_channel {
                    break;
                }
                assert!(Instant::now() < deadline, "no relay channel: {report}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        b.close_stdin();
        assert!(b.wait(T).success());
        assert!(a.terminate(T).success());
    }
}
