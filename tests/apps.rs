//! End-to-end tests on loopback of the apps people use a peer link for: ssh through `peer pipe`
//! to a real sshd, HTTP through `peer forward` with many parallel requests, a `peer send`
//! interrupted by killing the receiver and resumed, and peers refused with a clear error.
//!
//! Real servers are started by the tests on 127.0.0.1 (sshd with its own host key and config,
//! `python3 -m http.server`); a test whose program is missing skips with a message.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{
    args, bin, listen_with, peer, peer_args, peer_id_of, peer_run, Proc, Rendezvous, TempDir,
};

const T: Duration = Duration::from_secs(20);

/// Whether `program` can be run (`--help`-like probe not needed: it exists and is executable).
fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Deterministic bytes that differ at every offset (a resume at the wrong place shows).
fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Serves one SSH connection the way inetd does: a listener on 127.0.0.1 port 0 (so no port
/// is guessed and none can be taken by another process), and `sshd -i` run on the accepted
/// connection. Returns the address and a thread that yields sshd's log once it exits.
fn sshd_on_one_connection(
    sshd: &Path,
    config: &Path,
) -> (SocketAddr, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (sshd, config) = (sshd.to_owned(), config.to_owned());
    let server = std::thread::spawn(move || {
        let (conn, _) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(err) => return format!("accept failed: {err}"),
        };
        let input = match conn.try_clone() {
            Ok(input) => input,
            Err(err) => return format!("dup failed: {err}"),
        };
        let output = Command::new(&sshd)
            .arg("-i")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(std::os::fd::OwnedFd::from(input))
            .stdout(std::os::fd::OwnedFd::from(conn))
            .stderr(Stdio::piped())
            .output();
        match output {
            Ok(out) => String::from_utf8_lossy(&out.stderr).into_owned(),
            Err(err) => format!("sshd did not start: {err}"),
        }
    });
    (addr, server)
}

#[test]
fn ssh_runs_through_peer_pipe_to_a_real_sshd() {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() || !have("ssh") || !have("ssh-keygen") || !have("sha256sum") {
        eprintln!(
            "skipped: needs /usr/sbin/sshd, ssh, ssh-keygen and sha256sum (Debian: apt-get \
             install openssh-server openssh-client)"
        );
        return;
    }
    let dir = TempDir::new("ssh");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for key in ["host", "user"] {
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
            .arg(keys.join(key))
            .status()
            .unwrap();
        assert!(status.success(), "ssh-keygen {key}");
    }
    std::fs::copy(keys.join("user.pub"), keys.join("authorized_keys")).unwrap();
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // sshd's privilege separation directory (Debian's service unit creates it).
        std::fs::create_dir_all("/run/sshd").unwrap();
    }
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "HostKey {host}\nPidFile none\n\
             AuthorizedKeysFile {auth}\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin prohibit-password\n\
             LogLevel VERBOSE\n",
            host = keys.join("host").display(),
            auth = keys.join("authorized_keys").display(),
        ),
    )
    .unwrap();
    let (sshd_addr, sshd_log) = sshd_on_one_connection(sshd, &config);

    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let b_id = peer_id_of(&b_dir);
    let a = listen_with(
        "a",
        &a_dir,
        &rv,
        &args!["--expose", format!("ssh={sshd_addr}"), "--allow", b_id],
    );
    a.wait_for_line("exposing ssh=127.0.0.1:", T);
    let a_id = peer_id_of(&a_dir);
    // ssh knows the host by the peer id (%h), with the key of this test's sshd.
    let host_pub = std::fs::read_to_string(keys.join("host.pub")).unwrap();
    let known = dir.path().join("known_hosts");
    std::fs::write(&known, format!("{a_id} {host_pub}")).unwrap();
    let mut pipe = vec![bin("peer").to_str().unwrap().to_owned()];
    pipe.extend(peer_args(&b_dir, &args!["pipe", "%h", "ssh"]));
    pipe.extend(rv.args());
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_owned();
    // A megabyte of stdin through ssh, hashed by the remote shell: every byte crossed both
    // ways intact, and ssh's exit status is the remote command's.
    let payload = dir.path().join("payload.bin");
    std::fs::write(&payload, pseudo_random(1 << 20)).unwrap();
    let local_hash = String::from_utf8(
        Command::new("sha256sum")
            .arg(&payload)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .split_whitespace()
    .next()
    .unwrap()
    .to_owned();
    let started = Instant::now();
    let out = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-i")
        .arg(keys.join("user"))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known.display()))
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("ProxyCommand={}", pipe.join(" ")))
        .args(["-l", &user, &a_id, "echo through-the-pipe; sha256sum"])
        .stdin(std::fs::File::open(&payload).unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // sshd -i ends with the connection; if ssh never reached it, its thread is still waiting.
    let sshd_text = match sshd_log.is_finished() {
        true => sshd_log
            .join()
            .unwrap_or_else(|_| "sshd thread panicked".to_owned()),
        false => "(sshd got no connection)".to_owned(),
    };
    assert!(
        out.status.success(),
        "ssh failed ({:?}):\nstdout:\n{stdout}\nstderr:\n{stderr}\nsshd:\n{sshd_text}\nlistener:\n{}",
        out.status,
        a.stderr.text()
    );
    assert!(stdout.contains("through-the-pipe"), "{stdout}");
    assert!(
        stdout.contains(&local_hash),
        "the remote hash of the payload: {stdout}"
    );
    eprintln!("ssh through peer pipe: {:?}", started.elapsed());
}

