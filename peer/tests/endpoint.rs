//! The library's public API against a rendezvous started in-process on loopback: two endpoints
//! register, one connects to the other by id, the other accepts with the proven id, bytes are
//! echoed, the path becomes direct (loopback lets punching through), and both close cleanly.

use std::sync::Arc;
use std::time::Duration;

use peer::endpoint::TcpTunnel;
use peer::{ConnectError, Endpoint, EndpointConfig, Fingerprint, Identity, PathKind, Rendezvous};

/// Generous: everything here is loopback, but the machine may be busy.
const T: Duration = Duration::from_secs(20);

fn config(server: &str, key: Fingerprint) -> EndpointConfig {
    let mut rendezvous = Rendezvous::pinned(server, key);
    // Nothing listens on loopback 443: no tunnel attempts.
    rendezvous.tcp_tunnel = TcpTunnel::Off;
    let mut config = EndpointConfig::new(rendezvous);
    config.bind = "127.0.0.1:0".parse().unwrap();
    config.measure_nat = false;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_by_id_accept_echo_and_close() {
    let dir = std::env::temp_dir().join(format!("peer-endpoint-test-{}", std::process::id()));
    let server = rendezvous::Server::start(rendezvous::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        &dir,
    ))
    .await
    .expect("rendezvous starts");
    let addr = server.local_addr().to_string();
    let key = server.fingerprint();

    let a = Endpoint::bind(Arc::new(Identity::generate().unwrap()), config(&addr, key))
        .await
        .expect("a binds");
    let b = Endpoint::bind(Arc::new(Identity::generate().unwrap()), config(&addr, key))
        .await
        .expect("b binds");
    let a_reg = a.registered().await.expect("a registers");
    assert_eq!(a_reg.id, a.id());
    b.registered().await.expect("b registers");
    let a_local = a.local_addr().unwrap();

    // B dials A by id while A accepts.
    let accepting = async {
        let incoming = a.accept().await.expect("endpoint open");
        incoming.await.expect("accepted")
    };
    let (accepted, dialed) =
        tokio::time::timeout(T, async { tokio::join!(accepting, b.connect(a.id())) })
            .await
            .expect("connect and accept in time");
    let conn = dialed.expect("connected");
    assert_eq!(conn.peer(), a.id(), "the dialed id");
    assert_eq!(accepted.peer(), b.id(), "the proven id of the dialer");

    // A echoes one stream.
    let echo = tokio::spawn(async move {
        let (mut send, mut recv) = accepted.accept_bi().await.expect("a stream");
        let data = recv.read_to_end(1024).await.expect("the message");
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        accepted.closed().await;
        data.len()
    });
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"echo through the library").await.unwrap();
    send.finish().unwrap();
    let echoed = tokio::time::timeout(T, recv.read_to_end(1024))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(echoed, b"echo through the library");

    // On loopback the punch succeeds: the path watch reports the direct path to A's socket.
    let mut path = conn.path();
    let direct = tokio::time::timeout(T, async {
        loop {
            if let PathKind::Direct(addr) = path.borrow_and_update().path {
                return addr;
            }
            if path.changed().await.is_err() {
                panic!("the link ended before a direct path: {}", *path.borrow());
            }
        }
    })
    .await
    .expect("a direct path on loopback");
    assert_eq!(direct.port(), a_local.port(), "{}", *conn.path().borrow());

    // Our own id is refused before anything is sent.
    let own = b.connect(b.id()).await.unwrap_err();
    assert!(
        matches!(own, ConnectError::OwnId(id) if id == b.id()),
        "{own}"
    );

    conn.close(0u32.into(), b"done");
    assert_eq!(
        tokio::time::timeout(T, echo)
            .await
            .expect("echo task ends")
            .unwrap(),
        echoed.len()
    );
    b.close().await;
    a.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts a rendezvous on loopback with its data in a fresh directory.
