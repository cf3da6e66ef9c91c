//! Keeps the leases of running operations alive, knows how long each is sure to last, and
//! keeps the store tidy.
//!
//! Two threads per store handle, so that a renewal never waits behind housekeeping (a
//! compaction of millions of keys takes seconds; a lease may be shorter):
//! - the renewer, every tick, renews the held claims whose lease is a third used up, and
//!   retries a failed renewal at the next tick;
//! - the maintainer lets the store do its housekeeping.
//!
//! It renews *claims*, each by its key and token, not keys: a claim that was taken over is
//! not renewed for its old owner. A token alone does not name a claim: tokens only grow per
//! key (docs/C_API.md §8.1), and on etcd the claims of several keys made in one transaction
//! share its revision. For each held claim it keeps a conservative view of its lease
//! on the monotonic clock (docs/C_API.md §8.1): the lease is sure to last until the
//! instant the last acknowledged renewal (or the claim itself) was *sent*, plus the lease.
//! A claim is held while that leaves at least one renewal period; once it does not (the
//! renewals failed, the process stalled) or the store says another claim has the key, the
//! claim is lost for good, before the store could expire it. The threads end when the
//! keeper is dropped (which joins them) or the store is gone.

use super::{ClaimToken, IdempotencyStore};
use crate::clock::Clock;
use crate::error::{Error, Result};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest sleep of either thread: a failed renewal is retried, and housekeeping runs, at
/// least this often.
const MAX_TICK: Duration = Duration::from_secs(1);

pub struct LeaseKeeper {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    state: Mutex<State>,
    renewer: Condvar,
    maintainer: Condvar,
    clock: Arc<dyn Clock>,
    lease_ms: u64,
    /// Renew a lease once this much of it has passed; also the margin a held claim keeps.
    renew_after_ms: u64,
}

#[derive(Default)]
struct State {
    /// By key and token.
    held: HashMap<(Vec<u8>, ClaimToken), Held>,
    stop: bool,
}

struct Held {
    /// When (monotonic ms) the last renewal the store acknowledged, or the claim, was sent.
    acked_sent_ms: u64,
    /// Renewals failed too long, or the claim is no longer the key's: never held again.
    lost: bool,
}

/// A claim whose lease is kept alive until this is dropped.
pub struct HeldLease<'a> {
    keeper: &'a LeaseKeeper,
    claim: (Vec<u8>, ClaimToken),
}

impl HeldLease<'_> {
    /// Whether the claim is still sure to hold the key for one more renewal period.
    pub fn is_held(&self) -> bool {
        let (key, token) = &self.claim;
        self.keeper.view(key, *token) == Some(true)
    }
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        self.keeper.shared.state.lock().held.remove(&self.claim);
    }
}

impl LeaseKeeper {
    /// Starts the threads. `lease` is the store's lease.
    pub fn start(
        store: Weak<dyn IdempotencyStore>,
        clock: Arc<dyn Clock>,
        lease: Duration,
    ) -> Result<Self> {
        let renew_after = (lease / 3).max(Duration::from_millis(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            renewer: Condvar::new(),
            maintainer: Condvar::new(),
            clock,
            lease_ms: lease.as_millis() as u64,
            renew_after_ms: renew_after.as_millis() as u64,
        });
        let mut keeper = LeaseKeeper {
            shared,
            threads: Vec::new(),
        };
        let tick = renew_after.min(MAX_TICK);
        keeper.spawn(
            "backup-idem-lease",
            store.clone(),
            tick,
            |shared| &shared.renewer,
            |shared, store| shared.renew_due(store, shared.clock.unix_ms()),
        )?;
        keeper.spawn(
            "backup-idem-maint",
            store,
            MAX_TICK,
            |shared| &shared.maintainer,
            |shared, store| shared.maintain(store, shared.clock.unix_ms()),
        )?;
        Ok(keeper)
    }

