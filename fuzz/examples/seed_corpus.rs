//! Writes the seed corpus (`fuzz/corpus/<target>/<name>`) from the real encoders: a few
//! messages, frame streams, relay batches, STUN packets and registry scripts per target, valid
//! ones and typical bad ones. Run by `scripts/fuzz.sh --seed-corpus`; commit what it writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::message::{Candidate, CandidateKind, PeerApp, PeerInfo};
use common::nat::{Behaviour, NatProfile};
use common::stun::{self, ProbeTag};
use common::stun5780::{self, ResponseContext};
use common::{frame, relay, ChatMessage, ControlMessage, ErrorCode, PeerId, PeerMessage};
use p2p_fuzz::registry_script::{encode, Msg, Op};
use rendezvous::nodelink;

fn id(n: u8) -> PeerId {
    PeerId::from_key_digest(&[n; 32])
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a constant address")
}

struct Corpus {
    dir: PathBuf,
}

impl Corpus {
    fn write(&self, target: &str, name: &str, bytes: &[u8]) {
        let dir = self.dir.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        std::fs::write(dir.join(name), bytes).expect("write a seed");
    }
}

fn control_messages() -> Vec<(&'static str, ControlMessage)> {
    let when = time::macros::datetime!(2026-11-25 07:40:58.25 UTC);
    vec![
        (
            "register",
            ControlMessage::Register {
                version: common::PROTOCOL_VERSION,
                local_addrs: vec![addr("10.0.0.2:4000"), addr("[fd00::2]:4000")],
                mapped_port: None,
            },
        ),
        (
            "registered",
            ControlMessage::Registered {
                id: id(1),
                observed: addr("203.0.113.5:4000"),
                keepalive_s: 15,
                version: common::PROTOCOL_VERSION,
                server_addrs: vec![addr("203.0.113.10:7000"), addr("[2001:db8::10]:7000")],
            },
        ),
        ("query", ControlMessage::Query { id: id(2) }),
        (
            "peer_info",
            ControlMessage::PeerInfo(PeerInfo {
                id: id(2),
                observed: addr("[2001:db8::5]:5000"),
                local_addrs: vec![addr("192.168.1.2:5000")],
                mapped_port: Some(41000),
                online: true,
                last_seen: when,
            }),
        ),
        ("connect", ControlMessage::connect(id(2))),
        (
            "connect_first_flight",
            ControlMessage::Connect {
                id: id(2),
                first_flight: common::message::FirstFlight::new(vec![0xc3; 1200]),
            },
        ),
        (
            "punch",
            ControlMessage::Punch {
                peer: id(2),
                candidates: vec![
                    Candidate {
                        addr: addr("203.0.113.6:5000"),
                        kind: CandidateKind::Observed,
                    },
                    Candidate {
                        addr: addr("10.0.0.3:5000"),
                        kind: CandidateKind::Local,
                    },
                    Candidate {
                        addr: addr("203.0.113.6:5002"),
                        kind: CandidateKind::Predicted,
                    },
                ],
                nonce: 0x9E37_79B9_7F4A_7C15,
                key: stun::PunchKey::from_bytes(*b"sixteen byte key"),
                nat: None,
                no_relay: None,
                first_flight: common::message::FirstFlight::new(vec![0xc0; 1252]),
            },
        ),
        ("relay_open", ControlMessage::RelayOpen {}),
        (
            "relay_channel",
            ControlMessage::RelayChannel {
                peer: PeerId::from_key_digest(&[7; 32]),
            },
        ),
        (
            "relay_channel_ready",
            ControlMessage::RelayChannelReady {
                peer: PeerId::from_key_digest(&[7; 32]),
                channel: ControlMessage::channel_hex(0x0123_4567_89ab_cdef),
                max_packet: 1463,
            },
        ),
        (
            "relay_ready",
            ControlMessage::RelayReady {
                max_packet: relay::MAX_RELAY_PACKET as u32,
                rate_bytes_per_s: 1_000_000,
            },
        ),
        ("ping", ControlMessage::Ping { seq: 7 }),
        ("pong", ControlMessage::Pong { seq: 7 }),
        (
            "nat",
            ControlMessage::Nat {
                nat: common::nat::NatProfile {
                    udp: true,
                    no_nat: false,
                    mapping: common::nat::Behaviour::AddressAndPortDependent,
                    filtering: common::nat::Behaviour::AddressAndPortDependent,
                    inbound_takes_port: false,
                },
            },
        ),
        (
            "punch_result",
            ControlMessage::PunchResult {
                peer: id(2),
                direct: true,
            },
        ),
        (
            "accept",
            ControlMessage::Accept {
                peer: id(2),
                nonce: 0x1000_0000_0000_0000,
            },
        ),
        ("ack", ControlMessage::Ack {}),
        (
            "error",
            ControlMessage::error(ErrorCode::RateLimited, "too many requests"),
        ),
    ]
}

