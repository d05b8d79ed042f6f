//! The I/O around [`Mapper`]: one UDP socket connected to the gateway's port 5351 for PCP and
//! NAT-PMP, TCP for the UPnP exchange, the clock, and the announcement of the mapped port to the
//! rendezvous.
//!
//! Why a socket of its own and not the peer's: PCP and NAT-PMP map the *internal port named in
//! the request* for the request's source address, so the peer's one UDP port is mapped without
//! its socket ever sending to the gateway (and without the gateway's answers going through the
//! QUIC demultiplexer). The mapping is for the peer's single UDP port; nothing else is mapped.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

use super::mapper::{Event, Mapper, MapperConfig, Mapping, Transmit, UpnpGrant};
use super::upnp;
use super::NAT_PMP_PORT;
use crate::console::Console;
use crate::session::{Session, SessionState};
use common::ControlMessage;

/// Wait before a `mapped_port` the rendezvous did not acknowledge is sent again.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(5);
/// Longest wait for one TCP exchange with the gateway's UPnP server.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the mapping of UDP port `internal_port` until `shutdown`, then deletes it (bounded:
/// about a second). The current mapping is published on `out`, and on `settling` whether one
/// is probably on its way ([`Mapper::settling`]).
pub async fn run(
    config: MapperConfig,
    internal_port: u16,
    console: Console,
    verbose: bool,
    out: watch::Sender<Option<Mapping>>,
    settling: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let settling = Arc::new(settling);
    let Some(gateway) = super::default_gateway() else {
        tracing::debug!("port mapping: no IPv4 default gateway");
        return;
    };
    let socket = match gateway_socket(gateway).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "port mapping: no socket toward the gateway");
            return;
        }
    };
    let client = match socket.local_addr() {
        Ok(SocketAddr::V4(local)) => *local.ip(),
        _ => return,
    };
    let mut mapper = Mapper::new(
        config,
        gateway,
        client,
        internal_port,
        rand::random(),
        std::time::Instant::now(),
    );
    let mut upnp_service: Option<UpnpService> = None;
    let mut upnp_task: Option<
        std::pin::Pin<Box<dyn std::future::Future<Output = UpnpOutcome> + Send>>,
    > = None;
    let mut closing = false;
    let mut buf = vec![0u8; super::wire::PCP_MAX_LEN + 1];
    loop {
        while let Some(transmit) = mapper.poll_transmit() {
            match transmit {
                Transmit::Udp { data, .. } => {
                    let _ = socket.send(&data).await;
                }
                Transmit::UpnpMap {
                    external_port,
                    internal_port,
                    client,
                    lifetime,
                } => {
                    let service = upnp_service.clone();
                    // Only the first round's discovery makes dials wait for it.
                    let found = mapper.first_round().then(|| settling.clone());
                    upnp_task = Some(Box::pin(upnp_map(
                        gateway,
                        found,
                        service,
                        external_port,
                        internal_port,
                        client,
                        lifetime,
                    )));
                }
                Transmit::UpnpDelete { external_port } => {
                    if let Some(service) = &upnp_service {
                        let _ = tokio::time::timeout(
                            HTTP_TIMEOUT,
                            upnp_delete(gateway, service, external_port),
                        )
                        .await;
                    }
                }
            }
        }
        while let Some(event) = mapper.poll_event() {
            report(&console, verbose, gateway, &event).await;
        }
        out.send_if_modified(|current| {
            let now = mapper.mapping();
            let changed = *current != now;
            *current = now;
            changed
        });
        settling.send_if_modified(|current| {
            let now = mapper.settling();
            let changed = *current != now;
            *current = now;
            changed
        });
        if mapper.is_closed() {
            return;
        }
        let timeout = mapper
            .poll_timeout()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            received = socket.recv(&mut buf) => {
                let now = std::time::Instant::now();
                match received {
                    Ok(n) => mapper.handle_udp(now, SocketAddr::from((gateway, NAT_PMP_PORT)), &buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        mapper.handle_unreachable(now)
                    }
                    Err(_) => {}
                }
            }
            _ = tokio::time::sleep_until(timeout) => mapper.handle_timeout(std::time::Instant::now()),
            outcome = async { upnp_task.as_mut().expect("guarded").await }, if upnp_task.is_some() => {
                upnp_task = None;
                let (service, result) = outcome;
                if service.is_some() {
                    mapper.gateway_answered();
                    upnp_service = service;
                }
                mapper.handle_upnp(std::time::Instant::now(), result);
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                upnp_task = None;
                mapper.close(std::time::Instant::now());
            }
        }
    }
}