    fn spawn(
        &mut self,
        name: &str,
        store: Weak<dyn IdempotencyStore>,
        tick: Duration,
        wake: fn(&Shared) -> &Condvar,
        work: fn(&Shared, &dyn IdempotencyStore),
    ) -> Result<()> {
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || loop {
                {
                    let mut state = shared.state.lock();
                    if !state.stop {
                        wake(&shared).wait_for(&mut state, tick);
                    }
                    if state.stop {
                        return;
                    }
                }
                let Some(store) = store.upgrade() else { return };
                work(&shared, store.as_ref());
            })
            .map_err(|e| Error::OutOfResources(format!("cannot start the {name} thread: {e}")))?;
        self.threads.push(thread);
        Ok(())
    }

    /// Keeps the lease of the claim `token` of `key` alive until the guard is dropped.
    /// `sent_ms`: when (monotonic ms) the request that made the claim was sent.
    pub fn hold(&self, key: &[u8], token: ClaimToken, sent_ms: u64) -> HeldLease<'_> {
        let claim = (key.to_vec(), token);
        self.shared.state.lock().held.insert(
            claim.clone(),
            Held {
                acked_sent_ms: sent_ms,
                lost: false,
            },
        );
        HeldLease {
            keeper: self,
            claim,
        }
    }

    /// Whether the claim `token` of `key`, held by this keeper, is still sure to hold the
    /// key for one more renewal period (`None`: not held here). Once not, never again.
    pub fn view(&self, key: &[u8], token: ClaimToken) -> Option<bool> {
        let now = self.shared.clock.monotonic_ms();
        let mut state = self.shared.state.lock();
        let held = state.held.get_mut(&(key.to_vec(), token))?;
        Some(self.shared.still_held(key, held, now))
    }

    /// The renewal period: how long a held claim is sure to last at least.
    pub fn renewal_period(&self) -> Duration {
        Duration::from_millis(self.shared.renew_after_ms)
    }

    /// Runs the maintainer's work now instead of at its next tick.
    pub fn wake(&self) {
        self.shared.maintainer.notify_all();
    }

    /// One round of both threads' work, for tests that drive time themselves.
    pub fn tick(&self, store: &dyn IdempotencyStore, now_ms: u64) {
        self.shared.renew_due(store, now_ms);
        self.shared.maintain(store, now_ms);
    }

    /// One round of the renewer's work only (a test whose housekeeping "takes" longer).
    pub fn renew_now(&self, store: &dyn IdempotencyStore, now_ms: u64) {
        self.shared.renew_due(store, now_ms);
    }
}

impl Shared {
    fn still_held(&self, key: &[u8], held: &mut Held, now_ms: u64) -> bool {
        let sure_until = held.acked_sent_ms.saturating_add(self.lease_ms);
        if !held.lost && now_ms.saturating_add(self.renew_after_ms) >= sure_until {
            held.lost = true;
            tracing::warn!(
                key = %super::display_key(key),
                "idempotency claim may have lapsed (no renewal acknowledged in time): no longer held"
            );
        }
        !held.lost
    }

