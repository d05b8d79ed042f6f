//! Places for connections that have not yet done what they came for (send a request, finish a
//! TLS handshake), where a newcomer is always admitted.
//!
//! A fixed number of such places with plain refusal is what a slowloris exhausts: it opens
//! connections and never completes them, and every honest client is refused until they time
//! out. Here a newcomer always gets a place: when its source holds its cap, its own oldest
//! connection is closed; when the room is full, the oldest connection of the source that holds
//! the most places is. An honest client holds one place and completes within a round trip or
//! two; it is closed only if every source in the room holds no more than it does (the room
//! holds `total` different sources) and it is the oldest of them, so an attacker needs as many
//! addresses as the room has places, opening connections faster than the client's round trip
//! (a per-source rate limit on new connections makes that harder still). [`WaitingRoom`] is the
//! pure logic; [`Lobby`] is how a tokio driver shares it, with a [`Ticket`] per connection.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::sources::SourceKey;

/// Which cap made room for a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// The newcomer's source held all its waiting places: its own oldest was closed.
    PerSource,
    /// The waiting room was full: the oldest waiting connection of the source holding the
    /// most places was closed.
    Total,
}

/// Connections that have not yet delivered their request, in arrival order.
///
/// A newcomer is always admitted: if its source holds all its places, that source's oldest
/// waiting connection makes room; if the room is full, the oldest connection of the source
/// holding the most places does (the newcomer's own, if admitting it would make its source
/// the one holding the most). `H` is what the driver needs to close a connection (dropping it
/// closes it).
#[derive(Debug)]
pub struct WaitingRoom<H> {
    per_source: usize,
    total: usize,
    next_id: u64,
    /// Id (arrival order) -> source and handle.
    waiting: BTreeMap<u64, (SourceKey, H)>,
    by_source: HashMap<SourceKey, usize>,
}

impl<H> WaitingRoom<H> {
    /// At most `per_source` waiting connections per source and `total` in all (each at least 1).
    pub fn new(per_source: usize, total: usize) -> Self {
        WaitingRoom {
            per_source: per_source.max(1),
            total: total.max(1),
            next_id: 0,
            waiting: BTreeMap::new(),
            by_source: HashMap::new(),
        }
    }

