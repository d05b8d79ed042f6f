//! End-to-end tests on loopback of what a listening peer lets others do and what it leaves on
//! disk: the allow-list (refused peers are told why), received files (never overwritten, bounded,
//! a private `.part` file kept for a resume), and the modes of local state.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use e2e::{args, listen_with, peer, peer_id_of, peer_run, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(20);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// File names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_peer_not_on_the_allow_list_is_refused_told_why_and_logged() {
    let dir = TempDir::new("allowlist");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a_dir, b_dir, m_dir) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("m"),
    );
    let a_id = peer_id_of(&a_dir);
    let b_id = peer_id_of(&b_dir);
    let m_id = peer_id_of(&m_dir);

    // A malformed allow-list is an error naming the file and the line.
    let list = a_dir.join("authorized_peers");
    std::fs::write(&list, format!("# friends\n{b_id} # laptop\n{b_id} phone\n")).unwrap();
    let mut listen = args!["listen"];
    listen.extend(rv.args());
    let (status, out, err) = peer_run(&a_dir, &listen, T);
    assert!(!status.success(), "{out}\n{err}");
    assert!(
        err.contains(&format!("{}:3:", list.display())),
        "the file and line are named: {err}"
    );

    std::fs::write(&list, format!("# friends\n{b_id} # laptop\n\n")).unwrap();
    let mut a = listen_with("a", &a_dir, &rv, &[]);
    a.stdout.wait_for("accepting only 1 allowed peer", T);

    // Mallory knows A's id and dials it: the connection is closed with a reason Mallory prints,
    // and Mallory exits non-zero. Its stdin stays open: the refusal alone ends it.
    let mut connect = args!["connect", a_id];
    connect.extend(rv.args());
    let mut m = peer("m", &m_dir, &connect);
    let status = m.wait(T);
    assert!(!status.success(), "a refused peer exits non-zero");
    m.stderr.wait_closed(T);
    let err = m.stderr.text();
    assert!(
        err.contains(&format!(
            "{a_id} refused the connection: not on this peer's allow-list"
        )),
        "{err}"
    );
    // The listener logged it with the id the TLS handshake proved.
    let refused = a.stderr.wait_for(&format!("refused {m_id} "), T);
    assert!(
        refused.contains("not on this peer's allow-list"),
        "{refused}"
    );
    assert!(!a.stdout.text().contains(&format!("connected: {m_id}")));

    // B is on the list: it connects and chats.
    let mut b = peer("b", &b_dir, &connect);
    b.stdout.wait_for(&format!("connected to {a_id}"), T);
    a.stdout.wait_for(&format!("connected: {b_id}"), T);
    b.send_line("hello from an allowed peer");
    a.stdout.wait_for("hello from an allowed peer", T);
    drop(b);
    assert!(a.terminate(T).success());

    // --allow on the command line, without the file: Mallory is refused, B is not.
    std::fs::remove_file(&list).unwrap();
    let mut a = listen_with("a2", &a_dir, &rv, &args!["--allow", b_id]);
    let mut m = peer("m2", &m_dir, &connect);
    assert!(!m.wait(T).success());
    a.stderr.wait_for(&format!("refused {m_id}"), T);
    let mut b = peer("b2", &b_dir, &connect);
    a.stdout.wait_for(&format!("connected: {b_id}"), T);
    b.send_line("still welcome");
    a.stdout.wait_for("still welcome", T);
    drop(b);
    assert!(a.terminate(T).success());
}

#[test]
fn accepting_files_needs_an_allow_list_or_allow_any() {
    let dir = TempDir::new("files-guard");
    let recv = dir.path().join("recv");
    std::fs::create_dir_all(&recv).unwrap();
    // No server is contacted: the check comes first.
    let listen = args![
        "listen",
        "--accept-files",
        recv.to_str().unwrap(),
        "--server",
        "127.0.0.1:9"
    ];
    let (status, out, err) = peer_run(&dir.path().join("a"), &listen, T);
    assert!(!status.success(), "{out}\n{err}");
    assert!(
        err.contains("--accept-files needs an allow-list") && err.contains("--allow-any"),
        "{err}"
    );
    let mut conflicting = listen.clone();
    conflicting.extend(args![
        "--allow-any",
        "--allow",
        peer_id_of(&dir.path().join("b"))
    ]);
    let (status, _, err) = peer_run(&dir.path().join("a"), &conflicting, T);
    assert!(!status.success());
    assert!(err.contains("--allow-any conflicts"), "{err}");
}