/// A UDP socket connected to the gateway's PCP / NAT-PMP port (connected, so that an ICMP port
/// unreachable ends the wait at once and only the gateway's datagrams are received).
async fn gateway_socket(gateway: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket.connect((gateway, NAT_PMP_PORT)).await?;
    Ok(socket)
}

async fn report(console: &Console, verbose: bool, gateway: Ipv4Addr, event: &Event) {
    match event {
        Event::Mapped(mapping) => {
            tracing::info!(mapping = %mapping.describe(), %gateway, "port mapping granted");
            let note = if mapping.usable_from_outside() {
                String::new()
            } else {
                " (a private address: another NAT is in front, so it is not announced)".to_owned()
            };
            console
                .say(format!(
                    "port mapping: {} (router {gateway}){note}",
                    mapping.describe()
                ))
                .await;
        }
        Event::Lost(why) => {
            tracing::info!(%why, "port mapping lost");
            console.say(format!("port mapping lost: {why}")).await;
        }
        Event::RouterRestarted { expected, reported } => {
            tracing::info!(expected, reported, "router restart noticed");
            console
                .say(format!(
                    "port mapping: router {gateway} restarted (epoch {reported}, expected about \
                     {expected}); mapping again"
                ))
                .await;
        }
        Event::Unavailable(why) => {
            tracing::debug!(%why, "no port mapping");
            if verbose {
                console
                    .say(format!("port mapping: none from router {gateway} ({why})"))
                    .await;
            }
        }
    }
}

/// The gateway's WAN connection service, found once and reused for renewals and the deletion.
#[derive(Debug, Clone)]
struct UpnpService {
    service_type: &'static str,
    port: u16,
    control_path: String,
}

type UpnpOutcome = (Option<UpnpService>, Result<UpnpGrant, String>);

/// Discovery (when not cached), `AddPortMapping`, `GetExternalIPAddress`.
async fn upnp_map(
    gateway: Ipv4Addr,
    found: Option<Arc<watch::Sender<bool>>>,
    cached: Option<UpnpService>,
    external_port: u16,
    internal_port: u16,
    client: Ipv4Addr,
    lifetime: u32,
) -> UpnpOutcome {
    let service = match cached {
        Some(s) => s,
        None => match discover(gateway).await {
            Ok(s) => s,
            Err(e) => return (None, Err(e)),
        },
    };
    if let Some(settling) = found {
        // The gateway has a UPnP IGD: a mapping is probably a few round trips away.
        settling.send_replace(true);
    }
    let result = add_mapping(
        gateway,
        &service,
        external_port,
        internal_port,
        client,
        lifetime,
    )
    .await;
    let result = match result {
        Ok((external_port, lifetime)) => {
            let external_ip = soap(gateway, &service, "GetExternalIPAddress", &[])
                .await
                .ok()
                .and_then(|body| upnp::element(&body, "NewExternalIPAddress"))
                .and_then(|ip| ip.parse().ok());
            Ok(UpnpGrant {
                external_ip,
                external_port,
                lifetime,
            })
        }
        Err(e) => Err(e),
    };
    (Some(service), result)
}

/// `AddPortMapping`, retried once with a permanent lease (error 725) and once with another
/// external port (error 718): (external port, lease).
async fn add_mapping(
    gateway: Ipv4Addr,
    service: &UpnpService,
    mut external_port: u16,
    internal_port: u16,
    client: Ipv4Addr,
    mut lease: u32,
) -> Result<(u16, u32), String> {
    let mut retried_lease = false;
    let mut retried_port = false;
    loop {
        let args = upnp::add_port_mapping(external_port, internal_port, client, lease);
        match soap(gateway, service, "AddPortMapping", &args).await {
            Ok(_) => return Ok((external_port, lease)),
            Err(SoapError::Fault(upnp::ONLY_PERMANENT_LEASES)) if !retried_lease => {
                retried_lease = true;
                lease = 0;
            }
            Err(SoapError::Fault(upnp::CONFLICT_IN_MAPPING_ENTRY)) if !retried_port => {
                retried_port = true;
                external_port = rand::random_range(1024..=65535);
            }
            Err(e) => return Err(format!("AddPortMapping: {e}")),
        }
    }
}