    fn renew_due(&self, store: &dyn IdempotencyStore, now_ms: u64) {
        let sent_ms = self.clock.monotonic_ms();
        let mut due: Vec<(Vec<u8>, ClaimToken)> = Vec::new();
        for (claim, held) in self.state.lock().held.iter_mut() {
            // A lapsed view is noticed here too, so that its warning comes in time.
            self.still_held(&claim.0, held, sent_ms);
            if sent_ms.saturating_sub(held.acked_sent_ms) >= self.renew_after_ms {
                due.push(claim.clone());
            }
        }
        if due.is_empty() {
            return;
        }
        match store.renew(&due, now_ms) {
            Ok(lapsed) => {
                let mut state = self.state.lock();
                for claim in &due {
                    if let Some(held) = state.held.get_mut(claim) {
                        if lapsed.contains(claim) {
                            if !held.lost {
                                tracing::warn!(key = %super::display_key(&claim.0), "idempotency claim no longer the key's (taken over or released): no longer held");
                            }
                            held.lost = true;
                        } else {
                            held.acked_sent_ms = held.acked_sent_ms.max(sent_ms);
                        }
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

    fn maintain(&self, store: &dyn IdempotencyStore, now_ms: u64) {
        if let Err(failure) = store.maintain(now_ms) {
            tracing::warn!(reason = %failure.detail(), "idempotency store housekeeping failed");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.renewer.notify_all();
        self.shared.maintainer.notify_all();
        // Joined, so that nothing of the store (open files, a mount being unmounted) outlives
        // the keeper. The threads never own the keeper, so this never joins itself.
        for thread in self.threads.drain(..) {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
    use crate::idempotency::{fingerprint, Claim};

    const LEASE: Duration = Duration::from_secs(9);

    fn setup() -> (
        tempfile::TempDir,
        ManualClock,
        Arc<FileIdempotencyStore>,
        LeaseKeeper,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            FileIdempotencyStore::open(
                dir.path(),
                FileIdempotencySettings::new(LEASE, Duration::from_secs(60)),
            )
            .unwrap(),
        );
        let clock = ManualClock::new(1_000_000);
        // The threads find no store and end: the test alone drives the renewals.
        let none: Weak<dyn IdempotencyStore> = Weak::<FileIdempotencyStore>::new();
        let keeper = LeaseKeeper::start(none, Arc::new(clock.clone()), LEASE).unwrap();
        (dir, clock, store, keeper)
    }

    fn claim(store: &FileIdempotencyStore, clock: &ManualClock) -> ClaimToken {
        match store
            .claim(b"k", &fingerprint(b""), clock.unix_ms())
            .unwrap()
        {
            Claim::Acquired { token, .. } => token,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_claim_is_held_while_renewals_are_acknowledged() {
        let (_dir, clock, store, keeper) = setup();
        let token = claim(&store, &clock);
        let held = keeper.hold(b"k", token, clock.monotonic_ms());
        for _ in 0..10 {
            clock.advance(LEASE / 3);
            keeper.renew_now(store.as_ref(), clock.unix_ms());
            assert!(held.is_held());
        }
        assert_eq!(
            keeper.view(b"k", ClaimToken(token.0 + 1)),
            None,
            "not held here"
        );
        assert_eq!(keeper.view(b"other", token), None, "not held here");
    }

    /// Claims of different keys may share a token (on etcd, one transaction's revision):
    /// each is held, renewed, lost and let go on its own.
    #[test]
    fn claims_of_different_keys_sharing_a_token_are_held_apart() {
        let (_dir, clock, store, keeper) = setup();
        let token = claim(&store, &clock);
        let a = keeper.hold(b"k", token, clock.monotonic_ms());
        let b = keeper.hold(b"not-k", token, clock.monotonic_ms());
        // Renewed: the store holds "k" with this token, not "not-k".
        clock.advance(LEASE / 3);
        keeper.renew_now(store.as_ref(), clock.unix_ms());
        assert!(a.is_held());
        assert!(
            !b.is_held(),
            "the store says no claim of not-k has this token"
        );
        let c = keeper.hold(b"third", token, clock.monotonic_ms());
        drop(a);
        assert!(c.is_held(), "letting one go leaves the other held");
        assert_eq!(keeper.view(b"k", token), None);
        assert_eq!(keeper.view(b"third", token), Some(true));
        drop(c);
        assert_eq!(keeper.view(b"third", token), None);
        drop(b);
    }

    #[test]
    fn a_claim_whose_renewals_are_not_acknowledged_is_lost_one_period_before_it_could_lapse() {
        let (_dir, clock, store, keeper) = setup();
        let token = claim(&store, &clock);
        let held = keeper.hold(b"k", token, clock.monotonic_ms());
        // No renewal reaches the store (the process stalled, or the store is cut off).
        clock.advance(LEASE / 3);
        assert!(held.is_held());
        clock.advance(LEASE / 3 - Duration::from_millis(1));
        assert!(held.is_held(), "one period and 1 ms left");
        clock.advance(Duration::from_millis(1));
        assert!(!held.is_held(), "one period left: no longer sure");
        // The store would still hold it for a third of the lease.
        assert!(store.get(b"k", clock.unix_ms()).unwrap().is_some());
        // A renewal that succeeds now does not make it held again.
        keeper.renew_now(store.as_ref(), clock.unix_ms());
        assert!(!held.is_held(), "lost for good");
    }

    #[test]
    fn a_claim_taken_from_its_owner_is_lost_at_the_next_renewal() {
        let (_dir, clock, store, keeper) = setup();
        let token = claim(&store, &clock);
        let held = keeper.hold(b"k", token, clock.monotonic_ms());
        store.release(b"k", token).unwrap();
        clock.advance(LEASE / 3);
        keeper.renew_now(store.as_ref(), clock.unix_ms());
        assert!(!held.is_held());
    }

    /// What the renewer's own thread does: renewals go on, whatever the maintainer does.
    #[test]
    fn renewals_run_on_a_thread_of_their_own() {
        let (_dir, _clock, _store, keeper) = setup();
        assert_eq!(keeper.threads.len(), 2);
        let names: Vec<_> = keeper
            .threads
            .iter()
            .map(|t| t.thread().name().unwrap().to_string())
            .collect();
        assert_eq!(names, ["backup-idem-lease", "backup-idem-maint"]);
    }
}
