//! Several rendezvous nodes sharing one registry in Redis (`serve --cluster`), on loopback: a
//! real `redis-server` (Debian's package; the tests skip with a message without it) started by
//! the test on a free loopback port, without persistence, in a temporary directory, killed on
//! drop; real `rendezvous` and `peer` binaries.
//!
//! The cross-node relay tests use raw QUIC clients (the support library's `RawClient`: their
//! own identities, the real protocol, no peer program) rather than `peer`: the peer program has
//! no option that turns direct paths off, and on loopback it always finds one. A raw client
//! that opens its relay stream and sends relay frames is relayed, whatever paths exist.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::frame_io::read_frame;
use common::relay::{self, RelayDecoder};
use common::{ControlMessage, PeerId, PROTOCOL_VERSION};
use e2e::attack::{self, RawClient};
use e2e::{args, bin, peer, peer_run, Proc, Rendezvous, TempDir};
use rendezvous::nodelink;

/// Deadline for anything that should happen promptly (generous: a loaded 2-core machine).
const T: Duration = Duration::from_secs(60);

/// A `redis-server` of the test's own, killed on drop (with its directory).
struct Redis {
    proc: Proc,
    port: u16,
    dir: TempDir,
}

impl Redis {
    /// Whether `redis-server` is installed (a message says the test is skipped when not).
    fn installed() -> bool {
        let installed = Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok();
        if !installed {
            eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
        }
        installed
    }

    /// Starts `redis-server` on a free loopback port, or `None` (with a message) when it is not
    /// installed.
    fn start() -> Option<Redis> {
        Redis::installed().then(|| Redis::start_on_a_free_port("redis", &[]))
    }

    /// Starts `redis-server` with `extra` options on a free loopback port. Redis takes no port
    /// 0: a port the kernel just handed out and released; another test may take it meanwhile,
    /// so a start that fails is tried again on another port (5 in all).
    fn start_on_a_free_port(tag: &str, extra: &[&str]) -> Redis {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            if let Some(redis) = Redis::try_start_with(port, TempDir::new(tag), extra) {
                return redis;
            }
        }
        panic!("redis-server did not start on any of 5 free ports");
    }

    /// Starts it again on `port` (after [`Redis::kill`]).
    fn start_on(port: u16, dir: TempDir) -> Redis {
        Redis::try_start_with(port, dir, &[]).expect("redis-server starts again on its port")
    }

    /// Starts a replica of `primary` on a free loopback port (its first sync done).
    fn replica_of(primary: &Redis) -> Redis {
        let primary_port = primary.port.to_string();
        let extra = ["--replicaof", "127.0.0.1", &primary_port];
        let replica = Redis::start_on_a_free_port("replica", &extra);
        replica
            .proc
            .stdout
            .wait_for("MASTER <-> REPLICA sync: Finished with success", T);
        replica
    }

    fn try_start_with(port: u16, dir: TempDir, extra: &[&str]) -> Option<Redis> {
        let port_arg = port.to_string();
        let dir_arg = dir.path().to_str().expect("utf-8 path").to_owned();
        let mut args = vec![
            "--port",
            &port_arg,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_arg,
            "--daemonize",
            "no",
            // A replica's first sync at once (Redis waits 5 s for more replicas by default).
            "--repl-diskless-sync-delay",
            "0",
        ];
        args.extend_from_slice(extra);
        let proc = Proc::spawn("redis", Path::new("redis-server"), &args);
        match proc
            .stdout
            .try_wait_for_at("Ready to accept connections", T)
        {
            Ok(_) => Some(Redis { proc, port, dir }),
            Err(_) => {
                eprintln!(
                    "redis-server did not start on port {port}:\n{}",
                    proc.stdout.text()
                );
                None
            }
        }
    }

    /// Sends one command (RESP, as redis-cli would) and returns the first line of the reply.
    fn command(&self, args: &[&[u8]]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        stream.set_read_timeout(Some(T)).unwrap();
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        stream.write_all(&request).expect("send to redis");
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .expect("redis reply");
        line.trim_end().to_owned()
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it (SIGKILL: nothing saved, as with a crash).
    fn kill(mut self) -> (u16, TempDir) {
        self.proc.kill9();
        (self.port, self.dir)
    }
}

/// Starts `rendezvous serve --cluster URL --node-id NODE` on loopback.
fn node(dir: &Path, redis: &Redis, node: &str) -> Rendezvous {
    node_with(dir, redis, node, &[])
}

/// As [`node`] with a node link on loopback keyed by `key_file` (the cross-node relay); with
/// the link's address.
fn linked_node(dir: &Path, redis: &Redis, name: &str, key_file: &Path) -> (Rendezvous, SocketAddr) {
    let key = key_file.to_str().expect("utf-8 path");
    let rv = node_with(
        dir,
        redis,
        name,
        &["--cluster-link", "127.0.0.1:0", "--cluster-key-file", key],
    );
    let line = rv.proc.stdout.wait_for("node link on ", T);
    let addr = line
        .trim_start_matches("node link on ")
        .split_whitespace()
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no link address in {line:?}"));
    (rv, addr)
}

/// Makes a cluster key at `path` with `rendezvous cluster-key --out` (as the docs say to).
fn write_key(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let out = Command::new(bin("rendezvous"))
        .args(["cluster-key", "--out"])
        .arg(path)
        .output()
        .expect("run rendezvous cluster-key");
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(path)
        .expect("key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(path).expect("read the key");
    assert!(
        rendezvous::nodelink::ClusterKey::parse(&text).is_ok(),
        "{text}"
    );
}

fn node_with(dir: &Path, redis: &Redis, node: &str, extra: &[&str]) -> Rendezvous {
    node_at(dir, &redis.url(), node, extra)
}

/// As [`node_with`], with the registry at `url`.
fn node_at(dir: &Path, url: &str, node: &str, extra: &[&str]) -> Rendezvous {
    let data = dir.join(node);
    let data = data.to_str().expect("utf-8 path");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data,
        "--tcp-listen",
        "off",
        "--stun-alt-port",
        "off",
        "--metrics",
        "127.0.0.1:0",
        "--cluster",
        url,
        "--node-id",
        node,
    ];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(node, &bin("rendezvous"), &args);
    let rv = Rendezvous::ready(proc);
    rv.proc
        .stdout
        .wait_for(&format!("cluster node {node} (registry in Redis at"), T);
    // Its subscription is up: introductions forwarded to it are received from now on.
    rv.proc
        .stderr
        .wait_for("subscribed to this node's introductions", T);
    // Its first refresh is done: its entry is in Redis, for the nodes started after it.
    rv.proc.stderr.wait_for("live nodes", T);
    rv
}