async fn upnp_delete(gateway: Ipv4Addr, service: &UpnpService, external_port: u16) {
    let args = upnp::delete_port_mapping(external_port);
    if let Err(e) = soap(gateway, service, "DeletePortMapping", &args).await {
        tracing::debug!(error = %e, "UPnP DeletePortMapping failed");
    }
}

/// SSDP discovery (answers only from the gateway) and its device description.
async fn discover(gateway: Ipv4Addr) -> Result<UpnpService, String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|e| format!("SSDP socket: {e}"))?;
    let search = super::ssdp_search();
    let targets = [
        SocketAddr::from((super::SSDP_GROUP, super::SSDP_PORT)),
        SocketAddr::from((gateway, super::SSDP_PORT)),
    ];
    let mut buf = [0u8; 2048];
    let mut location = None;
    'attempts: for _ in 0..3 {
        for to in targets {
            let _ = socket.send_to(&search, to).await;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            if from.ip() != std::net::IpAddr::V4(gateway) {
                continue;
            }
            if let Some(found) = super::parse_ssdp_response(&buf[..n]) {
                location = Some(found);
                break 'attempts;
            }
        }
    }
    let location = location.ok_or("no SSDP answer from the gateway")?;
    let (port, path) = upnp::http_target(&location, gateway, 80)
        .ok_or_else(|| format!("LOCATION {location:?} is not on the gateway"))?;
    let (status, body) = http(gateway, port, &upnp::http_get(gateway, port, &path)).await?;
    if status != 200 {
        return Err(format!("description: HTTP {status}"));
    }
    let (service_type, control) =
        upnp::parse_description(&body).ok_or("no WAN connection service in the description")?;
    let (port, control_path) = upnp::http_target(&control, gateway, port)
        .ok_or_else(|| format!("control URL {control:?} is not on the gateway"))?;
    Ok(UpnpService {
        service_type,
        port,
        control_path,
    })
}

#[derive(Debug, thiserror::Error)]
enum SoapError {
    #[error("UPnP error {0}")]
    Fault(u32),
    #[error("{0}")]
    Other(String),
}

async fn soap(
    gateway: Ipv4Addr,
    service: &UpnpService,
    action: &str,
    args: &[(&str, String)],
) -> Result<String, SoapError> {
    let request = upnp::soap_request(
        gateway,
        service.port,
        &service.control_path,
        service.service_type,
        action,
        args,
    );
    let (status, body) = http(gateway, service.port, &request)
        .await
        .map_err(SoapError::Other)?;
    if status == 200 {
        return Ok(body);
    }
    match upnp::soap_error(&body) {
        Some(code) => Err(SoapError::Fault(code)),
        None => Err(SoapError::Other(format!("HTTP {status}"))),
    }
}

/// One HTTP exchange with the gateway: at most [`upnp::MAX_HTTP_RESPONSE`] bytes read, within
/// [`HTTP_TIMEOUT`].
async fn http(gateway: Ipv4Addr, port: u16, request: &[u8]) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect((gateway, port))
            .await
            .map_err(|e| format!("connecting to {gateway}:{port}: {e}"))?;
        stream
            .write_all(request)
            .await
            .map_err(|e| format!("sending to {gateway}:{port}: {e}"))?;
        let mut response = Vec::new();
        let mut limited = (&mut stream).take(upnp::MAX_HTTP_RESPONSE as u64 + 1);
        limited
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("reading from {gateway}:{port}: {e}"))?;
        if response.len() > upnp::MAX_HTTP_RESPONSE {
            return Err(format!(
                "the gateway's answer is over {} bytes",
                upnp::MAX_HTTP_RESPONSE
            ));
        }
        upnp::parse_http_response(&response).ok_or_else(|| "not an HTTP answer".to_owned())
    };
    tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {gateway}:{port} within {HTTP_TIMEOUT:?}"))?
}

