//! `peer listen`: accept connections and serve what each peer opens on them (chat, ping, files,
//! exposed TCP services).
//!
//! Why this exists apart from [`crate::endpoint`]: the endpoint gives a program connections; what
//! runs on them is the application's business. This module is the `peer` program's application,
//! the inbound stream dispatch: every stream starts with an `open {app}` frame, and the app
//! decides who serves it. Typed lines go to every open chat through a hub.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::PeerId;
use tokio::sync::{mpsc, watch};

use crate::access::Access;
use crate::chat;
use crate::console::{self, Console};
use crate::endpoint::{Endpoint, Incoming, RegisterError};
use crate::files;
use crate::paths::PathKeeper;
use crate::ping;
use crate::services::{self, Exposed};
use crate::session::SessionState;

/// What a listener offers besides chat and ping: an inbox for files and exposed TCP services
/// (each refused to peers when absent).
#[derive(Debug, Clone, Default)]
pub struct Offered {
    /// Where received files go.
    pub inbox: Option<Arc<files::Inbox>>,
    /// The TCP services peers may reach.
    pub exposed: Option<Arc<Exposed>>,
}

/// Lines typed by the user, by chat: each open chat's input queue.
pub type ChatHub = Arc<Mutex<HashMap<u64, mpsc::Sender<String>>>>;

/// Runs `peer listen` on `endpoint` until `stop` completes: registers, tells the user, serves
/// every connection, and closes the endpoint. `policy` is only shown (the endpoint enforces it);
/// `inbox` receives files (refused without one); `exposed` are the TCP services offered (none
/// without).
pub async fn run(
    endpoint: Endpoint,
    policy: &Access,
    inbox: Option<Arc<files::Inbox>>,
    exposed: Option<Arc<Exposed>>,
    stop: impl Future<Output = ()>,
) -> Result<(), RegisterError> {
    let reg = match endpoint.registered().await {
        Ok(reg) => reg,
        Err(e) => {
            endpoint.close().await;
            return Err(e);
        }
    };
    let console = endpoint.console().clone();
    let me = reg.id;
    console.say(format!("peer id {me}")).await;
    if let Access::Only(ids) = policy {
        console
            .say(format!("accepting only {} allowed peer(s)", ids.len()))
            .await;
    }
    if let Some(exposed) = &exposed {
        console
            .say(format!(
                "exposing {} to the allowed peers",
                exposed.describe().join(", ")
            ))
            .await;
    }
    let how = if reg.over_tcp {
        "through the TCP tunnel: UDP is blocked".to_owned()
    } else {
        format!("observed address {}", reg.observed)
    };
    console
        .say(format!("registered with {} ({how})", describe_server(&reg)))
        .await;
    let watcher = tokio::spawn(watch_session(endpoint.registration(), console.clone()));
    let hub: ChatHub = Arc::default();
    let input_task = tokio::spawn(broadcast_input(
        console::stdin_lines(),
        hub.clone(),
        console.clone(),
    ));
    let mut conns = tokio::task::JoinSet::new();
    // Tells every connection's server to stop, so that each stops its streams and waits for
    // them (aborting it would only abort them).
    let (stop_serving, serving) = watch::channel(false);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let mut serving = serving.clone();
                conns.spawn(serve_peer(
                    incoming,
                    me,
                    hub.clone(),
                    endpoint.path_keeper().clone(),
                    Offered {
                        inbox: inbox.clone(),
                        exposed: exposed.clone(),
                    },
                    console.clone(),
                    async move {
                        let _ = serving.wait_for(|stop| *stop).await;
                    },
                ));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = &mut stop => break,
        }
    }
    console.say("shutting down").await;
    // Each server stops at once (every await of it is raced with the signal) and waits for
    // its streams: nothing of this listener runs on after it returns.
    stop_serving.send_replace(true);
    while conns.join_next().await.is_some() {}
    for task in [watcher, input_task] {
        task.abort();
        let _ = task.await;
    }
    endpoint.close().await;
    Ok(())
}

/// Tells the user when the registration is lost and when it is back.
pub async fn watch_session(mut state: watch::Receiver<SessionState>, console: Console) {
    let mut generation = registered_generation(&state.borrow());
    let mut server = match &*state.borrow() {
        SessionState::Registered(reg) => Some(reg.server.index),
        _ => None,
    };
    let mut lost = false;
    while state.changed().await.is_ok() {
        let current = state.borrow_and_update().clone();
        match current {
            SessionState::Registered(reg) if Some(reg.generation) != generation => {
                generation = Some(reg.generation);
                lost = false;
                let moved = server.is_some_and(|s| s != reg.server.index);
                server = Some(reg.server.index);
                console
                    .say(format!(
                        "{} {} (observed address {})",
                        if moved {
                            "moved to another rendezvous: registered with"
                        } else {
                            "re-registered with the rendezvous"
                        },
                        describe_server(&reg),
                        reg.observed
                    ))
                    .await;
            }
            SessionState::Connecting { last_error } if !lost => {
                lost = true;
                console
                    .error(format!(
                        "lost the rendezvous ({}); retrying",
                        last_error.unwrap_or_default()
                    ))
                    .await;
            }
            SessionState::Fatal(e) => {
                console.error(format!("rendezvous: {e}")).await;
                return;
            }
            _ => {}
        }
    }
}

