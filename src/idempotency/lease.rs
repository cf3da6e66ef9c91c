//! Keeps the leases of running operations alive, and the store tidy.
//!
//! One thread per store handle: every tick it renews the held claims whose lease is a third
//! used up (so a live owner never loses a claim, however long its operation takes) and
//! lets the store do its housekeeping. It renews *claims*, each by its token, not keys: a
//! claim that was taken over is not renewed for its old owner. The thread ends when the
//! keeper is dropped (which joins it) or the store is gone.

use super::{ClaimToken, IdempotencyStore};
use crate::clock::Clock;
use crate::error::Failure;
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest sleep of the thread: housekeeping runs at least this often.
const MAX_TICK: Duration = Duration::from_secs(1);

pub struct LeaseKeeper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Renew a lease once this much of it has passed.
    renew_after_ms: u64,
}

#[derive(Default)]
struct State {
    /// Held claims: their key, and when the lease was last renewed (unix ms).
    held: HashMap<ClaimToken, (Vec<u8>, u64)>,
    stop: bool,
}

/// A claim whose lease is kept alive until this is dropped.
pub struct HeldLease<'a> {
    keeper: &'a LeaseKeeper,
    token: ClaimToken,
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        self.keeper.shared.state.lock().held.remove(&self.token);
    }
}

impl LeaseKeeper {
    /// Starts the thread. `lease` is the store's lease.
    pub fn start(
        store: Weak<dyn IdempotencyStore>,
        clock: Arc<dyn Clock>,
        lease: Duration,
    ) -> Result<Self, Failure> {
        let renew_after = (lease / 3).max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            renew_after_ms: renew_after.as_millis() as u64,
        });
        let tick = renew_after.min(MAX_TICK);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("backup-idem-lease".into())
            .spawn(move || loop {
                {
                    let mut state = thread_shared.state.lock();
                    if !state.stop {
                        thread_shared.wake.wait_for(&mut state, tick);
                    }
                    if state.stop {
                        return;
                    }
                }
                let Some(store) = store.upgrade() else { return };
                thread_shared.tick(store.as_ref(), clock.unix_ms());
            })
            .map_err(|e| Failure::OutOfResources(format!("cannot start the lease thread: {e}")))?;
        Ok(LeaseKeeper {
            shared,
            thread: Some(thread),
        })
    }

    /// Keeps the lease of the claim `token` of `key` (just granted at `now_ms`) alive
    /// until the guard is dropped.
    pub fn hold(&self, key: &[u8], token: ClaimToken, now_ms: u64) -> HeldLease<'_> {
        self.shared
            .state
            .lock()
            .held
            .insert(token, (key.to_vec(), now_ms));
        HeldLease {
            keeper: self,
            token,
        }
    }

    /// Runs the thread's work now instead of at its next tick.
    pub fn wake(&self) {
        self.shared.wake.notify_all();
    }

    /// One round of the thread's work, for tests that drive time themselves.
    pub fn tick(&self, store: &dyn IdempotencyStore, now_ms: u64) {
        self.shared.tick(store, now_ms)
    }
}

impl Shared {
    fn tick(&self, store: &dyn IdempotencyStore, now_ms: u64) {
        let due: Vec<(Vec<u8>, ClaimToken)> = {
            let state = self.state.lock();
            state
                .held
                .iter()
                .filter(|(_, (_, renewed))| now_ms.saturating_sub(*renewed) >= self.renew_after_ms)
                .map(|(token, (key, _))| (key.clone(), *token))
                .collect()
        };
        if !due.is_empty() {
            match store.renew(&due, now_ms) {
                Ok(()) => {
                    let mut state = self.state.lock();
                    for (_, token) in &due {
                        if let Some((_, renewed)) = state.held.get_mut(token) {
                            *renewed = now_ms;
                        }
                    }
                }
                Err(failure) => tracing::warn!(
                    keys = due.len(),
                    reason = %failure.detail(),
                    "idempotency leases not renewed; retrying at the next tick"
                ),
            }
        }
        if let Err(failure) = store.maintain(now_ms) {
            tracing::warn!(reason = %failure.detail(), "idempotency store housekeeping failed");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_all();
        // Joined, so that nothing of the store (open files, a mount being unmounted) outlives
        // the keeper. The thread never owns the keeper, so this never joins itself.
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}
