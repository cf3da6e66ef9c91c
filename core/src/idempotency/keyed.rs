//! Runs an operation under an idempotency key: claim, keep the lease alive while it runs,
//! then record its success or release the key.

use super::lease::LeaseKeeper;
use super::{
    display_key, Claim, ClaimId, ClaimToken, Completion, Fingerprint, Forgotten, IdempotencyStore,
    KeyState, MAX_KEY_BYTES,
};
use crate::clock::Clock;
use crate::error::Error;
use crate::metrics::{store_failed, Family};
use crate::retry::{retry_store_access, Execution};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Counters of keyed executions since the store was opened.
#[derive(Debug, Default)]
pub struct KeyedMetrics {
    pub claims: AtomicU64,
    pub replays: AtomicU64,
    pub conflicts: AtomicU64,
    pub in_progress: AtomicU64,
    pub takeovers: AtomicU64,
    pub leases_lost: AtomicU64,
}

impl KeyedMetrics {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// (family name, help, value) of each counter, in a fixed order.
    pub fn snapshot(&self) -> [(&'static str, &'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            (
                "backup_idempotency_claims_total",
                "Keys claimed to run their operation.",
                get(&self.claims),
            ),
            (
                "backup_idempotency_replays_total",
                "Calls answered with a completed key's stored result.",
                get(&self.replays),
            ),
            (
                "backup_idempotency_conflicts_total",
                "Keys reused with a different fingerprint.",
                get(&self.conflicts),
            ),
            (
                "backup_idempotency_in_progress_total",
                "Calls refused because another caller runs the key.",
                get(&self.in_progress),
            ),
            (
                "backup_idempotency_takeovers_total",
                "Claims taken over from an owner whose lease ran out.",
                get(&self.takeovers),
            ),
            (
                "backup_idempotency_leases_lost_total",
                "Fenced operations that succeeded after their claim stopped being held.",
                get(&self.leases_lost),
            ),
        ]
    }

    /// The families of the idempotency keys, for the plugin's exposition: one counter each.
    pub fn families(&self) -> Vec<Family> {
        self.snapshot()
            .into_iter()
            .map(|(name, help, value)| Family::plain_counter(name, help, value))
            .collect()
    }
}

/// Whether the operation fences its effect with the claim's token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fencing {
    Fenced,
    Unfenced,
}

/// The outcome of one keyed call.
#[derive(Debug)]
pub struct KeyedExecution {
    /// `Ok(replayed)`: the operation succeeded now (`false`) or earlier (`true`).
    pub result: Result<bool, Error>,
    /// Retries the operation made in this call.
    pub retries: u32,
}