/// The value of the sample `name` (labels included) in `rv`'s metrics.
fn sample(rv: &Rendezvous, name: &str) -> u64 {
    let line = rv.proc.stdout.wait_for("metrics on http://", T);
    let addr = line
        .trim_start_matches("metrics on http://")
        .trim_end_matches("/metrics");
    let text = e2e::scrape(addr);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

/// Whether `rv` answers a STUN Binding request (RFC 5389) on its main port.
fn stun_answers(rv: &Rendezvous) -> bool {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    request.extend_from_slice(&[7; 12]);
    socket
        .send_to(&request, rv.addr)
        .expect("send binding request");
    let mut answer = [0u8; 256];
    matches!(
        socket.recv_from(&mut answer),
        Ok((n, _)) if n >= 20 && answer[..2] == [0x01, 0x01] && answer[8..20] == [7; 12]
    )
}

/// `peer listen` against `rv`, once registered; with its id.
fn listen(tag: &str, dir: &Path, rv: &Rendezvous) -> (Proc, String) {
    e2e::listen(tag, &dir.join(tag), rv)
}

/// `peer connect TARGET` through `rv`, connected, with a message each way.
fn chat(tag: &str, dir: &Path, rv: &Rendezvous, listener: &Proc, target: &str) {
    let mut connect = args!["connect", target];
    connect.extend(rv.args());
    let mut b = peer(tag, &dir.join(tag), &connect);
    b.stdout.wait_for(&format!("connected to {target}"), T);
    let greeting = format!("hello from {tag}");
    b.send_line(&greeting);
    listener.stdout.wait_for(&greeting, T);
    b.close_stdin();
    assert!(b.wait(T).success(), "{tag} ends its chat cleanly");
}

/// `peer lookup TARGET --refresh` through `rv`: (succeeded, stdout, stderr).
fn lookup(dir: &Path, tag: &str, rv: &Rendezvous, target: &str) -> (bool, String, String) {
    let mut args = args!["lookup", target, "--refresh"];
    args.extend(rv.args());
    let (status, out, err) = peer_run(&dir.join(tag), &args, T);
    (status.success(), out, err)
}

/// Peers registered on different nodes find each other and connect (direct on loopback), with
/// a message each way; three nodes share one Redis.
#[test]
fn peers_on_different_nodes_look_each_other_up_and_chat() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster");
    let x = node(dir.path(), &redis, "x");
    let y = node(dir.path(), &redis, "y");
    let z = node(dir.path(), &redis, "z");
    let (mut a, a_id) = listen("a", dir.path(), &x);
    let (mut c, c_id) = listen("c", dir.path(), &z);

    // Y knows neither peer itself: it finds both in the cluster registry, online.
    let (ok, out, err) = lookup(dir.path(), "q", &y, &a_id);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("from the rendezvous: online"), "{out}");

    // b on node Y connects to a on node X, and to c on node Z: a message each way.
    let mut connect = args!["connect", a_id.clone()];
    connect.extend(y.args());
    let mut b = peer("b", &dir.path().join("b"), &connect);
    let line = b.stdout.wait_for(&format!("connected to {a_id}"), T);
    // From the punch's candidates (b has no cached address of a). The handshake rides the
    // introduction across the nodes, so it may end on the relay a moment before the punch.
    assert!(!line.contains("cached"), "{line}");
    let line = if line.contains("direct to") {
        line
    } else {
        b.stdout.wait_for(&format!("path to {a_id}: direct to"), T)
    };
    assert!(line.contains("direct to 127.0.0.1:"), "{line}");
    let b_id = a.stdout.wait_for("connected: ", T);
    let b_id = b_id.split_whitespace().nth(1).expect("id").to_owned();
    b.send_line("hello from b on y");
    let line = a.stdout.wait_for("hello from b on y", T);
    assert!(line.contains(&b_id), "{line}");
    a.send_line("hello from a on x");
    b.stdout.wait_for("hello from a on x", T);
    b.close_stdin();
    assert!(b.wait(T).success());

    chat("d", dir.path(), &y, &c, &c_id);

    // Both introductions went from node y to the targets' nodes through Redis.
    let introductions = "rendezvous_cluster_introductions_total{direction=";
    assert_eq!(sample(&y, &format!("{introductions}\"forwarded\"}}")), 2);
    assert_eq!(sample(&x, &format!("{introductions}\"received\"}}")), 1);
    assert_eq!(sample(&z, &format!("{introductions}\"received\"}}")), 1);
    assert_eq!(sample(&x, "rendezvous_cluster_redis_up"), 1);
    // The last node started saw all three at its first refresh.
    assert_eq!(sample(&z, "rendezvous_cluster_nodes"), 3);

    // A peer that leaves is offline for the other nodes at once (its node clears its mark).
    assert!(c.terminate(T).success());
    // Its node's going-offline write is queued when the connection closes: bounded retries of
    // the lookup (each a whole `peer` run) cover the moment until it is applied.
    let mut saw_offline = false;
    for _ in 0..20 {
        let (ok, out, _) = lookup(dir.path(), "q", &y, &c_id);
        if ok && out.contains("from the rendezvous: offline") {
            saw_offline = true;
            break;
        }
    }
    assert!(saw_offline, "c shows offline through node y");
    assert!(a.terminate(T).success());
}

/// Redis down: each node keeps serving its own peers (lookups and introductions between
/// them, registrations), refuses lookups of other nodes' peers with a clear error; Redis back
/// (empty: no persistence): the nodes write their peers again and cross-node introductions
/// work again.
#[test]
fn redis_down_degrades_clearly_and_the_cluster_recovers() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-degraded");
    let x = node(dir.path(), &redis, "x");
    let y = node(dir.path(), &redis, "y");
    let (a, a_id) = listen("a", dir.path(), &x);
    let (e, e_id) = listen("e", dir.path(), &y);

    let (port, redis_dir) = redis.kill();

    // Other nodes' peers: refused, saying why.
    let (ok, out, err) = lookup(dir.path(), "q", &y, &a_id);
    assert!(!ok, "{out}");
    assert!(
        err.contains("cluster registry (Redis) is unreachable") || err.contains("did not answer"),
        "{err}"
    );
    assert!(err.contains("peers on this node still can"), "{err}");
    // STUN, and this node's peers: served as on a single node.
    let (ok, out, err) = lookup(dir.path(), "q", &y, &e_id);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("from the rendezvous: online"), "{out}");
    chat("f", dir.path(), &y, &e, &e_id);
    assert!(stun_answers(&y), "STUN is served in degraded mode");
    y.proc
        .stderr
        .wait_for("cluster registry (Redis) unreachable: degraded mode", T);
    assert_eq!(sample(&y, "rendezvous_cluster_redis_up"), 0);

    // Redis back, empty.
    let redis = Redis::start_on(port, redis_dir);
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/"));
    for rv in [&x, &y] {
        rv.wait_cluster_registry_back(T);
    }
    // The cluster-level counts: each node's refresh after the recovery wrote its entry (one
    // peer online each) before reading every entry, so whichever read last saw both.
    let most = |name: &str| sample(&x, name).max(sample(&y, name));
    assert_eq!(most("rendezvous_cluster_nodes"), 2);
    assert_eq!(most("rendezvous_cluster_online_peers"), 2);
    let (ok, out, err) = lookup(dir.path(), "q", &y, &a_id);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("from the rendezvous: online"), "{out}");
    chat("g", dir.path(), &y, &a, &a_id);
    assert_eq!(sample(&y, "rendezvous_cluster_redis_up"), 1);
}