    /// Admits a connection from `source`; returns its id and the connection closed to make
    /// room, if one was.
    pub fn admit(&mut self, source: SourceKey, handle: H) -> (u64, Option<(H, Eviction)>) {
        let held = self.by_source.get(&source).copied().unwrap_or(0);
        let evicted = if held >= self.per_source {
            self.remove_oldest_of(|s| s == source)
                .map(|h| (h, Eviction::PerSource))
        } else if self.waiting.len() >= self.total {
            let most = self.by_source.values().copied().max().unwrap_or(0);
            if held + 1 > most {
                // Admitted, the newcomer's source would hold the most: it pays.
                self.remove_oldest_of(|s| s == source)
            } else {
                let by_source = &self.by_source;
                let heaviest = |s: SourceKey| by_source.get(&s).copied() == Some(most);
                let victim = self
                    .waiting
                    .iter()
                    .find(|(_, (s, _))| heaviest(*s))
                    .map(|(id, _)| *id);
                victim.and_then(|id| self.remove(id))
            }
            .map(|h| (h, Eviction::Total))
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.insert(id, (source, handle));
        *self.by_source.entry(source).or_insert(0) += 1;
        (id, evicted)
    }

    fn remove_oldest_of(&mut self, pick: impl Fn(SourceKey) -> bool) -> Option<H> {
        let oldest = self
            .waiting
            .iter()
            .find(|(_, (s, _))| pick(*s))
            .map(|(id, _)| *id);
        oldest.and_then(|id| self.remove(id))
    }

    /// Takes connection `id` out (its request arrived, or it ended); `None` if it is not here.
    pub fn remove(&mut self, id: u64) -> Option<H> {
        let (source, handle) = self.waiting.remove(&id)?;
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
        Some(handle)
    }

    /// Connections waiting now.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// A [`WaitingRoom`] shared by a driver and its connection tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Lobby(Arc<Mutex<WaitingRoom<oneshot::Sender<()>>>>);

impl Lobby {
    /// At most `per_source` waiting per source and `total` in all.
    pub fn new(per_source: usize, total: usize) -> Self {
        Lobby(Arc::new(Mutex::new(WaitingRoom::new(per_source, total))))
    }

    fn room(&self) -> MutexGuard<'_, WaitingRoom<oneshot::Sender<()>>> {
        // Updated in single steps: consistent whenever the lock is free.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `source`: its ticket, and which cap closed an older connection
    /// to make room, if one was closed.
    pub fn enter(&self, source: SourceKey) -> (Ticket, Option<Eviction>) {
        let (tx, evicted) = oneshot::channel();
        let (id, closed) = self.room().admit(source, tx);
        // Dropping the sender (outside the lock) tells that connection to close.
        let why = closed.map(|(sender, why)| {
            drop(sender);
            why
        });
        let ticket = Ticket {
            lobby: self.clone(),
            id,
            evicted,
        };
        (ticket, why)
    }

    /// Connections waiting now.
    pub fn waiting(&self) -> usize {
        self.room().len()
    }
}

/// A connection's place in a [`Lobby`]; dropping it leaves.
#[derive(Debug)]
pub struct Ticket {
    lobby: Lobby,
    id: u64,
    evicted: oneshot::Receiver<()>,
}

impl Ticket {
    /// Runs `work` until it completes (`Some`) or a newer connection takes this place (`None`).
    pub async fn unless_evicted<F: Future>(&mut self, work: F) -> Option<F::Output> {
        tokio::select! {
            out = work => Some(out),
            // Our sender was dropped: a newer connection took our place.
            _ = &mut self.evicted => None,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.lobby.room().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(n: u32) -> SourceKey {
        SourceKey::of(std::net::IpAddr::V4(n.into()))
    }

    #[test]
    fn a_newcomer_is_always_admitted_by_closing_the_oldest_waiting_connection() {
        let mut room = WaitingRoom::new(2, 4);
        // Source 1 fills its two places; a third closes its own oldest, not anyone else's.
        assert_eq!(room.admit(v4(1), "1a"), (0, None));
        assert_eq!(room.admit(v4(1), "1b"), (1, None));
        assert_eq!(
            room.admit(v4(1), "1c"),
            (2, Some(("1a", Eviction::PerSource)))
        );
        assert_eq!(room.len(), 2);
        // Two more sources fill the room; the next newcomer closes the oldest of all.
        assert_eq!(room.admit(v4(2), "2a").1, None);
        assert_eq!(room.admit(v4(3), "3a").1, None);
        assert_eq!(room.len(), 4);
        let (scraper, evicted) = room.admit(v4(9), "scraper");
        assert_eq!(evicted, Some(("1b", Eviction::Total)));
        // The scraper's request arrives: it leaves the room and is never evicted.
        assert_eq!(room.remove(scraper), Some("scraper"));
        assert_eq!(room.remove(scraper), None);
        // A slowloris from many sources only ever closes its own older connections while the
        // scraper waits: a scraper admitted after the room is full survives
        // `total - 1` further newcomers.
        let (scraper, _) = room.admit(v4(9), "scraper");
        for n in 0..3 {
            let (_, evicted) = room.admit(v4(100 + n), "attack");
            assert_ne!(evicted.map(|e| e.0), Some("scraper"));
        }
        assert_eq!(room.remove(scraper), Some("scraper"));
        assert!(room.len() <= 4);
    }

    #[test]
    fn a_full_room_closes_a_connection_of_the_source_holding_the_most() {
        let mut room = WaitingRoom::new(4, 4);
        // The honest client came first; an attacker fills the rest from one source.
        let (honest, _) = room.admit(v4(1), "honest");
        for _ in 0..3 {
            assert_eq!(room.admit(v4(2), "attack").1, None);
        }
        // Newcomers from the attacker's source and from fresh sources close the attacker's
        // connections, never the older honest one.
        assert_eq!(
            room.admit(v4(2), "attack").1,
            Some(("attack", Eviction::Total))
        );
        for n in 3..5 {
            assert_eq!(
                room.admit(v4(n), "fresh").1,
                Some(("attack", Eviction::Total))
            );
        }
        // Now every source holds one place: the oldest of all goes, which is the honest one.
        assert_eq!(
            room.admit(v4(5), "fresh").1,
            Some(("honest", Eviction::Total))
        );
        assert_eq!(room.remove(honest), None);
        assert_eq!(room.len(), 4);
    }

    #[test]
    fn the_room_never_holds_more_than_its_caps() {
        let mut room = WaitingRoom::new(3, 10);
        for n in 0..10_000u32 {
            room.admit(v4(n % 7), n);
            assert!(room.len() <= 10);
            assert!(room.by_source.values().all(|held| *held <= 3));
        }
        assert_eq!(room.len(), 10);
        let ids: Vec<u64> = room.waiting.keys().copied().collect();
        for id in ids {
            room.remove(id);
        }
        assert!(room.is_empty() && room.by_source.is_empty());
    }

    #[tokio::test]
    async fn a_ticket_is_told_when_a_newer_connection_takes_its_place() {
        let lobby = Lobby::new(1, 8);
        let (mut old, why) = lobby.enter(v4(1));
        assert_eq!(why, None);
        let (mut new, why) = lobby.enter(v4(1));
        assert_eq!(why, Some(Eviction::PerSource));
        assert_eq!(old.unless_evicted(std::future::pending::<()>()).await, None);
        assert_eq!(new.unless_evicted(async { 7 }).await, Some(7));
        assert_eq!(lobby.waiting(), 1);
        drop(new);
        drop(old);
        assert_eq!(lobby.waiting(), 0);
    }
}