async fn start_rendezvous(name: &str) -> (rendezvous::Server, std::path::PathBuf) {
    let dir =
        std::env::temp_dir().join(format!("peer-endpoint-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = rendezvous::Server::start(rendezvous::Config::new(
        "127.0.0.1:0".parse().unwrap(),
        &dir,
    ))
    .await
    .expect("rendezvous starts");
    (server, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_every_task_even_with_a_live_connection() {
    let (server, dir) = start_rendezvous("close").await;
    let addr = server.local_addr().to_string();
    let key = server.fingerprint();
    let a = Endpoint::bind(Arc::new(Identity::generate().unwrap()), config(&addr, key))
        .await
        .expect("a binds");
    let b = Endpoint::bind(Arc::new(Identity::generate().unwrap()), config(&addr, key))
        .await
        .expect("b binds");
    a.registered().await.expect("a registers");
    b.registered().await.expect("b registers");
    let accepting = async { a.accept().await.expect("endpoint open").await };
    let (accepted, dialed) =
        tokio::time::timeout(T, async { tokio::join!(accepting, b.connect(a.id())) })
            .await
            .expect("connect and accept in time");
    let accepted = accepted.expect("accepted");
    let conn = dialed.expect("connected");
    // Each side runs a link task for its connection (and maybe punch sessions).
    let a_tasks = a.path_keeper().tasks.clone();
    let b_tasks = b.path_keeper().tasks.clone();
    assert!(b_tasks.running() >= 1, "b's link task runs");
    assert!(a_tasks.running() >= 1, "a's link task runs");

    // Both connections are still open when their endpoints close.
    assert!(conn.close_reason().is_none() && accepted.close_reason().is_none());
    tokio::time::timeout(T, b.close())
        .await
        .expect("b closes in time");
    assert_eq!(b_tasks.running(), 0, "a task of b outlived close()");
    // Nothing spawns after close either.
    assert!(!b_tasks.spawn(std::future::pending()));
    tokio::time::timeout(T, a.close())
        .await
        .expect("a closes in time");
    assert_eq!(a_tasks.running(), 0, "a task of a outlived close()");
    drop((conn, accepted));
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_use_trust_is_reported_as_a_value_once() {
    let (server, dir) = start_rendezvous("tofu").await;
    let addr = server.local_addr().to_string();
    let known = dir.join("known_servers");
    let tofu_config = || {
        let mut rendezvous = Rendezvous::known_servers(addr.clone(), known.clone());
        rendezvous.tcp_tunnel = TcpTunnel::Off;
        let mut config = EndpointConfig::new(rendezvous);
        config.bind = "127.0.0.1:0".parse().unwrap();
        config.measure_nat = false;
        config
    };
    let first = Endpoint::bind(Arc::new(Identity::generate().unwrap()), tofu_config())
        .await
        .expect("binds");
    tokio::time::timeout(T, first.registered())
        .await
        .expect("registers in time")
        .expect("registers");
    let trusted = first
        .first_use_trust()
        .borrow()
        .clone()
        .expect("the key was trusted on first use");
    assert_eq!(trusted.fingerprint, server.fingerprint());
    assert_eq!(trusted.server_name, addr);
    assert_eq!(trusted.saved_in, known);
    assert_eq!(
        trusted.to_string(),
        format!(
            "trusting rendezvous {addr} key {} on first use (saved in {})",
            server.fingerprint(),
            known.display()
        )
    );
    let saved = std::fs::read_to_string(&known).expect("known servers written");
    assert!(saved.contains(&server.fingerprint().to_string()), "{saved}");
    first.close().await;

    // The second time the key is known: nothing to report.
    let second = Endpoint::bind(Arc::new(Identity::generate().unwrap()), tofu_config())
        .await
        .expect("binds");
    tokio::time::timeout(T, second.registered())
        .await
        .expect("registers in time")
        .expect("registers");
    assert!(second.first_use_trust().borrow().is_none());
    second.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
