//! Group commit: callers that append at about the same time share one `fdatasync`.

use super::{FileStore, SyncPoint, MAX_GATHER};
use crate::durable::FileError;
use crate::error::Failure;
use parking_lot::MutexGuard;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl FileStore {
    /// Returns once everything up to `point` is durable, sharing fsyncs with other callers.
    ///
    /// Group commit: while one fsync is in flight the next records queue up. Before it
    /// starts its fsync, a leader waits (at most half of the last fsync's time) for the
    /// callers the previous fsync released to append their next records, and for callers
    /// in the middle of a transaction, so that one fsync covers them all. Alone, it waits
    /// for nobody.
    pub(super) fn wait_durable(&self, point: SyncPoint) -> Result<(), Failure> {
        let mut sync = self.sync.lock();
        loop {
            if let Some(failure) = &sync.failed {
                return Err(failure.clone());
            }
            // A newer generation was fsynced whole by the compaction that made it.
            if sync.generation != point.generation || sync.synced >= point.offset {
                return Ok(());
            }
            if sync.syncing {
                sync.waiters += 1;
                self.synced.wait(&mut sync);
                sync.waiters -= 1;
                continue;
            }
            sync.syncing = true;
            let deadline = Instant::now() + (sync.last_sync / 2).min(MAX_GATHER);
            while (sync.waiters + 1 < sync.released
                || self.in_transaction.load(Ordering::Acquire) > 0)
                && Instant::now() < deadline
            {
                MutexGuard::unlocked(&mut sync, std::thread::yield_now);
            }
            let (file, target, generation) = (sync.file.clone(), sync.written, sync.generation);
            let started = Instant::now();
            let result = MutexGuard::unlocked(&mut sync, || file.sync_data());
            sync.last_sync = started.elapsed();
            sync.released = sync.waiters + 1;
            sync.syncing = false;
            match result {
                Ok(()) if sync.generation == generation => sync.synced = sync.synced.max(target),
                Ok(()) => {}
                Err(e) => {
                    let failure: Failure = FileError::new("fsync", &self.journal_path, e).into();
                    sync.failed = Some(failure.context("; the idempotency store refuses further work until the plugin is restarted"));
                }
            }
            self.synced.notify_all();
        }
    }
}
