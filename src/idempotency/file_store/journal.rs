//! The journal itself: appending whole records, reading what other processes appended,
//! and telling a torn last record (cut off) from corruption (reported, file kept).

use super::files::{open_rw, reserve};
use super::{FileStore, Inner, ALLOCATION_MARGIN, RESERVE_CHUNK};
use crate::durable::FileError;
use crate::error::{ErrorCode, Failure};
use crate::idempotency::record::{self, Entry, MAX_RECORD_BYTES};
use crate::idempotency::{KeyRecord, KeyState};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl FileStore {
    /// Writes `bytes` at the end of the journal; on failure nothing of them stays.
    pub(super) fn append(
        &self,
        inner: &mut Inner,
        bytes: &[u8],
        claims_need_room: bool,
    ) -> Result<(), Failure> {
        let claims_after = inner.claims + claims_need_room as u64;
        let needed = inner.end + bytes.len() as u64 + room_for(claims_after);
        // The margin covers blocks a file system counts for its own metadata.
        if inner.allocated < needed + ALLOCATION_MARGIN {
            // A chunk ahead when there is room for it; on a nearly full disk, just what
            // this record and the completions it answers for need.
            let reserved = reserve(
                &inner.journal,
                inner.end,
                needed - inner.end + RESERVE_CHUNK,
            )
            .map(|ok| (ok, needed + RESERVE_CHUNK))
            .or_else(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                    reserve(&inner.journal, inner.end, needed - inner.end).map(|ok| (ok, needed))
                }
                _ => Err(e),
            });
            match reserved {
                Ok((true, allocated)) => inner.allocated = allocated,
                // Nothing to reserve with: the store works, without the guarantee.
                Ok((false, _)) => inner.allocated = u64::MAX,
                Err(e) if claims_need_room => {
                    return Err(FileError::new("reserve room in", &self.journal_path, e).into())
                }
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency journal: no room reserved for lease renewals")
                }
            }
        }
        if let Err(e) = inner.journal.write_all_at(bytes, inner.end) {
            // Leave no partial line for the next record to land after.
            let _ = inner.journal.set_len(inner.end);
            inner.allocated = 0;
            return Err(FileError::new("append to", &self.journal_path, e).into());
        }
        inner.end += bytes.len() as u64;
        self.sync.lock().written = inner.end;
        if inner.end > inner.compact_at {
            self.compaction_due.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Reads what other processes appended, following the journal when it was replaced,
    /// and cuts a torn last line off.
    pub(super) fn catch_up(&self, inner: &mut Inner) -> Result<(), Failure> {
        let mut meta = inner
            .journal
            .metadata()
            .map_err(|e| FileError::new("stat", &self.journal_path, e))?;
        if meta.nlink() == 0 {
            // A compaction in another process renamed a new journal over this one.
            let journal = Arc::new(open_rw(&self.journal_path)?);
            meta = journal
                .metadata()
                .map_err(|e| FileError::new("stat", &self.journal_path, e))?;
            inner.journal = journal.clone();
            inner.generation += 1;
            inner.end = 0;
            inner.index.clear();
            inner.claims = 0;
            inner.compact_at = (meta.len() * 2).max(self.slack);
            let mut sync = self.sync.lock();
            sync.generation = inner.generation;
            sync.file = journal;
            sync.written = 0;
            sync.synced = 0;
        }
        inner.allocated = meta.blocks() * 512;
        let len = meta.len();
        if len < inner.end {
            return Err(self.corrupt(
                inner,
                format!("it shrank from {} to {len} bytes", inner.end),
            ));
        }
        if len == inner.end {
            return Ok(());
        }
        let mut bytes = vec![0; (len - inner.end) as usize];
        inner
            .journal
            .read_exact_at(&mut bytes, inner.end)
            .map_err(|e| FileError::new("read", &self.journal_path, e))?;
        let mut at = 0;
        while at < bytes.len() {
            let line_end = bytes[at..].iter().position(|&b| b == b'\n');
            let decoded = line_end.and_then(|n| record::decode(&bytes[at..at + n]));
            match (line_end, decoded) {
                (Some(n), Some(entry)) => {
                    apply(inner, entry);
                    at += n + 1;
                    inner.end += n as u64 + 1;
                }
                _ if !has_good_line_after(&bytes[at..]) => {
                    tracing::warn!(
                        journal = %self.journal_path.display(),
                        offset = inner.end,
                        bytes = bytes.len() - at,
                        "idempotency journal: torn last record (a writer died mid-write) discarded"
                    );
                    inner
                        .journal
                        .set_len(inner.end)
                        .map_err(|e| FileError::new("truncate", &self.journal_path, e))?;
                    // Truncating frees the room reserved past the end, too.
                    inner.allocated = 0;
                    break;
                }
                _ => {
                    let offset = inner.end;
                    return Err(
                        self.corrupt(inner, format!("the record at byte {offset} does not check"))
                    );
                }
            }
        }
        self.sync.lock().written = inner.end;
        Ok(())
    }

    pub(super) fn corrupt(&self, inner: &mut Inner, why: String) -> Failure {
        let failure = Failure::new(
            ErrorCode::DataCorruption,
            format!(
                "Data corruption detected: idempotency journal {}: {why}; it is left as it is for inspection",
                self.journal_path.display()
            ),
        );
        tracing::error!(reason = %failure.detail, "idempotency store refuses work");
        inner.broken = Some(failure.clone());
        failure
    }
}

/// Room a journal needs past `end` for `claims` outstanding claims.
pub(super) fn room_for(claims: u64) -> u64 {
    claims * 2 * MAX_RECORD_BYTES as u64
}

/// Whether a whole, good record follows the bad bytes at the start of `rest`: then the
/// bad bytes are corruption, not a torn end.
pub(super) fn has_good_line_after(rest: &[u8]) -> bool {
    rest.split(|&b| b == b'\n')
        .skip(1)
        .any(|line| record::decode(line).is_some())
}

pub(super) fn apply(inner: &mut Inner, entry: Entry) {
    let is_claim = |r: &KeyRecord| matches!(r.state, KeyState::Claimed { .. });
    if entry.state.as_ref().is_some_and(is_claim) {
        inner.claims += 1;
    }
    let old = match entry.state {
        Some(record) => inner.index.insert(entry.key.into_boxed_slice(), record),
        None => inner.index.remove(&entry.key[..]),
    };
    if old.as_ref().is_some_and(is_claim) {
        inner.claims -= 1;
    }
}
