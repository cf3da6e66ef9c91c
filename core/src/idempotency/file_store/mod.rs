//! The embedded idempotency store: an append-only journal under `<state_dir>/idempotency/`,
//! shared by the threads of a process and by every process that uses the same directory.
//!
//! - **Atomic claims.** Each call runs as one transaction under the process's mutex and an
//!   exclusive `flock` of `lock`: read what other processes appended, decide, append.
//! - **Durable before return.** A transaction's records are fsynced before it returns.
//!   Concurrent callers share one `fdatasync` (group commit): while one is in flight, the
//!   next callers' records queue up, and the next sync covers them all.
//! - **Room for completions.** A claim first makes sure the file has blocks allocated
//!   (`fallocate(FALLOC_FL_KEEP_SIZE)`) for the completion and one lease renewal of every
//!   claim outstanding, its own included, so a full disk fails a claim, not a completion.
//! - **Small in memory.** Each process indexes the live keys by a 64-bit hash and the offset
//!   of their last record (16 bytes a slot, see `index.rs`); a call reads the record back.
//! - **Crash safety.** Every record carries a CRC-32. A torn last record (the writer died
//!   mid-write) is cut off; a bad record with good records after it is corruption, reported
//!   as BACKUP_ERROR_DATA_CORRUPTION on every call, and the file is left as it is. A record
//!   read back that does not check is corruption too.
//! - **Bounded.** Once the journal has doubled since its last compaction (plus some
//!   slack), [`FileIdempotencyStore::maintain`] rewrites it with the live records only, without
//!   holding the lock but for the last few records (see `compaction.rs`). Other processes see
//!   the old journal unlinked and reopen the new one, loading its index image with no lock
//!   held (see `follow.rs`).
//! - **Quick restart.** `index` holds an image of the index (see `image.rs`), written at each
//!   compaction and whenever the journal has grown a sixteenth past it: a restart loads it and
//!   reads only the journal past it.

mod compaction;
mod files;
mod follow;
mod group_commit;
mod image;
mod index;
mod journal;
mod read_ahead;
mod scan;
#[cfg(test)]
mod test_support;
mod tokens;

use super::record::{self, Entry};
use super::{
    completion_allowed, decide, is_claim, Claim, ClaimId, ClaimToken, Completion, Fingerprint,
    Forgotten, IdempotencyStore, KeyRecord, KeyState, Lapsed,
};
use crate::durable::{self, FileError};
use crate::error::{Error, ErrorCode, Result};
use files::{open_rw, FileLock};
use index::Index;
use journal::apply;
use parking_lot::{Condvar, Mutex, MutexGuard};
use read_ahead::ReadAhead;
pub use scan::{verify, Verified};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokens::Tokens;

#[derive(Debug, Clone, Copy)]
pub struct FileIdempotencySettings {
    pub lease: Duration,
    pub ttl: Duration,
    /// The journal may grow this much past twice its compacted size before compaction.
    pub compaction_slack_bytes: u64,
}

impl FileIdempotencySettings {
    pub fn new(lease: Duration, ttl: Duration) -> Self {
        FileIdempotencySettings {
            lease,
            ttl,
            compaction_slack_bytes: 4 << 20,
        }
    }
}

/// Extra room allocated at a time, so that a claim rarely needs a `fallocate`.
const RESERVE_CHUNK: u64 = 64 << 10;
const ALLOCATION_MARGIN: u64 = 8 << 10;
/// Transactions of this process in a row that may pass the journal's lock on to the next
/// one without unlocking, so that other processes get their turn.
const MAX_KEPT: u32 = 16;
/// Longest a sync leader waits for other callers to join its fsync.
const MAX_GATHER: Duration = Duration::from_millis(1);

pub struct FileIdempotencyStore {
    dir: PathBuf,
    journal_path: PathBuf,
    compact_path: PathBuf,
    /// The index image (`index`) and its side file while being written.
    image_path: PathBuf,
    image_tmp_path: PathBuf,
    /// `flock`ed around every transaction on the journal.
    journal_lock: File,
    journal_lock_path: PathBuf,
    /// `flock`ed by the one process compacting.
    compact_lock: File,
    compact_lock_path: PathBuf,
    /// The fencing tokens' counters (`tokens.rs`).
    tokens: Tokens,
    lease_ms: u64,
    ttl_ms: u64,
    slack: u64,
    inner: Mutex<Inner>,
    sync: Mutex<SyncState>,
    /// Notified when the sync state changes: a gathering leader looks again.
    synced: Condvar,
    compaction: Mutex<()>,
    /// The index of a journal another process put in place, loaded without the locks.
    followed: Mutex<Option<follow::Followed>>,
    /// Callers between entering a transaction and appending: a sync leader lets them
    /// append first, so that one fsync covers them all.
    in_transaction: AtomicUsize,
    /// Transactions waiting for `inner`.
    entering: AtomicUsize,
    /// The journal's lock was left held for the next transaction (how many in a row):
    /// nothing changed the journal since the last one read it. Changed under `inner`.
    lock_kept: AtomicU32,
    /// The journal passed `compact_at` (set by appends, cleared by compaction).
    compaction_due: AtomicBool,
    compactions: AtomicU64,
    /// Where the index's table is, for a prefetch before taking `inner` (`read_ahead.rs`).
    slot_hint: read_ahead::SlotHint,
    /// The longest maintenance held the store's mutex, in µs (see [`Held`]).
    longest_hold_us: AtomicU64,
    /// The same, less the time its thread waited for a core meanwhile.
    longest_running_hold_us: AtomicU64,
}