/// Redis is hostile input too: a record that is not one, an online mark that is not a node id,
/// pub/sub messages that are garbage or huge. The node answers with a clear error or drops and
/// counts the message, and keeps serving.
#[test]
fn hostile_values_in_redis_are_refused_not_trusted() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-hostile");
    let x = node(dir.path(), &redis, "x");
    let y = node(dir.path(), &redis, "y");
    // A peer that registered on x and left: x no longer rewrites its record.
    let (mut gone, gone_id) = listen("gone", dir.path(), &x);
    assert!(gone.terminate(T).success());

    let record_key = format!("rv:peer:{gone_id}");
    let online_key = format!("rv:online:{gone_id}");
    assert_eq!(
        redis.command(&[b"SET", record_key.as_bytes(), b"{not a record"]),
        "+OK"
    );
    let (ok, out, err) = lookup(dir.path(), "q", &y, &gone_id);
    assert!(!ok, "{out}");
    assert!(
        err.contains("malformed value in the cluster registry") && err.contains(&record_key),
        "{err}"
    );
    // A huge value is not even read whole.
    let huge = vec![b'x'; 1 << 20];
    assert_eq!(
        redis.command(&[b"SET", record_key.as_bytes(), &huge]),
        "+OK"
    );
    let (ok, _, err) = lookup(dir.path(), "q", &y, &gone_id);
    assert!(!ok && err.contains("longer than"), "{err}");
    // A good record with an online mark that is no node id.
    let (mut back, _) = listen("gone", dir.path(), &x);
    assert!(back.terminate(T).success());
    assert_eq!(
        redis.command(&[b"SET", online_key.as_bytes(), b"no such\nnode"]),
        "+OK"
    );
    let (ok, _, err) = lookup(dir.path(), "q", &y, &gone_id);
    assert!(!ok && err.contains(&online_key), "{err}");

    // Garbage and oversized messages on a node's channel: dropped and counted.
    assert_eq!(
        redis.command(&[b"PUBLISH", b"rv:punch:x", b"garbage"]),
        ":1"
    );
    let big = vec![b' '; 64 * 1024];
    assert_eq!(redis.command(&[b"PUBLISH", b"rv:punch:x", &big]), ":1");
    let dropped = "rendezvous_cluster_introductions_total{direction=\"dropped\"}";
    x.proc
        .stderr
        .wait_for_nth("dropped a cluster message", 2, T);
    assert_eq!(sample(&x, dropped), 2);
    // Still serving: a peer registers and is found from the other node.
    let (mut a, a_id) = listen("a", dir.path(), &x);
    let (ok, out, err) = lookup(dir.path(), "q", &y, &a_id);
    assert!(
        ok && out.contains("from the rendezvous: online"),
        "{out}\n{err}"
    );
    assert!(a.terminate(T).success());
}

/// A Redis Cluster node (sharded Redis) given as one server (`redis://`) would refuse the
/// standalone registry's keys of other hash slots: a node given one does not start, and says
/// how to give a Redis Cluster instead.
#[test]
fn a_redis_cluster_node_given_as_one_server_is_refused_at_start_saying_what_to_use() {
    if !Redis::installed() {
        return;
    }
    let sharded = Redis::start_on_a_free_port("sharded", &CLUSTER_MODE);
    let dir = TempDir::new("cluster-sharded");
    let data = dir.path().join("x");
    let mut node = Proc::spawn(
        "x",
        &bin("rendezvous"),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--tcp-listen",
            "off",
            "--cluster",
            &sharded.url(),
            "--node-id",
            "x",
        ],
    );
    assert!(!node.wait(T).success());
    let said = node.stderr.wait_for("Redis Cluster node", T);
    assert!(said.contains("redis+cluster://"), "{said}");
}

/// `redis-server` options of a Redis Cluster server (a primary silent for 3 s is declared
/// failed, so a failover takes a few seconds; shorter could fail a primary over spuriously on a
/// loaded machine).
const CLUSTER_MODE: [&str; 6] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "3000",
];

/// A Redis Cluster of three primaries with a replica each: six `redis-server`s on free loopback
/// ports ([`CLUSTER_MODE`]), joined by `redis-cli --cluster create`. `None` (with a
/// message) without `redis-server` or `redis-cli`.
struct RedisCluster {
    servers: Vec<Redis>,
}

impl RedisCluster {
    fn start() -> Option<RedisCluster> {
        if !Redis::installed() {
            return None;
        }
        if Command::new("redis-cli").arg("--version").output().is_err() {
            eprintln!("skipped: redis-cli is not installed (apt-get install redis-tools)");
            return None;
        }
        let servers: Vec<Redis> = (0..6)
            .map(|_| Redis::start_on_a_free_port("shard", &CLUSTER_MODE))
            .collect();
        let addrs: Vec<String> = servers
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        let made = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(made.status.success(), "{made:?}");
        for r in &servers {
            r.proc.stdout.wait_for("Cluster state changed: ok", T);
        }
        Some(RedisCluster { servers })
    }

    /// `redis+cluster://` naming every server as a seed.
    fn url(&self) -> String {
        let seeds: Vec<String> = self
            .servers
            .iter()
            .map(|r| format!("127.0.0.1:{}", r.port))
            .collect();
        format!("redis+cluster://{}/", seeds.join(","))
    }

    /// `redis-cli -p PORT ARGS...` against server `i`: its output.
    fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.servers[i].port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The primary holding the registry's hash slot (`{rv}`) and its replica, as indices.
    fn registry_shard(&self) -> (usize, usize) {
        let slot: u16 = self
            .cli(0, &["CLUSTER", "KEYSLOT", "{rv}"])
            .parse()
            .expect("a slot number");
        let nodes = self.cli(0, &["CLUSTER", "NODES"]);
        // `ID IP:PORT@CPORT FLAGS MASTER PING PONG EPOCH STATE [SLOTS...]`
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let index_of = |fields: &Vec<&str>| {
            let port: u16 = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .expect("a port");
            self.servers
                .iter()
                .position(|r| r.port == port)
                .expect("one of ours")
        };
        let holds = |range: &str| match range.split_once('-') {
            Some((lo, hi)) => {
                lo.parse::<u16>().is_ok_and(|lo| lo <= slot)
                    && hi.parse::<u16>().is_ok_and(|hi| slot <= hi)
            }
            None => range.parse::<u16>().is_ok_and(|one| one == slot),
        };
        let primary = lines
            .iter()
            .find(|f| f.len() > 8 && f[2].contains("master") && f[8..].iter().any(|r| holds(r)))
            .expect("a primary holds the slot");
        // Each replica knows its primary as soon as `--cluster create` made it one (the
        // other servers learn it later, by gossip): asked on each server, its own line.
        let replica = (0..self.servers.len())
            .find(|&i| {
                self.cli(i, &["CLUSTER", "NODES"]).lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3
                        && f[2].contains("myself")
                        && f[2].contains("slave")
                        && f[3] == primary[0]
                })
            })
            .expect("the primary has a replica");
        // Synced: a replica whose data is too old would not be elected.
        self.servers[replica]
            .proc
            .stdout
            .wait_for("MASTER <-> REPLICA sync: Finished with success", T);
        (index_of(primary), replica)
    }
}

