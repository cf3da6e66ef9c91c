//! The journal itself: appending whole records, reading records back by offset, reading
//! what other processes appended, and telling a torn last record (cut off) from
//! corruption (reported, file kept).

use super::files::reserve;
use super::index::{hash_key, Index};
use super::read_ahead::ReadAhead;
use super::{FileIdempotencyStore, Inner, ALLOCATION_MARGIN, RESERVE_CHUNK};
use crate::durable::FileError;
use crate::error::{Error, ErrorCode, Result};
use crate::idempotency::record::{self, Entry, MAX_RECORD_BYTES};
use crate::idempotency::{KeyRecord, KeyState};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::Ordering;

/// Bytes read at a time when scanning the journal.
pub(super) const CHUNK: usize = 4 << 20;

impl FileIdempotencyStore {
    /// Writes `bytes` at the end of the journal; on failure nothing of them stays.
    pub(super) fn append(
        &self,
        inner: &mut Inner,
        bytes: &[u8],
        claims_need_room: bool,
    ) -> Result<()> {
        let claims_after = inner.index.claims() + claims_need_room as u64;
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
            // Leave no partial record for the next record to land after.
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

    /// The record of `key` in the index, if any: its slot and state. The record read ahead
    /// of the transaction, if any, is used when the key's slot still points at it.
    pub(super) fn lookup(
        &self,
        inner: &Inner,
        key: &[u8],
        ahead: Option<&ReadAhead>,
    ) -> Result<Option<(usize, KeyRecord)>> {
        let mut state = None;
        let found = inner.index.find(hash_key(key), |offset, claim| {
            if let Some(record) = ahead.and_then(|a| a.record_at(&inner.journal, offset, claim)) {
                state = Some(record);
                return Ok(true);
            }
            let entry = read_if_key(&inner.journal, &self.journal_path, offset, claim, key)?;
            state = entry.and_then(|e| e.state);
            Ok::<bool, Error>(state.is_some())
        })?;
        Ok(found.zip(state))
    }

    /// Reads what other processes appended, following the journal when it was replaced,
    /// and cuts a torn last record off.
    pub(super) fn catch_up(&self, inner: &mut Inner) -> Result<()> {
        let mut meta = inner
            .journal
            .metadata()
            .map_err(|e| FileError::new("stat", &self.journal_path, e))?;
        if meta.nlink() == 0 {
            // A compaction in another process renamed a new journal over this one.
            let (journal, index, end) = self.follow()?;
            meta = journal
                .metadata()
                .map_err(|e| FileError::new("stat", &self.journal_path, e))?;
            // The old journal is closed (its blocks freed) by housekeeping, not under the lock.
            inner.closing = Some(std::mem::replace(&mut inner.journal, journal.clone()));
            inner.generation += 1;
            inner.end = end;
            inner.imaged = end;
            let replaced = std::mem::replace(&mut inner.index, index);
            inner.index.retire(replaced);
            self.compaction_due.store(true, Ordering::Relaxed);
            inner.compact_at = (meta.len() * 2).max(self.slack);
            let mut sync = self.sync.lock();
            sync.generation = inner.generation;
            sync.file = journal;
            sync.written = end;
            sync.synced = end;
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
        let journal = inner.journal.clone();
        let bad = for_each_record(
            &journal,
            &self.journal_path,
            inner.end,
            len,
            |at, len, entry| {
                apply(&mut inner.index, &journal, &self.journal_path, &entry, at)?;
                self.tokens.note(&entry);
                inner.end = at + len as u64;
                Ok::<(), Error>(())
            },
        );
        let bad = match bad {
            Ok(bad) => bad,
            Err(failure) => {
                if failure.code() == ErrorCode::DataCorruption.raw() {
                    inner.broken = Some(failure.clone());
                }
                return Err(failure);
            }
        };
        if let Some(offset) = bad {
            // Never cut off a journal of an earlier build: it is not a torn record.
            if offset == 0 && is_text_journal(&journal) {
                let why =
                    "it is in the text format of an earlier build (move it away to start afresh)";
                return Err(self.corrupt(inner, why.to_string()));
            }
            if good_record_after(&journal, &self.journal_path, offset, len)? {
                let why = format!("the record at byte {offset} does not check");
                return Err(self.corrupt(inner, why));
            }
            tracing::warn!(
                journal = %self.journal_path.display(),
                offset,
                bytes = len - offset,
                "idempotency journal: torn last record (a writer died mid-write) discarded"
            );
            journal
                .set_len(offset)
                .map_err(|e| FileError::new("truncate", &self.journal_path, e))?;
            // Truncating frees the room reserved past the end, too.
            inner.allocated = 0;
        }
        self.sync.lock().written = inner.end;
        Ok(())
    }

    pub(super) fn corrupt(&self, inner: &mut Inner, why: String) -> Error {
        let failure = corruption(&self.journal_path, why);
        inner.broken = Some(failure.clone());
        failure
    }
}

pub(super) fn corruption(path: &Path, why: String) -> Error {
    let failure = Error::Corruption(format!(
        "idempotency journal {}: {why}; it is left as it is for inspection",
        path.display()
    ));
    tracing::error!(reason = %failure.detail(), "idempotency store refuses work");
    failure
}

/// Room a journal needs past `end` for `claims` outstanding claims.
pub(super) fn room_for(claims: u64) -> u64 {
    claims * 2 * MAX_RECORD_BYTES as u64
}

/// The record at `offset` of a journal if it is `key`'s, read back (only its own bytes:
/// the index says whether it is a claim, and a key of another length is another key).
pub(super) fn read_if_key(
    file: &File,
    path: &Path,
    offset: u64,
    claim: bool,
    key: &[u8],
) -> Result<Option<Entry>> {
    let mut buf = [0u8; MAX_RECORD_BYTES];
    let buf = &mut buf[..record::len_of(claim, key.len())];
    let mut n = 0;
    // One pread almost always; a short read only at the end of the file.
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(read) => n += read,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FileError::new("read", path, e).into()),
        }
    }
    if n >= 2 && buf[1] as usize != key.len() {
        return Ok(None);
    }
    let (entry, _) = record::decode(buf)
        .ok_or_else(|| corruption(path, format!("the record at byte {offset} does not check")))?;
    Ok((entry.key == key).then_some(entry))
}

