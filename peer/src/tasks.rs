//! The tasks an endpoint spawns as it goes (one per connection's link, re-punches, punching
//! sessions, introduction replies, ping answering), kept so that [`Endpoint::close`] can end
//! them and wait until they have: a closed endpoint leaves nothing running.
//!
//! Helpers that only serve one piece of work (a stream's reader, a forwarder, a probe) are not
//! spawned at all: [`alongside`] runs them inside the future that needs them.
//!
//! [`Endpoint::close`]: crate::endpoint::Endpoint::close

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinSet;

/// A set of spawned tasks that all end when the endpoint shuts down. Cheap to clone.
///
/// Each task is raced against the endpoint's shutdown signal: once it is sent, every task is
/// dropped at its next await, and [`TaskSet::join`] waits until all have. Finished tasks are
/// reaped on every spawn, so the set holds only live ones (a remote party that makes us spawn
/// tasks does not make the set grow beyond what is running).
#[derive(Clone)]
pub struct TaskSet {
    set: Arc<Mutex<JoinSet<()>>>,
    shutdown: watch::Receiver<bool>,
}

impl TaskSet {
    /// An empty set whose tasks end when `shutdown` becomes `true`.
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        TaskSet {
            set: Arc::default(),
            shutdown,
        }
    }

    /// Spawns `task` in the set; it ends by itself or at shutdown, whichever comes first.
    /// After shutdown nothing is spawned (returns `false`). Must be called within a tokio
    /// runtime.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) -> bool {
        let mut shutdown = self.shutdown.clone();
        let Ok(mut set) = self.set.lock() else {
            return false;
        };
        // Checked under the lock that `join` takes the set with: a task spawned after the
        // shutdown signal would escape `join`.
        if *shutdown.borrow() {
            return false;
        }
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            tokio::select! {
                _ = task => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
        });
        true
    }

    /// How many tasks of the set are still running.
    pub fn running(&self) -> usize {
        let Ok(mut set) = self.set.lock() else {
            return 0;
        };
        while set.try_join_next().is_some() {}
        set.len()
    }

    /// Waits until every task of the set has ended. Call it after sending the shutdown signal
    /// (before, it waits for the tasks to end by themselves).
    pub async fn join(&self) {
        loop {
            // Taken out of the lock: it is never held across an await.
            let taken = match self.set.lock() {
                Ok(mut set) => std::mem::take(&mut *set),
                Err(_) => return,
            };
            if taken.is_empty() {
                return;
            }
            let mut taken = taken;
            // A task that panicked has ended too: that is all this waits for.
            while taken.join_next().await.is_some() {}
        }
    }
}

/// Runs `main` and, in the same task, `helper` (a stream reader, a forwarder, a probe) until
/// `main` ends; returns `main`'s output and `helper`'s if it ended first. `helper` is dropped
/// with this future, so it cannot outlive the code that needs it (a spawned helper would run
/// on, detached, if its owner were dropped mid-way).
pub async fn alongside<T, H>(
    main: impl Future<Output = T>,
    helper: impl Future<Output = H>,
) -> (T, Option<H>) {
    tokio::pin!(main);
    tokio::pin!(helper);
    let mut helped = None;
    loop {
        tokio::select! {
            out = &mut main => return (out, helped),
            done = &mut helper, if helped.is_none() => helped = Some(done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_ends_every_task_and_refuses_new_ones() {
        let (stop, shutdown) = watch::channel(false);
        let tasks = TaskSet::new(shutdown);
        // Tasks that would never end by themselves.
        for _ in 0..3 {
            assert!(tasks.spawn(std::future::pending()));
        }
        assert!(tasks.spawn(async {}));
        // The finished one is reaped (it ends at its first poll).
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while tasks.running() > 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the finished task is reaped");
        assert_eq!(tasks.running(), 3);
        stop.send_replace(true);
        tasks.join().await;
        assert_eq!(tasks.running(), 0);
        assert!(
            !tasks.spawn(std::future::pending()),
            "spawned after shutdown"
        );
        assert_eq!(tasks.running(), 0);
    }

    /// Drops a flag's sender when dropped: tells whether a future was dropped.
    struct Dropped(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.take();
        }
    }

    #[tokio::test]
    async fn a_helper_runs_alongside_and_ends_with_its_main_future() {
        // The helper feeds the main future, which ends on the third item.
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let guard = Dropped(Some(dropped_tx));
        let helper = async move {
            let _guard = guard;
            for i in 0u32.. {
                if tx.send(i).await.is_err() {
                    break;
                }
            }
        };
        let main = async {
            let mut got = Vec::new();
            while got.len() < 3 {
                got.push(rx.recv().await.unwrap());
            }
            got
        };
        let (got, helped) = alongside(main, helper).await;
        assert_eq!(got, [0, 1, 2]);
        assert!(helped.is_none(), "the helper never ends by itself");
        // Already dropped, not left running.
        let mut dropped_rx = dropped_rx;
        assert_eq!(
            dropped_rx.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed)
        );
        // A helper that ends first gives its output.
        let (out, helped) = alongside(
            async {
                tokio::task::yield_now().await;
                1
            },
            async { 2 },
        )
        .await;
        assert_eq!((out, helped), (1, Some(2)));
    }
}
