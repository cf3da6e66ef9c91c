//! Group commit: callers that append at about the same time share one `fdatasync`.

use super::{FileIdempotencyStore, SyncPoint, SyncState, MAX_GATHER};
use crate::durable::FileError;
use crate::error::{Error, Result};
use parking_lot::MutexGuard;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::{self, Thread};
use std::time::Instant;

/// A caller waiting for an fsync, parked on its own thread rather than on a condition
/// variable: the fsync's leader wakes each caller it covered with the answer, so that the
/// callers it releases run at once instead of taking the mutex one after the other.
pub(super) struct Sleeper {
    thread: Thread,
    point: SyncPoint,
    wake: Arc<AtomicU8>,
}

const ASLEEP: u8 = 0;
/// The fsync covered the caller's records: it returns without the mutex.
const DURABLE: u8 = 1;
/// The caller looks again under the mutex (an fsync failed, or it leads the next one).
const LOOK_AGAIN: u8 = 2;

impl SyncPoint {
    fn is_durable(&self, sync: &SyncState) -> bool {
        // A newer generation was fsynced whole by the compaction that made it.
        sync.generation != self.generation || sync.synced >= self.offset
    }
}

impl FileIdempotencyStore {
    /// Returns once everything up to `point` is durable, sharing fsyncs with other callers.
    ///
    /// Group commit: while one fsync is in flight the next records queue up. Before it
    /// starts its fsync, a leader waits (at most half of the last fsync's time, asleep) for
    /// the callers the previous fsync released to append their next records, and for
    /// callers in the middle of a transaction, so that one fsync covers them all. Alone, it
    /// waits for nobody.
    pub(super) fn wait_durable(&self, point: SyncPoint) -> Result<()> {
        let mut sync = self.sync.lock();
        // This caller has left its transaction: a gathering leader may be waiting for it.
        self.nudge_leader(&sync);
        loop {
            if let Some(failure) = &sync.failed {
                return Err(failure.clone());
            }
            if point.is_durable(&sync) {
                return Ok(());
            }
            if sync.syncing {
                let wake = Arc::new(AtomicU8::new(ASLEEP));
                sync.sleepers.push(Sleeper {
                    thread: thread::current(),
                    point,
                    wake: wake.clone(),
                });
                self.nudge_leader(&sync);
                drop(sync);
                let woken = loop {
                    match wake.load(Ordering::Acquire) {
                        ASLEEP => thread::park(),
                        woken => break woken,
                    }
                };
                if woken == DURABLE {
                    return Ok(());
                }
                sync = self.sync.lock();
                continue;
            }
            sync.syncing = true;
            sync.gathering = true;
            let deadline = Instant::now() + (sync.last_sync / 2).min(MAX_GATHER);
            while !self.all_joined(&sync) {
                if self.synced.wait_until(&mut sync, deadline).timed_out() {
                    break;
                }
            }
            sync.gathering = false;
            let (file, target, generation) = (sync.file.clone(), sync.written, sync.generation);
            let started = Instant::now();
            let result = MutexGuard::unlocked(&mut sync, || file.sync_data());
            sync.last_sync = started.elapsed();
            sync.syncing = false;
            match result {
                Ok(()) if sync.generation == generation => sync.synced = sync.synced.max(target),
                Ok(()) => {}
                Err(e) => {
                    let failure: Error = FileError::new("fsync", &self.journal_path, e).into();
                    sync.failed = Some(failure.context("; the idempotency store refuses further work until the plugin is restarted"));
                }
            }
            let woken = wake_sleepers(&mut sync);
            // The leader's own records were written before its fsync began.
            debug_assert!(sync.failed.is_some() || point.is_durable(&sync));
            let result = sync.failed.clone().map_or(Ok(()), Err);
            // Woken outside the mutex: their next appends need it at once.
            drop(sync);
            for thread in woken {
                thread.unpark();
            }
            return result;
        }
    }

    /// Whether every caller a leader expects has appended: those the last fsync released
    /// (most come back with their next record soon) and those mid-transaction.
    fn all_joined(&self, sync: &SyncState) -> bool {
        sync.sleepers.len() + 1 >= sync.released && self.in_transaction.load(Ordering::Acquire) == 0
    }

    /// Wakes a gathering leader once nobody is left to wait for.
    pub(super) fn nudge_leader(&self, sync: &SyncState) {
        if sync.gathering && self.all_joined(sync) {
            self.synced.notify_all();
        }
    }
}

/// After an fsync: tells the sleepers it covered, and one it did not to lead the next fsync
/// (the others sleep on, covered by that one), after a failure all of them, to report it;
/// the threads to unpark.
fn wake_sleepers(sync: &mut SyncState) -> Vec<Thread> {
    let sleepers = std::mem::take(&mut sync.sleepers);
    // The leader and every caller that waited: most come back soon with their next record.
    sync.released = sleepers.len() + 1;
    let mut leader_named = false;
    let mut woken_threads = Vec::with_capacity(sleepers.len());
    for sleeper in sleepers {
        let woken = if sync.failed.is_none() && sleeper.point.is_durable(sync) {
            DURABLE
        } else if sync.failed.is_some() || !leader_named {
            leader_named = true;
            LOOK_AGAIN
        } else {
            sync.sleepers.push(sleeper);
            continue;
        };
        sleeper.wake.store(woken, Ordering::Release);
        woken_threads.push(sleeper.thread);
    }
    woken_threads
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idempotency::{Claim, IdempotencyStore};
    use std::sync::atomic::AtomicBool;

    use super::super::test_support::settings;

    fn run_key(store: &FileIdempotencyStore, key: &str) {
        let Ok(Claim::Acquired { token, .. }) = store.claim(key.as_bytes(), &[3; 32], 10) else {
            panic!("{key} not acquired");
        };
        store
            .complete(key.as_bytes(), token, &[3; 32], 0, 10)
            .unwrap();
    }

    /// Threads of one handle pass the journal's lock on to each other; another handle
    /// (as another process would) still gets its turn, compacts under them, and no
    /// record of either is lost.
    #[test]
    fn busy_threads_of_one_handle_neither_starve_another_nor_lose_records() {
        let dir = tempfile::tempdir().unwrap();
        let busy = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        let other = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        let done = AtomicBool::new(false);
        let written: Vec<u32> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..6)
                .map(|t| {
                    let (busy, done) = (&busy, &done);
                    scope.spawn(move || {
                        let mut n = 0;
                        while !done.load(Ordering::Relaxed) {
                            run_key(busy, &format!("busy-{t}-{n}"));
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            for i in 0..60 {
                run_key(&other, &format!("other-{i}"));
                if i % 20 == 19 {
                    other.compact_now(10).unwrap();
                }
            }
            done.store(true, Ordering::Relaxed);
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(other.compactions() >= 3);
        drop((busy, other));
        let reopened = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        let keys = (0..60).map(|i| format!("other-{i}")).chain(
            written
                .iter()
                .enumerate()
                .flat_map(|(t, n)| (0..*n).map(move |n| format!("busy-{t}-{n}"))),
        );
        for key in keys {
            assert_eq!(
                reopened.claim(key.as_bytes(), &[3; 32], 11).unwrap(),
                Claim::Replay { result: 0 },
                "{key}"
            );
        }
    }
}
