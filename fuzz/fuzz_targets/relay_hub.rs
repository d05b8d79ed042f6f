//! The relay's per-session path with what is sans-IO today: a sender's byte stream through
//! `RelayDecoder`, each frame through `rendezvous::relay::RelayPolicy::admit` (introduced
//! destinations only, a token bucket of bytes, a byte quota; time passed in), and the admitted
//! packets re-encoded with the sender's id into per-destination batches, as
//! `rendezvous::relay::run` does. The hub's queues and forwarding (`forward`, `Sink`) are behind
//! tokio channels and not reachable yet. Once the hub is sans-IO (sessions opened and closed,
//! bytes in from a sender, batches taken out by a destination's writer, time passed in), this
//! target should drive several sessions with `Event`s for those too (a destination reads k
//! bytes, a session closes and reopens) and assert the hub's bounds after every event: bytes
//! queued per destination within the stated byte limit, every frame charged at least the
//! minimum cost (empty packets refused), forwarded + dropped == admitted for every counter,
//! relaying only to a destination that accepted the introduction, one relay session per
//! connection.
//!
//! Properties:
//! - a packet is admitted only if the last permission answer for its destination was yes, and
//!   that answer is less than `RelayPolicy::RECHECK` old; the permission question is asked at
//!   most once per destination per `RECHECK` (it takes the registry lock);
//! - admitted bytes never exceed the quota, nor the bucket's burst plus rate times the time
//!   elapsed;
//! - every batch decodes back to exactly the admitted packets for that destination, in order,
//!   each carrying the sender's id, and is `HEADER` bytes per packet larger than them.

#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use common::relay::{self, RelayDecoder, MAX_RELAY_PACKET};
use common::PeerId;
use libfuzzer_sys::fuzz_target;
use rendezvous::relay::{Refusal, RelayLimits, RelayPolicy};

const HEADER: usize = 2 + 16;
const DESTINATIONS: u8 = 4;

fn dest(n: u8) -> PeerId {
    PeerId::from_key_digest(&[n % DESTINATIONS + 10; 32])
}

#[derive(Arbitrary, Debug)]
enum Event {
    /// A well-formed frame to a destination: `len` bytes of `fill` (up to one past the cap).
    Frame { to: u8, len: u16, fill: u8 },
    /// Raw bytes on the stream (anything a hostile peer writes).
    Raw(Vec<u8>),
    /// Time passes (milliseconds).
    Wait(u16),
    /// The registry's answer about a destination changes (introduced or not).
    Permission { to: u8, allowed: bool },
}

#[derive(Arbitrary, Debug)]
struct Input {
    rate: u32,
    burst: u32,
    quota: u32,
    events: Vec<Event>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    let limits = RelayLimits {
        rate_bytes_per_s: u64::from(input.rate % 10_000_000),
        burst_bytes: u64::from(input.burst % 4_000_000),
        quota_bytes: u64::from(input.quota % 1_000_000),
        queue_packets: 1024,
    };
    let sender = PeerId::from_key_digest(&[1; 32]);
    let t0 = Instant::now();
    let mut now = t0;
    let mut policy = RelayPolicy::new(limits, t0);
    let mut decoder = RelayDecoder::new();
    let mut permission: HashMap<PeerId, bool> = HashMap::new();
    // Destination -> (when asked, answer) of the last permission question.
    let mut asked: HashMap<PeerId, (Instant, bool)> = HashMap::new();
    let mut admitted_bytes = 0u64;
    let mut admitted: HashMap<PeerId, Vec<Vec<u8>>> = HashMap::new();
    let mut batches: HashMap<PeerId, Vec<u8>> = HashMap::new();
    let burst = limits.burst_bytes.max(MAX_RELAY_PACKET as u64).max(1);

    for event in input.events {
        let mut wire = Vec::new();
        match event {
            Event::Frame { to, len, fill } => {
                let packet = vec![fill; usize::from(len) % (MAX_RELAY_PACKET + 2)];
                if relay::encode_into(&mut wire, &dest(to), &packet).is_err() {
                    assert!(packet.len() > MAX_RELAY_PACKET);
                }
            }
            Event::Raw(bytes) => wire = bytes,
            Event::Wait(ms) => now += Duration::from_millis(u64::from(ms)),
            Event::Permission { to, allowed } => {
                permission.insert(dest(to), allowed);
            }
        }
        decoder.push(&wire);
        loop {
            let (to, packet) = match decoder.next_frame_ref() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                // The driver closes the stream on a bad frame.
                Err(_) => return finish(sender, &admitted, &batches),
            };
            let mut question = None;
            let verdict = policy.admit(to, packet.len(), now, |d| {
                let answer = permission.get(&d).copied().unwrap_or(false);
                question = Some((d, answer));
                answer
            });
            if let Some((d, answer)) = question {
                assert_eq!(d, to, "asked about another destination");
                if let Some((at, _)) = asked.get(&d) {
                    assert!(
                        now.duration_since(*at) >= RelayPolicy::RECHECK,
                        "permission asked again after {:?}",
                        now.duration_since(*at)
                    );
                }
                asked.insert(d, (now, answer));
            }
            match verdict {
                Ok(()) => {
                    let (at, answer) = asked.get(&to).copied().expect("admitted without asking");
                    assert!(answer, "admitted after a no");
                    assert!(
                        now.duration_since(at) < RelayPolicy::RECHECK,
                        "stale yes used"
                    );
                    admitted_bytes += packet.len() as u64;
                    if limits.quota_bytes > 0 {
                        assert!(admitted_bytes <= limits.quota_bytes, "over the quota");
                    }
                    let elapsed = now.duration_since(t0).as_secs_f64();
                    let bound = burst as f64 + limits.rate_bytes_per_s as f64 * elapsed;
                    assert!(
                        admitted_bytes as f64 <= bound * (1.0 + 1e-9) + 1.0,
                        "{admitted_bytes} bytes admitted, bucket allows {bound}"
                    );
                    let batch = batches.entry(to).or_default();
                    let before = batch.len();
                    relay::encode_into(batch, &sender, packet)
                        .unwrap_or_else(|e| panic!("a decoded packet does not encode: {e}"));
                    assert_eq!(batch.len() - before, HEADER + packet.len());
                    admitted.entry(to).or_default().push(packet.to_vec());
                }
                Err(Refusal::NotIntroduced) => {
                    let (_, answer) = asked.get(&to).copied().expect("refused without asking");
                    assert!(!answer, "refused as not introduced after a yes");
                }
                Err(Refusal::Rate | Refusal::Quota) => {}
            }
        }
    }
    finish(sender, &admitted, &batches);
});

/// Every batch decodes to the admitted packets for its destination, from the sender.
fn finish(
    sender: PeerId,
    admitted: &HashMap<PeerId, Vec<Vec<u8>>>,
    batches: &HashMap<PeerId, Vec<u8>>,
) {
    assert_eq!(admitted.len(), batches.len());
    for (to, batch) in batches {
        let mut decoder = RelayDecoder::new();
        decoder.push(batch);
        let mut got = Vec::new();
        while let Ok(Some((from, packet))) = decoder.next_frame() {
            assert_eq!(from, sender, "a forwarded packet does not name its sender");
            got.push(packet);
        }
        assert_eq!(decoder.buffered(), 0, "a batch has trailing bytes");
        assert!(
            admitted.get(to) == Some(&got),
            "a batch differs from what was admitted"
        );
    }
}