fn peer_messages() -> Vec<(&'static str, PeerMessage)> {
    vec![
        ("open_chat", PeerMessage::Open { app: PeerApp::Chat }),
        ("open_file", PeerMessage::Open { app: PeerApp::File }),
        (
            "open_service",
            PeerMessage::Open {
                app: PeerApp::Service,
            },
        ),
        (
            "file_resume",
            PeerMessage::FileResume {
                offset: 4096,
                prefix_blake3: "cd".repeat(32),
            },
        ),
        ("file_start", PeerMessage::FileStart { offset: 4096 }),
        (
            "file_end",
            PeerMessage::FileEnd {
                blake3: "ef".repeat(32),
            },
        ),
        (
            "service_open",
            PeerMessage::ServiceOpen {
                name: "ssh".into(),
                probe: false,
            },
        ),
        (
            "service_reply",
            PeerMessage::ServiceReply {
                ok: false,
                message: "service ssh (127.0.0.1:22) is down".into(),
            },
        ),
        (
            "file_header",
            PeerMessage::FileHeader {
                name: "notes.txt".into(),
                size: 1234,
            },
        ),
        (
            "file_result",
            PeerMessage::FileResult {
                ok: false,
                blake3: "cd".repeat(32),
                message: "checksum mismatch".into(),
            },
        ),
        ("ping", PeerMessage::Ping { seq: 3 }),
        (
            "pong",
            PeerMessage::Pong {
                seq: 3,
                nat: Some(NatProfile {
                    udp: true,
                    no_nat: false,
                    mapping: Behaviour::EndpointIndependent,
                    filtering: Behaviour::AddressAndPortDependent,
                    inbound_takes_port: false,
                }),
            },
        ),
        (
            "error",
            PeerMessage::Error {
                message: "no such app".into(),
            },
        ),
    ]
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus"));
    let corpus = Corpus { dir };

    // Control and peer messages, and typical bad ones.
    for (name, msg) in control_messages() {
        corpus.write("control_message", &format!("{name}.json"), &msg.encode());
    }
    for (name, bad) in [
        ("bad_unknown_type", &br#"{"type":"launch_missiles"}"#[..]),
        ("bad_no_type", br#"{"id":"x"}"#),
        ("bad_extra_field", br#"{"type":"ping","seq":1,"evil":true}"#),
        ("bad_id", br#"{"type":"query","id":"not-a-uuid"}"#),
        ("bad_json", b"{\"type\":\"ping\",\"seq\":"),
    ] {
        corpus.write("control_message", bad_name(name).as_str(), bad);
        corpus.write("peer_message", bad_name(name).as_str(), bad);
    }
    for (name, msg) in peer_messages() {
        corpus.write("peer_message", &format!("{name}.json"), &msg.encode());
    }
    let chat = ChatMessage {
        from: id(1),
        to: id(2),
        sent_at: time::macros::datetime!(2026-11-25 07:40:58.123456789 +01:00),
        body: "hello \u{1F44B} \"quoted\"\n".into(),
    };
    corpus.write("peer_message", "chat.json", &chat.encode());

    // Frame streams: real messages framed, split, truncated, oversized.
    let bodies: Vec<Vec<u8>> = control_messages().iter().map(|(_, m)| m.encode()).collect();
    let framed: Vec<Vec<u8>> = bodies
        .iter()
        .map(|b| frame::encode(b).expect("a small frame"))
        .collect();
    corpus.write("frames", "one_register", &framed[0]);
    corpus.write("frames", "all_control_messages", &framed.concat());
    corpus.write(
        "frames",
        "empty_frame",
        &frame::encode(b"").expect("empty frame"),
    );
    let mut truncated = framed[3].clone();
    truncated.truncate(truncated.len() - 5);
    corpus.write(
        "frames",
        "truncated",
        &[framed[2].clone(), truncated].concat(),
    );
    corpus.write("frames", "prefix_truncated", &framed[0][..3]);
    let mut oversized = ((frame::MAX_FRAME_LEN + 1) as u32).to_be_bytes().to_vec();
    oversized.extend_from_slice(&bodies[0]);
    corpus.write(
        "frames",
        "oversized_prefix",
        &[framed[1].clone(), oversized].concat(),
    );

    // Relay batches.
    let mut batch = Vec::new();
    for (n, packet) in [
        (2u8, vec![0x40u8; 1200]),
        (3, vec![0xC3; 60]),
        (2, Vec::new()),
    ] {
        relay::encode_into(&mut batch, &id(n), &packet).expect("packet within the cap");
    }
    corpus.write("relay_frames", "batch", &batch);
    corpus.write(
        "relay_frames",
        "one_packet",
        &relay::encode(&id(2), b"\x41quic short header").expect("small packet"),
    );
    corpus.write("relay_frames", "bad_length", &[0, 3, 1, 2, 3]);
    let mut bad_peer = relay::encode(&id(2), b"x").expect("small packet");
    bad_peer[2..18].copy_from_slice(&[0; 16]);
    corpus.write("relay_frames", "bad_peer", &bad_peer);
    let mut max = relay::encode(&id(4), &[0xAB; relay::MAX_RELAY_PACKET]).expect("at the cap");
    max.truncate(max.len() - 1);
    corpus.write("relay_frames", "max_packet_truncated", &max);

    // The node link: a packets frame carrying relay frames, an accept, both in one stream, and
    // the ways a stream goes bad (unknown tag, a batch over the cap, a bad peer id).
    let inner = relay::encode(&id(2), b"\x41quic short header").expect("small packet");
    let packets = nodelink::encode_packets(&id(3), &inner).expect("small batch");
    let consent = nodelink::encode_consent(&id(2), &id(3), 0x0102_0304_0506_0708);
    corpus.write("node_link", "packets", &packets);
    corpus.write("node_link", "consent", &consent);
    corpus.write(
        "node_link",
        "stream",
        &[packets.clone(), consent.clone(), packets.clone()].concat(),
    );
    corpus.write("node_link", "bad_tag", &[7, 0, 0]);
    let mut too_long = packets.clone();
    too_long[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
    corpus.write("node_link", "too_long", &too_long);
    let mut bad_peer = consent;
    bad_peer[17..33].copy_from_slice(&[0; 16]);
    corpus.write("node_link", "bad_peer", &bad_peer);

    // The relay hub target reads a script of one-byte operations and their arguments (see
    // `rendezvous::relay::run_script`): 0 raw bytes, 1 a frame to a destination, 2 time passes,
    // 3 a permission changes (0 allowed, 1 awaiting accept, 2 denied), 4 a destination drains,
    // 5 the session is polled.
    let frame = |dest: u8, len: u16| {
        let [hi, lo] = len.to_be_bytes();
        vec![1, dest, hi, lo]
    };
    // Frames to allowed destinations, a destination that never drains, one that does.
    let mut script = Vec::new();
    for i in 0..64u16 {
        script.extend(frame((i % 3) as u8, 1200));
        if i % 8 == 0 {
            script.extend([4, 1]);
        }
    }
    corpus.write("relay_hub", "frames_and_drains", &script);
    // Packets held while an introduction awaits its accept, then the accept, then expiry.
    let mut script = vec![3, 5, 1];
    for _ in 0..12 {
        script.extend(frame(5, 1000));
    }
    script.extend([3, 5, 0, 5, 4, 5]);
    script.extend([3, 6, 1]);
    script.extend(frame(6, 500));
    script.extend([2, 255, 5]);
    corpus.write("relay_hub", "held_then_accepted", &script);
    // Empty packets, a denied destination, the clock running, raw garbage ending the session.
    let mut script = Vec::new();
    for _ in 0..32 {
        script.extend(frame(2, 0));
    }
    script.extend([3, 7, 2]);
    script.extend(frame(7, 100));
    script.extend([2, 50, 0, 0, 4, 0, 3, 1, 2]);
    corpus.write("relay_hub", "empty_denied_garbage", &script);

    // STUN: what both codecs write, plus a probe from a peer.
    let txid = [7u8; 12];
    let tag = ProbeTag {
        nonce: 0xdead_beef_0000_0001,
        sender: id(4),
    };
    let probe_key = stun::PunchKey::from_bytes([0x5a; 16]);
    let ctx = ResponseContext {
        mapped: addr("198.51.100.7:41000"),
        origin: addr("203.0.113.10:3478"),
        other: Some(addr("203.0.113.11:3479")),
    };
    for (name, packet) in [
        ("binding_request", stun::binding_request(txid)),
        (
            "binding_success_v4",
            stun::binding_success(txid, addr("203.0.113.7:41000")),
        ),
        (
            "binding_success_v6",
            stun::binding_success(txid, addr("[2001:db8::1]:9")),
        ),
        ("probe_request", stun::probe_request(&tag, 3, &probe_key)),
        (
            "probe_success",
            stun::probe_success(tag.transaction(3), addr("198.51.100.2:7"), &probe_key),
        ),
        (
            "change_request_ip_port",
            stun5780::binding_request_with_change(txid, true, true),
        ),
        (
            "change_request_port",
            stun5780::binding_request_with_change(txid, false, true),
        ),
        ("rfc5780_response", stun5780::binding_response(txid, &ctx)),
        (
            "rfc5780_error",
            stun5780::binding_error(txid, 420, "no alternate address"),
        ),
    ] {
        corpus.write("stun", name, &packet);
    }

    // Registry scripts.
    let register = Msg::Register {
        version_ok: true,
        locals: 0b0010_0001,
        repeat: false,
        too_many: false,
    };
    let send = |peer, conn, from, msg| Op::Send {
        peer,
        conn,
        from,
        msg,
    };
    let hour = Op::Wait { secs: 3600 };
    // Peer 1 accepts peer 0's introduction with the right nonce: relaying is allowed for an
    // hour, renewed by the accept of a later introduction the other way round; both report
    // within the accept window, too late afterwards.
    corpus.write(
        "registry",
        "introduce_accept_and_report",
        &encode(&[
            send(0, 0, 0, register),
            send(1, 0, 3, register),
            send(0, 0, 0, Msg::Query(1)),
            send(0, 0, 0, Msg::Connect(1)),
            send(1, 0, 3, Msg::Accept(0, true)),
            send(0, 0, 0, Msg::PunchResult(1, true)),
            send(1, 0, 3, Msg::PunchResult(0, false)),
            Op::Wait { secs: 30 },
            send(0, 0, 1, Msg::Ping(1)),
            Op::Wait { secs: 1800 },
            send(1, 0, 3, Msg::Connect(0)),
            send(0, 0, 1, Msg::Accept(1, true)),
            Op::Wait { secs: 1800 },
            send(0, 0, 1, Msg::PunchResult(1, true)),
            hour,
            send(2, 0, 2, register),
            send(2, 0, 2, Msg::Connect(1)),
            send(1, 0, 3, Msg::Accept(2, true)),
        ]),
    );
    // Accepts that must be refused: a wrong nonce, the requester accepting its own
    // introduction, the right nonce after the accept window; then one in time.
    corpus.write(
        "registry",
        "accept_refused",
        &encode(&[
            send(0, 0, 0, register),
            send(1, 0, 3, register),
            send(1, 0, 3, Msg::Accept(0, true)),
            send(0, 0, 0, Msg::Connect(1)),
            send(1, 0, 3, Msg::Accept(0, false)),
            send(0, 0, 0, Msg::Accept(1, true)),
            Op::Wait { secs: 121 },
            send(1, 0, 3, Msg::Accept(0, true)),
            send(0, 0, 0, Msg::Connect(1)),
            Op::Wait { secs: 60 },
            send(1, 0, 3, Msg::Accept(0, true)),
            send(1, 0, 3, Msg::Accept(0, true)),
        ]),
    );
    corpus.write(
        "registry",
        "reconnect_and_stale_close",
        &encode(&[
            send(0, 0, 0, register),
            send(0, 1, 1, register),
            Op::Close { peer: 0, conn: 0 },
            send(1, 0, 2, register),
            send(1, 0, 2, Msg::Connect(0)),
            Op::Close { peer: 0, conn: 0 },
            send(1, 0, 2, Msg::Connect(0)),
            send(1, 0, 2, Msg::Query(0)),
        ]),
    );
    corpus.write(
        "registry",
        "bad_registrations",
        &encode(&[
            send(
                0,
                0,
                0,
                Msg::Register {
                    version_ok: false,
                    locals: 0,
                    repeat: false,
                    too_many: false,
                },
            ),
            send(0, 0, 0, Msg::Query(1)),
            send(
                0,
                0,
                0,
                Msg::Register {
                    version_ok: true,
                    locals: 0xFF,
                    repeat: false,
                    too_many: true,
                },
            ),
            send(
                0,
                0,
                5,
                Msg::Register {
                    version_ok: true,
                    locals: 0xFF,
                    repeat: true,
                    too_many: false,
                },
            ),
            send(0, 0, 5, Msg::ServerSide(2)),
            send(0, 0, 5, Msg::Connect(0)),
            send(1, 0, 0, register),
            send(1, 0, 0, Msg::Connect(0)),
        ]),
    );
    // Offline peers expire 30 days after they were last seen (not a second before), oldest
    // first and a batch at a time; an online one never does, and an expired one registers again
    // as a new identity.
    corpus.write(
        "registry",
        "migration_and_expiry",
        &encode(&[
            send(0, 0, 0, register),
            send(1, 0, 3, register),
            send(2, 0, 2, register),
            Op::Observe { peer: 0, from: 4 },
            send(1, 0, 3, Msg::Connect(0)),
            Op::Close { peer: 0, conn: 0 },
            hour,
            Op::Close { peer: 2, conn: 0 },
            // 30 days after peer 0 went offline, minus a second.
            Op::Wait {
                secs: 29 * 24 * 3600,
            },
            Op::Wait { secs: 60_000 },
            Op::Wait { secs: 22_799 },
            Op::Expire { max: 7 },
            Op::Wait { secs: 1 },
            Op::Expire { max: 0 },
            send(1, 0, 3, Msg::Query(0)),
            send(1, 0, 3, Msg::Query(2)),
            hour,
            Op::Expire { max: 7 },
            send(1, 0, 3, Msg::Query(2)),
            send(1, 0, 3, Msg::Connect(0)),
            Op::Wait {
                secs: 90 * 24 * 3600,
            },
            Op::Expire { max: 7 },
            send(0, 0, 6, register),
            send(1, 0, 3, Msg::Query(0)),
        ]),
    );
    // More registrations from one source (two ports of one address) than its burst allows:
    // the last ones are refused rate_limited, then time refills the bucket.
    let mut flood: Vec<Op> = (0..205u8)
        .map(|i| send(i % 6, 0, i % 2, register))
        .collect();
    flood.extend([Op::Wait { secs: 2 }, send(0, 0, 0, register)]);
    corpus.write("registry", "registration_flood", &encode(&flood));

    // The demux target reads a script (see `transport::check_receive_script`): 0 a UDP route,
    // 1 a route to the virtual path, 2 an alias, 3 routes removed, 4 a received batch (entries:
    // source, shape, stride, fill, per segment a STUN bit and a length; then the buffer size),
    // 5 an injected datagram or a send, 6 a claim, 7 a release.
    corpus.write(
        "demux",
        "gro_batch_from_an_alias",
        &[
            2, 0, 5, 4, 1, 0, 0x84, 0, 40, 9, 0b1, 0, 0b100, 10, 4, 0x60, 0, 0, 1, 0, 20, 0, 10, 0,
            200,
        ],
    );
    corpus.write(
        "demux",
        "routes_sends_and_injections",
        &[
            0, 5, 0, 1, 6, 3, 5, 5, 0, 200, 3, 5, 6, 1, 100, 7, 5, 0, 1, 0, 0, 4, 0, 0x10, 0, 0, 2,
            0, 30, 0, 0, 3, 5, 2, 1, 0, 50,
        ],
    );
    // A claimed address and one owned by a routed stable address are never aliased away;
    // after the release and the removal they are.
    corpus.write(
        "demux",
        "claimed_and_routed_owners",
        &[
            6, 0, 2, 0, 5, 0, 5, 2, 2, 2, 6, 7, 0, 2, 0, 5, 3, 5, 2, 2, 6,
        ],
    );
    // The puncher target reads a script (see `punch::script::check_puncher_script`): a head
    // byte (role, candidate count), the candidates, then operations of three bytes (op, address,
    // pick): 0 time passes, 1 sends, 2 a genuine answer, 3 a genuine probe, 4 a forged answer,
    // 5 a forged probe, 6 arbitrary bytes (pick of them follow), 7 an answer to no probe.
    corpus.write(
        "puncher",
        "initiator_forgery_then_answer",
        &[0, 5, 1, 0, 0, 4, 9, 0, 2, 5, 0, 0, 0, 50, 1, 0, 0],
    );
    let mut responder = vec![7, 1, 2, 3, 4];
    for round in 0..20u8 {
        responder.extend([3, 20 + round, round, 5, 30, round, 1, 0, 0, 0, 0, 10]);
        responder.extend([4, 40, round, 6, 41, 3, 0x00, 0x01, 0x00]);
    }
    responder.extend([2, 1, 0, 7, 2, 9, 0, 0, 255, 0, 0, 255, 1, 0, 0]);
    corpus.write("puncher", "responder_under_attack", &responder);
    // Many candidates, the whole schedule, no answer: the session's probe budget.
    let mut budget = vec![14, 0, 1, 2, 3, 4, 5, 6, 7];
    for _ in 0..40 {
        budget.extend([0, 0, 20, 1, 0, 0]);
    }
    corpus.write("puncher", "schedule_without_answers", &budget);
    // Many STUN segments in one GRO buffer: more than the STUN channel holds.
    let mut many = vec![4, 0, 3, 0x04, 0, 24, 1];
    many.extend([0xff, 0xff, 0xff, 8]);
    many.extend([4, 2, 0, 0x04, 0, 24, 1, 0xff, 0xff, 0xff, 8]);
    many.extend([0x10, 0]);
    corpus.write("demux", "stun_overflow", &many);
}

fn bad_name(name: &str) -> String {
    format!("{name}.json")
}