/// A Redis Cluster (`redis+cluster://`, its servers as seeds) holds the registry: every key
/// in the `{rv}` hash slot, peers on different nodes find each other and chat (introductions
/// over pub/sub, which the cluster delivers on every server). Its primary holding the slot is
/// killed: its replica takes over, the nodes follow by themselves (degraded mode meanwhile,
/// then their peers written again), and a peer registered after the failover is found and
/// reached across nodes; the peer registered before it still is.
#[test]
fn a_redis_cluster_holds_the_registry_and_the_nodes_follow_its_failover() {
    let Some(mut cluster) = RedisCluster::start() else {
        return;
    };
    let dir = TempDir::new("cluster-redis-cluster");
    let url = cluster.url();
    let mut x = node_at(dir.path(), &url, "x", &[]);
    let y = node_at(dir.path(), &url, "y", &[]);
    let (a, a_id) = listen("a", dir.path(), &x);
    let (ok, out, err) = lookup(dir.path(), "q", &y, &a_id);
    assert!(
        ok && out.contains("from the rendezvous: online"),
        "{out}\n{err}"
    );
    chat("b", dir.path(), &y, &a, &a_id);
    assert_eq!(
        cluster.cli(0, &["-c", "EXISTS", &format!("{{rv}}:peer:{a_id}")]),
        "1"
    );
    assert_eq!(
        cluster.cli(0, &["-c", "EXISTS", &format!("rv:peer:{a_id}")]),
        "0"
    );

    // Counted from here (a loaded machine may have had an outage already).
    const DEGRADED: &str = "cluster registry (Redis) unreachable: degraded mode";
    const RECOVERED: &str = "this node's peers written again";
    let seen = |rv: &Rendezvous, text: &str| {
        rv.proc
            .stderr
            .lines()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    };
    let before: Vec<(usize, usize)> = [&x, &y]
        .iter()
        .map(|rv| (seen(rv, DEGRADED), seen(rv, RECOVERED)))
        .collect();
    let (primary, replica) = cluster.registry_shard();
    cluster.servers[primary].proc.kill9();
    cluster.servers[replica]
        .proc
        .stdout
        .wait_for("Failover election won", T);
    for (rv, (degraded, recovered)) in [&x, &y].into_iter().zip(before) {
        rv.proc.stderr.wait_for_nth(DEGRADED, degraded + 1, T);
        rv.proc.stderr.wait_for_nth(RECOVERED, recovered + 1, T);
    }
    let (c, c_id) = listen("c", dir.path(), &x);
    for (target, listener) in [(&c_id, &c), (&a_id, &a)] {
        let (ok, out, err) = lookup(dir.path(), "q", &y, target);
        assert!(
            ok && out.contains("from the rendezvous: online"),
            "{out}\n{err}"
        );
        chat("d", dir.path(), &y, listener, target);
    }
    assert_eq!(sample(&x, "rendezvous_cluster_redis_up"), 1);

    // Node x dies: its peers' online marks live on for their TTL, but an introduction to one
    // finds no subscriber on any server of the cluster (PUBLISH counts only its own server's)
    // and is refused at once, saying why.
    x.proc.kill9();
    let mut connect = args!["connect", c_id.clone()];
    connect.extend(y.args());
    let (status, out, err) = peer_run(&dir.path().join("e"), &connect, T);
    assert!(!status.success(), "{out}");
    assert!(
        err.contains("is online on node x, which is not answering"),
        "{out}\n{err}"
    );
}

/// Two nodes never share a node id (they would share a channel and online marks): a second
/// node with another key is refused at start while the first is alive; the same node (same
/// key) restarting right after a crash takes its id back.
#[test]
fn a_node_id_is_held_by_one_node_at_a_time() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-ids");
    let mut x = node(dir.path(), &redis, "x");
    let url = redis.url();
    let other = dir.path().join("other");
    let mut impostor = Proc::spawn(
        "impostor",
        &bin("rendezvous"),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            other.to_str().expect("utf-8 path"),
            "--tcp-listen",
            "off",
            "--cluster",
            &url,
            "--node-id",
            "x",
        ],
    );
    assert!(!impostor.wait(T).success());
    impostor
        .stderr
        .wait_for("is in use by a live node with another key", T);
    // The same node, killed and started again at once (its entry still fresh): accepted.
    x.proc.kill9();
    let x = node(dir.path(), &redis, "x");
    let (_a, a_id) = listen("a", dir.path(), &x);
    assert!(!a_id.is_empty());
}

/// A raw client registered on `rv` from loopback, with a fresh identity.
async fn raw_client(rv: &Rendezvous) -> RawClient {
    let identity = certs::Identity::generate().expect("identity");
    let endpoint = attack::endpoint_on(Ipv4Addr::LOCALHOST).expect("endpoint");
    RawClient::register(
        &endpoint,
        &identity,
        rv.addr,
        certs::ServerTrust::FirstUse,
        PROTOCOL_VERSION,
    )
    .await
    .expect("register exchange")
    .expect("registered")
}

/// Reads `client`'s control stream until the `punch` for `from` arrives: its nonce.
async fn pushed_punch(client: &mut RawClient, from: PeerId) -> u64 {
    loop {
        let frame = tokio::time::timeout(T, read_frame(&mut client.control.1))
            .await
            .expect("a push in time")
            .expect("read a push")
            .expect("control stream open");
        if let Ok(ControlMessage::Punch { peer, nonce, .. }) = ControlMessage::decode(&frame) {
            if peer == from {
                return nonce;
            }
        }
    }
}

/// `a` (on one node) is introduced to `b` (on another), `b` accepts, both open their relay
/// streams: the two relay streams, `a`'s first.
async fn relayed_pair(
    a: &RawClient,
    b: &mut RawClient,
) -> [(quinn::SendStream, quinn::RecvStream); 2] {
    let a_relay = a.relay().await.expect("relay_open").expect("relay_ready");
    let b_relay = b.relay().await.expect("relay_open").expect("relay_ready");
    let nonce = a.connect(b.id).await.expect("connect across nodes");
    // Pushed to b by its own node, from the introduction forwarded through Redis.
    assert_eq!(pushed_punch(b, a.id).await, nonce);
    b.accept(a.id, nonce).await.expect("accept on b's node");
    [a_relay, b_relay]
}

/// Sends `packet` to `to` on a relay stream.
async fn relay_send(stream: &mut quinn::SendStream, to: PeerId, packet: &[u8]) {
    let frame = relay::encode(&to, packet).expect("encode");
    stream.write_all(&frame).await.expect("relay write");
}

/// The next relayed packet on a relay stream: (sender, packet).
async fn relay_receive(stream: &mut quinn::RecvStream) -> (PeerId, Vec<u8>) {
    let mut decoder = RelayDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(frame) = decoder.next_frame().expect("well-formed relay frames") {
            return frame;
        }
        let n = tokio::time::timeout(T, stream.read(&mut buf))
            .await
            .expect("a relayed packet in time")
            .expect("relay read")
            .expect("relay stream open");
        decoder.push(&buf[..n]);
    }
}

