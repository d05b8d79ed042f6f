//! The rendezvous server: registry, punch coordination and STUN, as a library so that tests and
//! benchmarks can run it in-process. The `rendezvous` binary is a thin CLI over [`Server`].

pub mod backend;
pub mod channel;
pub mod cluster;
pub mod config_file;
pub mod core;
pub mod metrics;
pub mod nodelink;
pub mod observe;
pub mod ratelimit;
pub mod relay;
mod server;
pub mod sources;
pub mod store;
pub mod stun;
pub mod tunnel;
pub mod waiting;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use certs::{Fingerprint, Identity};
use tokio::sync::watch;

pub use server::{
    Limits, CLOSE_BUSY, CLOSE_NOT_READING, CONTROL_RECEIVE_WINDOW, CONTROL_SEND_WINDOW,
    MAX_REQUEST_FRAME, MAX_STREAMS_PER_CONNECTION, WRITE_TIMEOUT,
};

/// Everything needed to start a server.
#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address to listen on (QUIC and STUN).
    pub listen: SocketAddr,
    /// Where the key and the registry live.
    pub data_dir: PathBuf,
    /// Limits.
    pub limits: Limits,
    /// Append every relayed packet to this file (capped at 16 MiB), for inspection.
    pub relay_trace: Option<PathBuf>,
    /// TCP address for the TLS tunnel used by peers whose network blocks UDP (`None`: off).
    pub tcp_listen: Option<SocketAddr>,
    /// Fail to start if the TCP address cannot be bound (otherwise: warn and go without).
    pub tcp_required: bool,
    /// Alternate STUN addresses (RFC 5780).
    pub stun: stun::StunConfig,
    /// Serve Prometheus metrics over HTTP here.
    pub metrics: Option<SocketAddr>,
    /// Caps and timeouts of the TCP tunnel port.
    pub tunnel_limits: tunnel::TunnelLimits,
    /// Caps and timeouts of the metrics port.
    pub metrics_limits: metrics::MetricsLimits,
    /// Registry growth: registration rate limits per source, row cap, expiry of offline rows.
    pub registry: core::RegistryLimits,
    /// Share the registry with other nodes in Redis (`None`: the embedded redb registry).
    pub cluster: Option<cluster::ClusterConfig>,
}