/// Hands each record of `file` from `start` to `end` to `f` with its offset and length;
/// stops at the first one that does not check and returns its offset.
pub(super) fn for_each_record<E: From<Error>>(
    file: &File,
    path: &Path,
    start: u64,
    end: u64,
    mut f: impl FnMut(u64, usize, Entry) -> Result<(), E>,
) -> Result<Option<u64>, E> {
    let mut buf = Vec::new();
    let mut pos = start;
    while pos < end {
        let n = (end - pos).min((CHUNK + MAX_RECORD_BYTES) as u64) as usize;
        buf.resize(n, 0);
        file.read_exact_at(&mut buf, pos)
            .map_err(|e| Error::from(FileError::new("read", path, e)))?;
        let last = pos + n as u64 == end;
        let mut at = 0;
        // A record cut by the chunk's end is read again with the next chunk.
        while at < n && (last || n - at >= MAX_RECORD_BYTES) {
            match record::decode(&buf[at..]) {
                Some((entry, len)) => {
                    f(pos + at as u64, len, entry)?;
                    at += len;
                }
                None => return Ok(Some(pos + at as u64)),
            }
        }
        pos += at as u64;
    }
    Ok(None)
}

/// Whether a whole, good record follows the bad bytes at `offset`: then they are
/// corruption, not a torn end.
pub(super) fn good_record_after(file: &File, path: &Path, offset: u64, end: u64) -> Result<bool> {
    let mut buf = Vec::new();
    let mut pos = offset + 1;
    while pos < end {
        let n = (end - pos).min((CHUNK + MAX_RECORD_BYTES) as u64) as usize;
        buf.resize(n, 0);
        file.read_exact_at(&mut buf, pos)
            .map_err(|e| FileError::new("read", path, e))?;
        let last = pos + n as u64 == end;
        let scan = if last { n } else { n - MAX_RECORD_BYTES };
        if (0..scan).any(|at| record::is_kind(buf[at]) && record::decode(&buf[at..]).is_some()) {
            return Ok(true);
        }
        pos += scan as u64;
    }
    Ok(false)
}

/// Whether the journal starts like a text line of versions before the binary records.
fn is_text_journal(file: &File) -> bool {
    let mut head = [0u8; 9];
    file.read_exact_at(&mut head, 0).is_ok()
        && head[..8].iter().all(u8::is_ascii_hexdigit)
        && head[8] == b' '
}

/// Applies `entry`, the record at `offset` of `file`, to `index`.
pub(super) fn apply(
    index: &mut Index,
    file: &File,
    path: &Path,
    entry: &Entry,
    offset: u64,
) -> Result<()> {
    let hash = hash_key(&entry.key);
    let found = index.find(hash, |at, claim| {
        Ok::<bool, Error>(read_if_key(file, path, at, claim, &entry.key)?.is_some())
    })?;
    match &entry.state {
        Some(record) => {
            let claim = matches!(record.state, KeyState::Claimed { .. });
            index.set(found, hash, offset, claim);
        }
        None => {
            if let Some(at) = found {
                index.remove(at);
            }
        }
    }
    Ok(())
}
