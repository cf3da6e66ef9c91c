//! Reading a key's record back ahead of its transaction, without the store's mutex.
//!
//! A call finds its key's slot in the index and reads the key's last record back from the
//! journal (`pread`). At millions of keys both miss the CPU's caches (a table of hundreds
//! of MB, a journal of a GB in the page cache), and under the mutex every other caller of
//! the process waits out those misses. So a claim first finds the slot under the mutex (a
//! short hold, no journal lock), reads the record with no lock held, so that the misses of
//! several callers overlap, and its transaction then takes that record only if the key's
//! slot still points at the same offset of the same journal file; else it reads the record
//! again under the locks, as before.
//!
//! That is exact: the bytes below the end of a journal file never change (records are only
//! appended past it, a torn tail cut off is past it, and a compaction writes a new file),
//! and the record read ahead was checked (CRC, key) as any record read back is. So it is
//! the record the transaction would have read, whatever changed meanwhile; a record that
//! did change moved the slot.
//!
//! The slot itself is fetched into the cache before the mutex is taken: the table's
//! address, noted under the mutex at each read-ahead, is only a hint (a prefetch of an
//! address that no longer holds the table does nothing), so the short hold then rarely
//! waits for memory.

use super::index::hash_key;
use super::journal::read_if_key;
use super::FileIdempotencyStore;
use crate::idempotency::KeyRecord;
use std::fs::File;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Where the index's table was when last looked at (0: not yet), read without the mutex.
#[derive(Default)]
pub(super) struct SlotHint {
    table: AtomicUsize,
    mask: AtomicUsize,
}

impl SlotHint {
    /// Asks the CPU to fetch the slot of `hash` (a hint: never a fault, whatever the address).
    fn prefetch(&self, hash: u64) {
        let table = self.table.load(Ordering::Relaxed);
        if table == 0 {
            return;
        }
        let at = (hash as usize & self.mask.load(Ordering::Relaxed)) * SLOT_BYTES;
        prefetch(table.wrapping_add(at));
    }

    /// Notes where the table is now (called under the mutex; written only when it moved).
    fn note(&self, (table, mask): (usize, usize)) {
        if self.table.load(Ordering::Relaxed) != table {
            // A reader may pair the new address with the old mask: one useless prefetch.
            self.mask.store(mask, Ordering::Relaxed);
            self.table.store(table, Ordering::Relaxed);
        }
    }
}

const SLOT_BYTES: usize = std::mem::size_of::<super::index::Slot>();

#[cfg(target_arch = "x86_64")]
fn prefetch(address: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: SSE, which the intrinsic needs, is part of every x86_64 CPU; a prefetch
    // never dereferences its address in the program's sense, and the CPU drops one of an
    // address that is not mapped, without a fault.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(address as *const i8) };
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_address: usize) {}

/// A key's last record, read with no lock held, and where it was read.
pub(super) struct ReadAhead {
    /// The journal file read (held, so that the pointer cannot name another file later).
    journal: Arc<File>,
    offset: u64,
    claim: bool,
    record: KeyRecord,
}

impl ReadAhead {
    /// The record read ahead, if it is the one at `offset` of `journal`.
    pub(super) fn record_at(
        &self,
        journal: &Arc<File>,
        offset: u64,
        claim: bool,
    ) -> Option<KeyRecord> {
        (Arc::ptr_eq(&self.journal, journal) && self.offset == offset && self.claim == claim)
            .then_some(self.record)
    }
}