/// Two peers registered on different nodes of three, relayed to each other (raw clients:
/// nothing but the relay joins them): the packets cross from node to node over the node link,
/// byte for byte as the peers sent them (the nodes forward opaque bytes: the peers' own
/// end-to-end encrypted QUIC packets), one each way; the metrics count them on both nodes and
/// show one link per pair, reused. The destination's node then restarts (killed): the first
/// link the new process opens replaces the dead one at once, and a new pair is relayed again.
#[test]
fn peers_on_different_nodes_are_relayed_across_the_node_link() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-relay");
    let key = dir.path().join("cluster.key");
    write_key(&key);
    let (x, _) = linked_node(dir.path(), &redis, "x", &key);
    let (_y, _) = linked_node(dir.path(), &redis, "y", &key);
    let (mut z, _) = linked_node(dir.path(), &redis, "z", &key);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let a = raw_client(&x).await;
        let mut b = raw_client(&z).await;
        let [(mut a_tx, mut a_rx), (mut b_tx, mut b_rx)] = relayed_pair(&a, &mut b).await;
        relay_send(&mut a_tx, b.id, b"hello from a on x").await;
        assert_eq!(
            relay_receive(&mut b_rx).await,
            (a.id, b"hello from a on x".to_vec())
        );
        relay_send(&mut b_tx, a.id, b"hello from b on z").await;
        assert_eq!(
            relay_receive(&mut a_rx).await,
            (b.id, b"hello from b on z".to_vec())
        );
        // A second packet takes the same link.
        relay_send(&mut a_tx, b.id, b"again").await;
        assert_eq!(relay_receive(&mut b_rx).await, (a.id, b"again".to_vec()));
    });
    let packets = "rendezvous_cluster_relay_packets_total{direction=";
    assert_eq!(sample(&x, &format!("{packets}\"sent\"}}")), 2);
    assert_eq!(sample(&x, &format!("{packets}\"received\"}}")), 1);
    assert_eq!(sample(&z, &format!("{packets}\"sent\"}}")), 1);
    assert_eq!(sample(&z, &format!("{packets}\"received\"}}")), 2);
    let bytes = "rendezvous_cluster_relay_bytes_total{direction=\"received\"}";
    assert_eq!(
        sample(&z, bytes),
        (b"hello from a on x".len() + b"again".len()) as u64
    );
    // One link between x and z, whichever dialed it; none refused.
    assert_eq!(sample(&x, "rendezvous_cluster_links"), 1);
    assert_eq!(sample(&z, "rendezvous_cluster_links"), 1);
    assert_eq!(sample(&z, "rendezvous_cluster_link_refused_total"), 0);

    // z dies and comes back (same id and key, a new process and link port): x still holds the
    // dead link, and replaces it with the first one the new z opens (z's accept, below).
    z.proc.kill9();
    let (z, _) = linked_node(dir.path(), &redis, "z", &key);
    runtime.block_on(async {
        let a = raw_client(&x).await;
        let mut b = raw_client(&z).await;
        let [(mut a_tx, mut a_rx), (mut b_tx, mut b_rx)] = relayed_pair(&a, &mut b).await;
        relay_send(&mut a_tx, b.id, b"after the restart").await;
        assert_eq!(
            relay_receive(&mut b_rx).await,
            (a.id, b"after the restart".to_vec())
        );
        relay_send(&mut b_tx, a.id, b"back").await;
        assert_eq!(relay_receive(&mut a_rx).await, (b.id, b"back".to_vec()));
    });
    assert_eq!(sample(&x, &format!("{packets}\"sent\"}}")), 3);
    assert_eq!(sample(&z, &format!("{packets}\"received\"}}")), 1);
    assert_eq!(sample(&x, "rendezvous_cluster_links"), 1);
}

/// A stranger without the cluster key cannot open a node link, nor inject into the mesh: it
/// dials a node's link port claiming to be another node, sends its hello with a wrong key and
/// then a forged packet for a peer that accepted a cross-node introduction (as if from the
/// other side of it). The node closes the connection without the proof it expects, counts the
/// refusal, and the peer never gets the forged packet: the first packet it receives is the
/// genuine one sent afterwards through the real link. Then a flood of attempts that never say
/// hello: past the slots of attempts being authenticated they are refused at once, each is
/// closed within its time, and the link already open keeps relaying.
/// The real peer program on two nodes, relayed (`--relay-only`): `peer connect` from a peer on
/// z to one on x goes through both nodes' relays and the node link between them, and the chat
/// carries a message each way (end-to-end encrypted QUIC the nodes only pass along).
#[test]
fn peers_on_different_nodes_chat_through_the_node_link() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-relay-peers");
    let key = dir.path().join("cluster.key");
    write_key(&key);
    let (x, _) = linked_node(dir.path(), &redis, "x", &key);
    let (z, _) = linked_node(dir.path(), &redis, "z", &key);
    let only = |rv: &Rendezvous| {
        let mut args = rv.args();
        args.extend(args!["--server-tcp", "off", "--relay-only"]);
        args
    };
    let mut listen = args!["listen"];
    listen.extend(only(&x));
    let mut a = peer("a", &dir.path().join("a"), &listen);
    let a_id = e2e::wait_registered(&a, T);
    let mut connect = args!["connect", a_id.clone()];
    connect.extend(only(&z));
    let mut b = peer("b", &dir.path().join("b"), &connect);
    let line = b.stdout.wait_for(&format!("connected to {a_id}"), T);
    assert!(line.contains("relayed via rendezvous"), "{line}");
    b.send_line("hello from b on z");
    a.stdout.wait_for("hello from b on z", T);
    a.send_line("hello from a on x");
    b.stdout.wait_for("hello from a on x", T);
    // Both ways crossed the link, in both nodes' counts.
    let packets = "rendezvous_cluster_relay_packets_total{direction=";
    for rv in [&x, &z] {
        assert!(sample(rv, &format!("{packets}\"sent\"}}")) > 0);
        assert!(sample(rv, &format!("{packets}\"received\"}}")) > 0);
    }
    assert!(
        !b.stdout.text().contains("direct to"),
        "{}",
        b.stdout.text()
    );
    b.close_stdin();
    assert!(b.wait(T).success(), "b ends its chat cleanly");
    assert!(a.terminate(T).success());
}