/// A key must be 1 to 255 bytes; any content.
pub fn check_key(key: &[u8]) -> Result<(), Error> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(Error::InvalidArgument(format!(
            "`key` must be 1 to {MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    Ok(())
}

/// Warns (in the diagnostics log) when a lease is shorter than three rounds of the store's
/// housekeeping could take (`estimate`). Renewals run on a thread of their own and never
/// wait for housekeeping, but a host loaded enough to take that long may stall them too.
pub fn warn_if_lease_is_short(lease: Duration, estimate: Duration) -> bool {
    let short = lease / 3 < estimate;
    if short {
        tracing::warn!(
            lease_ms = lease.as_millis() as u64,
            compaction_ms = estimate.as_millis() as u64,
            "idempotency_lease is shorter than three compactions of the idempotency store could \
             take: renewals never wait for one, but a host that loaded may stall them too; \
             consider a longer lease"
        );
    }
    short
}

pub struct Keyed {
    store: Arc<dyn IdempotencyStore>,
    keeper: LeaseKeeper,
    pub metrics: KeyedMetrics,
}

impl Keyed {
    pub fn new(
        store: Arc<dyn IdempotencyStore>,
        clock: Arc<dyn Clock>,
        lease: Duration,
    ) -> Result<Self, Error> {
        warn_if_lease_is_short(lease, store.maintenance_estimate());
        let keeper = LeaseKeeper::start(Arc::downgrade(&store), clock, lease)?;
        Ok(Keyed {
            store,
            keeper,
            metrics: KeyedMetrics::default(),
        })
    }

    pub fn store(&self) -> &dyn IdempotencyStore {
        self.store.as_ref()
    }

    pub fn keeper(&self) -> &LeaseKeeper {
        &self.keeper
    }

    /// Runs `run` (the operation under its retry policy) at most once for `key`: a
    /// completed key replays, a key another caller runs is refused, a reused key with
    /// another fingerprint conflicts. Nothing runs unless its claim is durable. A store
    /// that cannot be reached is tried once.
    pub fn execute(
        &self,
        clock: &dyn Clock,
        key: &[u8],
        fingerprint: &Fingerprint,
        run: impl FnOnce() -> Execution,
    ) -> KeyedExecution {
        self.execute_retrying_claim(
            clock,
            key,
            fingerprint,
            |claim| Execution::once(claim(0)),
            run,
        )
    }

    /// [`Self::execute`], the claim made through `retry` (the caller's policy): a store
    /// failure with a retryable code (an etcd cluster unreachable, an I/O error) is
    /// retried like an attempt of the operation, and the store's own failure is what the
    /// call gives up with, never a claim that was not acknowledged.
    pub fn execute_retrying_claim(
        &self,
        clock: &dyn Clock,
        key: &[u8],
        fingerprint: &Fingerprint,
        retry: impl FnOnce(&mut dyn FnMut(u32) -> Result<(), Error>) -> Execution,
        run: impl FnOnce() -> Execution,
    ) -> KeyedExecution {
        self.run_claimed(clock, key, fingerprint, retry, Fencing::Unfenced, |_| run())
    }

    /// [`Self::execute_retrying_claim`] for an operation that fences its effect
    /// (docs/C_API.md §8.1): `run` gets the claim's token, and a success that comes after
    /// the claim stopped being held (its renewals failed, the process stalled, another
    /// claim took the key) is BACKUP_ERROR_LEASE_LOST.
    pub fn execute_fenced(
        &self,
        clock: &dyn Clock,
        key: &[u8],
        fingerprint: &Fingerprint,
        retry: impl FnOnce(&mut dyn FnMut(u32) -> Result<(), Error>) -> Execution,
        run: impl FnOnce(ClaimToken) -> Execution,
    ) -> KeyedExecution {
        self.run_claimed(clock, key, fingerprint, retry, Fencing::Fenced, run)
    }

    fn run_claimed(
        &self,
        clock: &dyn Clock,
        key: &[u8],
        fingerprint: &Fingerprint,
        retry: impl FnOnce(&mut dyn FnMut(u32) -> Result<(), Error>) -> Execution,
        fencing: Fencing,
        run: impl FnOnce(ClaimToken) -> Execution,
    ) -> KeyedExecution {
        // The journal's format holds keys of this size only.
        if let Err(failure) = check_key(key) {
            return KeyedExecution {
                result: Err(failure),
                retries: 0,
            };
        }
        // One identity for every attempt of this call: a claim whose answer was lost is
        // found again as this call's own.
        let id = ClaimId::new();
        let (claimed, claim_retries) = retry_store_access(retry, "no claim was made", || {
            let sent_ms = clock.monotonic_ms();
            let now = clock.unix_ms();
            let claim = self
                .store
                .claim_as(key, fingerprint, now, id)
                .map_err(store_failed)?;
            Ok((claim, sent_ms))
        });
        let refused = |failure| KeyedExecution {
            result: Err(failure),
            retries: claim_retries,
        };
        let (claim, sent_ms) = match claimed {
            Ok(claimed) => claimed,
            Err(failure) => {
                self.store.abandon(key, id);
                return refused(failure);
            }
        };
        let shown = display_key(key);
        let token = match claim {
            Claim::Replay { result } => {
                KeyedMetrics::bump(&self.metrics.replays);
                tracing::debug!(key = %shown, "idempotency key completed earlier: replayed");
                let result = match result {
                    0 => Ok(true),
                    code => Err(Error::Host(code)),
                };
                return KeyedExecution { result, retries: 0 };
            }
            Claim::Conflict => {
                KeyedMetrics::bump(&self.metrics.conflicts);
                return refused(Error::Conflict(format!(
                    "key {shown} was used with another fingerprint"
                )));
            }
            Claim::InProgress => {
                KeyedMetrics::bump(&self.metrics.in_progress);
                return refused(Error::InProgress(format!(
                    "key {shown} is claimed by another caller whose lease has not run out"
                )));
            }
            Claim::Acquired { token, taken_over } => {
                KeyedMetrics::bump(&self.metrics.claims);
                if taken_over {
                    KeyedMetrics::bump(&self.metrics.takeovers);
                    tracing::warn!(key = %shown, "idempotency key taken over from an owner whose lease ran out");
                }
                token
            }
        };
        let held = self
            .keeper
            .hold(key, token, self.held_from(clock, key, token, sent_ms));
        let execution = run(token);
        // Judged when the operation returned, before the claim is let go.
        let still_held = held.is_held();
        drop(held);
        let result = self.settle(
            clock,
            key,
            fingerprint,
            fencing,
            token,
            still_held,
            &shown,
            execution.result,
        );
        if self.store.maintenance_due() {
            self.keeper.wake();
        }
        KeyedExecution {
            result,
            retries: claim_retries + execution.retries,
        }
    }

    /// When (monotonic ms) the lease of the claim sent at `sent_ms` is sure to start: then,
    /// or at the earlier renewal that vouched for it (a shared lease, etcd's session).
    fn held_from(&self, clock: &dyn Clock, key: &[u8], token: ClaimToken, sent_ms: u64) -> u64 {
        // Now is read first and the age rounded up: the start is never put later than it was.
        let now_ms = clock.monotonic_ms();
        match self.store.vouched_ago(key, token) {
            Some(ago) => {
                let ago_ms = u64::try_from(ago.as_millis()).unwrap_or(u64::MAX);
                sent_ms.min(now_ms.saturating_sub(ago_ms.saturating_add(1)))
            }
            None => sent_ms,
        }
    }

    /// What the call returns once its operation returned `result` under the claim `token`
    /// (`still_held`: whether the claim was held when it returned): a success is recorded as
    /// the key's completion, and says LEASE_LOST when fenced and the claim was not held;
    /// a failure lets the claim go.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        clock: &dyn Clock,
        key: &[u8],
        fingerprint: &Fingerprint,
        fencing: Fencing,
        token: ClaimToken,
        still_held: bool,
        shown: &str,
        result: Result<(), Error>,
    ) -> Result<bool, Error> {
        match result {
            // The operation ran and succeeded: that stands, whoever holds the key now.
            Ok(()) => match self
                .store
                .complete(key, token, fingerprint, 0, clock.unix_ms())
            {
                Ok(completion) if fencing == Fencing::Fenced && !still_held => {
                    KeyedMetrics::bump(&self.metrics.leases_lost);
                    let recorded = match completion {
                        Completion::Recorded => "its completion is recorded",
                        Completion::Superseded => "another claim has the key now",
                    };
                    Err(Error::LeaseLost(format!(
                        "the operation of key {shown} succeeded after its claim (token {}) \
                         stopped being held (lease renewals failed or the process stalled; \
                         {recorded}): its effect may have been applied late and must be fenced \
                         downstream by the token",
                        token.0
                    )))
                }
                Ok(Completion::Recorded) => Ok(false),
                Ok(Completion::Superseded) => {
                    tracing::warn!(key = %shown, "idempotent operation succeeded after its lease ran out and another caller took the key: its completion is not recorded over that caller's");
                    Ok(false)
                }
                Err(failure) => {
                    let failure = store_failed(failure);
                    let failure = Error::NotRecorded {
                        key: shown.to_string(),
                        source: Box::new(failure),
                    };
                    tracing::error!(reason = %failure, "idempotent completion lost");
                    if fencing == Fencing::Fenced && !still_held {
                        // What the caller must act on first: the claim was lost.
                        KeyedMetrics::bump(&self.metrics.leases_lost);
                        Err(Error::LeaseLost(format!(
                            "the operation of key {shown} succeeded after its claim (token {}) \
                             stopped being held: its effect may have been applied late and must \
                             be fenced downstream by the token; {failure}",
                            token.0
                        )))
                    } else {
                        Err(failure)
                    }
                }
            },
            Err(failure) => {
                if let Err(release) = self.store.release(key, token).map_err(store_failed) {
                    tracing::warn!(key = %shown, reason = %release.detail(), "claim not released; it ends with its lease");
                }
                Err(failure)
            }
        }
    }

    /// Whether the claim `token` may still commit the effect of `key`'s operation
    /// (docs/C_API.md §8.1): Ok while that claim holds the key and its lease is sure to
    /// last one more renewal period; LEASE_LOST when it may have lapsed or another claim
    /// took over; IDEMPOTENCY_CONFLICT when another claim completed the key.
    pub fn check_claim(
        &self,
        clock: &dyn Clock,
        key: &[u8],
        token: ClaimToken,
    ) -> Result<(), Error> {
        check_key(key)?;
        let shown = display_key(key);
        let lost = |why: &str| {
            Err(Error::LeaseLost(format!(
                "the claim of key {shown} with token {} {why}",
                token.0
            )))
        };
        // This process's own claim: its lease as seen on the monotonic clock.
        let view = self.keeper.view(key, token);
        let now = clock.unix_ms();
        let record = match self.store.get(key, now).map_err(store_failed) {
            Ok(record) => record,
            // Lost whatever the store would say; one that does not answer says nothing.
            Err(_) if view == Some(false) => None,
            Err(failure) => return Err(failure),
        };
        let state = record.map(|r| r.state);
        if view == Some(false)
            && !matches!(state, Some(KeyState::Completed { token: done, .. }) if done != token)
        {
            return lost("may have lapsed: no renewal was acknowledged in time");
        }
        match state {
            Some(KeyState::Claimed {
                token: current,
                lease_until_ms,
            }) if current == token => {
                // Another process's claim: judged by the lease the store recorded.
                let margin = self.keeper.renewal_period().as_millis() as u64;
                if view.is_some() || lease_until_ms.saturating_sub(now) > margin {
                    Ok(())
                } else {
                    lost("may lapse before its next renewal")
                }
            }
            Some(KeyState::Claimed { .. }) => lost("was taken over by a newer claim"),
            // Nothing newer can exist while this claim's completion stands.
            Some(KeyState::Completed { token: done, .. }) if done == token => Ok(()),
            Some(KeyState::Completed { .. }) => Err(Error::Conflict(format!(
                "key {shown} was completed by another claim than token {}",
                token.0
            ))),
            None => lost("no longer holds the key (released, expired or forgotten)"),
        }
    }

    /// Drops a completed key so that its operation may run again.
    pub fn forget(&self, clock: &dyn Clock, key: &[u8]) -> Result<(), Error> {
        check_key(key)?;
        match self
            .store
            .forget(key, clock.unix_ms())
            .map_err(store_failed)?
        {
            Forgotten::Removed | Forgotten::Absent => Ok(()),
            Forgotten::InProgress => Err(Error::InProgress(format!(
                "key {} is being run by a live owner; not forgotten",
                display_key(key)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::error::ErrorCode;
    use crate::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
    use crate::idempotency::{fingerprint, KeyRecord};
    use std::cell::Cell;

    const LEASE: Duration = Duration::from_secs(90);

    /// A file store whose claim or completion can be made to fail.
    struct Flaky {
        inner: FileIdempotencyStore,
        fail_claim: Option<ErrorCode>,
        fail_complete: Option<ErrorCode>,
        /// Claims that fail as an unreachable etcd cluster does, before they succeed.
        unreachable_claims: AtomicU64,
        /// The identity of each claim attempt, and of each call that gave up.
        attempts: parking_lot::Mutex<Vec<ClaimId>>,
        abandoned: parking_lot::Mutex<Vec<ClaimId>>,
    }

    impl IdempotencyStore for Flaky {
        fn claim_as(
            &self,
            key: &[u8],
            fp: &Fingerprint,
            now: u64,
            id: ClaimId,
        ) -> Result<Claim, Error> {
            self.attempts.lock().push(id);
            let unreachable = self.unreachable_claims.load(Ordering::SeqCst);
            if unreachable > 0 {
                self.unreachable_claims
                    .store(unreachable - 1, Ordering::SeqCst);
                return Err(Error::Etcd {
                    kind: ErrorCode::Network,
                    detail: "no endpoint answered".into(),
                });
            }
            match self.fail_claim {
                Some(code) => Err(Error::Host(code.raw())),
                None => self.inner.claim_as(key, fp, now, id),
            }
        }
        fn renew(
            &self,
            claims: &[(Vec<u8>, ClaimToken)],
            now: u64,
        ) -> Result<Vec<(Vec<u8>, ClaimToken)>, Error> {
            self.inner.renew(claims, now)
        }
        fn complete(
            &self,
            key: &[u8],
            token: ClaimToken,
            fp: &Fingerprint,
            result: i32,
            now: u64,
        ) -> Result<Completion, Error> {
            match self.fail_complete {
                Some(code) => Err(Error::Host(code.raw())),
                None => self.inner.complete(key, token, fp, result, now),
            }
        }
        fn release(&self, key: &[u8], token: ClaimToken) -> Result<(), Error> {
            self.inner.release(key, token)
        }
        fn get(&self, key: &[u8], now: u64) -> Result<Option<KeyRecord>, Error> {
            self.inner.get(key, now)
        }
        fn forget(&self, key: &[u8], now: u64) -> Result<Forgotten, Error> {
            self.inner.forget(key, now)
        }
        fn abandon(&self, _key: &[u8], id: ClaimId) {
            self.abandoned.lock().push(id);
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        clock: ManualClock,
        store: Arc<Flaky>,
        keyed: Keyed,
    }

    fn setup(fail_claim: Option<ErrorCode>, fail_complete: Option<ErrorCode>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let settings = FileIdempotencySettings::new(LEASE, Duration::from_secs(3600));
        let store = Arc::new(Flaky {
            inner: FileIdempotencyStore::open(dir.path(), settings).unwrap(),
            fail_claim,
            fail_complete,
            unreachable_claims: AtomicU64::new(0),
            attempts: Default::default(),
            abandoned: Default::default(),
        });
        let clock = ManualClock::new(1_000_000);
        let keyed = Keyed::new(store.clone(), Arc::new(clock.clone()), LEASE).unwrap();
        Setup {
            _dir: dir,
            clock,
            store,
            keyed,
        }
    }

    fn succeed(runs: &Cell<u32>) -> impl FnOnce() -> Execution + '_ {
        move || {
            runs.set(runs.get() + 1);
            Execution {
                result: Ok(()),
                retries: 2,
                last_failure: None,
            }
        }
    }

    fn counters(keyed: &Keyed) -> Vec<u64> {
        keyed.metrics.snapshot().iter().map(|c| c.2).collect()
    }

    #[test]
    fn runs_once_then_replays_and_conflicts() {
        let s = setup(None, None);
        let runs = Cell::new(0);
        let fp = fingerprint(b"payload");
        let first = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert!(!first.result.unwrap(), "ran now, not replayed");
        assert_eq!(first.retries, 2);
        let again = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert_eq!((again.result.unwrap(), again.retries), (true, 0));
        let other = s
            .keyed
            .execute(&s.clock, b"k", &fingerprint(b"else"), succeed(&runs));
        let err = other.result.unwrap_err();
        assert_eq!(err.code(), ErrorCode::IdempotencyConflict.raw());
        assert!(err.detail().contains("\"k\""), "{}", err.detail());
        assert_eq!(runs.get(), 1);
        // claims, replays, conflicts, in_progress, takeovers, leases lost
        assert_eq!(counters(&s.keyed), [1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn a_failed_operation_releases_its_key() {
        let s = setup(None, None);
        let fp = fingerprint(b"");
        let failed = s.keyed.execute(&s.clock, b"k", &fp, || Execution {
            result: Err(Error::Host(ErrorCode::RetryExhausted.raw())),
            retries: 3,
            last_failure: None,
        });
        assert_eq!(
            failed.result.unwrap_err().code(),
            ErrorCode::RetryExhausted.raw()
        );
        let runs = Cell::new(0);
        let retried = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert!(!retried.result.unwrap(), "ran now, not replayed");
        assert_eq!(runs.get(), 1);
    }

    #[test]
    fn a_claim_that_cannot_be_recorded_runs_nothing() {
        let s = setup(Some(ErrorCode::DiskFull), None);
        let runs = Cell::new(0);
        let out = s
            .keyed
            .execute(&s.clock, b"k", &fingerprint(b""), succeed(&runs));
        assert_eq!(out.result.unwrap_err().code(), ErrorCode::DiskFull.raw());
        assert_eq!(runs.get(), 0);
    }

    #[test]
    fn an_unreachable_store_is_retried_through_the_policy_before_anything_runs() {
        let runs = Cell::new(0);
        let fp = fingerprint(b"");
        // One call whose claim is retried at most 3 times.
        let call = |s: &Setup, key: &[u8]| {
            s.keyed.execute_retrying_claim(
                &s.clock,
                key,
                &fp,
                crate::retry::retrying_on(&s.clock, 3),
                succeed(&runs),
            )
        };
        let s = setup(None, None);
        let unreachable = |n| s.store.unreachable_claims.store(n, Ordering::SeqCst);

        // Two failed claims, then the cluster answers: the key runs once, 2 + 2 retries.
        unreachable(2);
        let out = call(&s, b"k");
        assert!(!out.result.unwrap(), "ran now");
        assert_eq!((out.retries, runs.get()), (2 + 2, 1));

        // Unreachable past the policy: nothing runs, and the call gives up with the
        // store's own code, its retries counted and said.
        unreachable(10);
        let out = call(&s, b"other");
        assert_eq!(out.retries, 3);
        let err = out.result.unwrap_err();
        assert_eq!(err.code(), ErrorCode::Network.raw(), "{}", err.detail());
        assert!(
            err.detail().contains("no claim was made: 3 retries failed"),
            "{}",
            err.detail()
        );
        assert_eq!(runs.get(), 1, "nothing ran without a claim");
        // One identity for every attempt of a call, and a call that gave up lets it go.
        let attempts = s.store.attempts.lock().clone();
        let (first, second) = attempts.split_at(3);
        assert!(first.iter().all(|id| *id == first[0]), "{attempts:?}");
        assert!(second.iter().all(|id| *id == second[0]) && second[0] != first[0]);
        assert_eq!(*s.store.abandoned.lock(), [second[0]]);

        // A permanent store failure is not retried.
        let out = call(&setup(Some(ErrorCode::DiskFull), None), b"k");
        assert_eq!(out.result.unwrap_err().code(), ErrorCode::DiskFull.raw());
        assert_eq!((out.retries, runs.get()), (0, 1));
    }

    #[test]
    fn a_lost_completion_says_the_operation_ran_and_keeps_the_key_claimed() {
        let s = setup(None, Some(ErrorCode::FileIo));
        let runs = Cell::new(0);
        let fp = fingerprint(b"");
        let err = s
            .keyed
            .execute(&s.clock, b"k", &fp, succeed(&runs))
            .result
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::FileIo.raw());
        assert!(
            err.detail()
                .contains("ran, but its completion was not recorded"),
            "{}",
            err.detail()
        );
        assert_eq!(runs.get(), 1);
        let again = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert_eq!(
            again.result.unwrap_err().code(),
            ErrorCode::InProgress.raw()
        );
        // Until the lease runs out: then it is taken over.
        s.clock.advance(LEASE);
        let taken = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert_eq!(taken.result.unwrap_err().code(), ErrorCode::FileIo.raw());
        assert_eq!(runs.get(), 2);
        assert_eq!(counters(&s.keyed), [2, 0, 0, 1, 1, 0]);
    }

    #[test]
    fn the_lease_is_renewed_while_the_operation_runs() {
        let s = setup(None, None);
        let fp = fingerprint(b"");
        let runs = Cell::new(0);
        let out = s.keyed.execute(&s.clock, b"slow", &fp, || {
            // Three leases pass while the operation runs; the keeper renews as time goes.
            for _ in 0..9 {
                s.clock.advance(LEASE / 3);
                s.keyed.keeper().tick(s.keyed.store(), s.clock.unix_ms());
                let rival = s.keyed.execute(&s.clock, b"slow", &fp, succeed(&runs));
                assert_eq!(
                    rival.result.unwrap_err().code(),
                    ErrorCode::InProgress.raw()
                );
            }
            Execution {
                result: Ok(()),
                retries: 0,
                last_failure: None,
            }
        });
        assert!(!out.result.unwrap(), "ran now, not replayed");
        assert_eq!(runs.get(), 0, "no rival ran it");
        assert_eq!(counters(&s.keyed)[4], 0, "never taken over");
    }

    /// A second caller ("process B") on the same directory, with its own store handle.
    fn rival(s: &Setup, dir: &std::path::Path) -> Keyed {
        let settings = FileIdempotencySettings::new(LEASE, Duration::from_secs(3600));
        let store = FileIdempotencyStore::open(dir, settings).unwrap();
        Keyed::new(Arc::new(store), Arc::new(s.clock.clone()), LEASE).unwrap()
    }

    fn fail_with(code: ErrorCode) -> impl FnOnce() -> Execution {
        move || Execution {
            result: Err(Error::Host(code.raw())),
            retries: 0,
            last_failure: None,
        }
    }

    #[test]
    fn a_stalled_owner_whose_op_succeeded_records_its_own_fingerprint_when_the_key_is_free() {
        let s = setup(None, None);
        let b = rival(&s, s._dir.path());
        let fp = fingerprint(b"payload");
        let runs = Cell::new(0);
        // A claims, then stalls past its lease; B takes over, fails and releases.
        let a = s.keyed.execute(&s.clock, b"k", &fp, || {
            s.clock.advance(LEASE + Duration::from_secs(1));
            let taken = b.execute(&s.clock, b"k", &fp, fail_with(ErrorCode::FileIo));
            assert_eq!(taken.result.unwrap_err().code(), ErrorCode::FileIo.raw());
            assert_eq!(b.metrics.takeovers.load(Ordering::Relaxed), 1);
            succeed(&runs)()
        });
        assert!(!a.result.unwrap(), "A's operation ran and succeeded");
        // The same payload replays (never a conflict); another payload conflicts.
        let again = b.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert!(again.result.unwrap(), "replayed");
        let other = b.execute(&s.clock, b"k", &fingerprint(b"else"), succeed(&runs));
        assert_eq!(
            other.result.unwrap_err().code(),
            ErrorCode::IdempotencyConflict.raw()
        );
        assert_eq!(runs.get(), 1);
    }

    #[test]
    fn a_stalled_owner_returns_its_success_and_never_overwrites_a_live_taker() {
        let s = setup(None, None);
        let b = rival(&s, s._dir.path());
        let third = rival(&s, s._dir.path());
        let fp = fingerprint(b"payload");
        let runs = Cell::new(0);
        let b_runs = Cell::new(0);
        let b_result = std::cell::RefCell::new(None);
        let a = s.keyed.execute(&s.clock, b"k", &fp, || {
            s.clock.advance(LEASE + Duration::from_secs(1));
            // B takes the key over, and is still running when A resumes and finishes.
            let b_out = b.execute(&s.clock, b"k", &fp, || {
                let a_done = succeed(&runs)();
                // A third caller meanwhile is refused: B's claim is live.
                let meanwhile = third.execute(&s.clock, b"k", &fp, succeed(&runs));
                assert_eq!(
                    meanwhile.result.unwrap_err().code(),
                    ErrorCode::InProgress.raw()
                );
                b_runs.set(1);
                *b_result.borrow_mut() = Some(a_done);
                Execution {
                    result: Ok(()),
                    retries: 0,
                    last_failure: None,
                }
            });
            assert!(!b_out.result.unwrap());
            b_result.borrow_mut().take().unwrap()
        });
        // A's operation succeeded: A returns that success, not IN_PROGRESS.
        assert!(!a.result.unwrap(), "A's success stands");
        assert_eq!((runs.get(), b_runs.get()), (1, 1));
        let again = third.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert!(again.result.unwrap(), "the same payload replays");
    }

    #[test]
    fn one_threads_release_never_frees_another_threads_takeover() {
        let s = setup(None, None);
        let fp = fingerprint(b"");
        let runs = Cell::new(0);
        // Both claims are made through the same handle (two threads of one process).
        let first = s.keyed.execute(&s.clock, b"k", &fp, || {
            s.clock.advance(LEASE);
            let second = s.keyed.execute(&s.clock, b"k", &fp, || {
                // The first caller fails late and releases: the second's claim must stay.
                let rival_now = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
                assert_eq!(
                    rival_now.result.unwrap_err().code(),
                    ErrorCode::InProgress.raw()
                );
                succeed(&runs)()
            });
            assert!(!second.result.unwrap());
            fail_with(ErrorCode::Network)()
        });
        assert_eq!(first.result.unwrap_err().code(), ErrorCode::Network.raw());
        let again = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert!(again.result.unwrap(), "the taker's completion stands");
        assert_eq!(runs.get(), 1);
    }

    fn ok() -> Execution {
        Execution {
            result: Ok(()),
            retries: 0,
            last_failure: None,
        }
    }

    fn fenced(
        keyed: &Keyed,
        clock: &ManualClock,
        key: &[u8],
        run: impl FnOnce(ClaimToken) -> Execution,
    ) -> KeyedExecution {
        keyed.execute_fenced(
            clock,
            key,
            &fingerprint(b"p"),
            |claim| Execution::once(claim(0)),
            run,
        )
    }

    #[test]
    fn every_claim_of_a_key_gets_a_greater_token_whatever_happened_between() {
        let s = setup(None, None);
        let b = rival(&s, s._dir.path());
        let tokens = std::cell::RefCell::new(Vec::new());
        let note = |t: ClaimToken| tokens.borrow_mut().push(t.0);
        // A failure (released), a success, forget, another handle (process), a takeover.
        fenced(&s.keyed, &s.clock, b"k", |t| {
            note(t);
            fail_with(ErrorCode::Network)()
        });
        fenced(&s.keyed, &s.clock, b"k", |t| {
            note(t);
            ok()
        });
        s.keyed.forget(&s.clock, b"k").unwrap();
        fenced(&b, &s.clock, b"k", |t| {
            note(t);
            s.clock.advance(LEASE + Duration::from_secs(1));
            // Taken over from the stalled first handle's claim.
            fenced(&s.keyed, &s.clock, b"k", |t| {
                note(t);
                ok()
            });
            ok()
        });
        // The clock stepped back; a reopened store (a restart) continues above.
        s.clock.set_unix_ms(1);
        s.keyed.forget(&s.clock, b"k").unwrap();
        let reopened = rival(&s, s._dir.path());
        fenced(&reopened, &s.clock, b"k", |t| {
            note(t);
            ok()
        });
        let tokens = tokens.into_inner();
        assert_eq!(tokens.len(), 5);
        assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
        assert!(tokens[0] > 0);
    }

    #[test]
    fn a_fenced_success_after_the_claim_stopped_being_held_is_lease_lost() {
        let s = setup(None, None);
        let b = rival(&s, s._dir.path());
        let runs = Cell::new(0);
        let out = fenced(&s.keyed, &s.clock, b"k", |mine| {
            assert_eq!(s.keyed.check_claim(&s.clock, b"k", mine), Ok(()));
            // Stalled past its lease; B takes over and completes.
            s.clock.advance(LEASE + Duration::from_secs(1));
            let lost = s.keyed.check_claim(&s.clock, b"k", mine).unwrap_err();
            assert_eq!(lost.code(), ErrorCode::LeaseLost.raw());
            let taken = fenced(&b, &s.clock, b"k", |theirs| {
                assert!(theirs > mine);
                assert_eq!(b.check_claim(&s.clock, b"k", theirs), Ok(()));
                runs.set(runs.get() + 1);
                ok()
            });
            assert!(!taken.result.unwrap());
            let err = s.keyed.check_claim(&s.clock, b"k", mine).unwrap_err();
            assert_eq!(err.code(), ErrorCode::IdempotencyConflict.raw());
            ok()
        });
        let err = out.result.unwrap_err();
        assert_eq!(err.code(), ErrorCode::LeaseLost.raw());
        assert!(err.detail().contains("must be fenced"), "{}", err.detail());
        assert_eq!(runs.get(), 1);
        assert_eq!(counters(&s.keyed)[5], 1, "counted");
        // The unfenced call keeps its answer (§8): the stalled owner's success.
        let unfenced = s.keyed.execute(&s.clock, b"u", &fingerprint(b"p"), || {
            s.clock.advance(LEASE + Duration::from_secs(1));
            ok()
        });
        assert!(!unfenced.result.unwrap());
    }

    /// A store whose renewals never reach it (cut off from etcd, say); `.1`: what it says of
    /// the renewal that vouched for a claim (etcd's session renewed before the claim).
    struct Unrenewable(FileIdempotencyStore, Option<Duration>);

    impl IdempotencyStore for Unrenewable {
        fn vouched_ago(&self, _: &[u8], _: ClaimToken) -> Option<Duration> {
            self.1
        }
        fn claim_as(
            &self,
            key: &[u8],
            fp: &Fingerprint,
            now: u64,
            id: ClaimId,
        ) -> Result<Claim, Error> {
            self.0.claim_as(key, fp, now, id)
        }
        fn renew(
            &self,
            _: &[(Vec<u8>, ClaimToken)],
            _: u64,
        ) -> Result<Vec<(Vec<u8>, ClaimToken)>, Error> {
            Err(Error::Etcd {
                kind: ErrorCode::ConnectionLost,
                detail: "cut off".into(),
            })
        }
        fn complete(
            &self,
            key: &[u8],
            token: ClaimToken,
            fp: &Fingerprint,
            result: i32,
            now: u64,
        ) -> Result<Completion, Error> {
            self.0.complete(key, token, fp, result, now)
        }
        fn release(&self, key: &[u8], token: ClaimToken) -> Result<(), Error> {
            self.0.release(key, token)
        }
        fn get(&self, key: &[u8], now: u64) -> Result<Option<KeyRecord>, Error> {
            self.0.get(key, now)
        }
        fn forget(&self, key: &[u8], now: u64) -> Result<Forgotten, Error> {
            self.0.forget(key, now)
        }
    }

    #[test]
    fn failed_renewals_make_the_claim_lost_before_the_store_could_expire_it() {
        let dir = tempfile::tempdir().unwrap();
        let settings = FileIdempotencySettings::new(LEASE, Duration::from_secs(3600));
        let store = Arc::new(Unrenewable(
            FileIdempotencyStore::open(dir.path(), settings).unwrap(),
            None,
        ));
        let clock = ManualClock::new(1_000_000);
        let keyed = Keyed::new(store.clone(), Arc::new(clock.clone()), LEASE).unwrap();
        let out = fenced(&keyed, &clock, b"k", |mine| {
            for _ in 0..2 {
                clock.advance(LEASE / 3);
                keyed.keeper().tick(keyed.store(), clock.unix_ms());
            }
            // Two thirds of the lease without an acknowledged renewal: no longer sure.
            let err = keyed.check_claim(&clock, b"k", mine).unwrap_err();
            assert_eq!(err.code(), ErrorCode::LeaseLost.raw());
            // The store itself still holds it for a third of the lease: no one took over.
            assert!(store.get(b"k", clock.unix_ms()).unwrap().is_some());
            ok()
        });
        assert_eq!(out.result.unwrap_err().code(), ErrorCode::LeaseLost.raw());
        // The effect ran and nobody else claimed: its completion is recorded and replays.
        let again = keyed.execute(&clock, b"k", &fingerprint(b"p"), ok);
        assert!(again.result.unwrap(), "replayed");
    }

    #[test]
    fn a_claim_vouched_for_by_an_earlier_renewal_is_held_from_that_renewal() {
        for (vouched_ago, held_after_a_period) in [(None, true), (Some(LEASE / 3), false)] {
            let dir = tempfile::tempdir().unwrap();
            let settings = FileIdempotencySettings::new(LEASE, Duration::from_secs(3600));
            let store = Unrenewable(
                FileIdempotencyStore::open(dir.path(), settings).unwrap(),
                vouched_ago,
            );
            let clock = ManualClock::new(1_000_000);
            let keyed = Keyed::new(Arc::new(store), Arc::new(clock.clone()), LEASE).unwrap();
            fenced(&keyed, &clock, b"k", |mine| {
                assert_eq!(
                    keyed.check_claim(&clock, b"k", mine),
                    Ok(()),
                    "{vouched_ago:?}"
                );
                // A period later with no renewal: from the claim's sending a third of the
                // lease went by; from a renewal a period older, two thirds.
                clock.advance(LEASE / 3);
                let check = keyed.check_claim(&clock, b"k", mine);
                assert_eq!(check.is_ok(), held_after_a_period, "{vouched_ago:?}");
                ok()
            });
        }
    }

    #[test]
    fn check_claim_answers_for_claims_of_other_processes_and_finished_claims() {
        let s = setup(None, None);
        let b = rival(&s, s._dir.path());
        let token = Cell::new(ClaimToken(0));
        fenced(&b, &s.clock, b"k", |theirs| {
            token.set(theirs);
            // Another process's live claim: judged by the lease its store recorded.
            assert_eq!(s.keyed.check_claim(&s.clock, b"k", theirs), Ok(()));
            let wrong = s
                .keyed
                .check_claim(&s.clock, b"k", ClaimToken(theirs.0 - 1));
            assert_eq!(wrong.unwrap_err().code(), ErrorCode::LeaseLost.raw());
            s.clock.advance(LEASE - LEASE / 3);
            let lapsing = s.keyed.check_claim(&s.clock, b"k", theirs).unwrap_err();
            assert_eq!(lapsing.code(), ErrorCode::LeaseLost.raw());
            ok()
        });
        // Completed by this very claim: nothing newer can exist while that stands.
        assert_eq!(s.keyed.check_claim(&s.clock, b"k", token.get()), Ok(()));
        s.keyed.forget(&s.clock, b"k").unwrap();
        let gone = s
            .keyed
            .check_claim(&s.clock, b"k", token.get())
            .unwrap_err();
        assert_eq!(gone.code(), ErrorCode::LeaseLost.raw());
        let bad = s.keyed.check_claim(&s.clock, b"", token.get()).unwrap_err();
        assert_eq!(bad.code(), ErrorCode::InvalidParam.raw());
    }

    #[test]
    fn a_lease_shorter_than_three_compactions_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("idempotency").join("journal");
        std::fs::create_dir_all(journal.parent().unwrap()).unwrap();
        // A journal of about a million keys (sparse: its size is what counts).
        std::fs::File::create(&journal)
            .unwrap()
            .set_len(90_000_000)
            .unwrap();
        let estimate = FileIdempotencyStore::maintenance_estimate_at(dir.path());
        assert_eq!(estimate, Duration::from_secs(1));
        assert!(warn_if_lease_is_short(Duration::from_secs(2), estimate));
        assert!(!warn_if_lease_is_short(Duration::from_secs(3), estimate));
        assert_eq!(
            FileIdempotencyStore::maintenance_estimate_at(&dir.path().join("none")),
            Duration::ZERO
        );
    }

    #[test]
    fn forget_lets_a_key_run_again_but_not_while_it_runs() {
        let s = setup(None, None);
        let fp = fingerprint(b"");
        let runs = Cell::new(0);
        s.keyed.execute(&s.clock, b"k", &fp, || {
            let err = s.keyed.forget(&s.clock, b"k").unwrap_err();
            assert_eq!(err.code(), ErrorCode::InProgress.raw());
            succeed(&runs)()
        });
        s.keyed.forget(&s.clock, b"k").unwrap();
        s.keyed.forget(&s.clock, b"never stored").unwrap();
        let again = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert!(!again.result.unwrap(), "ran now, not replayed");
        assert_eq!(runs.get(), 2);
    }

    #[test]
    fn keys_are_1_to_255_bytes() {
        let s = setup(None, None);
        let runs = Cell::new(0);
        let long = [b'k'; 256];
        let out = s
            .keyed
            .execute(&s.clock, &long, &fingerprint(b""), succeed(&runs));
        assert_eq!(
            out.result.unwrap_err().code(),
            ErrorCode::InvalidParam.raw()
        );
        assert_eq!(
            s.keyed.forget(&s.clock, b"").unwrap_err().code(),
            ErrorCode::InvalidParam.raw()
        );
        assert_eq!(runs.get(), 0);
        assert!(check_key(b"").is_err());
        assert!(check_key(&[0xff; 255]).is_ok());
        let err = check_key(&[b'k'; 256]).unwrap_err();
        assert!(
            err.detail().contains("`key`") && err.detail().contains("256"),
            "{}",
            err.detail()
        );
    }

    #[test]
    fn store_failures_are_counted_by_code_in_the_state_store_metrics() {
        // TIMEOUT and CONNECTION_LOST: codes no other unit test's store fails with, since
        // the state-store counters are process-wide.
        let errors = &crate::metrics::store().errors;
        let (timeouts, lost) = (errors.get(-7), errors.get(-11));
        let runs = Cell::new(0);
        let fp = fingerprint(b"p");
        let s = setup(Some(ErrorCode::Timeout), None);
        let out = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert_eq!(out.result.unwrap_err().code(), -7);
        let s = setup(None, Some(ErrorCode::ConnectionLost));
        let out = s.keyed.execute(&s.clock, b"k", &fp, succeed(&runs));
        assert_eq!(out.result.unwrap_err().code(), -11);
        assert!(errors.get(-7) > timeouts, "a failed claim is counted");
        assert!(errors.get(-11) > lost, "a failed completion is counted");
    }
}