/// The server of `reg` for the user: its name, and with several servers its address and round
/// trip.
pub fn describe_server(reg: &crate::session::Registration) -> String {
    let server = &reg.server;
    if server.of <= 1 {
        return server.name.clone();
    }
    match server.rtt {
        Some(rtt) => format!(
            "{} ({}, round trip {:.1} ms)",
            server.name,
            server.addr,
            rtt.as_secs_f64() * 1000.0
        ),
        None => format!("{} ({})", server.name, server.addr),
    }
}

fn registered_generation(state: &SessionState) -> Option<u64> {
    match state {
        SessionState::Registered(reg) => Some(reg.generation),
        _ => None,
    }
}

/// Sends every typed line to every open chat (a chat that is not keeping up loses the line).
pub async fn broadcast_input(mut lines: mpsc::Receiver<String>, hub: ChatHub, console: Console) {
    while let Some(line) = lines.recv().await {
        // Clone the senders and release the lock before any await.
        let targets: Vec<mpsc::Sender<String>> = hub
            .lock()
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default();
        if targets.is_empty() {
            console.error("no peer is connected; line not sent").await;
        }
        for target in targets {
            if target.try_send(line.clone()).is_err() {
                console
                    .error("a peer is not keeping up; line dropped for it")
                    .await;
            }
        }
    }
}

/// How long the streams of a connection the peer closed may take to end by themselves (their
/// I/O fails at once; a file's verdict may still be said) before they are aborted.
const STREAMS_AFTER_CLOSE: Duration = Duration::from_secs(5);

/// Accepts one connection and serves the streams its peer opens until it closes or `stop`
/// completes; either way the streams still being served are ended and waited for (after the
/// peer closed, they first get [`STREAMS_AFTER_CLOSE`] to end by themselves).
pub async fn serve_peer(
    incoming: Incoming,
    me: PeerId,
    hub: ChatHub,
    keeper: PathKeeper,
    offered: Offered,
    console: Console,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    // Refusals are reported by the endpoint.
    let accepted = tokio::select! {
        accepted = std::future::IntoFuture::into_future(incoming) => accepted,
        () = &mut stop => return,
    };
    let Ok(conn) = accepted else {
        return;
    };
    let peer = conn.peer();
    let mut streams = tokio::task::JoinSet::new();
    let mut closed = false;
    loop {
        let (mut tx, mut rx) = tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    console.say(format!("disconnected: {peer} ({e})")).await;
                    closed = true;
                    break;
                }
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            () = &mut stop => break,
        };
        let header = tokio::select! {
            header = chat::accept(&mut tx, &mut rx) => header,
            () = &mut stop => break,
        };
        let app = match header {
            Ok(app) => app,
            Err(e) => {
                console
                    .error(format!("refused a stream from {peer}: {e}"))
                    .await;
                continue;
            }
        };
        let console = console.clone();
        match app {
            common::message::PeerApp::Chat => {
                // One key per chat in this process: stream indices repeat on every connection, and
                // a second chat under the same key would end the first one's input.
                static NEXT_CHAT: std::sync::atomic::AtomicU64 =
                    std::sync::atomic::AtomicU64::new(0);
                let key = NEXT_CHAT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let (line_tx, line_rx) = mpsc::channel(64);
                if let Ok(mut h) = hub.lock() {
                    h.insert(key, line_tx);
                }
                let hub = hub.clone();
                let chat_conn = conn.quinn().clone();
                streams.spawn(async move {
                    let end = chat::run(
                        &chat_conn,
                        tx,
                        rx,
                        me,
                        peer,
                        line_rx,
                        console.clone(),
                        common::chat::END_TIMEOUT,
                    )
                    .await;
                    if let Ok(mut h) = hub.lock() {
                        h.remove(&key);
                    }
                    match end {
                        chat::ChatEnd::PeerClosed { .. } => {
                            console.say(format!("chat with {peer} ended")).await
                        }
                        chat::ChatEnd::Failed(e) => {
                            console.error(format!("chat with {peer} failed: {e}")).await
                        }
                        chat::ChatEnd::InputClosed => {}
                    }
                });
            }
            common::message::PeerApp::Ping => {
                streams.spawn(ping::serve(tx, rx, keeper.clone()));
            }
            common::message::PeerApp::File => {
                let inbox = offered.inbox.clone();
                streams.spawn(async move { files::receive(tx, rx, peer, inbox, &console).await });
            }
            common::message::PeerApp::Service => {
                streams.spawn(services::serve(
                    tx,
                    rx,
                    peer,
                    offered.exposed.clone(),
                    console,
                ));
            }
        }
    }
    if closed {
        // Aborted now, a stream could lose what it has left to say: a file refused just
        // before the peer closed (the peer read the verdict and left) logs why afterwards.
        let ended = async { while streams.join_next().await.is_some() {} };
        tokio::select! {
            () = ended => {}
            () = tokio::time::sleep(STREAMS_AFTER_CLOSE) => {}
            () = &mut stop => {}
        }
    }
    streams.shutdown().await;
}