/// `GET /PATH` over a fresh connection to `addr` (HTTP/1.0: the server closes after the
/// response, and its end of data must cross the peers). Returns the status line and the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(String, Vec<u8>)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(T))?;
    // Like curl: no half-close of our own (a server that closes at once would reset a FIN that
    // arrives after its close, and the reset would discard the response still in flight).
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response)?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            std::io::Error::other(format!("no header end in {} bytes", response.len()))
        })?;
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, response[split + 4..].to_vec()))
}

#[test]
fn http_through_peer_forward_with_many_parallel_requests() {
    if !have("python3") {
        eprintln!("skipped: needs python3 (for python3 -m http.server)");
        return;
    }
    let dir = TempDir::new("forward");
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let body = pseudo_random(512 << 10);
    std::fs::write(site.join("data.bin"), &body).unwrap();
    let mut http = Proc::spawn(
        "http",
        Path::new("python3"),
        &[
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
            site.to_str().unwrap(),
        ],
    );
    let line = http.stdout.wait_for("Serving HTTP on", T);
    let http_port: u16 = line
        .split_whitespace()
        .skip_while(|w| *w != "port")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));

    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let b_id = peer_id_of(&b_dir);
    let a = listen_with(
        "a",
        &a_dir,
        &rv,
        &args![
            "--expose",
            format!("web=127.0.0.1:{http_port}"),
            "--allow",
            b_id
        ],
    );
    let a_id = peer_id_of(&a_dir);
    let mut forward_args = args!["forward", a_id, "web", "--local", "127.0.0.1:0"];
    forward_args.extend(rv.args());
    let mut forward = peer("forward", &b_dir, &forward_args);
    let (line, _) = forward.wait_for_line("forwarding 127.0.0.1:", T);
    let local: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    // Many requests at once, each on its own TCP connection and so its own QUIC stream.
    const PARALLEL: usize = 32;
    let started = Instant::now();
    let fetches: Vec<_> = (0..PARALLEL)
        .map(|_| std::thread::spawn(move || http_get(local, "/data.bin")))
        .collect();
    for (i, fetch) in fetches.into_iter().enumerate() {
        let (status, got) = fetch
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("request {i}: {e}\nforward:\n{}", forward.stderr.text()));
        assert!(status.contains(" 200 "), "request {i}: {status}");
        assert!(
            got == body,
            "request {i}: {} bytes, not the file",
            got.len()
        );
    }
    eprintln!("{PARALLEL} parallel fetches: {:?}", started.elapsed());
    let (status, _) = http_get(local, "/missing").unwrap();
    assert!(status.contains(" 404 "), "{status}");

    // The service goes down: the next local client is reset, and both sides say why.
    http.kill9();
    let refused = http_get(local, "/data.bin");
    assert!(
        refused.is_err(),
        "a client of a service that is down sees an error, got {refused:?}"
    );
    forward.stderr.wait_for("is down", T);
    a.stderr.wait_for("is down", T);
    assert!(forward.terminate(T).success());
}