/// Tells the rendezvous the external port our router maps to us (or that there is none): after
/// each registration and whenever it changes, from a task of its own ([`Announcer::run`]), and
/// from [`crate::Endpoint::connect`] before it asks for an introduction ([`Announcer::sync`]),
/// so that a mapping granted just after registering is already a candidate in the first one.
#[derive(Clone)]
pub struct Announcer {
    session: Session,
    mapping: watch::Receiver<Option<Mapping>>,
    known: Arc<Mutex<Known>>,
}

/// The (registration generation, mapped port) the rendezvous knows, if any.
type Known = Option<(u64, Option<u16>)>;

impl Announcer {
    /// An announcer of `mapping` on `session`.
    pub fn new(session: Session, mapping: watch::Receiver<Option<Mapping>>) -> Announcer {
        Announcer {
            session,
            mapping,
            known: Arc::default(),
        }
    }

    /// Sends `mapped_port` if the current registration does not know the current mapping;
    /// `false` when it could not (not registered, no acknowledgement).
    pub async fn sync(&self) -> bool {
        let wanted = announced_port(*self.mapping.borrow());
        let SessionState::Registered(reg) = self.session.state() else {
            return false;
        };
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if known.is_none_or(|(g, _)| g != reg.generation) {
                *known = Some((reg.generation, reg.mapped_port));
            }
            if *known == Some((reg.generation, wanted)) {
                return true;
            }
        }
        match self
            .session
            .request(&ControlMessage::MappedPort { port: wanted })
            .await
        {
            Ok(ControlMessage::Ack {}) => {
                let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
                if known.is_none_or(|(g, _)| g <= reg.generation) {
                    *known = Some((reg.generation, wanted));
                }
                true
            }
            Ok(other) => {
                tracing::debug!(reply = other.kind(), "mapped_port not acknowledged");
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "mapped_port not sent");
                false
            }
        }
    }

    /// Keeps the rendezvous up to date until `shutdown`: after each registration and each
    /// change of the mapping; a request that failed is sent again after [`ANNOUNCE_RETRY`].
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut mapping = self.mapping.clone();
        let mut state = self.session.watch();
        loop {
            mapping.borrow_and_update();
            state.borrow_and_update();
            let failed =
                !self.sync().await && matches!(self.session.state(), SessionState::Registered(_));
            tokio::select! {
                r = mapping.changed() => if r.is_err() { return },
                r = state.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(ANNOUNCE_RETRY), if failed => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The port to announce for `mapping`: none when the router's external address is private
/// (another NAT in front).
pub fn announced_port(mapping: Option<Mapping>) -> Option<u16> {
    mapping
        .filter(Mapping::usable_from_outside)
        .map(|m| m.external_port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A "gateway" that answers an HTTP request with endless bytes (or a never-ending header)
    /// makes us read no more than MAX_HTTP_RESPONSE.
    #[tokio::test]
    async fn an_endless_http_answer_is_cut_at_the_cap() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let chunk = vec![b'a'; 16 * 1024];
            let mut sent = 0usize;
            while stream.write_all(&chunk).await.is_ok() {
                sent += chunk.len();
                if sent > 4 * upnp::MAX_HTTP_RESPONSE {
                    break;
                }
            }
            sent
        });
        let result = http(
            Ipv4Addr::LOCALHOST,
            port,
            &upnp::http_get(Ipv4Addr::LOCALHOST, port, "/"),
        )
        .await;
        let err = result.expect_err("an over-long answer is refused");
        assert!(err.contains("over 65536 bytes"), "{err}");
        // We stopped reading: the server could not push everything it wanted through.
        let sent = server.await.unwrap();
        assert!(sent <= 4 * upnp::MAX_HTTP_RESPONSE + 16 * 1024);
    }

    #[test]
    fn only_a_public_mapping_is_announced() {
        let mapping = |ip: [u8; 4]| Mapping {
            protocol: super::super::mapper::Protocol::Pcp,
            external_ip: Some(Ipv4Addr::from(ip)),
            external_port: 41000,
            lifetime: Some(Duration::from_secs(60)),
            renewed: std::time::Instant::now(),
        };
        assert_eq!(
            announced_port(Some(mapping([203, 0, 113, 21]))),
            Some(41000)
        );
        assert_eq!(announced_port(Some(mapping([192, 168, 1, 1]))), None);
        assert_eq!(announced_port(None), None);
    }
}