/// Notes, when dropped, how long maintenance held the mutex since it was made: what a
/// caller may have waited for; and that time less what the thread waited for a core
/// meanwhile, which is what the work itself takes on a machine shared with other work.
struct Held<'a> {
    store: &'a FileIdempotencyStore,
    since: std::time::Instant,
    waited_ns: u64,
}

impl Held<'_> {
    fn since_now(store: &FileIdempotencyStore) -> Held<'_> {
        Held {
            store,
            since: std::time::Instant::now(),
            waited_ns: waited_for_cpu_ns(),
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let us = self.since.elapsed().as_micros() as u64;
        let waited_us = waited_for_cpu_ns().saturating_sub(self.waited_ns) / 1000;
        let store = self.store;
        store.longest_hold_us.fetch_max(us, Ordering::Relaxed);
        store
            .longest_running_hold_us
            .fetch_max(us.saturating_sub(waited_us), Ordering::Relaxed);
    }
}

/// How long this thread has waited for a core so far, in ns (0 where the kernel does not
/// say): the second field of `/proc/thread-self/schedstat`.
fn waited_for_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// The journal as this process has read it.
struct Inner {
    journal: Arc<File>,
    /// Moves on each time the journal file is replaced (by a compaction).
    generation: u64,
    /// Bytes read and applied: the end of the last whole record.
    end: u64,
    /// Bytes the file had allocated when last looked at.
    allocated: u64,
    /// Every key of the journal: its hash and the offset of its last record.
    index: Index,
    /// The offset of the journal that the index image on disk covers (0: none).
    imaged: u64,
    /// Compaction is due once `end` passes this.
    compact_at: u64,
    /// Corruption found: every call reports it.
    broken: Option<Error>,
    /// A journal another process replaced, to be closed outside the lock.
    closing: Option<Arc<File>>,
}

/// Group commit of the current journal file.
struct SyncState {
    generation: u64,
    file: Arc<File>,
    /// Bytes that exist in the file (ours and other processes').
    written: u64,
    /// Bytes known durable.
    synced: u64,
    syncing: bool,
    /// The sync leader waits for callers to join its fsync (on `FileIdempotencyStore::synced`).
    gathering: bool,
    /// Callers asleep until the fsync in flight (or the next one) ends.
    sleepers: Vec<group_commit::Sleeper>,
    /// Callers the last fsync released: most come back with their next record soon.
    released: usize,
    /// How long the last fsync took: the leader waits a fraction of it for callers.
    last_sync: Duration,
    /// An fsync failed: the page cache can no longer be trusted to reach the disk.
    failed: Option<Error>,
}

/// The point a transaction must see durable before it returns.
#[derive(Clone, Copy)]
struct SyncPoint {
    generation: u64,
    offset: u64,
}

/// What one transaction reads and the records it appends.
pub struct Txn<'a> {
    store: &'a FileIdempotencyStore,
    inner: &'a Inner,
    appended: Vec<u8>,
    /// Each record appended: where it starts in `appended`, and what it says.
    entries: Vec<(usize, Entry)>,
    /// A claim is among the records: room must be reserved first, or nothing is written.
    claims_need_room: bool,
    /// A record could not be read back: the transaction fails, writing nothing.
    failed: Option<Error>,
}

impl Txn<'_> {
    fn get(&mut self, key: &[u8]) -> Option<KeyRecord> {
        self.get_read_ahead(key, None)
    }

    /// The same, given the key's record as read ahead of the transaction (`read_ahead.rs`).
    fn get_read_ahead(&mut self, key: &[u8], ahead: Option<&ReadAhead>) -> Option<KeyRecord> {
        // A key written earlier in this transaction wins.
        if let Some((_, entry)) = self.entries.iter().rev().find(|(_, e)| e.key == key) {
            return entry.state;
        }
        match self.store.lookup(self.inner, key, ahead) {
            Ok(found) => found.map(|(_, record)| record),
            Err(failure) => {
                self.failed.get_or_insert(failure);
                None
            }
        }
    }

    fn put(&mut self, key: &[u8], state: Option<KeyRecord>) {
        let at = self.appended.len();
        record::encode(&mut self.appended, key, state.as_ref());
        self.entries.push((
            at,
            Entry {
                key: key.to_vec(),
                state,
            },
        ));
    }
}

