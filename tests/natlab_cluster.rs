//! Two rendezvous nodes sharing one Redis, in the network-namespace NAT lab (root only; Debian's
//! `redis-server`, skipped with a message without it): Redis and both nodes run on the lab's
//! public rendezvous host, the peers behind port-restricted NATs, each registered with a
//! different node. The introduction crosses the nodes through Redis and still carries what
//! punching needs (the candidates as the other node observed them, both NAT profiles): the
//! pair goes direct through both NATs with a message each way. Then the same pair with
//! `--relay-only` on the dialer's side is relayed through both nodes and the node link between
//! them, through the NATs, with a message each way.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::lab::{self, Lab};
use e2e::{args, bin, Proc, Rendezvous, TempDir};

const T: Duration = Duration::from_secs(30);
/// Redis and the nodes live on the rendezvous host (`LAB-rv`, 203.0.113.10).
const RV_IP: &str = "203.0.113.10";
const REDIS_PORT: &str = "6379";

fn redis_installed(case: &str) -> bool {
    let installed = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok();
    if !installed {
        eprintln!("skipped {case}: redis-server is not installed (apt-get install redis-server)");
    }
    installed
}

/// `rendezvous serve --cluster ... --node-id NAME` on the rendezvous host at `listen`, with a
/// node link keyed by `key`; ready once subscribed and announced.
fn node(lab: &Lab, dir: &Path, name: &str, listen: &str, key: &Path, extra: &[&str]) -> Rendezvous {
    let data = dir.join(name);
    let mut args = args![
        "serve",
        "--listen",
        listen,
        "--data-dir",
        data.to_str().expect("utf-8 path"),
        "--tcp-listen",
        "off",
        "--cluster",
        format!("redis://{RV_IP}:{REDIS_PORT}/"),
        "--node-id",
        name,
        "--cluster-link",
        format!("{RV_IP}:0"),
        "--cluster-key-file",
        key.to_str().expect("utf-8 path"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let rv = Rendezvous::ready(lab.spawn("rv", name, &bin("rendezvous"), &args));
    rv.proc
        .stderr
        .wait_for("subscribed to this node's introductions", T);
    rv.proc.stderr.wait_for("live nodes", T);
    rv
}

#[test]
fn peers_behind_nats_on_two_nodes_go_direct_and_relay_across_the_node_link() {
    let case = "peers_behind_nats_on_two_nodes_go_direct_and_relay_across_the_node_link";
    if !lab::netns_enabled(case) || !redis_installed(case) {
        return;
    }
    let lab = Lab::up("cluster", &["--a", "port", "--b", "port"]);
    let dir = TempDir::new("natlab-cluster");
    {
        let redis_dir = dir.path().join("redis");
        std::fs::create_dir_all(&redis_dir).expect("redis dir");
        let redis: Proc = lab.spawn(
            "rv",
            "redis",
            Path::new("/usr/bin/redis-server"),
            &args![
                "--port",
                REDIS_PORT,
                "--bind",
                RV_IP,
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                redis_dir.to_str().expect("utf-8 path"),
                "--daemonize",
                "no"
            ],
        );
        redis.stdout.wait_for("Ready to accept connections", T);
        let key = dir.path().join("cluster.key");
        let made = Command::new(bin("rendezvous"))
            .args(["cluster-key", "--out"])
            .arg(&key)
            .output()
            .expect("rendezvous cluster-key");
        assert!(made.status.success(), "{made:?}");
        // x serves RFC 5780 discovery (port 7001 and the second address), as the lab's single
        // rendezvous does; y is a second node on the same host.
        let x = node(
            &lab,
            dir.path(),
            "x",
            &format!("{RV_IP}:7000"),
            &key,
            &["--stun-alt-port", "7001", "--stun-alt-ip", "203.0.113.11"],
        );
        let y = node(
            &lab,
            dir.path(),
            "y",
            &format!("{RV_IP}:7010"),
            &key,
            &["--stun-alt-port", "off"],
        );

        let (mut listener, l_id) = lab.listen("a", "listener", &dir.path().join("a"), &x, &[], T);

        // Direct: the dialer on y, introduced across the nodes, punches through both NATs.
        let mut connect = args!["connect", l_id.clone()];
        connect.extend(y.args());
        let mut dialer = lab.peer("b", "dialer", &dir.path().join("b"), &connect);
        let line = dialer
            .stdout
            .wait_for(&format!("connected to {l_id} in "), T);
        let direct = if line.contains(": direct to ") {
            line
        } else {
            dialer
                .stdout
                .wait_for(&format!("path to {l_id}: direct to "), T)
        };
        assert!(direct.contains("direct to 203.0.113.21:"), "{direct}");
        dialer.send_line("direct from b on y");
        listener.stdout.wait_for("direct from b on y", T);
        listener.send_line("direct from a on x");
        dialer.stdout.wait_for("direct from a on x", T);
        dialer.close_stdin();
        assert_eq!(
            lab::exit_code(&mut dialer, T),
            Some(0),
            "the dialer exits 0"
        );

        // Relayed: a second pair behind the same NATs that asks for no direct path, on x and y.
        let mut listen = args!["listen", "--relay-only"];
        listen.extend(x.args());
        let mut listener2 = lab.peer("a", "listener2", &dir.path().join("a2"), &listen);
        let l2_id = e2e::wait_registered(&listener2, T);
        let mut connect = args!["connect", l2_id.clone(), "--relay-only"];
        connect.extend(y.args());
        let mut relayed = lab.peer("b", "relayed", &dir.path().join("b2"), &connect);
        let line = relayed.stdout.wait_for(&format!("connected to {l2_id}"), T);
        assert!(line.contains("relayed via rendezvous"), "{line}");
        relayed.send_line("relayed from b on y");
        listener2.stdout.wait_for("relayed from b on y", T);
        listener2.send_line("relayed from a on x");
        relayed.stdout.wait_for("relayed from a on x", T);
        for p in [&relayed, &listener2] {
            assert!(
                !p.stdout.text().contains("direct to"),
                "{}",
                p.stdout.text()
            );
        }
        relayed.close_stdin();
        assert_eq!(lab::exit_code(&mut relayed, T), Some(0), "exits 0");
        assert!(listener2.terminate(T).success());
        assert!(listener.terminate(T).success());
        drop(redis);
        // The processes are killed here, before the lab goes down.
    }
    lab.down();
}
