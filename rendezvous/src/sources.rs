//! Per-source accounting: what one remote party may make the server spend is bounded by the
//! address it sends from.
//!
//! A "source" is an IPv4 address or an IPv6 /64 prefix ([`SourceKey`]): an IPv6 host usually
//! owns a whole /64 and could otherwise take a fresh address for every request. Two structures
//! share that key:
//!
//! - [`SourceBuckets`]: a token bucket per source (request rates), in a map bounded by
//!   least-recently-used eviction, so that a flood of spoofed sources costs a fixed amount of
//!   memory and evicts the sources seen least recently instead of resetting everyone's limit.
//! - [`SourceSlots`]: how many concurrent things (connections, handshakes, tunnels, scrapes) a
//!   source holds, with a cap per source and in all; a slot is an RAII guard, so it is given back
//!   however the task holding it ends.
//!
//! Both take `now` from the caller and are tested directly.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::ratelimit::TokenBucket;

/// The unit a per-source limit counts: an IPv4 address, or the /64 prefix of an IPv6 address
/// (IPv4-mapped IPv6 addresses count as their IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceKey(IpAddr);

impl SourceKey {
    /// The key of `ip`.
    pub fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    SourceKey(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl std::fmt::Display for SourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A token bucket per source (or per any other key: the registry also limits introductions
/// per peer id), at most `capacity` keys remembered; the least recently used key is forgotten to
/// make room (it starts again with a full bucket if it comes back).
#[derive(Debug)]
pub struct SourceBuckets<K = SourceKey> {
    burst: f64,
    rate: f64,
    capacity: usize,
    /// Bucket and the stamp of its last use.
    buckets: HashMap<K, (TokenBucket, u64)>,
    /// Last-use stamp -> source, oldest first.
    by_use: BTreeMap<u64, K>,
    next_stamp: u64,
}

impl<K: Copy + Eq + std::hash::Hash> SourceBuckets<K> {
    /// `burst` events at once and `rate` per second sustained for each source; at most
    /// `capacity` sources (at least 1) remembered.
    pub fn new(burst: f64, rate: f64, capacity: usize) -> Self {
        SourceBuckets {
            burst,
            rate,
            capacity: capacity.max(1),
            buckets: HashMap::new(),
            by_use: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// Takes `cost` tokens from `source`'s bucket if it has them.
    pub fn try_take(&mut self, source: K, cost: f64, now: Instant) -> bool {
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        if let Some((_, old)) = self.buckets.get(&source) {
            self.by_use.remove(old);
        } else if self.buckets.len() >= self.capacity {
            if let Some((_, oldest)) = self.by_use.pop_first() {
                self.buckets.remove(&oldest);
            }
        }
        let (burst, rate) = (self.burst, self.rate);
        let entry = self
            .buckets
            .entry(source)
            .or_insert_with(|| (TokenBucket::new(burst, rate, now), stamp));
        entry.1 = stamp;
        self.by_use.insert(stamp, source);
        entry.0.try_take_n(cost, now)
    }

    /// Sources remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no source is remembered.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Why a slot was not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotRefusal {
    /// This source holds its maximum.
    #[error("too many from this source ({0} at most)")]
    PerSource(usize),
    /// All slots are taken.
    #[error("no free slot ({0} in all)")]
    Total(usize),
}

#[derive(Debug, Default)]
struct SlotCounts {
    per_source: HashMap<SourceKey, usize>,
    total: usize,
}

/// Concurrent slots, at most `per_source` for one source and `total` in all. Cheap to clone
/// (clones share the counts).
#[derive(Debug, Clone)]
pub struct SourceSlots {
    per_source: usize,
    total: usize,
    counts: Arc<Mutex<SlotCounts>>,
}

impl SourceSlots {
    /// At most `per_source` slots per source and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Self {
        SourceSlots {
            per_source,
            total,
            counts: Arc::default(),
        }
    }

    fn counts(&self) -> MutexGuard<'_, SlotCounts> {
        // The counts are updated in single steps: consistent whenever the lock is free.
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot for `source`, given back when the guard drops.
    pub fn try_acquire(&self, source: SourceKey) -> Result<Slot, SlotRefusal> {
        let mut counts = self.counts();
        if counts.total >= self.total {
            return Err(SlotRefusal::Total(self.total));
        }
        let held = counts.per_source.entry(source).or_insert(0);
        if *held >= self.per_source {
            return Err(SlotRefusal::PerSource(self.per_source));
        }
        *held += 1;
        counts.total += 1;
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }

    /// Slots held by `source` now.
    pub fn held_by(&self, source: SourceKey) -> usize {
        self.counts().per_source.get(&source).copied().unwrap_or(0)
    }

    /// Slots held in all now.
    pub fn held(&self) -> usize {
        self.counts().total
    }

    /// Slots in all.
    pub fn capacity(&self) -> usize {
        self.total
    }

    fn release(&self, source: SourceKey) {
        let mut counts = self.counts();
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.per_source.get_mut(&source) {
            *held -= 1;
            if *held == 0 {
                counts.per_source.remove(&source);
            }
        }
    }
}

/// One slot of a [`SourceSlots`]; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    slots: SourceSlots,
    source: SourceKey,
}

impl Slot {
    /// The source holding the slot.
    pub fn source(&self) -> SourceKey {
        self.source
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.release(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn v4(n: u32) -> SourceKey {
        SourceKey::of(IpAddr::V4(n.into()))
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(SourceKey::of(a), SourceKey::of(b));
        assert_ne!(SourceKey::of(a), SourceKey::of(c));
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        let plain: IpAddr = "198.51.100.7".parse().unwrap();
        assert_eq!(SourceKey::of(mapped), SourceKey::of(plain));
        assert_eq!(SourceKey::of(a).to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn buckets_limit_each_source_and_evict_the_least_recently_used() {
        let t0 = Instant::now();
        let mut buckets = SourceBuckets::new(2.0, 1.0, 3);
        assert!(buckets.try_take(v4(1), 1.0, t0));
        assert!(buckets.try_take(v4(1), 1.0, t0));
        assert!(!buckets.try_take(v4(1), 1.0, t0), "burst used up");
        assert!(buckets.try_take(v4(2), 1.0, t0));
        assert!(buckets.try_take(v4(3), 1.0, t0));
        // Source 1 is used again (refused, but used): 2 is now the least recently used.
        assert!(!buckets.try_take(v4(1), 1.0, t0));
        assert!(buckets.try_take(v4(4), 1.0, t0));
        assert_eq!(buckets.len(), 3);
        // 1 kept its empty bucket; 2 was forgotten and starts full.
        assert!(!buckets.try_take(v4(1), 1.0, t0));
        assert!(buckets.try_take(v4(2), 2.0, t0));
        // A flood of new sources never grows the map past its capacity.
        for n in 100..10_000 {
            buckets.try_take(v4(n), 1.0, t0);
        }
        assert_eq!(buckets.len(), 3);
        assert_eq!(buckets.by_use.len(), 3);
        // Refill over time.
        assert!(buckets.try_take(v4(9_999), 1.0, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn slots_are_capped_per_source_and_in_all_and_given_back_on_drop() {
        let slots = SourceSlots::new(2, 3);
        let a1 = slots.try_acquire(v4(1)).unwrap();
        let _a2 = slots.try_acquire(v4(1)).unwrap();
        assert_eq!(
            slots.try_acquire(v4(1)).unwrap_err(),
            SlotRefusal::PerSource(2)
        );
        let _b1 = slots.try_acquire(v4(2)).unwrap();
        assert_eq!(slots.try_acquire(v4(3)).unwrap_err(), SlotRefusal::Total(3));
        assert_eq!((slots.held(), slots.held_by(v4(1))), (3, 2));
        drop(a1);
        assert_eq!((slots.held(), slots.held_by(v4(1))), (2, 1));
        let _c1 = slots.try_acquire(v4(3)).unwrap();
        assert_eq!(slots.held(), 3);
    }
}