#[test]
fn a_stranger_without_the_cluster_key_cannot_open_a_node_link_or_inject() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-link-attack");
    let key = dir.path().join("cluster.key");
    write_key(&key);
    let (x, _) = linked_node(dir.path(), &redis, "x", &key);
    let (y, y_link) = linked_node(dir.path(), &redis, "y", &key);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let refused_at_once = runtime.block_on(async {
        let a = raw_client(&x).await;
        let mut b = raw_client(&y).await;
        let [(mut a_tx, _a_rx), (_b_tx, mut b_rx)] = relayed_pair(&a, &mut b).await;

        // The stranger: a valid TLS identity of its own, the right ALPN, the wrong key.
        let identity = certs::Identity::generate().expect("identity");
        let tls = certs::client_config_for_server(
            &identity,
            certs::ServerTrust::FirstUse,
            nodelink::ALPN_NODE_LINK,
        )
        .expect("tls");
        let config = transport::quic_client_config(tls, Default::default()).expect("quic");
        let endpoint = attack::endpoint_on(Ipv4Addr::LOCALHOST).expect("endpoint");
        let conn = endpoint
            .connect_with(config.clone(), y_link, "rendezvous-node")
            .expect("dial")
            .await
            .expect("the QUIC handshake itself is open to anyone");
        let wrong = nodelink::ClusterKey::generate();
        let (mut send, mut recv) = nodelink::dialer_hello(&conn, &wrong, "x", "y", 1)
            .await
            .expect("hello sent");
        let forged = relay::encode(&a.id, b"forged").expect("encode");
        let frame = nodelink::encode_packets(&b.id, &forged).expect("frame");
        // It may already be closed: what matters is that nothing is forwarded.
        let _ = send.write_all(&frame).await;
        let refused = nodelink::dialer_check(&conn, &mut recv, &wrong, "x", "y").await;
        assert!(refused.is_err(), "the node did not prove a key to the stranger");
        let closed = tokio::time::timeout(T, conn.closed()).await.expect("closed in time");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.reason.as_ref() == b"no proof of the cluster key"),
            "{closed:?}"
        );

        // The genuine packet, through the real link: the first b receives.
        relay_send(&mut a_tx, b.id, b"genuine").await;
        assert_eq!(relay_receive(&mut b_rx).await, (a.id, b"genuine".to_vec()));
        assert_eq!(sample(&y, "rendezvous_cluster_link_refused_total"), 1);

        // Attempts that complete the QUIC handshake and never say hello hold the slots of
        // attempts being authenticated: one more is refused at once, and each is closed
        // within its 5 s. The link already open is not affected.
        let started = std::time::Instant::now();
        let mut held = Vec::new();
        for _ in 0..nodelink::MAX_PENDING_LINKS {
            let conn = endpoint
                .connect_with(config.clone(), y_link, "rendezvous-node")
                .expect("dial")
                .await
                .expect("a handshake while slots are free");
            held.push(conn);
        }
        let one_more = endpoint
            .connect_with(config.clone(), y_link, "rendezvous-node")
            .expect("dial")
            .await;
        // (Unless this machine took longer than an attempt's 5 s for the handshakes above,
        // so that the first slot was free again: the bound is on attempts at once.)
        let refused_at_once = one_more.is_err();
        assert!(
            refused_at_once || started.elapsed() >= nodelink::AUTH_TIMEOUT,
            "all slots taken: refused"
        );
        for conn in &held {
            tokio::time::timeout(T, conn.closed())
                .await
                .expect("closed within the attempt's time");
        }
        relay_send(&mut a_tx, b.id, b"still relayed").await;
        assert_eq!(
            relay_receive(&mut b_rx).await,
            (a.id, b"still relayed".to_vec())
        );
        refused_at_once
    });
    let slots = nodelink::MAX_PENDING_LINKS as u64;
    assert_eq!(
        sample(&y, "rendezvous_cluster_link_refused_total"),
        1 + slots + u64::from(refused_at_once)
    );
    assert_eq!(
        sample(
            &y,
            "rendezvous_cluster_relay_packets_total{direction=\"received\"}"
        ),
        2
    );
    assert_eq!(sample(&y, "rendezvous_cluster_links"), 1);
}

/// `--server ADDR` for each node (in this order), every node's `--server-key`, no TCP tunnel,
/// relay only (on one host a direct path always works; the relay is what is under test), and
/// the first given node preferred: round trips on loopback are a matter of scheduling, and both
/// peers must start on the same node.
fn servers(nodes: &[&Rendezvous]) -> Vec<String> {
    let mut out = servers_direct(nodes);
    out.push("--relay-only".into());
    out
}

/// As [`servers`], direct paths allowed.
fn servers_direct(nodes: &[&Rendezvous]) -> Vec<String> {
    let mut out = Vec::new();
    for rv in nodes {
        out.extend(args!["--server", rv.addr]);
    }
    for rv in nodes {
        out.extend(args!["--server-key", rv.fingerprint]);
    }
    out.extend(args!["--server-tcp", "off", "--prefer-first-server"]);
    out
}

