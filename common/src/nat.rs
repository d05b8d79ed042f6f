//! NAT behaviour in RFC 4787 terms, and what two behaviours mean for a direct path.
//!
//! Each peer measures its own NAT (`peer netcheck` does the same tests on demand) and tells the
//! other side in its `pong`s; [`forecast`] turns the two profiles into a verdict and, when no
//! direct path can exist, the reason in plain words. It is pure, so every pair of NAT kinds is
//! tested without a network.

use serde::{Deserialize, Serialize};

/// NAT behaviour for mapping or filtering (RFC 4787).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// The same for every destination (or anyone may send in).
    EndpointIndependent,
    /// Depends on the destination's IP.
    AddressDependent,
    /// Depends on the destination's IP and port.
    AddressAndPortDependent,
    /// Not measured: the STUN server offers no alternate address, UDP is blocked, or the tests
    /// got no answer (which says nothing about the server).
    Unknown,
}

impl Behaviour {
    /// The RFC 4787 term.
    pub fn words(&self) -> &'static str {
        match self {
            Behaviour::EndpointIndependent => "endpoint-independent",
            Behaviour::AddressDependent => "address-dependent",
            Behaviour::AddressAndPortDependent => "address-and-port-dependent",
            Behaviour::Unknown => "unknown",
        }
    }
}

/// What a peer knows about its own network, as measured against the rendezvous's STUN service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatProfile {
    /// UDP reaches the rendezvous (false: the peer uses the TCP 443 tunnel).
    pub udp: bool,
    /// No NAT: the public address is the local one.
    pub no_nat: bool,
    /// Mapping behaviour.
    pub mapping: Behaviour,
    /// Filtering behaviour.
    pub filtering: Behaviour,
    /// A packet from outside that the NAT did not let in still took its public port for the
    /// sender: our next packets to that sender leave from another port, as behind a symmetric
    /// NAT (a Linux router whose WAN input accepts unsolicited packets; `early` in the lab).
    /// A peer behind a NAT that filters by port must then not let its probes reach ours before
    /// we have sent to it (see `peer::punching::config_for`). Absent (older peers): false.
    #[serde(default)]
    pub inbound_takes_port: bool,
}

impl NatProfile {
    /// A short name: "no NAT", "full cone", "port-restricted cone", "symmetric", ...
    pub fn kind(&self) -> &'static str {
        use Behaviour::*;
        if !self.udp {
            return "UDP blocked";
        }
        match (self.no_nat, self.mapping, self.filtering) {
            (true, _, EndpointIndependent) => "no NAT",
            (true, _, Unknown) => "no NAT",
            (true, _, _) => "no NAT, stateful firewall",
            (_, EndpointIndependent, EndpointIndependent) => "full cone",
            (_, EndpointIndependent, AddressDependent) => "address-restricted cone",
            (_, EndpointIndependent, AddressAndPortDependent) => "port-restricted cone",
            (_, AddressDependent | AddressAndPortDependent, _) => "symmetric",
            _ => "unknown",
        }
    }

    /// Mapping that keeps one public port per socket (or no NAT).
    fn maps_independently(&self) -> bool {
        self.no_nat || self.mapping == Behaviour::EndpointIndependent
    }

    /// Lets packets in from a new port of an address it has sent to.
    fn admits_new_ports(&self) -> bool {
        matches!(
            self.filtering,
            Behaviour::EndpointIndependent | Behaviour::AddressDependent
        )
    }

    /// The hard side of a birthday punch: behind a NAT that gives a new public port for every
    /// destination (symmetric), so the other side cannot know which port to answer.
    pub fn is_birthday_hard(&self) -> bool {
        self.udp
            && !self.no_nat
            && matches!(
                self.mapping,
                Behaviour::AddressDependent | Behaviour::AddressAndPortDependent
            )
    }

    /// The easy side of a birthday punch: one public port per socket (or no NAT), but only
    /// packets from the exact address and port it sent to get in, so it must guess the hard
    /// side's port.
    pub fn is_birthday_easy(&self) -> bool {
        self.udp
            && self.maps_independently()
            && self.filtering == Behaviour::AddressAndPortDependent
    }
}

/// Whether a direct path can exist between two peers, from their NAT profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forecast {
    /// Hole punching works for this pair.
    Direct,
    /// Plain hole punching cannot work (the reason, from our side's point of view), but birthday
    /// punching can: one side is symmetric, the other keeps its port but filters by address and
    /// port. It finds a direct path with high probability, not certainty.
    Birthday(String),
    /// No direct path can exist; the reason, from our side's point of view.
    Relayed(String),
    /// One side's behaviour is not known; what is missing.
    Unknown(String),
}