impl FileIdempotencyStore {
    /// `key`'s last record as this process knows it now, read without holding the locks;
    /// `None` when the key is not in the index or the read failed (the transaction reads it
    /// again under the locks and reports what is wrong).
    pub(super) fn read_ahead(&self, key: &[u8]) -> Option<ReadAhead> {
        let hash = hash_key(key);
        self.slot_hint.prefetch(hash);
        let (journal, offset, claim) = {
            // Only when the mutex is free: queuing for it twice would cost callers who
            // write (new keys, a combiner running a batch) more than the read saves.
            let inner = self.inner.try_lock()?;
            if inner.broken.is_some() {
                return None;
            }
            self.slot_hint.note(inner.index.table());
            let mut at = None;
            // The first slot with the key's hash: almost always the key's (else no use).
            let _ = inner.index.find::<()>(hash, |offset, claim| {
                at = Some((offset, claim));
                Ok(true)
            });
            let (offset, claim) = at?;
            (inner.journal.clone(), offset, claim)
        };
        let entry = read_if_key(&journal, &self.journal_path, offset, claim, key).ok()??;
        Some(ReadAhead {
            journal,
            offset,
            claim,
            record: entry.state?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use crate::idempotency::{Claim, Fingerprint, Forgotten, IdempotencyStore};
    use std::os::unix::fs::FileExt;

    const A: Fingerprint = [0xa; 32];
    const B: Fingerprint = [0xb; 32];

    use super::super::test_support::open;

    fn token(claim: Claim) -> crate::idempotency::ClaimToken {
        match claim {
            Claim::Acquired { token, .. } => token,
            other => panic!("not acquired: {other:?}"),
        }
    }

    /// The record read ahead is what the transaction uses: it does not read it again.
    #[test]
    fn a_claim_takes_the_record_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let t = token(store.claim(b"k", &A, 10).unwrap());
        store.complete(b"k", t, &A, 7, 10).unwrap();
        let ahead = store.read_ahead(b"k").expect("read ahead");
        // Spoil the record on disk after it was read ahead: a read under the lock would
        // report corruption.
        let journal = std::fs::OpenOptions::new()
            .write(true)
            .open(store.journal_path())
            .unwrap();
        journal.write_all_at(&[0xff; 8], ahead.offset + 4).unwrap();
        assert_eq!(
            store.claim_read_ahead(b"k", &A, 11, Some(ahead)).unwrap(),
            Claim::Replay { result: 7 }
        );
        let err = store.claim(b"k", &A, 11).unwrap_err();
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
    }

    /// What changed between the read-ahead and the transaction wins: the record read ahead
    /// is used only while the key's slot still points at it.
    #[test]
    fn a_record_read_ahead_that_the_key_moved_past_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let other = open(dir.path());
        // Running when read ahead, completed (by another process) before the transaction.
        let t = token(store.claim(b"run", &A, 10).unwrap());
        let ahead = store.read_ahead(b"run");
        assert!(ahead.is_some());
        other.complete(b"run", t, &A, 3, 11).unwrap();
        assert_eq!(
            store.claim_read_ahead(b"run", &A, 12, ahead).unwrap(),
            Claim::Replay { result: 3 }
        );
        // Completed when read ahead, forgotten before the transaction: not a replay of an
        // operation that no longer counts, a new claim.
        let ahead = store.read_ahead(b"run");
        assert_eq!(other.forget(b"run", 13).unwrap(), Forgotten::Removed);
        assert!(matches!(
            store.claim_read_ahead(b"run", &A, 14, ahead).unwrap(),
            Claim::Acquired {
                taken_over: false,
                ..
            }
        ));
    }

    /// After a compaction the same offset of the new journal may hold another record of
    /// the key: the record read ahead names its file too.
    #[test]
    fn a_record_read_ahead_from_a_replaced_journal_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        token(store.claim(b"d", &A, 10).unwrap());
        let t = token(store.claim(b"a", &A, 10).unwrap());
        let ahead = store.read_ahead(b"a").expect("read ahead");
        // The key released and claimed for another payload; the compaction drops the
        // records before, which puts that claim where the first one was.
        store.release(b"a", t).unwrap();
        token(store.claim(b"a", &B, 11).unwrap());
        store.compact_now(12).unwrap();
        let inner = store.inner.lock();
        let moved = inner
            .index
            .find::<()>(hash_key(b"a"), |offset, claim| {
                Ok(offset == ahead.offset && claim)
            })
            .unwrap();
        assert!(moved.is_some(), "the new claim is at the same offset");
        drop(inner);
        assert_eq!(
            store.claim_read_ahead(b"a", &A, 13, Some(ahead)).unwrap(),
            Claim::Conflict
        );
    }
}
