//! `peer`: register with a rendezvous, find other peers by id, and chat with them over
//! end-to-end encrypted QUIC.
//!
//! The command line only: argument parsing, output and dispatch. Everything else is the `peer`
//! library (`src/lib.rs`), which other programs can use as well.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use certs::Identity;
use clap::Parser;
use peer::commands::{self, DirPrivacy, PeerLookup, Role};
use peer::endpoint::{Endpoint, EndpointConfig};
use peer::{access, console, control, files, listener, netcheck, ping, services, FirstUseTrust};
use tokio::sync::watch;
mod cli;

use cli::{seconds, Cli, Command, ServerArgs};

/// Async worker threads: two, but never more than the cores less one. The per-byte work of a
/// transfer beyond quinn's (reading, hashing and writing files) runs on blocking threads of its
/// own, which need a core too; on a two-core machine a second worker only wakes and parks
/// against them (`peer send` between two peers on two cores: 20-25 % less CPU per byte and
/// 1.2-1.3 x the goodput with one worker, docs/benchmarks.md).
fn runtime_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.saturating_sub(1).clamp(1, 2)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = if cli.verbose {
        "info,peer=debug"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_workers())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli));
    // The stdin thread may be blocked in a read; do not wait for it.
    runtime.shutdown_timeout(Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binds a command's endpoint, runs `command` on it (which closes it), and prints the
/// rendezvous key's trust on first use on stderr as soon as the session reports it.
async fn with_endpoint<T, E, F>(
    identity: Arc<Identity>,
    config: EndpointConfig,
    command: impl FnOnce(Endpoint) -> F,
) -> anyhow::Result<T>
where
    F: std::future::Future<Output = Result<T, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let endpoint = Endpoint::bind(identity, config).await?;
    let notice = FirstUseNotice::start(&endpoint);
    let result = command(endpoint).await;
    notice.finish().await;
    Ok(result?)
}

/// Prints each rendezvous key trusted on first use (several with several servers): when it
/// happens, or at the end if the command finished before the printer saw it.
struct FirstUseNotice {
    printer: tokio::task::JoinHandle<()>,
    trust: watch::Receiver<Option<FirstUseTrust>>,
    /// The last one printed (the lock is never held across an await).
    printed: Arc<std::sync::Mutex<Option<FirstUseTrust>>>,
}

impl FirstUseNotice {
    fn start(endpoint: &Endpoint) -> Self {
        let trust = endpoint.first_use_trust();
        let mut watching = trust.clone();
        let printed: Arc<std::sync::Mutex<Option<FirstUseTrust>>> = Arc::default();
        let last = printed.clone();
        let printer = tokio::spawn(async move {
            loop {
                let current = watching.borrow_and_update().clone();
                if let Some(trusted) = current {
                    print_first_use(&last, trusted);
                }
                if watching.changed().await.is_err() {
                    return;
                }
            }
        });
        FirstUseNotice {
            printer,
            trust,
            printed,
        }
    }

    async fn finish(self) {
        self.printer.abort();
        let _ = self.printer.await;
        let current = self.trust.borrow().clone();
        if let Some(trusted) = current {
            print_first_use(&self.printed, trusted);
        }
    }
}