/// What we can say about a direct path between us (`ours`) and a peer (`theirs`); `None` is a
/// profile not measured (yet).
pub fn forecast(ours: Option<&NatProfile>, theirs: Option<&NatProfile>) -> Forecast {
    match (ours.map(|p| p.udp), theirs.map(|p| p.udp)) {
        (Some(false), Some(false)) => {
            return Forecast::Relayed(
                "UDP is blocked on both sides (both reach the rendezvous over TCP 443): no direct \
                 UDP path can exist"
                    .into(),
            )
        }
        (Some(false), _) => {
            return Forecast::Relayed(
                "your network blocks UDP (this peer reaches the rendezvous over TCP 443): no \
                 direct UDP path can exist"
                    .into(),
            )
        }
        (_, Some(false)) => {
            return Forecast::Relayed(
                "the peer's network blocks UDP (it reaches the rendezvous over TCP 443): no \
                 direct UDP path can exist"
                    .into(),
            )
        }
        _ => {}
    }
    let (ours, theirs) = match (ours, theirs) {
        (Some(o), Some(t)) => (o, t),
        (None, None) => {
            return Forecast::Unknown("neither side's NAT behaviour has been measured".into())
        }
        (None, Some(_)) => {
            return Forecast::Unknown("your NAT's behaviour has not been measured (yet)".into())
        }
        (Some(_), None) => {
            return Forecast::Unknown(
                "the peer did not report its NAT's behaviour (not measured yet)".into(),
            )
        }
    };
    let open =
        |p: &NatProfile| p.maps_independently() && p.filtering == Behaviour::EndpointIndependent;
    if open(ours) || open(theirs) {
        // Anyone can send to one of us at the address the rendezvous saw.
        return Forecast::Direct;
    }
    let unknown = |p: &NatProfile| {
        (!p.no_nat && p.mapping == Behaviour::Unknown) || p.filtering == Behaviour::Unknown
    };
    match (unknown(ours), unknown(theirs)) {
        (true, true) => {
            return Forecast::Unknown(
                "neither NAT's behaviour could be measured (the behaviour tests got no answer, \
                 or the rendezvous offers no RFC 5780 behaviour discovery: `peer netcheck` \
                 tells which)"
                    .into(),
            )
        }
        (true, false) => {
            return Forecast::Unknown(
                "your NAT's behaviour could not be measured (the behaviour tests got no answer, \
                 or the rendezvous offers no RFC 5780 behaviour discovery: `peer netcheck` \
                 tells which)"
                    .into(),
            )
        }
        (false, true) => {
            return Forecast::Unknown(
                "the peer's NAT behaviour could not be measured (its behaviour tests got no \
                 answer, or the rendezvous offers no RFC 5780 behaviour discovery)"
                    .into(),
            )
        }
        (false, false) => {}
    }
    match (ours.maps_independently(), theirs.maps_independently()) {
        // Both keep one port per socket: simultaneous probes open both filters.
        (true, true) => Forecast::Direct,
        (false, false) => Forecast::Relayed(
            "both NATs give a new public port for every destination (symmetric): neither side \
             can know the port the other's packets will come from"
                .into(),
        ),
        // The side with the stable port must let in packets from a port it has not sent to.
        (true, false) if ours.admits_new_ports() => Forecast::Direct,
        (false, true) if theirs.admits_new_ports() => Forecast::Direct,
        (true, false) => {
            let reason = format!(
                "the peer's NAT gives a new public port for every destination (symmetric) and \
                 your {} only accepts packets from addresses and ports it has sent to",
                if ours.no_nat { "firewall" } else { "NAT" }
            );
            match ours.is_birthday_easy() && theirs.is_birthday_hard() {
                true => Forecast::Birthday(reason),
                false => Forecast::Relayed(reason),
            }
        }
        (false, true) => {
            let reason = format!(
                "your NAT gives a new public port for every destination (symmetric) and the \
                 peer's {} only accepts packets from addresses and ports it has sent to",
                if theirs.no_nat { "firewall" } else { "NAT" }
            );
            match ours.is_birthday_hard() && theirs.is_birthday_easy() {
                true => Forecast::Birthday(reason),
                false => Forecast::Relayed(reason),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Behaviour::*;

    fn profile(kind: &str) -> NatProfile {
        let (udp, no_nat, mapping, filtering) = match kind {
            "open" => (true, true, EndpointIndependent, EndpointIndependent),
            "firewall" => (true, true, EndpointIndependent, AddressAndPortDependent),
            "full" => (true, false, EndpointIndependent, EndpointIndependent),
            "addr" => (true, false, EndpointIndependent, AddressDependent),
            "port" | "cgnat" => (true, false, EndpointIndependent, AddressAndPortDependent),
            "sym" => (
                true,
                false,
                AddressAndPortDependent,
                AddressAndPortDependent,
            ),
            "addrmap" => (true, false, AddressDependent, AddressDependent),
            "udpblock" => (false, false, Unknown, Unknown),
            "plain" => (true, false, Unknown, Unknown),
            _ => panic!("{kind}"),
        };
        NatProfile {
            udp,
            no_nat,
            mapping,
            filtering,
            inbound_takes_port: false,
        }
    }

    fn cast(a: &str, b: &str) -> Forecast {
        forecast(Some(&profile(a)), Some(&profile(b)))
    }

    #[test]
    fn every_pair_of_lab_kinds() {
        let kinds = ["open", "full", "addr", "port", "cgnat", "sym", "udpblock"];
        for a in kinds {
            for b in kinds {
                let f = cast(a, b);
                let relayed = a == "udpblock" || b == "udpblock" || (a == "sym" && b == "sym");
                let birthday = (a == "sym" && matches!(b, "port" | "cgnat"))
                    || (b == "sym" && matches!(a, "port" | "cgnat"));
                assert_eq!(
                    matches!(f, Forecast::Relayed(_)),
                    relayed,
                    "{a} x {b}: {f:?}"
                );
                assert_eq!(
                    matches!(f, Forecast::Birthday(_)),
                    birthday,
                    "{a} x {b}: {f:?}"
                );
                assert!(!matches!(f, Forecast::Unknown(_)), "{a} x {b}: {f:?}");
                // The forecast does not depend on who asks, only the wording does.
                assert_eq!(
                    matches!(cast(b, a), Forecast::Relayed(_)),
                    relayed,
                    "{b} x {a}"
                );
                assert_eq!(
                    matches!(cast(b, a), Forecast::Birthday(_)),
                    birthday,
                    "{b} x {a}"
                );
            }
        }
    }

    #[test]
    fn reasons_name_the_right_side() {
        let Forecast::Birthday(r) = cast("sym", "port") else {
            panic!()
        };
        assert!(
            r.starts_with("your NAT gives a new public port for every destination (symmetric)")
                && r.contains("the peer's NAT only accepts packets from addresses and ports"),
            "{r}"
        );
        let Forecast::Birthday(r) = cast("port", "sym") else {
            panic!()
        };
        assert!(
            r.starts_with("the peer's NAT gives a new public port")
                && r.contains("your NAT only accepts"),
            "{r}"
        );
        let Forecast::Relayed(r) = cast("sym", "sym") else {
            panic!()
        };
        assert!(r.starts_with("both NATs"), "{r}");
        let Forecast::Relayed(r) = cast("udpblock", "port") else {
            panic!()
        };
        assert!(r.starts_with("your network blocks UDP"), "{r}");
        let Forecast::Relayed(r) = cast("port", "udpblock") else {
            panic!()
        };
        assert!(r.starts_with("the peer's network blocks UDP"), "{r}");
        let Forecast::Birthday(r) = cast("sym", "firewall") else {
            panic!()
        };
        assert!(r.contains("the peer's firewall only accepts"), "{r}");
        assert_eq!(cast("addrmap", "addr"), Forecast::Direct);
        assert!(matches!(cast("addrmap", "port"), Forecast::Birthday(_)));
    }

    #[test]
    fn unknown_behaviour_is_said_not_guessed() {
        assert!(matches!(cast("plain", "port"), Forecast::Unknown(r) if r.starts_with("your NAT")));
        assert!(
            matches!(cast("port", "plain"), Forecast::Unknown(r) if r.starts_with("the peer's"))
        );
        // An open side decides alone.
        assert_eq!(cast("plain", "open"), Forecast::Direct);
        assert!(matches!(
            forecast(Some(&profile("port")), None),
            Forecast::Unknown(r) if r.contains("did not report")
        ));
        assert!(matches!(forecast(None, None), Forecast::Unknown(_)));
        // A blocked side decides alone too.
        assert!(matches!(
            forecast(None, Some(&profile("udpblock"))),
            Forecast::Relayed(_)
        ));
    }

    #[test]
    fn kinds_have_names() {
        assert_eq!(profile("port").kind(), "port-restricted cone");
        assert_eq!(profile("sym").kind(), "symmetric");
        assert_eq!(profile("open").kind(), "no NAT");
        assert_eq!(profile("udpblock").kind(), "UDP blocked");
        let json = serde_json::to_string(&profile("addr")).unwrap();
        assert_eq!(
            json,
            r#"{"udp":true,"no_nat":false,"mapping":"endpoint_independent","filtering":"address_dependent","inbound_takes_port":false}"#
        );
        assert_eq!(
            serde_json::from_str::<NatProfile>(&json).unwrap(),
            profile("addr")
        );
        // Without the field (as a version-5 peer wrote it): false.
        let old = r#"{"udp":true,"no_nat":false,"mapping":"endpoint_independent","filtering":"address_dependent"}"#;
        assert_eq!(
            serde_json::from_str::<NatProfile>(old).unwrap(),
            profile("addr")
        );
    }
}