/// The `.part` file in `dir`, if there is one, and its size.
fn part_in(dir: &Path) -> Option<(PathBuf, u64)> {
    std::fs::read_dir(dir).ok()?.find_map(|e| {
        let e = e.ok()?;
        let name = e.file_name().to_string_lossy().into_owned();
        (name.ends_with(".part")).then(|| (e.path(), e.metadata().map(|m| m.len()).unwrap_or(0)))
    })
}

#[test]
fn a_transfer_interrupted_by_killing_the_receiver_resumes_to_a_verified_file() {
    let dir = TempDir::new("resume");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let recv = dir.path().join("recv");
    std::fs::create_dir_all(&recv).unwrap();
    let b_id = peer_id_of(&b_dir);
    let listen_args = args!["--accept-files", recv.to_str().unwrap(), "--allow", b_id];
    let mut a = listen_with("a", &a_dir, &rv, &listen_args);
    let a_id = peer_id_of(&a_dir);
    const SIZE: usize = 192 << 20;
    let big = dir.path().join("big.bin");
    std::fs::write(&big, pseudo_random(SIZE)).unwrap();
    let mut send = args!["send", a_id, big.to_str().unwrap()];
    send.extend(rv.args());
    let mut b = peer("b", &b_dir, &send);
    a.wait_for_line("receiving big.bin", T);
    // Kill the receiver (SIGKILL: no chance to clean up) once about half has arrived.
    let deadline = Instant::now() + Duration::from_secs(120);
    let held = loop {
        if let Some((_, len)) = part_in(&recv).filter(|(_, len)| *len >= SIZE as u64 / 2) {
            a.kill9();
            break len;
        }
        assert!(
            Instant::now() < deadline && b.running(),
            "the transfer never got to half: {:?}\n{}",
            part_in(&recv),
            b.stderr.text()
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    b.kill9();
    let (_, kept) = part_in(&recv).expect("the .part file survives the kill");
    assert!(
        kept >= held && kept < SIZE as u64,
        "interrupted: {kept} of {SIZE} bytes kept"
    );
    eprintln!("interrupted with {kept} of {SIZE} bytes received");

    // The receiver restarts; the same file is sent again and only the rest crosses.
    let a = listen_with("a2", &a_dir, &rv, &listen_args);
    let (status, out, err) = peer_run(&b_dir, &send, Duration::from_secs(120));
    assert!(
        status.success(),
        "{out}\n{err}\nreceiver:\n{}",
        a.stdout.text()
    );
    assert!(out.contains("resumed at byte"), "{out}\n{err}");
    assert!(out.contains("verified by the receiver"), "{out}");
    assert!(err.contains("resuming big.bin at byte"), "{err}");
    let line = a.wait_for_line("received ", T).0;
    assert!(line.contains("resumed at byte"), "{line}");
    assert!(part_in(&recv).is_none(), "no .part file left");
    let stored = std::fs::read(recv.join("big.bin")).unwrap();
    assert!(
        stored == pseudo_random(SIZE),
        "the stored file is the sent one"
    );
}

#[test]
fn refused_peers_and_services_get_a_clear_error() {
    // Exposing without an allow-list refuses to start, before anything is bound.
    let dir = TempDir::new("refused");
    let lone = dir.path().join("lone");
    for extra in [
        args!["--expose", "ssh=127.0.0.1:22"],
        args!["--expose", "ssh=127.0.0.1:22", "--allow-any"],
    ] {
        let mut all = args!["listen"];
        all.extend(extra);
        all.extend(args!["--server", "127.0.0.1:9"]);
        let (status, out, err) = peer_run(&lone, &all, T);
        assert!(!status.success(), "{out}");
        assert!(err.contains("--expose needs an allow-list"), "{err}");
    }

    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a_dir, b_dir, m_dir) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("m"),
    );
    let b_id = peer_id_of(&b_dir);
    let m_id = peer_id_of(&m_dir);
    let listen_args = args![
        "--expose",
        format!("echo=127.0.0.1:{port}"),
        "--allow",
        b_id
    ];
    let mut a = listen_with("a", &a_dir, &rv, &listen_args);
    let a_id = peer_id_of(&a_dir);

    // A peer not on the allow-list: pipe and forward both fail with the reason.
    let mut pipe = args!["pipe", a_id, "echo"];
    pipe.extend(rv.args());
    let (status, _, err) = peer_run(&m_dir, &pipe, T);
    assert!(!status.success());
    assert!(
        err.contains("refused the connection: not on this peer's allow-list"),
        "{err}"
    );
    let mut forward = args!["forward", a_id, "echo", "--local", "127.0.0.1:0"];
    forward.extend(rv.args());
    let (status, _, err) = peer_run(&m_dir, &forward, T);
    assert!(!status.success());
    assert!(
        err.contains("refused the connection: not on this peer's allow-list"),
        "{err}"
    );
    a.stderr.wait_for(&format!("refused {m_id} "), T);

    // An allowed peer asking for a service that is not exposed.
    let mut forward = args!["forward", a_id, "nope", "--local", "127.0.0.1:0"];
    forward.extend(rv.args());
    let (status, _, err) = peer_run(&b_dir, &forward, T);
    assert!(!status.success());
    assert!(
        err.contains("refused service \"nope\"") && err.contains("not exposed by this peer"),
        "{err}"
    );
    assert!(err.contains("it exposes: echo"), "{err}");
    a.stderr.wait_for("refused a service stream", T);

    // The allowed peer and the exposed service: bytes cross both ways, and `pipe` exits 0
    // once the service closed its side and every byte of ours was acknowledged.
    // The service answers only once it has read to the end: it needs the client's half-close.
    let server = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut tcp, _) = service.accept().unwrap();
            let mut got = Vec::new();
            tcp.read_to_end(&mut got).unwrap();
            got.reverse();
            tcp.write_all(&got).unwrap();
        }
    });
    let mut pipe = peer("pipe", &b_dir, &{
        let mut all = args!["pipe", a_id, "echo"];
        all.extend(rv.args());
        all
    });
    pipe.send_line("hello through the pipe");
    pipe.close_stdin();
    assert!(pipe.wait(T).success(), "{}", pipe.stderr.text());
    pipe.stdout.wait_closed(T);
    assert_eq!(pipe.stdout.text().trim(), "epip eht hguorht olleh");

    // The same through `peer forward`: the local client's half-close reaches the service, and
    // the answer and the service's end of data come back.
    let mut forward = args!["forward", a_id, "echo", "--local", "127.0.0.1:0"];
    forward.extend(rv.args());
    let mut forward = peer("forward", &b_dir, &forward);
    let (line, _) = forward.wait_for_line("forwarding 127.0.0.1:", T);
    let local: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let exchange = |text: &str| {
        let mut tcp = TcpStream::connect(local).unwrap();
        tcp.set_read_timeout(Some(T)).unwrap();
        tcp.write_all(text.as_bytes()).unwrap();
        tcp.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        answer
    };
    assert_eq!(exchange("half-closed"), "desolc-flah");
    // The listener restarts: forward says the connection was lost, and the next local
    // connection dials the listener again.
    assert!(a.terminate(T).success());
    forward.stderr.wait_for("was lost", T);
    let _a = listen_with("a2", &a_dir, &rv, &listen_args);
    assert_eq!(exchange("again"), "niaga");
    server.join().unwrap();
    assert!(forward.terminate(T).success());
}