impl Config {
    /// A server on `listen` keeping its key and registry in `data_dir`, with every limit at its
    /// default, no TCP tunnel, no metrics, no alternate STUN address and no relay trace: set the
    /// other fields with struct update syntax.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Config {
        Config {
            listen,
            data_dir: data_dir.into(),
            limits: Limits::default(),
            relay_trace: None,
            tcp_listen: None,
            tcp_required: false,
            stun: stun::StunConfig::default(),
            metrics: None,
            tunnel_limits: tunnel::TunnelLimits::default(),
            metrics_limits: metrics::MetricsLimits::default(),
            registry: core::RegistryLimits::default(),
            cluster: None,
        }
    }
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] certs::IdentityError),
    /// The registry could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// TLS set-up failed.
    #[error(transparent)]
    Tls(#[from] certs::TlsConfigError),
    /// The socket could not be bound.
    #[error(transparent)]
    Endpoint(#[from] transport::EndpointError),
    /// An alternate STUN address could not be bound.
    #[error("alternate STUN address: {source}")]
    Stun {
        /// The OS error.
        source: std::io::Error,
    },
    /// The cluster configuration is unusable.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The node-to-node link cannot be set up.
    #[error(transparent)]
    Link(#[from] nodelink::LinkError),
    /// The TCP tunnel port could not be bound.
    #[error("TCP tunnel on {addr}: {source}")]
    Tcp {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A started server. Dropping it without [`Server::shutdown`] aborts nothing: call shutdown.
pub struct Server {
    local_addr: SocketAddr,
    stun_alternates: stun::StunAlternates,
    tcp_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    fingerprint: Fingerprint,
    registered: usize,
    link_addr: Option<SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    writer: Writer,
}

/// What writes the registry: redb's writer thread, or the cluster's writer task.
enum Writer {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl Server {
    /// Opens the data dir (creating the key and registry on first start), binds, and starts
    /// serving in the background.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        certs::durable::create_private_dir(&config.data_dir).map_err(|source| {
            StartError::DataDir {
                path: config.data_dir.clone(),
                source,
            }
        })?;
        let (identity, _) = Identity::load_or_create(&config.data_dir.join("server.pem"))?;
        // Rows already past their expiry are deleted at load instead of loaded.
        let expired_before = time::Duration::try_from(config.registry.expire_after)
            .ok()
            .and_then(|d| time::OffsetDateTime::now_utc().checked_sub(d));
        let (backend, records, writer) = match &config.cluster {
            None => {
                let (store, records, writer) =
                    store::open_expiring(&config.data_dir, expired_before)?;
                (
                    backend::Backend::Embedded(store),
                    records,
                    Writer::Thread(writer),
                )
            }
            // The cluster's records live in Redis; this node's registry starts empty and
            // holds the peers that register here.
            Some(cluster_config) => {
                let (cluster, queue) =
                    cluster::Cluster::open(cluster_config, config.registry.expire_after).await?;
                let writer = tokio::spawn(cluster.clone().run_writer(queue));
                (
                    backend::Backend::Cluster(cluster),
                    Vec::new(),
                    Writer::Task(writer),
                )
            }
        };
        let registered = records.len();
        // The seed of the introductions' nonces and secret keys, from the operating system's
        // CSPRNG (rand's thread rng is a ChaCha seeded from it).
        let mut registry = core::Registry::with_limits(records, rand::random(), config.registry);
        let tls = certs::server_config(&identity, &[common::ALPN_RENDEZVOUS])?;
        let (endpoint, demux, stun_rx) = transport::make_server_endpoint(
            config.listen,
            // The STUN socket on the second IP takes the main port too (see `stun::start`).
            config.stun.alt_ip.is_some(),
            tls,
            transport::TransportSettings::default(),
            config.limits.server_transport(),
            1024,
            Some(identity.derive_secret("quic stateless reset")),
        )?;
        let local_addr =
            endpoint
                .local_addr()
                .map_err(|source| transport::EndpointError::Socket {
                    addr: config.listen,
                    source,
                })?;
        registry.set_own_addrs(vec![local_addr]);
        // Dual-stack: peers prove their address of the other family (see `observe`).
        let observe_secret = identity.derive_secret("address proof");
        let proof_addrs = observe::own_addrs(local_addr);
        if !proof_addrs.is_empty() {
            tracing::info!(addrs = ?proof_addrs, "dual-stack: address proofs for peers' other family");
        }
        registry.set_address_proofs(observe_secret, proof_addrs);
        let trace = match &config.relay_trace {
            Some(path) => {
                Some(
                    std::fs::File::create(path).map_err(|source| StartError::DataDir {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let stun_counters = Arc::new(stun::StunCounters::default());
        let mut links = None;
        if let Some(cluster) = backend.cluster() {
            let fingerprint = identity.fingerprint().to_string();
            if let Some(link) = config.cluster.as_ref().and_then(|c| c.link.as_ref()) {
                links = Some(nodelink::Links::bind(link, &identity, cluster.clone())?);
            }
            cluster.set_node_info(&cluster::NodeInfo {
                addr: local_addr.to_string(),
                fingerprint: fingerprint.clone(),
                online: 0,
                link: links.as_ref().map(|l| l.announce().to_string()),
            });
            cluster.claim_node_id(&fingerprint).await?;
        }
        let link_addr = links.as_ref().map(|l| l.announce());
        let relay_hub = relay::RelayHub::new(trace);
        if let Some(links) = &links {
            relay_hub.set_links(links.clone());
            tracing::info!(announce = %links.announce(), "node link listening (cross-node relay)");
        }
        let shared = server::Shared::new(
            registry,
            backend,
            config.limits,
            relay_hub,
            stun_counters.clone(),
            links,
        );
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let tunnel_counters = Arc::new(tunnel::TunnelCounters::default());
        let mut tcp_addr = None;
        let mut tcp_task = None;
        let listener = match config.tcp_listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => Some(listener),
                Err(source) if config.tcp_required => return Err(StartError::Tcp { addr, source }),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "TCP tunnel disabled: cannot bind");
                    None
                }
            },
            None => None,
        };
        if let Some(listener) = listener {
            tcp_addr = listener.local_addr().ok();
            let tls = certs::tunnel_server_config(&identity, common::ALPN_TUNNEL)?;
            tcp_task = Some(tokio::spawn(tunnel::serve(
                listener,
                tls,
                demux.clone(),
                config.tunnel_limits,
                tunnel_counters.clone(),
                shared.clone(),
                shutdown_rx.clone(),
            )));
        }
        let (stun_task, stun_alternates) = stun::start(
            demux.clone(),
            local_addr,
            config.stun,
            stun_rx,
            stun_counters,
            observe_secret,
            shutdown_rx.clone(),
        )
        .await
        .map_err(|source| StartError::Stun { source })?;
        let mut metrics_addr = None;
        let metrics_task = match config.metrics {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Tcp { addr, source })?;
                metrics_addr = listener.local_addr().ok();
                Some(tokio::spawn(metrics::serve(
                    listener,
                    shared.clone(),
                    tunnel_counters,
                    config.metrics_limits,
                    shutdown_rx.clone(),
                )))
            }
            None => None,
        };
        // Relay channels: the socket offers channel datagrams to the table before quinn sees
        // them; the table looks at every channel again once a second.
        shared.channels.set_socket_stats(demux.stats());
        demux.set_forwarder(shared.channels.clone());
        let sweeper = tokio::spawn(sweep_channels(shared.clone(), shutdown_rx.clone()));
        let serve = server::serve(endpoint, shared, shutdown_rx);
        let task = tokio::spawn(async move {
            serve.await;
            let _ = sweeper.await;
            if let Some(tcp) = tcp_task {
                let _ = tcp.await;
            }
            let _ = stun_task.await;
            if let Some(metrics) = metrics_task {
                let _ = metrics.await;
            }
        });
        Ok(Server {
            local_addr,
            stun_alternates,
            tcp_addr,
            metrics_addr,
            fingerprint: identity.fingerprint(),
            registered,
            link_addr,
            shutdown_tx,
            task,
            writer,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The STUN alternate addresses bound (RFC 5780 behaviour discovery).
    pub fn stun_alternates(&self) -> stun::StunAlternates {
        self.stun_alternates
    }

    /// The bound metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound TCP tunnel address, if enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The node link's address as announced to the other nodes (`--cluster-link`), if any.
    pub fn link_addr(&self) -> Option<SocketAddr> {
        self.link_addr
    }

    /// The server key's fingerprint, which peers pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Registrations loaded from disk at start.
    pub fn registered_at_start(&self) -> usize {
        self.registered
    }

    /// Closes every connection, waits for the tasks and for pending registry writes.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let _ = self.task.await;
        // All store handles lived in the tasks: the writer drains its queue and exits.
        match self.writer {
            Writer::Thread(writer) => {
                let _ = tokio::task::spawn_blocking(move || writer.join()).await;
            }
            // Its queue's last writes (peers going offline) take at most a call timeout each
            // batch; Redis being down must not hold the shutdown.
            Writer::Task(mut writer) => {
                if tokio::time::timeout(std::time::Duration::from_secs(5), &mut writer)
                    .await
                    .is_err()
                {
                    writer.abort();
                }
            }
        }
    }

    /// Waits until the server stops by itself (it only does on shutdown).
    pub fn shutdown_handle(&self) -> Arc<watch::Sender<bool>> {
        Arc::new(self.shutdown_tx.clone())
    }
}

/// Sweeps the relay channels every [`channel::SWEEP_INTERVAL`] until shutdown.
async fn sweep_channels(shared: Arc<server::Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(channel::SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.sweep_channels(),
            _ = shutdown.changed() => return,
        }
    }
}

/// The fingerprint of the key in `data_dir`, creating the key if there is none.
pub fn fingerprint(data_dir: &std::path::Path) -> Result<Fingerprint, StartError> {
    certs::durable::create_private_dir(data_dir).map_err(|source| StartError::DataDir {
        path: data_dir.to_owned(),
        source,
    })?;
    let (identity, _) = Identity::load_or_create(&data_dir.join("server.pem"))?;
    Ok(identity.fingerprint())
}
