//! The tasks an endpoint spawns as it goes (one per connection's link, re-punches, punching
//! sessions, introduction replies, ping answering), kept so that [`Endpoint::close`] can end
//! them and wait until they have: a closed endpoint leaves nothing running.
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
}
