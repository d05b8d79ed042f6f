//! Benchmark programs driven by `scripts/bench.sh`.
//!
//! - `keys`: writes the identities and the plain-quinn certificate that a server and a client of
//!   one measurement share.
//! - `server` / `client`: a goodput test (one connection, 1 or N parallel streams, bytes into a
//!   discard sink) in one of three modes: plain `quinn` (default transport config, rcgen
//!   certificate), plain `tcp` (one TCP connection per stream), or `ours` (our data plane: the
//!   [`transport::DemuxSocket`] endpoint, our TLS configurations with Ed25519 identities, our
//!   transport settings, the peer dialed through a routed stable address as the peer binary does).
//!   Each side prints one JSON line with the bytes moved, the seconds and its CPU seconds.
//! - `rv-load`: registers many simulated peers with a running `rendezvous serve`, keeps them
//!   alive, and reports registrations per second and the server's RSS and CPU use;
//!   `--handshake-only` does the QUIC + TLS handshakes alone, against `handshake-server`.
//! - `handshake-server`: a plain quinn + rustls server (same certificate type and crypto as the
//!   rendezvous, nothing of ours) that accepts handshakes and holds the connections: the
//!   baseline of the rendezvous's registration cost and memory per peer.
//! - `cluster-load`: the same against several nodes sharing one registry in Redis, with
//!   cross-node introductions; per node figures.
//!
//! Output is JSON on stdout (one object per run); progress goes to stderr.

mod clusterload;
mod goodput;
mod handshake;
mod rvload;
mod usage;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(about = "Benchmark programs (see scripts/bench.sh)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which data plane a goodput test uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// quinn with its default transport config and a self-signed rcgen certificate.
    Quinn,
    /// As `quinn`, on sockets with the peer's kernel buffers (`PEER_SOCKET_BUFFER`): what
    /// that setting alone is worth to plain quinn.
    QuinnBuffers,
    /// One TCP connection per stream.
    Tcp,
    /// Our endpoint, TLS and transport settings, dialing a routed stable address.
    Ours,
}

#[derive(Subcommand)]
enum Command {
    /// Writes the server and client identities and the plain-quinn certificate into DIR.
    Keys {
        /// Directory to write into (created).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Accepts one goodput test, prints `listening ADDR`, then one JSON line when it ends.
    Server {
        #[arg(long, value_enum)]
        mode: Mode,
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory written by `keys`.
        #[arg(long)]
        keys: PathBuf,
        /// Parallel streams the client will use (TCP: connections to accept).
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// ours: the client's real address (routed from its stable address, as the peer does).
        #[arg(long)]
        peer_addr: Option<SocketAddr>,
    },
    /// Sends BYTES over STREAMS parallel streams and prints one JSON line.
    Client {
        #[arg(long, value_enum)]
        mode: Mode,
        /// The server's address.
        #[arg(long)]
        connect: SocketAddr,
        /// Local address to bind (ours: the address the server routes to).
        #[arg(long, default_value = "0.0.0.0:0")]
        bind: SocketAddr,
        /// Directory written by `keys`.
        #[arg(long)]
        keys: PathBuf,
        /// Bytes to send in total.
        #[arg(long)]
        bytes: u64,
        /// Parallel streams.
        #[arg(long, default_value_t = 1)]
        streams: usize,
    },
    /// Rendezvous load generator.
    RvLoad(rvload::Args),
    /// Cluster load generator (several nodes sharing Redis).
    ClusterLoad(clusterload::Args),
    /// Plain quinn + rustls server accepting handshakes only (the registration baseline).
    HandshakeServer {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Ed25519 identity file of the server (created if missing).
        #[arg(long)]
        key: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The same runtime shape as the peer binary, for every mode.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Keys { dir } => goodput::write_keys(&dir),
            Command::Server {
                mode,
                listen,
                keys,
                streams,
                peer_addr,
            } => goodput::server(mode, listen, &keys, streams, peer_addr).await,
            Command::Client {
                mode,
                connect,
                bind,
                keys,
                bytes,
                streams,
            } => goodput::client(mode, connect, bind, &keys, bytes, streams).await,
            Command::RvLoad(args) => rvload::run(args).await,
            Command::ClusterLoad(args) => clusterload::run(args).await,
            Command::HandshakeServer { listen, key } => handshake::server(listen, &key).await,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_options(args: &[&str]) -> (usize, usize, usize) {
        let cli = Cli::try_parse_from(args).expect("the command line parses");
        let load = match cli.command {
            Command::RvLoad(args) => args.load,
            Command::ClusterLoad(args) => args.load,
            _ => panic!("not a load generator"),
        };
        (load.endpoints, load.peers_per_source, load.concurrency)
    }

    /// `rv-load` and `cluster-load` take their shared options under the same names, with the
    /// same defaults (8 sockets, 16 peers per source address, 16 requests in flight).
    #[test]
    fn load_generators_share_their_options() {
        let rv = [
            "bench",
            "rv-load",
            "--server",
            "127.0.0.1:1",
            "--server-key",
            "k",
        ];
        let cluster = [
            "bench",
            "cluster-load",
            "--server",
            "127.0.0.1:1",
            "--server-key",
            "k",
        ];
        assert_eq!(load_options(&rv), (8, 16, 16));
        assert_eq!(load_options(&cluster), (8, 16, 16));
        let set = [
            "--endpoints",
            "3",
            "--peers-per-source",
            "5",
            "--concurrency",
            "7",
        ];
        assert_eq!(load_options(&[&rv[..], &set].concat()), (3, 5, 7));
        assert_eq!(load_options(&[&cluster[..], &set].concat()), (3, 5, 7));
    }
}
