//! The port-mapping state machine: asks the default gateway to map the peer's one UDP port, in
//! the order PCP (RFC 6887), NAT-PMP (RFC 6886), UPnP IGD `AddPortMapping`; keeps the mapping
//! alive by renewing it at half its lifetime; notices a router restart through the PCP/NAT-PMP
//! epoch; deletes the mapping on [`Mapper::close`].
//!
//! Sans-IO: no sockets and no clock. The driver ([`super::driver`]) feeds datagrams from the
//! gateway ([`Mapper::handle_udp`]), the outcome of the UPnP exchange it ran
//! ([`Mapper::handle_upnp`]) and the time ([`Mapper::handle_timeout`]); it sends what
//! [`Mapper::poll_transmit`] returns and reports [`Mapper::poll_event`].
//!
//! Bounds: PCP and NAT-PMP get [`MapperConfig::tries`] sends each (250 ms doubling), UPnP
//! [`MapperConfig::upnp_timeout`]; when nothing works the machine waits
//! [`MapperConfig::retry_after_failure`] before the next round; renewals are at least
//! [`MapperConfig::min_renew_interval`] apart whatever lifetime a gateway grants, and at most
//! [`MapperConfig::max_renew_interval`] apart so that a router restart is noticed within it.
//! Only datagrams from the gateway's port 5351 are looked at.

use std::collections::VecDeque;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::wire;
use super::NAT_PMP_PORT;

/// Timing and limits of a [`Mapper`].
#[derive(Debug, Clone)]
pub struct MapperConfig {
    /// Lifetime asked for, seconds. Default 7200 (RFC 6886's recommendation).
    pub lifetime: u32,
    /// Sends of one PCP or NAT-PMP request before that protocol is given up. Default 3.
    pub tries: u32,
    /// Wait after the first send; doubles after each. Default 250 ms (RFC 6886).
    pub initial_rto: Duration,
    /// Longest wait for the UPnP exchange the driver runs. Default 6 s.
    pub upnp_timeout: Duration,
    /// Whether UPnP IGD is tried at all. Default on.
    pub upnp: bool,
    /// Renewals are never closer than this, whatever the granted lifetime. Default 2 s.
    pub min_renew_interval: Duration,
    /// Renewals are never further apart than this (a router restart is noticed within it).
    /// Default 120 s.
    pub max_renew_interval: Duration,
    /// After every protocol failed, wait this long before trying again. Default 5 min.
    pub retry_after_failure: Duration,
    /// After a mapping was lost (the gateway stopped answering: a router rebooting), the
    /// first wait before trying again; it doubles with each round that fails, up to
    /// `retry_after_failure`. Default 10 s.
    pub retry_after_loss: Duration,
}

impl Default for MapperConfig {
    fn default() -> Self {
        MapperConfig {
            lifetime: 7200,
            tries: 3,
            initial_rto: Duration::from_millis(250),
            upnp_timeout: Duration::from_secs(6),
            upnp: true,
            min_renew_interval: Duration::from_secs(2),
            max_renew_interval: Duration::from_secs(120),
            retry_after_failure: Duration::from_secs(300),
            retry_after_loss: Duration::from_secs(10),
        }
    }
}

/// The protocol a mapping was made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Port Control Protocol.
    Pcp,
    /// NAT Port Mapping Protocol.
    NatPmp,
    /// UPnP Internet Gateway Device.
    Upnp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP IGD",
        })
    }
}

/// A mapping the gateway granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// How it was made.
    pub protocol: Protocol,
    /// The gateway's external address, when it said.
    pub external_ip: Option<Ipv4Addr>,
    /// The external port that leads to our UDP port.
    pub external_port: u16,
    /// Granted lifetime (`None`: a permanent UPnP lease, deleted on exit).
    pub lifetime: Option<Duration>,
    /// When it was granted or last renewed.
    pub renewed: Instant,
}

impl Mapping {
    /// Whether a peer outside can use it: the gateway's external address is not private or
    /// shared (RFC 1918, RFC 6598, loopback, link-local, unspecified). A gateway behind a second
    /// NAT reports such an address, and its mapping then leads nowhere reachable from outside.
    pub fn usable_from_outside(&self) -> bool {
        match self.external_ip {
            None => true,
            Some(ip) => {
                let [a, b, ..] = ip.octets();
                let shared = a == 100 && (64..128).contains(&b);
                !(ip.is_private()
                    || shared
                    || ip.is_loopback()
                    || ip.is_link_local()
                    || ip.is_unspecified())
            }
        }
    }

    /// `203.0.113.21:41000 by PCP`.
    pub fn describe(&self) -> String {
        match self.external_ip {
            Some(ip) => format!("{}:{} by {}", ip, self.external_port, self.protocol),
            None => format!("external port {} by {}", self.external_port, self.protocol),
        }
    }
}