impl FileIdempotencyStore {
    /// Opens (creating when missing) the store under `<state_dir>/idempotency/` and reads it.
    pub fn open(state_dir: &Path, settings: FileIdempotencySettings) -> Result<Self> {
        let dir = state_dir.join("idempotency");
        // 0750 whatever the umask, and its entry in `state_dir` durable before any claim.
        durable::create_private_dir(&dir)?;
        let journal_path = dir.join("journal");
        let journal_lock_path = dir.join("lock");
        let compact_lock_path = dir.join("compact.lock");
        let journal_lock = open_rw(&journal_lock_path)?;
        let compact_lock = open_rw(&compact_lock_path)?;
        let journal = Arc::new(open_rw(&journal_path)?);
        files::advise_random(&journal);
        let tokens = Tokens::open(dir.join("tokens"))?;
        // The journal's directory entry must survive a power loss before any claim does.
        durable::sync_dir(&dir)?;
        let image_path = dir.join("index");
        // The image of the index, when there is one of this journal: only the journal past
        // it is read. A compaction may replace the journal meanwhile: the first
        // transaction's catch-up then follows it.
        let (index, end) = image::load(&image_path, &journal).unwrap_or_default();
        let store = FileIdempotencyStore {
            compact_path: dir.join("journal.compact"),
            image_tmp_path: dir.join("index.compact"),
            image_path,
            journal_path,
            journal_lock,
            journal_lock_path,
            compact_lock,
            compact_lock_path,
            tokens,
            lease_ms: settings.lease.as_millis() as u64,
            ttl_ms: settings.ttl.as_millis() as u64,
            slack: settings.compaction_slack_bytes,
            inner: Mutex::new(Inner {
                journal: journal.clone(),
                generation: 0,
                end,
                allocated: 0,
                index,
                imaged: end,
                compact_at: settings.compaction_slack_bytes,
                broken: None,
                closing: None,
            }),
            sync: Mutex::new(SyncState {
                generation: 0,
                file: journal,
                written: end,
                synced: end,
                syncing: false,
                gathering: false,
                sleepers: Vec::new(),
                released: 1,
                last_sync: Duration::ZERO,
                failed: None,
            }),
            synced: Condvar::new(),
            compaction: Mutex::new(()),
            followed: Mutex::new(None),
            in_transaction: AtomicUsize::new(0),
            entering: AtomicUsize::new(0),
            lock_kept: AtomicU32::new(0),
            compaction_due: AtomicBool::new(false),
            compactions: AtomicU64::new(0),
            slot_hint: Default::default(),
            longest_hold_us: AtomicU64::new(0),
            longest_running_hold_us: AtomicU64::new(0),
            dir,
        };
        store.transact(|_| ())?;
        let mut inner = store.inner.lock();
        inner.compact_at = inner.end.saturating_mul(2).max(store.slack);
        drop(inner);
        Ok(store)
    }

    /// About how long a compaction of the store under `state_dir` could take, judged from
    /// its journal's size without opening it (at init; the store opens at its first use).
    pub fn maintenance_estimate_at(state_dir: &Path) -> Duration {
        let journal = state_dir.join("idempotency").join("journal");
        let bytes = std::fs::metadata(journal).map_or(0, |meta| meta.len());
        // About 1 s per million live keys, whose records take about 90 bytes each.
        Duration::from_micros(bytes / 90)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn journal_path(&self) -> &Path {
        &self.journal_path
    }

    /// Bytes of the journal this process has read.
    pub fn journal_len(&self) -> u64 {
        self.inner.lock().end
    }

    /// Compactions this handle made.
    pub fn compactions(&self) -> u64 {
        self.compactions.load(Ordering::Relaxed)
    }

    /// The longest that maintenance (a compaction's steps, an image's pieces, following
    /// another process's compaction) held the mutex that every call of this handle takes.
    pub fn longest_maintenance_hold(&self) -> Duration {
        Duration::from_micros(self.longest_hold_us.load(Ordering::Relaxed))
    }

    /// The same, less the time the holding thread waited for a core meanwhile: what the
    /// maintenance work itself costs callers, on a machine shared with other work.
    pub fn longest_maintenance_hold_running(&self) -> Duration {
        Duration::from_micros(self.longest_running_hold_us.load(Ordering::Relaxed))
    }

    /// Compacts the journal now, however little it has grown (for tools and benchmarks).
    pub fn compact_now(&self, now_ms: u64) -> Result<()> {
        self.compact(now_ms, true)
    }

    /// Waits for the journal's cross-process lock (called under `inner`).
    fn lock_journal(&self) -> Result<FileLock<'_>, FileError> {
        // A lock kept by the last transaction is this caller's now, and released with it.
        self.lock_kept.store(0, Ordering::Relaxed);
        let lock = FileLock::acquire(&self.journal_lock, &self.journal_lock_path, true)?;
        Ok(lock.expect("a waiting lock is always taken"))
    }