#[test]
fn files_are_never_overwritten_oversized_ones_never_written_and_state_is_private() {
    let dir = TempDir::new("files");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let recv = dir.path().join("recv");
    std::fs::create_dir_all(&recv).unwrap();
    let b_id = peer_id_of(&b_dir);
    let mut a = listen_with(
        "a",
        &a_dir,
        &rv,
        &args![
            "--accept-files",
            recv.to_str().unwrap(),
            "--allow",
            b_id,
            "--max-file-size",
            "1K"
        ],
    );
    let a_id = peer_id_of(&a_dir);
    let send = |file: &Path| {
        let mut send = args!["send", a_id, file.to_str().unwrap()];
        send.extend(rv.args());
        peer_run(&b_dir, &send, T)
    };

    // The same name twice: the second is stored beside the first, not over it.
    let outbox = dir.path().join("out");
    std::fs::create_dir_all(&outbox).unwrap();
    let report = outbox.join("report.pdf");
    for (i, content) in ["first version", "second version"].into_iter().enumerate() {
        std::fs::write(&report, content).unwrap();
        let (status, out, err) = send(&report);
        assert!(status.success(), "{out}\n{err}");
        let stored = if i == 0 {
            "report.pdf"
        } else {
            "report (1).pdf"
        };
        assert!(out.contains(&format!("stored as {stored}")), "{out}");
        a.stdout
            .wait_for(&format!("received {}", recv.join(stored).display()), T);
    }
    assert_eq!(
        std::fs::read_to_string(recv.join("report.pdf")).unwrap(),
        "first version"
    );
    assert_eq!(
        std::fs::read_to_string(recv.join("report (1).pdf")).unwrap(),
        "second version"
    );
    assert_eq!(mode(&recv.join("report (1).pdf")), 0o600);

    // Over --max-file-size: refused with the reason, before any byte is written.
    let big = outbox.join("big.bin");
    std::fs::write(&big, vec![7u8; 1025]).unwrap();
    let (status, out, err) = send(&big);
    assert!(!status.success(), "{out}\n{err}");
    assert!(
        err.contains("the receiver refused big.bin") && err.contains("--max-file-size"),
        "{err}"
    );
    a.stderr
        .wait_for(&format!("did not store a file from {b_id}"), T);
    assert_eq!(names_in(&recv), ["report (1).pdf", "report.pdf"]);

    // A name with a control character is refused with a clear error (never printed raw).
    let odd = outbox.join("bell\u{7}.txt");
    std::fs::write(&odd, "x").unwrap();
    let (status, _, err) = send(&odd);
    assert!(!status.success());
    assert!(err.contains("control") && err.contains("\\u{7}"), "{err}");
    assert!(!err.contains('\u{7}'), "{err:?}");
    assert_eq!(names_in(&recv), ["report (1).pdf", "report.pdf"]);

    // Local state: the config dirs 0700, every file in them 0600. A lookup trusting the server on
    // first use writes known_servers and the peer cache.
    let lookup = args!["lookup", a_id, "--refresh", "--server", rv.addr];
    let (status, out, err) = peer_run(&b_dir, &lookup, T);
    assert!(status.success(), "{out}\n{err}");
    for config in [&a_dir, &b_dir] {
        assert_eq!(mode(config), 0o700, "{}", config.display());
    }
    for file in ["identity.pem", "known_servers", "peers.json"] {
        assert_eq!(mode(&b_dir.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&a_dir.join("identity.pem")), 0o600);
    assert!(a_dir.join("control.sock").exists());
    assert!(a.terminate(T).success());
}

#[test]
fn a_receiver_stopped_mid_transfer_keeps_a_private_part_file_for_a_resume() {
    let dir = TempDir::new("files-part");
    let rv = Rendezvous::start(&dir.path().join("rv"), "127.0.0.1:0");
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let recv = dir.path().join("recv");
    std::fs::create_dir_all(&recv).unwrap();
    let mut a = listen_with(
        "a",
        &a_dir,
        &rv,
        &args!["--accept-files", recv.to_str().unwrap(), "--allow-any"],
    );
    let a_id = peer_id_of(&a_dir);
    // 1 GiB, sparse: cheap to make and to hash, far more than can cross loopback before the
    // sender is frozen.
    let big = dir.path().join("big.bin");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let mut send = args!["send", a_id, big.to_str().unwrap()];
    send.extend(rv.args());
    let b = peer("b", &b_dir, &send);
    a.stdout.wait_for("receiving big.bin", T);
    // Freeze the sender so the transfer is certainly in progress, and see the .part file.
    b.pause();
    let names = names_in(&recv);
    assert!(
        names.len() == 1 && names[0].starts_with(".big.bin.") && names[0].ends_with(".part"),
        "one .part file while receiving: {names:?}"
    );
    assert_eq!(mode(&recv.join(&names[0])), 0o600);
    // SIGTERM: the listener stops, and the .part file stays (still private) so that the same
    // file sent again resumes from it (tests/apps.rs resumes one).
    assert!(a.terminate(T).success());
    assert_eq!(names_in(&recv), names, "only the .part file is left");
    assert_eq!(mode(&recv.join(&names[0])), 0o600);
    b.resume();
    drop(b);
}