/// What the driver must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// One datagram to the gateway's port 5351 (PCP or NAT-PMP).
    Udp {
        /// The gateway's PCP / NAT-PMP port.
        to: SocketAddr,
        /// The request.
        data: Vec<u8>,
    },
    /// Run the UPnP IGD exchange (discovery, description, `AddPortMapping`) and report it with
    /// [`Mapper::handle_upnp`].
    UpnpMap {
        /// External port asked for.
        external_port: u16,
        /// Our UDP port.
        internal_port: u16,
        /// Our LAN address.
        client: Ipv4Addr,
        /// Lease, seconds.
        lifetime: u32,
    },
    /// `DeletePortMapping` of our UPnP mapping (best effort; nothing to report).
    UpnpDelete {
        /// The mapping's external port.
        external_port: u16,
    },
}

/// What the gateway granted over UPnP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpnpGrant {
    /// `GetExternalIPAddress`, when it answered.
    pub external_ip: Option<Ipv4Addr>,
    /// The external port mapped.
    pub external_port: u16,
    /// Lease granted, seconds (0: permanent).
    pub lifetime: u32,
}

/// What happened, for the driver to report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A mapping was granted, or its external address changed.
    Mapped(Mapping),
    /// The mapping is gone (expired without renewal, or refused on renewal).
    Lost(String),
    /// The gateway's epoch went back: it restarted and forgot its mappings.
    RouterRestarted {
        /// The epoch it should have reached, about.
        expected: u32,
        /// The epoch it reported.
        reported: u32,
    },
    /// No protocol gave a mapping this round; the next round is after
    /// [`MapperConfig::retry_after_failure`].
    Unavailable(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Sending a PCP or NAT-PMP request: `sent` sends so far, the next (or giving up) at `next`.
    Requesting {
        protocol: Protocol,
        sent: u32,
        next: Instant,
    },
    /// The driver runs the UPnP exchange; given up at `deadline`.
    UpnpWaiting { deadline: Instant },
    /// Mapped; renew at `renew_at`.
    Mapped { renew_at: Instant },
    /// Nothing worked; start again at `retry_at`.
    Idle { retry_at: Instant },
    /// Deleting the mapping; `sent` sends so far, the next (or giving up) at `next`.
    Closing { sent: u32, next: Instant },
    /// Done.
    Closed,
}

/// Maps one UDP port on the default gateway. See the module documentation.
#[derive(Debug)]
pub struct Mapper {
    config: MapperConfig,
    gateway: SocketAddr,
    client: Ipv4Addr,
    internal_port: u16,
    nonce: [u8; 12],
    state: State,
    mapping: Option<Mapping>,
    /// The external port to suggest (the last one granted, else the internal port).
    suggested_port: u16,
    /// Last (epoch, when) the gateway reported, for restart detection.
    epoch: Option<(u32, Instant)>,
    /// The NAT-PMP external address, when it answered.
    pmp_external_ip: Option<Ipv4Addr>,
    /// Why each protocol failed this round, for [`Event::Unavailable`].
    failures: Vec<String>,
    /// The first round (PCP, NAT-PMP, UPnP) has not ended yet.
    first_round: bool,
    /// The gateway answered something this round (so a mapping may well be coming).
    gateway_answered: bool,
    /// The wait before the next round after this one fails, when a mapping was held before
    /// (`None`: never mapped, wait `retry_after_failure`).
    loss_backoff: Option<Duration>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
}

impl Mapper {
    /// A mapper for UDP port `internal_port` of `client` (our address on the gateway's LAN),
    /// asking `gateway`; `nonce` is random (PCP ties renewals and the deletion to it). The first
    /// request goes out at `now`.
    pub fn new(
        config: MapperConfig,
        gateway: Ipv4Addr,
        client: Ipv4Addr,
        internal_port: u16,
        nonce: [u8; 12],
        now: Instant,
    ) -> Mapper {
        Mapper {
            config,
            gateway: SocketAddr::V4(SocketAddrV4::new(gateway, NAT_PMP_PORT)),
            client,
            internal_port,
            nonce,
            state: State::Requesting {
                protocol: Protocol::Pcp,
                sent: 0,
                next: now,
            },
            mapping: None,
            suggested_port: internal_port,
            epoch: None,
            pmp_external_ip: None,
            failures: Vec::new(),
            first_round: true,
            gateway_answered: false,
            loss_backoff: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The current mapping.
    pub fn mapping(&self) -> Option<Mapping> {
        self.mapping
    }

    /// Whether a mapping is probably on its way: the first round has not ended and the gateway
    /// answered something (a PCP or NAT-PMP datagram, or UPnP discovery, see
    /// [`Mapper::gateway_answered`]). A dial right after start waits for it, briefly, so that
    /// the mapping is a candidate of its first introduction; a gateway that answers nothing
    /// delays nobody.
    pub fn settling(&self) -> bool {
        self.first_round && self.gateway_answered && self.state != State::Closed
    }

    /// Whether the first round (PCP, NAT-PMP, UPnP) is still on.
    pub fn first_round(&self) -> bool {
        self.first_round
    }

    /// The driver's UPnP discovery found the gateway's service.
    pub fn gateway_answered(&mut self) {
        self.gateway_answered = true;
    }

    /// Whether the machine has nothing more to do (after [`Mapper::close`]).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// When [`Mapper::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Requesting { next, .. } | State::Closing { next, .. } => Some(next),
            State::UpnpWaiting { deadline } => Some(deadline),
            State::Mapped { renew_at } => Some(renew_at),
            State::Idle { retry_at } => Some(retry_at),
            State::Closed => None,
        }
    }