    /// Runs `f` as one transaction: up to date with every process, its records appended
    /// (all or none) and durable before this returns.
    fn transact<T>(&self, f: impl FnOnce(&mut Txn<'_>) -> T) -> Result<T> {
        self.in_transaction.fetch_add(1, Ordering::AcqRel);
        let result = self.transact_locked(f);
        self.in_transaction.fetch_sub(1, Ordering::AcqRel);
        if result.is_err() {
            // A gathering leader waits for no record from this caller.
            self.nudge_leader(&self.sync.lock());
        }
        let (value, point) = result?;
        self.wait_durable(point)?;
        Ok(value)
    }

    /// Takes the store's mutex as the next transaction, and with it the journal's lock if
    /// the previous transaction passed it on: how many transactions in a row it was kept.
    ///
    /// Queued transactions of this process pass the journal's lock on: no other process
    /// appended meanwhile, and two syscalls and a catch-up are saved (the sync leader
    /// waits for these transactions: they are its fsync's batch).
    fn enter(&self) -> (MutexGuard<'_, Inner>, u32) {
        self.entering.fetch_add(1, Ordering::AcqRel);
        let inner = self.inner.lock();
        self.entering.fetch_sub(1, Ordering::AcqRel);
        (inner, self.lock_kept.swap(0, Ordering::Relaxed))
    }

    /// A transaction's work under the locks; where it must be durable up to.
    fn transact_locked<T>(&self, f: impl FnOnce(&mut Txn<'_>) -> T) -> Result<(T, SyncPoint)> {
        let (mut inner, mut kept) = self.enter();
        // A lock passed on (below) was held all along: no other process can have compacted.
        if kept == 0 && self.replaced(&inner)? {
            // Another process compacted: its index is loaded without any lock held.
            drop(inner);
            self.prepare_follow()?;
            (inner, kept) = self.enter();
        }
        let lock = match kept {
            0 => self.lock_journal()?,
            _ => FileLock::kept(&self.journal_lock),
        };
        if let Some(failure) = inner
            .broken
            .clone()
            .or_else(|| self.sync.lock().failed.clone())
        {
            return Err(failure);
        }
        if kept == 0 {
            self.catch_up(&mut inner)?;
        }
        let mut txn = Txn {
            store: self,
            inner: &inner,
            appended: Vec::new(),
            entries: Vec::new(),
            claims_need_room: false,
            failed: None,
        };
        let value = f(&mut txn);
        let Txn {
            appended,
            entries,
            claims_need_room,
            failed,
            ..
        } = txn;
        if let Some(failure) = failed {
            if failure.code() == ErrorCode::DataCorruption.raw() {
                inner.broken = Some(failure.clone());
            }
            return Err(failure);
        }
        if !appended.is_empty() {
            let start = inner.end;
            self.append(&mut inner, &appended, claims_need_room)?;
            let inner = &mut *inner;
            for (at, entry) in &entries {
                let offset = start + *at as u64;
                if let Err(failure) = apply(
                    &mut inner.index,
                    &inner.journal,
                    &self.journal_path,
                    entry,
                    offset,
                ) {
                    inner.broken = Some(failure.clone());
                    return Err(failure);
                }
            }
            if inner.index.has_retired() {
                // The lease thread frees the index's old table, off the callers' path.
                self.compaction_due.store(true, Ordering::Relaxed);
            }
        }
        let point = SyncPoint {
            generation: inner.generation,
            offset: inner.end,
        };
        if self.entering.load(Ordering::Acquire) > 0 && kept < MAX_KEPT {
            // Another transaction of this process waits for `inner`: it takes the lock over.
            self.lock_kept.store(kept + 1, Ordering::Relaxed);
            lock.keep();
        } else {
            drop(lock);
        }
        drop(inner);
        Ok((value, point))
    }
}

impl FileIdempotencyStore {
    /// A claim, given the key's record as read ahead of its transaction.
    fn claim_read_ahead(
        &self,
        key: &[u8],
        fingerprint: &Fingerprint,
        now_ms: u64,
        ahead: Option<ReadAhead>,
    ) -> Result<Claim> {
        self.transact(|txn| {
            let existing = txn.get_read_ahead(key, ahead.as_ref());
            let mut claim = decide(existing.as_ref(), fingerprint, now_ms, ClaimToken(0));
            if let Claim::Acquired { token, .. } = &mut claim {
                // Issued under the journal's lock, so that it is above every token of every
                // process, the key's earlier claims' included.
                *token = match self.tokens.issue(now_ms) {
                    Ok(issued) => issued,
                    Err(failure) => {
                        txn.failed.get_or_insert(failure);
                        return claim;
                    }
                };
                let token = *token;
                txn.claims_need_room = true;
                txn.put(
                    key,
                    Some(KeyRecord {
                        fingerprint: *fingerprint,
                        state: KeyState::Claimed {
                            token,
                            lease_until_ms: now_ms.saturating_add(self.lease_ms),
                        },
                    }),
                );
            }
            claim
        })
    }
}

impl IdempotencyStore for FileIdempotencyStore {
    /// `id` is not needed here: a claim's transaction is durable before it answers, or it
    /// fails as a whole (a failed fsync fails every later call), so no answer is lost.
    fn claim_as(
        &self,
        key: &[u8],
        fingerprint: &Fingerprint,
        now_ms: u64,
        _id: ClaimId,
    ) -> Result<Claim> {
        self.claim_read_ahead(key, fingerprint, now_ms, self.read_ahead(key))
    }

    fn renew(&self, claims: &[(Vec<u8>, ClaimToken)], now_ms: u64) -> Result<Lapsed> {
        self.transact(|txn| {
            let mut lapsed = Vec::new();
            for (key, token) in claims {
                match txn.get(key).filter(|r| is_claim(Some(r), *token)) {
                    Some(record) => {
                        let renewed = KeyRecord {
                            state: KeyState::Claimed {
                                token: *token,
                                lease_until_ms: now_ms.saturating_add(self.lease_ms),
                            },
                            ..record
                        };
                        txn.put(key, Some(renewed));
                    }
                    None => lapsed.push((key.clone(), *token)),
                }
            }
            lapsed
        })
    }

    fn complete(
        &self,
        key: &[u8],
        token: ClaimToken,
        fingerprint: &Fingerprint,
        result: i32,
        now_ms: u64,
    ) -> Result<Completion> {
        self.transact(|txn| {
            if !completion_allowed(txn.get(key).as_ref(), token, now_ms) {
                return Completion::Superseded;
            }
            txn.put(
                key,
                Some(KeyRecord {
                    fingerprint: *fingerprint,
                    state: KeyState::Completed {
                        token,
                        result,
                        expires_at_ms: now_ms.saturating_add(self.ttl_ms),
                    },
                }),
            );
            Completion::Recorded
        })
    }

    fn release(&self, key: &[u8], token: ClaimToken) -> Result<()> {
        self.transact(|txn| {
            if is_claim(txn.get(key).as_ref(), token) {
                txn.put(key, None);
            }
        })
    }

    fn get(&self, key: &[u8], now_ms: u64) -> Result<Option<KeyRecord>> {
        self.transact(|txn| txn.get(key).filter(|r| r.is_live(now_ms)))
    }

    fn forget(&self, key: &[u8], now_ms: u64) -> Result<Forgotten> {
        self.transact(|txn| match txn.get(key) {
            None => Forgotten::Absent,
            Some(record)
                if record.is_live(now_ms) && matches!(record.state, KeyState::Claimed { .. }) =>
            {
                Forgotten::InProgress
            }
            Some(_) => {
                txn.put(key, None);
                Forgotten::Removed
            }
        })
    }

    fn maintain(&self, now_ms: u64) -> Result<()> {
        let retired = {
            let mut inner = self.inner.lock();
            (inner.index.take_retired(), inner.closing.take())
        };
        drop(retired);
        if self.replaced(&self.inner.lock())? {
            // Ahead of the callers, who then only read the journal past its image.
            self.prepare_follow()?;
        }
        // The file's size too, not only this process's view: other processes append.
        let grown = || {
            let inner = self.inner.lock();
            inner.journal.metadata().map_or(true, |meta| {
                meta.nlink() == 0 || meta.len() > inner.compact_at
            })
        };
        if self.maintenance_due() || grown() {
            self.compact(now_ms, false)?;
        }
        self.checkpoint()
    }

    fn maintenance_due(&self) -> bool {
        self.compaction_due.load(Ordering::Relaxed)
    }

    /// A compaction reads and rewrites every live key: about 1 s per million here.
    fn maintenance_estimate(&self) -> Duration {
        Duration::from_micros(self.inner.lock().index.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::fs;

    const LEASE_MS: u64 = 90_000;
    const TTL_MS: u64 = 3_600_000;
    const A: Fingerprint = [0xa; 32];
    const B: Fingerprint = [0xb; 32];

    fn settings() -> FileIdempotencySettings {
        FileIdempotencySettings {
            lease: Duration::from_millis(LEASE_MS),
            ttl: Duration::from_millis(TTL_MS),
            compaction_slack_bytes: 4096,
        }
    }

    fn open(dir: &Path) -> FileIdempotencyStore {
        FileIdempotencyStore::open(dir, settings()).expect("store opens")
    }

    /// The token of a fresh (not taken over) claim; panics on anything else.
    fn fresh(claim: Result<Claim>) -> ClaimToken {
        match claim.unwrap() {
            Claim::Acquired {
                token,
                taken_over: false,
            } => token,
            other => panic!("expected a fresh claim, got {other:?}"),
        }
    }

    fn is_fresh(claim: Result<Claim>) -> bool {
        matches!(
            claim,
            Ok(Claim::Acquired {
                taken_over: false,
                ..
            })
        )
    }

    fn taken_over(claim: Result<Claim>) -> ClaimToken {
        match claim.unwrap() {
            Claim::Acquired {
                token,
                taken_over: true,
            } => token,
            other => panic!("expected a takeover, got {other:?}"),
        }
    }

    #[test]
    fn claim_complete_replay_conflict_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let token = fresh(store.claim(b"k", &A, 1000));
        // The owner's own second call, and a different payload while it runs.
        assert_eq!(store.claim(b"k", &A, 1001).unwrap(), Claim::InProgress);
        assert_eq!(store.claim(b"k", &B, 1001).unwrap(), Claim::Conflict);
        assert_eq!(
            store.complete(b"k", token, &A, 0, 2000).unwrap(),
            Completion::Recorded
        );
        assert_eq!(
            store.claim(b"k", &A, 2001).unwrap(),
            Claim::Replay { result: 0 }
        );
        assert_eq!(store.claim(b"k", &B, 2001).unwrap(), Claim::Conflict);
        // The TTL runs from the completion.
        assert_eq!(
            store.claim(b"k", &A, 2000 + TTL_MS - 1).unwrap(),
            Claim::Replay { result: 0 }
        );
        assert_eq!(store.get(b"k", 2000 + TTL_MS).unwrap(), None);
        assert!(is_fresh(store.claim(b"k", &B, 2000 + TTL_MS)));
    }

    #[test]
    fn a_released_key_may_run_again_and_forget_spares_a_live_claim() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let token = fresh(store.claim(b"k", &A, 10));
        assert_eq!(store.forget(b"k", 11).unwrap(), Forgotten::InProgress);
        store.release(b"k", token).unwrap();
        assert_eq!(store.get(b"k", 12).unwrap(), None);
        let token = fresh(store.claim(b"k", &B, 12));
        store.complete(b"k", token, &B, 0, 13).unwrap();
        assert_eq!(store.forget(b"k", 14).unwrap(), Forgotten::Removed);
        assert_eq!(store.forget(b"k", 14).unwrap(), Forgotten::Absent);
        assert!(is_fresh(store.claim(b"k", &A, 15)));
    }

    #[test]
    fn handles_sharing_a_directory_see_each_other_and_take_over_dead_claims() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path());
        let second = open(dir.path());
        let dead = fresh(first.claim(b"k", &A, 100));
        assert_eq!(second.claim(b"k", &A, 100).unwrap(), Claim::InProgress);
        assert_eq!(second.claim(b"k", &B, 100).unwrap(), Claim::Conflict);
        // The owner "dies": its claim holds until its lease runs out, then anyone takes it.
        drop(first);
        let third = open(dir.path());
        assert_eq!(
            third.claim(b"k", &A, 100 + LEASE_MS - 1).unwrap(),
            Claim::InProgress
        );
        let taker = taken_over(third.claim(b"k", &B, 100 + LEASE_MS));
        // The dead owner's late completion or release never touches the new owner's claim.
        assert_eq!(
            second.complete(b"k", dead, &A, 0, 100 + LEASE_MS).unwrap(),
            Completion::Superseded
        );
        second.release(b"k", dead).unwrap();
        assert_eq!(
            second.claim(b"k", &B, 101 + LEASE_MS).unwrap(),
            Claim::InProgress
        );
        third.complete(b"k", taker, &B, 0, 200 + LEASE_MS).unwrap();
        assert_eq!(
            second.claim(b"k", &B, 300 + LEASE_MS).unwrap(),
            Claim::Replay { result: 0 }
        );
    }