/// Where `peer status --json` says the peer in `dir` is registered, once it is registered
/// with `addr`; panics after [`T`] with the last report.
fn wait_registered_with(dir: &Path, addr: std::net::SocketAddr) -> serde_json::Value {
    let deadline = std::time::Instant::now() + T;
    loop {
        let (status, out, err) = peer_run(dir, &args!["status", "--json"], T);
        assert!(status.success(), "{out}\n{err}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
        let registration = &report["registration"];
        if registration["state"] == "registered"
            && registration["server_addr"] == addr.to_string().as_str()
        {
            return report;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not registered with {addr}: {report}"
        );
        // Each `peer status` is a process start and a round trip on the control socket:
        // polling paces itself.
    }
}

/// Two peers given all three nodes register with the same one and chat through its relay; the
/// node is killed (SIGKILL, as a crash): both notice within seconds, register with the next
/// node, introduce themselves again there, and the same chat (the same QUIC connection, no
/// new handshake) carries a message each way through the new node's relay.
#[test]
fn a_relayed_chat_survives_the_loss_of_its_node() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-failover");
    let mut x = node(dir.path(), &redis, "x");
    let y = node(dir.path(), &redis, "y");
    let z = node(dir.path(), &redis, "z");
    let all = servers(&[&x, &y, &z]);

    let a_dir = dir.path().join("a");
    let mut listen = args!["listen"];
    listen.extend(all.clone());
    let mut a = peer("a", &a_dir, &listen);
    let a_id = e2e::wait_registered(&a, T);
    let line = a.stdout.wait_for("registered with", T);
    assert!(
        line.contains(&format!("registered with {} (", x.addr)),
        "{line}"
    );

    let b_dir = dir.path().join("b");
    let mut connect = args!["connect", a_id.clone()];
    connect.extend(all);
    let mut b = peer("b", &b_dir, &connect);
    let line = b.stdout.wait_for(&format!("connected to {a_id}"), T);
    assert!(line.contains("relayed via rendezvous"), "{line}");
    a.stdout.wait_for("connected: ", T);
    wait_registered_with(&b_dir, x.addr);
    b.send_line("before the loss");
    a.stdout.wait_for("before the loss", T);
    a.send_line("before the loss, back");
    b.stdout.wait_for("before the loss, back", T);

    // A peer that chooses by round trip (no --prefer-first-server) measures every node and
    // says which it chose and how far it is.
    let c_dir = dir.path().join("c");
    let mut c_args = args!["listen"];
    for rv in [&x, &y, &z] {
        c_args.extend(args!["--server", rv.addr, "--server-key", rv.fingerprint]);
    }
    c_args.extend(args!["--server-tcp", "off"]);
    let mut c = peer("c", &c_dir, &c_args);
    let line = c.stdout.wait_for("registered with", T);
    assert!(line.contains("round trip"), "{line}");
    let (status, out, err) = peer_run(&c_dir, &args!["status", "--json"], T);
    assert!(status.success(), "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    let rtt = report["registration"]["server_rtt_ms"].as_f64();
    assert!(
        rtt.is_some_and(|ms| (0.0..1000.0).contains(&ms)),
        "{report}"
    );
    assert!(c.terminate(T).success());

    // Idle and relaying, neither peer has left x: silence alone (without probes left
    // unanswered) never moves a peer.
    for p in [&a, &b] {
        assert!(
            !p.stdout.text().contains("moved to another rendezvous"),
            "{}",
            p.stdout.text()
        );
    }

    // x crashes: both peers move to y, the next in their list. A message typed at once
    // waits in the connection (QUIC retransmits it) and arrives through y's relay: the time it
    // takes is the gap a user sees (printed, not asserted: timing is not tested).
    x.proc.kill9();
    let lost_at = std::time::Instant::now();
    b.send_line("typed as the node died");
    let (_, arrived) = a.stdout.wait_for_at("typed as the node died", T);
    eprintln!(
        "relayed chat gap after the node loss: {:.1} s",
        arrived.duration_since(lost_at).as_secs_f64()
    );
    let moved = a.stdout.wait_for("moved to another rendezvous", T);
    assert!(moved.contains(&y.addr.to_string()), "{moved}");
    let moved = b.stdout.wait_for("moved to another rendezvous", T);
    assert!(moved.contains(&y.addr.to_string()), "{moved}");
    let report = wait_registered_with(&b_dir, y.addr);
    assert_eq!(report["registration"]["servers"], 3, "{report}");

    // The chat goes on: a message each way, through y's relay.
    b.send_line("after the loss");
    a.stdout.wait_for("after the loss", T);
    a.send_line("after the loss, back");
    b.stdout.wait_for("after the loss, back", T);
    let report = wait_registered_with(&b_dir, y.addr);
    let conns = report["connections"].as_array().expect("connections");
    assert_eq!(conns.len(), 1, "{report}");
    assert!(
        conns[0]["path"]
            .as_str()
            .is_some_and(|p| p.starts_with("relayed via rendezvous")),
        "{report}"
    );
    // The same connection all along: one connection on each side, never a second.
    let connects = |p: &Proc, needle: &str| {
        p.stdout
            .lines()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    };
    assert_eq!(connects(&b, "connected to "), 1);
    assert_eq!(connects(&a, "connected: "), 1);
    // The messages after the loss went through y's relay.
    assert!(sample(&y, "rendezvous_relay_packets_total") > 0);
    b.close_stdin();
    assert!(b.wait(T).success(), "b ends its chat cleanly");
    assert!(a.terminate(T).success());
    drop(z);
}

/// A node given Redis Sentinel (`redis+sentinel://`) follows the primary: a primary, a replica
/// and one sentinel (quorum 1), listed after a hung one; the node asks the sentinels (the hung
/// one costs its turn), registers a peer in the primary;
/// the primary is killed, the sentinel promotes the replica, and the node moves to it by itself:
/// the first peer is still found, a new peer registers, and the metric counts the move.
#[test]
fn a_node_given_sentinel_follows_the_primary_after_a_failover() {
    let Some(primary) = Redis::start() else {
        return;
    };
    let replica = Redis::replica_of(&primary);
    let dir = TempDir::new("sentinel");
    let sentinel_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let conf = dir.path().join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {sentinel_port}\nbind 127.0.0.1\ndir {}\n\
             sentinel monitor rv 127.0.0.1 {} 1\n\
             sentinel down-after-milliseconds rv 1000\n\
             sentinel failover-timeout rv 5000\n",
            dir.path().display(),
            primary.port
        ),
    )
    .expect("write sentinel.conf");
    let sentinel = Proc::spawn(
        "sentinel",
        Path::new("redis-server"),
        &[conf.to_str().expect("utf-8 path"), "--sentinel"],
    );
    sentinel.stdout.wait_for("+monitor master rv", T);
    // The sentinel knows the replica before the primary dies (it learns it from the primary).
    sentinel.stdout.wait_for("+slave slave", T);

    // The first sentinel given accepts connections and never answers (a hung host): it costs
    // its turn, and the real one is asked next.
    let hung = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
    let hung_port = hung.local_addr().expect("its address").port();
    let url = format!("redis+sentinel://127.0.0.1:{hung_port},127.0.0.1:{sentinel_port}/rv");
    let x = node_at(dir.path(), &url, "x", &[]);
    x.proc
        .stderr
        .wait_for(&format!("primary=127.0.0.1:{}", primary.port), T);
    let (_a, a_id) = listen("a", dir.path(), &x);
    // The registration reached the replica too (it is written to the primary).
    let key = format!("rv:peer:{a_id}");
    let deadline = std::time::Instant::now() + T;
    while replica.command(&[b"EXISTS", key.as_bytes()]) != ":1" {
        assert!(
            std::time::Instant::now() < deadline,
            "{key} never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let _ = primary.kill();
    sentinel.stdout.wait_for("+switch-master rv", T);
    x.proc
        .stderr
        .wait_for(&format!("primary=127.0.0.1:{}", replica.port), T);
    assert_eq!(
        replica.command(&[b"ROLE"]),
        "*3",
        "the replica is the primary now"
    );
    assert_eq!(
        sample(&x, "rendezvous_cluster_redis_primary_changes_total"),
        1
    );
    // Registering and looking up work through the new primary.
    let (_b, b_id) = listen("b", dir.path(), &x);
    let (ok, out, err) = lookup(dir.path(), "c", &x, &a_id);
    assert!(ok, "{out}\n{err}");
    let (ok, out, err) = lookup(dir.path(), "c", &x, &b_id);
    assert!(ok, "{out}\n{err}");
    let key = format!("rv:peer:{b_id}");
    assert_eq!(replica.command(&[b"EXISTS", key.as_bytes()]), ":1");
    drop((sentinel, hung));
}

/// A direct connection does not involve a node: two peers given all three nodes chat directly
/// (loopback), their node is killed, and messages typed at once arrive both ways without
/// waiting for either peer to move; the path never changes, and both peers then move to the
/// next node by themselves.
#[test]
fn a_direct_chat_is_untouched_by_the_loss_of_its_node() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-direct");
    let mut x = node(dir.path(), &redis, "x");
    let y = node(dir.path(), &redis, "y");
    let z = node(dir.path(), &redis, "z");
    let all = servers_direct(&[&x, &y, &z]);

    let a_dir = dir.path().join("a");
    let mut listen = args!["listen"];
    listen.extend(all.clone());
    let mut a = peer("a", &a_dir, &listen);
    let a_id = e2e::wait_registered(&a, T);
    let b_dir = dir.path().join("b");
    let mut connect = args!["connect", a_id.clone()];
    connect.extend(all);
    let mut b = peer("b", &b_dir, &connect);
    let line = b.stdout.wait_for(&format!("connected to {a_id}"), T);
    // The handshake rides the introduction, so on loopback it may finish before the punch
    // (connected on the relay, then direct a moment later).
    if !line.contains("direct to") {
        b.stdout.wait_for(&format!("path to {a_id}: direct to"), T);
    }
    a.stdout.wait_for("connected: ", T);
    wait_registered_with(&b_dir, x.addr);
    let direct_since = [a.stdout.lines().len(), b.stdout.lines().len()];

    x.proc.kill9();
    b.send_line("typed as the node died");
    a.stdout.wait_for("typed as the node died", T);
    a.send_line("and back");
    b.stdout.wait_for("and back", T);
    // Neither had to move first: the messages crossed while both may still be on x.
    b.stdout.wait_for("moved to another rendezvous", T);
    a.stdout.wait_for("moved to another rendezvous", T);
    b.send_line("after the move");
    a.stdout.wait_for("after the move", T);
    for (p, since) in [&a, &b].into_iter().zip(direct_since) {
        let text = p.stdout.lines()[since..].join("\n");
        assert!(
            !text.contains("relayed via"),
            "the path never left the direct one:\n{text}"
        );
    }
    // The same connection all along.
    assert_eq!(
        b.stdout
            .lines()
            .iter()
            .filter(|l| l.contains("connected to "))
            .count(),
        1
    );
    b.close_stdin();
    assert!(b.wait(T).success(), "b ends its chat cleanly");
    assert!(a.terminate(T).success());
    drop((y, z));
}