    /// The next thing to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Time passed: send, resend, give up on a protocol, renew, expire.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire(now);
        match self.state {
            State::Requesting {
                protocol,
                sent,
                next,
            } if now >= next => {
                if sent >= self.config.tries {
                    self.failures.push(format!("{protocol}: no answer"));
                    self.next_protocol(protocol, now);
                } else {
                    self.send_request(protocol, self.config.lifetime);
                    self.state = State::Requesting {
                        protocol,
                        sent: sent + 1,
                        next: now + self.config.initial_rto * 2u32.saturating_pow(sent),
                    };
                }
            }
            State::UpnpWaiting { deadline } if now >= deadline => {
                self.failures.push("UPnP IGD: no answer in time".to_owned());
                self.next_protocol(Protocol::Upnp, now);
            }
            State::Mapped { renew_at } if now >= renew_at => {
                let protocol = self.mapping.map_or(Protocol::Pcp, |m| m.protocol);
                self.start(protocol, now);
            }
            State::Idle { retry_at } if now >= retry_at => self.start(Protocol::Pcp, now),
            State::Closing { sent, next } if now >= next => {
                if sent >= 2 {
                    self.state = State::Closed;
                } else {
                    self.send_delete();
                    self.state = State::Closing {
                        sent: sent + 1,
                        next: now + self.config.initial_rto * 2,
                    };
                }
            }
            _ => {}
        }
    }

    /// A datagram arrived from `from` on the mapping socket.
    pub fn handle_udp(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if from != self.gateway || data.len() > wire::PCP_MAX_LEN {
            return;
        }
        match self.state {
            State::Requesting {
                protocol: Protocol::Pcp,
                ..
            } => self.handle_pcp(now, data),
            State::Requesting {
                protocol: Protocol::NatPmp,
                ..
            } => self.handle_pmp(now, data),
            State::Closing { .. } => {
                // Any answer to the deletion (or a late one) ends it: the gateway heard us.
                let answered = wire::parse_pcp_map_response(data).is_some()
                    || wire::parse_pmp_map_response(data).is_some();
                if answered {
                    self.state = State::Closed;
                }
            }
            _ => {}
        }
    }

    /// The gateway said its port 5351 is closed (ICMP port unreachable): neither PCP nor
    /// NAT-PMP is served, so the machine moves on without waiting out the retransmissions.
    pub fn handle_unreachable(&mut self, now: Instant) {
        match self.state {
            State::Requesting {
                protocol: Protocol::Pcp,
                ..
            } => {
                self.failures.push("PCP: port 5351 closed".to_owned());
                self.failures.push("NAT-PMP: port 5351 closed".to_owned());
                self.next_protocol(Protocol::NatPmp, now);
            }
            State::Requesting {
                protocol: Protocol::NatPmp,
                ..
            } => {
                self.failures.push("NAT-PMP: port 5351 closed".to_owned());
                self.next_protocol(Protocol::NatPmp, now);
            }
            State::Closing { .. } => self.state = State::Closed,
            _ => {}
        }
    }

    /// The driver's UPnP exchange ended.
    pub fn handle_upnp(&mut self, now: Instant, result: Result<UpnpGrant, String>) {
        if !matches!(self.state, State::UpnpWaiting { .. }) {
            return;
        }
        match result {
            Ok(grant) if grant.external_port != 0 => {
                let lifetime = (grant.lifetime != 0).then_some(grant.lifetime);
                self.granted(
                    Protocol::Upnp,
                    grant.external_ip,
                    grant.external_port,
                    lifetime,
                    now,
                );
            }
            Ok(_) => {
                self.failures
                    .push("UPnP IGD: mapped external port 0".to_owned());
                self.next_protocol(Protocol::Upnp, now);
            }
            Err(e) => {
                self.failures.push(format!("UPnP IGD: {e}"));
                self.next_protocol(Protocol::Upnp, now);
            }
        }
    }

    /// Deletes the mapping (if any) and stops: the driver sends what follows and waits until
    /// [`Mapper::is_closed`] (bounded: two sends, 500 ms apart).
    pub fn close(&mut self, now: Instant) {
        match self.mapping.take() {
            Some(mapping) => {
                self.mapping = Some(mapping);
                if mapping.protocol == Protocol::Upnp {
                    self.transmits.push_back(Transmit::UpnpDelete {
                        external_port: mapping.external_port,
                    });
                    self.mapping = None;
                    self.state = State::Closed;
                } else {
                    self.send_delete();
                    self.state = State::Closing {
                        sent: 1,
                        next: now + self.config.initial_rto * 2,
                    };
                }
            }
            None => self.state = State::Closed,
        }
    }

    fn start(&mut self, protocol: Protocol, now: Instant) {
        if protocol == Protocol::Pcp {
            self.failures.clear();
        }
        if protocol == Protocol::Upnp {
            self.transmits.push_back(Transmit::UpnpMap {
                external_port: self.suggested_port,
                internal_port: self.internal_port,
                client: self.client,
                lifetime: self.config.lifetime,
            });
            self.state = State::UpnpWaiting {
                deadline: now + self.config.upnp_timeout,
            };
            return;
        }
        self.state = State::Requesting {
            protocol,
            sent: 0,
            next: now,
        };
        self.handle_timeout(now);
    }

    /// `protocol` failed: the next in order, or (after UPnP) idle until the next round. A
    /// mapping that was being renewed is kept until it expires.
    fn next_protocol(&mut self, protocol: Protocol, now: Instant) {
        if let Some(mapping) = self.mapping {
            if let Some(expires) = mapping.lifetime.map(|l| mapping.renewed + l) {
                if now < expires {
                    // A renewal went unanswered: try again halfway to the expiry.
                    let wait = ((expires - now) / 2).max(self.config.min_renew_interval);
                    self.state = State::Mapped {
                        renew_at: now + wait,
                    };
                    return;
                }
            } else if mapping.protocol == protocol {
                // A permanent UPnP lease whose renewal failed: keep it, try again later.
                self.state = State::Mapped {
                    renew_at: now + self.config.max_renew_interval,
                };
                return;
            }
        }
        let next = match protocol {
            Protocol::Pcp => Some(Protocol::NatPmp),
            Protocol::NatPmp if self.config.upnp => Some(Protocol::Upnp),
            Protocol::NatPmp | Protocol::Upnp => None,
        };
        match next {
            Some(next) => self.start(next, now),
            None => {
                self.lose("no protocol renewed it", now);
                let reason = if self.failures.is_empty() {
                    "no answer".to_owned()
                } else {
                    self.failures.join("; ")
                };
                self.events.push_back(Event::Unavailable(reason));
                self.first_round = false;
                let wait = match self.loss_backoff {
                    Some(wait) => {
                        self.loss_backoff = Some((wait * 2).min(self.config.retry_after_failure));
                        wait
                    }
                    None => self.config.retry_after_failure,
                };
                self.state = State::Idle {
                    retry_at: now + wait,
                };
            }
        }
    }

    fn send_request(&mut self, protocol: Protocol, lifetime: u32) {
        let data = match protocol {
            Protocol::Pcp => wire::pcp_map_request(
                self.client,
                self.nonce,
                self.internal_port,
                self.suggested_port,
                lifetime,
            )
            .to_vec(),
            Protocol::NatPmp => {
                // The external address first, so that it is known when the mapping is.
                self.transmits.push_back(Transmit::Udp {
                    to: self.gateway,
                    data: super::nat_pmp_request().to_vec(),
                });
                wire::pmp_map_request(self.internal_port, self.suggested_port, lifetime).to_vec()
            }
            Protocol::Upnp => return,
        };
        self.transmits.push_back(Transmit::Udp {
            to: self.gateway,
            data,
        });
    }

    fn send_delete(&mut self) {
        let Some(mapping) = self.mapping else {
            return;
        };
        let data = match mapping.protocol {
            Protocol::Pcp => wire::pcp_map_request(
                self.client,
                self.nonce,
                self.internal_port,
                mapping.external_port,
                0,
            )
            .to_vec(),
            Protocol::NatPmp => wire::pmp_map_request(self.internal_port, 0, 0).to_vec(),
            Protocol::Upnp => return,
        };
        self.transmits.push_back(Transmit::Udp {
            to: self.gateway,
            data,
        });
    }

    fn handle_pcp(&mut self, now: Instant, data: &[u8]) {
        if wire::pcp_unsupported_version(data) {
            self.gateway_answered = true;
            self.failures
                .push("PCP: the gateway speaks only NAT-PMP".to_owned());
            self.next_protocol(Protocol::Pcp, now);
            return;
        }
        let Some(response) = wire::parse_pcp_map_response(data) else {
            return;
        };
        if response.nonce != self.nonce || response.internal_port != self.internal_port {
            return; // not ours (or stale)
        }
        self.gateway_answered = true;
        self.check_epoch(response.epoch, now);
        if response.result != 0 {
            self.failures
                .push(format!("PCP: refused (result {})", response.result));
            self.lose(&format!("PCP refused it (result {})", response.result), now);
            self.next_protocol(Protocol::Pcp, now);
            return;
        }
        if response.lifetime == 0 || response.external_port == 0 {
            self.failures
                .push("PCP: granted no lifetime or port".to_owned());
            self.next_protocol(Protocol::Pcp, now);
            return;
        }
        self.granted(
            Protocol::Pcp,
            response.external_ip,
            response.external_port,
            Some(response.lifetime),
            now,
        );
    }

    fn handle_pmp(&mut self, now: Instant, data: &[u8]) {
        if let Some((result, epoch, ip)) = wire::parse_pmp_address_response(data) {
            self.gateway_answered = true;
            self.check_epoch(epoch, now);
            if result == 0 {
                self.pmp_external_ip = Some(ip);
            }
            return;
        }
        let Some(response) = wire::parse_pmp_map_response(data) else {
            return;
        };
        if response.internal_port != self.internal_port {
            return; // not ours: its refusal must not cost us our mapping
        }
        self.gateway_answered = true;
        self.check_epoch(response.epoch, now);
        if response.result != 0 {
            self.failures
                .push(format!("NAT-PMP: refused (result {})", response.result));
            self.lose(
                &format!("NAT-PMP refused it (result {})", response.result),
                now,
            );
            self.next_protocol(Protocol::NatPmp, now);
            return;
        }
        if response.lifetime == 0 || response.external_port == 0 {
            self.failures
                .push("NAT-PMP: granted no lifetime or port".to_owned());
            self.next_protocol(Protocol::NatPmp, now);
            return;
        }
        self.granted(
            Protocol::NatPmp,
            self.pmp_external_ip,
            response.external_port,
            Some(response.lifetime),
            now,
        );
    }

    fn granted(
        &mut self,
        protocol: Protocol,
        external_ip: Option<Ipv4Addr>,
        external_port: u16,
        lifetime: Option<u32>,
        now: Instant,
    ) {
        let lifetime = lifetime.map(|s| Duration::from_secs(u64::from(s)));
        let mapping = Mapping {
            protocol,
            external_ip,
            external_port,
            lifetime,
            renewed: now,
        };
        let changed = self.mapping.is_none_or(|old| {
            old.protocol != protocol
                || old.external_port != external_port
                || old.external_ip != external_ip
        });
        self.mapping = Some(mapping);
        self.suggested_port = external_port;
        self.first_round = false;
        self.loss_backoff = Some(self.config.retry_after_loss);
        if changed {
            self.events.push_back(Event::Mapped(mapping));
        }
        let half = lifetime.map_or(self.config.max_renew_interval, |l| l / 2);
        let wait = half.clamp(
            self.config.min_renew_interval,
            self.config
                .max_renew_interval
                .max(self.config.min_renew_interval),
        );
        self.state = State::Mapped {
            renew_at: now + wait,
        };
    }

    /// Drops the mapping once its lifetime is over.
    fn expire(&mut self, now: Instant) {
        if let Some(mapping) = self.mapping {
            if let Some(lifetime) = mapping.lifetime {
                if now >= mapping.renewed + lifetime {
                    self.lose("it expired without renewal", now);
                    if matches!(self.state, State::Mapped { .. }) {
                        self.start(Protocol::Pcp, now);
                    }
                }
            }
        }
    }

    fn lose(&mut self, why: &str, _now: Instant) {
        if self.mapping.take().is_some() {
            self.events.push_back(Event::Lost(why.to_owned()));
        }
    }

    /// RFC 6887 section 8.5 (and RFC 6886 section 3.6): the server's epoch must advance with
    /// our clock, within 1/16 plus 2 s; if it fell behind, the gateway restarted and lost its
    /// mappings. The request that carried it re-creates ours (it is a full MAP request), so
    /// this only reports it; a mapping made through another protocol is re-made at once.
    fn check_epoch(&mut self, reported: u32, now: Instant) {
        if let Some((previous, at)) = self.epoch {
            let client_delta = now.saturating_duration_since(at).as_secs();
            let server_delta = u64::from(reported.wrapping_sub(previous));
            let went_back = reported < previous.saturating_sub(1)
                || client_delta + 2 < server_delta.saturating_sub(server_delta / 16)
                || server_delta + 2 < client_delta.saturating_sub(client_delta / 16);
            if went_back {
                let expected = u64::from(previous).saturating_add(client_delta);
                self.events.push_back(Event::RouterRestarted {
                    expected: u32::try_from(expected).unwrap_or(u32::MAX),
                    reported,
                });
            }
        }
        self.epoch = Some((reported, now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
    const ME: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
    const PORT: u16 = 4000;
    const NONCE: [u8; 12] = [9; 12];

    fn gw() -> SocketAddr {
        SocketAddr::from((GW, NAT_PMP_PORT))
    }

    fn mapper(config: MapperConfig, now: Instant) -> Mapper {
        let mut m = Mapper::new(config, GW, ME, PORT, NONCE, now);
        m.handle_timeout(now);
        m
    }

    fn drain(m: &mut Mapper) -> Vec<Transmit> {
        std::iter::from_fn(|| m.poll_transmit()).collect()
    }

    fn events(m: &mut Mapper) -> Vec<Event> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    fn udp(t: &Transmit) -> &[u8] {
        match t {
            Transmit::Udp { to, data } => {
                assert_eq!(*to, gw(), "only the gateway is asked");
                data
            }
            other => panic!("expected a datagram, got {other:?}"),
        }
    }

    fn pcp_ok(nonce: [u8; 12], port: u16, lifetime: u32, epoch: u32) -> Vec<u8> {
        let mut r = vec![0u8; wire::PCP_MAP_LEN];
        r[0] = 2;
        r[1] = 0x81;
        r[4..8].copy_from_slice(&lifetime.to_be_bytes());
        r[8..12].copy_from_slice(&epoch.to_be_bytes());
        r[24..36].copy_from_slice(&nonce);
        r[36] = 17;
        r[40..42].copy_from_slice(&PORT.to_be_bytes());
        r[42..44].copy_from_slice(&port.to_be_bytes());
        r[44..60].copy_from_slice(&Ipv4Addr::new(203, 0, 113, 21).to_ipv6_mapped().octets());
        r
    }

    fn pmp_ok(port: u16, lifetime: u32, epoch: u32) -> Vec<u8> {
        let mut r = vec![0, 129, 0, 0];
        r.extend_from_slice(&epoch.to_be_bytes());
        r.extend_from_slice(&PORT.to_be_bytes());
        r.extend_from_slice(&port.to_be_bytes());
        r.extend_from_slice(&lifetime.to_be_bytes());
        r
    }

    /// Runs the clock to the machine's next timeout.
    fn advance(m: &mut Mapper) -> Instant {
        let at = m.poll_timeout().expect("a timeout");
        m.handle_timeout(at);
        at
    }

    #[test]
    fn pcp_first_then_renewal_at_half_life() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        let sent = drain(&mut m);
        assert_eq!(sent.len(), 1);
        let request = udp(&sent[0]);
        assert_eq!((request[0], request[1]), (2, 1), "PCP MAP first");
        assert_eq!(&request[4..8], &7200u32.to_be_bytes());
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 600, 1000));
        let mapping = m.mapping().expect("mapped");
        assert_eq!(mapping.protocol, Protocol::Pcp);
        assert_eq!(mapping.external_port, 41000);
        assert_eq!(events(&mut m), vec![Event::Mapped(mapping)]);
        // Renewal at half of the 600 s granted, capped at 120 s.
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(120)));
        let t1 = advance(&mut m);
        let renewal = drain(&mut m);
        assert_eq!(renewal.len(), 1);
        let request = udp(&renewal[0]);
        assert_eq!(&request[24..36], &NONCE, "a renewal keeps the nonce");
        assert_eq!(&request[42..44], &41000u16.to_be_bytes(), "and the port");
        m.handle_udp(t1, gw(), &pcp_ok(NONCE, 41000, 600, 1120));
        assert!(events(&mut m).is_empty(), "an unchanged renewal is no news");
        assert_eq!(m.mapping().map(|m| m.renewed), Some(t1));

        // A short lifetime: renewed at half of it.
        let mut short = mapper(MapperConfig::default(), t0);
        drain(&mut short);
        short.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 30, 5));
        assert_eq!(short.poll_timeout(), Some(t0 + Duration::from_secs(15)));
        // A hostile gateway granting 1 s is not renewed more than every 2 s.
        let mut tiny = mapper(MapperConfig::default(), t0);
        drain(&mut tiny);
        tiny.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 1, 5));
        assert_eq!(tiny.poll_timeout(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn fallback_order_pcp_nat_pmp_upnp_then_idle() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        // PCP: 3 sends at 0, 250, 750 ms, given up at 1750 ms.
        let mut pcp_sends = drain(&mut m).len();
        let mut now = t0;
        while m.mapping().is_none() && pcp_sends < 10 {
            now = advance(&mut m);
            let sent = drain(&mut m);
            if sent.iter().any(|t| udp(t)[0] == 0) {
                // NAT-PMP started: address request then map request.
                assert_eq!(udp(&sent[0]), &[0, 0]);
                assert_eq!(udp(&sent[1])[1], 1);
                break;
            }
            pcp_sends += sent.len();
        }
        assert_eq!(pcp_sends, 3);
        assert_eq!(now - t0, Duration::from_millis(1750));
        // NAT-PMP unanswered as well: UPnP next.
        let upnp = loop {
            advance(&mut m);
            let sent = drain(&mut m);
            if let Some(t) = sent
                .into_iter()
                .find(|t| matches!(t, Transmit::UpnpMap { .. }))
            {
                break t;
            }
        };
        assert_eq!(
            upnp,
            Transmit::UpnpMap {
                external_port: PORT,
                internal_port: PORT,
                client: ME,
                lifetime: 7200
            }
        );
        let now = advance(&mut m);
        let evs = events(&mut m);
        assert!(
            matches!(&evs[..], [Event::Unavailable(why)] if why.contains("PCP: no answer") && why.contains("NAT-PMP: no answer") && why.contains("UPnP")),
            "{evs:?}"
        );
        assert_eq!(m.poll_timeout(), Some(now + Duration::from_secs(300)));
        // The next round starts with PCP again.
        advance(&mut m);
        let sent = drain(&mut m);
        assert_eq!(udp(&sent[0])[0], 2);
    }

    #[test]
    fn only_a_gateway_that_answers_makes_dials_wait() {
        let t0 = Instant::now();
        // Silent gateway: nobody waits, ever.
        let mut m = mapper(MapperConfig::default(), t0);
        while m
            .poll_timeout()
            .is_some_and(|t| t < t0 + Duration::from_secs(60))
        {
            advance(&mut m);
            drain(&mut m);
            assert!(!m.settling());
        }
        // A NAT-PMP gateway: settling from its first answer until the mapping.
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        assert!(!m.settling());
        m.handle_udp(t0, gw(), &[0, 0x81, 0, 1, 0, 0, 0, 50]);
        assert!(m.settling());
        m.handle_udp(t0, gw(), &pmp_ok(42000, 3600, 50));
        assert!(!m.settling());
        // UPnP discovery answered, then every protocol failed: settling ends with the round.
        let config = MapperConfig {
            tries: 1,
            ..MapperConfig::default()
        };
        let mut m = mapper(config, t0);
        let mut now = t0;
        while !drain(&mut m)
            .iter()
            .any(|t| matches!(t, Transmit::UpnpMap { .. }))
        {
            now = advance(&mut m);
        }
        m.gateway_answered();
        assert!(m.settling());
        m.handle_upnp(now, Err("AddPortMapping: UPnP error 606".into()));
        assert!(!m.settling());
    }

    #[test]
    fn nat_pmp_only_gateway_is_used_at_once() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        // A NAT-PMP server answers a PCP request with version 0, UNSUPP_VERSION.
        m.handle_udp(t0, gw(), &[0, 0x81, 0, 1, 0, 0, 0, 50]);
        let sent = drain(&mut m);
        assert_eq!(sent.len(), 2, "NAT-PMP at once, not after the PCP timeouts");
        m.handle_udp(t0, gw(), &[0, 128, 0, 0, 0, 0, 0, 50, 203, 0, 113, 21]);
        m.handle_udp(t0, gw(), &pmp_ok(42000, 3600, 50));
        let mapping = m.mapping().expect("mapped");
        assert_eq!(mapping.protocol, Protocol::NatPmp);
        assert_eq!(mapping.external_ip, Some(Ipv4Addr::new(203, 0, 113, 21)));
        assert_eq!(mapping.describe(), "203.0.113.21:42000 by NAT-PMP");
    }

    #[test]
    fn a_nat_pmp_refusal_for_another_port_is_not_ours() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        m.handle_udp(t0, gw(), &[0, 0x81, 0, 1, 0, 0, 0, 50]);
        drain(&mut m);
        // A refusal (result 3) for another host's internal port: not an answer to us.
        let mut foreign = pmp_ok(42000, 0, 50);
        foreign[3] = 3;
        foreign[8..10].copy_from_slice(&(PORT + 1).to_be_bytes());
        m.handle_udp(t0, gw(), &foreign);
        assert!(
            drain(&mut m).is_empty(),
            "no move to UPnP on another port's refusal"
        );
        m.handle_udp(t0, gw(), &pmp_ok(42000, 3600, 50));
        assert_eq!(m.mapping().expect("mapped").protocol, Protocol::NatPmp);
    }

    #[test]
    fn upnp_grant_and_delete() {
        let t0 = Instant::now();
        let config = MapperConfig {
            tries: 1,
            ..MapperConfig::default()
        };
        let mut m = mapper(config, t0);
        let mut now = t0;
        while !drain(&mut m)
            .iter()
            .any(|t| matches!(t, Transmit::UpnpMap { .. }))
        {
            now = advance(&mut m);
        }
        m.handle_upnp(
            now,
            Ok(UpnpGrant {
                external_ip: Some(Ipv4Addr::new(203, 0, 113, 21)),
                external_port: 43000,
                lifetime: 0,
            }),
        );
        let mapping = m.mapping().expect("mapped");
        assert_eq!(mapping.protocol, Protocol::Upnp);
        assert_eq!(mapping.lifetime, None, "a permanent lease");
        assert_eq!(m.poll_timeout(), Some(now + Duration::from_secs(120)));
        m.close(now);
        assert_eq!(
            drain(&mut m),
            vec![Transmit::UpnpDelete {
                external_port: 43000
            }]
        );
        assert!(m.is_closed());
        // A late result changes nothing.
        m.handle_upnp(now, Err("late".into()));
        assert!(m.mapping().is_none());
    }

    #[test]
    fn delete_on_close_is_bounded() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 600, 10));
        m.close(t0);
        let sent = drain(&mut m);
        let request = udp(&sent[0]);
        assert_eq!(&request[4..8], &[0, 0, 0, 0], "lifetime 0 deletes");
        assert_eq!(&request[24..36], &NONCE);
        assert!(!m.is_closed());
        // Unanswered: one more send, then done.
        advance(&mut m);
        assert_eq!(drain(&mut m).len(), 1);
        advance(&mut m);
        assert!(m.is_closed());
        assert_eq!(m.poll_timeout(), None);

        // Answered: done at once.
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 600, 10));
        m.close(t0);
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 0, 10));
        assert!(m.is_closed());

        // Nothing mapped: nothing to delete.
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        m.close(t0);
        assert!(drain(&mut m).is_empty());
        assert!(m.is_closed());
    }

    #[test]
    fn expiry_without_renewal_loses_the_mapping_and_starts_over() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 20, 10));
        events(&mut m);
        // Renewals at 10 s go unanswered; retried halfway to the expiry until it passes.
        let mut now = t0;
        while m.mapping().is_some() {
            now = advance(&mut m);
            drain(&mut m);
            assert!(now - t0 <= Duration::from_secs(21), "expired by 20 s");
        }
        assert_eq!(
            events(&mut m),
            vec![Event::Lost("it expired without renewal".into())]
        );
        assert!(now - t0 >= Duration::from_secs(20));
        // And a new round from PCP runs.
        let sent = drain(&mut m);
        assert!(sent.is_empty() || udp(&sent[0])[0] == 2);
        assert!(m.poll_timeout().is_some());
    }

    #[test]
    fn router_restart_is_noticed_by_the_epoch_and_remapped() {
        let t0 = Instant::now();
        let config = MapperConfig {
            max_renew_interval: Duration::from_secs(10),
            ..MapperConfig::default()
        };
        let mut m = mapper(config, t0);
        drain(&mut m);
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 7200, 5000));
        events(&mut m);
        let t1 = advance(&mut m);
        assert_eq!(t1 - t0, Duration::from_secs(10));
        drain(&mut m);
        // The router restarted 3 s ago: epoch 3 instead of about 5010, and a new port.
        m.handle_udp(t1, gw(), &pcp_ok(NONCE, 50000, 7200, 3));
        let evs = events(&mut m);
        assert!(
            matches!(evs[0], Event::RouterRestarted { reported: 3, expected } if expected >= 5009),
            "{evs:?}"
        );
        assert!(matches!(
            evs[1],
            Event::Mapped(Mapping {
                external_port: 50000,
                ..
            })
        ));
        assert_eq!(m.mapping().map(|m| m.external_port), Some(50000));
        // A normal advance is not a restart.
        let t2 = advance(&mut m);
        drain(&mut m);
        m.handle_udp(t2, gw(), &pcp_ok(NONCE, 50000, 7200, 13));
        assert!(events(&mut m).is_empty());
    }

    #[test]
    fn malformed_and_foreign_answers_are_ignored() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        let stranger = SocketAddr::from(([10, 0, 1, 66], NAT_PMP_PORT));
        m.handle_udp(t0, stranger, &pcp_ok(NONCE, 41000, 600, 1));
        m.handle_udp(
            t0,
            SocketAddr::from((GW, 5350)),
            &pcp_ok(NONCE, 41000, 600, 1),
        );
        m.handle_udp(t0, gw(), &pcp_ok([0; 12], 41000, 600, 1)); // another nonce
        m.handle_udp(t0, gw(), &[]);
        m.handle_udp(t0, gw(), &[2, 0x81]);
        m.handle_udp(t0, gw(), &vec![0xff; 2000]);
        let mut bad_port = pcp_ok(NONCE, 41000, 600, 1);
        bad_port[40] ^= 1; // another internal port
        m.handle_udp(t0, gw(), &bad_port);
        for n in 0..wire::PCP_MAP_LEN {
            m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 600, 1)[..n]);
        }
        assert!(m.mapping().is_none());
        assert!(events(&mut m).is_empty());
        // Zero lifetime or port counts as a failure of the protocol, not a mapping.
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 0, 600, 1));
        assert!(m.mapping().is_none());
        let sent = drain(&mut m);
        assert_eq!(udp(&sent[0]), &[0, 0], "moved on to NAT-PMP");
    }

    #[test]
    fn a_router_that_goes_silent_is_asked_again_soon_then_less_often() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 20, 10));
        events(&mut m);
        // Silence from now on: the mapping expires, a round fails, the next is 10 s later,
        // then 20, 40, ... up to 5 min.
        let mut idle_waits = Vec::new();
        while idle_waits.len() < 7 {
            let now = advance(&mut m);
            drain(&mut m);
            if let Some(Event::Unavailable(_)) = events(&mut m).last() {
                idle_waits.push((m.poll_timeout().expect("a retry") - now).as_secs());
            }
        }
        assert_eq!(idle_waits, [10, 20, 40, 80, 160, 300, 300]);
        // A router that never mapped is asked every 5 min.
        let mut never = mapper(MapperConfig::default(), t0);
        loop {
            let now = advance(&mut never);
            drain(&mut never);
            if let Some(Event::Unavailable(_)) = events(&mut never).last() {
                assert_eq!(never.poll_timeout(), Some(now + Duration::from_secs(300)));
                break;
            }
        }
    }

    #[test]
    fn a_refused_renewal_loses_the_mapping() {
        let t0 = Instant::now();
        let mut m = mapper(MapperConfig::default(), t0);
        drain(&mut m);
        m.handle_udp(t0, gw(), &pcp_ok(NONCE, 41000, 600, 10));
        events(&mut m);
        let t1 = advance(&mut m);
        drain(&mut m);
        let mut refused = pcp_ok(NONCE, 41000, 0, 130);
        refused[3] = 2; // NOT_AUTHORIZED
        m.handle_udp(t1, gw(), &refused);
        assert!(m.mapping().is_none());
        assert!(matches!(&events(&mut m)[..], [Event::Lost(why)] if why.contains("result 2")));
    }

    #[test]
    fn private_external_address_is_not_usable_from_outside() {
        let mapping = |ip: Option<Ipv4Addr>| Mapping {
            protocol: Protocol::Pcp,
            external_ip: ip,
            external_port: 1,
            lifetime: None,
            renewed: Instant::now(),
        };
        assert!(mapping(Some(Ipv4Addr::new(203, 0, 113, 21))).usable_from_outside());
        assert!(mapping(None).usable_from_outside());
        for ip in [
            [192, 168, 1, 2],
            [100, 64, 1, 2],
            [10, 0, 0, 1],
            [0, 0, 0, 0],
        ] {
            assert!(!mapping(Some(Ipv4Addr::from(ip))).usable_from_outside());
        }
    }
}
