//! A live owner never loses its claim while its store handle does housekeeping
//! (docs/C_API.md §8.1): renewals run on a thread of their own. Before, one thread renewed
//! and compacted: with 1 M live keys a compaction took 1.01 s and a 1 s lease was taken
//! over by a rival while its owner's operation still ran. Here the housekeeping is made to
//! take 2.5 leases (a store whose `maintain` sleeps), in real time.

use backup_coordinator::clock::SystemClock;
use backup_coordinator::error::{Error, ErrorCode};
use backup_coordinator::idempotency::file_store::{FileIdempotencySettings, FileIdempotencyStore};
use backup_coordinator::idempotency::keyed::Keyed;
use backup_coordinator::idempotency::{
    fingerprint, Claim, ClaimId, ClaimToken, Completion, Fingerprint, Forgotten, IdempotencyStore,
    KeyRecord,
};
use backup_coordinator::retry::Execution;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LEASE: Duration = Duration::from_secs(1);

/// A file store whose housekeeping takes 2.5 leases each time it runs.
struct SlowMaintenance {
    store: FileIdempotencyStore,
    rounds: AtomicU32,
}

impl IdempotencyStore for SlowMaintenance {
    fn claim_as(&self, k: &[u8], fp: &Fingerprint, now: u64, id: ClaimId) -> Result<Claim, Error> {
        self.store.claim_as(k, fp, now, id)
    }
    fn renew(
        &self,
        c: &[(Vec<u8>, ClaimToken)],
        now: u64,
    ) -> Result<Vec<(Vec<u8>, ClaimToken)>, Error> {
        self.store.renew(c, now)
    }
    fn complete(
        &self,
        k: &[u8],
        t: ClaimToken,
        fp: &Fingerprint,
        r: i32,
        now: u64,
    ) -> Result<Completion, Error> {
        self.store.complete(k, t, fp, r, now)
    }
    fn release(&self, k: &[u8], t: ClaimToken) -> Result<(), Error> {
        self.store.release(k, t)
    }
    fn get(&self, k: &[u8], now: u64) -> Result<Option<KeyRecord>, Error> {
        self.store.get(k, now)
    }
    fn forget(&self, k: &[u8], now: u64) -> Result<Forgotten, Error> {
        self.store.forget(k, now)
    }
    fn maintain(&self, now: u64) -> Result<(), Error> {
        self.rounds.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(LEASE * 5 / 2);
        self.store.maintain(now)
    }
}

#[test]
fn a_live_owner_keeps_its_claim_while_its_own_handle_compacts_for_longer_than_a_lease() {
    let dir = tempfile::tempdir().unwrap();
    let settings = FileIdempotencySettings::new(LEASE, Duration::from_secs(60));
    let slow = Arc::new(SlowMaintenance {
        store: FileIdempotencyStore::open(dir.path(), settings).unwrap(),
        rounds: AtomicU32::new(0),
    });
    let owner = Keyed::new(slow.clone(), Arc::new(SystemClock), LEASE).unwrap();
    let rival = Keyed::new(
        Arc::new(FileIdempotencyStore::open(dir.path(), settings).unwrap()),
        Arc::new(SystemClock),
        LEASE,
    )
    .unwrap();
    let fp = fingerprint(b"block");
    let once = |claim: &mut dyn FnMut(u32) -> Result<(), Error>| Execution::once(claim(0));
    let out = owner.execute_fenced(&SystemClock, b"k", &fp, once, |token| {
        let started = Instant::now();
        // 4 leases of work, while the owner's handle housekeeps 2.5 leases at a time.
        while started.elapsed() < LEASE * 4 {
            let rival_try = rival.execute(&SystemClock, b"k", &fp, || Execution::once(Ok(())));
            assert_eq!(
                rival_try.result.unwrap_err().code(),
                ErrorCode::InProgress.raw(),
                "the rival took the key {:?} into the operation",
                started.elapsed()
            );
            assert_eq!(owner.check_claim(&SystemClock, b"k", token), Ok(()));
            std::thread::sleep(Duration::from_millis(100));
        }
        Execution::once(Ok(()))
    });
    assert_eq!(out.result, Ok(false), "ran, held throughout");
    assert!(
        slow.rounds.load(Ordering::SeqCst) >= 1,
        "housekeeping ran during the operation"
    );
}