    #[test]
    fn a_renewed_lease_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let owner = open(dir.path());
        let other = open(dir.path());
        let token = fresh(owner.claim(b"k", &A, 0));
        owner
            .renew(&[(b"k".to_vec(), token)], LEASE_MS - 1)
            .unwrap();
        assert_eq!(
            other.claim(b"k", &A, LEASE_MS + 5).unwrap(),
            Claim::InProgress
        );
        // Renewing is for the claim's token only.
        other
            .renew(&[(b"k".to_vec(), ClaimToken(token.0 ^ 1))], 10 * LEASE_MS)
            .unwrap();
        let taker = taken_over(other.claim(b"k", &A, 2 * LEASE_MS - 1));
        // The old owner's renewal no longer extends anything: the key is the taker's.
        owner
            .renew(&[(b"k".to_vec(), token)], 2 * LEASE_MS)
            .unwrap();
        match other.get(b"k", 2 * LEASE_MS).unwrap().unwrap().state {
            KeyState::Claimed { token, .. } => assert_eq!(token, taker),
            state => panic!("{state:?}"),
        }
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            for i in 0..50u32 {
                let key = format!("key-{i}");
                let token = fresh(store.claim(key.as_bytes(), &A, 1));
                if i % 2 == 0 {
                    store.complete(key.as_bytes(), token, &A, 0, 2).unwrap();
                }
            }
        }
        let store = open(dir.path());
        for i in 0..50u32 {
            let key = format!("key-{i}");
            let expected = if i % 2 == 0 {
                Claim::Replay { result: 0 }
            } else {
                Claim::InProgress
            };
            assert_eq!(
                store.claim(key.as_bytes(), &A, 3).unwrap(),
                expected,
                "{key}"
            );
        }
    }

    #[test]
    fn a_torn_last_record_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, last_start) = {
            let store = open(dir.path());
            let token = fresh(store.claim(b"whole", &A, 1));
            store.complete(b"whole", token, &A, 0, 1).unwrap();
            let last_start = store.journal_len();
            store.claim(b"torn", &A, 1).unwrap();
            (store.journal_path().to_path_buf(), last_start as usize)
        };
        // Cut the last record in half, as a writer killed mid-write leaves it.
        let bytes = fs::read(&journal).unwrap();
        let cut = last_start + (bytes.len() - last_start) / 2;
        fs::write(&journal, &bytes[..cut]).unwrap();
        let store = open(dir.path());
        assert_eq!(fs::metadata(&journal).unwrap().len(), last_start as u64);
        assert_eq!(
            store.claim(b"whole", &A, 2).unwrap(),
            Claim::Replay { result: 0 }
        );
        assert!(is_fresh(store.claim(b"torn", &A, 2)));
    }

    #[test]
    fn corruption_before_the_end_is_reported_and_the_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let journal = {
            let store = open(dir.path());
            store.claim(b"one", &A, 1).unwrap();
            store.claim(b"two", &A, 1).unwrap();
            store.journal_path().to_path_buf()
        };
        let mut bytes = fs::read(&journal).unwrap();
        bytes[12] ^= 0x04;
        fs::write(&journal, &bytes).unwrap();
        let err = FileIdempotencyStore::open(dir.path(), settings())
            .err()
            .expect("refused");
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
        assert!(
            err.detail().contains("journal") && err.detail().contains("byte 0"),
            "{}",
            err.detail()
        );
        assert_eq!(fs::read(&journal).unwrap(), bytes, "never silently emptied");
    }

    #[test]
    fn a_text_journal_of_an_earlier_build_is_kept_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("idempotency/journal");
        fs::create_dir_all(journal.parent().unwrap()).unwrap();
        let line = format!(
            "1c2d3e4f D 0000000000000000 99 0 {} 6b6579\n",
            "ab".repeat(32)
        );
        fs::write(&journal, &line).unwrap();
        let err = FileIdempotencyStore::open(dir.path(), settings())
            .err()
            .expect("refused");
        assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
        assert!(err.detail().contains("text format"), "{}", err.detail());
        assert_eq!(fs::read_to_string(&journal).unwrap(), line, "never cut off");
    }

    #[test]
    fn corruption_found_later_stops_every_call() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let other = open(dir.path());
        store.claim(b"one", &A, 1).unwrap();
        store.claim(b"two", &A, 1).unwrap();
        let mut bytes = fs::read(store.journal_path()).unwrap();
        bytes[3] ^= 0x01;
        fs::write(store.journal_path(), &bytes).unwrap();
        // `other` has read nothing yet: it reads the bad record now.
        for _ in 0..2 {
            let err = other.claim(b"three", &A, 2).unwrap_err();
            assert_eq!(err.code(), ErrorCode::DataCorruption.raw());
        }
    }

    #[test]
    fn compaction_keeps_live_records_and_other_handles_follow() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let other = open(dir.path());
        // Short-lived completions and a few that outlive the compaction.
        for i in 0..200u32 {
            let key = format!("gone-{i}");
            let token = fresh(store.claim(key.as_bytes(), &A, 0));
            store.complete(key.as_bytes(), token, &A, 0, 0).unwrap();
        }
        let token = fresh(store.claim(b"kept", &A, TTL_MS));
        store.complete(b"kept", token, &A, 0, TTL_MS).unwrap();
        store.claim(b"running", &B, TTL_MS).unwrap();
        let before = store.journal_len();
        assert!(before > 4096 * 2, "{before}");
        store.maintain(TTL_MS + 1).unwrap();
        let after = store.journal_len();
        assert!(after < 600, "compacted to {after} bytes");
        assert_eq!(fs::metadata(store.journal_path()).unwrap().len(), after);
        assert!(!dir.path().join("idempotency/journal.compact").exists());
        let now = TTL_MS + 2;
        for (handle, gone) in [(&store, "gone-7"), (&other, "gone-8")] {
            assert_eq!(
                handle.claim(b"kept", &A, now).unwrap(),
                Claim::Replay { result: 0 }
            );
            assert!(is_fresh(handle.claim(gone.as_bytes(), &A, now)));
        }
        assert_eq!(other.claim(b"running", &B, now).unwrap(), Claim::InProgress);
        // Both handles append to the new journal; a restart reads it.
        drop((store, other));
        let reopened = open(dir.path());
        assert_eq!(
            reopened.claim(b"gone-7", &A, now).unwrap(),
            Claim::InProgress
        );
        assert_eq!(
            reopened.claim(b"gone-8", &A, now).unwrap(),
            Claim::InProgress
        );
        assert_eq!(reopened.claim(b"kept", &B, now).unwrap(), Claim::Conflict);
    }

    #[test]
    fn concurrent_claims_of_one_key_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let stores: Vec<FileIdempotencyStore> = (0..4).map(|_| open(dir.path())).collect();
        for round in 0..20u32 {
            let key = format!("key-{round}");
            let winners: usize = std::thread::scope(|scope| {
                let handles: Vec<_> = stores
                    .iter()
                    .flat_map(|store| [store, store])
                    .map(|store| {
                        let key = key.clone();
                        scope.spawn(move || is_fresh(store.claim(key.as_bytes(), &A, 5)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap() as usize)
                    .sum()
            });
            assert_eq!(winners, 1, "{key}");
        }
    }
}

#[cfg(test)]
mod images {
    use super::*;
    use crate::error::ErrorCode;
    use std::fs;

    use super::test_support::{fill, settings, FP};

    fn replays(store: &FileIdempotencyStore, keys: std::ops::Range<u32>) {
        for i in keys {
            let key = format!("key-{i}");
            let claim = store.claim(key.as_bytes(), &FP, 11).unwrap();
            assert_eq!(claim, Claim::Replay { result: 0 }, "{key}");
        }
    }

    #[test]
    fn a_restart_loads_the_image_and_reads_only_the_journal_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        fill(&store, 0..300);
        store.compact_now(10).unwrap();
        let covered = store.journal_len();
        fill(&store, 300..320);
        let journal = store.journal_path().to_path_buf();
        drop(store);
        assert!(dir.path().join("idempotency/index").exists());
        // A bit flipped in a record the image covers: the restart does not read it...
        let mut bytes = fs::read(&journal).unwrap();
        bytes[40] ^= 0x10;
        fs::write(&journal, &bytes).unwrap();
        let store = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        assert_eq!(store.journal_len(), fs::metadata(&journal).unwrap().len());
        assert!(covered < store.journal_len());
        replays(&store, 1..320);
        // ...and reading it back still checks it: corruption, on every call from then on.
        let err = store.claim(b"key-0", &FP, 11).unwrap_err();
        assert_eq!(
            err.code(),
            ErrorCode::DataCorruption.raw(),
            "{}",
            err.detail()
        );
        assert!(err.detail().contains("byte 0"), "{}", err.detail());
        assert!(store.claim(b"key-5", &FP, 11).is_err());
    }

    #[test]
    fn an_image_that_does_not_check_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        fill(&store, 0..200);
        store.compact_now(10).unwrap();
        drop(store);
        let image = dir.path().join("idempotency/index");
        let mut bytes = fs::read(&image).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        fs::write(&image, &bytes).unwrap();
        let store = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        replays(&store, 0..200);
        assert!(is_new(&store, b"key-200"));
    }

    fn is_new(store: &FileIdempotencyStore, key: &[u8]) -> bool {
        matches!(
            store.claim(key, &FP, 11),
            Ok(Claim::Acquired {
                taken_over: false,
                ..
            })
        )
    }

    #[test]
    fn housekeeping_writes_an_image_between_compactions() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        let other = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        let image = dir.path().join("idempotency/index");
        // Below the slack: nothing to write yet.
        fill(&store, 0..10);
        store.maintain(10).unwrap();
        assert!(!image.exists());
        fill(&store, 10..300);
        store.maintain(10).unwrap();
        assert_eq!(store.compactions(), 1);
        let keys_in_image = |n: u64| fs::metadata(&image).unwrap().len() == 64 + 16 * n;
        assert!(keys_in_image(300));
        // Grown past the image by more than the slack, short of a compaction: a new image.
        fill(&store, 300..350);
        store.maintain(10).unwrap();
        assert_eq!(store.compactions(), 1);
        assert!(keys_in_image(350));
        // Keys forgotten and claimed after the image are replayed from the journal.
        assert_eq!(store.forget(b"key-3", 11).unwrap(), Forgotten::Removed);
        store.claim(b"late", &FP, 11).unwrap();
        drop((store, other));
        let store = FileIdempotencyStore::open(dir.path(), settings()).unwrap();
        replays(&store, 4..350);
        assert!(is_new(&store, b"key-3"));
        assert_eq!(store.claim(b"late", &FP, 12).unwrap(), Claim::InProgress);
    }
}