/// A node started without `--cluster-link` in a cluster whose other node has one: the relay
/// cannot join their peers, and the introduction says so. A `--relay-only` dialer is refused at
/// once with the reason (never left to time out on packets the nodes drop), whichever side
/// lacks the link; a `--relay-only` listener says why too.
#[test]
fn a_node_without_a_link_refuses_the_relay_across_clearly() {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-unlinked");
    let key = dir.path().join("cluster.key");
    write_key(&key);
    let (x, _) = linked_node(dir.path(), &redis, "x", &key);
    let w = node(dir.path(), &redis, "w");
    let only = |rv: &Rendezvous| {
        let mut args = rv.args();
        args.extend(args!["--server-tcp", "off", "--relay-only"]);
        args
    };
    // (listener's node, dialer's node, what the dialer is told, what the listener is told)
    let cases = [
        (
            &w,
            &x,
            "is on node w of this cluster, which has no node link (--cluster-link)",
            "is on node x of this cluster, and this node (w) has no node link",
        ),
        (
            &x,
            &w,
            "is on node x of this cluster, and this node (w) has no node link",
            "is on node w of this cluster, which cannot relay to this node (x)",
        ),
    ];
    for (n, (l_node, d_node, dialer_told, listener_told)) in cases.into_iter().enumerate() {
        let mut listen = args!["listen"];
        listen.extend(only(l_node));
        let mut a = peer("a", &dir.path().join(format!("a{n}")), &listen);
        let a_id = e2e::wait_registered(&a, T);
        let mut connect = args!["connect", a_id.clone()];
        connect.extend(only(d_node));
        let (status, out, err) = peer_run(&dir.path().join(format!("b{n}")), &connect, T);
        assert!(!status.success(), "{out}\n{err}");
        assert!(
            err.contains(&format!(
                "the rendezvous cannot relay to {a_id} (and --relay-only rules out a direct path)"
            )) && err.contains(dialer_told),
            "{err}"
        );
        assert!(!out.contains("connected to"), "{out}");
        let line = a.stderr.wait_for(
            "asked to connect, but the rendezvous cannot relay between you",
            T,
        );
        assert!(line.contains(listener_told), "{line}");
        assert!(a.terminate(T).success());
    }
    // Nothing was sent towards the node without a link: no dial failed.
    assert_eq!(sample(&x, "rendezvous_cluster_link_dial_failures_total"), 0);
}

/// A relayed pair whose node dies and whose peers move to two nodes the relay cannot join (one
/// of them without a link) is told so, rather than left with a silent connection: each side
/// says the rendezvous cannot relay to the other now. The listener moves first here: the
/// dialer learns it from its own new introduction.
#[test]
fn a_relayed_pair_split_onto_unlinked_nodes_by_a_failover_is_told_why_it_stalls() {
    relayed_pair_split_by_a_failover(Side::Listener);
}

/// As above with the dialer moving first: its own new introduction finds the listener still
/// on the dead node, so it learns why from the introduction the listener asks for once it
/// has moved (pushed to it as the target).
#[test]
fn a_relayed_pair_split_dialer_first_is_told_why_it_stalls_by_the_pushed_introduction() {
    relayed_pair_split_by_a_failover(Side::Dialer);
}

/// Which peer of a pair re-registers first after its node's loss.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Listener,
    Dialer,
}

fn relayed_pair_split_by_a_failover(first: Side) {
    let Some(redis) = Redis::start() else { return };
    let dir = TempDir::new("cluster-split");
    let key = dir.path().join("cluster.key");
    write_key(&key);
    let (mut x, _) = linked_node(dir.path(), &redis, "x", &key);
    let (y, _) = linked_node(dir.path(), &redis, "y", &key);
    let w = node(dir.path(), &redis, "w");

    let mut listen = args!["listen"];
    listen.extend(servers(&[&x, &w]));
    let mut a = peer("a", &dir.path().join("a"), &listen);
    let a_id = e2e::wait_registered(&a, T);
    let mut connect = args!["connect", a_id.clone()];
    connect.extend(servers(&[&x, &y]));
    let mut b = peer("b", &dir.path().join("b"), &connect);
    let line = b.stdout.wait_for(&format!("connected to {a_id}"), T);
    assert!(line.contains("relayed via rendezvous"), "{line}");
    let b_id = e2e::peer_id_of(&dir.path().join("b"));

    // The other side is stopped until the first has moved: the order is forced, not timed.
    let (mover, waiter) = match first {
        Side::Listener => (&a, &b),
        Side::Dialer => (&b, &a),
    };
    waiter.pause();
    x.proc.kill9();
    mover.stdout.wait_for("moved to another rendezvous", T);
    waiter.resume();

    let moved = a.stdout.wait_for("moved to another rendezvous", T);
    assert!(moved.contains(&w.addr.to_string()), "{moved}");
    let moved = b.stdout.wait_for("moved to another rendezvous", T);
    assert!(moved.contains(&y.addr.to_string()), "{moved}");
    let line = b
        .stderr
        .wait_for("but the rendezvous cannot relay to it now", T);
    assert!(
        line.contains(&format!("the connection to {a_id} is relayed")) && line.contains("node w"),
        "{line}"
    );
    let line = a
        .stderr
        .wait_for("but the rendezvous cannot relay to it now", T);
    assert!(
        line.contains(&format!("the connection to {b_id} is relayed"))
            && line.contains("(w) has no node link"),
        "{line}"
    );
    b.close_stdin();
    let _ = b.terminate(T);
    assert!(a.terminate(T).success());
}