/// Prints `trusted` unless it is the one printed last.
fn print_first_use(printed: &std::sync::Mutex<Option<FirstUseTrust>>, trusted: FirstUseTrust) {
    if let Ok(mut last) = printed.lock() {
        if last.as_ref() != Some(&trusted) {
            eprintln!("{trusted}");
            *last = Some(trusted);
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = cli
        .config_dir
        .clone()
        .unwrap_or_else(commands::default_config_dir);
    match commands::prepare_config_dir(&dir)? {
        DirPrivacy::Tightened { old_mode } => eprintln!(
            "made the config dir {} private (mode {old_mode:o} -> 700): it holds the identity \
             key and the control socket",
            dir.display()
        ),
        DirPrivacy::Unchanged => {}
        DirPrivacy::Failed(e) => eprintln!(
            "warning: cannot make the config dir {} private: {e}",
            dir.display()
        ),
    }
    let identity_path = cli
        .identity
        .clone()
        .unwrap_or_else(|| dir.join(commands::IDENTITY_FILE));
    let (identity, created) = Identity::load_or_create(&identity_path)?;
    if created {
        eprintln!(
            "created identity {} in {}",
            identity.id(),
            identity_path.display()
        );
    }
    let identity = Arc::new(identity);
    let verbose = cli.verbose;
    match cli.command {
        Command::Id => {
            println!("{}", identity.id());
            Ok(())
        }
        Command::Listen {
            server,
            accept_files,
            access,
            max_file_size,
            expose,
        } => {
            let policy = access::policy(
                &access.allow,
                access.allow_any,
                &dir.join(access::FILE_NAME),
                accept_files.is_some(),
            )?;
            let exposed = if expose.is_empty() {
                None
            } else {
                Some(services::Exposed::new(
                    expose,
                    &policy,
                    &dir.join(access::FILE_NAME),
                )?)
            };
            let inbox = match accept_files {
                Some(files) if !files.is_dir() => {
                    bail!("--accept-files {}: not a directory", files.display())
                }
                Some(files) => Some(files::Inbox::new(files, max_file_size)),
                None => None,
            };
            // Installed before registration is announced (see `stop_signals`).
            let signal =
                commands::stop_signals().context("installing the SIGINT/SIGTERM handlers")?;
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Listen);
            config.access = policy.clone();
            with_endpoint(identity, config, |endpoint| {
                listener::run(endpoint, &policy, inbox, exposed, signal)
            })
            .await
        }
        Command::Netcheck {
            server,
            stun,
            stun6,
            json,
            no_port_mapping,
        } => {
            let report =
                netcheck::check(server.as_deref(), &stun, stun6.as_deref(), !no_port_mapping)
                    .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Send {
            peer,
            file,
            server,
            dial_timeout,
        } => {
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            if !file.is_file() {
                bail!("{}: not a readable file", file.display());
            }
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Send);
            config.dial_timeout = dial_timeout;
            with_endpoint(identity, config, |endpoint| {
                commands::send_file(endpoint, peer, &file)
            })
            .await
        }
        Command::Pipe {
            peer,
            service,
            server,
            dial_timeout,
        } => {
            services::check_name(&service).map_err(|e| anyhow::anyhow!("{service:?}: {e}"))?;
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Pipe);
            config.dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            with_endpoint(identity, config, |endpoint| {
                services::pipe(
                    endpoint,
                    peer,
                    &service,
                    tokio::io::stdin(),
                    tokio::io::stdout(),
                )
            })
            .await
            .map(|_| ())
        }
        Command::Forward {
            peer,
            service,
            local,
            server,
            dial_timeout,
        } => {
            services::check_name(&service).map_err(|e| anyhow::anyhow!("{service:?}: {e}"))?;
            let signal =
                commands::stop_signals().context("installing the SIGINT/SIGTERM handlers")?;
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Forward);
            config.dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            with_endpoint(identity, config, |endpoint| {
                services::forward(endpoint, peer, &service, local, |_| {}, signal)
            })
            .await
        }
        Command::Connect {
            peer,
            server,
            dial_timeout,
        } => {
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            let mut config =
                commands::endpoint_config(&server.options()?, &dir, verbose, Role::Connect);
            config.dial_timeout = dial_timeout;
            with_endpoint(identity, config, |endpoint| {
                commands::chat(endpoint, peer, console::stdin_lines())
            })
            .await
        }
        Command::Lookup {
            peer,
            server,
            refresh,
        } => {
            let (lookup, warning) = PeerLookup::open(&dir);
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            if let Some(cached) = lookup.cached(peer).filter(|_| !refresh) {
                print!("{}", cached.render());
                return Ok(());
            }
            let config = commands::endpoint_config(&server.options()?, &dir, false, Role::Lookup);
            let (found, warning) =
                with_endpoint(identity, config, |endpoint| lookup.ask(endpoint, peer)).await?;
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            print!("{}", found.render());
            Ok(())
        }
        Command::Status { json } => {
            let report = control::status(&dir).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Ping {
            peer,
            count,
            interval,
            until_direct,
            timeout,
            json,
            server,
            session,
            dial_timeout,
        } => {
            let options = ping::PingOptions {
                count: count.max(1),
                interval_ms: seconds(interval, "--interval")?.as_millis() as u64,
                until_direct,
                timeout_ms: seconds(timeout, "--timeout")?.as_millis() as u64,
            };
            let dial_timeout = seconds(dial_timeout, "--dial-timeout")?;
            // Through the peer running with this config dir if there is one.
            let through_running = ping::through_running_peer(&dir, peer, options, |line| {
                if !json {
                    println!("{line}");
                }
            })
            .await;
            let summary = match through_running {
                Ok(summary) => summary,
                Err(ping::ThroughPeerError::Client(control::ClientError::NotRunning(path))) => {
                    if server.is_empty() {
                        bail!(
                            "no peer is running with config dir {} (no {}); start `peer listen`, \
                             or give --server to ping from a peer of its own",
                            dir.display(),
                            path.display()
                        );
                    }
                    let server = ServerArgs { server, session }.options()?;
                    let mut config =
                        commands::endpoint_config(&server, &dir, verbose, Role::Ping { json });
                    config.dial_timeout = dial_timeout;
                    with_endpoint(identity, config, |endpoint| {
                        commands::ping(endpoint, peer, options, json)
                    })
                    .await?
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", ping::render(&summary));
            }
            Ok(commands::ping_verdict(peer, &options, &summary)?)
        }
    }
}