#[cfg(test)]
mod compaction_race {
    use super::*;

    #[test]
    fn records_appended_during_a_compaction_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let settings = FileIdempotencySettings {
            lease: Duration::from_secs(60),
            ttl: Duration::from_secs(3600),
            compaction_slack_bytes: 2048,
        };
        let compactor = FileIdempotencyStore::open(dir.path(), settings).unwrap();
        let writer = FileIdempotencyStore::open(dir.path(), settings).unwrap();
        // The writer stops once the compactor has compacted a few times under it.
        let done = std::sync::atomic::AtomicBool::new(false);
        let written = std::thread::scope(|scope| {
            let writing = scope.spawn(|| {
                let mut n = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("key-{n}");
                    let Ok(Claim::Acquired { token, .. }) =
                        writer.claim(key.as_bytes(), &[1; 32], 10)
                    else {
                        panic!("{key} not acquired");
                    };
                    writer
                        .complete(key.as_bytes(), token, &[1; 32], 0, 10)
                        .unwrap();
                    n += 1;
                }
                n
            });
            while compactor.compactions() < 5 {
                compactor.maintain(10).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            writing.join().unwrap()
        });
        let reopened = FileIdempotencyStore::open(dir.path(), settings).unwrap();
        for n in 0..written {
            let key = format!("key-{n}");
            assert_eq!(
                reopened.claim(key.as_bytes(), &[1; 32], 11).unwrap(),
                Claim::Replay { result: 0 },
                "{key} of {written}"
            );
        }
    }
}
